"""The RL training driver: the paper's recipe, one phase per line.

Per step, on every rank (SPMD under torchrun; vLLM colocated with megatron-core)::

    prompts -> rollout.generate (n per prompt; weights synced first if stale) -> rewards
      -> DAPO dynamic sampling (refill from further generation batches)
      -> this rank's batch with GRPO / RLOO / REINFORCE++ advantages
      -> old log-probs (+ reference log-probs) and the rollout/trainer mismatch
      -> ppo_epochs x one ppo_update per mini-batch -> entropy change vs -Cov
      -> validation every test_freq steps (+ entropy-law fit)
      -> log -> checkpoint every save_freq steps, on preemption and at the end

The phases live in :mod:`covrl.training.steps`, the set-up in
:mod:`covrl.training.setup`, the switches between vLLM and training in
:mod:`covrl.training.colocation`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch.distributed as dist

from covrl.config import RunConfig
from covrl.training.logger import PhaseTimer
from covrl.training.preemption import PreemptionHandler
from covrl.training.setup import Run, build_run
from covrl.training.steps import (
    collect_rollouts,
    entropy_change,
    export_hf,
    old_logprobs,
    policy_batch,
    save,
    update_policy,
    validate,
)

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    last_step: int
    preempted: bool
    hf_export: str | None


def _due(step: int, freq: int) -> bool:
    return freq > 0 and step % freq == 0


def train_step(run: Run, step: int) -> dict[str, float]:
    """One rollout step; returns its scalars (identical on every rank)."""
    cfg = run.config
    timer = PhaseTimer()
    with timer("step"):
        samples, metrics = collect_rollouts(run, step, timer)
        if samples is not None:
            run.colocation.train_phase()
            batch, layout = policy_batch(run, samples)
            with timer("old_logprob"):
                metrics.update(old_logprobs(run, batch, layout))
            with timer("update"):
                metrics.update(update_policy(run, batch, layout, step, metrics["rollout/entropy"]))
            if _due(step, cfg.trainer.entropy_change_freq):
                with timer("entropy_change"):
                    metrics.update(entropy_change(run, batch, layout))
        else:
            metrics["train/updates"] = 0.0
        if run.val_data is not None and (
            _due(step, cfg.validation.test_freq) or step == run.total_steps
        ):
            with timer("validate"):
                metrics.update(validate(run, step, timer))
            if cfg.trainer.entropy_law and "rollout/entropy" in metrics:
                metrics.update(
                    run.monitor.update(step, metrics["rollout/entropy"], metrics["val/accuracy"])
                )
    metrics.update(timer.metrics())
    metrics["perf/tokens_per_s"] = metrics["rollout/response_tokens"] / metrics["time/step"]
    return metrics


def train(config: RunConfig, resume: str = "auto") -> TrainResult:
    """Run (or continue) training as ``config`` describes. Collective over all ranks.

    ``resume``: ``auto`` (continue from the newest complete checkpoint in the run
    directory, if any), ``none`` (start over), or a checkpoint path.
    """
    run = build_run(config, resume)
    preemption = PreemptionHandler()
    try:
        cfg = run.config
        run.logger.print(
            f"training steps {run.start_step + 1}..{run.total_steps}; SIGTERM or SIGUSR1 "
            "saves a checkpoint at the next step boundary, then exits"
        )
        if run.start_step == 0 and run.val_data is not None and cfg.validation.before_train:
            start = time.perf_counter()
            metrics = validate(run, 0)
            metrics["time/validate"] = time.perf_counter() - start
            run.logger.log(0, metrics)
        step = run.start_step
        while step < run.total_steps:
            step += 1
            run.logger.log(step, train_step(run, step))
            preempted = preemption.agreed(dist.group.WORLD)
            if preempted or _due(step, cfg.trainer.save_freq) or step == run.total_steps:
                save(run, step)
            if preempted:
                run.logger.print(f"preempted: checkpoint saved at step {step}")
                return TrainResult(step, True, None)
        hf = export_hf(run) if cfg.trainer.export_hf else None
        run.logger.print(
            f"done: {step} steps; TensorBoard logs in {run.run_dir / 'tensorboard'}, "
            f"metrics in {run.run_dir / 'metrics.jsonl'}"
            + (f", Hugging Face export in {hf}" if hf else "")
        )
        return TrainResult(step, False, hf)
    finally:
        preemption.restore()
        run.close()
