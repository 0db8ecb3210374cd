"""Time Clip-Cov / KL-Cov token selection + policy loss (forward and backward) per mini-batch.

Compares, in one process on the same data:

* ``public``: the public implementation's approach, per micro-batch: covariance with
  the micro-batch's own means, a device-to-host copy of the covariance, CPU top-k
  (KL-Cov) or CPU random choice among band candidates (Clip-Cov), indices back to the
  device, then the loss.
* ``covrl``: one :func:`prepare_selection` pass over the whole mini-batch (exact,
  scope-global selection, no host copy of per-token data), then per micro-batch
  :func:`compute_policy_loss` + :func:`aggregate_loss`.
* ``covrl+stats``: the same with the Table-1 covariance summary computed.

Both do the same loss work for a config: the log-ratio clamp, and for Clip-Cov the
PPO clip and dual-clip (``clip_ratio_c``; the public Clip-Cov loss has no dual-clip, so
the baseline here adds it), KL-Cov without ratio clipping (``kl_cov.ppo_clip=False``).
covrl additionally checks inputs for NaN/inf (its ``check_finite`` default). Step
metrics (clip fractions, approximate KL) are left out of both.

Times exclude the model: log-probs are given tensors (the no-grad forward that the
``current`` log-prob source needs is a model cost, not measured here). On a CPU-only
machine the "device" is the host, so the round trip costs a memory copy only; on a GPU
it also synchronises the stream every micro-batch.

Usage: ``python benchmarks/bench_cov_selection.py [--tokens 1000000] [--device cpu]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from functools import partial

import torch

from covrl.algorithms import (
    ClipCovConfig,
    EntropyControlConfig,
    KLCovConfig,
    PolicyLossConfig,
    SelectionBatch,
    aggregate_loss,
    canonical_token_ids,
    compute_policy_loss,
    global_loss_count,
    prepare_selection,
)
from covrl.parallel import SINGLE_PROCESS


def make_minibatch(tokens: int, width: int, mb_seqs: int, device: torch.device, seed: int = 0):
    """Micro-batches of ``[mb_seqs, width]`` with random lengths, ~``tokens`` valid in all."""
    g = torch.Generator().manual_seed(seed)
    n_seqs = max(mb_seqs, round(tokens / (0.75 * width) / mb_seqs) * mb_seqs)
    lengths = torch.randint(width // 2, width + 1, (n_seqs,), generator=g)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.empty(n_seqs, width).exponential_(1.0, generator=g)
    logp = old + 0.05 * torch.randn(n_seqs, width, generator=g)
    rewards = torch.randint(0, 2, (n_seqs,), generator=g).float()
    groups = rewards.view(-1, 8) if n_seqs % 8 == 0 else rewards.view(1, -1)
    adv_seq = (
        (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)
    ).flatten()
    adv = adv_seq.unsqueeze(1).expand(n_seqs, width).contiguous()
    mbs = []
    for s in range(0, n_seqs, mb_seqs):
        rows = slice(s, s + mb_seqs)
        m = mask[rows]
        mbs.append(
            dict(
                logp=logp[rows].to(device),
                old_logp=old[rows].to(device),
                adv=adv[rows].to(device),
                mask=m.to(device),
                token_ids=canonical_token_ids(torch.arange(s, s + m.shape[0]), m).to(device),
            )
        )
    return mbs, int(mask.sum())


def public_step(mbs, cfg: PolicyLossConfig, count: torch.Tensor) -> None:
    """Per micro-batch selection with a host round trip, as the public implementation."""
    ec = cfg.entropy_control
    for mb in mbs:
        mask, adv, old = mb["mask"], mb["adv"], mb["old_logp"]
        logp = mb["logp"].clone().requires_grad_(True)
        log_ratio = (logp - old).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        ratio = torch.exp(log_ratio)
        pg1 = -adv * ratio
        low, high = cfg.clip_range
        pg2 = -adv * ratio.clamp(1 - low, 1 + high)
        n = mask.sum()
        mean_a = torch.where(mask, adv, 0.0).sum() / n
        mean_l = torch.where(mask, logp.detach(), 0.0).sum() / n
        cov = (adv - mean_a) * (logp.detach() - mean_l)
        n_valid = int(n.item())
        cov_host = cov.to("cpu", copy=True)
        mask_host = mask.to("cpu", copy=True)
        if ec.method == "clip_cov":
            clipped_host = ((pg2 > pg1) & mask).to("cpu", copy=True)
            band = (cov_host > ec.clip_cov.omega_low) & (cov_host < ec.clip_cov.omega_high)
            idx = torch.nonzero(band & mask_host & ~clipped_host)
            take = max(1, int(ec.clip_cov.ratio * n_valid))
            idx = idx[torch.randperm(idx.shape[0])[:take]].to(mask.device)
            keep = torch.ones_like(pg1)
            keep[idx[:, 0], idx[:, 1]] = 0
            tok = torch.maximum(pg1, pg2)
            if cfg.clip_ratio_c is not None:  # dual-clip, as covrl's loss does by config
                tok = torch.where(adv < 0, torch.minimum(tok, -adv * cfg.clip_ratio_c), tok)
            tok = tok * keep
        else:
            flat = cov_host[mask_host]
            take = int(ec.kl_cov.ratio * n_valid)
            pos = torch.nonzero(mask_host)
            idx = pos[torch.topk(flat, take).indices].to(mask.device) if take else pos[:0]
            tok = pg1.clone()
            tok[idx[:, 0], idx[:, 1]] += ec.kl_cov.beta * (logp - old).abs()[idx[:, 0], idx[:, 1]]
        loss = torch.where(mask, tok, 0.0).sum() / count
        loss.backward()


def covrl_step(mbs, cfg: PolicyLossConfig, count: torch.Tensor) -> None:
    sel = prepare_selection(
        [
            SelectionBatch(
                advantages=mb["adv"],
                old_logp=mb["old_logp"],
                mask=mb["mask"],
                token_ids=mb["token_ids"],
                logp=mb["logp"],
            )
            for mb in mbs
        ],
        cfg,
        step=0,
        group=SINGLE_PROCESS,
    )
    for i, mb in enumerate(mbs):
        logp = mb["logp"].clone().requires_grad_(True)
        out = compute_policy_loss(
            logp,
            old_logp=mb["old_logp"],
            advantages=mb["adv"],
            mask=mb["mask"],
            config=cfg,
            selected=sel.masks[i],
        )
        aggregate_loss(out.token_loss, mb["mask"], cfg.loss_agg_mode, count).backward()


def _time_interleaved(runs: dict, repeats: int, device: torch.device) -> dict:
    """Best and median wall time (ms) of each ``fn`` in ``runs``, repetitions interleaved.

    Interleaving exposes every variant to the same background load; the best time is
    the least disturbed one.
    """
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--mb-seqs", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=7)
    # One thread by default on CPU: timings on a shared 2-core machine are far steadier.
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)

    methods = {
        "clip_cov": EntropyControlConfig(method="clip_cov", clip_cov=ClipCovConfig()),
        "kl_cov": EntropyControlConfig(method="kl_cov", kl_cov=KLCovConfig()),
    }
    print(
        f"device={device} threads={torch.get_num_threads()} repeats={args.repeats} "
        f"load average {os.getloadavg()[0]:.1f} "
        "(best / median ms per mini-batch: selection + loss forward and backward)"
    )
    header = (
        f"{'method':<9} {'mb seqs':>7} {'#mb':>4} {'tokens':>9} {'public':>15} "
        f"{'covrl':>15} {'ratio':>6} {'covrl+stats':>15} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for mb_seqs in args.mb_seqs:
        mbs, n_tokens = make_minibatch(args.tokens, args.width, mb_seqs, device)
        count = global_loss_count([mb["mask"] for mb in mbs], "token-mean", SINGLE_PROCESS)
        for name, ec in methods.items():
            cfg = PolicyLossConfig(entropy_control=replace(ec, covariance_summary=False))
            stats_cfg = PolicyLossConfig(entropy_control=replace(ec, covariance_summary=True))
            t = _time_interleaved(
                {
                    "public": partial(public_step, mbs, cfg, count),
                    "covrl": partial(covrl_step, mbs, cfg, count),
                    "stats": partial(covrl_step, mbs, stats_cfg, count),
                },
                args.repeats,
                device,
            )
            best = {k: v[0] for k, v in t.items()}
            cells = {k: f"{v[0]:.1f} / {v[1]:.1f}" for k, v in t.items()}
            print(
                f"{name:<9} {mb_seqs:>7} {len(mbs):>4} {n_tokens:>9} {cells['public']:>15} "
                f"{cells['covrl']:>15} {best['public'] / best['covrl']:>6.2f} "
                f"{cells['stats']:>15} {best['public'] / best['stats']:>6.2f}"
            )
    print("ratio = public / covrl on best times (> 1: covrl faster)")


if __name__ == "__main__":
    main()
