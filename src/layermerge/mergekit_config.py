"""mergekit's YAML merge configs, read as layermerge configs.

``layermerge merge mergekit.yml -o OUT`` takes a mergekit config as it is: ``config.parse_config`` asks
``is_mergekit_config``, ``convert`` turns the mapping into a layermerge config mapping, and that is
validated like any other. Each converted method computes what mergekit 0.1.5 computes (the table is in
docs/MERGEKIT.md, "mergekit configs"); a setting with no layermerge equivalent (unequal per-model
weights, a disjoint sum, per-layer gradients, filters, slices...) is refused with one line naming it,
never approximated. Settings that mergekit itself ignores, or that do not change layermerge's merged
weights, are listed in one ``layermerge: warning:`` line.

Paths: mergekit resolves relative model paths against the working directory; here, as in every
layermerge config, they are relative to the config file's folder.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from pydantic import TypeAdapter, ValidationError

from layermerge.errors import ConfigError, LayermergeWarning

# mergekit method -> (layermerge method, TIES-style consensus, sparsification, normalize default, rescale default)
_TASK_ARITHMETIC_FAMILY = {
    "task_arithmetic": ("task_arithmetic", False, None, False, False),
    "ties": ("ties", True, "magnitude", True, False),
    "dare_linear": ("dare_linear", False, "random", False, True),
    "dare_ties": ("dare_ties", True, "random", False, True),
    "breadcrumbs": ("breadcrumbs", False, "outliers", False, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", True, "outliers", False, False),
    "della": ("della", True, "magprune", True, True),
    "della_linear": ("della_linear", False, "magprune", False, True),
}
_SPHERICAL_AND_OTHERS = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce")
CONVERTED_METHODS = ("linear", *_TASK_ARITHMETIC_FAMILY, *_SPHERICAL_AND_OTHERS)

_MARKERS = {"merge_method", "models", "slices", "modules"}
_CONVERTED_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                   "tokenizer", "chat_template"}
_LAYERMERGE_ONLY = ("base", "experts", "method", "params", "data", "engine")   # mixing these in: refused
# layermerge's own output options, copied as they are (mergekit ignores them)
_PASSED_THROUGH = ("output", "max_shard_size", "vocab_policy", "head_keys", "card_paths", "push_to_hub")
_SAVED_DTYPES = ("float32", "bfloat16", "float16")
_REQUIRED = object()
_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


def is_mergekit_config(mapping) -> bool:
    """True for a mapping in mergekit's format (``merge_method``; or ``models``/``slices`` without ours)."""
    if not isinstance(mapping, dict):
        return False
    keys = set(mapping)
    return "merge_method" in keys or bool(keys & _MARKERS and not keys & {"experts", "method"})


def convert(mapping: dict, source: str = "config") -> tuple[dict, list[str]]:
    """The layermerge config mapping for a mergekit one, and the mergekit fields it ignored (each with why).

    Raises ConfigError, one line naming the feature, for what layermerge cannot compute the same way."""
    return _Converter(mapping, source).run()


def from_mergekit(mapping: dict, source: str = "config") -> dict:
    """``convert``, with the ignored fields reported as one LayermergeWarning."""
    converted, ignored = convert(mapping, source)
    if ignored:
        warnings.warn(f"{source}: mergekit config: ignored {'; '.join(ignored)}", LayermergeWarning, stacklevel=3)
    return converted


@dataclass
class _Input:
    where: str               # "models[1]" or "base_model"
    reference: str           # as mergekit spells it: path[@revision][+lora]
    params: dict             # its own parameters
    is_base: bool = False
    values: dict = field(default_factory=dict)   # resolved per-model parameters


class _Converter:
    def __init__(self, mapping: dict, source: str):
        self.mapping, self.source, self.ignored = mapping, source, []

    def fail(self, message: str):
        raise ConfigError(f"{self.source}: mergekit config: {message}")

    def ignore(self, what: str, why: str) -> None:
        self.ignored.append(f"{what} ({why})")

    # ------------------------------------------------------------------ the whole config
    def run(self) -> tuple[dict, list[str]]:
        mapping = self.mapping
        mixed = [key for key in _LAYERMERGE_ONLY if key in mapping]
        if mixed:
            theirs = ", ".join(key for key in mapping if key in _MARKERS | {"base_model"})
            self.fail(f"it mixes layermerge keys ({', '.join(mixed)}) with mergekit keys ({theirs}); write either "
                      "format, not both")
        for key, what in (("slices", "slices (layer ranges stitched from several models)"),
                          ("modules", "modules (separate merges per module)")):
            if mapping.get(key):
                self.fail(f"{what} are not supported: layermerge merges whole models; list them under 'models:'")
        method = mapping.get("merge_method")
        if method is None:
            self.fail("no merge_method")
        if method not in CONVERTED_METHODS:
            self.fail(f"merge_method {method!r} has no layermerge counterpart; converted methods: "
                      f"{', '.join(CONVERTED_METHODS)} (`layermerge methods` lists layermerge's own)")
        for key in mapping:
            if key not in _CONVERTED_KEYS | set(_PASSED_THROUGH) | {"slices", "modules"}:
                self.ignore(key, "not a mergekit 0.1.5 key")
        if "chat_template" in mapping and mapping["chat_template"] is not None:
            self.ignore("chat_template", "mergekit's template name or Jinja text; the output keeps the tokenizer's "
                                         "template")

        inputs, base = self.inputs(method)
        global_params = mapping.get("parameters") or {}
        if not isinstance(global_params, dict):
            self.fail(f"parameters must be a mapping, got {global_params!r}")
        if method in _TASK_ARITHMETIC_FAMILY:
            out = self.task_arithmetic_family(method, inputs, base, global_params)
        elif method == "linear":
            out = self.linear(inputs, base, global_params)
        else:
            out = getattr(self, method)(inputs, base, global_params)
        out.update(self.dtype())
        out.update(self.tokenizer(method, out, inputs, base))
        for key in _PASSED_THROUGH:
            if key in mapping:
                out[key] = mapping[key]
        return out, self.ignored

    # ------------------------------------------------------------------ models
    def reference(self, value, where: str) -> str:
        """A mergekit ModelReference as its string form ``path[@revision][+lora]``."""
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and "model" in value:
            if value.get("override_architecture") is not None:
                self.ignore(f"{where}.override_architecture", "layermerge reads tensors by name, whatever the "
                                                              "architecture")
            reference = self.model_path(value["model"], where)
            if value.get("lora") is not None:
                reference += "+" + self.model_path(value["lora"], f"{where}.lora")
            return reference
        self.fail(f"{where}: expected a model path, got {value!r}")

    def model_path(self, value, where: str) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            return value["path"] + (f"@{value['revision']}" if value.get("revision") else "")
        self.fail(f"{where}: expected a model path, got {value!r}")

    def inputs(self, method: str) -> tuple[list[_Input], _Input | None]:
        """Every input in mergekit's order (the models, then base_model when they do not list it)."""
        models = self.mapping.get("models")
        if not isinstance(models, list) or not models:
            self.fail("no models: list the models to merge under 'models:' (- model: PATH)")
        base_reference = None
        if self.mapping.get("base_model") is not None:
            base_reference = self.reference(self.mapping["base_model"], "base_model")
        inputs, seen = [], {}
        for index, entry in enumerate(models):
            where = f"models[{index}]"
            if not isinstance(entry, dict) or "model" not in entry:
                self.fail(f"{where}: expected a mapping with 'model' (and optional 'parameters'), got {entry!r}")
            for key in entry:
                if key not in ("model", "parameters"):
                    self.ignore(f"{where}.{key}", "not a mergekit 0.1.5 key")
            reference = self.reference(entry["model"], f"{where}.model")
            if reference in seen:
                self.fail(f"{where} repeats {seen[reference]} ({reference}); list each model once")
            seen[reference] = where
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                self.fail(f"{where}.parameters must be a mapping, got {params!r}")
            inputs.append(_Input(where, reference, params, is_base=reference == base_reference))
        base = next((i for i in inputs if i.is_base), None)
        if base_reference is not None and base is None:
            base = _Input("base_model", base_reference, {}, is_base=True)
            inputs.append(base)
        return inputs, base

    # ------------------------------------------------------------------ parameters
    def setting(self, value, where: str):
        """The one value of a mergekit parameter setting; refuses gradients and filters."""
        if isinstance(value, dict):
            if "value" not in value:
                self.fail(f"{where}: expected a value or {{value, filter}}, got {value!r}")
            self.no_filter(value, where)
            return self.setting(value["value"], where)
        if isinstance(value, list):
            if not value:
                return None
            if all(isinstance(item, dict) for item in value):
                self.no_filter(value[0], where)     # mergekit takes the first entry whose filter matches
                return self.setting(value[0].get("value"), where)
            if any(isinstance(item, (dict, list)) for item in value) or value.count(value[0]) != len(value):
                self.fail(f"{where} is a per-layer gradient {value}: layermerge applies one value to the whole "
                          "model (no gradients); give a single value")
            return value[0]
        return value

    def no_filter(self, condition: dict, where: str) -> None:
        if condition.get("filter") not in (None, "*"):
            self.fail(f"{where} has a filter ({condition['filter']!r}): layermerge applies one value to every "
                      "tensor (no per-tensor filters); give a single value")

    def typed(self, value, kind: type, where: str):
        if kind is float and isinstance(value, bool):
            self.fail(f"{where}: expected a number, got {value!r}")
        try:
            return TypeAdapter(kind).validate_python(value)
        except ValidationError:
            expected = {float: "a number", int: "a whole number"}.get(kind, "true or false")
            self.fail(f"{where}: expected {expected}, got {value!r}")

    def bind(self, method: str, spec: dict, inputs: list[_Input], global_params: dict) -> dict:
        """mergekit's parameter resolution: shared parameters from the top-level ``parameters`` only,
        per-model ones from the model's parameters, then the top level, then the default. Fills each
        input's ``values``; returns the shared values."""
        for key in global_params:
            if key not in spec:
                self.ignore(f"parameters.{key}", f"not a parameter of mergekit's {method}")
        for item in inputs:
            for key in item.params:
                scope = spec.get(key, (None,))[0]
                if scope is None:
                    self.ignore(f"{item.where}.parameters.{key}", f"not a parameter of mergekit's {method}")
                elif scope == "shared":
                    self.ignore(f"{item.where}.parameters.{key}", "mergekit reads it only from the top-level "
                                                                 "parameters")
                elif scope == "non_base" and item.is_base:
                    self.ignore(f"{item.where}.parameters.{key}", "set on the base model; mergekit ignores it")
        shared = {}
        for key, (scope, kind, default) in spec.items():
            if scope == "shared":
                shared[key] = self.resolve(method, key, kind, default, [("parameters", global_params)])
                continue
            for item in inputs:
                if scope == "non_base" and item.is_base:
                    continue
                item.values[key] = self.resolve(method, key, kind, default,
                                                [(f"{item.where}.parameters", item.params),
                                                 ("parameters", global_params)], item.where)
        return shared

    def resolve(self, method: str, key: str, kind: type, default, sources: list, where: str | None = None):
        for prefix, params in sources:
            if key in params:
                value = self.setting(params[key], f"{prefix}.{key}")
                if value is not None:
                    return self.typed(value, kind, f"{prefix}.{key}")
        if default is _REQUIRED:
            self.fail(f"{where + ' has' if where else 'parameters has'} no {key}, which mergekit's {method} requires"
                      + (" for every model (give it under the model's parameters or the top-level ones)"
                         if where else ""))
        return default

    def given(self, key: str, inputs: list[_Input], global_params: dict) -> bool:
        return key in global_params or any(key in item.params for item in inputs)

    def same(self, values: list[float], key: str, target: str, advice: str) -> float:
        if len(set(values)) > 1:
            listed = ", ".join(f"{v:g}" for v in values)
            self.fail(f"per-model {key} values differ ({listed}): layermerge's {target} applies one {key} to every "
                      f"expert; {advice}")
        return values[0]

    # ------------------------------------------------------------------ methods
    def task_arithmetic_family(self, method: str, inputs: list[_Input], base: _Input | None, global_params: dict):
        target, consensus, sparsification, normalize_default, rescale_default = _TASK_ARITHMETIC_FAMILY[method]
        spec = {"int8_mask": ("shared", bool, False), "normalize": ("shared", bool, normalize_default),
                "rescale": ("shared", bool, rescale_default), "lambda": ("shared", float, 1.0),
                "weight": ("non_base", float, _REQUIRED), "density": ("non_base", float, 1.0)}
        if sparsification == "outliers":
            spec["gamma"] = ("non_base", float, 0.01)
        if sparsification == "magprune":
            spec["epsilon"] = ("non_base", float, 0.15)
        if base is None:
            self.fail(f"merge_method {method!r} needs base_model (the model the task vectors are taken from)")
        experts = [item for item in inputs if not item.is_base]
        if not experts:
            self.fail("no models besides base_model to merge")
        shared = self.bind(method, spec, inputs, global_params)
        weight = self.same([e.values["weight"] for e in experts], "weight", target, "use equal weights and put "
                           "the common factor in the top-level lambda")
        lam, normalize, rescale = shared["lambda"], shared["normalize"], shared["rescale"]
        params = {}
        if consensus:
            if weight <= 0:
                self.fail(f"weight {weight:g}: the sign election of layermerge's {target} needs a positive weight")
            if not normalize:
                default = "normalize" not in global_params
                self.fail(f"normalize: false{' (the default of ' + method + ')' if default else ''} "
                          f"adds up the agreeing entries (a disjoint sum); layermerge's {target} takes their mean "
                          "(TIES' disjoint mean): set parameters.normalize: true to convert it")
            params["scaling"] = lam
        else:   # mergekit: θ0 + λ Σ w τ_i, divided by Σ w = T·w under normalize (unless |Σ w| < 1e-8)
            count = len(experts)
            params["scaling"] = lam / count if normalize and abs(count * weight) >= 1e-8 else lam * weight
        if sparsification is None:
            for key in ("density", "rescale"):
                if self.given(key, inputs, global_params):
                    self.ignore(key, f"it has no effect in mergekit's {method}")
            return self.layermerge(target, params, base, experts)
        density = self.same([e.values["density"] for e in experts], "density", target, "use one density")
        if sparsification == "magnitude":
            if rescale and density < 1:
                self.fail(f"rescale: true (each trimmed task vector scaled back to its L1 norm): layermerge's "
                          f"{target} does not rescale; remove it")
            params.update(density=min(max(density, 0.0), 1.0), trim="tensor")
        elif sparsification == "random":
            if density <= 0:
                self.fail(f"density {density:g} drops every entry; layermerge's {target} needs density > 0 "
                          "(its drop_rate = 1 − density is below 1)")
            if density < 1 and not rescale:
                self.fail(f"rescale: false (the kept entries not scaled up): layermerge's {target} always rescales "
                          "them by 1/density; remove it")
            params["drop_rate"] = 1.0 - min(density, 1.0)
        elif sparsification == "magprune":
            epsilon = self.same([e.values["epsilon"] for e in experts], "epsilon", target, "use one epsilon")
            if density >= 1:
                self.fail(f"density {density:g} drops nothing (mergekit then skips MAGPRUNE): use "
                          f"{'ties with density 1' if consensus else 'task_arithmetic'} instead")
            if not (density - epsilon > 0 and density + epsilon < 1):
                self.fail(f"density {density:g} ± epsilon {epsilon:g} leaves (0, 1): choose epsilon below "
                          f"{min(density, 1 - density):g} (mergekit refuses it too)")
            params.update(drop_rate=round(1.0 - density, 12), epsilon=epsilon, rescale="l1" if rescale else "none")
        else:
            gamma = self.same([e.values["gamma"] for e in experts], "gamma", target, "use one gamma")
            if rescale and density < 1:
                self.fail(f"rescale: true (each masked task vector scaled back to its L1 norm): layermerge's "
                          f"{target} does not rescale; remove it")
            if density <= 0:
                self.fail(f"density {density:g} keeps nothing; give a density above 0")
            if density >= 1:       # mergekit keeps everything, the gamma outliers included
                top, bottom = 0.0, 0.0
            elif density + gamma <= 1:
                top, bottom = gamma, round(1.0 - density - gamma, 12)
            else:                   # mergekit lowers the outlier cut to keep `density`
                top, bottom = round(1.0 - density, 12), 0.0
            params.update(top_drop=top, bottom_drop=bottom)
        return self.layermerge(target, params, base, experts)

    def linear(self, inputs: list[_Input], base: _Input | None, global_params: dict):
        shared = self.bind("linear", {"weight": ("input", float, _REQUIRED), "normalize": ("shared", bool, True)},
                           inputs, global_params)
        weights = [item.values["weight"] for item in inputs]
        if not shared["normalize"] and abs(sum(weights) - 1.0) > 1e-6:
            self.fail(f"normalize: false with weights summing to {sum(weights):g} (an unnormalised Σ w_i θ_i): "
                      "layermerge's average normalises its weights to sum 1; set normalize: true or make the "
                      "weights sum to 1")
        for item in inputs:
            self.no_lora(item, "linear")
        return {"method": "average", "experts": self.named(inputs), "params": {"weights": weights}}

    def slerp(self, inputs: list[_Input], base: _Input | None, global_params: dict):
        shared = self.bind("slerp", {"t": ("shared", float, _REQUIRED)}, inputs, global_params)
        if base is None:
            self.fail("merge_method 'slerp' needs base_model (its t = 0 endpoint)")
        if len(inputs) != 2:
            self.fail(f"slerp interpolates exactly two models (base_model and one other), got {len(inputs)}")
        for item in inputs:
            self.no_lora(item, "slerp")
        ordered = [base] + [item for item in inputs if item is not base]
        return {"method": "slerp", "experts": self.named(ordered), "params": {"t": shared["t"]}}

    def nuslerp(self, inputs: list[_Input], base: _Input | None, global_params: dict):
        shared = self.bind("nuslerp", {"weight": ("non_base", float, _REQUIRED),
                                       "nuslerp_flatten": ("shared", bool, True),
                                       "nuslerp_row_wise": ("shared", bool, False)}, inputs, global_params)
        experts = [item for item in inputs if not item.is_base]
        if len(experts) != 2:
            self.fail(f"nuslerp interpolates exactly two models besides base_model, got {len(experts)}")
        params = {"weights": [e.values["weight"] for e in experts], "flatten": shared["nuslerp_flatten"],
                  "row_wise": shared["nuslerp_row_wise"]}
        return self.with_optional_base("nuslerp", params, base, experts)

    def multislerp(self, inputs: list[_Input], base: _Input | None, global_params: dict):
        shared = self.bind("multislerp", {"weight": ("non_base", float, _REQUIRED),
                                          "normalize_weights": ("shared", bool, True),
                                          "eps": ("shared", float, 1e-8)}, inputs, global_params)
        experts = [item for item in inputs if not item.is_base]
        if not experts:
            self.fail("no models besides base_model to merge")
        params = {"weights": [e.values["weight"] for e in experts],
                  "normalize_weights": shared["normalize_weights"], "eps": shared["eps"]}
        return self.with_optional_base("multislerp", params, base, experts)

    def karcher(self, inputs: list[_Input], base: _Input | None, global_params: dict):
        """mergekit averages every input, base_model included, so all of them are our experts (no base)."""
        shared = self.bind("karcher", {"max_iter": ("shared", int, 10), "tol": ("shared", float, 1e-5)},
                           inputs, global_params)
        for item in inputs:
            self.no_lora(item, "karcher")
        return {"method": "karcher", "experts": self.named(inputs),
                "params": {"max_iter": shared["max_iter"], "tol": shared["tol"]}}

    def model_stock(self, inputs: list[_Input], base: _Input | None, global_params: dict):
        shared = self.bind("model_stock", {"filter_wise": ("shared", bool, False)}, inputs, global_params)
        experts = self.experts_of(inputs, base, "model_stock", at_least=2)
        return self.layermerge("model_stock", {"filter_wise": shared["filter_wise"]}, base, experts)

    def sce(self, inputs: list[_Input], base: _Input | None, global_params: dict):
        shared = self.bind("sce", {"int8_mask": ("shared", bool, False), "select_topk": ("shared", float, 1.0)},
                           inputs, global_params)
        experts = self.experts_of(inputs, base, "sce", at_least=1)
        return self.layermerge("sce", {"select_topk": min(max(shared["select_topk"], 0.0), 1.0)}, base, experts)

    def experts_of(self, inputs: list[_Input], base: _Input | None, method: str, at_least: int) -> list[_Input]:
        if base is None:
            self.fail(f"merge_method {method!r} needs base_model (the model the task vectors are taken from)")
        experts = [item for item in inputs if not item.is_base]
        if len(experts) < at_least:
            self.fail(f"{method} needs at least {at_least} model(s) besides base_model, got {len(experts)}")
        return experts

    def with_optional_base(self, method: str, params: dict, base: _Input | None, experts: list[_Input]) -> dict:
        """With base_model: task vectors from it (our base); without: the models' weights themselves."""
        if base is not None:
            return self.layermerge(method, params, base, experts)
        for item in experts:
            self.no_lora(item, method)
        return {"method": method, "experts": self.named(experts), "params": params}

    # ------------------------------------------------------------------ output mapping
    def no_lora(self, item: _Input, method: str) -> None:
        if "+" in item.reference:
            self.fail(f"{item.where} is a model with a LoRA adapter ({item.reference}): layermerge applies adapters "
                      f"to the base model, and its {method} merge has none")

    def layermerge(self, method: str, params: dict, base: _Input, experts: list[_Input]) -> dict:
        if "+" in base.reference:
            self.fail(f"base_model has a LoRA adapter ({base.reference}): merge the adapter into it first")
        paths = []
        for item in experts:
            model, _, adapter = item.reference.partition("+")
            if adapter and model != base.reference:
                self.fail(f"{item.where} applies a LoRA adapter to {model}, not to base_model ({base.reference}): "
                          "layermerge applies an expert's adapter to the base model")
            paths.append(adapter or model)
        names = self.named(experts)
        return {"base": base.reference, "experts": dict(zip(names, paths)), "method": method, "params": params}

    def named(self, items: list[_Input]) -> dict[str, str]:
        """Expert names (output folder names) from the models' folder names, made safe and unique."""
        names = {}
        for index, item in enumerate(items):
            path = item.reference.partition("+")[2] or item.reference
            stem = path.split("@")[0].rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
            name = _NAME_CHARACTERS.sub("-", stem).lstrip("._-")[:120] or f"model{index}"
            if name in ("base", "union"):        # layermerge's tokenizer_source keywords
                name += "-model"
            unique, suffix = name, 2
            while unique in names:
                unique, suffix = f"{name}-{suffix}", suffix + 1
            names[unique] = item.reference
            item.values["name"] = unique
        return names

    def dtype(self) -> dict:
        def name(key):
            value = self.mapping.get(key)
            if value is None:
                return None
            if not isinstance(value, str):
                self.fail(f"{key}: expected a dtype name such as bfloat16, got {value!r}")
            return value.removeprefix("torch.")

        compute, saved = name("dtype"), name("out_dtype")
        saved = saved or compute
        if compute is not None and compute != "float32":
            self.ignore(f"dtype: {compute}", "mergekit computes in it; layermerge computes in float32, then saves "
                                             f"{saved}")
        if saved is None:
            return {}
        if saved not in _SAVED_DTYPES:
            self.fail(f"{'out_dtype' if self.mapping.get('out_dtype') else 'dtype'} {saved}: layermerge saves "
                      "float32, bfloat16 or float16")
        return {"dtype": saved}

    def tokenizer(self, method: str, out: dict, inputs: list[_Input], base: _Input | None) -> dict:
        source = self.mapping.get("tokenizer_source")
        tokenizer = self.mapping.get("tokenizer")
        if source is not None and tokenizer is not None:
            self.fail("both tokenizer_source and tokenizer; give one (mergekit refuses both too)")
        where = "tokenizer_source"
        if tokenizer is not None:
            if not isinstance(tokenizer, dict):
                self.fail(f"tokenizer must be a mapping, got {tokenizer!r}")
            if tokenizer.get("tokens"):
                self.fail("tokenizer.tokens (per-token embedding sources) are not supported: layermerge takes an "
                          "added token's row from the experts that have it")
            if tokenizer.get("pad_to_multiple_of") is not None:
                self.fail("tokenizer.pad_to_multiple_of is not supported: layermerge sizes the embedding to the "
                          "output tokenizer")
            for key in tokenizer:
                if key not in ("source", "tokens", "pad_to_multiple_of"):
                    self.ignore(f"tokenizer.{key}", "not a mergekit 0.1.5 key")
            source, where = tokenizer.get("source", "union"), "tokenizer.source"
        if source is None:
            return {}
        if source not in ("base", "union"):
            reference = self.reference(source, where)
            match = next((item for item in inputs if item.reference == reference), None)
            if match is None:
                self.fail(f"{where} {reference!r} is not one of the models merged; layermerge takes the output "
                          "tokenizer from an input")
            source = "base" if match.is_base else match.values.get("name")
        if "base" not in out:    # linear, slerp: no base model on layermerge's side
            if source == "base" and (method == "slerp" or base is not None and inputs[0] is base):
                return {}          # the first input is the base model: layermerge copies its tokenizer anyway
            self.fail(f"{where} {source!r} with {method}: layermerge builds an output vocabulary only for methods "
                      "with a base model")
        return {"tokenizer_source": source}
