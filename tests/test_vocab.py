"""Experts that added tokens: vocab_policy union, tokenizer_source and chat_template (layermerge.vocab).

A tiny Llama base with a character tokenizer; expert A adds two chat tokens, expert B one of the same
and a tool token. Rows of the base's tokens must equal the ``base`` policy's merge; each added token's
row must be its expert's row (the mean where both experts have it); the output tokenizer and config
must describe the grown vocabulary, and the folder must load and tokenise the new tokens as one id.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb_
from tinytext import build_tiny_causal_base

import layermerge
from layermerge.cli import main
from layermerge.errors import IncompatibleExpertsError
from layermerge.io.reader import CheckpointReader

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
ADDED = {"a": ["<|im_start|>", "<|im_end|>"], "b": ["<|im_end|>", "<tool>"]}


def save_expert(base, folder, tokens, seed, template=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if template is not None:
        tokenizer.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    perturb_(model, seed=seed, scale=0.05)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base = build_tiny_causal_base(root / "base")
    if not request.param:          # an untied output head: its rows must grow like the embedding's
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
        model.save_pretrained(base)
    experts = {"a": save_expert(base, root / "a", ADDED["a"], 1, template="{{ messages[0]['content'] }}!"),
               "b": save_expert(base, root / "b", ADDED["b"], 2)}
    return root, base, experts, request.param


def tensors(folder):
    return CheckpointReader(folder).state_dict()


def test_union_keeps_every_added_token_with_its_experts_rows(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, base, experts, tied = setup
    union = layermerge.merge(base, experts, "task_arithmetic", vocab_policy="union", scaling=0.5,
                             output=tmp_path / "union", quiet=True)
    plain = layermerge.merge(base, experts, "task_arithmetic", vocab_policy="base", scaling=0.5, quiet=True)
    base_tok = AutoTokenizer.from_pretrained(base)
    out_tok = AutoTokenizer.from_pretrained(union.path)
    n = len(base_tok)
    assert len(out_tok) == n + 3
    ids = {token: out_tok.convert_tokens_to_ids(token) for token in ("<|im_start|>", "<|im_end|>", "<tool>")}
    assert sorted(ids.values()) == [n, n + 1, n + 2]
    assert out_tok("<|im_start|>hi<tool>", add_special_tokens=False)["input_ids"][0] == ids["<|im_start|>"]
    config = json.loads((union.path / "config.json").read_text())
    assert config["vocab_size"] == n + 3
    merged, a, b = tensors(union.path), tensors(experts["a"]), tensors(experts["b"])
    a_tok, b_tok = AutoTokenizer.from_pretrained(experts["a"]), AutoTokenizer.from_pretrained(experts["b"])
    for key in [EMBED] + ([] if tied else [HEAD]):
        assert merged[key].shape[0] == n + 3
        assert torch.equal(merged[key][:n], plain.state_dict[key][:n])       # base rows: as the base policy
        row = {name: lambda t, s=state, k=tok, key=key: s[key][k.convert_tokens_to_ids(t)]
               for name, state, tok in (("a", a, a_tok), ("b", b, b_tok))}
        assert torch.equal(merged[key][ids["<|im_start|>"]], row["a"]("<|im_start|>"))
        assert torch.equal(merged[key][ids["<tool>"]], row["b"]("<tool>"))
        torch.testing.assert_close(merged[key][ids["<|im_end|>"]],
                                   (row["a"]("<|im_end|>") + row["b"]("<|im_end|>")) / 2)
    model = AutoModelForCausalLM.from_pretrained(union.path)
    assert model.get_input_embeddings().weight.shape[0] == n + 3
    with torch.no_grad():
        logits = model(torch.tensor([[ids["<|im_start|>"], 3, ids["<tool>"]]])).logits
    assert logits.shape[-1] == n + 3 and torch.isfinite(logits).all()


def test_tokenizer_source_outputs_one_experts_tokenizer(setup, tmp_path):
    from transformers import AutoTokenizer

    root, base, experts, tied = setup
    out = layermerge.merge(base, experts, "task_arithmetic", tokenizer_source="b", output=tmp_path / "b",
                           quiet=True)
    out_tok, b_tok = AutoTokenizer.from_pretrained(out.path), AutoTokenizer.from_pretrained(experts["b"])
    assert out_tok.get_vocab() == b_tok.get_vocab()
    assert "<|im_start|>" not in out_tok.get_vocab()
    merged, a, b = tensors(out.path), tensors(experts["a"]), tensors(experts["b"])
    a_tok = AutoTokenizer.from_pretrained(experts["a"])
    end = b_tok.convert_tokens_to_ids("<|im_end|>")
    torch.testing.assert_close(merged[EMBED][end], (a[EMBED][a_tok.convert_tokens_to_ids("<|im_end|>")]
                                                    + b[EMBED][end]) / 2)
    assert merged[EMBED].shape[0] == len(b_tok)


def test_chat_template_comes_from_the_named_input(setup, tmp_path):
    from transformers import AutoTokenizer

    root, base, experts, tied = setup
    out = layermerge.merge(base, experts, "task_arithmetic", vocab_policy="union", chat_template="a",
                           output=tmp_path / "chat", quiet=True)
    assert AutoTokenizer.from_pretrained(out.path).chat_template == "{{ messages[0]['content'] }}!"
    base_template = AutoTokenizer.from_pretrained(base).chat_template
    again = layermerge.merge(base, experts, "task_arithmetic", vocab_policy="union", output=tmp_path / "plain",
                             quiet=True)
    assert AutoTokenizer.from_pretrained(again.path).chat_template == base_template


def test_union_from_a_yaml_config_and_with_prodistill(setup, tmp_path, capsys):
    root, base, experts, tied = setup
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {base}\nexperts: {{a: {experts['a']}, b: {experts['b']}}}\nmethod: ties\n"
                      "vocab_policy: union\nchat_template: a\n")
    assert main(["merge", str(config), "-o", str(tmp_path / "cli"), "-q"]) == 0, capsys.readouterr().err
    assert tensors(tmp_path / "cli")[EMBED].shape[0] == CheckpointReader(base).shape(EMBED)[0] + 3
    batches = {name: [{"input_ids": torch.randint(3, 40, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
               for name in experts}
    out = layermerge.merge(base, experts, "prodistill", vocab_policy="union", data=batches, epochs=1,
                           output=tmp_path / "pd", quiet=True)
    merged = tensors(out.path)
    assert merged[EMBED].shape[0] == CheckpointReader(base).shape(EMBED)[0] + 3


def test_a_tokenizer_that_does_not_extend_the_bases_is_refused(setup, tmp_path):
    from tinytext import CAUSAL_VOCAB, char_tokenizer
    from transformers import AutoModelForCausalLM

    root, base, experts, tied = setup
    swapped = tmp_path / "swapped"
    model = AutoModelForCausalLM.from_pretrained(experts["b"])
    model.save_pretrained(swapped)
    tokenizer = char_tokenizer()
    vocab = tokenizer.get_vocab()
    assert vocab["a"] != vocab["b"]
    # A tokenizer whose 'a' and 'b' swapped ids: the same strings, other rows.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    order = list(CAUSAL_VOCAB)
    i, j = order.index("a"), order.index("b")
    order[i], order[j] = order[j], order[i]
    core = Tokenizer(models.WordLevel({c: k for k, c in enumerate(order)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(swapped)
    with pytest.raises(IncompatibleExpertsError, match="does not extend the base's: token '[ab]' has id"):
        layermerge.merge(base, {"a": experts["a"], "swapped": swapped}, "task_arithmetic", vocab_policy="union",
                         quiet=True)


def test_unknown_inputs_for_tokenizer_source_and_chat_template(setup):
    root, base, experts, tied = setup
    with pytest.raises(IncompatibleExpertsError, match="tokenizer_source: 'c' is not an input; choose one of "
                                                       "base, a, b"):
        layermerge.merge(base, experts, "task_arithmetic", tokenizer_source="c", quiet=True)
    with pytest.raises(IncompatibleExpertsError, match="chat_template: 'union' is not an input"):
        layermerge.merge(base, experts, "task_arithmetic", vocab_policy="union", chat_template="union", quiet=True)


def test_engine_views_give_task_arithmetic_the_output_rows(setup):
    """The block engine reads vocabulary tensors in the output's rows: each expert's own row for its added
    tokens, the owners' mean for the others, so Task Arithmetic over the views (how the engine merges
    non-block weights) gives every added token the output's row, the owners' mean, at any scaling."""
    from layermerge.experts import ExpertSet

    root, base, experts, tied = setup
    expert_set = ExpertSet(base, experts, vocab_policy="union")
    vocabulary = expert_set.vocabulary
    base_view = expert_set.vocabulary_view(EMBED)
    views = [expert_set.vocabulary_view(EMBED, position) for position in range(2)]
    assert base_view.shape[0] == views[0].shape[0] == vocabulary.size
    rows = [CheckpointReader(experts[name]).get(EMBED) for name in ("a", "b")]
    n = vocabulary.base_tokens
    for position in range(2):
        assert torch.equal(views[position][:n], rows[position][:n])
    for token, owners in vocabulary.added.items():
        mean = torch.stack([rows[owner][row] for owner, row in owners]).mean(0)
        for scaling in (0.3, 1.0):
            merged = base_view[token] + scaling * sum(view[token] - base_view[token] for view in views)
            torch.testing.assert_close(merged, mean)
        for owner, row in owners:
            assert torch.equal(views[owner][token], rows[owner][row])


def test_data_driven_union_tokenises_each_task_with_its_experts_tokenizer(setup, tmp_path):
    """Few-shot text with an expert's added token becomes that token's id in the merged vocabulary (one id,
    not the base's pieces), and ProDistill trains on it."""
    from transformers import AutoTokenizer

    from layermerge.experts import ExpertSet
    from layermerge.fewshot import DataConfig, build_few_shot

    root, base, experts, tied = setup
    for name, token in (("a", "<|im_start|>"), ("b", "<tool>")):
        folder = tmp_path / name
        folder.mkdir()
        lines = [json.dumps({"q": f"{token}abc{i}", "a": "yes"}) for i in range(4)]
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "task.yaml").write_text(f"name: {name}\ntype: generation\nprompt: q\ncompletion: a\n"
                                          "files: {train: train.jsonl}\nchat_template: false\n")
    config = DataConfig(shots=4, tasks={name: str(tmp_path / name / "task.yaml") for name in experts})
    expert_set = ExpertSet(base, experts, vocab_policy="union")
    batches = build_few_shot(config, expert_set)
    out_tok = expert_set.vocabulary.tokenizer
    for name, token in (("a", "<|im_start|>"), ("b", "<tool>")):
        ids = batches[name][0]["input_ids"]
        assert (ids == out_tok.convert_tokens_to_ids(token)).sum() == 4
        assert ids.max() < expert_set.vocabulary.size
    assert AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<tool>") in (None, out_tok.unk_token_id)
    out = layermerge.merge(base, experts, "prodistill", vocab_policy="union", data=config, epochs=1,
                           output=tmp_path / "pd", quiet=True)
    assert tensors(out.path)[EMBED].shape[0] == expert_set.vocabulary.size


def test_an_expert_without_tokenizer_files_and_the_bases_size_has_the_bases_tokenizer(setup, tmp_path):
    """A LoRA adapter (or a model) saved without a tokenizer, whose vocabulary is the base's size, added no
    tokens: union takes the base's tokenizer for it instead of stopping."""
    import shutil

    from transformers import AutoTokenizer

    root, base, experts, tied = setup
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, bare / name)
    out = layermerge.merge(base, {"a": experts["a"], "plain": bare}, "task_arithmetic", vocab_policy="union",
                           output=tmp_path / "out", quiet=True)
    assert len(AutoTokenizer.from_pretrained(out.path)) == len(AutoTokenizer.from_pretrained(base)) + 2
