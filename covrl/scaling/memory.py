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
  distributed optimizer, ``policy.optim.use_distributed_optimizer``).
* activations of one micro-batch of ``b`` sequences of ``s`` tokens (with packed
  sequences: one pack of ``s`` = ``max_tokens_per_micro_batch`` tokens), per
  transformer layer and token, in bytes (bf16, flash attention: no ``[s, s]`` score
  matrix is kept, no dropout masks since Qwen2 uses no dropout)::

      8 h                           norm-1 input, QKV input, norm-2 input, FC1 input
                                    (replicated over TP; split over it, 8 h / t, with
                                    sequence parallelism)
      + (4 h + 4 g d + 6 f) / t     Q, K, V and attention output, FC1 output (gate and
                                    up, 2 f), SwiGLU output (f), sharded over TP

  Full recomputation keeps only each layer's input (``2 h``, ``2 h / t`` with sequence
  parallelism) and recomputes one layer at a time in the backward pass, which then
  holds that layer's whole set once more. Selective recomputation re-runs the core
  attention only: with flash attention its saving (the score matrix) is not in this
  model at all, so it changes nothing here.

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

The parameter and byte counts come from :mod:`covrl.scaling.params`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from covrl.models.hf_config import PolicyModelConfig
from covrl.scaling.params import (
    activation_bytes_per_token_layer,
    kv_bytes_per_token,
    stage_params,
    total_params,
)

GIB = 2**30

__all__ = ["GIB", "Layout", "MemoryEstimate", "estimate_memory"]


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
    sequence_parallel: bool = False
    recompute_granularity: str | None = None  # None, "selective" or "full"
    # Not modelled, kept free: CUDA context, NCCL buffers, allocator fragmentation.
    reserve_gib: float = 4.0

    @classmethod
    def of_run(cls, config, nodes: int, gpus_per_node: int, gpu_memory_gib: float = 80.0) -> Layout:
        """The layout a run config (:class:`covrl.config.RunConfig`) asks for on
        ``nodes`` x ``gpus_per_node`` GPUs. A packed micro-batch
        (``policy.engine.max_tokens_per_micro_batch``) counts as one sequence of the
        token budget; otherwise ``micro_batch_size`` sequences of the longest length."""
        budget = config.policy.engine.max_tokens_per_micro_batch
        return cls(
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            tp=config.policy.tp,
            pp=config.policy.pp,
            vpp=config.policy.vpp,
            micro_batch_size=1 if budget else config.policy.engine.micro_batch_size,
            seq_length=budget or config.data.max_prompt_length + config.sampling.max_tokens,
            vllm_tp=config.rollout.tensor_parallel_size,
            gpu_memory_utilization=config.rollout.gpu_memory_utilization or 0.5,
            gpu_memory_gib=gpu_memory_gib,
            distributed_optimizer=config.policy.optim.use_distributed_optimizer,
            sequence_parallel=config.policy.sequence_parallel,
            recompute_granularity=config.policy.recompute_granularity,
        )

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
    per_layer = activation_bytes_per_token_layer(model, tp, layout.sequence_parallel)
    if layout.recompute_granularity == "full":
        stored = 2 * model.hidden_size // (tp if layout.sequence_parallel else 1)
        activations = math.ceil(layers * tokens * stored) + tokens * per_layer
    else:
        activations = math.ceil(layers * tokens * per_layer)
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
