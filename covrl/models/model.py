"""The policy model: megatron-core ``GPTModel`` chunks of this rank.

:func:`build_model` turns a :class:`~covrl.models.hf_config.PolicyModelConfig` into one
``GPTModel`` per virtual pipeline stage of this rank, with the layer spec of
:func:`layer_spec`.

Layer specs: on CUDA with Transformer Engine importable, megatron's Transformer Engine
spec (fused attention / linear / norm kernels); otherwise megatron's local modules with
torch RMSNorm, the path every CPU test runs. The two specs hold the same parameters
under different module names, which :mod:`covrl.models.hf_weights` maps; the
Transformer Engine path is the one never executed on a CPU-only machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from covrl.models.hf_config import PolicyModelConfig, validate_parallel_layout
from covrl.parallel import get_device

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

    from covrl.parallel import ParallelConfig


def use_transformer_engine() -> bool:
    """Whether the Transformer Engine layer spec can be used (TE importable and CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def layer_spec(transformer_engine: bool | None = None):
    """The GPT layer spec: Transformer Engine when available, else megatron's local
    modules with torch RMSNorm and :class:`~covrl.models.attention.PackedDotProductAttention`."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from covrl.models.attention import PackedDotProductAttention
    from covrl.models.norm import LocalRMSNorm

    if transformer_engine is None:
        transformer_engine = use_transformer_engine()
    if transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    # Packed (THD) sequences on the local spec too (TE's attention handles them on CUDA),
    # and norms that allow sequence parallelism (megatron's local fallback refuses it).
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    spec.submodules.input_layernorm = LocalRMSNorm
    spec.submodules.pre_mlp_layernorm = LocalRMSNorm
    return spec


def _block_spec(spec, tf_config, vp_stage: int | None, transformer_engine: bool):
    """The decoder's spec: the layer spec per layer of this stage and, on the local
    spec, the final norm too as :class:`~covrl.models.norm.LocalRMSNorm`."""
    if transformer_engine:
        return spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from covrl.models.norm import LocalRMSNorm

    layers = get_num_layers_to_build(tf_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=LocalRMSNorm)


def build_model(
    config: PolicyModelConfig,
    parallel: ParallelConfig | None = None,
    *,
    transformer_engine: bool | None = None,
    **transformer_overrides: Any,
) -> list[GPTModel]:
    """Build this rank's model chunks: one ``GPTModel`` per virtual pipeline stage.

    Megatron-core's parallel state must be initialised with the same layout
    (``covrl.parallel.initialize(parallel)``); ``parallel`` defaults to it. Chunk ``v``
    of pipeline rank ``p`` holds the layers megatron assigns to ``(p, v)``; it has the
    embedding when ``p == 0 and v == 0`` (``pre_process``) and the final norm and
    output layer when ``p`` and ``v`` are the last (``post_process``). With tied
    embeddings and PP > 1 the last stage keeps its own copy of the word embeddings as
    ``output_layer.weight``. Parameters are randomly initialised; load weights with
    :func:`covrl.models.load_hf_weights`. The output layer returns vocab-parallel
    logits ``[b, s, padded_vocab / tp]``. With a bf16/fp16 ``params_dtype`` the local
    spec's norms are still created in float32: wrap the chunks in megatron's
    ``Float16Module`` (as Megatron-LM's ``get_model`` does) to cast them.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from covrl.parallel import ParallelConfig

    if parallel is None:
        parallel = ParallelConfig(
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        )
    world = dist.get_world_size() if dist.is_initialized() else None
    validate_parallel_layout(config, parallel, world)
    tp = parallel.tensor_model_parallel_size
    wanted = (
        tp,
        parallel.pipeline_model_parallel_size,
        parallel.virtual_pipeline_model_parallel_size,
    )
    state = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    )
    if state != wanted:
        raise ValueError(
            f"parallel layout (tp, pp, vpp) = {wanted} does not match the initialised "
            f"parallel state {state}"
        )
    tf_config = config.transformer_config(parallel, **transformer_overrides)
    if transformer_engine is None:
        transformer_engine = use_transformer_engine()
    spec = layer_spec(transformer_engine)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        vp = vp_stage if vpp is not None else None
        model = GPTModel(
            config=tf_config,
            transformer_layer_spec=_block_spec(spec, tf_config, vp, transformer_engine),
            vocab_size=config.padded_vocab_size(tp),
            max_sequence_length=config.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=config.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=config.rotary_base,
            vp_stage=vp,
        )
        if get_device().type == "cuda":
            # As Megatron-LM's get_model: layers built outside megatron's tensor-parallel
            # modules (norms, buffers) are created on the host.
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
