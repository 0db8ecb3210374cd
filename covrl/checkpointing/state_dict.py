"""The sharded state dict a checkpoint saves and loads.

Keys of the nested dict (values are sharded by megatron-core):

    ``model`` (one chunk) or ``model0`` .. ``model{V-1}`` (virtual pipeline chunks):
        ``chunk.sharded_state_dict()``
    ``optimizer``: ``optimizer.sharded_state_dict(model state)`` (Adam moments and fp32
        main parameters keyed by their parameter's global key; the step in common). The
        distributed optimizer's state is saved in megatron's ``fully_reshardable``
        layout (per parameter, like the plain optimizer's), so it too loads at any
        layout, also with another data-parallel size or without the distributed
        optimizer.
    ``opt_param_scheduler``: ``scheduler.state_dict()``

Tensors are stored under the *global* keys of the models' ``sharded_state_dict()``
(layer numbers include the PP / VPP offset, TP shards are pieces of one global tensor),
so a checkpoint saved at one TP / PP / VPP layout loads at any other layout the model
supports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from covrl.models.hf_weights import unwrap_model


def _model_keys(num_chunks: int) -> list[str]:
    # Megatron-LM's names; only the nesting, the tensors are found by their global keys.
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _sharded_state_dict(
    model_chunks: Sequence[torch.nn.Module], optimizer, scheduler, *, is_loading: bool
) -> dict[str, Any]:
    # Keys of the bare GPTModel: wrappers (DDP, Float16Module) must not change them.
    state: dict[str, Any] = {
        key: unwrap_model(chunk).sharded_state_dict()
        for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks, strict=True)
    }
    if optimizer is not None:
        # The optimizer's state is keyed by its parameters' sharded tensors.
        model_state = {k: state[k] for k in _model_keys(len(model_chunks))}
        kwargs = {}
        distributed = _distributed_optimizers(optimizer)
        if distributed:
            kwargs["metadata"] = {"distrib_optim_sharding_type": "fully_reshardable"}
        if is_loading:
            for inner in distributed:
                if not inner.optimizer.state:
                    # A fresh distributed optimizer has no Adam state (nor step) to load
                    # into yet; megatron fills it with placeholders that the load
                    # overwrites, as it does for its own FSDP checkpoints.
                    inner._init_optimizer_states_with_dummy_values()
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, **kwargs
        )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def _distributed_optimizers(optimizer) -> list:
    """The megatron ``DistributedOptimizer``s in ``optimizer`` (chained or not)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]
