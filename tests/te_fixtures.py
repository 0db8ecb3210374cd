"""A CPU stand-in for megatron's Transformer Engine layer spec: a local-spec ``GPTModel``
re-shaped into the module tree, parameter names and state-dict entries the TE spec has.

What the TE spec (``get_gpt_layer_with_transformer_engine_spec`` with TE 2.x) looks like,
and what :func:`to_te_layout` reproduces on a built local-spec model:

- ``input_layernorm`` / ``pre_mlp_layernorm`` are ``IdentityOp``; their RMSNorm weights
  are ``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``
  (``TELayerNormColumnParallelLinear`` normalises its input, then projects).
- every TE module returns an ``_extra_state`` from ``get_extra_state``: an empty uint8
  tensor without FP8, and accepts None or an empty tensor in ``set_extra_state``. The
  linear layers' and the final norm's are saved as ``ShardedObject`` (megatron's
  ``make_sharded_tensors_for_checkpoint`` over the module's ``state_dict``); the core
  attention's is in ``state_dict`` but not in the sharded state dict
  (``TEDotProductAttention.sharded_state_dict`` returns nothing without a learnable
  softmax offset).

The local spec's linear layers have an ``_extra_state`` of None, its attention and norms
none. The forward pass is unchanged: fused norm + linear computes exactly what the local
norm followed by the local linear computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EMPTY_EXTRA_STATE_DTYPE = torch.uint8


class _TEExtraState:
    """TE's ``get_extra_state`` / ``set_extra_state`` without FP8 (mixin)."""

    loaded_extra_states: list  # what set_extra_state received, newest last

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=EMPTY_EXTRA_STATE_DTYPE)

    def set_extra_state(self, state) -> None:
        if state is not None and not (isinstance(state, torch.Tensor) and state.numel() == 0):
            raise ValueError(f"unexpected FP8 extra state {state!r}")
        self.__dict__.setdefault("loaded_extra_states", []).append(state)


def _fused_norm_linear(linear: torch.nn.Module, norm: torch.nn.Module) -> None:
    """Turn ``linear`` into a TELayerNormColumnParallelLinear look-alike owning ``norm``'s
    weight as ``layer_norm_weight`` (the same Parameter object)."""
    base = type(linear)

    class TELayerNormColumnParallelLinear(_TEExtraState, base):
        def forward(self, x, *args, **kwargs):
            x = F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.normalization_eps)
            return base.forward(self, x, *args, **kwargs)

    linear.__class__ = TELayerNormColumnParallelLinear
    linear.register_parameter("layer_norm_weight", norm.weight)
    linear.normalization_eps = norm.eps


def _with_extra_state(module: torch.nn.Module, *, sharded: bool = True) -> None:
    base = type(module)
    attrs: dict = {}
    if not sharded:
        attrs["sharded_state_dict"] = lambda self, prefix="", sharded_offsets=(), metadata=None: {}
    module.__class__ = type(f"TE{base.__name__}", (_TEExtraState, base), attrs)


def to_te_layout(chunk: torch.nn.Module) -> torch.nn.Module:
    """Re-shape a bare local-spec ``GPTModel`` chunk in place into the TE spec's layout
    (see the module docstring); returns it."""
    from megatron.core.transformer.identity_op import IdentityOp

    for layer in chunk.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        _fused_norm_linear(attn.linear_qkv, layer.input_layernorm)
        _fused_norm_linear(mlp.linear_fc1, layer.pre_mlp_layernorm)
        layer.input_layernorm = IdentityOp()
        layer.pre_mlp_layernorm = IdentityOp()
        _with_extra_state(attn.linear_proj)
        _with_extra_state(mlp.linear_fc2)
        _with_extra_state(attn.core_attention, sharded=False)
    if getattr(chunk.decoder, "final_layernorm", None) is not None:
        _with_extra_state(chunk.decoder.final_layernorm)
    return chunk
