"""Merging methods. Importing this package registers every method."""

from layermerge.methods import (  # noqa: F401
    breadcrumbs,
    consensus,
    dare,
    distillmerge,
    emr,
    magmax,
    pcb,
    prodistill,
    simple,
    slerp,
    ties,
)
from layermerge.methods.registry import available_methods, get_method, register

__all__ = ["available_methods", "get_method", "register"]
