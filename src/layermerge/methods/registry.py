"""The method registry: each method declares itself once, and the CLI, config and docs read that.

A method is a class registered with ``@register``. Its nested ``Params`` pydantic model holds typed
parameters with defaults and one-line descriptions; ``layermerge methods`` prints them, the YAML
config validates against them, and ``layermerge.merge(method=..., **params)`` feeds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from layermerge.errors import ConfigError


class MethodParams(BaseModel):
    """Base for every method's parameters: unknown keys are errors, not silently ignored."""

    # No protected namespaces: a parameter may be called model_* (NeuLig's model_mode); older pydantic
    # releases warn about such names otherwise.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type
    summary: str
    needs_data: bool
    kind: str                 # "tensor" (data-free, streamed per tensor), "block" (data-driven, block engine)
    #                           or "model" (data-driven on whole task models: pipeline/strategies/modelwise.py)
    min_experts: int = 1
    max_experts: int | None = None
    needs_base: bool = True

    @property
    def params_model(self) -> type[MethodParams]:
        return self.cls.Params

    def parameters(self) -> list[dict]:
        """One dict per parameter: name, type, default, description, constraints."""
        rows = []
        for name, field in self.params_model.model_fields.items():
            annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
            # bounds (annotated_types Ge, Lt...) are shown; validator functions (regex checks) are not
            constraints = " ".join(str(m) for m in field.metadata if type(m).__module__ == "annotated_types")
            rows.append({
                "name": name, "type": annotation.replace("typing.", ""), "default": field.default,
                "description": field.description or "", "constraints": constraints,
            })
        return rows


_REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, *, summary: str, needs_data: bool = False, kind: str = "tensor",
             min_experts: int = 1, max_experts: int | None = None, needs_base: bool = True):
    """Class decorator that adds a method to the registry under ``name``."""

    def decorator(cls):
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        if not hasattr(cls, "Params"):
            raise RuntimeError(f"method {name!r} must define a nested Params(MethodParams) class")
        _REGISTRY[name] = MethodInfo(name, cls, summary, needs_data, kind, min_experts, max_experts, needs_base)
        cls.method_name = name
        return cls

    return decorator


def available_methods() -> dict[str, MethodInfo]:
    import layermerge.methods  # noqa: F401  (importing the package registers every method)

    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> MethodInfo:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; available methods: {', '.join(methods)}")
    return methods[name]


def validate_params(info: MethodInfo, params: dict) -> MethodParams:
    """Build the method's Params, turning pydantic errors into one readable ConfigError."""
    try:
        return info.params_model(**params)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "(parameters)"
            if error["type"] == "extra_forbidden":
                allowed = ", ".join(info.params_model.model_fields) or "none"
                problems.append(f"unknown parameter {where!r} (allowed: {allowed})")
            else:
                problems.append(f"parameter {where!r}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigError(f"method {info.name!r}: " + "; ".join(problems)) from None
