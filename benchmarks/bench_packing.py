"""Packed sequences against padded rows: tokens/s and peak memory of a training step,
and the forward / backward passes a step costs per method.

A random Qwen2 policy on one process (megatron-core, the engine's real passes). The
batch follows the shape of the paper's response lengths, scaled to this machine: a
short prompt and a long-tailed response length (log-normal, most responses a fraction
of the longest, a few at the limit). Three ways to run the same rows through
:meth:`PolicyEngine.train_step`:

* ``padded (batch max)``: every row padded to the batch's longest sequence, micro-batches
  of ``--micro-batch-size`` rows in arrival order (what a fixed ``[N, S]`` batch costs);
* ``padded (sorted, trimmed)``: the engine's fixed-size micro-batches (rows sorted by
  length, each micro-batch trimmed to its own longest row);
* ``packed``: ``EngineConfig.max_tokens_per_micro_batch`` micro-batches, sequences
  packed end to end (no padding at all).

Reported per way (each in a fresh process of its own, one after the other): seconds
per step (best of ``--repeats``), real tokens per second, the padding share of the
tokens computed, peak extra memory of the first step (CPU: resident-set high-water
mark; CUDA: allocator peak; it includes the optimizer state the first step creates, the
same for every way), and the ratios to the padded baseline.

Then, per method (GRPO, Clip-Cov, KL-Cov), the engine's forward-only and training
passes counted over one step of ``--minibatches`` mini-batches (``ppo_update`` and the
old-log-prob pass), next to the formula of docs/training.md.

Usage::

    .venv/bin/python benchmarks/bench_packing.py
    .venv/bin/python benchmarks/bench_packing.py --rows 64 --max-len 1024 --hidden 256
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_common import random_qwen2


def response_lengths(args) -> list[int]:
    """Long-tailed lengths: log-normal with median ``max/6``, clipped to the limit."""
    g = torch.Generator().manual_seed(args.seed)
    limit = args.max_len - args.prompt
    raw = torch.exp(torch.randn(args.rows, generator=g) * 0.9) * (limit / 6)
    return [int(min(limit, max(4, round(x)))) for x in raw.tolist()]


def make_batch(args, vocab: int):
    lengths = [args.prompt + n for n in response_lengths(args)]
    s = max(lengths)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(1, vocab, (len(lengths), s), generator=g)
    mask = (torch.arange(s)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask, lengths


def nll(global_tokens: int):
    def loss_fn(out, micro):
        m = micro["attention_mask"].float()
        m[:, 0] = 0
        return -(out.logp * m).sum() / global_tokens, {}

    return loss_fn


def build_engine(checkpoint, engine_config):
    from covrl.engine import OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig, build_model, load_hf_weights

    config = PolicyModelConfig.from_hf(checkpoint)
    chunks = build_model(config)
    load_hf_weights(chunks, config, checkpoint)
    return PolicyEngine(chunks, config, OptimizerConfig(lr=1e-5, clip_grad=1.0), engine_config)


def measure_way(checkpoint, engine_kwargs: dict, plan_lengths, args) -> tuple:
    """In a fresh process: the plan's size, the tokens it computes, the best seconds of
    a train_step and the peak extra memory of the first one (a fresh process, so the
    allocator's cache of an earlier way does not hide this one's peak)."""
    from covrl.engine import EngineConfig
    from covrl.models import PolicyModelConfig
    from covrl.rollout.memory import peak_extra_memory

    engine = build_engine(checkpoint, EngineConfig(**engine_kwargs))
    ids, mask, lengths = make_batch(args, PolicyModelConfig.from_hf(checkpoint).vocab_size)
    plan = engine.micro_batches(plan_lengths)
    packed = engine_kwargs.get("max_tokens_per_micro_batch") is not None
    computed = sum(lengths) if packed else sum(len(mb.rows) * mb.seq_len for mb in plan)
    loss_fn = nll(sum(lengths) - len(lengths))
    data = {"input_ids": ids, "attention_mask": mask}

    def step():
        return engine.train_step(data, loss_fn, lengths=plan_lengths)

    _, peak = peak_extra_memory(step, engine.device)
    best = math.inf
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return len(plan), computed, best, peak


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new process with a process group of its own."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_initialized, fn, *args).result()


def _initialized(fn, *args):
    import socket

    from covrl.parallel import ParallelConfig, initialize

    with socket.socket() as sock:  # a free port for this process's rendezvous
        sock.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
    initialize(ParallelConfig(), seed=1234)
    return fn(*args)


def throughput(args, checkpoint) -> None:
    from covrl.models import PolicyModelConfig

    vocab = PolicyModelConfig.from_hf(checkpoint).vocab_size
    _, _, lengths = make_batch(args, vocab)
    real = sum(lengths)
    mbs = args.micro_batch_size
    budget = args.budget or 2 * max(lengths)
    ways = [
        # The whole batch at its longest row: the engine's plan sees every row as full.
        ("padded (batch max)", {"micro_batch_size": mbs}, [max(lengths)] * len(lengths)),
        ("padded (sorted, trimmed)", {"micro_batch_size": mbs}, lengths),
        (f"packed ({budget} tokens)", {"max_tokens_per_micro_batch": budget}, lengths),
    ]
    print(
        f"batch: {len(lengths)} rows, prompt {args.prompt} + responses {min(lengths) - args.prompt}"
        f"..{max(lengths) - args.prompt} tokens (mean {real / len(lengths) - args.prompt:.0f}); "
        f"{real} real tokens; model hidden {args.hidden}, {args.layers} layers, vocab {vocab}"
    )
    rows = []
    for name, engine_kwargs, plan_lengths in ways:
        n, computed, seconds, peak = in_fresh_process(
            measure_way, checkpoint, engine_kwargs, plan_lengths, args
        )
        rows.append((name, n, seconds, real / seconds, 1 - real / computed, peak))
    base = rows[0]
    print(
        f"\n{'training step':<28} {'micro-batches':>13} {'s/step':>8} {'tokens/s':>10} "
        f"{'padding':>8} {'peak MiB':>9} {'tokens/s vs padded':>19} {'peak vs padded':>15}"
    )
    for name, n, seconds, tps, pad, peak in rows:
        print(
            f"{name:<28} {n:>13} {seconds:>8.3f} {tps:>10.0f} {pad:>7.0%} "
            f"{peak / 2**20:>9.1f} {tps / base[3]:>18.2f}x {peak / base[5]:>14.2f}x"
        )


def pass_counts(args, checkpoint) -> None:
    """Forward-only and training passes of one step, counted on the engine."""
    from covrl.algorithms import EntropyControlConfig, PolicyLossConfig
    from covrl.engine import EngineConfig
    from covrl.models import PolicyModelConfig
    from covrl.parallel import SINGLE_PROCESS
    from covrl.training import PolicyBatch, ppo_update

    vocab = PolicyModelConfig.from_hf(checkpoint).vocab_size
    small = argparse.Namespace(**{**vars(args), "rows": 4 * args.minibatches, "max_len": 64})
    ids, mask, lengths = make_batch(small, vocab)
    response = mask.bool() & (torch.arange(ids.shape[1])[None] >= args.prompt)
    adv = torch.randn(len(lengths), 1).expand_as(ids).contiguous() * response
    rows = len(lengths) // args.minibatches
    print(f"\npasses over one step: {args.minibatches} mini-batches of {rows} rows, 1 epoch")
    print(f"{'method':<10} {'forward-only':>13} {'training':>9} {'fwd-equiv/token':>16} formula")
    for method in ("none", "clip_cov", "kl_cov"):
        engine = build_engine(checkpoint, EngineConfig(micro_batch_size=rows))
        counts = {"forward": 0, "train": 0}
        run = engine._run

        def counted(batch, plan, loss_fn, forward_only, run=run, counts=counts):
            counts["forward" if forward_only else "train"] += 1
            return run(batch, plan, loss_fn, forward_only)

        engine._run = counted
        batch = PolicyBatch(
            input_ids=ids,
            attention_mask=mask,
            response_mask=response,
            sample_index=torch.arange(len(lengths)),
            advantages=adv,
            lengths=list(lengths),
        )
        cfg = PolicyLossConfig(entropy_control=EntropyControlConfig(method=method))
        # The old-log-prob pass, mini-batch by mini-batch (as the trainer runs it).
        batch.old_logp = torch.zeros_like(batch.advantages)
        for k in range(args.minibatches):
            part = batch.rows(slice(k * rows, (k + 1) * rows))
            out = engine.forward_logprobs(part.input_ids, part.attention_mask, lengths=part.lengths)
            batch.old_logp[k * rows : (k + 1) * rows] = out.logp
        batch.old_logp_version = engine.weights_version
        for k in range(args.minibatches):
            part = batch.rows(slice(k * rows, (k + 1) * rows))
            ppo_update(engine, part, cfg, step=k, dp_group=SINGLE_PROCESS)
        m = args.minibatches
        per_token = (counts["forward"] + 3 * counts["train"]) / m
        formula = "1 + 3E" if method == "none" else "1 + 4E - 1/M"
        print(
            f"{method:<10} {counts['forward']:>13} {counts['train']:>9} {per_token:>16.3f} {formula}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--budget", type=int, default=None, help="tokens per packed micro-batch")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_qwen2(
            Path(tmp),
            hidden=args.hidden,
            layers=args.layers,
            vocab=args.vocab,
            max_len=args.max_len,
        )
        throughput(args, checkpoint)
        in_fresh_process(pass_counts, args, checkpoint)


if __name__ == "__main__":
    main()
