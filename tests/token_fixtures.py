"""Fixtures of the algorithm tests: synthetic mini-batches, splits into
micro-batches/ranks, and a brute-force selection reference.

A mini-batch is a list of samples (one response each). A split assigns samples to
data-parallel ranks and micro-batches in any order; every micro-batch is padded to its
own length, left or right, with NaN in the padding (padding must never count).
"""

from __future__ import annotations

import math

import torch

from covrl.algorithms import canonical_token_ids
from covrl.ops import uniform_keys

DATASETS = ("continuous", "ties")


def make_samples(
    dataset: str = "continuous", n_seqs: int = 16, max_len: int = 48, seed: int = 0
) -> list[dict]:
    """Per-sample float32 tensors ``[L_i]``: logp, old_logp, adv, entropy, ref_logp.

    ``ties``: log-probs on a 0.25 grid, so many tokens share one covariance exactly and
    the selection boundary falls inside tie sets (tie-breaking decides).
    Groups of 4 responses; group 1 has all-equal rewards (zero advantage).
    """
    g = torch.Generator().manual_seed(seed + (17 if dataset == "ties" else 0))
    lengths = torch.randint(4, max_len + 1, (n_seqs,), generator=g).tolist()
    rewards = torch.randint(0, 2, (n_seqs,), generator=g).double()
    rewards[4:8] = 1.0
    adv = []
    for s in range(0, n_seqs, 4):
        r = rewards[s : s + 4]
        adv += ((r - r.mean()) / (r.std() + 1e-6)).tolist()
    samples = []
    for i, n in enumerate(lengths):
        logp = -torch.empty(n).exponential_(1.0, generator=g)
        if dataset == "ties":
            logp = (logp * 4).round() / 4
        old = (logp + 0.3 * torch.randn(n, generator=g)).clamp(max=0.0)
        samples.append(
            dict(
                index=i,
                logp=logp.float(),
                old_logp=old.float(),
                adv=torch.full((n,), adv[i], dtype=torch.float32),
                entropy=torch.rand(n, generator=g).float(),
                ref_logp=(logp + 0.1 * torch.randn(n, generator=g)).float(),
            )
        )
    return samples


_FIELDS = ("logp", "old_logp", "adv", "entropy", "ref_logp")


def collate(samples: list[dict], left_pad: bool, extra: int = 1) -> dict:
    """``[b, s]`` tensors with NaN padding, the mask, sample indices and token ids."""
    width = max(s["logp"].numel() for s in samples) + extra
    out = {f: torch.full((len(samples), width), float("nan")) for f in _FIELDS}
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for row, s in enumerate(samples):
        n = s["logp"].numel()
        cols = slice(width - n, width) if left_pad else slice(0, n)
        for f in _FIELDS:
            out[f][row, cols] = s[f]
        mask[row, cols] = True
    out["mask"] = mask
    out["sample_index"] = torch.tensor([s["index"] for s in samples])
    out["token_ids"] = canonical_token_ids(out["sample_index"], mask)
    return out


def split(samples: list[dict], dp: int, rank: int, n_mb: int, order_seed: int) -> list[dict]:
    """This rank's micro-batches: samples permuted, dealt to ranks, cut unevenly."""
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(order_seed))
    mine = [samples[i] for i in perm.tolist()][rank::dp]
    # Uneven cut points, at least one sample per micro-batch.
    g = torch.Generator().manual_seed(order_seed + 1000 * rank)
    cuts = sorted(torch.randperm(len(mine) - 1, generator=g)[: n_mb - 1].add(1).tolist())
    bounds = [0, *cuts, len(mine)]
    return [
        collate(mine[a:b], left_pad=(j % 2 == 1), extra=j % 3)
        for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def flat_tokens(samples: list[dict]) -> dict:
    """All tokens of a mini-batch in canonical order, float64, with their ids."""
    ids, cols = [], {f: [] for f in _FIELDS}
    for s in sorted(samples, key=lambda s: s["index"]):
        n = s["logp"].numel()
        ids.append((s["index"] << 32) + torch.arange(n))
        for f in _FIELDS:
            cols[f].append(s[f].double())
    out = {f: torch.cat(v) for f, v in cols.items()}
    out["ids"] = torch.cat(ids)
    return out


def reference_selection(
    samples: list[dict],
    method: str,
    ratio: float,
    *,
    omega=(1.0, 5.0),
    clip=(0.2, 0.2, 3.0),
    seed: int = 0,
    step: int = 0,
    use_current: bool = True,
) -> set[int]:
    """Brute force: sort the whole mini-batch by (key, id) and take the first K."""
    t = flat_tokens(samples)
    lp = t["logp"] if use_current else t["old_logp"]
    n = lp.numel()
    cov = (lp - lp.mean()) * (t["adv"] - t["adv"].mean())
    k = max(1, math.floor(round(ratio * n, 9))) if n else 0
    ids = t["ids"].tolist()
    if method == "kl_cov":
        order = sorted(range(n), key=lambda i: (-cov[i].item(), ids[i]))
        return {ids[i] for i in order[:k]}
    ratio_t = torch.exp(t["logp"] - t["old_logp"]) if use_current else torch.ones(n)
    low, high, c = clip
    a = t["adv"]
    clipped = ((a > 0) & (ratio_t > 1 + high)) | ((a < 0) & (ratio_t < 1 - low))
    clipped |= (a < 0) & (ratio_t > c)
    keys = uniform_keys(t["ids"], seed, step).tolist()
    cand = [i for i in range(n) if omega[0] < cov[i] < omega[1] and not clipped[i]]
    cand.sort(key=lambda i: (keys[i], ids[i]))
    return {ids[i] for i in cand[:k]}


def selection_batches(mbs: list[dict], with_logp: bool = True) -> list:
    """One :class:`covrl.algorithms.SelectionBatch` per collated micro-batch."""
    from covrl.algorithms import SelectionBatch

    return [
        SelectionBatch(
            advantages=mb["adv"],
            old_logp=mb["old_logp"],
            mask=mb["mask"],
            token_ids=mb["token_ids"],
            logp=mb["logp"] if with_logp else None,
        )
        for mb in mbs
    ]
