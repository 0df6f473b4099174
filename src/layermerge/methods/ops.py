"""Building blocks that the data-free methods combine: masks over task vectors and TIES' sign consensus.

Every function here works on one tensor (or a stack of T task vectors of one tensor) in float32 and
is deterministic: magnitude ties are broken by position (lower flat index first), and random masks
come from a generator derived from (seed, tensor name, task name), so a mask never depends on the
order in which tensors or experts are visited.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

import torch
from pydantic import AfterValidator

from layermerge.methods.radix_select import largest_mask, smallest_mask


def key_generator(seed: int, key: str, task: str) -> torch.Generator:
    """A CPU generator seeded from (seed, key, task) alone.

    Hashing the names (instead of drawing from one global stream) makes the mask of a tensor
    independent of which tensors were visited before it, of the expert order, and of resumes.
    """
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{task}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_keep_mask(shape: torch.Size | tuple[int, ...], drop_rate: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Bernoulli keep-mask: each entry survives with probability 1 − drop_rate (u ~ U[0,1), keep if u ≥ p)."""
    return torch.rand(shape, generator=generator) >= drop_rate


def top_k_count(density: float, numel: int) -> int:
    """How many entries a magnitude trim keeps: ⌊density·n⌋, at least one when density > 0.

    The same count mergekit's ``magnitude`` sparsifier uses, so per-tensor TIES matches it.
    """
    if numel == 0 or density <= 0:
        return 0
    if density >= 1:
        return numel
    return max(1, int(density * numel))


def magnitude_keep_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``top_k_count(density, n)`` entries of largest |value|; ties: lower flat index first."""
    return largest_mask(values, top_k_count(density, values.numel()))


def band_keep_mask(values: torch.Tensor, top_drop: float, bottom_drop: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ⌊top_drop·n⌋ largest and ⌊bottom_drop·n⌋ smallest |value|, keep the rest.

    Both tails are cut from one ascending order in which, among equal magnitudes, the lower flat
    index counts as smaller, so the kept count is exactly n − ⌊top_drop·n⌋ − ⌊bottom_drop·n⌋
    (none when that is not positive).
    """
    numel = values.numel()
    n_top, n_bottom = int(top_drop * numel), int(bottom_drop * numel)
    if n_top + n_bottom >= numel:
        return torch.zeros(values.shape, dtype=torch.bool)
    return smallest_mask(values, numel - n_top) & ~smallest_mask(values, n_bottom)


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES sign election over the first (task) axis: +1 where Σ_i τ̂_i ≥ 0, else −1.

    An exact zero sum elects +1 (mergekit's convention); entries where every τ̂_i is zero get
    no contribution either way, because zeros never match an elected sign.
    """
    return torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)


def disjoint_mean(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: mean of the entries whose sign equals the elected sign (0 where none does)."""
    agree = torch.sign(trimmed) == elect_sign(trimmed)
    total = (trimmed * agree).sum(0)
    count = agree.sum(0).to(trimmed.dtype)
    return total / torch.where(count == 0, 1.0, count)


def compile_any(patterns) -> re.Pattern | None:
    """One regex matching wherever any of ``patterns`` matches; None for no patterns."""
    patterns = list(patterns)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def checked_regexes(patterns: list[str] | None) -> list[str] | None:
    """A parameter validator: every pattern must compile (the error names the one that does not)."""
    compile_any(patterns or [])
    return patterns


# A method parameter holding regular expressions (tensor-name filters), validated when the parameters are.
RegexList = Annotated[list[str] | None, AfterValidator(checked_regexes)]
