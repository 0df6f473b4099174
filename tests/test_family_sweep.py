"""The family sweep (issue 19): every family of tests/family_zoo.py, built tiny, merged two ways.

1. Data-free, through the CLI (``layermerge merge CONFIG -o OUT --quiet`` in a subprocess): the output
   loads with the family's own class, with no missing, unexpected or mismatched keys, and its tensors
   are exactly base + λ·Σ(expert − base).
2. ProDistill on built batches (Python API): every block's error is at most Task Arithmetic's at
   ProDistill's initial λ, and the block plan covers every configured layer (none skipped silently).
3. Families the data-driven path does not support are refused with a LayermergeError, never a raw error.

Each family is built once (a module-scoped fixture). Its CLI merge runs in the background, started when
the family before it is set up, so the subprocesses (about 2.5 s each, mostly imports) overlap the
in-process tests.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import perturb_
from family_zoo import (
    DATA_DRIVEN_REFUSED,
    FAST,
    KNOWN_BUGS,
    MOE,
    NOT_BUILDABLE,
    SLOW,
    TINY_FAMILY_CONFIGS,
    configured_layers,
    make_batch,
)

from layermerge.errors import LayermergeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASKS = ("a", "b")
SCALING = 0.4          # the data-free merge's λ
PRODISTILL_INIT = 0.3  # ProDistill's default init: the Task Arithmetic λ it starts from
RELATIVE_SLACK = 1e-6
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("layermerge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "layermerge"]


# --------------------------------------------------------------------------- building
@dataclass
class Family:
    name: str
    config: object
    base: torch.nn.Module
    experts: dict[str, torch.nn.Module]
    root: Path
    process: subprocess.Popen | None = None
    cli: tuple[int, str] | None = None

    @property
    def output(self) -> Path:
        return self.root / "merged"

    def cli_result(self) -> tuple[int, str]:
        """The background CLI merge's exit status and stderr (waits for it)."""
        if self.cli is None:
            _, stderr = self.process.communicate(timeout=300)
            self.cli = (self.process.returncode, stderr)
        return self.cli

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.communicate()

    def batches(self, task_index: int, count: int) -> list[dict[str, torch.Tensor]]:
        return [make_batch(self.name, self.config, self.base, seed=100 * task_index + b) for b in range(count)]


def build_family(name: str, root: Path, run_cli: bool = True) -> Family:
    """The tiny base, two experts (the base plus seeded noise), saved under ``root``; with ``run_cli``
    the data-free CLI merge of them starts in the background."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = dict(TINY_FAMILY_CONFIGS[name])
    if values["model_type"] not in CONFIG_MAPPING:
        pytest.skip(f"{name} is not in this transformers version")
    config = AutoConfig.for_model(**values)
    torch.manual_seed(0)
    base = AutoModel.from_config(config).eval()
    experts = {task: perturb_(copy.deepcopy(base), seed=index + 1) for index, task in enumerate(TASKS)}
    family = Family(name, config, base, experts, root)
    if not run_cli:
        return family
    base.save_pretrained(root / "base")
    for task, expert in experts.items():
        expert.save_pretrained(root / task)
    merge_config = {"base": str(root / "base"), "experts": {task: str(root / task) for task in TASKS},
                    "method": "task_arithmetic", "params": {"scaling": SCALING}}
    config_path = root / "merge.yaml"
    config_path.write_text(yaml.safe_dump(merge_config, sort_keys=False))
    family.process = subprocess.Popen([*cli_command(), "merge", str(config_path), "-o", str(family.output),
                                       "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      env=SUBPROCESS_ENV)
    return family


class FamilyBuilder:
    """Builds families in the session's test order, each one step ahead of the tests that use it."""

    def __init__(self, tmp_path_factory, order: list[str]):
        self.tmp_path_factory = tmp_path_factory
        self.order = order
        self.ready: dict[str, Family | BaseException] = {}

    def _prepare(self, name: str) -> None:
        if name not in self.ready:
            try:
                self.ready[name] = build_family(name, self.tmp_path_factory.mktemp(name))
            except BaseException as error:  # a skip or a build failure: raised to the tests that use it
                self.ready[name] = error

    def get(self, name: str) -> Family:
        self._prepare(name)
        if name in self.order and self.order.index(name) + 1 < len(self.order):
            self._prepare(self.order[self.order.index(name) + 1])
        family = self.ready[name]
        if isinstance(family, BaseException):
            raise family
        return family

    def release(self, name: str) -> None:
        family = self.ready.pop(name, None)
        if isinstance(family, Family):
            family.stop()

    def close(self) -> None:
        for name in list(self.ready):
            self.release(name)


@pytest.fixture(scope="session")
def family_builder(request, tmp_path_factory):
    order: list[str] = []
    for item in request.session.items:
        name = getattr(item, "callspec", None) and item.callspec.params.get("zoo")
        if name and name not in order:
            order.append(name)
    builder = FamilyBuilder(tmp_path_factory, order)
    yield builder
    builder.close()


@pytest.fixture(scope="module")
def zoo(request, family_builder):
    yield family_builder.get(request.param)
    family_builder.release(request.param)


def params(families, part: str):
    """pytest params for ``families``: slow ones marked, known bugs of ``part`` as strict xfails."""
    result = []
    for name in sorted(families):
        marks = [pytest.mark.slow] if name in SLOW else []
        bug = KNOWN_BUGS.get(name)
        if bug and bug[0] == part:
            marks.append(pytest.mark.xfail(strict=True, reason=bug[1]))
        result.append(pytest.param(name, marks=marks, id=name))
    return result


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder, by checkpoint key (all shards)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def task_arithmetic(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], scaling: float) -> dict:
    """base + λ·Σ(expert − base), tensor by tensor, by hand (non-float tensors stay the base's)."""
    merged = {}
    for key, tensor in base.items():
        if not tensor.is_floating_point():
            merged[key] = tensor.clone()
            continue
        merged[key] = tensor + scaling * sum(expert[key] - tensor for expert in experts)
    return merged


DATA_DRIVEN = [name for name in TINY_FAMILY_CONFIGS if name not in DATA_DRIVEN_REFUSED]


# --------------------------------------------------------------------------- the zoo runs
@pytest.mark.parametrize("zoo", params(TINY_FAMILY_CONFIGS, "forward"), indirect=True)
def test_model_runs_on_its_batch(zoo):
    """The zoo's own precondition: the tiny base runs on the inputs built for it."""
    with torch.no_grad():
        zoo.base(**zoo.batches(0, 1)[0])


# --------------------------------------------------------------------------- ProDistill
def prodistill_check(family: Family) -> None:
    """ProDistill on two tasks' batches: each block's error at most Task Arithmetic's (λ = init), the
    plan covering every configured layer, the merged weights complete and finite."""
    from layermerge.engine import StateDictSource
    from layermerge.engine.diagnostics import block_errors
    from layermerge.methods.prodistill import prodistill_merge

    data = {task: family.batches(index, 1) for index, task in enumerate(TASKS)}
    source = StateDictSource.from_models(family.base, family.experts)
    result = prodistill_merge(copy.deepcopy(family.base), source, data, epochs=10,
                              engine_options={"quiet": True})

    plan = result.plan
    assert len(plan.blocks) == configured_layers(family.config), plan.blocks
    stacks: dict[str, list[str]] = {}
    for path in plan.blocks:
        parent, _, index = path.rpartition(".")
        stacks.setdefault(parent, []).append(index)
    for parent, indices in stacks.items():
        children = [name for name, _ in family.base.get_submodule(parent).named_children()]
        assert sorted(indices) == sorted(children), f"{parent}: the plan has {indices}, the stack {children}"
    assert len(result.block_stats) == len(plan.blocks)

    base_state = family.base.state_dict()
    assert set(base_state) <= set(result.state_dict)
    for key in base_state:
        assert torch.isfinite(result.state_dict[key].float()).all(), key

    ta = task_arithmetic(base_state, [expert.state_dict() for expert in family.experts.values()], PRODISTILL_INIT)
    ta_errors = block_errors(copy.deepcopy(family.base), source, data, ta, quiet=True)
    pd_errors = block_errors(copy.deepcopy(family.base), source, data, result.state_dict, quiet=True)
    assert len(ta_errors) == len(pd_errors) == len(plan.blocks)
    for index, (pd_error, ta_error) in enumerate(zip(pd_errors, ta_errors)):
        assert pd_error <= ta_error * (1 + RELATIVE_SLACK), (
            f"block {index} ({plan.blocks[index]}): ProDistill {pd_error:.6g} > Task Arithmetic {ta_error:.6g}")


@pytest.mark.parametrize("zoo", params(DATA_DRIVEN, "prodistill"), indirect=True)
def test_prodistill_beats_task_arithmetic_per_block(zoo):
    prodistill_check(zoo)


@pytest.mark.parametrize("zoo", params(DATA_DRIVEN_REFUSED, "prodistill"), indirect=True)
def test_data_driven_refused(zoo):
    with pytest.raises(LayermergeError) as caught:
        prodistill_check(zoo)
    first_line = str(caught.value).splitlines()[0]
    assert 20 < len(first_line) < 400, str(caught.value)


@pytest.mark.parametrize("zoo", params(MOE, "prodistill"), indirect=True)
def test_moe_merges_data_driven_from_its_checkpoints(zoo):
    """From the saved folders, where the experts' matrices are stored one by one and the module fuses them:
    the merge reads them into the fused tensors and writes them back in the checkpoint's layout."""
    from transformers import AutoModel

    import layermerge

    stored = read_checkpoint(zoo.root / "base")
    assert set(stored) != set(zoo.base.state_dict()), "the checkpoint should store what the module fuses"
    data = {task: zoo.batches(index, 1) for index, task in enumerate(TASKS)}
    out = zoo.root / "prodistill"
    layermerge.merge(zoo.root / "base", {task: zoo.root / task for task in TASKS}, method="prodistill", data=data,
                     epochs=2, output=out, quiet=True)
    assert set(read_checkpoint(out)) == set(stored)
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    assert all(torch.isfinite(t.float()).all() for t in model.state_dict().values())


# --------------------------------------------------------------------------- data-free, CLI
@pytest.mark.parametrize("zoo", params(TINY_FAMILY_CONFIGS, "data_free"), indirect=True)
def test_data_free_cli_merge(zoo):
    from transformers import AutoModel

    returncode, stderr = zoo.cli_result()
    assert returncode == 0, stderr
    model, info = AutoModel.from_pretrained(zoo.output, output_loading_info=True)
    assert type(model) is type(zoo.base)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    # The files, by checkpoint key: what layermerge wrote (transformers may change some tensors on loading,
    # e.g. ChineseCLIP zeroes its padding embedding, and fuses MoE experts).
    base = read_checkpoint(zoo.root / "base")
    expected = task_arithmetic(base, [read_checkpoint(zoo.root / task) for task in TASKS], SCALING)
    merged = read_checkpoint(zoo.output)
    assert set(merged) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, msg=lambda message, key=key: f"{key}: {message}")


# --------------------------------------------------------------------------- the lists themselves
def test_lists_are_consistent():
    listed = set(TINY_FAMILY_CONFIGS)
    assert set(DATA_DRIVEN_REFUSED) <= listed and MOE <= listed
    assert set(KNOWN_BUGS) <= listed and SLOW <= listed and FAST <= listed
    assert not listed & set(NOT_BUILDABLE)
    assert all(part in ("forward", "data_free", "prodistill") for part, _ in KNOWN_BUGS.values())


def test_every_mapping_family_is_accounted_for():
    """Each family of transformers' model mapping is in the zoo or in NOT_BUILDABLE with a reason (for
    the transformers version the lists were made with; a newer one may add families)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    if transformers.__version__ != "5.25.0":
        pytest.skip("the lists were made for transformers 5.25.0")
    missing = sorted(set(MODEL_MAPPING_NAMES) - set(TINY_FAMILY_CONFIGS) - set(NOT_BUILDABLE))
    assert not missing, f"add these families to the zoo or to NOT_BUILDABLE: {missing}"
