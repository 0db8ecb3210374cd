"""Megatron-Core ``GPTModel`` from a Hugging Face Llama / Qwen2 configuration.

:class:`PolicyModelConfig` is the architecture read from a Hugging Face ``config.json``
(Llama and Qwen2/Qwen2.5 families), checked for the features megatron-core's GPT model
reproduces exactly, and converted to megatron-core's ``TransformerConfig``.
:func:`validate_parallel_layout` checks it against a TP/PP/VPP layout before anything
is allocated; :func:`covrl.models.build_model` (:mod:`covrl.models.model`) builds the
model from it.

Correspondence (Hugging Face -> megatron-core):

=================================  ================================================
``num_hidden_layers``              ``num_layers``
``hidden_size``                    ``hidden_size``
``intermediate_size``              ``ffn_hidden_size`` (SwiGLU: ``gated_linear_unit``)
``num_attention_heads``            ``num_attention_heads``
``num_key_value_heads``            ``num_query_groups``
``head_dim``                       ``kv_channels``
``rms_norm_eps``                   ``layernorm_epsilon`` (``normalization="RMSNorm"``)
``rope_parameters.rope_theta``     ``rotary_base`` (rope type "default" only)
``tie_word_embeddings``            ``share_embeddings_and_output_weights``
``max_position_embeddings``        ``max_sequence_length``
qwen2: q/k/v biases                ``add_qkv_bias=True`` (no other biases)
``vocab_size``                     padded to a multiple of
                                   ``make_vocab_size_divisible_by * tp``
=================================  ================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig
    from transformers import PretrainedConfig

    from covrl.parallel import ParallelConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(value: Any, field_name: str) -> torch.dtype:
    """A parameter dtype from a ``torch.dtype`` or its name (``"bfloat16"``,
    ``"torch.float16"``, ``"half"``...); ValueError naming ``field_name`` unless it is
    float32, bfloat16 or float16."""
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        dtype = _DTYPES[value.removeprefix("torch.")]
    else:
        raise ValueError(f"{field_name}={value!r}: expected one of float32, bfloat16, float16")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{field_name}={dtype}: expected one of float32, bfloat16, float16")
    return dtype


def vocab_size_with_padding(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padded vocabulary: the next multiple of ``divisible_by * tp_size``.

    Every TP rank then holds ``padded / tp_size`` rows of the embedding and the output
    layer, and the row count per rank stays a multiple of ``divisible_by``.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size}: expected >= 1")
    if divisible_by < 1:
        raise ValueError(f"make_vocab_size_divisible_by={divisible_by}: expected >= 1")
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class PolicyModelConfig:
    """A Llama / Qwen2 decoder as megatron-core's ``GPTModel`` builds it.

    Construct with :meth:`from_hf`. Layout-independent: the padded vocabulary and the
    ``TransformerConfig`` depend on the parallel layout and come from methods.
    """

    model_type: str  # "llama" or "qwen2"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int  # the true (unpadded) vocabulary of the checkpoint
    max_position_embeddings: int
    rotary_base: float
    layernorm_epsilon: float
    add_qkv_bias: bool
    tie_word_embeddings: bool
    params_dtype: torch.dtype
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    # The Hugging Face config this was read from; written back by checkpoint export.
    hf_config: PretrainedConfig | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(
        cls,
        source: str | os.PathLike | dict | PretrainedConfig,
        *,
        params_dtype: torch.dtype | str | None = None,
        make_vocab_size_divisible_by: int = 128,
    ) -> PolicyModelConfig:
        """Read a Hugging Face config: a checkpoint directory, a ``config.json`` path,
        a ``config.json`` dict, or a ``transformers.PretrainedConfig``.

        ``params_dtype`` overrides the checkpoint's ``dtype`` (``torch_dtype`` in older
        files; float32 when absent). Raises ``ValueError`` naming the offending field
        for anything megatron-core's GPT model would not reproduce exactly.
        """
        hf = _to_hf_config(source)
        get = hf.to_dict().get

        def require(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(
                    f"{hf.model_type} config field {name}={get(name)!r} is not supported: "
                    f"expected {expected}"
                )

        model_type = hf.model_type
        require("hidden_act", get("hidden_act") == "silu", "'silu' (SwiGLU MLP)")
        rope = get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"{model_type} config field rope_scaling / rope_parameters.rope_type="
                f"{rope_type!r} is not supported: expected None / 'default' (plain RoPE)"
            )
        require(
            "rope_parameters",
            rope.get("partial_rotary_factor", 1.0) == 1.0,
            "partial_rotary_factor 1.0",
        )
        if get("layer_types") is not None:
            require(
                "layer_types",
                all(t == "full_attention" for t in get("layer_types")),
                "'full_attention' for every layer",
            )
        if model_type == "llama":
            require("attention_bias", not get("attention_bias", False), "False")
            require("mlp_bias", not get("mlp_bias", False), "False")
        else:
            require("use_sliding_window", not get("use_sliding_window", False), "False")

        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        head_dim = get("head_dim") or hidden // heads
        require(
            "head_dim",
            get("head_dim") is not None or hidden % heads == 0,
            f"hidden_size={hidden} divisible by num_attention_heads={heads}",
        )
        groups = get("num_key_value_heads") or heads
        require(
            "num_key_value_heads",
            heads % groups == 0,
            f"a divisor of num_attention_heads={heads}",
        )
        if params_dtype is not None:
            dtype = parse_dtype(params_dtype, "params_dtype")
        else:
            raw = get("dtype") or get("torch_dtype") or "float32"
            dtype = parse_dtype(raw, "dtype")
        return cls(
            model_type=model_type,
            num_layers=get("num_hidden_layers"),
            hidden_size=hidden,
            ffn_hidden_size=get("intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=head_dim,
            vocab_size=get("vocab_size"),
            max_position_embeddings=get("max_position_embeddings"),
            rotary_base=float(rope.get("rope_theta", get("rope_theta") or 10000.0)),
            layernorm_epsilon=get("rms_norm_eps"),
            add_qkv_bias=model_type == "qwen2",
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            params_dtype=dtype,
            init_method_std=get("initializer_range") or 0.02,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            hf_config=hf,
        )

    # ------------------------------------------------------------------ derived sizes
    def padded_vocab_size(self, tp_size: int) -> int:
        """Rows of the embedding / output layer across all TP ranks (pad rows at the end)."""
        return vocab_size_with_padding(self.vocab_size, self.make_vocab_size_divisible_by, tp_size)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face tensor of the model, in export order, with its full shape.

        Order: ``model.embed_tokens.weight``; per layer ``input_layernorm``, ``q/k/v_proj``
        (weights, then biases for qwen2), ``o_proj``, ``post_attention_layernorm``,
        ``gate_proj``, ``up_proj``, ``down_proj``; ``model.norm.weight``; then
        ``lm_head.weight`` unless the embeddings are tied.
        """
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (q, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            if self.add_qkv_bias:
                shapes[p + "self_attn.q_proj.bias"] = (q,)
                shapes[p + "self_attn.k_proj.bias"] = (kv,)
                shapes[p + "self_attn.v_proj.bias"] = (kv,)
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (f, h)
            shapes[p + "mlp.up_proj.weight"] = (f, h)
            shapes[p + "mlp.down_proj.weight"] = (h, f)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def to_hf_config(self) -> PretrainedConfig:
        """A transformers config for this model (a copy of the one it was read from, or
        one built from the fields)."""
        import copy

        from transformers import AutoConfig

        if self.hf_config is not None:
            return copy.deepcopy(self.hf_config)
        return AutoConfig.for_model(
            self.model_type,
            num_hidden_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rotary_base},
            rms_norm_eps=self.layernorm_epsilon,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.init_method_std,
            hidden_act="silu",
            dtype=str(self.params_dtype).removeprefix("torch."),
        )

    # ------------------------------------------------------------------ megatron config
    def transformer_config(
        self, parallel: ParallelConfig | None = None, **overrides: Any
    ) -> TransformerConfig:
        """The megatron-core ``TransformerConfig`` for this model under ``parallel``.

        Dropout is 0 (log-probs must match the rollout engine exactly). ``overrides``
        are passed through to ``TransformerConfig`` (recomputation, fusions, ...).
        """
        import torch.nn.functional as F
        from megatron.core.transformer import TransformerConfig

        from covrl.parallel import ParallelConfig

        parallel = parallel or ParallelConfig()
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.layernorm_epsilon,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            params_dtype=self.params_dtype,
            bf16=self.params_dtype == torch.bfloat16,
            fp16=self.params_dtype == torch.float16,
            pipeline_dtype=self.params_dtype,
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            # Parameters are created on the host, then moved; the only way on CPU.
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


def _to_hf_config(source: str | os.PathLike | dict | PretrainedConfig) -> PretrainedConfig:
    """Normalise ``source`` to a transformers config (which fills the family's defaults
    and turns legacy ``rope_theta``/``rope_scaling`` into ``rope_parameters``)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        model_type = source.model_type
    else:
        if isinstance(source, (str, os.PathLike)):
            import json

            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path) as f:
                    source = json.load(f)
            except ValueError as exc:  # JSONDecodeError does not name the file
                raise ValueError(f"{path}: not valid JSON ({exc})") from exc
            if not isinstance(source, dict):
                raise ValueError(f"{path}: expected a JSON object")
        model_type = source.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config field model_type={model_type!r} is not supported: expected one of "
            f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)}"
        )
    if isinstance(source, PretrainedConfig):
        return source
    kwargs = {k: v for k, v in source.items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **kwargs)


def validate_parallel_layout(
    config: PolicyModelConfig, parallel: ParallelConfig, world_size: int | None = None
) -> None:
    """Check that ``config`` can be split as ``parallel`` describes (before allocation).

    Megatron requirements checked: attention heads and the MLP width split evenly over
    TP; query groups a multiple of TP (each rank owns whole groups) or a divisor of it
    (ranks of one group share its K/V heads); layers split evenly over
    ``pp * vpp`` model chunks; ``world_size`` a multiple of ``tp * pp``.
    """
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    if world_size is not None:
        parallel.check_world_size(world_size)
    c = config
    if c.num_attention_heads % tp:
        raise ValueError(
            f"num_attention_heads={c.num_attention_heads} must be divisible by "
            f"tensor_model_parallel_size={tp}"
        )
    if c.num_query_groups % tp and tp % c.num_query_groups:
        raise ValueError(
            f"num_query_groups (num_key_value_heads)={c.num_query_groups} must be a multiple "
            f"or a divisor of tensor_model_parallel_size={tp}"
        )
    if c.ffn_hidden_size % tp:
        raise ValueError(
            f"ffn_hidden_size (intermediate_size)={c.ffn_hidden_size} must be divisible by "
            f"tensor_model_parallel_size={tp}"
        )
    chunks = pp * vpp
    if c.num_layers % chunks:
        raise ValueError(
            f"num_layers (num_hidden_layers)={c.num_layers} must be divisible by "
            f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = "
            f"{pp} x {vpp} = {chunks}"
        )
    padded = c.padded_vocab_size(tp)  # also checks vocab_size and the divisor
    if padded % tp:  # cannot happen by construction; guards future changes
        raise ValueError(f"padded vocab_size={padded} not divisible by tp={tp}")
