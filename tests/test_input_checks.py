"""Bad inputs found by issue 13 and the small defects beside them: each ends in one clear line (or a
one-line warning) before any work, leaves nothing behind and never touches the inputs."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_config, tree_hashes
from safetensors.torch import save_file
from tinytext import build_tiny_text_base, save_text_experts

import layermerge
from layermerge.cli import main
from layermerge.data import find_data_dir
from layermerge.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    IncompatibleExpertsError,
    OutputError,
    RedundantInputWarning,
)
from layermerge.fewshot import DataConfig, build_few_shot, position_limit
from layermerge.io.reader import CheckpointReader

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_data = pytest.mark.skipif(find_data_dir() is None, reason="shared data not present")


@pytest.fixture(scope="module")
def bert(family_models):
    base, experts = family_models["bert"]
    return base, dict(list(experts.items())[:2])


def write_yaml(folder: Path, config: dict, name: str = "merge.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def data_free_config(bert, **overrides) -> dict:
    base, experts = bert
    return {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}, "method": "task_arithmetic",
            **overrides}


def one_error_line(capsys, argv) -> str:
    """Run the CLI in-process: exit 2, one line on stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("layermerge: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def leftovers(out: Path) -> list[str]:
    """Anything a failed run into ``out`` left: the folder, its checkpoint, hidden temporary siblings."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}")))


def text_batches(tasks, width: int = 5, rows: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {task: [{"input_ids": torch.randint(3, 99, (rows, width), generator=generator),
                    "attention_mask": torch.ones(rows, width, dtype=torch.long)}] for task in tasks}


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    """A tiny BERT base saved with its tokenizer, experts 'sst2' and 'rte', and a prodistill config."""
    root = tmp_path_factory.mktemp("glue")
    base = build_tiny_text_base(root / "base")
    save_text_experts(root, base)
    # The same base without its tokenizer files: what transformers 5 silently accepted.
    bare = root / "base-no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, bare / name)
    config = {"base": "base", "experts": {"sst2": "sst2", "rte": "rte"}, "method": "prodistill",
              "params": {"lr": 0.05, "epochs": 1, "batch_size": 4},
              "data": {"shots": 2, "max_length": 16, "batch_size": 2}, "engine": {"device": "cpu"}}
    return root, config


# --------------------------------------------------------------------------- max_length vs positions
def test_position_limits_of_the_families():
    assert position_limit(make_config("bert").to_dict()) == (64, "max_position_embeddings")
    assert position_limit(make_config("roberta").to_dict()) == (68, "max_position_embeddings")   # 70 - pad 1 - 1
    assert position_limit(make_config("gpt2").to_dict()) == (64, "n_positions")
    assert position_limit(make_config("llama").to_dict()) is None        # rotary: any length runs
    assert position_limit(make_config("vit").to_dict()) is None
    assert position_limit(None) is None


@needs_data
@pytest.mark.parametrize("data, key", [({"max_length": 100}, "data.max_length"),
                                       ({"tasks": {"rte": {"max_length": 65}}}, "data.tasks.rte.max_length")])
def test_max_length_beyond_the_positions_is_refused_before_any_work(glue, tmp_path, capsys, data, key):
    root, config = glue
    before = tree_hashes([root / "base", root / "sst2", root / "rte"])
    path = write_yaml(root, {**config, "data": {**config["data"], **data}}, f"long-{tmp_path.name}.yaml")
    out = tmp_path / "merged"
    err = one_error_line(capsys, ["merge", str(path), "--output", str(out), "-q"])
    value = data.get("max_length") or data["tasks"]["rte"]["max_length"]
    assert f"{key} is {value}, but the model takes at most 64 tokens (max_position_embeddings" in err
    assert f"set {key} to 64 or less" in err
    assert leftovers(out) == []                                  # no OUT, no OUT.checkpoint, no temporary folder
    assert tree_hashes([root / "base", root / "sst2", root / "rte"]) == before


@needs_data
def test_the_default_max_length_is_lowered_to_the_positions(glue):
    """The default of 128 tokens would crash a 64-position model on long sentences; explicit values are kept."""
    root, _ = glue
    expert_set = layermerge.load_experts(root / "base", {"rte": root / "rte"})
    batches = build_few_shot(DataConfig(shots=2, batch_size=2), expert_set)
    assert batches["rte"][0]["input_ids"].shape[-1] == 64          # RTE pairs are far longer in characters
    short = build_few_shot(DataConfig(shots=2, batch_size=2, max_length=20), expert_set)
    assert short["rte"][0]["input_ids"].shape[-1] == 20


def test_hand_built_batches_longer_than_the_positions_are_refused(bert, tmp_path):
    base, experts = bert
    data = text_batches(experts, width=65)
    with pytest.raises(DataError, match=r"input_ids of length 65, but the model takes at most 64 tokens"):
        layermerge.merge(base, experts, "prodistill", data=data, output=tmp_path / "out", quiet=True, device="cpu")
    assert leftovers(tmp_path / "out") == []


# --------------------------------------------------------------------------- tokenizer
@needs_data
def test_base_without_tokenizer_files_is_refused(glue, tmp_path, capsys):
    root, config = glue
    path = write_yaml(root, {**config, "base": "base-no-tokenizer"}, "no-tokenizer.yaml")
    out = tmp_path / "merged"
    err = one_error_line(capsys, ["merge", str(path), "--output", str(out), "-q"])
    assert f"the folder {root / 'base-no-tokenizer'} holds no tokenizer files" in err
    assert f"embedding has 99 rows (vocab_size in {root / 'base-no-tokenizer' / 'config.json'})" in err
    assert "set data.tokenizer: PATH" in err
    assert leftovers(out) == []


@needs_data
def test_a_named_tokenizer_is_used_for_a_base_without_one(glue, tmp_path, capsys):
    root, config = glue
    named = {**config, "base": "base-no-tokenizer", "data": {**config["data"], "tokenizer": "base"}}
    path = write_yaml(root, named, "named-tokenizer.yaml")
    assert main(["merge", str(path), "--output", str(tmp_path / "merged"), "-q"]) == 0
    assert yaml.safe_load((tmp_path / "merged" / "layermerge.yaml").read_text())["data"]["tokenizer"] == "base"


@needs_data
def test_a_tokenizer_larger_than_the_embedding_is_refused_even_when_named(glue, tmp_path, capsys):
    from transformers import BertTokenizer

    root, config = glue
    big = tmp_path / "big-tokenizer"
    BertTokenizer(vocab={f"w{i}": i for i in range(150)} | {"[UNK]": 150, "[PAD]": 151}).save_pretrained(big)
    path = write_yaml(root, {**config, "data": {**config["data"], "tokenizer": str(big)}}, "big.yaml")
    err = one_error_line(capsys, ["merge", str(path), "--output", str(tmp_path / "merged"), "-q"])
    assert re.search(rf"the tokenizer in {re.escape(str(big))} has 15\d tokens but the model's embedding has 99 "
                     r"rows \(vocab_size in .*config.json\): it is not this model's tokenizer", err), err


@needs_data
def test_fine_tuning_checks_positions_and_tokenizer_before_any_work(glue, tmp_path):
    from layermerge.finetune import finetune

    root, _ = glue
    with pytest.raises(ConfigError, match=r"max_length \(--max-length\) is 100, but the model takes at most 64 "
                                          r"tokens \(max_position_embeddings in .*config.json\)"):
        finetune(root / "base", "sst2", cache_dir=tmp_path / "cache", max_length=100, quiet=True)
    with pytest.raises(ConfigError, match=rf"the folder {re.escape(str(root / 'base-no-tokenizer'))} holds no "
                                          r"tokenizer files.*Save the base's tokenizer into that folder"):
        finetune(root / "base-no-tokenizer", "sst2", cache_dir=tmp_path / "cache", max_length=16, quiet=True)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))          # nothing trained or written


@needs_data
def test_evaluation_checks_positions_and_tokenizer(glue):
    from layermerge.eval import evaluate

    root, _ = glue
    with pytest.raises(ConfigError, match=r"max_length \(--max-length\) is 100, but the model takes at most 64"):
        evaluate(root / "sst2", ["sst2"], max_examples=4, max_length=100, tokenizer=root / "base", quiet=True)
    with pytest.raises(ConfigError, match=r"holds no tokenizer files.*--tokenizer DIR"):   # experts saved without one
        evaluate(root / "sst2", ["sst2"], max_examples=4, max_length=16, quiet=True)
    scores = evaluate(root / "sst2", ["sst2"], max_examples=4, max_length=16, tokenizer=root / "base", quiet=True)
    assert scores["sst2"].examples == 4
    # The default of 128 tokens is lowered to this model's 64 positions (long sentences crashed it before).
    scores = evaluate(root / "sst2", ["sst2"], max_examples=64, tokenizer=root / "base", quiet=True)
    assert scores["sst2"].examples == 64


# --------------------------------------------------------------------------- pickles
class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_code_executing_pickle_is_refused_with_the_conversion(bert, tmp_path, capsys, how):
    base, experts = bert
    evil = tmp_path / "evil.pt"
    state = {"w": torch.zeros(2), "payload": Payload()}
    if how == "torch.save":
        torch.save(state, evil)
    else:
        evil.write_bytes(pickle.dumps(state))
    config = write_yaml(tmp_path, data_free_config(bert, experts={"task0": str(experts["task0"]), "bad": str(evil)}))
    err = one_error_line(capsys, ["merge", str(config), "--output", str(tmp_path / "out")])
    assert f"{evil} holds pickle data that can execute code when loaded (it imports posix.system)" in err or \
        f"{evil} holds pickle data that can execute code when loaded (it imports nt.system)" in err
    assert "so it was not loaded" in err and "save_file(" in err and f"'{tmp_path / 'evil.safetensors'}'" in err
    assert "file an issue" not in err and "trust" in err
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("content", ["truncated", "empty", "garbage", "truncated pickle"])
def test_a_corrupt_pickle_is_not_called_unsafe(tmp_path, content):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(64)}, path)
    whole = path.read_bytes()
    path.write_bytes({"truncated": whole[:len(whole) // 2], "empty": b"", "garbage": b"not a checkpoint" * 9,
                      "truncated pickle": pickle.dumps({"w": 1})[:5]}[content])
    with pytest.raises(CheckpointError) as info:
        CheckpointReader(path)
    message = str(info.value)
    assert message.startswith(f"cannot load {path}: it is not a readable PyTorch state dict; the file is corrupt")
    assert "execute code" not in message and "file an issue" not in message and "\n" not in message


# --------------------------------------------------------------------------- redundant experts
def test_the_same_expert_twice_warns_in_one_cli_line(bert, tmp_path, capsys):
    base, experts = bert
    config = write_yaml(tmp_path, data_free_config(bert, experts={"a": str(experts["task0"]),
                                                                  "b": str(experts["task0"])}))
    assert main(["merge", str(config), "--output", str(tmp_path / "out"), "-q"]) == 0
    lines = capsys.readouterr().err.splitlines()
    warned = [line for line in lines if line.startswith("layermerge: warning: ")]
    assert warned == [f"layermerge: warning: experts 'a' and 'b' are identical (the same path "
                      f"{Path(experts['task0']).resolve()}): the same model counts twice in the merge; drop one "
                      "or fix its path"]
    assert not any("RedundantInputWarning" in line or "warnings.warn" in line for line in lines)


def test_an_expert_with_the_base_backbone_has_a_zero_task_vector(bert, tmp_path):
    """A task model whose backbone is exactly the base (only its head differs): equal tensors, other files."""
    from transformers import BertForSequenceClassification

    base, experts = bert
    torch.manual_seed(3)
    model = BertForSequenceClassification(make_config("bert", num_labels=2))
    model.bert.load_state_dict(CheckpointReader(base).state_dict())
    model.save_pretrained(tmp_path / "lazy")
    with pytest.warns(RedundantInputWarning) as record:
        layermerge.merge(base, {"task0": experts["task0"], "lazy": tmp_path / "lazy"}, "ties", quiet=True)
    assert [str(w.message) for w in record if w.category is RedundantInputWarning] == [
        "expert 'lazy' is identical to the base model (every merged tensor equals the base's): its task vector "
        "is zero, so it adds nothing to the merged backbone; check its path (or whether it was trained with a "
        "frozen backbone)"]


def test_a_copy_of_an_expert_is_found_by_its_hashes_in_a_data_driven_merge(bert, tmp_path):
    base, experts = bert
    copy = shutil.copytree(experts["task1"], tmp_path / "copy")
    with pytest.warns(RedundantInputWarning, match=r"experts 'task1' and 'again' are identical \(their weight "
                                                   r"files have the same sha256\)"):
        layermerge.merge(base, {**experts, "again": copy}, "prodistill", data=text_batches([*experts, "again"]),
                         output=tmp_path / "out", lr=0.0, epochs=1, quiet=True, device="cpu")


def test_distinct_experts_merge_without_warnings(bert):
    base, experts = bert
    with warnings.catch_warnings():
        warnings.simplefilter("error", RedundantInputWarning)
        layermerge.merge(base, experts, "ties", quiet=True)


# --------------------------------------------------------------------------- small ones
def test_an_integer_max_shard_size_is_a_number_of_bytes(bert, tmp_path):
    config = write_yaml(tmp_path, data_free_config(bert, max_shard_size=20000))
    assert main(["merge", str(config), "--output", str(tmp_path / "out"), "-q"]) == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert yaml.safe_load((tmp_path / "out" / "layermerge.yaml").read_text())["max_shard_size"] == 20000


@pytest.mark.parametrize("value, message", [("lots", "cannot parse size 'lots'"), (0, "must be positive"),
                                            (True, "a number of bytes, got True"), (1.5, "got 1.5")])
def test_a_bad_max_shard_size_is_refused_at_config_time(bert, tmp_path, capsys, value, message):
    config = write_yaml(tmp_path, data_free_config(bert, max_shard_size=value))
    err = one_error_line(capsys, ["merge", str(config), "--output", str(tmp_path / "out")])
    assert "key 'max_shard_size'" in err and message in err


def test_a_missing_expert_is_named_by_its_role(bert, tmp_path, capsys):
    base, experts = bert
    config = write_yaml(tmp_path, data_free_config(bert, experts={"task0": str(experts["task0"]),
                                                                  "sst2": str(tmp_path / "gone")}))
    err = one_error_line(capsys, ["merge", str(config), "--output", str(tmp_path / "out")])
    assert f"expert 'sst2' not found: {tmp_path / 'gone'}" in err


def test_engine_flags_of_a_data_free_merge_in_correct_grammar(bert, tmp_path, capsys):
    config = str(write_yaml(tmp_path, data_free_config(bert)))
    err = one_error_line(capsys, ["merge", config, "-o", str(tmp_path / "out"), "--resume"])
    assert "--resume only applies to data-driven methods; 'task_arithmetic' is data-free: remove it" in err
    err = one_error_line(capsys, ["merge", config, "-o", str(tmp_path / "out"), "--resume", "--device", "cpu",
                                  "--cache-budget", "1GB"])
    assert "--resume, --cache-budget and --device only apply to data-driven methods" in err


def test_a_cached_demo_expert_is_not_announced_as_fine_tuning(monkeypatch, capsys, tmp_path):
    import layermerge.demo as demo
    from layermerge.finetune import FinetuneResult

    class Stop(Exception):
        pass

    def cached(base, task, **kwargs):
        return FinetuneResult(tmp_path / f"{task}-expert", True, "k", {}) if task == "sst2" else None

    trained = []
    monkeypatch.setattr(demo, "prepare_base", lambda source, root: tmp_path / "base")
    monkeypatch.setattr(demo, "find_cached_expert", cached)
    monkeypatch.setattr(demo, "finetune", lambda base, task, **k: trained.append(task) or FinetuneResult(
        tmp_path / f"{task}-expert", False, "k", {}))
    monkeypatch.setattr(demo, "cached_expert_score", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        demo.run_demo(demo.DemoConfig(base=tmp_path / "base", tasks=("sst2", "rte"), train_examples=48,
                                      cache_dir=tmp_path / "cache"))
    out = capsys.readouterr().out
    assert f"[1/2] expert for sst2: using cached expert {tmp_path / 'sst2-expert'}" in out
    assert "expert for sst2: fine-tuning" not in out
    assert "[2/2] expert for rte: fine-tuning on 48 examples" in out and trained == ["rte"]


def test_the_model_card_names_inputs_without_local_paths(bert, tmp_path, monkeypatch):
    base, experts = bert
    monkeypatch.chdir(Path(base).parent)
    given = {name: os.path.relpath(path) for name, path in experts.items()}
    out = tmp_path / "out"
    layermerge.merge(os.path.relpath(base), given, "task_arithmetic", output=out, quiet=True)
    card = (out / "README.md").read_text()
    assert str(Path(base).parent) not in card and str(tmp_path) not in card
    assert f"- base: `{Path(base).name}`" in card
    for name, path in experts.items():
        assert f"- expert {name}: `{Path(path).name}`" in card
        digest = CheckpointReader(path).file_hashes()[str(Path(path).resolve() / "model.safetensors")]
        assert f"  - `model.safetensors` sha256 `{digest}`" in card
    record = yaml.safe_load((out / "layermerge.yaml").read_text())
    assert record["base"] == os.path.relpath(base) and record["experts"] == given        # as given

    full = tmp_path / "full"
    layermerge.merge(base, experts, "task_arithmetic", output=full, quiet=True, card_paths="full")
    assert f"- base: `{Path(base).resolve()}`" in (full / "README.md").read_text()
    with pytest.raises(ConfigError, match="card_paths must be one of name, full"):
        layermerge.merge(base, experts, "task_arithmetic", quiet=True, card_paths="absolute")


def test_the_cli_records_paths_as_written_and_card_paths_full(bert, tmp_path):
    base, experts = bert
    config = {"base": os.path.relpath(base, tmp_path),
              "experts": {k: os.path.relpath(v, tmp_path) for k, v in experts.items()},
              "method": "task_arithmetic", "card_paths": "full"}
    path = write_yaml(tmp_path, config)
    assert main(["merge", str(path), "--output", str(tmp_path / "out"), "-q"]) == 0
    record = yaml.safe_load((tmp_path / "out" / "layermerge.yaml").read_text())
    assert record["base"] == config["base"] and record["experts"] == config["experts"]
    assert f"- base: `{Path(base).resolve()}`" in (tmp_path / "out" / "README.md").read_text()


def test_a_resumed_run_records_each_block_s_training_time(bert, tmp_path, monkeypatch):
    from layermerge.methods.prodistill import ProDistill

    base, experts = bert
    real = ProDistill.merge_block

    def slow_then_crash(self, ctx):
        if ctx.index == 1:
            raise RuntimeError("crash in block 1")
        time.sleep(0.5)                     # block 0 "trains" for half a second
        return real(self, ctx)

    options = dict(data=text_batches(experts), output=tmp_path / "out", lr=0.01, epochs=1, quiet=True,
                   device="cpu")
    monkeypatch.setattr(ProDistill, "merge_block", slow_then_crash)
    with pytest.raises(RuntimeError, match="crash in block 1"):
        layermerge.merge(base, experts, "prodistill", **options)
    monkeypatch.setattr(ProDistill, "merge_block", real)
    layermerge.merge(base, experts, "prodistill", resume=True, **options)
    blocks = json.loads((tmp_path / "out" / "prodistill" / "blocks.json").read_text())["blocks"]
    assert blocks[0]["seconds"] >= 0.5                     # the checkpointed training time, not the reload's
    summary = json.loads((tmp_path / "out" / "layermerge_summary.json").read_text())["summary"]
    assert summary["resumed_blocks"] == 1


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(bert, tmp_path, capsys):
    config = write_yaml(tmp_path, data_free_config(bert))
    assert main(["merge", str(config), "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    keys = len(CheckpointReader(bert[0]).keys())
    assert f"task_arithmetic: merging {keys}/{keys} (100%)" in err


# --------------------------------------------------------------------------- malformed inputs met on the way
def sharded_copy(source: Path, target: Path) -> Path:
    """``source``'s weights as two safetensors shards plus an index."""
    state = CheckpointReader(source).state_dict()
    keys = list(state)
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    weight_map = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(target / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"cannot read safetensors file .*model-00002-of-00002.safetensors: .*corrupt or truncated"),
    ("list", r"malformed index file .*'weight_map' must map each tensor name"),
    ("wrong shard", r"the index of .* puts '.*' in model-00001-of-00002.safetensors, which does not hold it"),
    ("config list", r"malformed .*config.json: a model config is a JSON object"),
])
def test_damaged_shards_index_and_config_are_checkpoint_errors(bert, tmp_path, damage, message):
    base, experts = bert
    folder = sharded_copy(Path(experts["task0"]), tmp_path / "expert")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if damage == "truncate":
        shard = folder / "model-00002-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "list":
        index_path.write_text(json.dumps({"weight_map": list(index["weight_map"])}))
    elif damage == "wrong shard":
        last = list(index["weight_map"])[-1]
        moved = {**index["weight_map"], last: "model-00001-of-00002.safetensors"}
        index_path.write_text(json.dumps({"weight_map": moved}))
    else:
        (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=message):
        layermerge.merge(base, {"task0": folder, "task1": experts["task1"]}, "task_arithmetic", quiet=True)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_bytes(b"base: \xff\xfe\n")
    err = one_error_line(capsys, ["merge", str(path), "--output", str(tmp_path / "out")])
    assert f"{path} is not UTF-8 text (byte 6 cannot be decoded)" in err


def test_engine_folders_and_configs_are_checked_before_any_work(bert, tmp_path):
    base, experts = bert
    data = text_batches(experts)
    inside = Path(experts["task0"]) / "ckpt"
    with pytest.raises(ConfigError, match=r"checkpoint folder .*ckpt overlaps the input"):
        layermerge.merge(base, experts, "prodistill", data=data, output=tmp_path / "out", checkpoint_dir=str(inside),
                         quiet=True, device="cpu")
    with pytest.raises(ConfigError, match=r"checkpoint folder .* overlaps the input"):    # rmtree would take them
        layermerge.merge(base, experts, "prodistill", data=data, output=tmp_path / "out",
                         checkpoint_dir=str(Path(base).parent), quiet=True, device="cpu")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"engine.spill_dir .*file.txt is a file, not a folder"):
        layermerge.merge(base, experts, "prodistill", data=data, output=tmp_path / "out", quiet=True, device="cpu",
                         spill_dir=str(tmp_path / "file.txt"), cache_budget=0)
    assert not inside.exists() and leftovers(tmp_path / "out") == []
    with pytest.raises(IncompatibleExpertsError, match="experts must be a mapping of expert name to folder"):
        layermerge.merge(base, list(experts.values()), "task_arithmetic", quiet=True)


def test_a_broken_base_config_or_run_record_is_one_error(bert, tmp_path):
    base, experts = bert
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    with pytest.raises(ConfigError, match=r"cannot build a model from .*config.json .*fix that file"):
        layermerge.merge(broken, experts, "prodistill", data=text_batches(experts), quiet=True, device="cpu")
    checkpoint = tmp_path / "out.checkpoint"
    checkpoint.mkdir()
    (checkpoint / "run.json").write_text('{"finished": ')
    with pytest.raises(OutputError, match=r"holds an unreadable run.json .*remove the folder to start afresh"):
        layermerge.merge(base, experts, "prodistill", data=text_batches(experts), output=tmp_path / "out",
                         quiet=True, device="cpu", resume=True)
