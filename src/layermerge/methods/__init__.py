"""Merging methods. Importing this package registers every method."""

from layermerge.methods import (  # noqa: F401
    adamerging,
    breadcrumbs,
    consensus,
    dare,
    della,
    df_merge,
    distillmerge,
    emr,
    fda,
    fda_block,
    fisher,
    iso,
    karcher,
    localize_stitch,
    magmax,
    model_stock,
    neulig,
    np_merge,
    nuslerp,
    opcm,
    pcb,
    pleas,
    prodistill,
    regmean,
    regmean_plusplus,
    sce,
    simple,
    slerp,
    ties,
    tsv,
    wudi,
)
from layermerge.methods.registry import available_methods, get_method, register

__all__ = ["available_methods", "get_method", "register"]
