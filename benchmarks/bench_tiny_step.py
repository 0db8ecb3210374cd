"""Seconds per RL step of the tiny recipe: the first version's task and recipe against today's.

Both go through the whole trainer (``covrl.training.cli``: vLLM rollout, rewards, the
megatron-core engine's log-prob and update passes, weight sync, validation), each for
``--steps`` steps, one after the other in this process's session on the same machine:

* ``old``: the first version of the task and recipe: a 1.21M-parameter base model
  (hidden 256, 4 heads of 64), the ChatML template around "Write two 2-digit numbers
  that sum to S." (22 prompt tokens), 8 optimizer steps per rollout batch (mini-batches
  of 8 prompts), KL-Cov with the PPO clip, the entropy-change pass and validation (4
  samples per prompt) every 10 steps;
* ``new``: ``examples/tiny_kl_cov.yaml`` as it is, on the default task build;
* ``new+packing`` (``--packing``): the same with sequences packed end to end
  (``policy.engine.max_tokens_per_micro_batch``; a block-diagonal causal mask on CPU).

Each layout of ``--layouts`` (``tp1``: one process, as ``make reproduce`` runs;
``tp2``: two processes at TP=2, as ``make train`` runs) runs every variant. The table
gives the mean seconds per step over steps 2..N by phase (validation and the
entropy-change pass averaged over all steps, as they cost), and old / new.

The task builds go into ``--old-root`` and ``--new-root`` (reused when built with the
same settings; the old base model takes about four minutes to warm-start). The runs
write to ``--out``. The machine should be otherwise idle: other jobs change both
sides' times, though not necessarily in the same proportion.

Usage::

    python benchmarks/bench_tiny_step.py [--steps 20] [--layouts tp1,tp2] [--packing]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "examples/tiny_kl_cov.yaml"
PHASES = ("rollout", "reward", "sync", "old_logprob", "update", "entropy_change", "validate")
EC = "policy.loss.entropy_control"
# The first version's recipe, as overrides of today's YAML.
OLD_RECIPE = (
    "policy.optim.lr=2e-4",
    "algorithm.ppo_mini_batch_size=8",
    "policy.engine.micro_batch_size=64",
    "policy.loss.clip_ratio_low=0.2",
    "policy.loss.clip_ratio_high=0.2",
    "policy.loss.clip_ratio_c=3.0",
    f"{EC}.method=kl_cov",
    f"{EC}.kl_cov.ratio=0.2",
    f"{EC}.kl_cov.beta=1.0",
    f"{EC}.kl_cov.ppo_clip=true",
    f"{EC}.cov_top_fractions=[0.0002,0.002,0.02,0.2,0.5]",
    f"{EC}.target=null",
    "validation.test_freq=10",
    "validation.k=4",
    "trainer.entropy_change_freq=10",
    "data.max_prompt_length=32",
    "rollout.max_model_len=64",
)


def old_task():
    """The first version's task build: long instruction, ChatML, the 1.21M model."""
    from covrl.tasks import two_sum
    from covrl.tasks.tiny import TinyTaskConfig, TokenizerConfig
    from covrl.tasks.warm_start import BaseModelConfig, WarmStartConfig

    return TinyTaskConfig(
        task=two_sum.TwoSumConfig(prompt_template=two_sum.LONG_PROMPT_TEMPLATE),
        tokenizer=TokenizerConfig(chat_template="chatml"),
        model=BaseModelConfig(
            hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512
        ),
        warm_start=WarmStartConfig(
            max_steps=1500, lr=1e-3, min_lr=1e-4, warmup_steps=50, stop_accuracy=0.45
        ),
    )


def _build(root: Path, settings) -> dict:
    from covrl.tasks.tiny import STAGES, build_tiny_task

    return build_tiny_task(root, settings, stages=STAGES, log=lambda m: print(m, flush=True))


def _run(name: str, root: Path, layout: str, steps: int, overrides, out: Path) -> dict:
    """One training run; returns its mean seconds per step by phase and its wall time."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    nproc = {"tp1": 1, "tp2": 2}[layout]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), "-m", "covrl.training.cli", "--config", CONFIG, "--resume", "none",
        f"policy.model_path={root / 'model'}",
        f"data.train_files=[{root / 'data' / 'train.parquet'}]",
        f"data.val_files=[{root / 'data' / 'validation.parquet'}]",
        f"policy.tp={nproc}", f"trainer.total_steps={steps}", "trainer.export_hf=false",
        "trainer.progress_bar=false", f"trainer.run_dir={run_dir}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"bench_tiny_step: run {name} failed (exit {rc}); see {out}/{name}.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 2 and "time/step" in r]
    mean = {p: sum(r.get(f"time/{p}", 0.0) for r in rows) / len(rows) for p in PHASES}
    mean["step"] = sum(r["time/step"] for r in rows) / len(rows)
    mean["tokens"] = sum(r["rollout/response_tokens"] for r in rows) / len(rows)
    return {"phases": mean, "wall": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="RL steps per run (20)")
    p.add_argument("--layouts", default="tp1,tp2", help="tp1 and/or tp2 (both)")
    p.add_argument("--packing", action="store_true", help="also run today's recipe packed")
    p.add_argument("--pack-tokens", type=int, default=512, help="token budget when packed")
    p.add_argument("--old-root", default="cache/tiny_task_v1", help="old task build")
    p.add_argument("--new-root", default="cache/tiny_task", help="today's task build")
    p.add_argument("--out", default="outputs/bench_tiny_step", help="run directories")
    args = p.parse_args(argv)
    os.chdir(REPO)
    from covrl.tasks.tiny import TinyTaskConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    roots = {"old": Path(args.old_root), "new": Path(args.new_root)}
    builds = {
        "old": _build(roots["old"], old_task()),
        "new": _build(roots["new"], TinyTaskConfig()),
    }
    variants = {"old": ("old", OLD_RECIPE), "new": ("new", ())}
    if args.packing:
        variants["new+packing"] = (
            "new",
            (f"policy.engine.max_tokens_per_micro_batch={args.pack_tokens}",),
        )
    results = {}
    for layout in args.layouts.split(","):
        for name, (task, overrides) in variants.items():
            print(f"running {name} at {layout} ({args.steps} steps) ...", flush=True)
            results[(layout, name)] = _run(
                f"{name}_{layout}", roots[task], layout, args.steps, overrides, out
            )
    for task, manifest in builds.items():
        model = manifest["stages"]["model"]["result"]
        print(f"{task} base model: {model['parameters'] / 1e6:.2f}M parameters, greedy "
              f"validation accuracy {model['val_accuracy']:.2f}")  # fmt: skip
    header = ["layout", "variant", "s/step", *PHASES, "response tokens", "old / this"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (layout, name), r in results.items():
        ph = r["phases"]
        base = results[(layout, "old")]["phases"]["step"]
        cells = [layout, name, f"{ph['step']:.3f}", *(f"{ph[x]:.3f}" for x in PHASES),
                 f"{ph['tokens']:.0f}", f"{base / ph['step']:.2f}x"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    (out / "results.json").write_text(
        json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}, indent=1) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
