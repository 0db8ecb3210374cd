"""RL algorithms: advantages, policy losses, covariance-based entropy control (Clip-Cov,
KL-Cov), loss aggregation and step metrics.

Per optimizer mini-batch, on the ranks that hold log-probs (last pipeline stage)::

    masks = [mb.mask for mb in micro_batches]
    count = global_loss_count(masks, cfg.loss_agg_mode, dp_group)
    sel = prepare_selection(
        [SelectionBatch(mb.adv, mb.old_logp, mb.mask,
                        canonical_token_ids(mb.sample_index, mb.mask),
                        logp=current_logp_no_grad(mb))        # logp_source="current"
         for mb in micro_batches],
        cfg, step=step, group=dp_group)
    for i, mb in enumerate(micro_batches):                    # gradient micro-batches
        out = compute_policy_loss(logp, mb.old_logp, mb.adv, mb.mask, cfg,
                                  selected=sel.masks[i] if sel.masks else None)
        loss = aggregate_loss(out.token_loss, mb.mask, cfg.loss_agg_mode, count,
                              cfg.loss_norm_constant)
        (loss * megatron_loss_scale(num_microbatches, dp_size)).backward()
"""

from covrl.algorithms.advantages import (
    DynamicSamplingResult,
    broadcast_to_tokens,
    compute_advantages,
    dynamic_sampling_filter,
    grpo_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from covrl.algorithms.aggregation import (
    aggregate_loss,
    global_loss_count,
    local_loss_count,
    loss_terms,
    megatron_loss_scale,
)
from covrl.algorithms.config import (
    AdvantageConfig,
    ClipCovConfig,
    EntropyControlConfig,
    KLCovConfig,
    PolicyLossConfig,
)
from covrl.algorithms.covariance import (
    CovarianceMeans,
    SelectionBatch,
    canonical_token_ids,
    covariance_means,
    token_covariance,
)
from covrl.algorithms.metrics import (
    covariance_summary,
    kth_largest,
    policy_metric_sums,
    reduce_metric_sums,
)
from covrl.algorithms.policy_loss import (
    PolicyLossOutput,
    compute_policy_loss,
    kl_penalty,
    ppo_surrogate,
)
from covrl.algorithms.selection import (
    SelectionResult,
    prepare_selection,
    select_top_k,
    top_k_threshold,
    uniform_keys,
)

__all__ = [
    "AdvantageConfig",
    "ClipCovConfig",
    "CovarianceMeans",
    "DynamicSamplingResult",
    "EntropyControlConfig",
    "KLCovConfig",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "SelectionBatch",
    "SelectionResult",
    "aggregate_loss",
    "broadcast_to_tokens",
    "canonical_token_ids",
    "compute_advantages",
    "compute_policy_loss",
    "covariance_means",
    "covariance_summary",
    "dynamic_sampling_filter",
    "global_loss_count",
    "grpo_advantages",
    "kl_penalty",
    "kth_largest",
    "local_loss_count",
    "loss_terms",
    "megatron_loss_scale",
    "policy_metric_sums",
    "ppo_surrogate",
    "prepare_selection",
    "reduce_metric_sums",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "select_top_k",
    "token_covariance",
    "top_k_threshold",
    "uniform_keys",
]
