"""Settings of the colocated vLLM rollout engine and of one generation call."""

from __future__ import annotations

from dataclasses import dataclass, field

from covrl.utils.errors import check_field

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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

    def __post_init__(self) -> None:
        r = self.tensor_parallel_size
        check_field(r >= 1, "tensor_parallel_size", r, "an integer >= 1")
        check_field(
            self.log_level.upper() in LOG_LEVELS,
            "log_level",
            self.log_level,
            f"one of {', '.join(LOG_LEVELS)}",
        )
        check_field(self.sync_bucket_mb > 0, "sync_bucket_mb", self.sync_bucket_mb, "a value > 0")
        u = self.gpu_memory_utilization
        if u is not None:
            check_field(0 < u <= 1, "gpu_memory_utilization", u, "a value in (0, 1] or None")
        if self.kv_cache_memory_bytes is not None:
            check_field(
                self.kv_cache_memory_bytes >= 1,
                "kv_cache_memory_bytes",
                self.kv_cache_memory_bytes,
                "an integer >= 1 or None",
            )
        if self.max_model_len is not None:
            check_field(
                self.max_model_len >= 2,
                "max_model_len",
                self.max_model_len,
                "an integer >= 2 or None",
            )
        check_field(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "an integer >= 1")

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` unless the rollout TP size divides ``world_size`` (the
        replicas tile the world)."""
        r = self.tensor_parallel_size
        if world_size % r:
            raise ValueError(
                f"rollout.tensor_parallel_size={r} must divide the world size {world_size}"
            )


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

    def __post_init__(self) -> None:
        check_field(self.n >= 1, "n", self.n, "an integer >= 1")
        check_field(
            self.temperature >= 0, "temperature", self.temperature, "a value >= 0 (0: greedy)"
        )
        check_field(0 < self.top_p <= 1, "top_p", self.top_p, "a value in (0, 1]")
        check_field(
            self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "-1 (off) or an integer >= 1"
        )
        check_field(self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
