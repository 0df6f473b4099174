"""Labels on language models (``layermerge.methods.supervision``): a causal LM's per-token labels are
scored one position later, as transformers' own loss does. Checked by hand on a bigram model (Fisher
of the completion's tokens), against transformers' loss on a tiny Llama (Fisher merging's Fisher and
DF-Merge's objective), and end to end through generation few-shot data with labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_with_experts
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertForSequenceClassification

import layermerge
from layermerge.errors import ConfigError
from layermerge.methods.fisher import diagonal_fisher
from layermerge.methods.supervision import (
    correct_count,
    prediction_targets,
    predicts_next_token,
    supervised_loss_sum,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 7


# --------------------------------------------------------------------- alignment
def test_prediction_targets_shift_a_causal_lms_labels_by_one_position():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    labels = torch.tensor([[-100, -100, 2, 0], [-100, 1, 1, -100]])
    flat, targets = prediction_targets(logits, labels, shift=True)
    assert flat.shape == (6, 3) and torch.equal(flat, logits[:, :3].reshape(6, 3))
    assert targets.tolist() == [-100, 2, 0, 1, 1, -100]
    unshifted, same = prediction_targets(logits, labels, shift=False)
    assert unshifted.shape == (8, 3) and torch.equal(same, labels.reshape(-1))
    classes, per_example = prediction_targets(logits[:, 0], torch.tensor([2, 0]))
    assert classes.shape == (2, 3) and per_example.tolist() == [2, 0]
    with pytest.raises(ConfigError, match="do not line up"):
        prediction_targets(logits, torch.tensor([1, 2]))


def test_loss_and_accuracy_match_transformers_conventions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, VOCAB, generator=generator)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    total, count = supervised_loss_sum(logits, labels, shift=True)
    # transformers' causal LM loss: mean cross-entropy of logits[:, :-1] against labels[:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert count == 5 and float(total / count) == pytest.approx(float(reference), rel=1e-6)
    right, seen = correct_count(logits, labels, shift=True)
    by_hand = sum(int(logits[b, t - 1].argmax() == labels[b, t]) for b in range(2) for t in range(1, 5)
                  if labels[b, t] != -100)
    assert (right, seen) == (by_hand, 5)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type="llama", vocab_size=61, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=24,
                                  tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


def test_which_models_predict_the_next_token():
    from transformers import T5Config, T5ForConditionalGeneration

    assert predicts_next_token(tiny_llama())
    assert not predicts_next_token(BertForSequenceClassification(BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)))
    assert not predicts_next_token(T5ForConditionalGeneration(T5Config(
        vocab_size=30, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)))


# --------------------------------------------------------------------- the Fisher of a sequence
def bigram():
    """A bigram language model: logits at position t are row x_t of W (V × V)."""
    generator = torch.Generator().manual_seed(3)
    params = {"W": torch.randn(VOCAB, VOCAB, generator=generator, dtype=torch.float64)}

    def logits_fn(p, example):
        return p["W"][example["input_ids"]]           # (1, positions, V)
    return params, logits_fn


def bigram_fisher_by_hand(W: np.ndarray, examples: list[tuple[list[int], list[int]]]) -> np.ndarray:
    """Σ over labelled positions of ∂ log softmax(W[x_{t-1}])[y_t] / ∂W = onehot(y_t) − p(· | x_{t-1}) in
    row x_{t-1}; squared per example, then averaged."""
    total = np.zeros_like(W)
    for ids, labels in examples:
        grad = np.zeros_like(W)
        for t in range(1, len(ids)):
            if labels[t] == -100:
                continue
            row = W[ids[t - 1]]
            p = np.exp(row - row.max())
            p /= p.sum()
            grad[ids[t - 1]] += np.eye(len(row))[labels[t]] - p
        total += grad ** 2
    return total / len(examples)


def test_sequence_fisher_of_the_completion_tokens_by_hand():
    params, logits_fn = bigram()
    ids = torch.tensor([[1, 4, 2, 2, 5], [3, 3, 0, 6, 1]])
    labels = torch.tensor([[-100, -100, 2, 2, 5], [-100, 3, 0, 6, -100]])
    fisher, count = diagonal_fisher(logits_fn, params, [{"input_ids": ids, "labels": labels}], "true", shift=True)
    expected = bigram_fisher_by_hand(params["W"].numpy(), [(ids[i].tolist(), labels[i].tolist()) for i in range(2)])
    assert count == 2
    np.testing.assert_allclose(fisher["W"].numpy(), expected, rtol=1e-10, atol=1e-12)
    # an example whose only label would be predicted by no position counts for nothing
    _, none = diagonal_fisher(logits_fn, params, [{"input_ids": ids[:1], "labels": torch.tensor([[4, -100, -100,
                                                                                                   -100, -100]])}],
                              "true", shift=True)
    assert none == 0


def test_sampled_sequence_fisher_reads_only_the_labelled_positions_and_is_seeded():
    params, logits_fn = bigram()
    ids = torch.tensor([[1, 4, 2, 2, 5]])
    labels = torch.tensor([[-100, -100, -100, 2, -100]])          # predicted from position 2 (token 2)
    first, _ = diagonal_fisher(logits_fn, params, [{"input_ids": ids, "labels": labels}], "sampled",
                               torch.Generator().manual_seed(5), shift=True)
    again, _ = diagonal_fisher(logits_fn, params, [{"input_ids": ids, "labels": labels}], "sampled",
                               torch.Generator().manual_seed(5), shift=True)
    assert torch.equal(first["W"], again["W"])
    rows = first["W"].abs().sum(1)
    assert rows[2] > 0 and float(rows.sum() - rows[2]) == 0.0
    with pytest.raises(ConfigError, match="vocabulary entry"):
        diagonal_fisher(logits_fn, params, [{"input_ids": ids, "labels": labels}], "expected", shift=True)


def hf_fisher(model, examples: list[dict]) -> dict[str, torch.Tensor]:
    """The empirical Fisher with transformers' own loss: per example, the gradient of the summed
    log-likelihood of its labels = −loss × labelled tokens (transformers shifts the labels itself)."""
    params = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for example in examples:
        model.zero_grad()
        out = model(input_ids=example["input_ids"], attention_mask=example["attention_mask"], labels=example["labels"])
        count = int((example["labels"][:, 1:] != -100).sum())
        (-out.loss * count).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad ** 2
    return {name: f / len(examples) for name, f in fisher.items()}


def labelled_lm_batches(tasks, seed=0, rows=3, width=6):
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for task in tasks:
        ids = torch.randint(0, 61, (rows, width), generator=generator)
        labels = ids.clone()
        labels[:, :2] = -100                                   # the prompt
        mask = torch.ones_like(ids)
        mask[0, -1] = 0                                        # one padded position
        labels[0, -1] = -100
        out[task] = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    return out


def test_fisher_merging_of_causal_lms_matches_transformers_loss(tmp_path):
    base = tiny_llama()
    experts, paths = save_with_experts(base, tmp_path, count=2)
    data = labelled_lm_batches(list(paths))
    merged = layermerge.merge(str(tmp_path / "base"), {t: str(p) for t, p in paths.items()}, "fisher", data=data,
                              output=tmp_path / "out", quiet=True, save_fishers=True)
    assert merged.summary["fisher_labels"] == {"t0": "true", "t1": "true"}
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "fisher" / "artifacts.safetensors")
    for task, model in experts.items():
        examples = [{k: v[i:i + 1] for k, v in data[task][0].items()} for i in range(3)]
        examples[0] = {k: v[:, :-1] for k, v in examples[0].items()}           # padding trimmed, as Fisher does
        reference = hf_fisher(model.float(), examples)
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                     "model.embed_tokens.weight"):
            torch.testing.assert_close(saved[f"{task}/{name}"], reference[name], rtol=1e-4, atol=1e-9)


def test_df_merge_on_causal_lms_scores_the_completion_tokens(tmp_path):
    base = tiny_llama()
    _, paths = save_with_experts(base, tmp_path, count=2)
    data = labelled_lm_batches(list(paths), seed=1)
    merged = layermerge.merge(str(tmp_path / "base"), {t: str(p) for t, p in paths.items()}, "df_merge", data=data,
                              output=tmp_path / "out", quiet=True, fisher_labels="true", objective="loss",
                              init_points=2, iterations=1)
    summary = merged.summary
    assert len(summary["evaluations"]) == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        losses = [float(model(**data[t][0]).loss) for t in paths]        # transformers' mean over labelled tokens
    assert summary["objective_best"] == pytest.approx(-sum(losses) / 2, rel=1e-4)
    with pytest.raises(ConfigError, match="fisher_labels"):
        layermerge.merge(str(tmp_path / "base"), {t: str(p) for t, p in paths.items()}, "df_merge", data=data,
                         quiet=True, init_points=1, iterations=0)
    json.dumps(summary)                                                # the summary stays serialisable


def test_np_merge_refuses_language_models_in_one_line(tmp_path):
    base = tiny_llama()
    _, paths = save_with_experts(base, tmp_path, count=2)
    with pytest.raises(ConfigError, match="language models"):
        layermerge.merge(str(tmp_path / "base"), {t: str(p) for t, p in paths.items()}, "np_merge",
                         data=labelled_lm_batches(list(paths)), quiet=True)


def test_a_swapped_token_embedding_also_replaces_the_tied_output_head(tmp_path):
    """Whole-model methods run experts with merged weights swapped in: a tied head must follow the
    embedding, as it does once the merged checkpoint is loaded (it did not before, silently)."""
    from layermerge.experts import ExpertSet
    from layermerge.pipeline.strategies.modelwise import ModelContext

    base = tiny_llama()
    experts, paths = save_with_experts(base, tmp_path, count=2)
    ctx = ModelContext(ExpertSet(str(tmp_path / "base"), {t: str(p) for t, p in paths.items()}),
                       labelled_lm_batches(list(paths)), torch.device("cpu"))
    batch = ctx.batches("t0")[0]
    replaced = base.model.embed_tokens.weight.detach() * 1.5
    with torch.no_grad():
        swapped = ctx.logits("t0", {"model.embed_tokens.weight": replaced}, batch)
        loaded = experts["t0"].float()
        loaded.model.embed_tokens.weight.copy_(replaced)              # tied: the head changes with it
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        reference = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(swapped, reference, rtol=1e-5, atol=1e-5)


def test_localize_stitch_on_causal_lms_reads_the_completion_tokens(tmp_path):
    """Localize-and-Stitch's task loss is transformers' loss of the model at θ0 + σ(s)·τ (every score at
    +sigmoid_bias with sparsity 1): the labels are shifted as transformers shifts them."""
    base = tiny_llama()
    experts, paths = save_with_experts(base, tmp_path, count=2)
    data = labelled_lm_batches(list(paths), seed=2)
    merged = layermerge.merge(str(tmp_path / "base"), {t: str(p) for t, p in paths.items()}, "localize_stitch",
                              data=data, quiet=True, sparsity=1.0, steps=1)
    gate = float(torch.sigmoid(torch.tensor(5.0)))
    base_state = base.state_dict()
    for task, expert in experts.items():
        model = tiny_llama()
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(base_state[name] + gate * (expert.state_dict()[name] - base_state[name]))
            loss = float(model(**data[task][0]).loss)
        assert merged.summary["tasks"][task]["loss_first"] == pytest.approx(loss, rel=1e-4)
