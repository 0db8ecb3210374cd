"""The phases of one training step, each a function the driver calls in order.

Tensor layout: a step's :class:`PolicyBatch` holds this rank's rows of every
mini-batch (``[L, S]``, mini-batch order, on the engine's device; see
:mod:`covrl.training.batch`). Metrics returned by every function are identical on
every rank (reduced over the data-parallel group where the data is split).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from covrl.ops import sampled_entropy_change
from covrl.parallel import all_reduce
from covrl.rollout import Generations, SamplingConfig, mismatch_metrics
from covrl.training.batch import (
    MiniBatchLayout,
    PolicyBatch,
    dynamic_sampling,
    rank_batch,
    rollout_metrics,
)
from covrl.training.logger import PhaseTimer
from covrl.training.scoring import score_batch
from covrl.training.setup import HF_EXPORT_DIRNAME, Run, trainer_state
from covrl.training.update import UpdateResult, ppo_update

__all__ = [
    "collect_rollouts",
    "entropy_change",
    "export_hf",
    "old_logprobs",
    "policy_batch",
    "save",
    "update_policy",
    "validate",
]


def generation_seed(seed: int, step: int, batch: int) -> int:
    """The vLLM seed of generation batch ``batch`` of step ``step`` (0: validation)."""
    return (seed << 32) + step * 1024 + batch


def _token_mean(values: torch.Tensor, mask: torch.Tensor, group) -> float:
    """Mean of ``values`` over the ``mask`` tokens of every rank of ``group``."""
    sums = torch.stack([(values.double() * mask).sum(), mask.double().sum()])
    all_reduce(sums, group)
    return (sums[0] / sums[1].clamp(min=1)).item()


def _generate(run: Run, prompts: list[list[int]], sampling: SamplingConfig, seed: int, timer):
    """Generate with the trainer's current weights (synced first when vLLM's are stale)."""
    with timer("sync"):
        sync = run.colocation.rollout_phase()
    with timer("rollout"):
        return run.rollout.generate(prompts, sampling, seed=seed), sync


# ---------------------------------------------------------------------------- rollout
def collect_rollouts(run: Run, step: int, timer: PhaseTimer) -> tuple[Generations | None, dict]:
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
    metrics: dict[str, float] = {}
    while True:
        indices = run.sampler.next_batch()
        records = [run.train_data[i] for i in indices]
        gens, sync = _generate(
            run,
            [r.prompt_ids for r in records],
            cfg.sampling,
            generation_seed(cfg.trainer.seed, step, num_gen + 1),
            timer,
        )
        metrics.update(sync)
        gens.annotate(indices, [r.data_source for r in records], group_offset=num_gen * target)
        with timer("reward"):
            timeouts += score_batch(
                gens, run.train_data, run.tokenizer, run.registry, run.rewards, dist.group.WORLD
            )
        num_gen += 1
        generated = gens if generated is None else (generated.extend(gens) or generated)
        if dynamic:
            gens = dynamic_sampling(gens)
        kept = gens if kept is None else (kept.extend(gens) or kept)
        if not dynamic or kept.num_groups >= target or (limit and num_gen >= limit):
            break
    groups = min(kept.num_groups, target) // per_mb * per_mb
    metrics.update(rollout_metrics(generated))
    metrics.update(
        {
            "rollout/generation_batches": float(num_gen),
            "rollout/informative_prompts": float(kept.num_groups),
            "rollout/reward_timeouts": float(timeouts),
        }
    )
    return (kept.first_groups(groups) if groups else None), metrics


def policy_batch(run: Run, samples: Generations) -> tuple[PolicyBatch, MiniBatchLayout]:
    """This rank's batch of the step's samples and its mini-batch layout (the ranks'
    shares balanced by tokens)."""
    cfg = run.config
    layout = MiniBatchLayout(
        num_minibatches=samples.num_groups // cfg.algorithm.ppo_mini_batch_size,
        rows_per_minibatch=cfg.algorithm.ppo_mini_batch_size * cfg.sampling.n,
        dp_size=run.engine.dp_size,
        dp_rank=run.engine.dp_rank,
        lengths=tuple(
            len(p) + len(r) for p, r in zip(samples.prompt_ids, samples.response_ids, strict=True)
        ),
        equal_rows=cfg.policy.engine.max_tokens_per_micro_batch is None,
    )
    batch = rank_batch(
        samples,
        layout,
        cfg.algorithm.advantage,
        pad_token_id=run.tokenizer.pad_token_id or 0,
        device=run.engine.device,
    )
    return batch, layout


# ---------------------------------------------------------------------------- log-probs
def _logprobs(
    engine, batch: PolicyBatch, layout: MiniBatchLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """``engine``'s log-probs and entropies of the batch, mini-batch by mini-batch (the
    micro-batches the updates will use, so an unchanged policy gives them bit for bit)."""
    logp = torch.zeros_like(batch.advantages)
    entropy = torch.zeros_like(batch.advantages)
    for k in range(layout.num_minibatches):
        rows = layout.minibatch(k)
        part = batch.rows(rows)
        out = engine.forward_logprobs(part.input_ids, part.attention_mask, lengths=part.lengths)
        logp[rows], entropy[rows] = out.logp, out.entropy
    return logp, entropy


def old_logprobs(run: Run, batch: PolicyBatch, layout: MiniBatchLayout) -> dict[str, float]:
    """The trainer's log-probs and entropies of the sampled tokens before the update
    (and the reference policy's, and the rollout correction's weights), filled into
    ``batch``; returns the rollout entropy and the rollout/trainer mismatch."""
    engine = run.engine
    batch.old_logp, batch.old_entropy = _logprobs(engine, batch, layout)
    batch.old_logp_version = engine.weights_version
    if run.ref_engine is not None:
        batch.ref_logp, _ = _logprobs(run.ref_engine, batch, layout)
    batch.rollout_weights = run.config.algorithm.rollout_correction.weights(
        batch.old_logp, batch.rollout_logp, batch.response_mask
    )
    group = run.engine.dp_group
    metrics = {"rollout/entropy": _token_mean(batch.old_entropy, batch.response_mask, group)}
    mismatch = mismatch_metrics(
        batch.rollout_logp, batch.old_logp, batch.response_mask, group=group
    )
    metrics.update({f"mismatch/{k}": v for k, v in mismatch.items()})
    return metrics


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
    run: Run, batch: PolicyBatch, layout: MiniBatchLayout, step: int, entropy: float
) -> dict[str, float]:
    """``ppo_epochs`` passes of one optimizer step per mini-batch. With an entropy
    target, the controller first sets the step's knob from the rollout entropy (one
    value for the whole step, the same on every rank)."""
    loss = run.config.policy.loss
    control = {}
    if run.entropy_target is not None:
        run.entropy_target.update(step, entropy)
        loss = run.entropy_target.apply(loss)
        control = run.entropy_target.metrics()
    results = []
    for _ in range(run.config.algorithm.ppo_epochs):
        for k in range(layout.num_minibatches):
            results.append(
                ppo_update(
                    run.engine,
                    batch.rows(layout.minibatch(k)),
                    loss,
                    step=run.engine.num_steps,
                    dp_group=run.engine.dp_group,
                )
            )
    return {**_update_metrics(results), **control}


def entropy_change(run: Run, batch: PolicyBatch, layout: MiniBatchLayout) -> dict[str, float]:
    """Measured change of the policy entropy on the step's tokens over the update phase,
    next to the first-order prediction ``-Cov(log pi, A)`` (the sampled-token form of
    :func:`covrl.ops.sampled_entropy_change` with step size 1: compare signs and
    correlation over steps, not magnitudes)."""
    group = run.engine.dp_group
    _, new_entropy = _logprobs(run.engine, batch, layout)
    before = _token_mean(batch.old_entropy, batch.response_mask, group)
    after = _token_mean(new_entropy, batch.response_mask, group)
    predicted = sampled_entropy_change(
        batch.old_logp, batch.advantages, 1.0, batch.response_mask, group=group
    )
    return {
        "entropy_dynamics/measured_change": after - before,
        "entropy_dynamics/predicted_change": float(predicted.predicted_change),
        "entropy_dynamics/logp_adv_covariance": float(predicted.covariance),
    }


# ---------------------------------------------------------------------------- validation
def validate(run: Run, step: int, timer: PhaseTimer | None = None) -> dict[str, float]:
    """Greedy accuracy and avg@k per data source on the validation prompts."""
    if run.val_data is None:
        return {}
    timer = timer or PhaseTimer()
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
        gens, sync = _generate(
            run, prompts, sampling, generation_seed(cfg.trainer.seed, step, 1000 + i), timer
        )
        metrics.update(sync)
        gens.annotate(list(range(len(records))), sources, group_offset=0)
        score_batch(gens, run.val_data, run.tokenizer, run.registry, run.rewards, dist.group.WORLD)
        per_source: dict[str, list[float]] = {}
        for source, acc in zip(gens.data_source, gens.acc, strict=True):
            per_source.setdefault(source, []).append(acc)
        for source, accs in per_source.items():
            metrics[f"val/{source}/{name}"] = sum(accs) / len(accs)
        if name == "accuracy":
            metrics["val/accuracy"] = sum(sum(a) / len(a) for a in per_source.values()) / len(
                per_source
            )
            lengths = gens.response_lengths
            metrics["val/response_length_mean"] = sum(lengths) / len(lengths)
    return metrics


# ---------------------------------------------------------------------------- persistence
def save(run: Run, step: int) -> None:
    """Checkpoint model, optimizer, scheduler, RNG states and the trainer state."""
    run.engine.save_checkpoint(
        run.checkpoint_root,
        step,
        hf_source=run.config.policy.model_path,
        extra=trainer_state(run, step),
        overwrite=True,
    )


def export_hf(run: Run) -> str:
    """The trained policy as a Hugging Face checkpoint directory (with the tokenizer)."""
    path = run.run_dir / HF_EXPORT_DIRNAME
    run.engine.export_hf(path, copy_files_from=run.config.policy.model_path)
    return str(path)
