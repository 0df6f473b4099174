"""Merging methods. Importing this package registers every method."""

from layermerge.methods import simple  # noqa: F401
from layermerge.methods.registry import available_methods, get_method, register

__all__ = ["available_methods", "get_method", "register"]
