"""The report of ``make reproduce``: every number computed from the runs' metrics.

Tags read from each run's ``metrics.jsonl`` (written by the trainer):

- ``rollout/entropy``: the policy's mean entropy (nats/token) over the step's rollout
  response tokens, ``H``;
- ``val/two_sum/avg@k``: sampled (temperature 1) validation accuracy, the ``R`` of the
  entropy law; ``val/accuracy``: greedy validation accuracy;
- ``entropy_dynamics/{predicted,measured}_change``: ``-Cov(log pi, A)`` of the step's
  tokens and the entropy change the update phase actually made on them;
- ``cov/top_*``: the covariance quantiles of a mini-batch, averaged over the step's
  mini-batches (Table 1 of the paper);
- ``cov/selected_*``, ``cov/prob_mean``: where the Clip-Cov / KL-Cov tokens sit.

Definitions used throughout (stated in the report too): GRPO's *plateau* is the last
quarter of the steps; a method's entropy "at the plateau" is its mean ``H`` over those
steps; its *final accuracy* is the mean of its last three validation evaluations.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covrl.analysis import RunLog, Series, align, fit_entropy_law, read_jsonl
from covrl.analysis.plots import new_figure, save_figure
from covrl.tasks.reproduce import METHOD_LABELS, PAPER, RECIPE, RunSpec

__all__ = ["Goals", "ReportInputs", "load_runs", "write_report"]

ENTROPY = "rollout/entropy"
GREEDY = "val/accuracy"
PREDICTED = "entropy_dynamics/predicted_change"
MEASURED = "entropy_dynamics/measured_change"
COV_TAGS = ("cov/top_0.02%", "cov/top_0.2%", "cov/top_2%", "cov/top_20%", "cov/top_50%")
SELECTION_TAGS = (
    "cov/selected_fraction",
    "cov/selected_positive_adv_fraction",
    "cov/selected_prob_mean",
    "cov/prob_mean",
)
PLATEAU_FRACTION = 0.25
FINAL_EVALS = 3
# The paper's step-1 numbers on Qwen2.5-7B (Table 1 as quoted in its text).
PAPER_COV_TOP_002 = 5.65
PAPER_COV_MEAN = 0.003


@dataclass(frozen=True)
class Goals:
    """The targets the report checks, from the plain-PyTorch prototype of the task."""

    grpo_entropy_drop: float = 10.0
    kl_cov_entropy_ratio: float = 10.0
    accuracy_gap_points: float = 2.0
    fit_r2: float = 0.9
    ceiling_gap_points: float = 3.0


@dataclass(frozen=True)
class ReportInputs:
    """What the report needs besides the metrics: the plan and how it was run."""

    specs: Sequence[RunSpec]
    out_dir: Path
    total_steps: int
    val_k: int
    command: str
    seconds: dict[str, float]  # per run, from the runner (reproduce.json)
    wall: tuple[float, int] | None  # (seconds, runs) of the last call that ran runs
    build: dict | None  # build.json of the task assets


def load_runs(specs: Sequence[RunSpec], out_dir: str | os.PathLike) -> dict[str, RunLog]:
    out_dir = Path(out_dir)
    return {s.name: read_jsonl(out_dir / s.name / "metrics.jsonl", name=s.name) for s in specs}


# ---------------------------------------------------------------------------- numbers
def _values(run: RunLog, tag: str, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if not run.has(tag):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    s = run.series(tag)
    keep = (s.steps >= first) & np.isfinite(s.values)
    return s.steps[keep], s.values[keep]


def plateau_start(total_steps: int) -> int:
    """First step of the plateau window (the last quarter of the steps)."""
    return total_steps - max(1, round(total_steps * PLATEAU_FRACTION)) + 1


def _mean(values: np.ndarray) -> float:
    """The mean, nan for no values."""
    return float(values.mean()) if len(values) else math.nan


def window_mean(run: RunLog, tag: str, total_steps: int) -> float:
    """Mean of ``tag`` over the plateau window (nan if it logs nothing there)."""
    return _mean(_values(run, tag, plateau_start(total_steps))[1])


def window_entropy(run: RunLog, total_steps: int) -> float:
    return window_mean(run, ENTROPY, total_steps)


def first_entropy(run: RunLog) -> float:
    _, h = _values(run, ENTROPY)
    return float(h[0]) if len(h) else math.nan


def final_accuracy(run: RunLog, tag: str) -> float:
    return _mean(_values(run, tag)[1][-FINAL_EVALS:])


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def same_sign(x: np.ndarray, y: np.ndarray) -> float:
    """The share of pairs whose signs agree (nan for none)."""
    return _mean(np.sign(x) == np.sign(y))


def paired_points(runs: Sequence[RunLog], tag_x: str, tag_y: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` at the steps where a run logs both tags with finite values, pooled over
    ``runs`` (e.g. entropy and validation accuracy at the validation steps)."""
    xs, ys = [], []
    for run in runs:
        _, x, y = align(Series(*_values(run, tag_x)), Series(*_values(run, tag_y)))
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _ratio(x: float, y: float) -> float:
    return x / y if y and np.isfinite(x) and np.isfinite(y) else math.nan


# ---------------------------------------------------------------------------- plots
_STYLES = ("-", "--", ":", "-.")


def _plot_series(runs_by_method, tag, path, *, ylabel, title, log_y=False, markers=False):
    fig, (ax,) = new_figure((8.0, 4.5), 100)
    for i, (label, runs) in enumerate(runs_by_method.items()):
        for j, run in enumerate(runs):
            steps, values = _values(run, tag)
            ax.plot(
                steps, values, color=f"C{i}", ls=_STYLES[j % len(_STYLES)], lw=1.5,
                marker="o" if markers else None, ms=3, label=f"{label} ({run.name})",
            )  # fmt: skip
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, 100)


def _plot_law(h, r, fit, plateau, path, acc_label):
    fig, (ax,) = new_figure((7.0, 4.5), 100)
    ax.scatter(h, r, s=14, color="C0", label="GRPO validation points (every seed)")
    grid = np.linspace(0.0, float(h.max()) * 1.05, 200)
    ax.plot(grid, fit.predict(grid), color="C1", lw=2,
            label=f"R = {fit.b:.3f} − {fit.a:.3f}·exp(H), R² {fit.r2:.3f}")  # fmt: skip
    ax.axhline(
        fit.ceiling, color="C3", ls="--", label=f"predicted ceiling b − a = {fit.ceiling:.3f}"
    )
    ax.axhline(plateau, color="C2", ls=":", label=f"observed plateau {plateau:.3f}")
    ax.set_xlabel("policy entropy H (nats/token)")
    ax.set_ylabel(acc_label)
    ax.set_title("entropy–performance law on GRPO")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, 100)


def _plot_dynamics(points_by_method, path):
    fig, (ax,) = new_figure((6.5, 5.0), 100)
    for i, (label, (p, m)) in enumerate(points_by_method.items()):
        ax.scatter(
            p, m, s=10, color=f"C{i}", alpha=0.7, label=f"{label} (r = {_fmt(pearson(p, m), 2)})"
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("predicted change  −Cov(log π, A)  (step size 1)")
    ax.set_ylabel("measured entropy change over the update (nats/token)")
    ax.set_title("per-step entropy change: predicted vs measured")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, 100)


# ---------------------------------------------------------------------------- report
def write_report(
    inputs: ReportInputs, markdown_path: str | os.PathLike, goals: Goals = Goals()
) -> str:
    """Write the markdown report and its PNGs (``<stem>/`` next to it); returns its text."""
    md_path = Path(markdown_path)
    fig_dir = md_path.with_suffix("")
    fig_rel = fig_dir.name
    specs, T = list(inputs.specs), inputs.total_steps
    runs = load_runs(specs, inputs.out_dir)
    acc_tag = f"val/two_sum/avg@{inputs.val_k}"
    main = [s for s in specs if s.group == "main"]
    seeds = sorted({s.seed for s in main})
    by_method = {m: [runs[s.name] for s in main if s.method == m] for m in METHOD_LABELS}
    by_method = {m: rs for m, rs in by_method.items() if rs}
    if "grpo" not in by_method:
        raise ValueError("the plan has no GRPO run: the report compares against GRPO")
    grpo = by_method["grpo"]
    lines: list[str] = []
    add = lines.append

    def mean_over(rs, fn):
        vals = [fn(r) for r in rs]
        return float(np.mean(vals)), vals

    # --- per-method table
    method_stats = {}
    for m, rs in by_method.items():
        hw, hw_each = mean_over(rs, lambda r: window_entropy(r, T))
        acc, acc_each = mean_over(rs, lambda r: final_accuracy(r, acc_tag))
        method_stats[m] = {
            "h0": mean_over(rs, first_entropy)[0],
            "hw": hw,
            "hw_each": hw_each,
            "acc": acc,
            "acc_each": acc_each,
            "greedy": mean_over(rs, lambda r: final_accuracy(r, GREEDY))[0],
        }
    h_grpo, acc_grpo = method_stats["grpo"]["hw"], method_stats["grpo"]["acc"]
    rows = [
        f"| {METHOD_LABELS[m]} | {_fmt(st['h0'])} "
        f"| {_fmt(st['hw'], 4)} ({', '.join(_fmt(v, 4) for v in st['hw_each'])}) "
        f"| {_fmt(_ratio(st['h0'], st['hw']), 1)}x | {_fmt(_ratio(st['hw'], h_grpo), 1)}x "
        f"| {_fmt(st['acc'])} ({', '.join(_fmt(v) for v in st['acc_each'])}) "
        f"| {_fmt(100 * (st['acc'] - acc_grpo), 1)} | {_fmt(st['greedy'])} |"
        for m, st in method_stats.items()
    ]

    # --- entropy law on GRPO (pooled seeds)
    h_pts, r_pts = paired_points(grpo, ENTROPY, acc_tag)
    fit = fit_entropy_law(h_pts, r_pts, context="GRPO runs of make reproduce")
    plateau_acc, _ = mean_over(grpo, lambda r: window_mean(r, acc_tag, T))
    per_seed_fits = []
    for g in grpo:
        h1, r1 = paired_points([g], ENTROPY, acc_tag)
        try:
            per_seed_fits.append((g.name, fit_entropy_law(h1, r1, context=g.name)))
        except ValueError:
            per_seed_fits.append((g.name, None))

    # --- entropy dynamics
    dyn = {METHOD_LABELS[m]: paired_points(rs, PREDICTED, MEASURED) for m, rs in by_method.items()}
    p_all = np.concatenate([p for p, _ in dyn.values()])
    m_all = np.concatenate([m for _, m in dyn.values()])
    r_all = pearson(p_all, m_all)
    sign_all = same_sign(p_all, m_all)

    # --- plots
    fig_dir.mkdir(parents=True, exist_ok=True)
    labelled = {METHOD_LABELS[m]: rs for m, rs in by_method.items()}
    _plot_series(labelled, ENTROPY, fig_dir / "entropy.png", ylabel="rollout entropy (nats/token)",
                 title="policy entropy per step (log scale)", log_y=True)  # fmt: skip
    _plot_series(labelled, acc_tag, fig_dir / "accuracy.png",
                 ylabel=f"validation accuracy (avg@{inputs.val_k}, T=1)",
                 title="sampled validation accuracy", markers=True)  # fmt: skip
    _plot_law(h_pts, r_pts, fit, plateau_acc, fig_dir / "entropy_law.png",
              f"validation accuracy (avg@{inputs.val_k})")  # fmt: skip
    _plot_dynamics(dyn, fig_dir / "entropy_change.png")
    extra = [s for s in specs if s.group in ("sweep", "paper")]
    if extra:
        # The sweep and the paper's settings run with the first seed only.
        grpo_first = next(runs[s.name] for s in main if s.method == "grpo" and s.seed == seeds[0])
        sweep_runs = {"GRPO": [grpo_first]}
        for s in [x for x in main if x.method == "kl_cov" and x.seed == seeds[0]] + extra:
            sweep_runs[_setting(s)] = [runs[s.name]]
        _plot_series(sweep_runs, ENTROPY, fig_dir / "sweep.png", ylabel="rollout entropy (nats/token)",
                     title=f"KL-Cov (k, β) sweep and the paper's settings, seed {seeds[0]}",
                     log_y=True)  # fmt: skip

    # --- text
    add("# Reproducing the paper's entropy effects on the tiny task")
    add("")
    add("This page is written by `make reproduce` (`tools/reproduce.py`); every number and "
        "figure on it is computed from the metrics of the runs listed at the end. "
        "Re-running the command rewrites it.")  # fmt: skip
    add("")
    add("## Set-up")
    add("")
    add("- Task, tokenizer and base model: the built-in two-sum task (`docs/tiny_task.md`).")
    if inputs.build:
        model = inputs.build.get("stages", {}).get("model", {}).get("result", {})
        if model:
            add(f"  Base model: {model['parameters'] / 1e6:.2f}M parameters, {model['steps']} SFT "
                f"steps, greedy accuracy {model['train_accuracy']:.2f} (training sums) / "
                f"{model['val_accuracy']:.2f} (validation sums).")  # fmt: skip
    add(f"- Every run: `examples/tiny_kl_cov.yaml` with the overrides below, {T} steps of 64 "
        "prompts x 8 samples, one process (Megatron TP=1 and a colocated vLLM engine), "
        f"validation (greedy and avg@{inputs.val_k} at temperature 1 on the 50 held-out "
        "sums) every few steps.")  # fmt: skip
    add(f"- Methods: GRPO (PPO clip 0.2), GRPO + clip-higher (0.2 / 0.28), Clip-Cov "
        f"(r = {RECIPE['clip_cov_ratio']:g}, band (1, 5)) and KL-Cov (k = "
        f"{RECIPE['kl_cov_ratio']:g}, β = {RECIPE['kl_cov_beta']:g}); seeds "
        f"{', '.join(map(str, seeds))}. Every method keeps the PPO clip 0.2, so they differ "
        "only in their entropy control: the paper's Clip-Cov lifts the clip to 1 / 1 and its "
        "KL-Cov is unclipped, which drift at this task's learning rate "
        "([the tiny task](tiny_task.md))." + (
            f" The paper's own KL-Cov k = {PAPER['kl_cov_ratio']:g}, β = "
            f"{PAPER['kl_cov_beta']:g} is run too." if any(s.group == "paper" for s in specs)
            else ""))  # fmt: skip
    add(f"- Command: `{inputs.command}`" + (
        f"; its last call ran {inputs.wall[1]} of the runs in {inputs.wall[0] / 60:.1f} min "
        "of wall time, two at a time." if inputs.wall else "."))  # fmt: skip
    add(f"- Definitions: GRPO's *plateau* is the last quarter of the steps (steps "
        f"{plateau_start(T)}..{T}); entropy *at the plateau* is a run's mean rollout entropy "
        f"over those steps; *final accuracy* is the mean of the last {FINAL_EVALS} "
        f"validation evaluations (avg@{inputs.val_k}). Where a cell lists values in "
        "brackets they are per seed; the number before them is their mean.")  # fmt: skip
    add("")
    add("## Entropy and accuracy per method")
    add("")
    add(f"| method | entropy at step 1 | entropy at the plateau | drop (step 1 / plateau) "
        f"| vs GRPO at the plateau | final accuracy avg@{inputs.val_k} | vs GRPO (points) "
        "| final greedy accuracy |")  # fmt: skip
    add("|---|---|---|---|---|---|---|---|")
    lines.extend(rows)
    add("")
    add(f"![entropy]({fig_rel}/entropy.png)")
    add("")
    add(f"![accuracy]({fig_rel}/accuracy.png)")
    add("")

    add("## The entropy–performance law on GRPO")
    add("")
    add(f"Least squares of `R = -a·exp(H) + b` (`covrl.analysis.fit_entropy_law`, the same "
        f"fit as `tools/entropy_law.py fit`) over the GRPO validation steps, H the rollout "
        f"entropy at that step and R the validation avg@{inputs.val_k}:")  # fmt: skip
    add("")
    add(
        "| points | a | b | R² | predicted ceiling b − a | observed plateau | ceiling − plateau (points) |"
    )
    add("|---|---|---|---|---|---|---|")
    add(f"| every seed ({len(h_pts)}) | {fit.a:.3f} ± {fit.a_se:.3f} | {fit.b:.3f} ± {fit.b_se:.3f} "
        f"| {fit.r2:.3f} | {fit.ceiling:.3f} ± {fit.ceiling_se:.3f} | {plateau_acc:.3f} "
        f"| {100 * (fit.ceiling - plateau_acc):+.1f} |")  # fmt: skip
    for name, f in per_seed_fits:
        if f is None:
            add(f"| {name} | n/a | n/a | n/a | n/a | | |")
        else:
            add(
                f"| {name} ({f.num_points}) | {f.a:.3f} | {f.b:.3f} | {f.r2:.3f} | {f.ceiling:.3f} | | |"
            )
    add("")
    add(f"![entropy law]({fig_rel}/entropy_law.png)")
    add("")

    add("## Predicted vs measured entropy change")
    add("")
    add("Each point is one step: the first-order prediction `-Cov(log π, A)` over the step's "
        "tokens (before the update) against the change of the policy's mean entropy on the "
        "same tokens over the step's optimizer updates. The prediction assumes plain policy-"
        "gradient steps of size 1, so only signs and correlation are comparable.")  # fmt: skip
    add("")
    add("| runs | points | Pearson r | same sign |")
    add("|---|---|---|---|")
    for label, (p, m) in dyn.items():
        add(f"| {label} | {len(p)} | {_fmt(pearson(p, m), 2)} | {_fmt(same_sign(p, m), 2)} |")
    add(f"| all | {len(p_all)} | {_fmt(r_all, 2)} | {_fmt(sign_all, 2)} |")
    add("")
    add(f"![entropy change]({fig_rel}/entropy_change.png)")
    add("")

    add("## Token covariance at step 1 (Table 1)")
    add("")
    add("Mean covariance `(log π − mean)·(A − mean)` of the top fraction of the tokens of "
        "a mini-batch (means over the mini-batch's tokens), and of all its tokens; "
        "averaged over the mini-batches of step 1:")  # fmt: skip
    add("")
    add("| run | " + " | ".join(t.removeprefix("cov/") for t in COV_TAGS) + " | all tokens |")
    add("|---|" + "---|" * (len(COV_TAGS) + 1))
    for s in main:
        r = runs[s.name]
        vals = []
        for t in (*COV_TAGS, "cov/mean"):
            steps, v = _values(r, t)
            vals.append(_fmt(v[0]) if len(v) and steps[0] == 1 else "n/a")
        add(f"| {s.name} | " + " | ".join(vals) + " |")
    add(f"| paper, Qwen2.5-7B | {PAPER_COV_TOP_002} | | | | | {PAPER_COV_MEAN} |")
    add("")

    add("## Which tokens Clip-Cov and KL-Cov act on")
    add("")
    add("Means over each run's steps: the share of a mini-batch's tokens selected, the "
        "share of the selected tokens whose advantage is above the mini-batch mean (a "
        "rewarded token the update would make more likely), and the selected tokens' mean "
        "probability next to that of all tokens.")  # fmt: skip
    add("")
    add("| run | selected | above-mean advantage | mean p of selected | mean p of all tokens |")
    add("|---|---|---|---|---|")
    for s in [x for x in specs if x.method in ("clip_cov", "kl_cov")]:
        r = runs[s.name]
        cells = []
        for tag in SELECTION_TAGS:
            cells.append(_fmt(_mean(_values(r, tag)[1])))
        add(f"| {s.name} | " + " | ".join(cells) + " |")
    add("")

    if extra:
        add("## KL-Cov (k, β) sweep and the paper's settings")
        add("")
        add(f"Seed {seeds[0]}, compared with GRPO of the same seed.")
        add("")
        add(
            "| run | setting | entropy at the plateau | vs GRPO | final accuracy | vs GRPO (points) |"
        )
        add("|---|---|---|---|---|---|")
        hg1, ag1 = window_entropy(grpo_first, T), final_accuracy(grpo_first, acc_tag)
        for s in [
            x for x in main if x.method in ("kl_cov", "clip_cov") and x.seed == seeds[0]
        ] + extra:
            r = runs[s.name]
            hw, acc = window_entropy(r, T), final_accuracy(r, acc_tag)
            add(f"| {s.name} | {_setting(s)} | {_fmt(hw, 4)} | {_fmt(_ratio(hw, hg1), 1)}x "
                f"| {_fmt(acc)} | {_fmt(100 * (acc - ag1), 1)} |")  # fmt: skip
        add("")
        add(f"![sweep]({fig_rel}/sweep.png)")
        add("")

    # --- goals
    add("## Goals")
    add("")
    add("| goal | measured | met |")
    add("|---|---|---|")
    drop = _ratio(method_stats["grpo"]["h0"], method_stats["grpo"]["hw"])
    checks = [(f"GRPO entropy falls at least {goals.grpo_entropy_drop:g}x", f"{_fmt(drop, 1)}x",
               drop >= goals.grpo_entropy_drop)]  # fmt: skip
    if "kl_cov" in method_stats:
        kl = method_stats["kl_cov"]
        ratio = _ratio(kl["hw"], h_grpo)
        gap = 100 * (kl["acc"] - acc_grpo)
        checks.append(
            (
                f"KL-Cov keeps at least {goals.kl_cov_entropy_ratio:g}x GRPO's entropy at "
                "GRPO's plateau",
                f"{_fmt(ratio, 1)}x",
                ratio >= goals.kl_cov_entropy_ratio,
            )
        )
        checks.append((f"KL-Cov's final accuracy within {goals.accuracy_gap_points:g} points of "
                       "GRPO's", f"{gap:+.1f} points", gap >= -goals.accuracy_gap_points))  # fmt: skip
    checks.append((f"GRPO fit R² >= {goals.fit_r2:g}", f"{fit.r2:.3f}", fit.r2 >= goals.fit_r2))
    cgap = 100 * (fit.ceiling - plateau_acc)
    checks.append((f"predicted ceiling within {goals.ceiling_gap_points:g} points of the plateau",
                   f"{cgap:+.1f} points", abs(cgap) <= goals.ceiling_gap_points))  # fmt: skip
    checks.append(("two seeds per method", f"{len(seeds)}", len(seeds) >= 2))
    for goal, measured, ok in checks:
        add(f"| {goal} | {measured} | {'yes' if ok else '**no**'} |")
    add("")
    missed = [f"{goal} (measured: {measured})" for goal, measured, ok in checks if not ok]
    if missed:
        add(f"**Not reproduced in these {T}-step runs:** " + "; ".join(missed) + ".")
    else:
        add(f"Every goal is met in these {T}-step runs.")
    add("")

    add("## Runs")
    add("")
    add("| run | method | seed | overrides of `examples/tiny_kl_cov.yaml` | minutes |")
    add("|---|---|---|---|---|")
    for s in specs:
        secs = inputs.seconds.get(s.name)
        shown = " ".join(o for o in s.overrides if not o.startswith(("trainer.seed", "data.seed")))
        add(
            f"| {s.name} | {s.label} | {s.seed} | `{shown}` | {_fmt(secs / 60 if secs else math.nan, 1)} |"
        )
    add("")
    text = "\n".join(lines)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return text


def _setting(spec: RunSpec) -> str:
    p = spec.params  # the method's own settings, the recipe's where the plan keeps them
    if spec.method == "kl_cov":
        return f"KL-Cov k={p['kl_cov_ratio']:g}, β={p['kl_cov_beta']:g}"
    if spec.method == "clip_cov":
        return f"Clip-Cov r={p['clip_cov_ratio']:g}"
    return spec.label
