"""One PPO optimizer step on one mini-batch: the path from a batch to ``optimizer.step``.

:func:`ppo_update` is the single place where the pieces meet:

1. with Clip-Cov / KL-Cov and ``logp_source="current"``, a no-grad forward of the
   mini-batch gives the current parameters' log-probs (the paper's covariance);
2. :func:`covrl.algorithms.prepare_selection` selects the tokens over the whole
   mini-batch and the data-parallel group (canonical token ids from ``sample_index``),
   so the selection does not depend on the micro-batch split or the DP size;
3. :func:`covrl.algorithms.global_loss_count` gives the loss normaliser of the whole
   mini-batch (one all-reduce over DP);
4. :meth:`PolicyEngine.train_step` runs the gradient micro-batches through megatron's
   schedule; each micro-batch's loss is its share of the mini-batch loss
   (:func:`covrl.algorithms.aggregate_loss` with the global count) and the engine undoes
   megatron's micro-batch and DP averaging, so the applied gradient is that of the
   mini-batch loss. Callers never scale a loss.

Layout: every per-token tensor is this rank's DP shard ``[batch, seq]``, aligned as
:meth:`PolicyEngine.forward_logprobs` aligns log-probs (``logp[b, t]`` scores token
``t`` from its prefix). Under TP and PP every rank of a DP replica passes the same
shard; the loss runs on the last pipeline stage, the selection on every stage (each
stage's DP group holds the same tokens), and every rank returns the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from covrl.algorithms import (
    PolicyLossConfig,
    SelectionBatch,
    aggregate_loss,
    canonical_token_ids,
    compute_policy_loss,
    global_loss_count,
    kl_penalty,
    policy_metric_sums,
    prepare_selection,
)
from covrl.engine import PolicyEngine, TokenOutputs
from covrl.engine.packing import MicroBatch
from covrl.parallel import Group, rank_and_size
from covrl.training.batch import PolicyBatch

# Loss statistics are reported as token means: summed per micro-batch and over DP as
# (sum, count) pairs; this is the count's name in the engine's summed metrics.
_TOKENS = "num_tokens"


@dataclass
class UpdateResult:
    """Outcome of :func:`ppo_update`; every field is identical on every rank.

    Attributes:
        loss: the mini-batch loss (summed over micro-batches and DP ranks).
        grad_norm: global gradient norm before clipping.
        lr: learning rate of the step.
        update_successful: False if megatron's optimizer skipped the step.
        metrics: token means over the mini-batch of ``pg_clipfrac``, ``pg_clipfrac_dual``,
            ``approx_kl_k2``, ``approx_kl_k3``, ``entropy`` (and ``ref_kl`` with
            ``ref_logp``); ``num_tokens``; and the selection pass's
            ``entropy_control/*`` counts and ``cov/*`` covariance summary.
        selected: this rank's ``[batch, seq]`` bool mask of the tokens the
            entropy-control method acted on (None for method ``none``).
    """

    loss: float
    grad_norm: float
    lr: float
    update_successful: bool
    metrics: dict[str, float] = field(default_factory=dict)
    selected: torch.Tensor | None = None


def _check_engine(engine: PolicyEngine, config: PolicyLossConfig, dp_group) -> None:
    _, dp_size = rank_and_size(dp_group, "dp_group")
    if dp_size != engine.dp_size:
        raise ValueError(
            f"dp_group has {dp_size} ranks but the engine's data-parallel size is {engine.dp_size}"
        )
    if config.entropy_coeff != 0.0 and not engine.config.entropy_requires_grad:
        raise ValueError(
            f"entropy_coeff={config.entropy_coeff} needs an engine built with "
            "EngineConfig(entropy_requires_grad=True)"
        )


def _select(
    engine: PolicyEngine,
    batch: PolicyBatch,
    micro_batches: list[MicroBatch],
    config: PolicyLossConfig,
    step: int,
    dp_group,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The entropy-control selection of the mini-batch (None for method ``none``) and
    the selection pass's metrics."""
    ec = config.entropy_control
    if ec.method == "none" and not ec.covariance_summary:
        return None, {}
    current = None
    if ec.method == "none":
        # The summary alone (a diagnostic, e.g. GRPO's Table 1) is taken on the rollout
        # policy's log-probs: a no-grad forward per mini-batch for it would cost a third
        # of the update.
        current = batch.old_logp
    elif ec.logp_source == "current":
        if batch.old_logp_version == engine.weights_version:
            # No optimizer step since the old log-prob pass: they are the current ones
            # (the same forward on the same micro-batches), nothing new to compute.
            current = batch.old_logp
        else:
            current = engine.forward_logprobs(
                batch.input_ids, batch.attention_mask, micro_batches
            ).logp
    token_ids = canonical_token_ids(batch.sample_index, batch.response_mask)
    # One selection batch per gradient micro-batch: with scope="microbatch" each selects
    # on its own, as the public implementation does; with "minibatch" the split is moot.
    result = prepare_selection(
        [
            SelectionBatch(
                advantages=m.take(batch.advantages),
                old_logp=m.take(batch.old_logp),
                mask=m.take(batch.response_mask),
                token_ids=m.take(token_ids),
                logp=None if current is None else m.take(current),
            )
            for m in micro_batches
        ],
        config,
        step=step,
        group=dp_group,
    )
    if result.masks is None:
        return None, result.metrics
    selected = torch.zeros_like(batch.response_mask)
    for m, mask in zip(micro_batches, result.masks, strict=True):
        m.put(selected, mask)
    return selected, result.metrics


def ppo_update(
    engine: PolicyEngine,
    batch: PolicyBatch,
    config: PolicyLossConfig,
    *,
    step: int,
    dp_group: Group,
) -> UpdateResult:
    """One optimizer step of the policy loss over one mini-batch.

    Args:
        engine: a training engine (built with optimizer settings).
        batch: this rank's DP shard of the mini-batch (see :class:`PolicyBatch`).
        config: the policy loss, its aggregation and the entropy-control method.
        step: the optimizer step; with ``entropy_control.seed`` it fixes Clip-Cov's draw.
        dp_group: the data-parallel group the mini-batch is split over.

    Returns:
        :class:`UpdateResult`, identical on every rank.

    Collectives: every rank of the model-parallel world calls this with the same
    config and step (one no-grad forward with ``logp_source="current"``, the selection
    pass and the loss count over ``dp_group``, megatron's schedule and optimizer step).
    """
    batch.validate()
    if batch.old_logp is None:
        raise ValueError("PolicyBatch.old_logp is None: the update needs the old log-probs")
    _check_engine(engine, config, dp_group)
    batch = batch.to(engine.device)
    # The engine's micro-batches, used by the selection and the gradient passes alike.
    lengths = batch.lengths or engine.row_lengths(batch.attention_mask)
    micro_batches = engine.micro_batches(lengths)
    selected, selection_metrics = _select(engine, batch, micro_batches, config, step, dp_group)
    count = global_loss_count([batch.response_mask], config.loss_agg_mode, dp_group)

    def loss_fn(out: TokenOutputs, micro: dict[str, torch.Tensor]):
        result = compute_policy_loss(
            out.logp,
            old_logp=micro["old_logp"],
            advantages=micro["advantages"],
            mask=micro["response_mask"],
            config=config,
            selected=micro.get("selected"),
            entropy=out.entropy,
            ref_logp=micro.get("ref_logp"),
            rollout_weights=micro.get("rollout_weights"),
        )
        loss = aggregate_loss(
            result.token_loss,
            result.mask,
            config.loss_agg_mode,
            count,
            config.loss_norm_constant,
        )
        sums = policy_metric_sums(result, out.entropy)
        reported = {name: pair[0] for name, pair in sums.items()}
        reported[_TOKENS] = result.mask.sum()
        if "ref_logp" in micro:
            kl = kl_penalty(
                out.logp.detach(), micro["ref_logp"], config.kl_estimator, config.log_ratio_clamp
            )
            reported["ref_kl"] = torch.where(result.mask, kl, 0.0).sum()
        return loss, reported

    data = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "response_mask": batch.response_mask,
        "old_logp": batch.old_logp,
        "advantages": batch.advantages,
    }
    for name, value in (
        ("selected", selected),
        ("ref_logp", batch.ref_logp),
        ("rollout_weights", batch.rollout_weights),
    ):
        if value is not None:
            data[name] = value
    step_result = engine.train_step(data, loss_fn, micro_batches)

    sums = step_result.metrics
    tokens = sums.pop(_TOKENS)
    metrics = {name: value / max(tokens, 1.0) for name, value in sums.items()}
    metrics[_TOKENS] = tokens
    metrics.update(selection_metrics)
    return UpdateResult(
        loss=step_result.loss,
        grad_norm=step_result.grad_norm,
        lr=step_result.lr,
        update_successful=step_result.update_successful,
        metrics=metrics,
        selected=selected,
    )
