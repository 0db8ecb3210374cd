"""Scaling a run to a GPU cluster: the per-GPU memory model used to choose TP/PP and vLLM
settings, and the plan printed before a Slurm job starts.

- :mod:`covrl.scaling.params`: parameter and byte counts of a model per GPU;
- :mod:`covrl.scaling.memory`: :class:`Layout`, :func:`estimate_memory` (what each term
  is and what is not modelled);
- :mod:`covrl.scaling.published`: :func:`model_config`, with the paper's base models'
  published configs when the weights are not downloaded yet;
- :mod:`covrl.scaling.cli`: ``python -m covrl.scaling`` (the Slurm dry run calls it).
"""

from covrl.scaling.memory import GIB, Layout, MemoryEstimate, estimate_memory
from covrl.scaling.params import (
    activation_bytes_per_token_layer,
    kv_bytes_per_token,
    layer_params,
    stage_params,
    total_params,
)
from covrl.scaling.published import PUBLISHED_CONFIGS, model_config

__all__ = [
    "GIB",
    "PUBLISHED_CONFIGS",
    "Layout",
    "MemoryEstimate",
    "activation_bytes_per_token_layer",
    "estimate_memory",
    "kv_bytes_per_token",
    "layer_params",
    "model_config",
    "stage_params",
    "total_params",
]
