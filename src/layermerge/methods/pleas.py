"""PLeaS (Nasery, Hayase, Koh, Oh, CVPR 2025, arXiv 2407.02447): merge two models from different
initialisations with Permutations and Least Squares. No shared base is needed.

1. Permutations: align model B's units to model A's (``layermerge.align``; activation matching on the
   few-shot inputs by default). With partial matching only the ``k`` best-matched pairs of each group
   are merged; the other ``d - k`` units of both models are kept, so the merged group is
   ``2d - k`` wide (``pleas_layout``). ``k = d`` (full matching) keeps one model's shapes.
2. Least squares: every Linear and Conv2d layer, in the order the forward pass reaches them, gets the
   weights that make its outputs on the merged model's *own* inputs (its earlier layers already
   solved) closest to the two models' permuted features:

       W = argmin Σ_{m ∈ {A, B}} ‖X_merged W − Y_m‖²   (each output unit fitted to the models owning it)

   solved in closed form from the Gram matrix XᵀX (``regmean.solve_normal_equations``). A unit kept
   from one model is fitted to that model's feature and reads only merged units and that model's
   kept units. A layer whose output goes straight into a BatchNorm is fitted through it: its target
   is the models' post-BatchNorm feature mapped back through the merged BatchNorm (per-unit affine in
   eval mode), so the pair reproduces the models' normalised features.

Everything else (norms, embeddings, layers called twice, grouped convolutions) is the average of A
and aligned B, unit by unit as laid out. ``pleas_models`` works on plain ``nn.Module``s (and is the
only way to get a wider merged model); the registered ``pleas`` method runs full matching on a
ModelContext. Cost: three forward passes over the few-shot data per fitted layer (two with
``inputs="ensemble"``) and one Gram matrix (inputs × inputs, float64) at a time. See
docs/METHODS_PLEAS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from layermerge.align import ModuleRunner, PermutationSpec, apply_perms, build_spec, match_activations, weight_matching
from layermerge.align.runner import eval_mode
from layermerge.align.spec import units_view
from layermerge.errors import ConfigError, DataError
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.np_merge import ContextRunner
from layermerge.methods.pleas_layout import (
    CostTerm,
    GroupLayout,
    LaidAxis,
    check_widenable,
    choose_layout,
    full_layout,
    matched_count,
    ownership,
    ratio_for_budget,
    relative_cost,
    spread,
    spread_state,
    widen,
)
from layermerge.methods.registry import MethodParams, register
from layermerge.methods.regmean import solve_normal_equations

ALIGN = ("activation", "weight", "none")
INPUTS = ("merged", "ensemble")
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class PLeaSResult:
    """The merged state (every key of the inputs, wider where partially matched), B's permutations,
    each group's layout and JSON-able stats."""

    state: dict[str, torch.Tensor]
    perms: dict[str, torch.Tensor] = field(default_factory=dict)
    layouts: dict[str, GroupLayout] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------- observing a forward pass
def observe(runner, state: Mapping[str, torch.Tensor], batch, taps: Sequence[tuple[str, str]]) -> list[list]:
    """Run ``runner`` with ``state`` on ``batch`` and return, per tap (module path, "input"/"output"),
    a copy of every tensor seen there (copies: an in-place activation may overwrite an output later)."""
    seen: list[list] = [[] for _ in taps]

    def keep(index, value):
        if isinstance(value, torch.Tensor):
            seen[index].append(value.detach().clone())

    handles = []
    for index, (path, where) in enumerate(taps):
        module = runner.module.get_submodule(path)
        if where == "input":
            hook = module.register_forward_pre_hook(lambda m, args, i=index: keep(i, args[0] if args else None))
            handles.append(hook)
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, i=index: keep(i, out)))
    try:
        with torch.no_grad():
            runner(state, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@dataclass(frozen=True)
class Layer:
    """A layer PLeaS fits: module path, state keys, conv geometry (None for Linear), and the BatchNorm
    its output goes straight into (path, state keys, eps), if any."""

    path: str
    weight: str
    bias: str | None
    conv: tuple | None = None            # (kernel_size, stride, padding, dilation)
    norm: str | None = None
    norm_keys: tuple = ()
    norm_eps: float = 0.0

    @property
    def feature_dim(self) -> int:
        return 1 if self.conv is not None else -1

    def input_rows(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The layer input as rows of its weight's input entries (pixels' patches for a convolution)."""
        if self.conv is None:
            x = x[mask] if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape) else x
            return x.reshape(-1, x.shape[-1])
        kernel, stride, padding, dilation = self.conv
        if padding == "same":
            x, padding = _pad_same(x, kernel, dilation), 0
        elif padding == "valid":
            padding = 0
        elif isinstance(padding, tuple) and padding and padding[0] == "pad":     # a subclass's own padding first
            x, padding = F.pad(x, padding[1]), padding[2]
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def output_rows(self, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.conv is None:
            y = y[mask] if mask is not None and tuple(y.shape[:-1]) == tuple(mask.shape) else y
            return y.reshape(-1, y.shape[-1])
        return y.movedim(1, -1).reshape(-1, y.shape[1])


def _pad_same(x: torch.Tensor, kernel, dilation) -> torch.Tensor:
    """Zero padding of ``padding="same"`` (stride 1): total d·(k−1) per side pair, the extra on the end."""
    pads = []
    for k, d in reversed(list(zip(kernel, dilation))):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _token_mask(batch) -> torch.Tensor | None:
    """Real (non-padding) tokens of a text batch: rows of Linear inputs at padding are left out."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def find_layers(runner, state: Mapping[str, torch.Tensor], batch, notes: list[str]) -> list[Layer]:
    """Every Linear / Conv2d whose weight is merged, in the order one forward pass first calls them."""
    candidates = {path: sub for path, sub in runner.module.named_modules()
                  if type(sub) is nn.Linear or isinstance(sub, nn.Conv2d)}
    norms = {path: sub for path, sub in runner.module.named_modules()
             if isinstance(sub, BATCHNORMS) and sub.track_running_stats and sub.running_mean is not None}
    order: list[str] = []
    outputs: dict[str, list] = {path: [] for path in candidates}
    norm_inputs: dict[str, list] = {path: [] for path in norms}
    handles = []
    subclass_inputs: dict[str, list] = {path: [] for path, sub in candidates.items() if type(sub) is not nn.Linear
                                        and type(sub) is not nn.Conv2d}
    for path, sub in candidates.items():
        handles.append(sub.register_forward_pre_hook(lambda m, args, p=path: order.append(p)))
        if path in subclass_inputs:
            handles.append(sub.register_forward_pre_hook(lambda m, args, p=path: subclass_inputs[p].append(args[0])))
        handles.append(sub.register_forward_hook(lambda m, args, out, p=path: outputs[p].append(out)))
    for path, sub in norms.items():
        handles.append(sub.register_forward_pre_hook(lambda m, args, p=path: norm_inputs[p].append(args[0])))
    try:
        with torch.no_grad():
            runner(state, batch)
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for path in dict.fromkeys(order):                      # first calls, in order
        sub = candidates[path]
        weight = runner.key_of(path, "weight")
        if weight is None or weight not in state:
            continue                                       # not merged here (a per-task head)
        bias = runner.key_of(path, "bias") if sub.bias is not None else None
        reason = None
        if len(outputs[path]) > 1:
            reason = f"called {len(outputs[path])} times per forward pass"
        elif isinstance(sub, nn.Conv2d) and (sub.groups != 1 or sub.padding_mode != "zeros"):
            reason = "grouped or non-zero-padded convolution"
        elif sub.bias is not None and (bias is None or bias not in state):
            reason = "its bias is not merged"
        if reason:
            notes.append(f"layer {path!r} averaged, not fitted: {reason}")
            continue
        conv = None
        if isinstance(sub, nn.Conv2d):
            padding = sub.padding if isinstance(sub.padding, str) else tuple(sub.padding)
            if path in subclass_inputs:
                padding = _subclass_padding(sub, state[weight], state[bias] if bias else None,
                                            subclass_inputs[path][0], outputs[path][0])
                if padding is None:
                    notes.append(f"layer {path!r} averaged, not fitted: {type(sub).__name__} is a Conv2d subclass "
                                 "whose output is not a zero-padded convolution of its input")
                    continue
            conv = (tuple(sub.kernel_size), tuple(sub.stride), padding, tuple(sub.dilation))
        norm = _norm_after(runner, state, outputs[path][0], norm_inputs, norms)
        layers.append(Layer(path, weight, bias, conv, *norm) if norm else Layer(path, weight, bias, conv))
    return layers


def _subclass_padding(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                      output: torch.Tensor) -> tuple | None:
    """("pad", F.pad amounts, the conv's own padding) for a Conv2d subclass that zero-pads its input before
    the convolution (EfficientNet's static "same" padding: a ``static_padding`` ZeroPad2d or identity), when
    that reproduces the module's output from its input with the weights it ran with; None otherwise
    (nothing else is fitted)."""
    pad_module = getattr(conv, "static_padding", None)
    if isinstance(pad_module, nn.ZeroPad2d):
        pads = tuple(int(v) for v in pad_module.padding)
    elif pad_module is None:
        pads = (0, 0, 0, 0)
    else:                               # an identity of the package's own (1×1 convolutions), checked below
        with torch.no_grad():
            same = pad_module(x)
        if not (isinstance(same, torch.Tensor) and same.shape == x.shape and torch.equal(same, x)):
            return None
        pads = (0, 0, 0, 0)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return None
    with torch.no_grad():
        rebuilt = F.conv2d(F.pad(x, pads), weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                           conv.stride, conv.padding, conv.dilation, conv.groups)
    if rebuilt.shape != output.shape or not torch.allclose(rebuilt, output, rtol=1e-4, atol=1e-5):
        return None
    return ("pad", pads, tuple(conv.padding))


def _norm_after(runner, state, output, norm_inputs, norms) -> tuple | None:
    """(path, keys, eps) of a BatchNorm (eval mode, running statistics merged) whose only call reads
    exactly ``output``."""
    for path, inputs in norm_inputs.items():
        if len(inputs) != 1 or inputs[0] is not output or output.dim() not in (2, 4):
            continue
        sub = norms[path]
        keys = tuple(runner.key_of(path, name) for name in ("running_mean", "running_var", "weight", "bias"))
        needed = keys if sub.affine else keys[:2]
        if sub.training or any(key is None or key not in state for key in needed):
            return None
        return path, keys if sub.affine else (*keys[:2], None, None), float(sub.eps)
    return None


# --------------------------------------------------------------------- which units to merge
class _Agreement:
    """Running sums for the correlation of corresponding features of A and aligned B."""

    def __init__(self):
        self.n, self.sums = 0, None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        parts = [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)]
        self.sums = parts if self.sums is None else [s + p for s, p in zip(self.sums, parts)]
        self.n += a.shape[0]

    def correlation(self) -> torch.Tensor:
        sa, sb, saa, sbb, sab = (s / self.n for s in self.sums)
        cov = sab - sa * sb
        return cov / ((saa - sa ** 2).clamp_min(0).sqrt() * (sbb - sb ** 2).clamp_min(0).sqrt()).clamp_min(1e-12)


def unit_agreement(spec: PermutationSpec, feeds: Sequence[tuple], state_a, state_b) -> dict[str, torch.Tensor]:
    """Per group, how well each aligned pair of units agrees: the mean Pearson correlation of their
    features at the group's sites on the few-shot inputs (the quantity activation matching
    maximises), or the cosine of their weights for a group no site observes."""
    sites = [(name, site) for name, group in spec.groups.items() for site in group.sites]
    taps = [(site.module, site.where) for _, site in sites]
    sums = [_Agreement() for _ in sites]
    for runner, batches in feeds:
        for batch in batches:
            seen_a = observe(runner, state_a, batch, taps)
            seen_b = observe(runner, state_b, batch, taps)
            for index, (name, site) in enumerate(sites):
                width = site.segments * spec.groups[name].size * site.unit
                for a, b in zip(seen_a[index], seen_b[index]):
                    sums[index].add(a.movedim(site.dim, -1).reshape(-1, width),
                                    b.movedim(site.dim, -1).reshape(-1, width))
    scores = {}
    for name, group in spec.groups.items():
        parts = [sums[i].correlation().reshape(site.segments, group.size, site.unit).mean((0, 2))
                 for i, (owner, site) in enumerate(sites) if owner == name and sums[i].n]
        scores[name] = torch.stack(parts).mean(0) if parts else _weight_cosine(group, state_a, state_b)
    return scores


def _weight_cosine(group, state_a, state_b) -> torch.Tensor:
    dot = norm_a = norm_b = 0
    for axis in group.axes:
        if axis.match:
            a = units_view(state_a[axis.param].double(), axis, group.size)
            b = units_view(state_b[axis.param].double(), axis, group.size)
            dot, norm_a, norm_b = dot + (a * b).sum(1), norm_a + (a * a).sum(1), norm_b + (b * b).sum(1)
    return dot / (norm_a * norm_b).sqrt().clamp_min(1e-12)


def cost_terms(runner, state, batch, spec: PermutationSpec | None) -> list[CostTerm]:
    """Multiply-accumulates of every Linear/Conv2d on one batch, with the groups of their axes."""
    axes_of = spec.param_axes() if spec is not None else {}
    modules = {path: sub for path, sub in runner.module.named_modules() if isinstance(sub, (nn.Linear, nn.Conv2d))}
    seen = observe(runner, state, batch, [(path, "output") for path in modules])
    terms = []
    for (path, sub), outputs in zip(modules.items(), seen):
        key = runner.key_of(path, "weight")
        grouped = {axis.dim % sub.weight.dim(): (name, axis.unit, axis.segments) for name, axis in axes_of.get(key, ())}
        out_size, in_size = sub.weight.shape[0], sub.weight.shape[1]
        kernel = sub.weight[0, 0].numel() if isinstance(sub, nn.Conv2d) else 1
        for out in outputs:
            positions = out.numel() // out_size
            terms.append(CostTerm(positions * kernel, out_size, in_size, grouped.get(0), grouped.get(1)))
    return terms


def choose_layouts(spec: PermutationSpec | None, match_ratio, budget: float | None, feeds, state_a, state_b,
                   stats: dict) -> dict[str, GroupLayout]:
    """Every group's layout: all units merged (match ratio 1), or the best-agreeing ``ratio · d`` pairs,
    the ratio uniform (given, or the smallest within the compute ``budget``) or per group."""
    if spec is None or not spec.groups:
        return {}
    sizes = {name: group.size for name, group in spec.groups.items()}
    terms = None
    if budget is not None:
        runner, batches = feeds[0]
        terms = cost_terms(runner, state_a, batches[0], spec)
        match_ratio = ratio_for_budget(terms, sizes, budget)
    ratios = dict(match_ratio) if isinstance(match_ratio, Mapping) else {name: match_ratio for name in sizes}
    unknown = sorted(set(ratios) - set(sizes))
    if unknown:
        raise ConfigError(f"match_ratio names groups {unknown[:5]} the permutation spec does not have; it has "
                          f"{list(sizes)[:8]}")
    for name, ratio in ratios.items():
        if not 0 <= ratio <= 1:
            raise ConfigError(f"match_ratio of group {name!r} must lie in [0, 1], got {ratio}")
    counts = {name: matched_count(ratios.get(name, 1.0), size) for name, size in sizes.items()}
    if all(counts[name] == size for name, size in sizes.items()):
        layouts = {name: full_layout(size) for name, size in sizes.items()}
        compute = 1.0
    else:
        scores = unit_agreement(spec, feeds, state_a, state_b)
        layouts = {name: choose_layout(scores[name], counts[name]) for name in sizes}
        if terms is None:
            runner, batches = feeds[0]
            terms = cost_terms(runner, state_a, batches[0], spec)
        compute = relative_cost(terms, layouts, sizes)
    stats["match_ratio"] = match_ratio if not isinstance(match_ratio, Mapping) else dict(match_ratio)
    stats["compute_ratio"] = round(compute, 6)
    stats["groups"] = {name: {"units": sizes[name], "merged": counts[name], "width": layouts[name].width}
                       for name in sizes}
    return layouts


# --------------------------------------------------------------------- the least-squares step
def _laid(spec_axes, weight: str, ndim: int, dim: int, layouts) -> tuple[GroupLayout | None, int, int]:
    """The layout, unit and segments of the group reordering axis ``dim`` of a weight (None: no group)."""
    for name, axis in spec_axes.get(weight, ()):
        if axis.dim % ndim == dim and name in layouts:
            return layouts[name], axis.unit, axis.segments
    return None, 1, 1


def _spread_features(pair: Sequence[torch.Tensor], dim: int, laid: tuple) -> torch.Tensor:
    layout, unit, segments = laid
    axes = [LaidAxis(dim, unit, segments, layout)] if layout is not None else []
    return spread([pair[0].float(), pair[1].float()], axes)


def _owners(laid: tuple, entries: int) -> torch.Tensor:
    layout, unit, segments = laid
    return ownership(layout, entries, unit, segments)


def fit_layer(layer: Layer, merged: dict[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]],
              feeds: Sequence[tuple], merged_feeds: Sequence[tuple], spec_axes, layouts, *, inputs: str,
              ridge: float) -> dict:
    """Set ``layer``'s weights in ``merged`` to the least-squares fit of the models' features; return
    the layer's relative squared error before (averaged weights) and after."""
    weight = merged[layer.weight]
    out_laid = _laid(spec_axes, layer.weight, weight.dim(), 0, layouts)
    in_laid = _laid(spec_axes, layer.weight, weight.dim(), 1, layouts)
    affine = _norm_affine(layer, merged) if layer.norm else None
    if affine is not None and bool((affine[0].abs() < 1e-12).any()):
        affine = None                   # a unit the merged BatchNorm zeroes: fit the layer's own output
    target_tap = (layer.norm, "output") if affine is not None else (layer.path, "output")
    gram = cross = None
    target_sq, rows = 0.0, 0
    for (runner, batches), (merged_runner, _) in zip(feeds, merged_feeds):
        for batch in batches:
            seen = [observe(runner, state, batch, [(layer.path, "input"), target_tap]) for state in states]
            if not seen[0][0]:
                continue
            if inputs == "merged":
                x = observe(merged_runner, merged, batch, [(layer.path, "input")])[0][0]
            else:
                x = _spread_features([s[0][0] for s in seen], layer.feature_dim, in_laid)
            target = _spread_features([s[1][0] for s in seen], layer.feature_dim, out_laid)
            mask = _token_mask(batch)
            x_rows = layer.input_rows(x.float(), mask).double()
            t_rows = layer.output_rows(target, mask).double()
            if affine is not None:
                t_rows = (t_rows - affine[1]) / affine[0]
            if layer.bias is not None:
                x_rows = torch.cat([x_rows, torch.ones_like(x_rows[:, :1])], 1)
            gram = x_rows.T @ x_rows if gram is None else gram.addmm_(x_rows.T, x_rows)
            cross = x_rows.T @ t_rows if cross is None else cross.addmm_(x_rows.T, t_rows)
            target_sq += float((t_rows ** 2).sum())
            rows += x_rows.shape[0]
    if gram is None:
        return {"layer": layer.path, "rows": 0, "note": "the data never reached this layer; averaged"}
    start = weight.reshape(weight.shape[0], -1).T.double()
    if layer.bias is not None:
        start = torch.cat([start, merged[layer.bias].double()[None]], 0)
    kernel = weight[0, 0].numel() if layer.conv is not None else 1
    in_own = _owners(in_laid, weight.shape[1]).repeat_interleave(kernel, dim=1)
    if layer.bias is not None:
        in_own = torch.cat([in_own, torch.ones(2, 1, dtype=torch.bool)], 1)
    out_own = _owners(out_laid, weight.shape[0])
    solution, ridged = _solve_blocks(gram, cross, start, out_own, in_own.to(gram.device), ridge)

    def error(w):
        return float(((w * (gram @ w)).sum() - 2 * (w * cross).sum() + target_sq) / max(target_sq, 1e-30))

    stats = {"layer": layer.path, "rows": rows, "error_average": round(error(start), 8),
             "error_pleas": round(error(solution), 8)}
    if ridged:
        stats["fallback_ridge"] = ridged
    columns = weight[0].numel()
    merged[layer.weight] = solution[:columns].T.reshape(weight.shape).to(weight.dtype).contiguous()
    if layer.bias is not None:
        merged[layer.bias] = solution[columns].to(merged[layer.bias].dtype).contiguous()
    return stats


def _norm_affine(layer: Layer, merged) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The merged BatchNorm in eval mode as y ↦ a·y + c per unit."""
    mean_key, var_key, weight_key, bias_key = layer.norm_keys
    mean, var = merged[mean_key].double(), merged[var_key].double()
    scale = merged[weight_key].double() if weight_key else torch.ones_like(mean)
    shift = merged[bias_key].double() if bias_key else torch.zeros_like(mean)
    a = scale / (var + layer.norm_eps).sqrt()
    return a, shift - a * mean


def _solve_blocks(gram, cross, start, out_own, in_own, ridge: float) -> tuple[torch.Tensor, list]:
    """Least squares column by column class: a unit both models own reads every input; a unit kept
    from one model reads only the inputs that model owns (merged units, its own kept units, bias)."""
    out_own, in_own = out_own.to(gram.device), in_own.to(gram.device)
    solution = torch.zeros_like(start)
    everything = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
    classes = ((out_own[0] & out_own[1], everything), (out_own[0] & ~out_own[1], in_own[0]),
               (~out_own[0] & out_own[1], in_own[1]))
    ridged = []
    for columns, allowed in classes:
        if not columns.any():
            continue
        rows = allowed.nonzero().squeeze(1)
        cols = columns.nonzero().squeeze(1)
        lhs = gram[rows][:, rows]
        rhs = cross[rows][:, cols]
        mean = start[rows][:, cols]
        if ridge > 0:
            strength = ridge * float(lhs.diagonal().mean())
            lhs = lhs + strength * torch.eye(len(rows), dtype=lhs.dtype, device=lhs.device)
            rhs = rhs + strength * mean
        part, step = solve_normal_equations(lhs, rhs, mean, torch.float64)
        if step:
            ridged.append(step)
        solution[rows[:, None], cols[None, :]] = part.double()
    return solution, ridged


# --------------------------------------------------------------------- the whole merge
def pleas_states(states: Sequence[Mapping[str, torch.Tensor]], feeds: Sequence[tuple],
                 spec: PermutationSpec | None, *, merged_feeds: Callable | None = None, align: str = "activation",
                 match_ratio: float | Mapping[str, float] = 1.0, budget: float | None = None,
                 inputs: str = "merged", ridge: float = 1e-4, max_match_iter: int = 100, seed: int = 0,
                 progress=None) -> PLeaSResult:
    """PLeaS of two ``states`` (same architecture and keys) on the few-shot ``feeds`` — a list of
    ``(runner, batches)``; ``spec`` gives the permutation groups (None: nothing is permuted).

    ``merged_feeds(state, layouts)`` returns feeds whose runners can run the merged state; it is
    needed only when partial matching widens the model (``pleas_models`` builds a wider module)."""
    _check(states, align, match_ratio, budget, inputs, ridge)
    notes: list[str] = list(spec.notes) if spec is not None else []
    stats: dict = {"align": align, "inputs": inputs, "ridge": ridge,
                   "permutation_groups": len(spec.groups) if spec is not None else 0}
    state_a, state_b = dict(states[0]), dict(states[1])
    perms: dict[str, torch.Tensor] = {}
    if spec is not None and spec.groups and align != "none":
        if align == "weight":
            perms = weight_matching(spec, state_a, state_b, max_iter=max_match_iter, seed=seed)
        else:
            perms = match_activations(spec, feeds, state_a, state_b, seed=seed, notes=notes)
        state_b = {k: v.to(state_b[k].device) for k, v in apply_perms(spec, state_b, perms).items()}
    layouts = choose_layouts(spec, match_ratio, budget, feeds, state_a, state_b, stats)
    runner = feeds[0][0]
    weights = [runner.key_of(path, "weight") for path, sub in runner.module.named_modules()
               if isinstance(sub, (nn.Linear, nn.Conv2d))]
    reads = {(key, 1) for key in weights if key is not None}
    merged = spread_state(spec, layouts, [state_a, state_b], reads)
    widened = any(layout.width != layout.size for layout in layouts.values())
    if widened and merged_feeds is None:
        raise ConfigError("partial matching makes the merged model wider than the inputs, so it needs a model that "
                          "can be widened: use layermerge.methods.pleas.pleas_models, or match_ratio 1")
    run_feeds = merged_feeds(merged, layouts) if widened else feeds
    layers = find_layers(run_feeds[0][0], merged, run_feeds[0][1][0], notes)
    spec_axes = spec.param_axes() if spec is not None else {}
    fits = []
    for layer in (progress(layers) if progress is not None else layers):
        fits.append(fit_layer(layer, merged, [state_a, state_b], feeds, run_feeds, spec_axes, layouts,
                              inputs=inputs, ridge=ridge))
    stats.update({"fitted_layers": len(fits), "layers": fits, "notes": notes})
    return PLeaSResult(merged, perms, layouts, stats)


def _check(states, align, match_ratio, budget, inputs, ridge) -> None:
    if len(states) != 2:
        raise ConfigError(f"PLeaS merges exactly two models, got {len(states)}")
    if align not in ALIGN:
        raise ConfigError(f"align must be one of {ALIGN}, got {align!r}")
    if inputs not in INPUTS:
        raise ConfigError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    if not isinstance(match_ratio, Mapping) and not 0 <= match_ratio <= 1:
        raise ConfigError(f"match_ratio must lie in [0, 1] (1: every unit merged), got {match_ratio}")
    if budget is not None and not 1 <= budget <= 2:
        raise ConfigError(f"budget (compute relative to one model) must lie in [1, 2], got {budget}")
    if budget is not None and (isinstance(match_ratio, Mapping) or match_ratio != 1):
        raise ConfigError("give match_ratio or budget, not both: budget chooses a uniform match ratio")
    if not ridge >= 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")


def pleas_models(models: Sequence[nn.Module], batches: Sequence, *, spec: PermutationSpec | None = None,
                 align: str = "activation", match_ratio: float | Mapping[str, float] = 1.0,
                 budget: float | None = None, inputs: str = "merged", ridge: float = 1e-4,
                 max_match_iter: int = 100, seed: int = 0) -> tuple[nn.Module, PLeaSResult]:
    """PLeaS of two ``models`` (same architecture, any initialisations) on few-shot ``batches`` (input
    tensors, ``(inputs, labels)`` pairs or dicts; labels are not used). Returns the merged model — a
    copy of the first, widened where partial matching keeps units of both — and the result. The
    permutation spec is found from the first model when not given (``layermerge.align.build_spec``);
    ``align="none"`` with full matching needs none (models fine-tuned from one base)."""
    if len(models) != 2:
        raise ConfigError(f"PLeaS merges exactly two models, got {len(models)}")
    batches = list(batches)
    if not batches:
        raise DataError("PLeaS needs few-shot batches (inputs on which to match and fit features)")
    template = models[0]
    partial = budget is not None or isinstance(match_ratio, Mapping) or match_ratio != 1
    if spec is None and (align != "none" or partial):
        first = batches[0]
        spec = build_spec(template, first[0] if isinstance(first, (tuple, list)) else first)
    states = [{k: v.detach().float().clone() if v.is_floating_point() else v.clone() for k, v in m.state_dict().items()}
              for m in models]

    def merged_feeds(state, layouts):
        check_widenable(spec, layouts, template)
        try:
            wide = widen(template, state)
            with torch.no_grad():
                ModuleRunner(wide)(state, batches[0])
        except RuntimeError as exc:
            raise ConfigError(f"the widened merged model does not run ({str(exc).splitlines()[0]}); its forward "
                              "pass assumes fixed widths: use match_ratio 1") from None
        return [(ModuleRunner(wide), batches)]

    with eval_mode(template):
        result = pleas_states(states, [(ModuleRunner(template), batches)], spec, merged_feeds=merged_feeds,
                              align=align, match_ratio=match_ratio, budget=budget, inputs=inputs, ridge=ridge,
                              max_match_iter=max_match_iter, seed=seed)
    return widen(template, result.state), result


# --------------------------------------------------------------------- the registered method
@register("pleas", summary="PLeaS: align neurons by activation matching, then set every Linear/Conv layer to the "
                           "least-squares fit of both models' permuted features on the merged model's own inputs; "
                           "no base needed (Nasery et al. 2025)", needs_data=True, kind="model", needs_base=False,
          min_experts=2, max_experts=2)
class PLeaS(DataDrivenMethod):
    # Every BatchNorm that follows a fitted layer is part of its fit: the merged statistics must stay.
    merges_running_statistics = True

    class Params(MethodParams):
        align: Literal["activation", "weight", "none"] = Field(
            "activation", description="neuron alignment: activation matching on the few-shot inputs, weight matching "
                                      "(the official scripts' default), or none")
        inputs: Literal["merged", "ensemble"] = Field(
            "merged", description="inputs each layer is fitted on: the merged model's own (earlier layers already "
                                  "fitted) or the models' permuted features averaged (the official code)")
        ridge: float = Field(1e-4, ge=0, description="ridge towards the aligned average, relative to the mean "
                                                     "diagonal of each Gram matrix; 0 = plain least squares")
        match_ratio: float = Field(1.0, ge=0, le=1, description="fraction of each group's units merged; below 1 "
                                                                "(partial matching) the merged model is wider than "
                                                                "the experts, which only pleas_models can build")
        budget: float | None = Field(None, ge=1, le=2, description="compute of the merged model relative to one "
                                                                   "expert (chooses a uniform match_ratio); only 1 "
                                                                   "here, as for match_ratio")
        max_match_iter: int = Field(100, ge=1, description="weight matching: most sweeps over the permutation groups")

    def merge_models(self, ctx):
        from layermerge.methods.base import ModelMergeResult

        p = self.params
        if p.match_ratio != 1 or p.budget not in (None, 1):
            raise ConfigError("pleas: partial matching (match_ratio < 1 or budget > 1) makes the merged model wider "
                              "than the experts, and the output keeps their architecture; use "
                              "layermerge.methods.pleas.pleas_models on nn.Modules for a wider model")
        feeds = [(ContextRunner(ctx, task), ctx.batches(task)) for task in ctx.tasks]
        runner = feeds[0][0]
        spec = None
        if p.align != "none":
            spec, _ = build_spec(runner.module, feeds[0][1][0]).renamed(runner.keys_by_name)
        states = [ctx.expert_state(task) for task in ctx.tasks]
        result = pleas_states(states, feeds, spec, align=p.align, inputs=p.inputs, ridge=p.ridge,
                              max_match_iter=p.max_match_iter, seed=int(ctx.generator.initial_seed()),
                              progress=lambda it: ctx.progress(it, "pleas layers"))
        params = {key: result.state[key] for key in ctx.merge_keys}
        return ModelMergeResult(params, {}, {}, result.stats)


__all__ = ["PLeaS", "PLeaSResult", "find_layers", "fit_layer", "pleas_models", "pleas_states", "unit_agreement"]

