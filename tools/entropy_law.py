"""Entropy-performance law R = -a*exp(H) + b on training runs: fit, plot, compare.

Each RUN is a run directory (TensorBoard events under RUN/tensorboard/ or RUN/, else
RUN/metrics.jsonl), a metrics.jsonl file, a CSV with a 'step' column, or an event file.
The entropy H and performance R are read from the tags --entropy-tag (default
rollout/entropy) and --accuracy-tag (default val/accuracy) and paired by step.

    python tools/entropy_law.py fit runs/grpo --fit-until 36
    python tools/entropy_law.py plot runs/grpo runs/clip_cov --out plots/
    python tools/entropy_law.py compare runs/grpo runs/clip_cov runs/kl_cov --out table.md

Errors are reported as one line on stderr with exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from covrl.analysis import (
    DEFAULT_ACCURACY_TAG,
    DEFAULT_ENTROPY_TAG,
    EntropyLawError,
    RunLogError,
    Tags,
    analysis_dict,
    analyze_run,
    compare_table,
    format_analysis,
    load_run,
    summarize_run,
)
from covrl.analysis.plots import add_figure_arguments
from covrl.analysis.run_logs import SOURCES


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        f = float("nan")
    if not 0.0 < f <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return f


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entropy_law.py",
        description="Fit the entropy-performance law R = -a*exp(H) + b to training runs "
        "(closed-form least squares in exp(H)), predict the ceiling b - a at H = 0, plot "
        "runs and compare methods.",
        epilog="See docs/entropy_law.md.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run directory, metrics.jsonl, CSV file or TensorBoard event file",
    )
    common.add_argument(
        "--entropy-tag",
        default=DEFAULT_ENTROPY_TAG,
        help="scalar tag of the policy entropy H in nats (default: %(default)s)",
    )
    common.add_argument(
        "--accuracy-tag",
        default=DEFAULT_ACCURACY_TAG,
        help="scalar tag of the performance R (default: %(default)s)",
    )
    common.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="log format; auto: TensorBoard events, else metrics.jsonl, "
        "a file by its suffix (default: %(default)s)",
    )
    common.add_argument(
        "--labels",
        default=None,
        help="comma-separated run names, one per RUN (default: directory names)",
    )
    prefix = argparse.ArgumentParser(add_help=False)
    prefix.add_argument(
        "--fit-until",
        type=int,
        default=None,
        metavar="N",
        help="fit on steps <= N only; score (and draw) the steps > N as held out",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser(
        "fit",
        parents=[common, prefix],
        help="fit a, b with standard errors",
        description="Fit R = -a*exp(H) + b on each run: a, b with standard "
        "errors, R^2, RMSE, the ceiling b - a and dR/dH at the last logged "
        "entropy; with --fit-until, fit on the prefix and report the "
        "prediction error on the held-out rest.",
    )
    fit.add_argument("--json", action="store_true", help="print one JSON object per run")

    plot = sub.add_parser(
        "plot",
        parents=[common, prefix],
        help="write PNG figures",
        description="Write OUT/fit_<run>.png (R vs H, fitted curve, ceiling), "
        "OUT/runs.png (entropy and accuracy vs step, all runs) and "
        "OUT/cov_<run>.png for runs logging cov/ scalars.",
    )
    plot.add_argument("--out", required=True, type=Path, help="output directory")
    add_figure_arguments(plot)
    plot.add_argument("--log-entropy", action="store_true", help="log scale for the entropy axis")

    cmp_ = sub.add_parser(
        "compare",
        parents=[common],
        help="markdown table over runs",
        description="Markdown table: final and best accuracy, entropy at "
        "the end and at its plateau, plateau-entropy ratio to the baseline "
        "run, and each run's fitted ceiling.",
    )
    cmp_.add_argument(
        "--baseline",
        default=None,
        help="run name the entropy ratios are relative to (default: the first RUN)",
    )
    cmp_.add_argument(
        "--plateau-fraction",
        type=_fraction,
        default=0.2,
        metavar="F",
        help="plateau entropy = mean over the last F of the logged entropy "
        "points (default: %(default)s)",
    )
    cmp_.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    return parser


def _load(args: argparse.Namespace) -> list:
    labels = args.labels.split(",") if args.labels else [None] * len(args.runs)
    if len(labels) != len(args.runs):
        raise RunLogError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    runs = [load_run(p, args.source, name) for p, name in zip(args.runs, labels, strict=True)]
    seen: dict[str, str] = {}
    for run in runs:
        if run.name in seen:
            raise RunLogError(
                f"two runs are named {run.name!r} ({seen[run.name]} and {run.source}); "
                "pass --labels"
            )
        seen[run.name] = run.source
    return runs


def _filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _cmd_fit(args, runs, tags) -> None:
    for i, run in enumerate(runs):
        an = analyze_run(run, tags, args.fit_until)
        if args.json:
            print(json.dumps(analysis_dict(an)))
        else:
            print(("\n" if i else "") + format_analysis(an))


def _cmd_plot(args, runs, tags) -> None:
    from covrl.analysis.plots import plot_covariance, plot_fit, plot_runs

    kw = {"size": args.size, "dpi": args.dpi}
    written = [plot_runs(runs, args.out / "runs.png", tags, log_entropy=args.log_entropy, **kw)]
    for run in runs:
        try:
            an = analyze_run(run, tags, args.fit_until)
        except EntropyLawError as exc:
            print(f"warning: no fit plot for run {run.name!r}: {exc}", file=sys.stderr)
        else:
            written.append(plot_fit(an, args.out / f"fit_{_filename(run.name)}.png", **kw))
        cov = plot_covariance(run, args.out / f"cov_{_filename(run.name)}.png", **kw)
        if cov is not None:
            written.append(cov)
    for path in written:
        print(path)


def _cmd_compare(args, runs, tags) -> None:
    summaries = [summarize_run(run, tags, args.plateau_fraction) for run in runs]
    table = compare_table(summaries, args.baseline)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tags = Tags(args.entropy_tag, args.accuracy_tag)
    try:
        runs = _load(args)
        {"fit": _cmd_fit, "plot": _cmd_plot, "compare": _cmd_compare}[args.command](
            args, runs, tags
        )
    except (RunLogError, EntropyLawError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
