"""The phases of one training step, each a function the driver calls in order.

Tensor layout: ``RolloutTensors`` are the whole step's ``[N, S]`` batch on every rank;
``local`` tensors are this rank's rows (:meth:`MiniBatchPlan.local_rows`), ``[L, S]``.
Metrics returned by every function are identical on every rank (reduced over the
data-parallel group where the data is split).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from covrl import checkpointing
from covrl.models import save_hf_checkpoint
from covrl.models.engine import TokenOutputs
from covrl.ops import sampled_entropy_change
from covrl.rollout import SamplingConfig, mismatch_metrics
from covrl.training.batch import MiniBatchPlan, RolloutBatch, RolloutTensors
from covrl.training.logger import PhaseTimer
from covrl.training.scoring import score_batch
from covrl.training.setup import HF_EXPORT_DIRNAME, Run, trainer_state
from covrl.training.update import UpdateResult, ppo_update

__all__ = [
    "LocalLogprobs",
    "collect_rollouts",
    "entropy_change",
    "export_hf",
    "old_logprobs",
    "save",
    "update_policy",
    "validate",
]


def generation_seed(seed: int, step: int, batch: int) -> int:
    """The vLLM seed of generation batch ``batch`` of step ``step`` (0: validation)."""
    return (seed << 32) + step * 1024 + batch


def _token_mean(values: torch.Tensor, mask: torch.Tensor, group) -> float:
    sums = torch.stack([(values.double() * mask).sum(), mask.double().sum()])
    dist.all_reduce(sums, group=group)
    return (sums[0] / sums[1].clamp(min=1)).item()


# ---------------------------------------------------------------------------- rollout
def collect_rollouts(run: Run, step: int, timer: PhaseTimer) -> tuple[RolloutBatch | None, dict]:
    """Generate, score and (DAPO) filter until ``train_batch_size`` informative prompts
    or ``max_num_gen_batches`` generation batches; keep whole mini-batches of groups.

    Returns the training samples (None when fewer than one mini-batch of groups is
    left) and the rollout metrics over every sample generated in the step.
    """
    cfg = run.config
    target, per_mb = cfg.data.train_batch_size, cfg.algorithm.ppo_mini_batch_size
    dynamic = cfg.algorithm.advantage.dynamic_sampling
    limit = cfg.algorithm.max_num_gen_batches
    generated = kept = None
    num_gen = timeouts = 0
    while True:
        indices = run.sampler.next_batch()
        records = [run.train_data[i] for i in indices]
        with timer("rollout"):
            gens = run.rollout.generate(
                [r.prompt_ids for r in records],
                cfg.sampling,
                seed=generation_seed(cfg.trainer.seed, step, num_gen + 1),
            )
        batch = RolloutBatch.from_generations(
            gens, indices, [r.data_source for r in records], group_offset=num_gen * target
        )
        with timer("reward"):
            timeouts += score_batch(
                batch, run.train_data, run.tokenizer, run.registry, run.rewards, dist.group.WORLD
            )
        num_gen += 1
        generated = batch if generated is None else (generated.extend(batch) or generated)
        if dynamic:
            batch, _ = batch.dynamic_sampling()
        kept = batch if kept is None else (kept.extend(batch) or kept)
        if not dynamic or kept.num_groups >= target or (limit and num_gen >= limit):
            break
    groups = min(kept.num_groups, target) // per_mb * per_mb
    metrics = generated.rollout_metrics()
    metrics.update(
        {
            "rollout/generation_batches": float(num_gen),
            "rollout/informative_prompts": float(kept.num_groups),
            "rollout/reward_timeouts": float(timeouts),
            "rollout/response_tokens": float(sum(len(r) for r in generated.response_ids)),
        }
    )
    return (kept.first_groups(groups) if groups else None), metrics


# ---------------------------------------------------------------------------- log-probs
@dataclass
class LocalLogprobs:
    """This rank's rows: old log-probs/entropies, the response mask, the rollout
    log-probs, the truncated IS weights and the reference log-probs (``[L, S]``)."""

    old: TokenOutputs
    mask: torch.Tensor
    rollout_logp: torch.Tensor
    weights: torch.Tensor | None
    ref_logp: torch.Tensor | None


def old_logprobs(
    run: Run, tensors: RolloutTensors, plan: MiniBatchPlan
) -> tuple[LocalLogprobs, dict]:
    """The trainer's log-probs of the sampled tokens before the update (and the
    reference policy's), with the rollout entropy and the rollout/trainer mismatch."""
    rows = plan.local_rows()
    ids, attn = tensors.input_ids[rows], tensors.attention_mask[rows]
    mask = tensors.response_mask[rows]
    old = run.engine.forward_logprobs(ids, attn)
    rollout_logp = tensors.rollout_logp[rows]
    ref = run.ref_engine.forward_logprobs(ids, attn).logp if run.ref_engine else None
    weights = run.config.algorithm.rollout_correction.weights(old.logp, rollout_logp, mask)
    metrics = {"rollout/entropy": _token_mean(old.entropy, mask, run.dp_group)}
    mismatch = mismatch_metrics(rollout_logp, old.logp, mask, group=run.dp_group)
    metrics.update({f"mismatch/{k}": v for k, v in mismatch.items()})
    return LocalLogprobs(old, mask, rollout_logp, weights, ref), metrics


# ---------------------------------------------------------------------------- update
def _update_metrics(results: list[UpdateResult]) -> dict[str, float]:
    """Means over the step's optimizer updates (over those that report a metric: some
    exist only when tokens were selected); entropy-control metrics under ``cov/``."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in results:
        row = {"loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr}
        row.update(r.metrics)
        for key, value in row.items():
            if key.startswith("entropy_control/"):
                tag = "cov/" + key.removeprefix("entropy_control/")
            elif key.startswith("cov/"):
                tag = key
            else:
                tag = f"train/{key}"
            sums[tag] = sums.get(tag, 0.0) + float(value)
            counts[tag] = counts.get(tag, 0) + 1
    out = {k: v / counts[k] for k, v in sums.items()}
    out["train/updates"] = float(len(results))
    out["train/skipped_updates"] = float(sum(not r.update_successful for r in results))
    return out


def update_policy(
    run: Run, tensors: RolloutTensors, plan: MiniBatchPlan, local: LocalLogprobs
) -> dict[str, float]:
    """``ppo_epochs`` passes of one optimizer step per mini-batch."""
    results = []
    for _ in range(run.config.algorithm.ppo_epochs):
        for k in range(plan.num_minibatches):
            batch = plan.policy_batch(
                k,
                tensors,
                local.old.logp,
                rollout_weights_local=local.weights,
                ref_logp_local=local.ref_logp,
            )
            results.append(
                ppo_update(
                    run.engine,
                    batch,
                    run.config.policy.loss,
                    step=run.engine.scheduler.num_steps,
                    dp_group=run.dp_group,
                )
            )
    return _update_metrics(results)


def entropy_change(
    run: Run, tensors: RolloutTensors, plan: MiniBatchPlan, local: LocalLogprobs
) -> dict[str, float]:
    """Measured change of the policy entropy on the step's tokens over the update phase,
    next to the first-order prediction ``-Cov(log pi, A)`` (the sampled-token form of
    :func:`covrl.ops.sampled_entropy_change` with step size 1: compare signs and
    correlation over steps, not magnitudes)."""
    rows = plan.local_rows()
    new = run.engine.forward_logprobs(tensors.input_ids[rows], tensors.attention_mask[rows])
    before = _token_mean(local.old.entropy, local.mask, run.dp_group)
    after = _token_mean(new.entropy, local.mask, run.dp_group)
    predicted = sampled_entropy_change(
        local.old.logp, tensors.advantages[rows], 1.0, local.mask, group=run.dp_group
    )
    return {
        "entropy_dynamics/measured_change": after - before,
        "entropy_dynamics/predicted_change": float(predicted.predicted_change),
        "entropy_dynamics/logp_adv_covariance": float(predicted.covariance),
    }


# ---------------------------------------------------------------------------- validation
def validate(run: Run, step: int) -> dict[str, float]:
    """Greedy accuracy and avg@k per data source on the validation prompts."""
    if run.val_data is None:
        return {}
    cfg, v = run.config, run.config.validation
    records = run.val_data.records
    prompts = [r.prompt_ids for r in records]
    sources = [r.data_source for r in records]
    metrics: dict[str, float] = {}
    runs = [("accuracy", SamplingConfig(n=1, temperature=0.0))]
    if v.k > 0:
        runs.append((f"avg@{v.k}", SamplingConfig(n=v.k, temperature=v.temperature, top_p=v.top_p)))
    for i, (name, sampling) in enumerate(runs):
        sampling.max_tokens = cfg.sampling.max_tokens
        sampling.stop_token_ids = list(cfg.sampling.stop_token_ids)
        gens = run.rollout.generate(
            prompts, sampling, seed=generation_seed(cfg.trainer.seed, step, 1000 + i)
        )
        batch = RolloutBatch.from_generations(gens, list(range(len(records))), sources, 0)
        score_batch(batch, run.val_data, run.tokenizer, run.registry, run.rewards, dist.group.WORLD)
        per_source: dict[str, list[float]] = {}
        for source, acc in zip(batch.data_source, batch.acc, strict=True):
            per_source.setdefault(source, []).append(acc)
        for source, accs in per_source.items():
            metrics[f"val/{source}/{name}"] = sum(accs) / len(accs)
        if name == "accuracy":
            metrics["val/accuracy"] = sum(sum(a) / len(a) for a in per_source.values()) / len(
                per_source
            )
            lengths = [len(r) for r in batch.response_ids]
            metrics["val/response_length_mean"] = sum(lengths) / len(lengths)
    return metrics


# ---------------------------------------------------------------------------- persistence
def save(run: Run, step: int) -> None:
    """Checkpoint model, optimizer, scheduler, RNG states and the trainer state."""
    checkpointing.save_checkpoint(
        run.checkpoint_root,
        step,
        run.engine.model,
        run.model_config,
        optimizer=run.engine.optimizer,
        scheduler=run.engine.scheduler,
        hf_source=run.config.policy.model_path,
        extra=trainer_state(run, step),
        overwrite=True,
    )


def export_hf(run: Run) -> str:
    """The trained policy as a Hugging Face checkpoint directory (with the tokenizer)."""
    path = run.run_dir / HF_EXPORT_DIRNAME
    save_hf_checkpoint(
        run.engine.model,
        run.model_config,
        path,
        copy_files_from=run.config.policy.model_path,
        overwrite=True,
    )
    return str(path)
