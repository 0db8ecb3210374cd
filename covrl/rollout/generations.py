"""Sampled responses, identical on every rank: what a rollout returns, and the samples
a training step carries from generation to the update.

Order is prompt-major: sample ``i`` is sample ``i % n`` of prompt ``i // n`` of the
``generate`` call. The trainer annotates the samples in place (their prompt group,
dataset record and data source, then rewards) and filters or extends them, always
through :meth:`Generations.select` / :meth:`Generations.extend`, which keep every
per-sample field aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

FINISH_REASONS = ("stop", "length")


@dataclass
class Generations:
    """``N`` sampled responses (lists of length ``N``).

    ``logprobs[i][t]`` is the rollout log-prob of ``response_ids[i][t]`` under the
    temperature-scaled sampling distribution (for greedy decoding, ``temperature=0``,
    of the unscaled one; see docs/rollout.md). ``finish_reasons[i]`` is ``"stop"`` (a
    stop token, included as the last response token) or ``"length"`` (``max_tokens``
    reached). ``prompt_index[i]`` is the sample's prompt in the ``generate`` call.

    Annotations, empty until the trainer sets them: ``group`` (the prompt group, unique
    within a training step, also across generation calls), ``record`` (the prompt's
    dataset index), ``data_source``, ``rewards`` and ``acc``.
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    group: list[int] = field(default_factory=list)
    record: list[int] = field(default_factory=list)
    data_source: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    @property
    def num_groups(self) -> int:
        return len(set(self.group))

    def annotate(
        self, records: Sequence[int], data_sources: Sequence[str], group_offset: int
    ) -> None:
        """Label the samples with their prompt's dataset record and data source
        (``records[p]``/``data_sources[p]`` for prompt ``p`` of the ``generate`` call),
        and their group: ``group_offset + p``."""
        self.group = [group_offset + p for p in self.prompt_index]
        self.record = [records[p] for p in self.prompt_index]
        self.data_source = [data_sources[p] for p in self.prompt_index]

    def select(self, indices: Sequence[int]) -> Generations:
        """The samples ``indices``, in that order (annotations follow)."""
        return Generations(
            **{
                f.name: [value[i] for i in indices] if value else []
                for f in fields(self)
                for value in [getattr(self, f.name)]
            }
        )

    def extend(self, other: Generations) -> None:
        """Append ``other``'s samples (both must carry the same annotations; either may
        be empty, e.g. a generation batch whose groups dynamic sampling dropped)."""
        # Checked before any field grows: len(self) changes with response_ids.
        both = len(self) > 0 and len(other) > 0
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if both and bool(mine) != bool(theirs):
                raise ValueError(f"cannot extend: Generations.{f.name} is set on one side only")
        for f in fields(self):
            getattr(self, f.name).extend(getattr(other, f.name))

    def first_groups(self, count: int) -> Generations:
        """The samples of the first ``count`` groups (in order of appearance)."""
        keep, seen = [], set()
        for i, g in enumerate(self.group):
            if g not in seen:
                if len(seen) == count:
                    break
                seen.add(g)
            keep.append(i)
        return self.select(keep)


def gather_replica_rows(
    ids: Sequence[Sequence[int]],
    values: Sequence[Sequence[float]],
    codes: Sequence[int],
    replica_size: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """Concatenate the replicas' ragged rows on every rank of ``group``, in rank order.

    Each rank passes its replica's rows: ``ids[j]`` (tokens) and ``values[j]``
    (float32 values, same length) and one integer ``codes[j]`` per row. The rows of
    ranks ``0, replica_size, 2 * replica_size, ...`` (the replica leaders; the other
    ranks of a replica hold the same rows) are returned. Two all-gathers of packed
    tensors on ``device`` (the backend's device: CUDA for NCCL): the sizes, then an
    int64 row ``[lengths | codes | tokens]`` and a float32 row of values.
    """
    world = dist.get_world_size(group)
    num = len(ids)
    lengths = [len(r) for r in ids]
    total = sum(lengths)
    sizes = torch.tensor([num, total], dtype=torch.long, device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    all_sizes = [s.tolist() for s in all_sizes]
    max_num = max(s[0] for s in all_sizes)
    max_total = max(s[1] for s in all_sizes)

    packed = torch.zeros(2 * max_num + max_total, dtype=torch.long)
    packed[:num] = torch.tensor(lengths, dtype=torch.long)
    packed[max_num : max_num + num] = torch.tensor(list(codes), dtype=torch.long)
    packed[2 * max_num : 2 * max_num + total] = torch.tensor(
        [t for r in ids for t in r], dtype=torch.long
    )
    floats = torch.zeros(max_total, dtype=torch.float32)
    floats[:total] = torch.tensor([x for r in values for x in r], dtype=torch.float32)
    packed, floats = packed.to(device), floats.to(device)
    all_packed = [torch.empty_like(packed) for _ in range(world)]
    all_floats = [torch.empty_like(floats) for _ in range(world)]
    dist.all_gather(all_packed, packed, group=group)
    dist.all_gather(all_floats, floats, group=group)

    out_ids: list[list[int]] = []
    out_values: list[list[float]] = []
    out_codes: list[int] = []
    for leader in range(0, world, replica_size):
        k = all_sizes[leader][0]
        row = all_packed[leader].cpu()
        tokens = row[2 * max_num :].tolist()
        vals = all_floats[leader].cpu().tolist()
        start = 0
        for length in row[:k].tolist():
            out_ids.append(tokens[start : start + length])
            out_values.append(vals[start : start + length])
            start += length
        out_codes += row[max_num : max_num + k].tolist()
    return out_ids, out_values, out_codes


def make_generations(
    prompt_ids: Sequence[Sequence[int]],
    n: int,
    response_ids: list[list[int]],
    logprobs: list[list[float]],
    finish_codes: list[int],
) -> Generations:
    """:class:`Generations` from gathered rows in prompt-major order."""
    if len(response_ids) != len(prompt_ids) * n:
        raise RuntimeError(
            f"gathered {len(response_ids)} samples, expected {len(prompt_ids)} prompts x n={n}"
        )
    index = [i // n for i in range(len(response_ids))]
    return Generations(
        prompt_index=index,
        prompt_ids=[list(prompt_ids[i]) for i in index],
        response_ids=response_ids,
        logprobs=logprobs,
        finish_reasons=[FINISH_REASONS[c] for c in finish_codes],
    )


def split_evenly(count: int, parts: int) -> list[range]:
    """``parts`` contiguous ranges covering ``range(count)``, sizes differing by <= 1."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges
