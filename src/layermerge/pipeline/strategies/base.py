"""What every strategy provides to the pipeline."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from layermerge.experts import ExpertSet
from layermerge.pipeline.plan import MergePlan


@dataclass
class Outcome:
    """A strategy's answer besides the tensors it wrote: its summary, the config record's extra
    sections (data, engine) and the per-block records of block methods."""

    summary: dict
    record: dict = field(default_factory=dict)
    blocks: dict | None = None


class Strategy:
    """Base: a strategy needs the plan and the checked expert set; the defaults do nothing."""

    def __init__(self, plan: MergePlan, expert_set: ExpertSet):
        self.plan = plan
        self.expert_set = expert_set
        self.is_writer = True          # False on data-parallel ranks that only compute

    @contextmanager
    def session(self):
        """Around the whole merge (a data-parallel group is set up and torn down here)."""
        yield self

    def prepare(self) -> None:
        """Everything that can fail on the inputs, before any output exists."""

    def run(self, writer) -> Outcome:
        raise NotImplementedError

    def finished(self) -> None:
        """After the output is complete (a block method removes its checkpoint folder)."""
