"""Settings of the colocated vLLM rollout engine and of one generation call."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RolloutConfig:
    """The vLLM engine colocated with training (one per rank, SPMD).

    ``tensor_parallel_size`` is vLLM's TP size ``r``, independent of the training
    layout: with world size ``W`` there are ``W / r`` rollout replicas, replica ``i``
    made of the consecutive global ranks ``[i * r, (i + 1) * r)``.
    """

    tensor_parallel_size: int = 1
    # Fraction of device memory vLLM may use (weights + KV cache). On CPU vLLM reads it
    # as the fraction of the NUMA node's memory it reserves. None: 0.1 on CPU, 0.5 on
    # CUDA (the other half stays with training; the KV cache is released in sleep mode).
    gpu_memory_utilization: float | None = None
    # KV cache size in bytes; None lets vLLM size it from gpu_memory_utilization.
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_num_seqs: int = 256
    # vLLM weight dtype ("auto": the checkpoint's). Weight sync casts to it.
    dtype: str = "auto"
    # Eager execution (no CUDA graphs / torch.compile). None: eager on CPU only.
    enforce_eager: bool | None = None
    # CUDA only: release the KV cache and the weights while training (vLLM sleep mode
    # level 2; weights come back with the next sync).
    enable_sleep_mode: bool = True
    enable_prefix_caching: bool = True
    # Megatron -> vLLM sync: full Hugging Face tensors are handed to vLLM's loader in
    # buckets of about this many MiB (a larger tensor is a bucket of its own).
    sync_bucket_mb: float = 512.0
    seed: int = 0  # vLLM's engine seed; per-sample seeds come from generate(seed=)
    # Level of vLLM's loggers while covrl drives the engine. vLLM logs INFO lines on
    # start-up and on every weight reload, which bury the trainer's progress; "INFO"
    # shows them again.
    log_level: str = "WARNING"
    # Extra keyword arguments for ``vllm.LLM`` (expert settings).
    engine_kwargs: dict = field(default_factory=dict)

    def validate(self, world_size: int) -> None:
        r = self.tensor_parallel_size
        if r < 1 or world_size % r:
            raise ValueError(
                f"rollout.tensor_parallel_size={r} must be >= 1 and divide the world size "
                f"{world_size}"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(
                f"rollout.log_level={self.log_level!r}: expected DEBUG, INFO, WARNING, "
                "ERROR or CRITICAL"
            )
        if self.sync_bucket_mb <= 0:
            raise ValueError(f"rollout.sync_bucket_mb={self.sync_bucket_mb} must be > 0")
        u = self.gpu_memory_utilization
        if u is not None and not 0 < u <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization={u} must be in (0, 1]")


@dataclass
class SamplingConfig:
    """How to sample the responses of one :meth:`RolloutEngine.generate` call.

    ``temperature == 0`` is greedy decoding (validation). ``top_k = -1`` and
    ``top_p = 1`` disable truncation; with truncation the returned log-probs are those
    of the truncated, renormalised distribution (see docs/rollout.md).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n={self.n} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling.top_k={self.top_k} must be -1 (off) or >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens={self.max_tokens} must be >= 1")
