"""Reproduce the paper's entropy effects on the built-in tiny task (``make reproduce``).

Usage::

    python tools/reproduce.py [--steps 300] [--seeds 1,2] [--jobs 2] [--out outputs/reproduce]
                              [--report docs/reproduce.md] [--no-targets] [--no-pass-at-k]
                              [--report-only] [--dry-run]

Runs GRPO, GRPO with the clip lifted to 1 / 1, Clip-Cov and KL-Cov for each seed, and
KL-Cov holding an entropy target (constant and cosine) for each seed
(``experiments/reproduce/``), each a ``covrl.training.cli`` job with one process, two at
a time, each followed by pass@k of its exported policy (and the base model's); then
writes the report (markdown and PNGs) from the runs' metrics. Runs that already finished
with the same commands are kept, so running it again only redoes what is missing. The
task assets must exist (``python tools/build_tiny_task.py`` or ``make train`` builds
them).

Errors are reported as one line on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from covrl.tasks.tiny import DEFAULT_ROOT

# The harness lives in the checkout's experiments/ folder, not in the installed package.
REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from experiments.reproduce.plan import default_plan  # noqa: E402
from experiments.reproduce.runner import (  # noqa: E402
    ReproduceError,
    read_record,
    record_path,
    run_plan,
)

CONFIG = "examples/tiny_kl_cov.yaml"
REDO_FLAGS = ("--report-only", "--force")


def shared_overrides(
    root: Path, steps: int, val_k: int, test_freq: int, export_hf: bool = True
) -> list[str]:
    """Overrides every run shares: the task assets, one process, the run length,
    validation and the entropy-change measurement every ``test_freq`` steps, and the
    Hugging Face export pass@k reads."""
    return [
        f"policy.model_path={root / 'model'}",
        f"data.train_files=[{root / 'data' / 'train.parquet'}]",
        f"data.val_files=[{root / 'data' / 'validation.parquet'}]",
        "policy.tp=1",
        f"trainer.total_steps={steps}",
        f"trainer.export_hf={'true' if export_hf else 'false'}",
        "trainer.save_freq=0",
        "trainer.progress_bar=false",
        f"trainer.entropy_change_freq={test_freq}",
        f"validation.test_freq={test_freq}",
        f"validation.k={val_k}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"task assets ({DEFAULT_ROOT})")
    p.add_argument("--out", default="outputs/reproduce", help="run directories (outputs/reproduce)")
    p.add_argument("--report", default="docs/reproduce.md", help="markdown report; PNGs go "
                   "into the folder of the same name (docs/reproduce.md)")  # fmt: skip
    p.add_argument("--steps", type=int, default=300, help="RL steps per run (300)")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds (1,2)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one core each (2)")
    p.add_argument("--val-k", type=int, default=8, help="validation samples per prompt (8)")
    p.add_argument("--test-freq", type=int, default=5, help="validate every N steps (5)")
    p.add_argument("--no-targets", action="store_true", help="skip the entropy-target runs")
    p.add_argument("--no-pass-at-k", action="store_true", help="skip pass@k (and the export)")
    p.add_argument(
        "--force",
        action="store_true",
        help="re-run finished runs too (a run is "
        "kept when its command line is unchanged: pass this after editing the YAML)",
    )
    p.add_argument("--report-only", action="store_true", help="only rewrite the report")
    p.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    args = p.parse_args(argv)

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"reproduce: --seeds must be comma-separated integers, got {args.seeds!r}",
              file=sys.stderr)  # fmt: skip
        return 1
    root = Path(args.root)
    specs = default_plan(seeds, total_steps=args.steps, targets=not args.no_targets)
    shared = shared_overrides(
        root, args.steps, args.val_k, args.test_freq, export_hf=not args.no_pass_at_k
    )
    if args.dry_run:
        print(f"{len(specs)} runs of {args.steps} steps, {args.jobs} at a time, into {args.out}:")
        for s in specs:
            print(f"  {s.name:28s} {s.label:20s} seed {s.seed}  {' '.join(s.overrides)}")
        print("shared overrides: " + " ".join(shared))
        return 0
    if not (root / "model" / "config.json").is_file():
        print(f"reproduce: no base model in {root / 'model'}; build the task first with "
              f"`python tools/build_tiny_task.py --root {root}` (or `make train`)", file=sys.stderr)  # fmt: skip
        return 1

    from experiments.reproduce.report import ReportInputs, write_report

    out = Path(args.out)
    wall = None
    if not args.report_only:
        print(f"reproduce: {len(specs)} runs of {args.steps} steps, {args.jobs} at a time; "
              f"logs in {out}/<run>.log", flush=True)  # fmt: skip
        start = time.perf_counter()
        # SIGTERM (kill, a scheduler's time limit) unwinds like Ctrl-C, so the runner's
        # clean-up stops the runs it started instead of leaving them orphaned.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            base = (root / "model", root / "data" / "validation.parquet")
            made = run_plan(specs, out=out, config=CONFIG, shared=shared, total_steps=args.steps,
                            jobs=args.jobs, force=args.force,
                            pass_at_k=None if args.no_pass_at_k else base,
                            log=lambda m: print(m, flush=True))  # fmt: skip
        except ReproduceError as exc:
            print(f"reproduce: {exc}", file=sys.stderr)
            return 1
        runs_made = len([name for name in made if name in {s.name for s in specs}])
        if runs_made:  # the wall time of the call that ran the runs, kept for later reports
            wall = time.perf_counter() - start
            (out / "wall.json").write_text(json.dumps({"seconds": wall, "runs": runs_made}) + "\n")
            wall = (wall, runs_made)
    if wall is None and (out / "wall.json").is_file():
        record = json.loads((out / "wall.json").read_text())
        wall = (record["seconds"], record["runs"])
    seconds = {}
    for s in specs:
        record = read_record(out / s.name)
        if record is None:
            print(f"reproduce: run {s.name} has not finished ({record_path(out / s.name)} is "
                  "missing or unreadable); run without --report-only", file=sys.stderr)  # fmt: skip
            return 1
        seconds[s.name] = record.get("seconds")
    build_path = root / "build.json"
    build = json.loads(build_path.read_text()) if build_path.is_file() else None
    # Under make (MAKELEVEL is set) the report names the make target a user types.
    # The command that made the runs: without the flags that only redo or rewrite.
    shown = [a for a in (sys.argv[1:] if argv is None else argv) if a not in REDO_FLAGS]
    given = " ".join(shlex.quote(a) for a in shown)
    command = (
        "make reproduce"
        if "MAKELEVEL" in os.environ
        else f"python tools/reproduce.py {given}".rstrip()
    )
    inputs = ReportInputs(specs=specs, out_dir=out, total_steps=args.steps, val_k=args.val_k,
                          command=command, seconds=seconds, wall=wall, build=build)  # fmt: skip
    try:
        write_report(inputs, args.report)
    except ValueError as exc:
        print(f"reproduce: cannot write the report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {args.report} (figures in {Path(args.report).with_suffix('')}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
