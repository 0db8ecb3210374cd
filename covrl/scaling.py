"""Per-GPU memory of a covrl run: a documented model used to choose TP/PP and vLLM settings.

A colocated run alternates two phases on every GPU, and each must fit:

* **train** (vLLM asleep: sleep mode releases its weights and KV cache)::

      weights + gradients + optimizer states + activations

* **rollout** (the Megatron state stays resident, vLLM is awake)::

      weights + gradients + optimizer states + gpu_memory_utilization * GPU memory

  where vLLM's share holds its weight shard and, in the rest, the KV cache.

The terms, per GPU, for ``P`` parameters on the largest pipeline stage of a TP x PP
layout (Megatron mixed precision as :class:`covrl.models.PolicyEngine` sets it up:
bf16 parameters, fp32 gradient buffer, fp32 main parameters and Adam moments):

* weights ``2 P``; gradients ``4 P``; optimizer ``12 P`` (``12 P / DP`` with Megatron's
  distributed optimizer, which the engine does not enable today).
* activations of one micro-batch of ``b`` sequences of ``s`` tokens, per transformer
  layer and token, in bytes (bf16, flash attention: no ``[s, s]`` score matrix is kept,
  no dropout masks since Qwen2 uses no dropout, no sequence parallelism, no
  recomputation)::

      8 h                           norm-1 input, QKV input, norm-2 input, FC1 input
                                    (replicated over TP)
      + (4 h + 4 g d + 6 f) / t     Q, K, V and attention output, FC1 output (gate and
                                    up, 2 f), SwiGLU output (f), sharded over TP

  with hidden ``h``, FFN ``f``, ``g`` key/value heads of size ``d``, TP size ``t``
  (``g >= t`` assumed: with fewer K/V heads than TP ranks they are replicated and
  these counts are slightly low).
  Under the 1F1B schedule the first pipeline stage holds ``pp`` micro-batches of
  ``L / pp`` layers, i.e. ``L`` layers' worth of one micro-batch (times
  ``1 + (pp - 1) / (pp * vpp)`` when interleaved; Korthikanti et al., 2022). The last
  stage also keeps the ``[s * b, V / t]`` logits in bf16 and their fp32 gradient
  (``6 s b V / t``); both are added, a conservative bound.
* vLLM: its weight shard ``2 P_total / r`` for vLLM TP size ``r``; the KV cache is the
  rest of its budget, ``2 * L * (g / r) * d * 2`` bytes per token per GPU.

Not modelled: the CUDA context, NCCL buffers and allocator fragmentation (a plan
``fits`` only with ``reserve_gib``, default 4 GiB, left free), vLLM's activation and
CUDA-graph memory (inside its budget, taken from the KV cache).

``python -m covrl.scaling --config examples/qwen2.5-32b_kl_cov.yaml --nodes 4
--gpus-per-node 8 [key=value ...]`` prints the layout and the estimate; the Slurm dry
run (``COVRL_DRY_RUN=1``) calls it.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from covrl.models.hf_config import PolicyModelConfig

GIB = 2**30

__all__ = [
    "PUBLISHED_CONFIGS",
    "Layout",
    "MemoryEstimate",
    "estimate_memory",
    "main",
    "model_config",
]


# Parameter and memory counts of a PolicyModelConfig (Qwen2/Llama: SwiGLU MLP, grouped-
# query attention, RMSNorm); vocabulary padded as megatron pads it.
def layer_params(model: PolicyModelConfig) -> int:
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if model.add_qkv_bias else 0)
    return attn + 3 * h * f + 2 * h  # SwiGLU (gate, up, down) and two RMSNorms


def total_params(model: PolicyModelConfig, tp: int | None = None) -> int:
    """All parameters; with ``tp``, the vocabulary padded for that TP size."""
    vocab = model.vocab_size if tp is None else model.padded_vocab_size(tp)
    n_emb = 1 if model.tie_word_embeddings else 2
    return (
        model.num_layers * layer_params(model)
        + n_emb * vocab * model.hidden_size
        + model.hidden_size
    )


def stage_params(model: PolicyModelConfig, tp: int, pp: int) -> int:
    """Parameters on one GPU of the largest pipeline stage (first or last)."""
    h = model.hidden_size
    emb = model.padded_vocab_size(tp) * h // tp
    if pp == 1:
        embeddings = emb * (1 if model.tie_word_embeddings else 2) + h
    else:
        # First stage: input embedding; last stage: output layer (a copy when tied) and
        # the final norm.
        embeddings = emb + h
    norms = 2 * h  # replicated over TP
    layers = math.ceil(model.num_layers / pp)
    return layers * ((layer_params(model) - norms) // tp + norms) + embeddings


def activation_bytes_per_token_layer(model: PolicyModelConfig, tp: int) -> int:
    h, f = model.hidden_size, model.ffn_hidden_size
    gd = model.num_query_groups * model.head_dim
    return 8 * h + (4 * h + 4 * gd + 6 * f) // tp


def kv_bytes_per_token(model: PolicyModelConfig, vllm_tp: int) -> int:
    """bf16 K and V of every layer for one token, on one GPU of a vLLM TP group."""
    heads = max(1, model.num_query_groups // vllm_tp)  # replicated when g < r
    return 2 * model.num_layers * heads * model.head_dim * 2


_QWEN25 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "attention_dropout": 0.0, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152064,
    "max_position_embeddings": 131072,
}  # fmt: skip
# The published config.json values of the paper's base models (the fields that matter).
PUBLISHED_CONFIGS: dict[str, dict] = {
    "qwen2.5-7b": {
        **_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    },
    "qwen2.5-32b": {
        **_QWEN25, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
        "num_attention_heads": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    },
}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    micro_batch_size: int
    seq_length: int
    vllm_tp: int
    gpu_memory_utilization: float
    vpp: int | None = None
    gpu_memory_gib: float = 80.0
    distributed_optimizer: bool = False
    # Not modelled, kept free: CUDA context, NCCL buffers, allocator fragmentation.
    reserve_gib: float = 4.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def validate(self, model: PolicyModelConfig) -> None:
        from covrl.models.hf_config import validate_parallel_layout
        from covrl.parallel import ParallelConfig

        validate_parallel_layout(model, ParallelConfig(self.tp, self.pp, self.vpp), self.world_size)
        if self.world_size % self.vllm_tp:
            raise ValueError(f"vLLM tp={self.vllm_tp} must divide the world size {self.world_size}")
        if not 0 < self.gpu_memory_utilization < 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} not in (0, 1)")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (see the module docstring for each term)."""

    params_per_gpu: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    vllm_budget: int
    vllm_weights: int
    kv_cache: int
    kv_tokens: int
    gpu_memory: int
    reserve: int

    @property
    def training_state(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def train_phase(self) -> int:
        return self.training_state + self.activations

    @property
    def rollout_phase(self) -> int:
        return self.training_state + self.vllm_budget

    @property
    def fits(self) -> bool:
        peak = max(self.train_phase, self.rollout_phase) + self.reserve
        return peak <= self.gpu_memory and self.kv_cache > 0

    def table(self) -> str:
        g = lambda n: f"{n / GIB:8.1f} GiB"  # noqa: E731
        rows = [
            ("parameters on the largest stage", f"{self.params_per_gpu / 1e9:8.2f} B"),
            ("weights (bf16)", g(self.weights)),
            ("gradients (fp32 buffer)", g(self.gradients)),
            ("optimizer (fp32 main + Adam m, v)", g(self.optimizer)),
            ("activations (1F1B, first stage)", g(self.activations)),
            ("= train phase", g(self.train_phase)),
            ("vLLM budget (utilization x GPU)", g(self.vllm_budget)),
            ("  vLLM weights", g(self.vllm_weights)),
            ("  KV cache", g(self.kv_cache) + f"  ({self.kv_tokens:,} tokens per replica)"),
            ("= rollout phase (state + vLLM)", g(self.rollout_phase)),
            ("reserve (CUDA context, NCCL, fragments)", g(self.reserve)),
            ("GPU memory", g(self.gpu_memory)),
            ("fits", "     yes" if self.fits else "      NO"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def estimate_memory(model: PolicyModelConfig, layout: Layout) -> MemoryEstimate:
    """Per-GPU memory of ``model`` trained and sampled with ``layout``."""
    layout.validate(model)
    tp, pp = layout.tp, layout.pp
    p = stage_params(model, tp, pp)
    optimizer = 12 * p // (layout.dp if layout.distributed_optimizer else 1)
    tokens = layout.micro_batch_size * layout.seq_length
    interleave = 1.0
    if layout.vpp and pp > 1:
        interleave = 1 + (pp - 1) / (pp * layout.vpp)
    layers = model.num_layers * interleave
    activations = math.ceil(layers * tokens * activation_bytes_per_token_layer(model, tp))
    activations += 6 * tokens * model.padded_vocab_size(tp) // tp
    gpu = int(layout.gpu_memory_gib * GIB)
    budget = int(layout.gpu_memory_utilization * gpu)
    vllm_weights = 2 * total_params(model) // layout.vllm_tp
    kv = budget - vllm_weights
    return MemoryEstimate(
        params_per_gpu=p,
        weights=2 * p,
        gradients=4 * p,
        optimizer=optimizer,
        activations=activations,
        vllm_budget=budget,
        vllm_weights=vllm_weights,
        kv_cache=kv,
        kv_tokens=max(0, kv) // kv_bytes_per_token(model, layout.vllm_tp),
        gpu_memory=gpu,
        reserve=int(layout.reserve_gib * GIB),
    )


def model_config(model_path: str) -> PolicyModelConfig:
    """The model at ``<model_path>/config.json``; else a published config matched by the
    directory name (so a plan can be printed before the weights are downloaded)."""
    if (Path(model_path) / "config.json").is_file():
        return PolicyModelConfig.from_hf(model_path)
    name = Path(model_path.rstrip("/")).name.lower()
    for key, config in PUBLISHED_CONFIGS.items():
        if name.startswith(key):
            return PolicyModelConfig.from_hf(config)
    raise ValueError(
        f"policy.model_path={model_path}: no config.json there and no published config for "
        f"{name!r} (built in: {', '.join(PUBLISHED_CONFIGS)})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m covrl.scaling",
        description="Print a run's parallel layout and per-GPU memory estimate.",
    )
    parser.add_argument("--config", required=True, help="run config YAML (examples/...)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)

    from covrl.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        model = model_config(cfg.policy.model_path)
        layout = Layout(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            tp=cfg.policy.tp,
            pp=cfg.policy.pp,
            vpp=cfg.policy.vpp,
            micro_batch_size=cfg.policy.engine.micro_batch_size,
            seq_length=cfg.data.max_prompt_length + cfg.sampling.max_tokens,
            vllm_tp=cfg.rollout.tensor_parallel_size,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization or 0.5,
            gpu_memory_gib=args.gpu_memory_gib,
        )
        dp = cfg.check_layout(layout.world_size)
        est = estimate_memory(model, layout)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"layout: {layout.nodes} nodes x {layout.gpus_per_node} GPUs = {layout.world_size}; "
        f"train TP={layout.tp} PP={layout.pp}"
        + (f" VPP={layout.vpp}" if layout.vpp else "")
        + f" DP={dp}; vLLM TP={layout.vllm_tp} ({layout.world_size // layout.vllm_tp} replicas)"
    )
    print(
        f"micro-batch {layout.micro_batch_size} x {layout.seq_length} tokens "
        f"(max prompt {cfg.data.max_prompt_length} + max response {cfg.sampling.max_tokens}); "
        f"vLLM gpu_memory_utilization={layout.gpu_memory_utilization}"
    )
    print(f"per-GPU memory estimate ({layout.gpu_memory_gib:g} GiB GPUs, covrl/scaling.py):")
    print(est.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
