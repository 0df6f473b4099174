"""Errors a user can cause. The CLI prints their message and exits with status 2, no traceback."""


class LayermergeError(Exception):
    """Base class: something in the user's input is wrong; the message says what and how to fix it."""


class ConfigError(LayermergeError):
    """The merge config or a method parameter is invalid."""


class CheckpointError(LayermergeError):
    """A checkpoint file or folder cannot be read."""


class IncompatibleExpertsError(LayermergeError):
    """The base and experts cannot be merged together (keys, shapes, dtypes, model types...)."""


class OutputError(LayermergeError):
    """The output location is unsafe or already exists."""


class DataError(LayermergeError):
    """A task's data cannot be found or is empty/malformed."""
