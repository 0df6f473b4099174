"""layermerge.allocator: freed memory kept for the next step while training, given back afterwards."""

from __future__ import annotations

import resource

import pytest
import torch

from layermerge import allocator

MIB = 1024 * 1024


def training_steps(count: int) -> list[int]:
    """Minor page faults of each of ``count`` forward + backward passes through five 24 MiB activations
    (each below glibc's largest mmap threshold, together above its largest trim threshold)."""
    x = torch.randn(6 * MIB, requires_grad=True)
    faults = []
    for _ in range(count):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        hidden = x
        for _ in range(5):
            hidden = (hidden * 0.9).sin()
        hidden.sum().backward()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def resident_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / MIB


@pytest.fixture
def glibc():
    libc = allocator.glibc()
    if libc is None:
        pytest.skip("malloc is not glibc's here")
    return libc


def test_freed_memory_is_reused_inside_and_given_back_after(glibc):
    outside = sum(training_steps(4))
    assert outside > 50_000                              # glibc as it is: pages faulted in again and again
    with allocator.keep_freed_memory():
        with allocator.keep_freed_memory():              # nested: still kept after the inner one ends
            pass
        inside = sum(training_steps(6)[2:])              # once the heap has grown to the step's size
        pieces = [torch.ones(6 * MIB) for _ in range(8)]          # 192 MiB in blocks glibc's heap serves
        del pieces
        kept = resident_mib()
    assert inside < 0.25 * outside
    assert kept - resident_mib() > 150                   # trimmed when the context ends


@pytest.mark.parametrize("name, value", [("MALLOC_TRIM_THRESHOLD_", "1000"), ("MALLOC_ARENA_MAX_", "2"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000"),
                                         ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")])
def test_the_users_own_malloc_settings_are_left_alone(monkeypatch, glibc, name, value):
    allocator.glibc.cache_clear()
    monkeypatch.setenv(name, value)
    try:
        assert allocator.glibc() is None             # so keep_freed_memory calls nothing
        with allocator.keep_freed_memory():
            assert torch.ones(3).sum() == 3
    finally:
        allocator.glibc.cache_clear()
