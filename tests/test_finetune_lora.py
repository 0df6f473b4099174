"""LoRA experts from ``layermerge finetune``: one recipe, cached like full fine-tunes, read everywhere.

A tiny Llama learns two prompt -> completion tasks ('yes', 'no') and a tiny BERT a two-class task, each
as a LoRA adapter. The adapter folders are checked against peft itself (``merge_and_unload``), then
used where a full expert is: the cache, a TIES merge, ``evaluate_task`` and ``layermerge eval``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinytext import build_tiny_causal_base, build_tiny_text_base, write_generation_task

import layermerge
from layermerge import __version__
from layermerge.bench.ensemble import evaluate_ensemble
from layermerge.cli import main
from layermerge.data import get_task, load_split
from layermerge.errors import ConfigError
from layermerge.eval.evaluate import evaluate_task
from layermerge.finetune import (
    MARKER,
    FinetuneSettings,
    base_fingerprint,
    cache_key,
    data_fingerprint,
    find_cached_expert,
    finetune,
    make_settings,
)
from layermerge.io.lora import LoraReader
from layermerge.io.reader import CheckpointReader

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

GENERATION = dict(epochs=8, lr=1e-2, batch_size=8, lora={"r": 4})
# The fields FinetuneSettings had before LoRA: a full fine-tune's key is computed from exactly these.
FULL_FIELDS = {"epochs", "lr", "batch_size", "max_length", "max_train_examples", "warmup_ratio", "weight_decay",
               "max_grad_norm", "seed", "image_size"}


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def dense_copy(adapter: Path, base: Path, auto_class: str, folder: Path, **options) -> Path:
    """peft's own reading of ``adapter``: merge_and_unload on the base, saved with the adapter's tokenizer."""
    import transformers
    from peft import PeftModel

    model = getattr(transformers, auto_class).from_pretrained(base, dtype=torch.float32, **options)
    dense = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    dense.save_pretrained(folder)
    for file in adapter.iterdir():
        if "token" in file.name or file.name.endswith(".jinja"):
            shutil.copy(file, folder / file.name)
    return folder


def assert_reader_equals(reader, state: dict[str, torch.Tensor]) -> None:
    """Every tensor LoraReader forms equals peft's dense model's (the same key, or it with the prefix)."""
    keys = reader.keys()
    assert keys
    for key in keys:
        expected = state[key] if key in state else state[key.split(".", 1)[1]]
        assert torch.allclose(reader.get(key), expected, atol=1e-6, rtol=0), key


def adapter_tensors(folder: Path) -> list[str]:
    return sorted(load_file(str(folder / "adapter_model.safetensors")))


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    """A tiny Llama, two generation tasks and a LoRA expert of each (the first through the CLI)."""
    root = tmp_path_factory.mktemp("lora_generation")
    base = build_tiny_causal_base(root / "base")
    specs = {"affirm": write_generation_task(root / "affirm", "affirm", "yes"),
             "deny": write_generation_task(root / "deny", "deny", "no")}
    cache = root / "cache"
    experts = {name: finetune(base, spec, cache_dir=cache, quiet=True, **GENERATION) for name, spec in specs.items()}
    return root, base, specs, cache, experts


def test_generation_lora_expert_is_a_peft_adapter_that_learned(generation, tmp_path):
    root, base, specs, cache, experts = generation
    result = experts["affirm"]
    folder = result.path
    assert not result.cached and folder.parent == cache / "experts" and folder.name.startswith("affirm-base-")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (4, 8, 0.05, False)
    # Default targets: every Linear of the blocks (attention and MLP), not the (tied) output layer.
    assert sorted({name.rsplit(".", 1)[1] for name in config["target_modules"]}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    names = adapter_tensors(folder)
    assert len(names) == 2 * 7 * 2 and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
    assert not (folder / "model.safetensors").exists() and (folder / "tokenizer.json").is_file()
    marker = json.loads((folder / MARKER).read_text())
    assert marker["key"] == result.key and marker["settings"]["lora"]["r"] == 4
    assert marker["trainable_parameters"] == sum(t.numel() for t in load_file(str(folder / "adapter_model.safetensors"))
                                                 .values())
    assert not list(cache.glob("experts/.*"))                  # no temporary folder left behind

    # Learned: the loss fell and the expert answers 'yes' where the base cannot.
    assert marker["last_loss"] < marker["first_loss"]
    assert evaluate_task(folder, specs["affirm"]).score >= 90.0 > evaluate_task(base, specs["affirm"]).score

    # What layermerge reads equals peft's own merge_and_unload.
    dense = dense_copy(folder, base, "AutoModelForCausalLM", tmp_path / "dense")
    assert_reader_equals(LoraReader(folder, CheckpointReader(base)), load_file(str(dense / "model.safetensors")))


def test_second_call_and_find_cached_expert_hit_the_cache(generation):
    root, base, specs, cache, experts = generation
    first = experts["affirm"]
    again = finetune(base, specs["affirm"], cache_dir=cache, quiet=True, **GENERATION)
    assert again.cached and again.path == first.path and again.key == first.key
    # alpha defaults to 2·r and is written out, so naming it gives the same expert.
    named = finetune(base, specs["affirm"], cache_dir=cache, quiet=True, **{**GENERATION, "lora": {"r": 4, "alpha": 8}})
    assert named.cached and named.path == first.path
    # A bench track's recipe is a plain dict passed to make_settings(**recipe).
    recipe = {key: value for key, value in GENERATION.items()}
    found = find_cached_expert(base, specs["affirm"], cache_dir=cache, settings=make_settings(**recipe))
    assert found is not None and found.path == first.path
    full = {key: value for key, value in GENERATION.items() if key != "lora"}
    assert find_cached_expert(base, specs["affirm"], cache_dir=cache, settings=make_settings(**full)) is None
    other_rank = find_cached_expert(base, specs["affirm"], cache_dir=cache,
                                    settings=make_settings(**{**full, "lora": {"r": 8}}))
    assert other_rank is None


def test_full_fine_tune_keys_are_computed_as_before_lora(generation):
    """A full fine-tune's key hashes the settings without ``lora``, exactly the record of the code before."""
    root, base, specs, cache, experts = generation
    task = get_task(specs["affirm"])
    data = load_split(task, "train")
    settings = make_settings(epochs=3, lr=1e-3)
    assert set(settings.record()) == FULL_FIELDS and settings.lora is None
    old_record = {"base": base_fingerprint(base), "task": task.name, "settings": settings.model_dump(exclude={"lora"}),
                  "data": data_fingerprint(data), "layermerge": __version__,
                  "spec": task.model_dump(mode="json", exclude={"directory"})}
    expected = hashlib.sha256(json.dumps(old_record, sort_keys=True).encode()).hexdigest()
    assert cache_key(base, task, settings, data) == expected
    with_lora = make_settings(settings, lora={"r": 4})
    assert cache_key(base, task, with_lora, data) != expected
    assert "lora" not in json.dumps(FinetuneSettings().record())


def test_ties_merge_of_lora_experts_equals_their_dense_copies(generation, tmp_path):
    root, base, specs, cache, experts = generation
    adapters = {name: result.path for name, result in experts.items()}
    dense = {name: dense_copy(path, base, "AutoModelForCausalLM", tmp_path / name) for name, path in adapters.items()}
    merged = layermerge.merge(base, adapters, "ties", quiet=True, density=0.5).state_dict
    reference = layermerge.merge(base, dense, "ties", quiet=True, density=0.5).state_dict
    assert sorted(merged) == sorted(reference)
    for key, tensor in reference.items():
        assert torch.allclose(merged[key], tensor, atol=1e-6, rtol=0), key
    base_state = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(merged[key], base_state[key]) for key in base_state)   # the merge changed something


def test_evaluate_task_on_the_adapter_equals_its_dense_copy(generation, tmp_path):
    root, base, specs, cache, experts = generation
    adapter = experts["deny"].path
    dense = dense_copy(adapter, base, "AutoModelForCausalLM", tmp_path / "dense")
    from_adapter = evaluate_task(adapter, specs["deny"])
    from_dense = evaluate_task(dense, specs["deny"])
    assert from_adapter.score == from_dense.score and from_adapter.extra == from_dense.extra
    assert from_adapter.score >= 90.0


def write_reviews(folder: Path, rows: int = 32) -> Path:
    """A two-class JSONL task and its spec (as in test_own_tasks.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    good, bad = ["a good film", "what a great cast", "lovely music"], ["a bad film", "dull and slow", "poor script"]
    for split in ("train", "test"):
        lines = [json.dumps({"review": rng.choice(good if i % 2 == 0 else bad),
                             "sentiment": "positive" if i % 2 == 0 else "negative"}) for i in range(rows)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    spec = folder / "task.yaml"
    spec.write_text("name: reviews\ntype: classification\ntext: review\nlabel: sentiment\n"
                    "labels: [negative, positive]\nmetric: accuracy\nfiles: {train: train.jsonl, test: test.jsonl}\n")
    return spec


def test_classification_lora_expert_saves_its_new_head(tmp_path, capsys):
    base = build_tiny_text_base(tmp_path / "bert")
    spec = write_reviews(tmp_path / "reviews")
    code, out, err = run_cli(["finetune", base, "--task", spec, "-o", tmp_path / "expert", "--lora-rank", 4,
                              "--epochs", 10, "--lr", "1e-2", "--batch-size", 8, "--max-length", 32, "-q"], capsys)
    assert code == 0, err
    folder = Path(out.strip())
    assert folder == (tmp_path / "expert").resolve()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    names = adapter_tensors(folder)
    heads = [n for n in names if ".lora_" not in n]
    assert heads == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert not any("classifier" in name for name in config["target_modules"])

    dense = dense_copy(folder, base, "AutoModelForSequenceClassification", tmp_path / "dense", num_labels=2)
    assert_reader_equals(LoraReader(folder, CheckpointReader(base)), load_file(str(dense / "model.safetensors")))
    from_adapter, from_dense = evaluate_task(folder, spec), evaluate_task(dense, spec)
    assert from_adapter.score == from_dense.score >= 75.0

    # `layermerge eval ADAPTER` finds the task in the marker, the base in adapter_config.json.
    code, out, err = run_cli(["eval", folder, "-q", "-o", tmp_path / "report"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["rows"][0]["scores"]["reviews"] == pytest.approx(from_adapter.score)

    # The bench's ensemble reference reads LoRA experts as their dense copies.
    second_spec = tmp_path / "second.yaml"
    second_spec.write_text(spec.read_text().replace("name: reviews", "name: second")
                           .replace("train.jsonl", str(spec.parent / "train.jsonl"))
                           .replace("test.jsonl", str(spec.parent / "test.jsonl")))
    second = finetune(base, second_spec, cache_dir=tmp_path / "cache", quiet=True, epochs=10, lr=1e-2, batch_size=8,
                      max_length=32, seed=1, lora={"r": 4}).path
    second_dense = dense_copy(second, base, "AutoModelForSequenceClassification", tmp_path / "dense2", num_labels=2)
    options = dict(max_examples=None, max_length=32)
    from_adapters = evaluate_ensemble(base, {"reviews": folder, "second": second}, spec, **options)
    from_dense = evaluate_ensemble(base, {"reviews": dense, "second": second_dense}, spec, **options)
    assert from_adapters.score == from_dense.score >= 75.0


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", 0], "--lora-rank must be at least 1, got 0"),
    (["--lora-rank", 4, "--lora-alpha", -1], "--lora-alpha must be positive, got -1.0"),
    (["--lora-rank", 4, "--lora-dropout", 1], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--lora-alpha", 8], "--lora-alpha needs --lora-rank R"),
    (["--lora-rank", 4, "--lora-targets", "q_proj,,v_proj"], "--lora-targets 'q_proj,,v_proj' is not"),
    (["--lora-rank", 4, "--lora-targets", "nowhere"], "LoRA fine-tuning of"),
])
def test_cli_lora_flag_errors_are_one_line(generation, capsys, tmp_path, flags, message):
    root, base, specs, cache, experts = generation
    code, out, err = run_cli(["finetune", base, "--task", specs["affirm"], "--cache-dir", tmp_path, "-q",
                              "--epochs", 1, *flags], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("experts/*"))                   # nothing written


def test_cli_lora_flags_reach_the_adapter(generation, capsys, tmp_path):
    root, base, specs, cache, experts = generation
    code, out, err = run_cli(["finetune", base, "--task", specs["affirm"], "-o", tmp_path / "out", "-q",
                              "--epochs", 1, "--lora-rank", 2, "--lora-alpha", 3, "--lora-dropout", 0,
                              "--lora-targets", "q_proj,v_proj"], capsys)
    assert code == 0, err
    config = json.loads((Path(out.strip()) / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 3, 0.0)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_settings_errors_and_the_missing_extra(generation, monkeypatch, tmp_path):
    root, base, specs, cache, experts = generation
    with pytest.raises(ConfigError, match=r"^fine-tuning settings: lora\.r: .*\(got 0\)$"):
        make_settings(lora={"r": 0})
    with pytest.raises(ConfigError, match=r"lora\.rank: Extra inputs are not permitted"):
        make_settings(lora={"rank": 4})
    assert make_settings(lora={"r": 8}).lora.alpha == 16
    with pytest.raises(ConfigError, match="LoRA fine-tuning is for Hugging Face text models"):
        finetune("vision:small-cnn", "mnist", cache_dir=tmp_path, quiet=True, lora={"r": 4})
    monkeypatch.setitem(sys.modules, "peft", None)            # `import peft` now fails as if not installed
    with pytest.raises(ConfigError, match=r"needs the peft package: pip install 'layermerge\[lora\]'$"):
        finetune(base, specs["affirm"], cache_dir=tmp_path, quiet=True, epochs=1, lora={"r": 2})
