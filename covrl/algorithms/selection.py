"""Clip-Cov and KL-Cov token selection over a scope (the optimizer mini-batch).

With ``cov = (logp - mean logp) * (A - mean A)`` over the scope's valid tokens
(:func:`covrl.ops.token_covariance.centered_product`, means over the whole scope) and
``K = max(1, floor(ratio * N))`` (:func:`covrl.algorithms.config.selection_count`):

* KL-Cov: the ``K`` tokens with the largest covariance;
* Clip-Cov: among the tokens inside the band ``omega_low < cov < omega_high`` that the
  PPO clip does not already silence, ``K`` drawn uniformly without replacement: those
  with the smallest key ``hash(seed, step, token id)``
  (:class:`covrl.ops.hashing.UniformKeys`), a draw every rank reproduces from (seed,
  step) alone.

Both take the ``K`` greatest of a strict order, ties broken by the canonical token id
(:mod:`covrl.algorithms.tokens`), with the exact distributed top-``k`` of
:mod:`covrl.ops.distributed_topk`: the selected set is a function of the scope's data,
not of how it is split into micro-batches or data-parallel ranks.

Per-token work (scope sums, covariance, KL-Cov's running top ``K + 1``, Clip-Cov's band
candidates) runs in blocks of the concatenated micro-batches
(:class:`covrl.ops.token_blocks.TokenBlocks`). Clip-Cov hashes only its band
candidates, and the key's low lane only for those whose high lane can reach the draw.

Numerics: covariances are float64, from float64 sums all-reduced over the group. A
sum's last bits depend on the order of summation, so two layouts agree exactly unless
a covariance lies within about 1e-15 (relative) of the selection boundary or of a
Clip-Cov band edge without being equal to it. Exact ties (equal log-probs and
advantages) stay exact ties under any layout and break by id.

Cost per mini-batch: one all-reduce of a few float64 sums (means, count, input check),
two all-gathers of at most ``K`` values / ids per rank, a few scalar host syncs per
block, and ``O(n)`` device work; no per-token data leaves the device. The public
implementation copies the covariance to the host and runs a CPU top-k or random
choice on every micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from covrl.algorithms.config import PolicyLossConfig, selection_count
from covrl.algorithms.metrics import CovarianceSummary
from covrl.algorithms.policy_loss import ppo_surrogate
from covrl.algorithms.tokens import SelectionBatch
from covrl.ops.distributed_topk import Candidates, RunningTop, TopK, top_k, top_k_of_local
from covrl.ops.hashing import UniformKeys
from covrl.ops.masking import PaddingZeroer, as_bool_mask
from covrl.ops.token_blocks import Block, TokenBlocks
from covrl.ops.token_covariance import CovarianceMeans, centered_product, check_scope_sums
from covrl.parallel.groups import SINGLE_PROCESS, Group, all_reduce, check_group


@dataclass
class SelectionResult:
    """Output of :func:`prepare_selection`.

    Attributes:
        masks: one ``[b, s]`` bool mask per input micro-batch (same order), or None
            when the method is ``none``. Pass ``masks[i]`` as ``selected`` to
            :func:`covrl.algorithms.policy_loss.compute_policy_loss`.
        metrics: scalars, identical on every rank of the group:
            ``entropy_control/num_tokens``, ``.../selected_tokens``,
            ``.../selected_fraction``, ``.../candidates`` (Clip-Cov), and with
            ``covariance_summary`` ``cov/mean`` and ``cov/top_<pct>`` (mean covariance
            of the top fraction of tokens, over the mini-batch scope).
    """

    masks: list[torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)


# --- The scope's local tokens ---------------------------------------------------------


def _local_tokens(batches: Sequence[SelectionBatch], use_current: bool) -> TokenBlocks:
    """This rank's micro-batches as one flat token sequence, with the fields
    ``mask``, ``advantages``, ``old_logp``, ``cur_logp`` (None unless
    ``use_current``), ``cov_logp`` (the covariance's log-prob: ``cur_logp`` or
    ``old_logp``) and ``ids``."""
    segments = []
    for b in batches:
        cur = b.logp.detach().reshape(-1) if use_current else None
        old = b.old_logp.detach().reshape(-1)
        segments.append(
            dict(
                mask=as_bool_mask(b.mask).reshape(-1),
                advantages=b.advantages.detach().reshape(-1),
                old_logp=old,
                cov_logp=old if cur is None else cur,
                cur_logp=cur,
                ids=b.token_ids.reshape(-1),
            )
        )
    return TokenBlocks(segments, [b.mask.shape for b in batches], batches[0].mask.device)


def _scope_sums(tokens: TokenBlocks, check_old: bool) -> torch.Tensor:
    """Local float64 ``[sum logp, sum A, (0 * sum old_logp,) count]`` over valid tokens.

    ``logp`` is the covariance's log-prob. ``old_logp`` is only checked: ``0 * x``
    summed is 0 if every ``x`` is finite, else NaN.
    """
    total = None
    for block in tokens.blocks():
        m = block["mask"]
        zero = PaddingZeroer(m)
        parts = [
            zero(block["cov_logp"]).sum(dtype=torch.float64),
            zero(block["advantages"]).sum(dtype=torch.float64),
        ]
        if check_old:
            parts.append(zero(block["old_logp"]).mul_(0).sum().double())
        parts.append(torch.count_nonzero(m).double())
        sums = torch.stack(parts)
        total = sums if total is None else total.add_(sums)
    return total


def _selected_sums(
    tokens: TokenBlocks, selected: torch.Tensor, mean_adv: torch.Tensor
) -> torch.Tensor:
    """Local float64 ``[#selected with A > mean A, sum of their p, sum of p over every
    valid token]`` (``p = exp(logp)``, the covariance's log-prob)."""
    sums = torch.zeros(3, dtype=torch.float64, device=tokens.device)
    for seg, sel in zip(tokens.segments, tokens.flat_parts(selected), strict=True):
        prob = seg["cov_logp"].double().exp()
        sums[0] += (seg["advantages"][sel].double() > mean_adv).sum()
        sums[1] += prob[sel].sum()
        sums[2] += prob[seg["mask"]].sum()
    return sums


# --- Covariance -----------------------------------------------------------------------


def _block_covariance(block: Block, means: CovarianceMeans, fill: bool) -> torch.Tensor:
    """``[size]`` float64 covariance of a block; padding is ``-inf`` with ``fill``, else
    a finite value."""
    m = block["mask"]
    zero = PaddingZeroer(m)
    cov = centered_product(
        zero(block["cov_logp"]), zero(block["advantages"]), means, overwrite_inputs=True
    )
    if fill:
        cov = torch.where(m, cov, cov.new_tensor(float("-inf")), out=cov)
    return cov


def _covariance_at(block: Block, pos: torch.Tensor, means: CovarianceMeans) -> torch.Tensor:
    """``[p]`` float64 covariance at the valid block positions ``pos``: the values of
    :func:`_block_covariance` there, bit for bit."""
    return centered_product(
        block.take("cov_logp", pos), block.take("advantages", pos), means, overwrite_inputs=True
    )


# --- KL-Cov: the K largest covariances -------------------------------------------------


def _top_covariance(
    tokens: TokenBlocks,
    means: CovarianceMeans,
    k: int,
    group: Group,
    summary: CovarianceSummary | None,
) -> TopK | None:
    """The scope's ``k`` largest covariances, from a running top ``k + 1`` of the local
    blocks (each block's covariance also fed to ``summary``)."""
    running = RunningTop(k + 1)
    for block in tokens.blocks():
        cov = _block_covariance(block, means, fill=True)
        running.add(cov, block["ids"], block.start)
        if summary is not None:
            summary.add(cov)

    def at_least(v: torch.Tensor) -> Candidates:
        parts = []
        for block in tokens.blocks():
            cov = _block_covariance(block, means, fill=True)
            parts.append(
                Candidates.at(cov, block["ids"], torch.nonzero(cov >= v).squeeze(1), block.start)
            )
        return Candidates.cat(parts)

    return top_k_of_local(running.result(), at_least, k, group)


# --- Clip-Cov: a uniform draw among the band's not-clipped tokens ---------------------


@dataclass
class _Band:
    """``[c]`` positions (into the scope's local tokens), ids, and loss inputs of band
    tokens."""

    positions: torch.Tensor
    ids: torch.Tensor
    old_logp: torch.Tensor
    cur_logp: torch.Tensor | None
    advantages: torch.Tensor

    @staticmethod
    def of_block(cov: torch.Tensor, block: Block, config: PolicyLossConfig) -> _Band:
        """The valid tokens of a block inside the band ``omega_low < cov < omega_high``."""
        cc = config.entropy_control.clip_cov
        band = (cov > cc.omega_low) & (cov < cc.omega_high) & block["mask"]
        pos = torch.nonzero(band).squeeze(1)
        use_current = config.entropy_control.logp_source == "current"
        return _Band(
            pos + block.start,
            block.take("ids", pos),
            block.take("old_logp", pos),
            block.take("cur_logp", pos) if use_current else None,
            block.take("advantages", pos),
        )

    @staticmethod
    def cat(parts: Sequence[_Band]) -> _Band:
        if len(parts) == 1:
            return parts[0]
        return _Band(
            *(
                None
                if getattr(parts[0], f.name) is None
                else torch.cat([getattr(p, f.name) for p in parts])
                for f in fields(_Band)
            )
        )

    def not_clipped(self, config: PolicyLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and ids of the tokens the PPO clip does not already silence (they
        would waste the budget; needs the current logp, else all). Same dtype and
        elementwise formula as the loss, so the flags agree with what the loss will do.
        """
        if self.cur_logp is None:
            return self.positions, self.ids
        log_ratio = (self.cur_logp - self.old_logp).clamp(
            -config.log_ratio_clamp, config.log_ratio_clamp
        )
        _, clipped, dual = ppo_surrogate(
            torch.exp(log_ratio),
            self.advantages,
            *config.clip_range,
            config.clip_ratio_c,
        )
        keep = torch.nonzero(~(clipped | dual)).squeeze(1)
        return self.positions.index_select(0, keep), self.ids.index_select(0, keep)


def _uniform_draw(ids: torch.Tensor, k: int, keys: UniformKeys, group: Group) -> TopK | None:
    """The ``k`` candidates (``ids`` ``[c]``) of the scope with the smallest keys;
    positions into ``ids``.

    Lazy hashing: a key's high lane orders it unless two high lanes tie, so only the
    local candidates whose high lane is among the ``k`` smallest (ties included) can be
    in the scope's draw; only those get the low lane. Exact, at about half the hashing.
    """
    high = keys.high(ids)
    short = torch.arange(ids.numel(), device=ids.device)
    if ids.numel() > k:
        cut = torch.topk(high, k, largest=False, sorted=False).values.max()
        short = torch.nonzero(high <= cut).squeeze(1)
    short_ids = ids.index_select(0, short)
    key = keys.combine(high.index_select(0, short), keys.low(short_ids))
    result = top_k(-key, short_ids, k, group)  # smallest key first
    if result is not None:
        result.positions = short.index_select(0, result.positions)
    return result


# --- The selection pass ---------------------------------------------------------------


def _select_in_scope(
    tokens: TokenBlocks,
    means: CovarianceMeans,
    config: PolicyLossConfig,
    step: int,
    group: Group,
    summary: CovarianceSummary | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` bool selection of one scope's local tokens, and the local candidate
    count (int64 scalar tensor; 0 for KL-Cov).

    Each block's covariance is also fed to ``summary`` when given.
    """
    ec = config.entropy_control
    k = selection_count(ec.selection_ratio, means.count)
    selected = torch.zeros(tokens.numel, dtype=torch.bool, device=tokens.device)
    if ec.method == "kl_cov":
        chosen = _top_covariance(tokens, means, k, group, summary)
        if chosen is not None:
            selected[chosen.positions] = True
        return selected, torch.zeros((), dtype=torch.int64, device=tokens.device)

    bands = []
    for block in tokens.blocks():
        cov = _block_covariance(block, means, fill=False)
        bands.append(_Band.of_block(cov, block, config))
        if summary is not None:
            summary.add(cov, block["mask"])
    pos, ids = _Band.cat(bands).not_clipped(config)
    chosen = _uniform_draw(ids, k, UniformKeys(ec.seed, step), group)
    if chosen is not None:
        selected[pos.index_select(0, chosen.positions)] = True
    return selected, torch.tensor(pos.numel(), dtype=torch.int64, device=tokens.device)


def _select_per_microbatch(
    batches: Sequence[SelectionBatch], config: PolicyLossConfig, step: int, use_current: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scope="microbatch"``: each local micro-batch selects alone, with its own means
    and count (the public implementation's behaviour). Same outputs as
    :func:`_select_in_scope` over the concatenated micro-batches."""
    parts, candidates = [], []
    for b in batches:
        tokens = _local_tokens([b], use_current)
        sums = _scope_sums(tokens, check_old=False)
        means = CovarianceMeans.from_sums(sums, sums.tolist())
        selected, n_candidates = _select_in_scope(tokens, means, config, step, SINGLE_PROCESS)
        parts.append(selected)
        candidates.append(n_candidates)
    return torch.cat(parts), torch.stack(candidates).sum()


def _covariance_summary(
    tokens: TokenBlocks,
    means: CovarianceMeans,
    summary: CovarianceSummary,
    group: Group,
) -> dict[str, float]:
    """:meth:`CovarianceSummary.result` of a scope whose blocks were fed in order."""
    blocks = list(tokens.blocks())
    return summary.result(means.count, lambda i, pos: _covariance_at(blocks[i], pos, means), group)


def prepare_selection(
    batches: Sequence[SelectionBatch],
    config: PolicyLossConfig,
    *,
    step: int,
    group: Group,
) -> SelectionResult:
    """Select the Clip-Cov / KL-Cov tokens of one optimizer mini-batch.

    Call once per mini-batch, before its gradient micro-batches, with every local
    micro-batch of the mini-batch (same tensors/layout the loss will see) on every rank
    of ``group``. ``group`` is the group across which the mini-batch's tokens are
    partitioned: the data-parallel group (with context parallelism, DP x CP); run on
    the ranks that hold log-probs (the last pipeline stage); ``SINGLE_PROCESS`` when this
    process holds the whole mini-batch. ``None`` is refused (TypeError): a forgotten
    group must not turn a data-parallel job's selection into a per-rank one.

    With ``entropy_control.logp_source == "current"`` each batch's ``logp`` must be the
    current parameters' log-probs, from a no-grad forward of the mini-batch (one extra
    forward per mini-batch, about a third of the update's compute; with no dropout it
    equals the gradient pass's forward). ``"old"`` uses ``old_logp`` and costs nothing
    extra, at the price of a covariance one or more updates stale.

    Args:
        batches: the mini-batch's local micro-batches (at least one).
        config: the loss config (method, scope, seed, clip ranges).
        step: optimizer step; with ``entropy_control.seed`` it fixes Clip-Cov's draw.
        group: see above.

    Raises:
        ValueError: on every rank of the group if any rank has NaN/inf at a valid
            position of ``advantages``, ``old_logp`` or ``logp`` (with
            ``config.check_finite``), naming the tensor.

    Collectives: every rank of ``group`` must call this with the same config and step.
    Host syncs: a handful of scalars per call; no per-token data leaves the device.
    """
    check_group(group)
    ec = config.entropy_control
    use_current = ec.logp_source == "current"
    if not batches:
        raise ValueError("prepare_selection needs at least one micro-batch")
    for i, b in enumerate(batches):
        b.validate()
        if use_current and b.logp is None:
            raise ValueError(
                f"batches[{i}].logp is None but entropy_control.logp_source='current' "
                "needs the current parameters' log-probs"
            )
    tokens = _local_tokens(batches, use_current)

    # One float64 all-reduce of the scope sums: means, count, and the input check.
    sums = all_reduce(_scope_sums(tokens, check_old=use_current), group)
    values = sums.tolist()
    if config.check_finite:
        local = {
            ("logp" if use_current else "old_logp"): [
                b.logp if use_current else b.old_logp for b in batches
            ],
            "advantages": [b.advantages for b in batches],
        }
        if use_current:
            local["old_logp"] = [b.old_logp for b in batches]
        check_scope_sums(values[:-1], local, [b.mask for b in batches])
    means = CovarianceMeans.from_sums(sums, values)
    num_tokens = means.count

    metrics: dict[str, float] = {"entropy_control/num_tokens": float(num_tokens)}
    out_masks: list[torch.Tensor] | None = None
    summary = (
        CovarianceSummary(ec.cov_top_fractions, tokens.device) if ec.covariance_summary else None
    )
    # The summary reads each block's covariance from the mini-batch-scope selection
    # pass when there is one, else from a pass of its own (below).
    summary_from_selection = ec.method != "none" and ec.scope == "minibatch"
    if ec.method != "none":
        if ec.scope == "minibatch":
            selected, n_cand = _select_in_scope(tokens, means, config, step, group, summary)
        else:
            selected, n_cand = _select_per_microbatch(batches, config, step, use_current)
        # Where the selected tokens sit: how many carry an above-mean advantage (the
        # confident, rewarded tokens whose updates lower the entropy), and their mean
        # probability next to the scope's.
        stats = torch.cat(
            [
                torch.stack([selected.sum(), n_cand]).double(),
                _selected_sums(tokens, selected, means.mean_adv),
            ]
        )
        all_reduce(stats, group)
        n_sel, n_cand, n_pos, p_sel, p_all = stats.tolist()
        n_sel, n_cand = int(n_sel), int(n_cand)
        out_masks = tokens.split(selected)
        metrics["entropy_control/selected_tokens"] = float(n_sel)
        metrics["entropy_control/selected_fraction"] = n_sel / max(num_tokens, 1)
        if n_sel:
            metrics["entropy_control/selected_positive_adv_fraction"] = n_pos / n_sel
            metrics["entropy_control/selected_prob_mean"] = p_sel / n_sel
        metrics["entropy_control/prob_mean"] = p_all / max(num_tokens, 1)
        if ec.method == "clip_cov":
            metrics["entropy_control/candidates"] = float(n_cand)

    if summary is not None:
        if not summary_from_selection:
            for block in tokens.blocks():
                summary.add(_block_covariance(block, means, fill=True))
        metrics.update(_covariance_summary(tokens, means, summary, group))
    return SelectionResult(out_masks, metrics)
