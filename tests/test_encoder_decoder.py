"""Encoder-decoder models (T5, BART, Whisper): two stacks, two streams.

The plan lists the encoder's blocks, then the decoder's; each decoder block is trained on the decoder
stream with cross-attention to the same side's encoder output (the merged encoder's for the merged
stream, each expert's own for its stream). Checked here: the block errors of ProDistill and RegMean
against Task Arithmetic's, the output folders, few-shot decoder inputs from a ``data:`` section, and
the refusals (a plan that would feed one stack's stream into the other, end-to-end methods).
"""

from __future__ import annotations

import copy
import json
import string

import pytest
import torch
from conftest import perturbed, save_with_experts
from safetensors.torch import load_file

import layermerge
from layermerge.blocks import BlockPlanError
from layermerge.cli import main
from layermerge.engine import StateDictSource, run_engine
from layermerge.engine.diagnostics import block_errors
from layermerge.errors import ConfigError
from layermerge.methods.prodistill import prodistill_merge
from layermerge.methods.registry import get_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIAL = dict(pad_token_id=1, bos_token_id=2, eos_token_id=2)
CONFIGS = {
    "t5": dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=3,
               num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "bart": dict(model_type="bart", vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                 max_position_embeddings=64, decoder_start_token_id=2, **SPECIAL),
    "whisper": dict(model_type="whisper", vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                    num_mel_bins=8, max_source_positions=16, max_target_positions=32, decoder_start_token_id=3,
                    **SPECIAL),
}
TASK_CLASS = {"t5": "AutoModelForSeq2SeqLM", "bart": "AutoModelForSeq2SeqLM", "whisper": "AutoModelForSpeechSeq2Seq"}


def batches(family: str, seed: int) -> list[dict]:
    """Encoder inputs (padded tokens, or audio features) and teacher-forced decoder tokens with padding."""
    generator = torch.Generator().manual_seed(seed)
    decoder = {"decoder_input_ids": torch.randint(4, 99, (3, 6), generator=generator),
               "decoder_attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])}
    if family == "whisper":
        return [{"input_features": torch.randn(3, 8, 32, generator=generator), **decoder}]
    mask = torch.tensor([[1] * 9, [1] * 7 + [0] * 2, [1] * 9])
    return [{"input_ids": torch.randint(4, 99, (3, 9), generator=generator) * mask, "attention_mask": mask,
             **decoder}]


def task_model(family: str, **overrides):
    import transformers

    config = transformers.AutoConfig.for_model(**{**CONFIGS[family], **overrides})
    torch.manual_seed(0)
    return getattr(transformers, TASK_CLASS[family]).from_config(config).eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """A tiny task model of each family and two experts, saved as save_pretrained writes them."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = task_model(family)
    experts, paths = save_with_experts(base, root)
    data = {task: batches(family, 10 + index) for index, task in enumerate(paths)}
    return family, root, base, experts, paths, data


def task_arithmetic(base, experts, scaling=0.3) -> dict:
    state = base.state_dict()
    return {key: state[key] + scaling * sum(e.state_dict()[key] - state[key] for e in experts.values())
            if state[key].is_floating_point() else state[key] for key in state}


def test_plan_has_two_stacks_and_data_driven_merges_beat_task_arithmetic_on_every_block(saved):
    family, _, base, experts, _, data = saved
    backbone = base.base_model
    expert_backbones = {task: expert.base_model for task, expert in experts.items()}
    source = StateDictSource.from_models(backbone, expert_backbones)
    reference = block_errors(copy.deepcopy(backbone), source, data, task_arithmetic(backbone, expert_backbones))

    result = prodistill_merge(copy.deepcopy(backbone), source, data, epochs=15)
    encoder_layers = CONFIGS[family].get("encoder_layers", CONFIGS[family].get("num_layers"))
    assert result.plan.stack_starts == (0, encoder_layers)
    assert len(result.plan) == encoder_layers + CONFIGS[family].get("decoder_layers",
                                                                    CONFIGS[family].get("num_decoder_layers"))
    prodistill = block_errors(copy.deepcopy(backbone), source, data, result.state_dict)

    info = get_method("regmean")
    regmean_method = info.cls(info.params_model(), list(experts))
    solved = run_engine(copy.deepcopy(backbone), source, data, regmean_method,
                        scaling=regmean_method.non_block_scaling(len(experts)))
    regmean = block_errors(copy.deepcopy(backbone), source, data, solved.state_dict)
    assert len(reference) == len(prodistill) == len(regmean) == len(result.plan)
    assert all(p < r for p, r in zip(prodistill, reference)), (prodistill, reference)
    assert all(m < r for m, r in zip(regmean, reference)), (regmean, reference)


@pytest.mark.parametrize("method", ["prodistill", "regmean"])
def test_output_loads_with_the_family_class(saved, tmp_path, method):
    import transformers

    family, root, _, _, paths, data = saved
    out = tmp_path / method
    params = {"epochs": 2} if method == "prodistill" else {}
    layermerge.merge(root / "base", paths, method=method, data=data, output=out, quiet=True, **params)
    model, info = getattr(transformers, TASK_CLASS[family]).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert load_file(out / "model.safetensors").keys() == load_file(root / "base" / "model.safetensors").keys()
    plan = json.loads((out / "layermerge_summary.json").read_text())["summary"]["block_plan"]
    assert plan["blocks"] == len(json.loads((out / method / "blocks.json").read_text())["blocks"])
    assert plan["stack_starts"] == [0, 2]


def test_one_list_over_encoder_and_decoder_is_refused_not_trained(saved):
    """Whisper's decoder does not read the encoder's last hidden states as its input: a single stream over
    both stacks would silently train the decoder on the wrong inputs."""
    family, _, base, experts, _, data = saved
    backbone = base.base_model
    blocks = [name for name, _ in backbone.named_modules()
              if name.count(".") == 2 and name.split(".")[1] in ("block", "layers")]
    source = StateDictSource.from_models(backbone, {t: e.base_model for t, e in experts.items()})
    with pytest.raises(BlockPlanError, match="does not receive block .* output"):
        prodistill_merge(copy.deepcopy(backbone), source, data, epochs=1,
                         engine_options={"block_plan": {"blocks": blocks}})
    explicit = prodistill_merge(copy.deepcopy(backbone), source, data, epochs=1, engine_options={
        "block_plan": {"stacks": [blocks[:2], blocks[2:]]}})
    assert explicit.plan.stack_starts == (0, 2) and explicit.plan.source == "override"


def test_end_to_end_methods_are_refused_on_two_stacks(saved, tmp_path):
    family, root, _, _, paths, data = saved
    with pytest.raises(ConfigError, match="stacks"):
        layermerge.merge(root / "base", paths, method="distillmerge", data=data, output=tmp_path / "dm",
                         quiet=True)
    assert not (tmp_path / "dm").exists()


def test_tied_embeddings_load_under_any_of_their_names(tmp_path):
    """T5 stores one token embedding (``shared.weight``) that the encoder and decoder use under their own
    names; an override plan used to leave the encoder's copy on the meta device."""
    base = task_model("t5")
    _, paths = save_with_experts(base, tmp_path)
    stored = load_file(tmp_path / "base" / "model.safetensors")
    assert "shared.weight" in stored and "encoder.embed_tokens.weight" not in stored
    data = {task: batches("t5", i) for i, task in enumerate(paths)}
    plan = {"stacks": ["encoder.block", "decoder.block"]}
    merged = layermerge.merge(tmp_path / "base", paths, method="prodistill", data=data, epochs=1, quiet=True,
                              block_plan=plan)
    assert "shared.weight" in merged.state_dict


def test_batches_without_decoder_inputs_get_the_decoder_start(tmp_path):
    """Hand-built encoder-only batches: each example's decoder reads its start token."""
    from layermerge.fewshot import adapt_batches

    base = task_model("bart")
    _, paths = save_with_experts(base, tmp_path)
    data = {task: [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                   for batch in batches("bart", i)] for i, task in enumerate(paths)}
    adapted = adapt_batches(base.base_model, data)
    assert adapted["t0"][0]["decoder_input_ids"].tolist() == [[CONFIGS["bart"]["decoder_start_token_id"]]] * 3
    merged = layermerge.merge(tmp_path / "base", paths, method="prodistill", data=data, epochs=1, quiet=True)
    assert merged.summary["data"] == {"t0": {"batches": 1, "examples": 3}, "t1": {"batches": 1, "examples": 3}}
    assert merged.summary["block_plan"]["stack_starts"] == [0, 2]


# --------------------------------------------------------------------- few-shot data from a data: section
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase) + list("?")


def test_seq2seq_collator_puts_the_prompt_in_the_encoder_and_the_completion_after_the_start():
    from transformers import BertTokenizer

    from layermerge.data import Seq2SeqCollator, get_task

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.eos_token = "[SEP]"
    task = get_task({"name": "echo", "type": "generation", "prompt": "q", "completion": "a",
                     "files": {"train": "unused.jsonl"}, "metric": "exact_match"})
    rows = [{"q": "a b?", "a": "c"}, {"q": "b", "a": "d e"}]
    batch = Seq2SeqCollator(tokenizer, task, decoder_start=0)(rows)
    ids = {c: VOCAB.index(c) for c in "abcde?"}
    cls, sep = VOCAB.index("[CLS]"), VOCAB.index("[SEP]")
    assert batch["input_ids"].tolist() == [[cls, ids["a"], ids["b"], ids["?"], sep], [cls, ids["b"], sep, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # start token, then the completion teacher-forced (its end-of-text is never an input)
    assert batch["decoder_input_ids"].tolist() == [[0, ids["c"], 0], [0, ids["d"], ids["e"]]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    prompts_only = Seq2SeqCollator(tokenizer, task, decoder_start=0, include_completion=False)(rows)
    assert prompts_only["decoder_input_ids"].tolist() == [[0], [0]]


def test_a_data_section_gives_encoder_decoder_models_teacher_forced_decoder_inputs(tmp_path, capsys):
    from transformers import BertTokenizer

    base = task_model("t5")
    base.save_pretrained(tmp_path / "base")
    from tinytext import VOCAB as CHARACTERS  # 73 entries: fits the 99 embedding rows

    BertTokenizer(vocab={w: i for i, w in enumerate(CHARACTERS)}).save_pretrained(tmp_path / "base")
    experts = {}
    for index, name in enumerate(("upper", "lower")):
        experts[name] = tmp_path / name
        perturbed(base, index + 1).save_pretrained(experts[name])
        folder = tmp_path / f"task-{name}"
        folder.mkdir()
        rows = [json.dumps({"q": f"{c}{c}?", "a": c}) for c in "abcdefgh"]
        (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
        (folder / f"{name}.yaml").write_text(f"name: {name}\ntype: generation\nprompt: q\ncompletion: a\n"
                                             "files: {train: train.jsonl}\nmetric: exact_match\n")
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {tmp_path / 'base'}\nexperts: {{upper: {experts['upper']}, lower: {experts['lower']}}}\n"
                      "method: prodistill\nparams: {epochs: 2}\n"
                      f"data:\n  shots: 4\n  tasks:\n    upper: {tmp_path}/task-upper/upper.yaml\n"
                      f"    lower: {tmp_path}/task-lower/lower.yaml\n")
    code = main(["merge", str(config), "-o", str(tmp_path / "merged"), "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((tmp_path / "merged" / "layermerge_summary.json").read_text())["summary"]
    assert summary["block_plan"]["blocks"] == 5 and summary["block_plan"]["stack_starts"] == [0, 2]
    from transformers import AutoModelForSeq2SeqLM

    _, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_two_towers_merge_as_two_stacks_named_in_execution_order():
    """CLIP's vision and text towers are ambiguous to introspection; an override listing both stacks, in
    the order the model runs them, gives each its own stream, and ProDistill beats Task Arithmetic on all."""
    from family_zoo import TINY_FAMILY_CONFIGS, make_batch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**TINY_FAMILY_CONFIGS["clip"])
    torch.manual_seed(0)
    base = AutoModel.from_config(config).eval()
    experts = {task: perturbed(base, index + 1) for index, task in enumerate("ab")}
    data = {task: [make_batch("clip", config, base, index)] for index, task in enumerate(experts)}
    source = StateDictSource.from_models(base, experts)
    with pytest.raises(BlockPlanError, match="ambiguous"):
        prodistill_merge(copy.deepcopy(base), source, data, epochs=1)
    options = {"block_plan": {"stacks": ["vision_model.encoder.layers", "text_model.encoder.layers"]}}
    result = prodistill_merge(copy.deepcopy(base), source, data, epochs=10, engine_options=options)
    assert result.plan.stack_starts == (0, 2)
    reference = block_errors(copy.deepcopy(base), source, data, task_arithmetic(base, experts), **options)
    merged = block_errors(copy.deepcopy(base), source, data, result.state_dict, **options)
    assert all(m < r for m, r in zip(merged, reference)), (merged, reference)
