"""Rewards for a step's samples, computed once over the world.

Every rank holds the same samples; sample ``i`` is decoded and scored by rank
``i % world`` (in its reward worker, under the per-sample time limit), and one
all-reduce shares the scores. A scorer error on any rank is raised on every rank
with the same message, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import torch

from covrl.data import PromptDataset
from covrl.parallel import Group, all_reduce, get_device, raise_if_any_rank, rank_and_size
from covrl.rewards import RewardError, RewardExecutor, RewardRegistry, ScoreRequest
from covrl.rollout import Generations

__all__ = ["score_batch"]


def score_batch(
    batch: Generations,
    dataset: PromptDataset,
    tokenizer,
    registry: RewardRegistry,
    executor: RewardExecutor,
    group: Group,
) -> int:
    """Fill ``batch.rewards`` and ``batch.acc``; returns the number of timed-out samples.

    ``group``: the ranks that hold the batch and share the scoring (the trainer: the
    world); :data:`~covrl.parallel.SINGLE_PROCESS` scores every sample here.
    """
    rank, world = rank_and_size(group)
    mine = list(range(rank, len(batch), world))
    requests = []
    for i in mine:
        record = dataset[batch.record[i]]
        requests.append(
            ScoreRequest(
                spec=registry.spec_for(record.data_source),
                data_source=record.data_source,
                solution_str=tokenizer.decode(batch.response_ids[i], skip_special_tokens=True),
                ground_truth=record.ground_truth,
                extra_info=record.extra_info,
                source=record.source,
            )
        )
    # Filled on the host, reduced on the device the backend needs (NCCL: CUDA).
    values = torch.zeros(len(batch), 3, dtype=torch.float64)
    error = None
    try:
        for i, result in zip(mine, executor.score(requests), strict=True):
            values[i] = torch.tensor([result.reward, result.acc, float(result.timed_out)])
    except RewardError as exc:
        error = exc
    raise_if_any_rank(error, group, error_type=RewardError)
    values = all_reduce(values.to(get_device()), group).cpu()
    batch.rewards = values[:, 0].tolist()
    batch.acc = values[:, 1].tolist()
    return int(values[:, 2].sum().item())
