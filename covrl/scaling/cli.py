"""``python -m covrl.scaling``: print a run's parallel layout and per-GPU memory estimate.

``python -m covrl.scaling --config examples/qwen2.5-32b_kl_cov.yaml --nodes 4
--gpus-per-node 8 [key=value ...]``; the Slurm dry run (``COVRL_DRY_RUN=1``) calls it.
A config or layout error is one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from covrl.scaling.memory import Layout, estimate_memory
from covrl.scaling.published import model_config

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m covrl.scaling",
        description="Print a run's parallel layout and per-GPU memory estimate.",
    )
    parser.add_argument("--config", required=True, help="run config YAML (examples/...)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)

    from covrl.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        model = model_config(cfg.policy.model_path)
        budget = cfg.policy.engine.max_tokens_per_micro_batch
        layout = Layout.of_run(cfg, args.nodes, args.gpus_per_node, args.gpu_memory_gib)
        dp = cfg.check_layout(layout.world_size)
        est = estimate_memory(model, layout)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"layout: {layout.nodes} nodes x {layout.gpus_per_node} GPUs = {layout.world_size}; "
        f"train TP={layout.tp} PP={layout.pp}"
        + (f" VPP={layout.vpp}" if layout.vpp else "")
        + f" DP={dp}; vLLM TP={layout.vllm_tp} ({layout.world_size // layout.vllm_tp} replicas)"
    )
    if budget:
        batch = f"packed micro-batches of up to {budget} tokens"
    else:
        batch = (
            f"micro-batch {layout.micro_batch_size} x {layout.seq_length} tokens (max prompt "
            f"{cfg.data.max_prompt_length} + max response {cfg.sampling.max_tokens})"
        )
    features = [
        name
        for name, on in (
            ("distributed optimizer", layout.distributed_optimizer),
            ("sequence parallel", layout.sequence_parallel),
            (f"{layout.recompute_granularity} recompute", layout.recompute_granularity),
        )
        if on
    ]
    print(
        f"{batch}; {', '.join(features) or 'no memory savers'}; "
        f"vLLM gpu_memory_utilization={layout.gpu_memory_utilization}"
    )
    print(f"per-GPU memory estimate ({layout.gpu_memory_gib:g} GiB GPUs, covrl/scaling/memory.py):")
    print(est.table())
    return 0
