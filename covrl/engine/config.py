"""Settings of the :class:`~covrl.engine.PolicyEngine`: its optimizer and schedule, and
how it runs its passes.

Every config checks its fields on construction and raises ``ValueError`` naming the
field, its value and what is expected (the run config's loader adds the dotted key).
"""

from __future__ import annotations

from dataclasses import dataclass

from covrl.utils.errors import check_field

__all__ = ["LR_DECAY_STYLES", "EngineConfig", "EnginePassConfig", "OptimizerConfig"]

# megatron-core's OptimizerParamScheduler styles, less "WSD" (it needs decay settings of
# its own that this config does not carry).
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass
class OptimizerConfig:
    """Megatron optimizer (Adam) and its lr / weight-decay schedule. Defaults follow the
    paper's RL runs."""

    lr: float = 1e-6
    min_lr: float | None = None  # None: equal to lr
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm bound; 0: no clipping
    # Shard the optimizer state (fp32 main weights, Adam moments) over the data-parallel
    # ranks (megatron's distributed optimizer, ZeRO-1): gradients are reduce-scattered,
    # updated parameters all-gathered.
    use_distributed_optimizer: bool = False
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 1  # only used by non-constant styles
    lr_decay_style: str = "constant"  # one of LR_DECAY_STYLES

    def __post_init__(self) -> None:
        check_field(self.lr >= 0, "lr", self.lr, "a value >= 0")
        if self.min_lr is not None:
            check_field(
                0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"0 <= min_lr <= lr={self.lr}"
            )
        check_field(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a value >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            check_field(0 <= value < 1, name, value, "a value in [0, 1)")
        check_field(self.adam_eps > 0, "adam_eps", self.adam_eps, "a value > 0")
        check_field(
            self.clip_grad >= 0, "clip_grad", self.clip_grad, "a value >= 0 (0: no clipping)"
        )
        check_field(
            self.lr_warmup_steps >= 0, "lr_warmup_steps", self.lr_warmup_steps, "an integer >= 0"
        )
        check_field(
            self.lr_decay_steps >= 1, "lr_decay_steps", self.lr_decay_steps, "an integer >= 1"
        )
        check_field(
            self.lr_decay_style in LR_DECAY_STYLES,
            "lr_decay_style",
            self.lr_decay_style,
            f"one of {', '.join(LR_DECAY_STYLES)}",
        )


@dataclass
class EnginePassConfig:
    """How the engine runs its log-prob and training passes: everything of
    :class:`EngineConfig` but the temperature (a trainer takes that from its sampling
    settings, so it is set once)."""

    # Rows per micro-batch (rows sorted by length, each micro-batch trimmed to its
    # longest row). Used when max_tokens_per_micro_batch is None.
    micro_batch_size: int = 1
    # Token budget of a micro-batch: sequences are packed end to end with no padding
    # (THD; Transformer Engine attention on CUDA, a block-diagonal causal mask on the
    # local spec) and micro-batches formed first-fit decreasing. None: fixed size.
    max_tokens_per_micro_batch: int | None = None
    # Rows of the [tokens, vocab/tp] working buffer of the log-prob/entropy function
    # (None: the function's device-dependent default, a few MiB on CPU).
    logprob_chunk_size: int | None = None
    # Keep the entropy in the autograd graph (needed only for an entropy bonus).
    entropy_requires_grad: bool = False

    def __post_init__(self) -> None:
        check_field(
            self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "an integer >= 1"
        )
        if self.max_tokens_per_micro_batch is not None:
            check_field(
                self.max_tokens_per_micro_batch >= 1,
                "max_tokens_per_micro_batch",
                self.max_tokens_per_micro_batch,
                "an integer >= 1 (tokens per packed micro-batch) or None",
            )
        if self.logprob_chunk_size is not None:
            check_field(
                self.logprob_chunk_size >= 1,
                "logprob_chunk_size",
                self.logprob_chunk_size,
                "an integer >= 1 or None",
            )


@dataclass
class EngineConfig(EnginePassConfig):
    """The engine's passes and the temperature of its log-probs and entropies:
    ``log_softmax(logits / temperature)``."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.temperature > 0, "temperature", self.temperature, "a value > 0")
