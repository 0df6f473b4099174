"""layermerge: merge fine-tuned experts into one model, data-free or from a few examples per task.

    >>> import layermerge
    >>> merged = layermerge.merge(base="base/", experts={"sst2": "e1/", "mrpc": "e2/"}, method="ties")
    >>> merged.save("merged/")
"""

__version__ = "0.1.0"

from layermerge.errors import LayermergeError  # noqa: E402
from layermerge.experts import ExpertSet, load_experts  # noqa: E402
from layermerge.hf import load_task_model  # noqa: E402
from layermerge.methods import available_methods  # noqa: E402
from layermerge.pipeline import MergedModel, merge  # noqa: E402

__all__ = ["ExpertSet", "LayermergeError", "MergedModel", "available_methods", "load_experts", "load_task_model",
           "merge", "__version__"]
