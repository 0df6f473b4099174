"""The merge pipeline's stages: the plan checks everything that needs no weights before any file is
opened, every registered method has a strategy, and the stages import without cycles."""

from __future__ import annotations

import dataclasses

import pytest

import layermerge
from layermerge.errors import ConfigError
from layermerge.methods import available_methods
from layermerge.pipeline import make_plan
from layermerge.pipeline.strategies import strategy_class
from layermerge.pipeline.strategies.base import Strategy

MISSING = "/nonexistent/layermerge-pipeline-test"


@pytest.mark.parametrize(("method", "options", "words"), [
    ("ties", {"density": 2.0}, "density"),
    ("ties", {"data": {"shots": 4}}, "data-free"),
    ("prodistill", {"cache_budget": "lots"}, "engine options"),
    ("task_arithmetic", {"template": object()}, "template= is for block methods"),
    ("ties", {"card_paths": "everything"}, "card_paths"),
    ("ties", {"dtype": "int3"}, "unknown dtype"),
])
def test_the_plan_refuses_bad_options_before_opening_any_input(method, options, words):
    with pytest.raises(ConfigError, match=words):
        layermerge.merge(MISSING, {"a": MISSING}, method, **options)


def test_a_plan_is_frozen_and_records_the_effective_parameters():
    plan = make_plan(MISSING, {"a": MISSING}, "ties", density=0.3, dtype="bf16", output="out")
    assert plan.kind == "tensor" and plan.engine is None and plan.dtype_name == "bf16"
    assert plan.param_record["density"] == 0.3 and "scaling" in plan.param_record   # defaults filled in
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.output = None
    block = make_plan(MISSING, {"a": MISSING}, "prodistill", data={"shots": 4}, device="cpu", epochs=3)
    assert block.engine.device == "cpu" and block.param_record["epochs"] == 3


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_every_registered_method_has_a_strategy(name):
    kind = available_methods()[name].kind
    assert issubclass(strategy_class(kind), Strategy)
