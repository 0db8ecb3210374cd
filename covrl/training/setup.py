"""Everything a run needs before its first step, built from a :class:`RunConfig`.

:func:`build_run` initialises the process groups, loads the tokenizer and the prompt
data, builds the megatron-core policy (and a frozen reference policy when a KL
coefficient is set) from the Hugging Face checkpoint, starts the colocated vLLM
engine and the reward worker, and restores the newest checkpoint when resuming.
Collective: every rank calls it; an error on any rank is raised on every rank. Rank 0
prints the software versions first and records them in ``<run_dir>/versions.json``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from covrl import checkpointing
from covrl.algorithms import EntropyTargetController
from covrl.analysis import EntropyLawMonitor
from covrl.config import ConfigError, RunConfig, save_config, to_yaml
from covrl.data import (
    DataError,
    EpochSampler,
    PromptDataset,
    load_policy_tokenizer,
    load_prompt_dataset,
)
from covrl.engine import PolicyEngine
from covrl.models import (
    PolicyModelConfig,
    TransformerEngineUnavailable,
    build_model,
    load_hf_weights,
    resolve_transformer_impl,
    validate_parallel_layout,
)
from covrl.parallel import initialize, raise_if_any_rank
from covrl.rewards import RewardError, RewardExecutor, RewardRegistry
from covrl.rollout import RolloutEngine
from covrl.training.colocation import Colocation
from covrl.training.logger import METRICS_JSONL, TENSORBOARD_DIR, MetricsLogger
from covrl.utils.errors import first_line
from covrl.utils.versions import format_versions, record_versions, software_versions

__all__ = ["CHECKPOINT_DIRNAME", "HF_EXPORT_DIRNAME", "Run", "build_run", "trainer_state"]

CHECKPOINT_DIRNAME = "checkpoints"
HF_EXPORT_DIRNAME = "hf"
# Tags shown on the progress bar, with their short labels.
PROGRESS_TAGS = {
    "rollout/accuracy": "acc",
    "rollout/entropy": "H",
    "val/accuracy": "val",
    "rollout/response_length_mean": "len",
    "time/step": "s/step",
}


@dataclass
class Run:
    config: RunConfig
    tokenizer: Any
    train_data: PromptDataset
    val_data: PromptDataset | None
    sampler: EpochSampler
    registry: RewardRegistry
    rewards: RewardExecutor
    model_config: PolicyModelConfig
    engine: PolicyEngine
    ref_engine: PolicyEngine | None
    rollout: RolloutEngine
    colocation: Colocation
    logger: MetricsLogger
    monitor: EntropyLawMonitor
    # Holds policy.loss.entropy_control.target, when set.
    entropy_target: EntropyTargetController | None
    total_steps: int
    start_step: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.config.trainer.run_dir)

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / CHECKPOINT_DIRNAME

    def close(self) -> None:
        """Stop the reward worker, the logs, this rank's heartbeat and vLLM (whose
        shutdown destroys the default process group, and with it rank 0's store)."""
        from covrl.parallel import liveness

        self.rewards.close()
        self.logger.close()
        liveness.stop()
        self.rollout.shutdown()


def _load_data(config: RunConfig, tokenizer) -> tuple[PromptDataset, PromptDataset | None]:
    d = config.data
    options = dict(
        max_prompt_length=d.max_prompt_length,
        prompt_key=d.prompt_key,
        apply_chat_template=d.apply_chat_template,
    )
    train = load_prompt_dataset(d.train_files, tokenizer, **options)
    val = None
    if d.val_files and config.validation.test_freq > 0:
        val = load_prompt_dataset(d.val_files, tokenizer, max_prompts=d.val_max_prompts, **options)
    return train, val


def _model_config(config: RunConfig, world_size: int) -> PolicyModelConfig:
    """The policy's architecture, checked against the parallel layout."""
    model_config = PolicyModelConfig.from_hf(
        config.policy.model_path,
        params_dtype=config.policy.dtype,
        make_vocab_size_divisible_by=config.policy.make_vocab_size_divisible_by,
    )
    validate_parallel_layout(model_config, config.policy.parallel(), world_size)
    return model_config


def _build_policy(
    config: RunConfig, model_config: PolicyModelConfig, *, trainable: bool
) -> PolicyEngine:
    path = config.policy.model_path
    chunks = build_model(
        model_config,
        config.policy.parallel(),
        transformer_impl=config.policy.transformer_impl,
        **config.policy.transformer_overrides(),
    )
    load_hf_weights(chunks, model_config, path)
    return PolicyEngine(
        chunks,
        model_config,
        optimizer=config.policy.optim if trainable else None,
        config=config.engine_config(),
    )


def resolve_resume(resume: str, root: Path) -> Path | None:
    """``auto``: the newest complete checkpoint under ``root`` (None if there is none);
    ``none``: None; anything else: a checkpoint root or ``iter_*`` directory."""
    if resume == "none":
        return None
    if resume == "auto":
        complete = checkpointing.list_checkpoints(root)
        return checkpointing.checkpoint_path(root, complete[-1]) if complete else None
    return checkpointing.resolve_checkpoint(resume)


# What a run writes into its directory; "--resume none" moves an earlier run's aside.
RUN_OUTPUTS = (CHECKPOINT_DIRNAME, METRICS_JSONL, TENSORBOARD_DIR, HF_EXPORT_DIRNAME)


def _set_aside_previous_run(run_dir: Path) -> None:
    """Move an earlier run's outputs to ``<run_dir>/previous-<UTC time>/`` so a fresh
    start neither appends to its logs nor resumes from its checkpoints later."""
    found = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return
    target = run_dir / time.strftime("previous-%Y%m%d-%H%M%S", time.gmtime())
    target.mkdir(parents=True, exist_ok=True)
    for path in found:
        path.rename(target / path.name)
    print(f"--resume none: moved the earlier run's outputs to {target}", file=sys.stderr)


def trainer_state(run: Run, step: int) -> dict:
    """The JSON trainer state stored with a checkpoint."""
    return {
        "trainer": {
            "step": step,
            "sampler": run.sampler.state_dict(),
            "entropy_law": run.monitor.state_dict(),
            "entropy_target": run.entropy_target.state_dict() if run.entropy_target else None,
            "config": to_yaml(run.config),
        }
    }


def build_run(config: RunConfig, resume: str = "auto") -> Run:
    """Set up a run on every rank (see the module docstring)."""
    initialize(config.policy.parallel(), seed=config.trainer.seed, timeouts=config.timeouts())
    world, rank = dist.get_world_size(), dist.get_rank()
    versions = software_versions()
    if rank == 0:
        print(f"covrl: running with {format_versions(versions)}", flush=True)
    error = None
    try:
        dp_size = config.check_layout(world)
        if not Path(config.policy.model_path, "config.json").is_file():
            raise ConfigError(
                f"policy.model_path={config.policy.model_path!r}: not a Hugging Face "
                "checkpoint directory (no config.json)"
            )
        model_config = _model_config(config, world)
        # Before anything is built: a missing Transformer Engine is one line on every rank.
        resolve_transformer_impl(config.policy.transformer_impl)
        tokenizer = load_policy_tokenizer(
            config.policy.model_path, require_chat_template=config.data.apply_chat_template
        )
        train_data, val_data = _load_data(config, tokenizer)
        sampler = EpochSampler(
            len(train_data),
            config.data.train_batch_size,
            seed=config.data.seed,
            shuffle=config.data.shuffle,
        )
        registry = RewardRegistry(config.reward.sources, config.reward.default)
        sources = set(train_data.data_sources) | set(val_data.data_sources if val_data else [])
        registry.check(sources)
        resume_from = resolve_resume(resume, Path(config.trainer.run_dir) / CHECKPOINT_DIRNAME)
    except (
        ConfigError,
        DataError,
        RewardError,
        checkpointing.CheckpointError,
        TransformerEngineUnavailable,
        ValueError,
    ) as exc:
        error = exc
        if isinstance(exc, TransformerEngineUnavailable):
            error = f"policy.{first_line(exc)}"  # names the config key
    raise_if_any_rank(error, dist.group.WORLD, error_type=ConfigError)

    if rank == 0:
        if resume == "none":
            _set_aside_previous_run(Path(config.trainer.run_dir))
        save_config(config, config.trainer.run_dir)
        record_versions(config.trainer.run_dir, versions)
        for message in config.warnings():
            print(f"warning: {message}", file=sys.stderr, flush=True)

    if not config.sampling.stop_token_ids and tokenizer.eos_token_id is not None:
        config.sampling.stop_token_ids = [int(tokenizer.eos_token_id)]
    engine = _build_policy(config, model_config, trainable=True)
    ref_engine = None
    if config.policy.loss.kl_coeff > 0:
        ref_engine = _build_policy(config, model_config, trainable=False)
    # vLLM starts with dummy weights: the first rollout syncs the trainer's.
    rollout = RolloutEngine(config.policy.model_path, config.rollout, dummy_weights=True)
    monitor = EntropyLawMonitor()
    control = config.policy.loss.entropy_control
    entropy_target = EntropyTargetController(control) if control.target is not None else None

    total = config.trainer.total_steps or config.trainer.total_epochs * sampler.batches_per_epoch
    start_step = 0
    if resume_from is not None:
        metadata = engine.load_checkpoint(resume_from)
        state = metadata.extra.get("trainer")
        if not isinstance(state, dict) or "sampler" not in state:
            raise checkpointing.CheckpointError(
                f"{resume_from}: no trainer state (step, data cursor) in its metadata: "
                "not a covrl-train checkpoint (load weights with policy.model_path instead)"
            )
        start_step = int(state["step"])
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as exc:
            raise checkpointing.CheckpointError(f"{resume_from}: {exc}") from None
        monitor.load_state_dict(state["entropy_law"])
        if entropy_target is not None and state.get("entropy_target") is not None:
            entropy_target.load_state_dict(state["entropy_target"])

    logger = MetricsLogger(
        config.trainer.run_dir,
        enabled=rank == 0,
        total_steps=total,
        initial_step=start_step,
        progress_bar=config.trainer.progress_bar,
        show=PROGRESS_TAGS,
    )
    if rank == 0:
        logger.print(
            f"covrl: {world} ranks (tp={config.policy.tp}, pp={config.policy.pp}, dp={dp_size}), "
            f"{len(train_data)} training prompts ({train_data.num_dropped_too_long} dropped as "
            f"longer than {config.data.max_prompt_length} tokens), steps {start_step + 1}..{total}"
            + (f", resumed from {resume_from}" if resume_from else "")
        )
    return Run(
        config=config,
        tokenizer=tokenizer,
        train_data=train_data,
        val_data=val_data,
        sampler=sampler,
        registry=registry,
        rewards=RewardExecutor(config.reward.timeout_s),
        model_config=model_config,
        engine=engine,
        ref_engine=ref_engine,
        rollout=rollout,
        colocation=Colocation(engine, rollout, synced=False),
        logger=logger,
        monitor=monitor,
        entropy_target=entropy_target,
        total_steps=total,
        start_step=start_step,
    )
