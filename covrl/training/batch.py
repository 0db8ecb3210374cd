"""From a step's samples to this rank's tensors: the batch the old log-prob pass and
the PPO updates run on.

A step's samples are one :class:`covrl.rollout.Generations` (identical on every rank,
prompt-major: a group = the ``n`` responses of one prompt, adjacent), annotated and
scored in place, filtered by DAPO dynamic sampling and refilled from further
generation calls. :func:`rank_batch` turns them, once, into this rank's
:class:`PolicyBatch` on the engine's device.

Layout (:class:`MiniBatchLayout`): the ``N`` samples form ``num_minibatches``
consecutive mini-batches of ``M`` samples (whole groups); each mini-batch is split over
the ``dp`` data-parallel ranks with near-equal token counts (``M / dp`` samples each,
unless micro-batches are packed by a token budget). The rank's batch has its shares of
every mini-batch, in mini-batch order (``[L, S]``); :meth:`MiniBatchLayout.minibatch`
is the row slice of mini-batch ``k`` in it, and :meth:`PolicyBatch.rows` its view. Every row knows its index in its
mini-batch (``sample_index``), which names its tokens in the Clip-Cov / KL-Cov
selection; there is no other index space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from covrl.algorithms import compute_advantages, dynamic_sampling_filter
from covrl.algorithms.config import AdvantageConfig
from covrl.engine.packing import balanced_partition
from covrl.rollout import Generations

__all__ = [
    "MiniBatchLayout",
    "PolicyBatch",
    "dynamic_sampling",
    "rank_batch",
    "rollout_metrics",
    "step_advantages",
]


@dataclass
class PolicyBatch:
    """Rows of prompt + response tokens with what the policy loss needs per token.

    All per-token tensors are ``[batch, seq]`` and aligned as
    :meth:`covrl.engine.PolicyEngine.forward_logprobs` aligns log-probs (entry ``t``
    scores token ``t`` given tokens ``< t``).

    Attributes:
        input_ids: ``[batch, seq]`` long, right-padded prompt + response.
        attention_mask: ``[batch, seq]`` long, 1 on real tokens (then 0s per row).
        response_mask: ``[batch, seq]`` bool, the tokens scored by the loss.
        sample_index: ``[batch]`` long, each row's index in its global mini-batch
            (unique over every DP rank; it names the row's tokens in the selection).
        advantages: ``[batch, seq]`` float32 per-token advantages (0 off the response).
        old_logp: ``[batch, seq]`` float32 log-probs of the policy before the update
            (the trainer's, from the old log-prob pass); required by the update.
        rollout_logp: ``[batch, seq]`` float32 log-probs vLLM sampled the response with.
        old_entropy: ``[batch, seq]`` float32 entropy of the policy before the update.
        ref_logp: ``[batch, seq]`` reference-policy log-probs, for
            ``PolicyLossConfig.kl_coeff`` (also reported as ``ref_kl`` when given).
        rollout_weights: ``[batch, seq]`` truncated importance weights of the rollout
            correction; they multiply each token's surrogate term.
        old_logp_version: the engine's ``weights_version`` when ``old_logp`` was
            computed: while the engine still has it, ``old_logp`` are also the current
            log-probs, and the update skips its no-grad forward.
        lengths: each row's prompt + response tokens (host ints; the engine plans its
            micro-batches from them without reading the mask back from the device).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    sample_index: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None
    old_entropy: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    rollout_weights: torch.Tensor | None = None
    old_logp_version: int | None = None
    lengths: list[int] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn) -> PolicyBatch:
        return PolicyBatch(
            **{
                f.name: fn(v) if isinstance(v, torch.Tensor) else v
                for f in fields(self)
                for v in [getattr(self, f.name)]
            }
        )

    def to(self, device: torch.device) -> PolicyBatch:
        """The batch with every tensor on ``device`` (the engine's)."""
        return self._map(lambda v: v.to(device, non_blocking=True))

    def rows(self, rows: slice) -> PolicyBatch:
        """A view of the rows ``rows`` (no copy)."""
        view = self._map(lambda v: v[rows])
        if self.lengths is not None:
            view.lengths = self.lengths[rows]
        return view

    def validate(self) -> None:
        """Raise ValueError naming the first field with a wrong shape or dtype."""
        if self.input_ids.dim() != 2:
            raise ValueError(
                f"PolicyBatch.input_ids must be [batch, seq], got {tuple(self.input_ids.shape)}"
            )
        shape = self.input_ids.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("input_ids", "sample_index") or not isinstance(value, torch.Tensor):
                continue
            if value.shape != shape:
                raise ValueError(
                    f"PolicyBatch.{f.name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(shape)} (the shape of input_ids)"
                )
        if self.sample_index.shape != shape[:1]:
            raise ValueError(
                f"PolicyBatch.sample_index has shape {tuple(self.sample_index.shape)}, "
                f"expected ({shape[0]},) (one index per row)"
            )
        if self.lengths is not None and len(self.lengths) != shape[0]:
            raise ValueError(
                f"PolicyBatch.lengths has {len(self.lengths)} entries for {shape[0]} rows"
            )
        if self.response_mask.dtype != torch.bool:
            raise ValueError(
                f"PolicyBatch.response_mask must be bool, got {self.response_mask.dtype}"
            )
        for name in ("input_ids", "sample_index"):
            dtype = getattr(self, name).dtype
            if dtype.is_floating_point or dtype == torch.bool:
                raise ValueError(f"PolicyBatch.{name} must be an integer tensor, got {dtype}")

    @classmethod
    def from_generations(
        cls,
        gens: Generations,
        rows: Sequence[int] | None = None,
        *,
        sample_index: Sequence[int] | None = None,
        advantages: Sequence[torch.Tensor] | None = None,
        pad_token_id: int = 0,
        seq_len: int | None = None,
    ) -> PolicyBatch:
        """Right-padded host tensors of the samples ``rows`` (default: all) of ``gens``.

        ``advantages[i]`` is sample ``i``'s ``[response_len]`` advantages (default 0);
        ``sample_index`` defaults to ``rows``. ``seq`` is the longest prompt + response
        of the rows unless ``seq_len`` is given. ``rollout_logp`` holds vLLM's log-probs
        at the response positions, 0 elsewhere.
        """
        rows = list(range(len(gens))) if rows is None else list(rows)
        lengths = [len(gens.prompt_ids[i]) + len(gens.response_ids[i]) for i in rows]
        s = max(lengths, default=0) if seq_len is None else seq_len
        if lengths and max(lengths) > s:
            raise ValueError(f"seq_len={s} is shorter than the longest sample ({max(lengths)})")
        n = len(rows)
        input_ids = torch.full((n, s), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(n, s, dtype=torch.long)
        response_mask = torch.zeros(n, s, dtype=torch.bool)
        rollout_logp = torch.zeros(n, s, dtype=torch.float32)
        adv = torch.zeros(n, s, dtype=torch.float32)
        for j, i in enumerate(rows):
            p, r = gens.prompt_ids[i], gens.response_ids[i]
            a, b = len(p), len(p) + len(r)
            input_ids[j, :a] = torch.tensor(p, dtype=torch.long)
            input_ids[j, a:b] = torch.tensor(r, dtype=torch.long)
            attention_mask[j, :b] = 1
            response_mask[j, a:b] = True
            rollout_logp[j, a:b] = torch.tensor(gens.logprobs[i], dtype=torch.float32)
            if advantages is not None:
                adv[j, a:b] = advantages[i]
        index = rows if sample_index is None else list(sample_index)
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            sample_index=torch.tensor(index, dtype=torch.long),
            advantages=adv,
            rollout_logp=rollout_logp,
            lengths=lengths,
        )


@dataclass(frozen=True)
class MiniBatchLayout:
    """``num_minibatches`` mini-batches of ``rows_per_minibatch`` samples over ``dp_size``
    data-parallel ranks (see the module docstring).

    ``lengths`` (each sample's prompt + response tokens) balances the ranks: each
    mini-batch's samples go to the ranks longest first, each to the rank with the
    fewest tokens so far (:func:`covrl.engine.packing.balanced_partition`), with
    ``rows_per_minibatch / dp_size`` samples per rank unless ``equal_rows`` is False
    (packed micro-batches need no equal row counts). Without ``lengths`` rank ``r``
    holds the contiguous samples ``[k*M + r*M/dp, k*M + (r+1)*M/dp)``.
    """

    num_minibatches: int
    rows_per_minibatch: int
    dp_size: int
    dp_rank: int
    lengths: tuple[int, ...] | None = None
    equal_rows: bool = True

    def __post_init__(self) -> None:
        if self.equal_rows and self.rows_per_minibatch % self.dp_size:
            raise ValueError(
                f"{self.rows_per_minibatch} rows per mini-batch do not split over "
                f"{self.dp_size} data-parallel ranks"
            )
        if self.lengths is not None and len(self.lengths) < self.num_samples:
            raise ValueError(
                f"{len(self.lengths)} lengths for {self.num_samples} samples "
                f"({self.num_minibatches} mini-batches of {self.rows_per_minibatch})"
            )
        shares = [self._share(k) for k in range(self.num_minibatches)]
        object.__setattr__(self, "_shares", shares)
        starts = [0]
        for share in shares:
            starts.append(starts[-1] + len(share))
        object.__setattr__(self, "_starts", starts)

    @property
    def num_samples(self) -> int:
        return self.num_minibatches * self.rows_per_minibatch

    def _share(self, minibatch: int) -> list[int]:
        first = minibatch * self.rows_per_minibatch
        if self.lengths is None:
            per_rank = self.rows_per_minibatch // self.dp_size
            start = first + self.dp_rank * per_rank
            return list(range(start, start + per_rank))
        window = self.lengths[first : first + self.rows_per_minibatch]
        parts = balanced_partition(window, self.dp_size, equal_size=self.equal_rows)
        return [first + i for i in parts[self.dp_rank]]

    def rank_samples(self, minibatch: int) -> list[int]:
        """The step's sample indices this rank holds of ``minibatch`` (ascending)."""
        return list(self._shares[minibatch])

    def minibatch(self, minibatch: int) -> slice:
        """The rows of ``minibatch`` in this rank's batch."""
        return slice(self._starts[minibatch], self._starts[minibatch + 1])


def step_advantages(gens: Generations, config: AdvantageConfig) -> list[torch.Tensor]:
    """Per-token advantages of every sample of the step, ``[response_len]`` each.

    Computed over the whole step (group baselines; REINFORCE++'s whitening over every
    response token), identical on every rank.
    """
    lengths = gens.response_lengths
    mask = torch.zeros(len(gens), max(lengths, default=0), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    adv = compute_advantages(
        torch.tensor(gens.rewards, dtype=torch.float32), torch.tensor(gens.group), mask, config
    )
    return [adv[i, :n].float() for i, n in enumerate(lengths)]


def rank_batch(
    gens: Generations,
    layout: MiniBatchLayout,
    advantage: AdvantageConfig,
    *,
    pad_token_id: int,
    device: torch.device,
) -> PolicyBatch:
    """This rank's rows of every mini-batch (mini-batch order), on ``device``."""
    rows, index = [], []
    for k in range(layout.num_minibatches):
        samples = layout.rank_samples(k)
        rows += list(samples)
        index += [i - k * layout.rows_per_minibatch for i in samples]
    batch = PolicyBatch.from_generations(
        gens,
        rows,
        sample_index=index,
        advantages=step_advantages(gens, advantage),
        pad_token_id=pad_token_id,
    )
    return batch.to(device)


def dynamic_sampling(gens: Generations) -> Generations:
    """DAPO: the samples of the groups whose rewards are not all equal."""
    result = dynamic_sampling_filter(
        torch.tensor(gens.rewards, dtype=torch.float64), torch.tensor(gens.group)
    )
    return gens.select(result.kept_indices.tolist())


def rollout_metrics(gens: Generations) -> dict[str, float]:
    """Reward, accuracy and response-length statistics of the samples."""
    lengths = gens.response_lengths
    n = max(len(gens), 1)
    return {
        "rollout/reward_mean": sum(gens.rewards) / n,
        "rollout/accuracy": sum(gens.acc) / n,
        "rollout/response_length_mean": sum(lengths) / n,
        "rollout/response_length_max": float(max(lengths, default=0)),
        "rollout/truncated_fraction": sum(f == "length" for f in gens.finish_reasons) / n,
        "rollout/response_tokens": float(sum(lengths)),
    }
