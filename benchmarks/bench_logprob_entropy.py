"""Time and peak memory of per-token log-prob + entropy on vocab-parallel logits.

Methods (each rank holds ``[tokens, vocab/tp]`` float32 logits, ``tp`` ranks on gloo):

* ``naive``: the full-vocabulary float32 ``log_softmax`` + ``gather`` + entropy
  ``-sum exp(lp) * lp``; at TP > 1 the shards are all-gathered first (and each rank
  keeps its slice of the full gradient).
* ``mcore``: megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy`` for the
  log-prob plus a separate vocab-parallel entropy pass (max / sum-exp / sum p*x
  all-reduces, no grad). Megatron overwrites float32 logits with the softmax (and then
  the gradient), so the entropy pass runs first.
* ``fused``: ``covrl.ops.vocab_parallel_logprob_entropy`` (default chunk size).
* ``fused-inplace``: the same with ``inplace=True`` (gradient in the logits' storage,
  like megatron's).

Modes: ``fwd`` (no autograd), ``fwd+bwd`` (gradient of the log-prob; entropy is a
metric), ``fwd+bwd+H`` (gradients of both; megatron-core has no entropy gradient).

Timing: wall time of forward (+ backward) per iteration, after one warm-up; at TP > 1
the ranks start together (barrier) and an iteration counts as its slowest rank; the
median over the timed iterations is reported. Restoring the logits between iterations
(megatron and the in-place variant overwrite them) is not timed.

Peak memory: every (TP, method, mode) runs in fresh processes forked from a
forkserver that has already imported torch and megatron-core. ``peak extra`` is the
kernel's high-water resident set size of the process (``getrusage`` ``ru_maxrss``) at
the end, minus the resident size right after the inputs were built. Inputs are
filled in place, so building them leaves no transient peak above that baseline (the
script checks and warns otherwise). It counts everything the method allocates:
outputs, gradient, temporaries, gathered logits. At TP > 1 the maximum over ranks.
``tracemalloc`` would not see torch's allocations, hence RSS.

Threads: the machine's cores are split evenly over the ranks (2 cores: TP=1 runs
2 threads, TP=2 one thread per rank).

Run: ``python benchmarks/bench_logprob_entropy.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import dataclass

METHODS = ("naive", "mcore", "fused", "fused-inplace")
MODES = ("fwd", "fwd+bwd", "fwd+bwd+H")
_UNSUPPORTED = {("mcore", "fwd+bwd+H"), ("fused-inplace", "fwd")}
_CHECK_TOKENS = 32  # tokens checked against a float64 reference
_BLOCK_TOKENS = 256


@dataclass(frozen=True)
class Job:
    tp: int
    method: str
    mode: str
    tokens: int
    vocab: int
    chunk_size: int | None
    warmup: int
    repeats: int
    threads: int


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _mcore_entropy(logits, group):
    """Vocab-parallel entropy as a separate pass on whole ``[tokens, vocab/tp]`` tensors."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        logits_max = logits.amax(dim=-1)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        # One [tokens, vocab/tp] temporary: exp(z - max), then exp(z - max) * z.
        exp = logits - logits_max.unsqueeze(-1)
        exp.exp_()
        sums = torch.stack([exp.sum(-1), exp.mul_(logits).sum(-1)])
        dist.all_reduce(sums, group=group)
        # H = logsumexp(z) - E_p[z]
        return logits_max + torch.log(sums[0]) - sums[1] / sums[0]


def _naive(logits, target, group, tp, mode):
    """Full-vocabulary float32 reference implementation, gathering the shards at TP > 1."""
    import torch
    import torch.distributed as dist

    full = logits
    if tp > 1:
        shards = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(shards, logits.detach(), group=group)
        full = torch.cat(shards, dim=1).requires_grad_(logits.requires_grad)
        del shards
    logprobs = torch.log_softmax(full.float(), dim=-1)
    logp = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if mode == "fwd+bwd+H":
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    else:
        with torch.no_grad():
            entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy, full


def _run_once(job: Job, logits, target, weights, group):
    """One forward (+ backward); returns (logp, entropy)."""
    import torch
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from covrl.ops import vocab_parallel_logprob_entropy
    from covrl.parallel import SINGLE_PROCESS

    train = job.mode != "fwd"
    with torch.set_grad_enabled(train):
        if job.method == "naive":
            logp, entropy, full = _naive(logits, target, group, job.tp, job.mode)
        elif job.method == "mcore":
            entropy = _mcore_entropy(logits, group)
            logp = -tensor_parallel.vocab_parallel_cross_entropy(logits, target)
        else:
            logp, entropy = vocab_parallel_logprob_entropy(
                logits,
                target,
                tp_group=group if job.tp > 1 else SINGLE_PROCESS,
                vocab_size=logits.shape[-1] * job.tp,
                chunk_size=job.chunk_size,
                entropy_requires_grad=job.mode == "fwd+bwd+H",
                inplace=job.method == "fused-inplace",
            )
    if train:
        loss = (logp * weights).sum()
        if job.mode == "fwd+bwd+H":
            loss = loss + (entropy * weights).sum()
        loss.backward()
        if job.method == "naive" and job.tp > 1:
            # Each rank keeps its own slice of the full gradient.
            rank, local = dist.get_rank(group), logits.shape[1]
            logits.grad = full.grad[:, rank * local : (rank + 1) * local].contiguous()
            del full
    return logp.detach(), entropy.detach()


def _to_bytes(t) -> tuple[bytes, list[int], str]:
    return t.contiguous().numpy().tobytes(), list(t.shape), str(t.numpy().dtype)


def _from_bytes(payload):
    import numpy as np
    import torch

    data, shape, dtype = payload
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(shape).copy())


def _float64_errors(check_per_rank) -> tuple[float, float]:
    """Max |error| of rank 0's logp and entropy on the first tokens vs float64."""
    import torch

    logp, entropy = (_from_bytes(b).double() for b in check_per_rank[0][:2])
    logits = torch.cat([_from_bytes(c[2]) for c in check_per_rank], dim=1).double()
    target = _from_bytes(check_per_rank[0][3])
    logprobs = torch.log_softmax(logits, dim=-1)
    ref_logp = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(logprobs.exp() * logprobs).sum(-1)
    return (logp - ref_logp).abs().max().item(), (entropy - ref_entropy).abs().max().item()


def _worker(job: Job, rank: int, port: int, queue) -> None:
    try:
        os.environ.update(OMP_NUM_THREADS=str(job.threads))
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state

        torch.set_num_threads(job.threads)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=job.tp
        )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=job.tp, create_gloo_process_groups=False
        )
        group = parallel_state.get_tensor_model_parallel_group()

        local = job.vocab // job.tp
        gen = torch.Generator().manual_seed(1000 + rank)
        # Random rows repeat with period _BLOCK_TOKENS (drawing 3e8 normals per job
        # would dominate the run; timings do not depend on the values). Everything is
        # filled in place: no transient allocation above the baseline measured below.
        block = torch.empty(min(_BLOCK_TOKENS, job.tokens), local).normal_(0, 3, generator=gen)
        logits = torch.empty(job.tokens, local)
        for begin in range(0, job.tokens, block.shape[0]):
            end = min(begin + block.shape[0], job.tokens)
            logits[begin:end].copy_(block[: end - begin])
        # megatron and the in-place variant overwrite the logits: keep a copy to restore.
        overwrites = job.method == "mcore" or (job.method == "fused-inplace")
        source = logits.clone() if overwrites else None
        logits.requires_grad_(job.mode != "fwd")
        shared = torch.Generator().manual_seed(7)  # same on all ranks
        target = torch.randint(0, job.vocab, (job.tokens,), generator=shared)
        weights = torch.randn(job.tokens, generator=shared)

        rss_before = _rss_bytes()
        setup_peak = _maxrss_bytes() - rss_before
        times, first = [], None
        for _ in range(job.warmup + job.repeats):
            if source is not None:
                with torch.no_grad():
                    logits.copy_(source)
            logits.grad = None
            dist.barrier(group)
            start = time.perf_counter()
            out = _run_once(job, logits, target, weights, group)
            times.append(time.perf_counter() - start)
            first = first or out
        peak = _maxrss_bytes() - rss_before
        # Bytes, not tensors: tensors sent through a Queue share storage with a process
        # that is about to exit. The first rows feed the float64 accuracy check.
        k = min(_CHECK_TOKENS, job.tokens)
        check = tuple(_to_bytes(t[:k]) for t in (*first, block, target))
        queue.put((rank, "ok", (times[job.warmup :], peak, setup_peak, check)))
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        import traceback

        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _launch(ctx, job: Job, timeout: float = 600.0):
    """Run ``job`` on ``job.tp`` fresh ranks; (median seconds, peak bytes, setup peak,
    (logp error, entropy error) vs float64 on the first tokens)."""
    from covrl.parallel import free_port

    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(job, r, port, queue)) for r in range(job.tp)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(job.tp):
            rank, status, payload = queue.get(timeout=timeout)
            if status != "ok":
                raise RuntimeError(f"{job} rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    per_rank_times = [results[r][0] for r in range(job.tp)]
    slowest = [max(ts) for ts in zip(*per_rank_times, strict=True)]
    return (
        statistics.median(slowest),
        max(results[r][1] for r in range(job.tp)),
        max(results[r][2] for r in range(job.tp)),
        _float64_errors([results[r][3] for r in range(job.tp)]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=152064, help="Qwen2.5's padded vocabulary")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--chunk-size", type=int, default=None, help="fused: tokens per chunk")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads-per-rank",
        type=int,
        default=1,
        help="intra-op threads per rank (1: stable timings on a shared machine)",
    )
    args = parser.parse_args()

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "megatron.core", "covrl.ops"])
    print(
        f"tokens={args.tokens} vocab={args.vocab} float32 logits, "
        f"{args.threads_per_rank} thread(s) per rank, median of {args.repeats} after "
        f"{args.warmup} warm-up; peak extra = high-water RSS - RSS after inputs; "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'tp':>2} {'mode':<10} {'method':<14} {'time s':>8} {'x naive':>8} {'x mcore':>8} "
        f"{'peak MiB':>9} {'x naive':>8} {'x mcore':>8} {'err logp':>8} {'err H':>8}"
    )
    print(header)
    print("-" * len(header))
    for tp in args.tp:
        if args.vocab % tp:
            raise SystemExit(f"--vocab {args.vocab} is not divisible by tp={tp}")
        for mode in args.modes:
            rows = {}
            for method in args.methods:
                if (method, mode) in _UNSUPPORTED:
                    continue
                job = Job(
                    tp, method, mode, args.tokens, args.vocab, args.chunk_size,
                    args.warmup, args.repeats, args.threads_per_rank,
                )  # fmt: skip
                seconds, peak, setup_peak, errors = _launch(ctx, job)
                if setup_peak > 64 * 2**20:
                    print(f"warning: {method} {mode}: setup peaked {setup_peak / 2**20:.0f} MiB "
                          "above the baseline; peak extra may be under-reported")  # fmt: skip
                rows[method] = (seconds, peak, *errors)
            for method in rows:
                _print_row(tp, mode, method, rows)
        print()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def _print_row(tp: int, mode: str, method: str, rows: dict) -> None:
    seconds, peak, err_logp, err_entropy = rows[method]

    def ratio(value: float, base: str, index: int) -> str:
        return f"{value / rows[base][index]:8.2f}" if base in rows else f"{'-':>8}"

    print(
        f"{tp:>2} {mode:<10} {method:<14} {seconds:8.3f} {ratio(seconds, 'naive', 0)} "
        f"{ratio(seconds, 'mcore', 0)} {peak / 2**20:9.0f} {ratio(peak, 'naive', 1)} "
        f"{ratio(peak, 'mcore', 1)} {err_logp:8.1e} {err_entropy:8.1e}",
        flush=True,
    )


if __name__ == "__main__":
    main()
