"""Micro-batches by row count or by token budget, and packed (THD) sequences.

A batch reaches the engine as right-padded rows ``[batch, seq]`` with their lengths
(host ints). :func:`plan_micro_batches` groups the rows into micro-batches:

* fixed size (``micro_batch_size`` rows), the rows sorted by length first, so each
  micro-batch is trimmed to its own longest row rather than the batch's;
* token budget (``max_tokens``): first-fit decreasing into micro-batches of at most
  ``max_tokens`` tokens each; the sequences of a micro-batch are then packed end to end
  (:class:`PackedSequences`), with no padding at all.

Results do not depend on the grouping: every per-token value is computed from its own
sequence, and losses are normalised by global counts (:mod:`covrl.algorithms.aggregation`).

:func:`balanced_partition` splits sequences over data-parallel ranks with near-equal
token counts (longest first, each to the lightest part), as verl and slime do.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MicroBatch", "PackedSequences", "balanced_partition", "plan_micro_batches"]


@dataclass(frozen=True)
class MicroBatch:
    """Rows ``rows`` of a batch (in this order) and their lengths."""

    rows: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def seq_len(self) -> int:
        """The longest row: the micro-batch's padded width."""
        return max(self.lengths)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def index(self, device: torch.device) -> torch.Tensor:
        """The rows as an index tensor on ``device`` (built on the host, copied once)."""
        return torch.tensor(self.rows, dtype=torch.long).to(device, non_blocking=True)

    def take(self, t: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """This micro-batch's rows of a ``[batch, ...]`` tensor; a ``[batch, seq, ...]``
        one trimmed to ``[rows, width, ...]`` (default ``seq_len``)."""
        rows = t[self.index(t.device)]
        return rows[:, : width or self.seq_len] if t.dim() >= 2 else rows

    def put(self, dst: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``[rows, width]`` values back into this micro-batch's place in the
        ``[batch, seq]`` tensor ``dst`` (columns beyond ``seq``, padding, are dropped)."""
        width = min(values.shape[1], dst.shape[1])
        dst[self.index(dst.device), :width] = values[:, :width]


def plan_micro_batches(
    lengths: Sequence[int],
    *,
    micro_batch_size: int,
    max_tokens: int | None = None,
    multiple_of: int = 1,
) -> list[MicroBatch]:
    """Group the rows of a batch (``lengths[i]`` tokens in row ``i``) into micro-batches.

    Args:
        micro_batch_size: rows per micro-batch when ``max_tokens`` is None (it must
            divide the number of rows).
        max_tokens: the token budget of a packed micro-batch (rows of more tokens are
            an error naming the setting).
        multiple_of: the number of micro-batches is made a multiple of this (the
            interleaved pipeline schedule needs a multiple of the PP size) by splitting
            the micro-batches with the most rows.

    Deterministic: the same lengths give the same plan on every rank.
    """
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("cannot plan micro-batches of an empty batch")
    if min(lengths) < 1:
        raise ValueError(f"every row needs at least one token; got lengths {lengths}")
    # Longest first; ties by row, so the order is the same on every rank.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if max_tokens is None:
        if len(lengths) % micro_batch_size:
            raise ValueError(
                f"batch size {len(lengths)} is not divisible by "
                f"EngineConfig.micro_batch_size={micro_batch_size}"
            )
        groups = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    else:
        longest = lengths[order[0]]
        if longest > max_tokens:
            raise ValueError(
                f"a sequence of {longest} tokens does not fit "
                f"EngineConfig.max_tokens_per_micro_batch={max_tokens}: raise it to at least "
                "the longest prompt + response (data.max_prompt_length + sampling.max_tokens)"
            )
        groups, loads = [], []
        for i in order:  # first-fit decreasing
            for g, load in enumerate(loads):
                if load + lengths[i] <= max_tokens:
                    groups[g].append(i)
                    loads[g] += lengths[i]
                    break
            else:
                groups.append([i])
                loads.append(lengths[i])
    while len(groups) % multiple_of:
        g = max(range(len(groups)), key=lambda j: (len(groups[j]), -j))
        if len(groups[g]) < 2:
            raise ValueError(
                f"{len(lengths)} rows cannot form a multiple of {multiple_of} micro-batches "
                "(the interleaved pipeline schedule needs one): use more rows per batch"
            )
        half = len(groups[g]) // 2
        groups[g : g + 1] = [groups[g][:half], groups[g][half:]]
    return [MicroBatch(tuple(g), tuple(lengths[i] for i in g)) for g in groups]


@dataclass
class PackedSequences:
    """The rows of a micro-batch packed end to end: ``[1, total]`` tokens.

    Attributes:
        input_ids: ``[1, total]`` the rows' real tokens, concatenated (then padding up
            to ``total`` when a multiple was asked for).
        position_ids: ``[1, total]`` each token's position in its own sequence.
        cu_seqlens: ``[n + 1]`` int32 sequence boundaries (on the device).
        lengths: the rows' lengths (host ints).
        total: tokens in the pack, padding included.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    total: int

    @classmethod
    def pack(
        cls,
        input_ids: torch.Tensor,
        lengths: Sequence[int],
        multiple_of: int = 1,
        min_total: int = 0,
    ) -> PackedSequences:
        """Pack right-padded rows ``[m, s]`` with the given lengths. The pack is padded
        to at least ``min_total`` tokens and to a multiple of ``multiple_of`` (sequence
        parallelism splits it over TP)."""
        lengths = tuple(int(n) for n in lengths)
        real = sum(lengths)
        total = -(-max(real, min_total) // multiple_of) * multiple_of
        width = input_ids.shape[1]
        # Index plans are built on the host and copied once: no device-to-host sync.
        positions = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(total - real)])
        rows = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])
        source = rows * width + positions[:real]
        bounds = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        device = input_ids.device
        tokens = input_ids.reshape(-1)[source.to(device, non_blocking=True)]
        if total > real:
            tokens = torch.cat([tokens, tokens.new_zeros(total - real)])
        return cls(
            tokens[None],
            positions.to(device, non_blocking=True)[None],
            bounds.to(device, non_blocking=True),
            lengths,
            total,
        )

    def params(self):
        """megatron's ``PackedSeqParams`` (THD) of the pack."""
        from megatron.core.packed_seq_params import PackedSeqParams

        longest = max(max(self.lengths), self.total - sum(self.lengths))
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )

    def next_tokens(self) -> torch.Tensor:
        """``[total]`` the token each position predicts: the next one of its own
        sequence (0 at a sequence's last position and on padding: scored, dropped)."""
        ids = self.input_ids[0]
        target = torch.zeros_like(ids)
        target[:-1] = ids[1:]
        target[self.cu_seqlens[1:].long() - 1] = 0
        return target

    def unpack(self, values: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``[total]`` per-position values (position ``t`` scoring token ``t + 1`` of its
        sequence) -> ``[m, seq_len]`` right-padded rows aligned with the tokens they
        score (entry ``j`` of a row scores its token ``j``; entry 0 and padding are 0)."""
        m = len(self.lengths)
        out = values.new_zeros(m, seq_len)
        device = values.device
        lengths = torch.tensor(self.lengths, device=device)
        # Token j >= 1 of row r is scored at pack position cu[r] + j - 1.
        cols = torch.arange(1, seq_len, device=device)[None, :]
        valid = cols < lengths[:, None]
        src = self.cu_seqlens[:-1].long()[:, None] + cols - 1
        out[:, 1:] = torch.where(valid, values[src.clamp(max=self.total - 1)], 0.0)
        return out


def balanced_partition(lengths: Sequence[int], parts: int, *, equal_size: bool) -> list[list[int]]:
    """Split items (``lengths[i]`` tokens each) into ``parts`` lists of near-equal token
    counts: longest first, each to the part with the fewest tokens (among those with
    room, when ``equal_size`` asks for ``len(lengths) / parts`` items each). Each part
    lists its items in ascending order. Deterministic."""
    n = len(lengths)
    if equal_size and n % parts:
        raise ValueError(f"{n} items do not split into {parts} equal parts")
    capacity = n // parts if equal_size else n
    heap = [(0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        load, p = heapq.heappop(heap)
        out[p].append(i)
        if len(out[p]) < capacity:  # a full part leaves the heap
            heapq.heappush(heap, (load + lengths[i], p))
    return [sorted(part) for part in out]
