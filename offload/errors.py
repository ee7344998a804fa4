"""Exceptions raised by offload. Each message names the file, tensor or argument and what was expected."""


class OffloadError(Exception):
    """Base class of every error offload raises on purpose."""


class CheckpointError(OffloadError, ValueError):
    """A checkpoint is missing, truncated, corrupt, or does not match its config."""


class UnsupportedModelError(OffloadError, ValueError):
    """The checkpoint's model_type (or a config option) is not implemented."""


class GenerationError(OffloadError, ValueError):
    """Invalid generation arguments, or a prompt that does not fit the context."""


class BudgetError(OffloadError, ValueError):
    """A memory budget that cannot be parsed, or that is too small for the model."""


class ArtifactError(OffloadError, ValueError):
    """A profile, predictor or placement file that is invalid or belongs to another model."""


class UsageError(OffloadError, ValueError):
    """Arguments that cannot work, together or on this machine: an unknown or absent device, a dtype or
    weight format offload does not have, a size that must be positive."""
