"""Train / inference mismatch: vLLM's rollout log-probs against the trainer's.

Both are log-probs of the same sampled tokens under the same weights, one computed by
vLLM's kernels, one by megatron-core's; they differ by numerics (bf16, fused kernels,
batch-dependent reductions) and, if weight sync is broken, by a lot. The metrics catch
a broken sync at once; the truncated importance-sampling weight corrects the policy
gradient for the remaining off-policyness (Yao et al., 2025; as in verl / slime).

Tensors are ``[batch, seq]`` with a ``mask`` selecting the response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from covrl.parallel import Group, all_reduce, rank_and_size


def mismatch_metrics(
    rollout_logp: torch.Tensor,
    train_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    group: Group,
    threshold: float = 0.1,
) -> dict[str, float]:
    """Token-level disagreement between rollout and trainer log-probs.

    Args:
        rollout_logp, train_logp: ``[batch, seq]`` log-probs of the same tokens.
        mask: ``[batch, seq]``, true on the tokens to compare.
        threshold: |delta| above which a token counts as mismatched.
        group: statistics are pooled over its ranks (e.g. the DP group, each rank
            passing its own shard; every rank gets the same values), or
            :data:`~covrl.parallel.SINGLE_PROCESS` for this rank's tokens alone.
    Returns:
        ``abs_diff_mean``, ``abs_diff_max`` (|train - rollout| over masked tokens),
        ``kl_k3`` (the k3 estimate of KL(rollout || train): mean of
        ``exp(d) - 1 - d`` with ``d = train - rollout``, unbiased for samples drawn
        from the rollout policy), ``frac_over_threshold`` and ``tokens``.
    """
    if rollout_logp.shape != train_logp.shape or mask.shape != train_logp.shape:
        raise ValueError(
            f"rollout_logp {tuple(rollout_logp.shape)}, train_logp {tuple(train_logp.shape)} "
            f"and mask {tuple(mask.shape)} must have the same shape"
        )
    # On the trainer's device (the rollout's tensors may come from the host).
    device = train_logp.device
    m = mask.to(device).bool()
    d = (train_logp.double() - rollout_logp.to(device).double())[m]
    sums = torch.stack(
        [
            d.abs().sum(),
            (torch.expm1(d) - d).sum(),
            (d.abs() > threshold).double().sum(),
            torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device),
        ]
    )
    peak = d.abs().max() if d.numel() else torch.zeros((), dtype=torch.float64, device=d.device)
    peak = peak.reshape(1)
    if rank_and_size(group)[1] > 1:
        all_reduce(sums, group)
        all_reduce(peak, group, op=dist.ReduceOp.MAX)
    abs_sum, k3_sum, over, count = sums.tolist()
    denom = max(count, 1.0)
    return {
        "abs_diff_mean": abs_sum / denom,
        "abs_diff_max": float(peak.item()),
        "kl_k3": k3_sum / denom,
        "frac_over_threshold": over / denom,
        "tokens": count,
    }


def truncated_is_weights(
    train_old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    cap: float = 2.0,
) -> torch.Tensor:
    """Truncated importance-sampling weights ``min(exp(train_old - rollout), cap)``.

    ``[batch, seq]`` float32 on ``train_old_logp``'s device, no gradient, 0 where
    ``mask`` is false. Multiply the
    per-token policy-gradient loss by it to correct for sampling from vLLM's policy
    instead of the trainer's.
    """
    if cap <= 0:
        raise ValueError(f"truncated IS cap={cap} must be > 0")
    with torch.no_grad():
        device = train_old_logp.device
        log_ratio = train_old_logp.double() - rollout_logp.to(device).double()
        w = torch.exp(log_ratio.clamp(max=50.0)).clamp(max=cap).float()
        if mask is not None:
            w = w * mask.to(device=device, dtype=w.dtype)
    return w


@dataclass
class RolloutCorrectionConfig:
    """Off-policy correction for the rollout / trainer mismatch.

    ``mode``: ``"none"`` or ``"tis"`` (truncated importance sampling with ``cap``).
    """

    mode: str = "none"
    cap: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in ("none", "tis"):
            raise ValueError(f"mode={self.mode!r}: expected 'none' or 'tis'")
        if not self.cap > 0:
            raise ValueError(f"cap={self.cap}: expected a value > 0")

    def weights(
        self, train_old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The per-token weights for ``PolicyBatch.rollout_weights``, or None."""
        if self.mode == "none":
            return None
        return truncated_is_weights(train_old_logp, rollout_logp, mask, self.cap)
