"""offload: run LLMs faster than dense offloading by keeping hot FFN neurons on the GPU and
computing cold ones on the CPU. Pipeline: profile → predict → place → run.

>>> from offload import OffloadedModel
>>> m = OffloadedModel.from_pretrained()  # doctest: +SKIP
"""
from offload.api import OffloadedModel
from offload.errors import (ArtifactError, BudgetError, CheckpointError, GenerationError, OffloadError,
                            UnsupportedModelError)

__version__ = "0.1.0"
__all__ = ["OffloadedModel", "OffloadError", "CheckpointError", "UnsupportedModelError", "GenerationError",
           "BudgetError", "ArtifactError", "__version__"]
