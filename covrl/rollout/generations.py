"""The result of a rollout: sampled responses, identical on every rank.

Order is prompt-major: sample ``i`` is sample ``i % n`` of prompt ``i // n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

FINISH_REASONS = ("stop", "length")


@dataclass
class Generations:
    """``N = num_prompts * n`` sampled responses.

    ``logprobs[i][t]`` is the rollout log-prob of ``response_ids[i][t]`` under the
    temperature-scaled sampling distribution (for greedy decoding, ``temperature=0``,
    of the unscaled one; see docs/rollout.md). ``finish_reasons[i]`` is ``"stop"`` (a stop token, included as
    the last response token) or ``"length"`` (``max_tokens`` reached).
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    def padded(self, pad_token_id: int = 0, seq_len: int | None = None) -> dict[str, torch.Tensor]:
        """Right-padded prompt + response tensors, aligned as
        ``PolicyEngine.forward_logprobs`` aligns its output (entry ``t`` scores token
        ``t`` given tokens ``< t``).

        Returns ``input_ids [N, S]`` long, ``attention_mask [N, S]`` long,
        ``response_mask [N, S]`` bool (the response tokens), ``rollout_logp [N, S]``
        float32 (the rollout log-probs at the response positions, 0 elsewhere).
        ``S`` is the longest prompt + response unless ``seq_len`` is given.
        """
        lengths = [len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids, strict=True)]
        s = max(lengths, default=0) if seq_len is None else seq_len
        if lengths and max(lengths) > s:
            raise ValueError(f"seq_len={s} is shorter than the longest sample ({max(lengths)})")
        n = len(self)
        input_ids = torch.full((n, s), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(n, s, dtype=torch.long)
        response_mask = torch.zeros(n, s, dtype=torch.bool)
        rollout_logp = torch.zeros(n, s, dtype=torch.float32)
        for i, (p, r, lp) in enumerate(
            zip(self.prompt_ids, self.response_ids, self.logprobs, strict=True)
        ):
            a, b = len(p), len(p) + len(r)
            input_ids[i, :a] = torch.tensor(p, dtype=torch.long)
            input_ids[i, a:b] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, :b] = 1
            response_mask[i, a:b] = True
            rollout_logp[i, a:b] = torch.tensor(lp, dtype=torch.float32)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "rollout_logp": rollout_logp,
        }


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
