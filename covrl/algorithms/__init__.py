"""RL algorithms: advantages, policy losses, covariance-based entropy control (Clip-Cov,
KL-Cov), loss aggregation and step metrics.

One optimizer mini-batch goes through :func:`covrl.training.ppo_update`, which wires
these pieces to the megatron policy::

    from covrl.algorithms import EntropyControlConfig, PolicyLossConfig
    from covrl.training import PolicyBatch, ppo_update

    # Clip-Cov as in the paper (r = 2e-4, omega = (1, 5), PPO clip range 1 / 1).
    cfg = PolicyLossConfig(entropy_control=EntropyControlConfig(method="clip_cov"))
    batch = PolicyBatch(input_ids=ids, attention_mask=attn, response_mask=response,
                        sample_index=rows, old_logp=old_logp, advantages=adv)
    result = ppo_update(engine, batch, cfg, step=step, dp_group=dp_group)

Inside it, per mini-batch (``current`` from a no-grad forward when
``logp_source="current"``; ``mbs`` the engine's micro-batch slices)::

    token_ids = canonical_token_ids(sample_index, response_mask)
    sel = prepare_selection(
        [SelectionBatch(advantages=adv[m], old_logp=old_logp[m], mask=response_mask[m],
                        token_ids=token_ids[m], logp=current[m]) for m in mbs],
        cfg, step=step, group=dp_group)
    count = global_loss_count([response_mask], cfg.loss_agg_mode, dp_group)
    # per gradient micro-batch, in the engine's loss function:
    out = compute_policy_loss(logp, old_logp=old_logp, advantages=adv, mask=mask,
                              config=cfg, selected=selected)
    loss = aggregate_loss(out.token_loss, mask, cfg.loss_agg_mode, count,
                          cfg.loss_norm_constant)

and :meth:`covrl.engine.PolicyEngine.train_step` multiplies each micro-batch
loss by :func:`megatron_loss_scale` before megatron's backward.
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
    megatron_loss_scale,
)
from covrl.algorithms.config import (
    AdvantageConfig,
    ClipCovConfig,
    EntropyControlConfig,
    EntropyTargetConfig,
    KLCovConfig,
    PolicyLossConfig,
    selection_count,
)
from covrl.algorithms.entropy_target import EntropyTargetController
from covrl.algorithms.metrics import (
    covariance_summary,
    policy_metric_sums,
    reduce_metric_sums,
)
from covrl.algorithms.policy_loss import (
    PolicyLossOutput,
    compute_policy_loss,
    kl_penalty,
    ppo_surrogate,
)
from covrl.algorithms.selection import SelectionResult, prepare_selection
from covrl.algorithms.tokens import SelectionBatch, canonical_token_ids

__all__ = [
    "AdvantageConfig",
    "ClipCovConfig",
    "DynamicSamplingResult",
    "EntropyControlConfig",
    "EntropyTargetConfig",
    "EntropyTargetController",
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
    "covariance_summary",
    "dynamic_sampling_filter",
    "global_loss_count",
    "grpo_advantages",
    "kl_penalty",
    "megatron_loss_scale",
    "policy_metric_sums",
    "ppo_surrogate",
    "prepare_selection",
    "reduce_metric_sums",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "selection_count",
]
