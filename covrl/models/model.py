"""The policy model: megatron-core ``GPTModel`` chunks of this rank.

:func:`build_model` turns a :class:`~covrl.models.hf_config.PolicyModelConfig` into one
``GPTModel`` per virtual pipeline stage of this rank, with the layer spec of
:func:`layer_spec`.

Layer specs (``transformer_impl``, see :func:`resolve_transformer_impl`):

- ``transformer_engine``: megatron's Transformer Engine spec (fused attention, fused
  norm + linear kernels). Required on CUDA: megatron's local attention materialises the
  ``[b, heads/tp, s, s]`` score matrix, which at 10k-token sequences does not fit next
  to a policy's optimizer state. The pre-attention and pre-MLP norms live inside
  ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``, and TE modules carry an
  ``_extra_state`` entry (FP8 scaling metadata; empty in bf16).
- ``local``: megatron's own modules with torch RMSNorm; the path every CPU test runs.
  On CUDA it is an explicit opt-out (a warning says what it costs).
- ``auto`` (default): ``transformer_engine`` on CUDA, ``local`` on CPU.

Both specs hold the same parameters under different module names;
:mod:`covrl.models.hf_weights` maps both to Hugging Face names, and the distributed
checkpoints of both use the same keys (the local spec saves its norms under the TE
names), so a checkpoint saved with one spec loads into the other
(:mod:`covrl.checkpointing`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from covrl.models.hf_config import PolicyModelConfig, validate_parallel_layout
from covrl.parallel import get_device

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

    from covrl.parallel import ParallelConfig

TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")
# How to get Transformer Engine into an environment pinned by constraints/ (README).
TE_INSTALL_HINT = (
    "pip install --no-build-isolation 'transformer-engine[pytorch,core-cu13]' "
    "-c constraints/gpu-ngc26.06.txt"
)
LOCAL_SPEC_MEMORY_WARNING = (
    "policy.transformer_impl=local on CUDA: megatron's unfused attention keeps the "
    "[batch, heads/tp, seq, seq] score and probability matrices of every layer for the "
    "backward pass (about 7 bytes per head per token pair: ~4.5 GiB per layer for 10k "
    "tokens and 8 heads); long responses will run out of memory"
)


class TransformerEngineUnavailable(ImportError):
    """The Transformer Engine layer spec was required but cannot be used."""


def transformer_engine_import_error() -> BaseException | None:
    """None when Transformer Engine and megatron's TE extension import, else the error
    (a missing package, or a build that does not match this torch: undefined symbols)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as megatron_te
    except Exception as exc:  # noqa: BLE001 - any failure to load is reported as is
        return exc
    if not getattr(megatron_te, "HAVE_TE", False):
        return ImportError("megatron.core.extensions.transformer_engine did not find TE")
    return None


def resolve_transformer_impl(impl: str = "auto", *, cuda: bool | None = None) -> str:
    """The layer spec to build: ``"transformer_engine"`` or ``"local"``.

    ``impl`` is ``policy.transformer_impl``: ``auto`` picks Transformer Engine on CUDA
    (``cuda`` defaults to ``torch.cuda.is_available()``) and the local spec on CPU.
    Transformer Engine, asked for or picked, must import: otherwise
    :class:`TransformerEngineUnavailable` names the exception, the install command and
    the opt-out. ``local`` on CUDA warns about the memory of unfused attention.
    """
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl={impl!r}: expected one of {list(TRANSFORMER_IMPLS)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    resolved = ("transformer_engine" if cuda else "local") if impl == "auto" else impl
    if resolved == "transformer_engine":
        if not cuda:
            raise ValueError(
                "transformer_impl=transformer_engine needs CUDA (no GPU is visible); use "
                "transformer_impl=local or auto on CPU"
            )
        error = transformer_engine_import_error()
        if error is not None:
            cause = " ".join(f"{type(error).__name__}: {error}".split())
            raise TransformerEngineUnavailable(
                f"transformer_impl={impl}: the Transformer Engine layer spec is required on "
                f"CUDA but Transformer Engine cannot be imported ({cause}). Install it "
                f"with `{TE_INSTALL_HINT}`, or opt out with policy.transformer_impl=local "
                "(tools: --transformer-impl local; unfused attention, far more memory)"
            )
    elif cuda:
        # Once per process (same code location), however many models are built.
        warnings.warn(LOCAL_SPEC_MEMORY_WARNING, stacklevel=1)
    return resolved


def layer_spec(transformer_impl: str = "auto"):
    """The GPT layer spec of ``transformer_impl`` (resolved by
    :func:`resolve_transformer_impl`): megatron's Transformer Engine spec, or its local
    modules with :class:`~covrl.models.norm.LocalRMSNorm` and
    :class:`~covrl.models.attention.PackedDotProductAttention`."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from covrl.models.attention import PackedDotProductAttention
    from covrl.models.norm import LocalRMSNorm

    if resolve_transformer_impl(transformer_impl) == "transformer_engine":
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
    transformer_impl: str = "auto",
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
    ``transformer_impl``: the layer spec (``auto``, ``transformer_engine`` or ``local``;
    see :func:`resolve_transformer_impl`).
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
    impl = resolve_transformer_impl(transformer_impl)
    spec = layer_spec(impl)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        vp = vp_stage if vpp is not None else None
        model = GPTModel(
            config=tf_config,
            transformer_layer_spec=_block_spec(spec, tf_config, vp, impl == "transformer_engine"),
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
