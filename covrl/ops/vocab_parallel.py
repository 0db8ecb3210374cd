"""Per-token log-probs and entropy from vocab-parallel logits, fused and chunked.

Under tensor parallelism (TP) the output layer is column-parallel: rank ``r`` of a TP
group of size ``tp`` holds the logits of the vocabulary columns
``[r * V_local, (r + 1) * V_local)``, i.e. a ``[tokens, vocab/tp]`` shard. Nothing here
gathers the full vocabulary; ranks exchange a few per-token statistics instead.

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * tp``;
the padded columns (global id ``>= vocab_size``) are excluded from the softmax. They
are always a suffix of the global vocabulary, so on each rank they are a (possibly
empty, possibly whole) suffix of the local shard.

Notation (per token): ``z`` raw logits, ``T`` temperature, ``x = z / T``,
``lse = logsumexp(x)``, ``p = softmax(x)``, ``t`` the target id.

* ``logp = x_t - lse``,           ``d logp / d z_j = (1[j = t] - p_j) / T``
* ``H = -sum_j p_j log p_j``,     ``d H / d z_j = -p_j (log p_j + H) / T``

Memory: besides the outputs (and, in backward, the gradient) and a few ``[tokens]``
statistics, forward and backward use one ``[chunk_size, vocab/tp]`` working buffer in
the compute dtype (float32, or float64 for float64 logits; two rows at least),
whatever the number of tokens. Forward splits it into two halves (shifted logits and
their exponentials) and so walks the tokens in half-chunks; no pass takes a log.
Backward recomputes the softmax chunk by chunk from the saved logits and the
per-token ``lse`` (and ``H`` when the entropy is differentiated); no
``[tokens, vocab/tp]`` intermediate is stored. A float32 log-prob-only backward
needs no buffer at all: the gradient itself is the working area.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from covrl.parallel.groups import Group, all_reduce, rank_and_size

__all__ = [
    "VocabShard",
    "load_scaled",
    "softmax_stats",
    "vocab_parallel_logprob_entropy",
    "vocab_shard",
]

# Default working-buffer budget in elements. On CPU a cache-sized buffer (8 MiB of
# float32) is fastest; on accelerators 64 MiB keeps the per-chunk launch overhead
# negligible while staying far below the logits.
_DEFAULT_BUFFER_ELEMENTS = {"cpu": 1 << 21}
_DEFAULT_BUFFER_ELEMENTS_ACCELERATOR = 1 << 24

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision logits are processed in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in the vocab-parallel layout and how its shard is processed.

    Attributes:
        group: TP group the vocabulary is split over (or ``SINGLE_PROCESS``).
        vocab_size: the true vocabulary size (global ids ``>= vocab_size`` are padding).
        vocab_start: global id of the local shard's first column, ``rank * vocab/tp``.
        num_valid: leading local columns that are real tokens (the rest is padding).
        inv_temperature: ``1 / T``.
        chunk_size: tokens per working-buffer chunk.
    """

    group: Group
    vocab_size: int
    vocab_start: int
    num_valid: int
    inv_temperature: float
    chunk_size: int

    def chunks(self, num_tokens: int, size: int | None = None) -> Iterator[slice]:
        """Row slices of at most ``size`` (default ``chunk_size``) tokens."""
        size = size or self.chunk_size
        for begin in range(0, num_tokens, size):
            yield slice(begin, min(begin + size, num_tokens))

    def buffer(self, num_tokens: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The ``[min(chunk_size, tokens), num_valid]`` working buffer."""
        return torch.empty(
            min(self.chunk_size, num_tokens), self.num_valid, dtype=dtype, device=device
        )

    def split_buffer(
        self, num_tokens: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The working buffer as two ``[rows // 2, num_valid]`` halves (2 rows at least).

        For passes that need two per-column quantities at once (e.g. shifted logits and
        their exponentials), which then run over half-chunks of tokens.
        """
        rows = max(2, min(self.chunk_size, num_tokens))
        buffer = torch.empty(rows, self.num_valid, dtype=dtype, device=device)
        half = rows // 2
        return buffer[:half], buffer[half : 2 * half]


def vocab_shard(
    logits: Tensor,
    *,
    tp_group: Group,
    vocab_size: int,
    temperature: float,
    chunk_size: int | None,
    name: str = "logits",
) -> VocabShard:
    """Validate a ``[..., vocab/tp]`` shard and the options; describe the layout."""
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"{name} must be [..., vocab/tp] with vocab/tp >= 1, got {tuple(logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rank, tp_size = rank_and_size(tp_group, "tp_group")
    local_vocab = logits.shape[-1]
    padded_vocab = local_vocab * tp_size
    if vocab_size is None:
        # No silent default: Megatron-padded logits read as unpadded give log-probs
        # off by the padding columns' mass.
        raise TypeError(
            f"vocab_size is required: the true vocabulary size (<= {padded_vocab}; "
            f"{padded_vocab} when {name} carries no padding columns)"
        )
    vocab_size = int(vocab_size)
    if not 1 <= vocab_size <= padded_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, vocab/tp * tp = {local_vocab} * {tp_size} "
            f"= {padded_vocab}] ({name} has shape {tuple(logits.shape)})"
        )
    if chunk_size is None:
        budget = _DEFAULT_BUFFER_ELEMENTS.get(
            logits.device.type, _DEFAULT_BUFFER_ELEMENTS_ACCELERATOR
        )
        chunk_size = max(1, budget // local_vocab)
    vocab_start = rank * local_vocab
    return VocabShard(
        group=tp_group,
        vocab_size=vocab_size,
        vocab_start=vocab_start,
        num_valid=max(0, min(local_vocab, vocab_size - vocab_start)),
        inv_temperature=1.0 / float(temperature),
        chunk_size=int(chunk_size),
    )


def load_scaled(work: Tensor, logits: Tensor, inv_temperature: float) -> Tensor:
    """``work <- logits * inv_temperature`` in the compute dtype: the only copy made."""
    if inv_temperature == 1.0:
        return work.copy_(logits)
    if logits.dtype != work.dtype:
        # Upcast first: a fused multiply would round the product to the half dtype.
        return work.copy_(logits).mul_(inv_temperature)
    return torch.mul(logits, inv_temperature, out=work)


def _local_stats(
    logits: Tensor, target: Tensor | None, shard: VocabShard
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Softmax statistics of this rank's valid columns, relative to the local row max.

    Args:
        logits: ``[tokens, vocab/tp]`` local shard.
        target: ``[tokens]`` global vocabulary ids, or None.

    Returns:
        ``[tokens]`` tensors ``(m, s, ent, tgt, bad)``: ``m`` local max of ``x``
        (``-inf`` when the rank has no valid column), ``s = sum exp(x - m)``,
        ``ent = -sum exp(x - m) (x - m)``, ``tgt = x_t`` where this rank owns the target
        (else 0), ``bad = 1`` on rows with a non-finite logit.
    """
    num_tokens, num_valid = logits.shape[0], shard.num_valid
    factory = dict(dtype=_compute_dtype(logits.dtype), device=logits.device)
    m = torch.full((num_tokens,), float("-inf"), **factory)
    s, ent, tgt, bad = (torch.zeros(num_tokens, **factory) for _ in range(4))
    if num_valid == 0 or num_tokens == 0:
        return m, s, ent, tgt, bad

    if target is not None:
        local_target = target - shard.vocab_start
        owned = (local_target >= 0) & (local_target < num_valid)
        local_target = local_target.clamp(0, num_valid - 1).unsqueeze(-1)
    shifted_buffer, exp_buffer = shard.split_buffer(num_tokens, **factory)
    for rows in shard.chunks(num_tokens, shifted_buffer.shape[0]):
        n = rows.stop - rows.start
        shifted = load_scaled(shifted_buffer[:n], logits[rows, :num_valid], shard.inv_temperature)
        row_max = shifted.amax(dim=-1)
        m[rows] = row_max
        if target is not None:
            target_x = shifted.gather(-1, local_target[rows]).squeeze(-1)
            tgt[rows] = torch.where(owned[rows], target_x, 0.0)
        shifted.sub_(row_max.unsqueeze(-1))
        e = torch.exp(shifted, out=exp_buffer[:n])
        s[rows] = e.sum(-1)
        # Keeping x - m next to e avoids a log; it also exposes every non-finite logit:
        # NaN and +inf make x - m NaN, and -inf gives e (x - m) = 0 * -inf = NaN.
        ent[rows] = e.mul_(shifted).sum(-1).neg_()
    bad = (~(torch.isfinite(s) & torch.isfinite(ent))).to(s.dtype)
    return m, s, ent, tgt, bad


def softmax_stats(
    logits: Tensor,
    target: Tensor | None,
    shard: VocabShard,
    *,
    check_finite: bool = True,
    name: str = "logits",
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-token statistics of ``softmax(logits / T)`` over the whole valid vocabulary.

    Two all-reduces over ``shard.group`` in total: the row max, then one ``[4, tokens]``
    sum carrying each rank's re-based sums, its target logit and its non-finite flags.

    Args:
        logits: ``[tokens, vocab/tp]`` local shard.
        target: ``[tokens]`` global ids in ``[0, vocab_size)``, or None.

    Returns:
        ``[tokens]`` tensors ``(lse, logp, entropy)`` in the compute dtype: log of the
        partition function of ``x = logits / T``, the target log-prob (None without
        ``target``) and the entropy. Identical on all ranks of the group.
    """
    m, s, ent, tgt, bad = _local_stats(logits, target, shard)
    group = shard.group
    global_max = m.clone()
    all_reduce(global_max, group, dist.ReduceOp.MAX)
    # Re-base each rank's sums from its own max to the global max:
    # sum e^(x-M) = a s and -sum e^(x-M)(x-M) = a (ent - (m-M) s), with a = e^(m-M).
    shift = m - global_max
    rescale = torch.exp(shift)
    # Ranks without valid columns have m = -inf and s = 0; keep them out of the NaNs.
    ent = torch.where(s > 0, rescale * (ent - shift * s), 0.0)
    s = rescale * s
    packed = torch.stack([s, ent, tgt, bad])
    all_reduce(packed, group)
    s, ent, tgt, bad = packed.unbind(0)
    # After the all-reduce every rank sees the same flags, so all ranks raise together.
    if check_finite and bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise ValueError(
            f"{name} has non-finite values (NaN or +/-inf) in {rows.numel()} token "
            f"row(s), first at token {int(rows[0])}"
        )
    log_s = torch.log(s)
    lse = global_max + log_s
    logp = tgt - lse if target is not None else None
    return lse, logp, log_s + ent / s


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Target log-prob and entropy of ``softmax(logits / T)`` over a vocab-parallel shard.

    ``logits`` ``[tokens, vocab/tp]``, ``target`` ``[tokens]`` -> ``logp``, ``entropy``
    ``[tokens]``. See :func:`vocab_parallel_logprob_entropy`.
    """

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        target: Tensor,
        shard: VocabShard,
        entropy_requires_grad: bool,
        inplace: bool,
        check_finite: bool,
    ) -> tuple[Tensor, Tensor]:
        lse, logp, entropy = softmax_stats(logits, target, shard, check_finite=check_finite)
        ctx.shard = shard
        ctx.entropy_requires_grad, ctx.inplace = entropy_requires_grad, inplace
        ctx.backward_done = False
        ctx.set_materialize_grads(False)
        if entropy_requires_grad:
            ctx.save_for_backward(logits, target, lse, entropy)
        else:
            # Metric-only entropy: nothing entropy-specific is kept alive.
            ctx.mark_non_differentiable(entropy)
            ctx.save_for_backward(logits, target, lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        if ctx.inplace and ctx.backward_done:
            raise RuntimeError(
                "vocab_parallel_logprob_entropy(inplace=True) overwrote the logits with their "
                "gradient in the first backward; it cannot be run backward twice"
            )
        ctx.backward_done = True
        logits, target, lse = ctx.saved_tensors[:3]
        entropy = ctx.saved_tensors[3] if ctx.entropy_requires_grad else None
        if not ctx.entropy_requires_grad:
            grad_entropy = None
        no_grad = (None,) * 6
        if grad_logp is None and grad_entropy is None:
            return no_grad

        shard = ctx.shard
        num_tokens, num_valid, inv_t = logits.shape[0], shard.num_valid, shard.inv_temperature
        compute_dtype = lse.dtype
        # The gradient reuses the logits' storage only when the caller asked for it.
        grad = logits.detach() if ctx.inplace else torch.empty_like(logits)
        grad[:, num_valid:].zero_()
        if num_valid == 0 or num_tokens == 0:
            return (grad,) + no_grad[1:]

        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logp = grad_logp.to(compute_dtype)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(compute_dtype)
            # d/dz_j [g1 logp + g2 H] = [g1 1(j=t) - p_j (g1 + g2 (H + log p_j))] / T
            neg_slope = -grad_entropy * inv_t
            neg_offset = -(grad_logp + grad_entropy * entropy) * inv_t
        local_target = target - shard.vocab_start
        owned = (local_target >= 0) & (local_target < num_valid)
        target_rows = torch.nonzero(owned).flatten()
        target_cols = local_target[target_rows]
        target_grad = grad_logp[target_rows] * inv_t

        # A float32 gradient can itself be the working area of the log-prob-only path.
        use_grad_as_work = grad_entropy is None and grad.dtype == compute_dtype
        if not use_grad_as_work:
            buffer = shard.buffer(num_tokens, compute_dtype, logits.device)
        for rows in shard.chunks(num_tokens):
            grad_chunk = grad[rows, :num_valid]
            work = grad_chunk if use_grad_as_work else buffer[: rows.stop - rows.start]
            # log p, recomputed from the raw logits (rows of the saved logits are read
            # before the in-place gradient overwrites them).
            load_scaled(work, logits[rows, :num_valid], inv_t)
            work.sub_(lse[rows].unsqueeze(-1))
            if grad_entropy is None:
                work.exp_()
                torch.mul(work, (-grad_logp[rows] * inv_t).unsqueeze(-1), out=grad_chunk)
            else:
                torch.exp(work, out=grad_chunk)  # p
                work.mul_(neg_slope[rows].unsqueeze(-1)).add_(neg_offset[rows].unsqueeze(-1))
                grad_chunk.mul_(work)
        grad.index_put_((target_rows, target_cols), target_grad.to(grad.dtype), accumulate=True)
        return (grad,) + no_grad[1:]


def _check_target(target: Tensor, logits: Tensor, vocab_size: int) -> None:
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids, got {target.dtype}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits [..., vocab/tp] and target [...] disagree: logits has shape "
            f"{tuple(logits.shape)}, target has shape {tuple(target.shape)}"
        )
    if logits.device != target.device:
        raise ValueError(f"logits is on {logits.device} but target is on {target.device}")
    out_of_range = (target < 0) | (target >= vocab_size)
    if bool(out_of_range.any()):
        first = torch.nonzero(out_of_range.flatten())[0, 0]
        raise ValueError(
            f"target has ids outside [0, vocab_size={vocab_size}): "
            f"{int(out_of_range.sum())} of {target.numel()}, first target[{int(first)}] = "
            f"{int(target.flatten()[first])}"
        )


def vocab_parallel_logprob_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    tp_group: Group,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    entropy_requires_grad: bool = False,
    inplace: bool = False,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-token target log-prob and full-vocabulary entropy from vocab-parallel logits.

    Computes, for the policy ``softmax(z / T)`` over the ``vocab_size`` real tokens,
    ``logp = log p(target)`` and ``entropy = -sum_a p(a) log p(a)``, without gathering
    the vocabulary: each rank reduces its own shard in chunks of ``chunk_size`` tokens,
    and the TP ranks exchange only per-token statistics (one max and one sum
    all-reduce of ``[4, tokens]`` per call).

    Args:
        logits: ``[tokens, vocab/tp]`` (any leading shape ``[..., vocab/tp]``) float32,
            bfloat16, float16 or float64; this rank's columns ``[rank * vocab/tp,
            (rank + 1) * vocab/tp)`` of the (padded) vocabulary. Not modified unless
            ``inplace``.
        target: ``[tokens]`` (matching the leading shape) global vocabulary ids in
            ``[0, vocab_size)``, identical on all ranks of ``tp_group``.
        tp_group: tensor-parallel group the vocabulary is split over, or
            :data:`covrl.parallel.SINGLE_PROCESS` for logits holding the whole
            vocabulary (``None`` is refused).
        vocab_size: the true vocabulary size (required); columns with a global id
            ``>= vocab_size`` are padding and get probability 0 (and gradient 0).
        temperature: the policy is ``softmax(logits / temperature)``; applied chunk by
            chunk inside the working buffer.
        chunk_size: tokens per chunk; the working buffer is ``[chunk_size, vocab/tp]``
            in the compute dtype. Default: as many tokens as fit 2**21 elements on
            CPU (cache-sized), 2**24 on accelerators.
        entropy_requires_grad: make ``entropy`` differentiable. When False (a metric)
            ``entropy`` has no autograd path and nothing is saved for it.
        inplace: let backward write the gradient into the logits' storage instead of a
            new tensor. The logits then hold their gradient after backward (and
            backward can only run once).
        check_finite: raise if any valid logit is NaN or +/-inf (costs one
            device-to-host sync).

    Returns:
        ``(logp, entropy)``, each shaped like ``target``, float32 (float64 for float64
        logits), identical on all ranks of ``tp_group``.
    """
    shard = vocab_shard(
        logits,
        tp_group=tp_group,
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    _check_target(target, logits, shard.vocab_size)
    # A view for contiguous inputs; the autograd graph maps the gradient back.
    logits_2d = logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])
    logp, entropy = _VocabParallelLogprobEntropy.apply(
        logits_2d, target.reshape(-1), shard, entropy_requires_grad, inplace, check_finite
    )
    if target.dim() != 1:
        logp, entropy = logp.view(target.shape), entropy.view(target.shape)
    return logp, entropy
