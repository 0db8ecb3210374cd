"""From sampled responses to the per-rank mini-batches of the PPO update.

:class:`RolloutBatch` holds the samples of one rollout step, identical on every rank,
in prompt-major order (a group = the ``n`` responses of one prompt, adjacent). It is
built from :class:`covrl.rollout.Generations`, gets its rewards, is filtered by DAPO
dynamic sampling and refilled from further generation batches, then padded once into
``[N, S]`` tensors (:meth:`RolloutBatch.tensors`).

:class:`MiniBatchPlan` splits the ``N`` rows into ``num_minibatches`` consecutive
mini-batches of whole groups, and each mini-batch evenly over the data-parallel ranks:
rank ``r`` holds rows ``[k*M + r*M/dp, k*M + (r+1)*M/dp)`` of mini-batch ``k`` (``M``
rows per mini-batch). A rank's *local rows* are its shares of every mini-batch, in
mini-batch order: the old log-probs are computed for them in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from covrl.algorithms import compute_advantages, dynamic_sampling_filter
from covrl.algorithms.config import AdvantageConfig
from covrl.rollout import Generations
from covrl.training.update import PolicyBatch

__all__ = ["MiniBatchPlan", "RolloutBatch", "RolloutTensors"]


@dataclass
class RolloutBatch:
    """Samples of one step (lists of length ``N``, prompt-major).

    ``group`` labels the prompt each sample answers (unique within the step, also
    across generation batches); ``record`` indexes the prompt dataset.
    """

    group: list[int]
    record: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    data_source: list[str]
    rewards: list[float] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.group)

    @property
    def num_groups(self) -> int:
        return len(set(self.group))

    @classmethod
    def from_generations(
        cls, gens: Generations, records: list[int], data_sources: list[str], group_offset: int
    ) -> RolloutBatch:
        """``records[j]`` / ``data_sources[j]``: the dataset index and source of prompt
        ``j`` of the ``generate`` call; groups are numbered from ``group_offset``."""
        return cls(
            group=[group_offset + p for p in gens.prompt_index],
            record=[records[p] for p in gens.prompt_index],
            prompt_ids=gens.prompt_ids,
            response_ids=gens.response_ids,
            logprobs=gens.logprobs,
            finish_reasons=gens.finish_reasons,
            data_source=[data_sources[p] for p in gens.prompt_index],
        )

    def select(self, indices: list[int]) -> RolloutBatch:
        return RolloutBatch(
            **{
                name: [getattr(self, name)[i] for i in indices] if getattr(self, name) else []
                for name in self.__dataclass_fields__
            }
        )

    def extend(self, other: RolloutBatch) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def first_groups(self, count: int) -> RolloutBatch:
        """The samples of the first ``count`` groups (in order of appearance)."""
        keep, seen = [], []
        for i, g in enumerate(self.group):
            if g not in seen:
                if len(seen) == count:
                    break
                seen.append(g)
            keep.append(i)
        return self.select(keep)

    def dynamic_sampling(self) -> tuple[RolloutBatch, int]:
        """DAPO: drop the groups whose rewards are all equal. Returns the kept samples
        and the number of kept groups."""
        result = dynamic_sampling_filter(
            torch.tensor(self.rewards, dtype=torch.float64), torch.tensor(self.group)
        )
        return self.select(result.kept_indices.tolist()), result.num_kept_groups

    # ------------------------------------------------------------------ metrics
    def rollout_metrics(self) -> dict[str, float]:
        """Reward, accuracy and response-length statistics of the samples."""
        lengths = [len(r) for r in self.response_ids]
        n = max(len(self), 1)
        return {
            "rollout/reward_mean": sum(self.rewards) / n,
            "rollout/accuracy": sum(self.acc) / n,
            "rollout/response_length_mean": sum(lengths) / n,
            "rollout/response_length_max": float(max(lengths, default=0)),
            "rollout/truncated_fraction": sum(f == "length" for f in self.finish_reasons) / n,
        }

    # ------------------------------------------------------------------ tensors
    def tensors(self, advantage: AdvantageConfig, pad_token_id: int = 0) -> RolloutTensors:
        """Right-padded ``[N, S]`` tensors and per-token advantages of the whole batch."""
        gens = Generations(
            prompt_index=list(range(len(self))),
            prompt_ids=self.prompt_ids,
            response_ids=self.response_ids,
            logprobs=self.logprobs,
            finish_reasons=self.finish_reasons,
        )
        padded = gens.padded(pad_token_id=pad_token_id)
        rewards = torch.tensor(self.rewards, dtype=torch.float32)
        advantages = compute_advantages(
            rewards, torch.tensor(self.group), padded["response_mask"], advantage
        )
        return RolloutTensors(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            response_mask=padded["response_mask"],
            rollout_logp=padded["rollout_logp"],
            advantages=advantages.float(),
        )


@dataclass
class RolloutTensors:
    """The whole step's batch, ``[N, S]``, identical on every rank."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor


@dataclass(frozen=True)
class MiniBatchPlan:
    """Row layout of ``num_minibatches`` mini-batches of ``rows_per_minibatch`` rows over
    ``dp_size`` data-parallel ranks (see the module docstring)."""

    num_minibatches: int
    rows_per_minibatch: int
    dp_size: int
    dp_rank: int

    def __post_init__(self) -> None:
        if self.rows_per_minibatch % self.dp_size:
            raise ValueError(
                f"{self.rows_per_minibatch} rows per mini-batch do not split over "
                f"{self.dp_size} data-parallel ranks"
            )

    @property
    def rows_per_rank(self) -> int:
        return self.rows_per_minibatch // self.dp_size

    def rank_rows(self, minibatch: int) -> torch.Tensor:
        """Global row indices of this rank's share of ``minibatch``."""
        start = minibatch * self.rows_per_minibatch + self.dp_rank * self.rows_per_rank
        return torch.arange(start, start + self.rows_per_rank)

    def local_rows(self) -> torch.Tensor:
        """This rank's rows of every mini-batch, in mini-batch order."""
        return torch.cat([self.rank_rows(k) for k in range(self.num_minibatches)])

    def policy_batch(
        self,
        minibatch: int,
        full: RolloutTensors,
        old_logp_local: torch.Tensor,
        *,
        rollout_weights_local: torch.Tensor | None = None,
        ref_logp_local: torch.Tensor | None = None,
    ) -> PolicyBatch:
        """This rank's :class:`PolicyBatch` of ``minibatch``. ``*_local`` tensors are
        indexed like :meth:`local_rows`."""
        rows = self.rank_rows(minibatch)
        local = slice(minibatch * self.rows_per_rank, (minibatch + 1) * self.rows_per_rank)
        return PolicyBatch(
            input_ids=full.input_ids[rows],
            attention_mask=full.attention_mask[rows],
            response_mask=full.response_mask[rows],
            sample_index=rows - minibatch * self.rows_per_minibatch,
            old_logp=old_logp_local[local],
            advantages=full.advantages[rows],
            ref_logp=None if ref_logp_local is None else ref_logp_local[local],
            rollout_weights=None if rollout_weights_local is None else rollout_weights_local[local],
        )
