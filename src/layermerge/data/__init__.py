"""Tasks and their data: specs (built-in or the user's own), loaders (files, a Hugging Face dataset or a
public copy), the K-shot sampler, collation, and the task models that fine-tuning and evaluation build and load."""

from layermerge.data.collate import (
    GenerationCollator,
    ImageCollator,
    Seq2SeqCollator,
    TextCollator,
    length_grouped_batches,
)
from layermerge.data.models import (
    VisionFactory,
    VisionSpec,
    load_model,
    load_tokenizer,
    register_vision_model,
    save_vision_base,
)
from layermerge.data.sampling import sample_few_shot
from layermerge.data.sources import ImageData, TaskData, TextData, find_data_dir, load_split
from layermerge.data.tasks import (
    BUILTIN_TASKS,
    GLUE_TASKS,
    TASKS,
    VISION_TASKS,
    Task,
    get_task,
    parse_task_list,
    task_from_file,
)

__all__ = [
    "BUILTIN_TASKS", "GLUE_TASKS", "TASKS", "VISION_TASKS", "GenerationCollator", "ImageCollator", "Seq2SeqCollator",
    "ImageData", "Task", "TaskData", "TextCollator", "TextData", "VisionFactory", "VisionSpec",
    "find_data_dir", "get_task", "length_grouped_batches", "load_model", "load_split", "load_tokenizer",
    "parse_task_list", "register_vision_model", "sample_few_shot", "save_vision_base", "task_from_file",
]
