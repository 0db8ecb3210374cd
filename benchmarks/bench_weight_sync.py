"""Megatron -> vLLM weight sync and rollout generation throughput.

For a random Qwen2 checkpoint of a few hundred MB, in one torchrun job:

* sync: :meth:`RolloutEngine.sync_weights` from megatron-core at each training layout
  (TP1 / TP2, DP filling the world) into vLLM at each rollout TP (TP1 / TP2), for two
  bucket sizes. Reported: seconds, GB handed to vLLM per rank, GB/s, and the ratio to
  a plain ``copy_`` of the same number of bytes measured in the same process (the
  baseline; goal >= 30 %); the same for covrl's side alone (export, checks, buckets,
  no vLLM loader); the measured peak of extra memory during the sync and its bound
  (bucket + 2 x largest tensor + 2 x vLLM's largest layer, see docs/rollout.md).
* generation: tokens/s of :meth:`RolloutEngine.generate` (per-sample seeds, split
  over replicas, gathered on every rank) against ``vllm.LLM.generate`` alone on the
  same engine, weights and requests (goal: overhead <= 5 %).

Usage (CPU, 2 ranks)::

    .venv/bin/torchrun --nproc_per_node 2 benchmarks/bench_weight_sync.py
    .venv/bin/python benchmarks/bench_weight_sync.py --layers 2   # one process, smaller

On CUDA the same script runs with NCCL and vLLM's sleep mode (sleep before the
layout's training work, wake in the sync).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bench_common import random_qwen2


def memcpy_gbps(nbytes: int, device: torch.device, repeats: int = 3) -> float:
    """GB/s of one ``copy_`` of ``nbytes`` (best of ``repeats``)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return nbytes / 1e9 / best


def export_seconds(chunks, config, engine, bucket_mb: float) -> float:
    """The covrl side alone: export + checks + buckets, without vLLM's loader."""
    from covrl.models import export_hf_weights
    from covrl.rollout import BucketedWeightStream

    dist.barrier()
    t = time.perf_counter()
    stream = BucketedWeightStream(
        export_hf_weights(chunks, config, dtype=engine.dtype),
        engine.expected_shapes,
        int(bucket_mb * 2**20),
        engine.dtype,
        engine.device,
    )
    for _ in stream:
        pass
    return time.perf_counter() - t


def bench_sync(engine, checkpoint, layouts, buckets, rollout_tp, rows):
    from megatron.core import parallel_state as ps

    from covrl.models import PolicyModelConfig, build_model, load_hf_weights
    from covrl.parallel import ParallelConfig, get_device, initialize
    from covrl.rollout.weight_sync import sync_memory_bound

    world = dist.get_world_size()
    for tp in layouts:
        if world % tp:
            continue
        initialize(ParallelConfig(tp, 1), seed=0)
        config = PolicyModelConfig.from_hf(checkpoint)
        chunks = build_model(config)
        load_hf_weights(chunks, config, checkpoint, tp_group=ps.get_tensor_model_parallel_group())
        engine.sleep()  # where training would run
        engine.sync_weights(chunks, config)  # warm-up
        for bucket in buckets:
            times, metrics = [], None
            for _ in range(3):
                dist.barrier()
                metrics = engine.sync_weights(chunks, config, bucket_mb=bucket)
                times.append(metrics["time_s"])
            measured = engine.sync_weights(chunks, config, bucket_mb=bucket, measure_memory=True)
            dist.barrier()
            seconds = min(times)  # best of 3: the machine may be shared
            gbps = metrics["bytes"] / 1e9 / seconds
            export_s = min(export_seconds(chunks, config, engine, bucket) for _ in range(3))
            export_gbps = metrics["bytes"] / 1e9 / export_s
            base = memcpy_gbps(int(metrics["bytes"]), get_device())
            itemsize = torch.empty((), dtype=engine.dtype).element_size()
            bound = sync_memory_bound(config, measured, itemsize)
            rows.append(
                [
                    f"TP{tp} DP{world // tp}",
                    f"TP{rollout_tp} x{world // rollout_tp}",
                    f"{bucket:g}",
                    f"{seconds:.3f}",
                    f"{metrics['bytes'] / 1e9:.3f}",
                    f"{gbps:.2f}",
                    f"{base:.2f}",
                    f"{gbps / base:.0%}",
                    f"{export_gbps:.2f}",
                    f"{export_gbps / base:.0%}",
                    f"{measured['peak_extra_bytes'] / 2**20:.0f}",
                    f"{bound / 2**20:.0f}",
                ]
            )
        del chunks


def bench_generation(engine, vocab: int, args, rows, rollout_tp: int):
    from vllm import SamplingParams

    from covrl.rollout import SamplingConfig, sample_seed
    from covrl.rollout.generations import split_evenly

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(args.prompts)]
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.new_tokens)
    # The same requests vLLM alone gets: this replica's prompts, one seed per sample.
    mine = split_evenly(len(prompts), engine.num_replicas)[engine.replica]
    requests = [({"prompt_token_ids": prompts[p]}, p, j) for p in mine for j in range(args.n)]
    params = [
        SamplingParams(
            n=1,
            temperature=1.0,
            max_tokens=args.new_tokens,
            logprobs=0,
            seed=sample_seed(1, p, j),
            detokenize=False,
            ignore_eos=True,
        )
        for _, p, j in requests
    ]
    sampling_tokens = len(prompts) * args.n * args.new_tokens
    engine.generate(prompts, sampling, seed=1)  # warm-up

    def covrl_run():
        gens = engine.generate(prompts, sampling, seed=1)
        return sum(gens.response_lengths)

    def vllm_run():
        outs = engine.llm.generate([r for r, _, _ in requests], params, use_tqdm=False)
        local = torch.tensor([sum(len(o.outputs[0].token_ids) for o in outs)])
        dist.all_reduce(local)  # every rank of a replica counted its replica's tokens
        return int(local.item()) // engine.replica_size

    results = {}
    for name, fn in (("vllm", vllm_run), ("covrl", covrl_run)) * 3:
        dist.barrier()
        t = time.perf_counter()
        tokens = fn()
        dist.barrier()
        results.setdefault(name, []).append(tokens / (time.perf_counter() - t))
    base = max(results["vllm"])
    for name in ("vllm", "covrl"):
        best = max(results[name])
        rows.append(
            [
                f"TP{rollout_tp} x{dist.get_world_size() // rollout_tp}",
                name,
                str(sampling_tokens),
                f"{best:.0f}",
                f"{best / base:.3f}",
            ]
        )


def table(header, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--buckets", type=float, nargs="+", default=[64.0, 512.0])
    parser.add_argument("--rollout-tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    from vllm.distributed import parallel_state as vllm_ps

    from covrl.parallel import initialize
    from covrl.rollout import RolloutConfig, RolloutEngine

    initialize()
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir())) / f"bench_sync_{world}"
    holder = [None]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        holder = [
            str(
                random_qwen2(
                    root, hidden=args.hidden, layers=args.layers, vocab=args.vocab, max_len=512
                )
            )
        ]
    dist.broadcast_object_list(holder, src=0)
    checkpoint = holder[0]

    sync_rows, gen_rows, engines = [], [], []
    for rollout_tp in [r for r in args.rollout_tp if world % r == 0]:
        if engines:
            # Deleting an engine would tear down torch.distributed: keep it, rebuild
            # only vLLM's model-parallel groups for the next TP size.
            vllm_ps.destroy_model_parallel()
        engine = RolloutEngine(
            checkpoint,
            RolloutConfig(
                tensor_parallel_size=rollout_tp,
                kv_cache_memory_bytes=256 << 20 if not torch.cuda.is_available() else None,
                max_model_len=512,
            ),
        )
        engines.append(engine)
        bench_sync(engine, checkpoint, args.train_tp, args.buckets, rollout_tp, sync_rows)
        bench_generation(engine, args.vocab, args, gen_rows, rollout_tp)

    if rank == 0:
        device = "cuda (NCCL)" if torch.cuda.is_available() else "cpu (gloo)"
        mb = engines[0].model_config.hf_weight_shapes()
        mb = sum(4 * torch.Size(s).numel() for s in mb.values()) / 2**20
        print(f"\nweight sync, world {world}, {device}, float32 Qwen2 of {mb:.0f} MiB")
        print(
            table(
                [
                    "train",
                    "vLLM",
                    "bucket MiB",
                    "sync s",
                    "GB/rank",
                    "GB/s",
                    "memcpy GB/s",
                    "vs memcpy",
                    "export GB/s",
                    "vs memcpy",
                    "peak extra MiB",
                    "bound MiB",
                ],
                sync_rows,
            )
        )
        print(f"\ngeneration, {args.prompts} prompts x n={args.n} x {args.new_tokens} tokens")
        print(table(["vLLM", "path", "tokens", "tokens/s", "vs vLLM"], gen_rows))


if __name__ == "__main__":
    main()
