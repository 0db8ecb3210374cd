"""The run's configuration tree: YAML + dotted command-line overrides -> typed dataclasses.

One :class:`RunConfig` describes a training run. It nests the dataclasses the parts
already define (``PolicyLossConfig``, ``AdvantageConfig``, ``OptimizerConfig``,
``EnginePassConfig``, the rollout engine's ``RolloutConfig`` / ``SamplingConfig``) and adds
the sections only the trainer needs. :func:`load_config` reads a YAML file, merges
``key.sub=value`` overrides on top (OmegaConf structured configs: types are checked
against the dataclasses' annotations) and instantiates the tree, so every
``__post_init__`` check runs. Any problem, an unknown key, a value of the wrong type
or a value a dataclass rejects, is one :class:`ConfigError` line naming the dotted key.

Sizes follow verl's conventions: ``data.train_batch_size`` and
``algorithm.ppo_mini_batch_size`` count prompts; each prompt has ``sampling.n``
responses.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from covrl.algorithms import AdvantageConfig, PolicyLossConfig
from covrl.engine.config import EngineConfig, EnginePassConfig, OptimizerConfig
from covrl.models import TRANSFORMER_IMPLS
from covrl.parallel import DistributedTimeouts, ParallelConfig
from covrl.rollout import RolloutConfig, RolloutCorrectionConfig, SamplingConfig
from covrl.utils.errors import first_line

__all__ = [
    "AlgorithmConfig",
    "ConfigError",
    "DataConfig",
    "PolicyConfig",
    "RewardConfig",
    "RunConfig",
    "TrainerConfig",
    "ValidationConfig",
    "load_config",
    "save_config",
    "to_yaml",
]

RESOLVED_CONFIG_FILENAME = "config.yaml"


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the dotted key."""


@dataclass
class PolicyConfig:
    """The trained policy: Hugging Face checkpoint, parallel layout, engine, optimizer, loss.

    ``model_path``: a Hugging Face checkpoint directory (config.json, safetensors,
    tokenizer files with a chat template). ``dtype``: parameter dtype (``float32`` or
    ``bfloat16``); None keeps the checkpoint's. ``tp``/``pp``/``vpp``: Megatron tensor,
    pipeline and virtual-pipeline sizes; the data-parallel size is ``world / (tp * pp)``.

    Memory: ``sequence_parallel`` splits the activations outside attention and the MLP
    (norms, dropout, residuals) over the TP ranks along the sequence (needs ``tp > 1``);
    ``recompute_granularity`` trades compute for activation memory: ``selective``
    recomputes the core attention in the backward pass, ``full`` whole layers
    (``recompute_method`` ``uniform`` or ``block``, ``recompute_num_layers`` per unit).
    ``engine``: micro-batching and log-prob passes; the engine's temperature is
    ``sampling.temperature`` (:meth:`RunConfig.engine_config`), set once.
    ``transformer_impl``: the layer spec (:func:`covrl.models.resolve_transformer_impl`):
    ``auto`` requires Transformer Engine on CUDA and uses megatron's local modules on
    CPU; ``transformer_engine`` / ``local`` choose explicitly (``local`` on CUDA is the
    opt-out: unfused attention, far more activation memory).
    """

    model_path: str = MISSING
    dtype: str | None = None
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    make_vocab_size_divisible_by: int = 128
    sequence_parallel: bool = False
    recompute_granularity: str | None = None
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    transformer_impl: str = "auto"
    engine: EnginePassConfig = field(default_factory=EnginePassConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.tp, self.pp, self.vpp)

    def transformer_overrides(self) -> dict:
        """megatron ``TransformerConfig`` fields these settings set."""
        out: dict = {"sequence_parallel": self.sequence_parallel}
        if self.recompute_granularity is not None:
            out["recompute_granularity"] = self.recompute_granularity
            if self.recompute_granularity == "full":
                out["recompute_method"] = self.recompute_method
                out["recompute_num_layers"] = self.recompute_num_layers
        return out

    def __post_init__(self) -> None:
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: expected float32, bfloat16 or null")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError(
                f"sequence_parallel=true needs tensor parallelism: tp={self.tp} (set tp >= 2)"
            )
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(
                f"recompute_granularity={self.recompute_granularity!r}: expected selective, "
                "full or null"
            )
        if self.recompute_method not in ("uniform", "block"):
            raise ValueError(
                f"recompute_method={self.recompute_method!r}: expected uniform or block"
            )
        if self.recompute_num_layers < 1:
            raise ValueError(f"recompute_num_layers={self.recompute_num_layers} must be >= 1")
        if isinstance(self.engine, EngineConfig):
            raise ValueError(
                f"engine={self.engine!r}: expected an EnginePassConfig (the run's temperature "
                "is sampling.temperature)"
            )
        try:
            self.parallel()
        except ValueError as exc:
            raise ValueError(f"tp={self.tp}, pp={self.pp}, vpp={self.vpp}: {exc}") from None
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(
                f"transformer_impl={self.transformer_impl!r}: expected one of "
                f"{list(TRANSFORMER_IMPLS)}"
            )


@dataclass
class DataConfig:
    """Prompt data in verl's parquet layout (see :mod:`covrl.data`).

    ``train_batch_size``: prompts per rollout batch. Prompts whose templated token
    count exceeds ``max_prompt_length`` are dropped (and counted). Training shuffles
    with ``seed`` and the epoch number.
    """

    train_files: list[str] = MISSING
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    max_prompt_length: int = 1024
    train_batch_size: int = 256
    shuffle: bool = True
    seed: int = 1
    # Apply the tokenizer's chat template to the prompt messages (else: join contents).
    apply_chat_template: bool = True
    # Validation prompts used (None: all of them).
    val_max_prompts: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_prompt_length", "train_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class AlgorithmConfig:
    """How a rollout batch becomes optimizer steps.

    ``ppo_mini_batch_size`` prompts (with all their responses) per optimizer step,
    ``ppo_epochs`` passes over the rollout batch. ``max_num_gen_batches``: with DAPO
    dynamic sampling (``advantage.dynamic_sampling``), generation batches drawn per
    step to fill ``train_batch_size`` informative prompts (0: unlimited); a step that
    still has fewer than ``ppo_mini_batch_size`` of them skips its update.
    ``rollout_correction``: truncated importance weights
    ``min(exp(old_logp - rollout_logp), cap)`` on the loss (``mode: tis``).
    """

    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    ppo_mini_batch_size: int = 32
    ppo_epochs: int = 1
    max_num_gen_batches: int = 10
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    def __post_init__(self) -> None:
        if self.ppo_mini_batch_size < 1 or self.ppo_epochs < 1:
            raise ValueError(
                f"ppo_mini_batch_size={self.ppo_mini_batch_size} and ppo_epochs="
                f"{self.ppo_epochs} must be >= 1"
            )
        if self.max_num_gen_batches < 0:
            raise ValueError(f"max_num_gen_batches={self.max_num_gen_batches} must be >= 0")


@dataclass
class RewardConfig:
    """Reward functions chosen by ``data_source`` (see :mod:`covrl.rewards`).

    ``sources`` maps a data source to a scorer: a built-in name (``math``,
    ``two_sum``) or a user function ``module:function`` with verl's signature
    ``fn(data_source, solution_str, ground_truth, extra_info) -> float | dict``.
    Sources not listed use the built-in registry, then ``default`` (None: unknown
    sources are an error). ``timeout_s``: per-sample limit; a scorer that runs over
    it scores 0. ``isolation="process"`` runs scorers in a worker process that is
    killed on a timeout (hangs in C code included); ``inline`` runs them in the
    trainer process with a signal alarm (main thread only, Python code only).
    """

    sources: dict[str, str] = field(default_factory=dict)
    default: str | None = "math"
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0")


@dataclass
class ValidationConfig:
    """Validation every ``test_freq`` steps (0: never) on ``data.val_files``.

    Per data source: greedy accuracy, and ``avg@k`` (mean accuracy of ``k`` samples
    per prompt at ``temperature``/``top_p``; ``k=0`` skips it).
    """

    test_freq: int = 0
    before_train: bool = True
    k: int = 4
    temperature: float = 0.6
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.test_freq < 0 or self.k < 0:
            raise ValueError(f"test_freq={self.test_freq} and k={self.k} must be >= 0")
        # The avg@k samples' settings, checked now rather than at the first validation.
        SamplingConfig(n=max(self.k, 1), temperature=self.temperature, top_p=self.top_p)


@dataclass
class TrainerConfig:
    """Run length, output directory, checkpoints, logging.

    ``total_steps`` rollout steps (None: ``total_epochs`` passes over the data).
    ``save_freq``: checkpoint every that many steps (0: only at the end) under
    ``<run_dir>/checkpoints``; the end also writes a Hugging Face export to
    ``<run_dir>/hf`` when ``export_hf``. ``entropy_law``: at every validation, refit
    the entropy law R = -a exp(H) + b on the (rollout entropy, validation accuracy)
    points so far (:class:`covrl.analysis.EntropyLawMonitor`). ``entropy_change_freq``:
    every that many steps, measure the entropy change of the update phase next to the
    covariance prediction (one more log-prob pass; 0: off). Timeouts: process-group
    set-up, one collective, and how long a silent rank may be before every process
    exits (:class:`covrl.parallel.DistributedTimeouts`). They are longer than that
    class's library defaults (45 s / 600 s / 20 s) on purpose: an RL job loads the
    policy and starts vLLM during set-up, one rank may write an export or validate
    alone for many minutes, and a long CPU-bound phase (reward workers starting,
    tokenisation) can keep the heartbeat thread waiting for the GIL.
    """

    run_dir: str = MISSING
    total_steps: int | None = None
    total_epochs: int = 1
    seed: int = 1
    save_freq: int = 0
    export_hf: bool = True
    entropy_law: bool = True
    entropy_change_freq: int = 1
    progress_bar: bool = True
    setup_timeout_s: float = 120.0
    collective_timeout_s: float = 1800.0
    dead_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1 (or null)")
        for name in ("total_epochs", "save_freq", "entropy_change_freq"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        try:
            self.timeouts()
        except ValueError as exc:
            raise ValueError(
                f"setup_timeout_s={self.setup_timeout_s}, collective_timeout_s="
                f"{self.collective_timeout_s}, dead_after_s={self.dead_after_s}: {exc}"
            ) from None

    def timeouts(self) -> DistributedTimeouts:
        return DistributedTimeouts(
            setup_s=self.setup_timeout_s,
            collective_s=self.collective_timeout_s,
            dead_after_s=self.dead_after_s,
        )


@dataclass
class RunConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        t = self.sampling.temperature
        if not t > 0:
            raise ValueError(
                f"sampling.temperature={t!r}: expected a value > 0 (the policy's log-probs "
                "are those of the sampling distribution, log_softmax(logits / temperature))"
            )

    # ------------------------------------------------------------------ derived settings
    def timeouts(self) -> DistributedTimeouts:
        """The process groups' timeouts and heartbeat (from ``trainer``)."""
        return self.trainer.timeouts()

    def engine_config(self) -> EngineConfig:
        """The policy engine's settings: ``policy.engine`` with ``sampling.temperature``."""
        passes = {
            f.name: getattr(self.policy.engine, f.name)
            for f in dataclasses.fields(EnginePassConfig)
        }
        return EngineConfig(**passes, temperature=self.sampling.temperature)

    # ------------------------------------------------------------------ cross-checks
    def check_layout(self, world_size: int) -> int:
        """Check the batch sizes against the parallel layout; returns the DP size.

        A mini-batch of ``ppo_mini_batch_size * n`` responses is split evenly over the
        data-parallel ranks, and each rank's share into micro-batches.
        """
        parallel = self.policy.parallel()
        try:
            dp = parallel.data_parallel_size(world_size)
            self.rollout.check_world_size(world_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        a, d = self.algorithm, self.data
        if d.train_batch_size % a.ppo_mini_batch_size:
            raise ConfigError(
                f"data.train_batch_size={d.train_batch_size} must be a multiple of "
                f"algorithm.ppo_mini_batch_size={a.ppo_mini_batch_size}"
            )
        rows = a.ppo_mini_batch_size * self.sampling.n
        mbs = self.policy.engine.micro_batch_size
        if rows % (dp * mbs):
            raise ConfigError(
                f"algorithm.ppo_mini_batch_size x sampling.n = {a.ppo_mini_batch_size} x "
                f"{self.sampling.n} = {rows} responses must split evenly over data-parallel "
                f"size {dp} x policy.engine.micro_batch_size {mbs}"
            )
        return dp

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not what the user wants."""
        out = []
        a = self.algorithm
        fully_on_policy = a.ppo_epochs == 1 and self.data.train_batch_size == a.ppo_mini_batch_size
        if self.policy.loss.entropy_control.method == "kl_cov" and fully_on_policy:
            out.append(
                "KL-Cov with one mini-batch and one PPO epoch is fully on-policy: "
                "|logp - logp_old| is 0 at every update, so the penalty does nothing "
                "(the paper uses 8 mini-batches per rollout batch)"
            )
        return out


# ---------------------------------------------------------------------------- loading
# Keys a run config does not take, with what to set instead.
REPLACED_KEYS = {
    "policy.engine.temperature": (
        "the temperature is set once, by sampling.temperature (the policy's log-probs are "
        "those of the sampling distribution): set sampling.temperature instead"
    ),
}


def _omegaconf_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = first_line(exc)
    if type(exc).__name__ == "MissingMandatoryValue" and key:
        return ConfigError(f"{source}: {key} is required (no value given)")
    if type(exc).__name__ == "ConfigKeyError" and key in REPLACED_KEYS:
        return ConfigError(f"{source}: {key} is not a setting: {REPLACED_KEYS[key]}")
    if type(exc).__name__ == "ConfigKeyError" and key:
        return ConfigError(f"{source}: unknown key {key} ({msg})")
    return ConfigError(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")


def _instantiate(cls: type, node: DictConfig, path: str) -> Any:
    """Build dataclass ``cls`` from a merged node, nested dataclasses first, so that a
    ``__post_init__`` error can be reported with the full dotted path."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        if OmegaConf.is_missing(node, f.name):
            raise ConfigError(f"{key} is required (no value given)")
        value = node[f.name]
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
            kwargs[f.name] = _instantiate(OmegaConf.get_type(value), value, key)
        elif OmegaConf.is_config(value):
            obj = OmegaConf.to_object(value)
            kwargs[f.name] = tuple(obj) if isinstance(f.default, tuple) else obj
        else:
            kwargs[f.name] = value
    try:
        obj = cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{path or 'config'}: {first_line(exc)}") from None
    # Tuples arrive as lists from OmegaConf: restore the declared container type.
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, tuple) and isinstance(getattr(obj, f.name), list):
            setattr(obj, f.name, tuple(getattr(obj, f.name)))
    return obj


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read ``path`` (YAML), apply ``key.sub=value`` overrides, return the typed tree.

    Raises :class:`ConfigError` (one line, naming the file or the key) on a missing or
    unparsable file, an unknown key, a value of the wrong type, a required key left
    unset, or a value a section rejects.
    """
    schema = OmegaConf.structured(RunConfig)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = OmegaConf.load(p)
        except Exception as exc:  # noqa: BLE001 - yaml errors of every kind
            raise ConfigError(f"{p}: cannot parse YAML: {first_line(exc)}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        layers.append((str(p), loaded))
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(exc, f"override {item!r}") from None
    merged = schema
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(exc, source) from None
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, "interpolation") from None
    return _instantiate(RunConfig, merged, "")


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: RunConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to ``<run_dir>/config.yaml`` (loadable by
    :func:`load_config`)."""
    from covrl.utils.atomic_io import write_text_atomic

    path = Path(run_dir) / RESOLVED_CONFIG_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_yaml(config))
    return path
