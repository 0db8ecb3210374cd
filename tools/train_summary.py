"""Print the closing note of a run: build breakdown, RL time per phase, accuracy change.

Usage::

    python tools/train_summary.py RUN_DIR [--build cache/tiny_task/build.json]

Reads ``RUN_DIR/metrics.jsonl`` (written by ``covrl-train``) and, when given and
present, the tiny task's build manifest (``build.json``: data, tokenizer and SFT
seconds, base-model accuracy); ``make train`` prints it last. Errors are one line on
stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from covrl.analysis import read_jsonl

# Per-step phases written by the trainer as time/<phase>, in loop order.
PHASES = ("rollout", "reward", "old_logprob", "update", "entropy_change", "sync", "validate")


def _first_last(run, tag: str) -> tuple[float, float, int, int] | None:
    if not run.has(tag):
        return None
    s = run.series(tag)
    return float(s.values[0]), float(s.values[-1]), int(s.steps[0]), int(s.steps[-1])


def summarize(manifest_path: str | os.PathLike | None, run_dir: str | os.PathLike) -> str:
    """Text lines: build breakdown (if ``manifest_path`` exists), RL steps and phase
    times, validation accuracy and rollout entropy first -> last, output locations."""
    lines = []
    if manifest_path is not None and Path(manifest_path).is_file():
        stages = json.loads(Path(manifest_path).read_text()).get("stages", {})
        parts = [f"{name} {rec['seconds']:.1f} s" for name, rec in stages.items()]
        lines.append("build (when it ran): " + ", ".join(parts))
        model = stages.get("model", {}).get("result")
        if model:
            lines.append(
                f"base model: {model['parameters'] / 1e6:.2f}M parameters, {model['steps']} SFT "
                f"steps, greedy accuracy train {model['train_accuracy']:.3f} / validation "
                f"{model['val_accuracy']:.3f}"
            )
    run_dir = Path(run_dir)
    run = read_jsonl(run_dir / "metrics.jsonl")
    if run.has("time/step"):
        step_s = run.series("time/step")
        lines.append(
            f"RL: {len(step_s)} steps in {step_s.values.sum():.0f} s "
            f"({np.mean(step_s.values):.2f} s/step)"
        )
        phases = []
        for phase in PHASES:
            if run.has(f"time/{phase}"):
                values = run.series(f"time/{phase}").values
                phases.append(f"{phase} {np.mean(values):.2f}")
        lines.append("  mean seconds per step by phase: " + ", ".join(phases))
    for tag, label in (("val/accuracy", "validation accuracy (greedy)"),
                       ("rollout/entropy", "rollout entropy (nats/token)")):  # fmt: skip
        fl = _first_last(run, tag)
        if fl is not None:
            lines.append(f"{label}: {fl[0]:.3f} at step {fl[2]} -> {fl[1]:.3f} at step {fl[3]}")
    lines.append(f"TensorBoard logs: {run_dir / 'tensorboard'}  (tensorboard --logdir {run_dir})")
    if (run_dir / "hf").is_dir():
        lines.append(f"exported checkpoint (Hugging Face): {run_dir / 'hf'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run directory (trainer.run_dir)")
    parser.add_argument("--build", default=None, help="the task's build.json (optional)")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.build, args.run_dir))
    except (ValueError, OSError, KeyError) as exc:
        print(f"train_summary: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
