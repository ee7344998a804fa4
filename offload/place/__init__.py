"""Placement: which FFN neurons are hot (on the accelerator) and what everything else costs.

- :mod:`offload.place.memory`: ``plan_memory(config, ...) → MemoryPlan`` from a config alone.
- :mod:`offload.place.solver`: ``solve_placement(frequencies, neuron_bytes, fixed_bytes, budget, ...,
  layer_bytes=None) → Placement`` (greedy or MILP), a pure function over plain data; ``Placement`` is
  saved as JSON. ``layer_bytes``: what a layer pays once when it holds a hot neuron (packed hot rows).
- :mod:`offload.place.report`: the ``offload report`` table / JSON / plot / roofline estimate.
"""
from offload.place.memory import MemoryPlan, budget_error, classify_tensor, plan_memory
from offload.place.solver import Placement, solve_placement

__all__ = ["MemoryPlan", "Placement", "budget_error", "classify_tensor", "plan_memory", "solve_placement"]
