"""The report of ``make reproduce``: markdown and PNGs, every number computed from the
runs' metrics (:mod:`experiments.reproduce.numbers` says which tags and definitions).

:func:`write_report` measures the runs once (:func:`measure`), draws the figures and
writes the page section by section; each ``_*_section`` returns its markdown lines.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covrl.analysis import EntropyLawFit, RunLog, fit_entropy_law
from experiments.reproduce import figures, paper
from experiments.reproduce.numbers import (
    COV_TAGS,
    ENTROPY,
    FINAL_EVALS,
    GREEDY,
    MEASURED,
    PREDICTED,
    SELECTION_TAGS,
    accuracy_tag,
    final_accuracy,
    first_entropy,
    fmt,
    load_runs,
    nan_mean,
    paired_points,
    pearson,
    plateau_start,
    ratio,
    same_sign,
    values,
    window_entropy,
    window_mean,
)
from experiments.reproduce.plan import METHOD_LABELS, RECIPE, RunSpec

__all__ = ["Goals", "Measured", "ReportInputs", "measure", "write_report"]


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
    related: Sequence[tuple[str, str]] = ()  # (description, link) of other reports


@dataclass(frozen=True)
class MethodStats:
    """One method over its seeds: means, and per seed where a cell lists them."""

    h0: float  # entropy at step 1
    hw: float  # entropy at the plateau
    hw_each: list[float]
    acc: float  # final sampled accuracy
    acc_each: list[float]
    greedy: float  # final greedy accuracy


@dataclass(frozen=True)
class Measured:
    """What the runs measure, computed once for the figures and the text."""

    runs: dict[str, RunLog]
    main: list[RunSpec]  # the four methods, every seed
    extra: list[RunSpec]  # the sweep and the paper's settings (first seed)
    seeds: list[int]
    by_method: dict[str, list[RunLog]]  # main runs per method, methods that ran
    stats: dict[str, MethodStats]
    law_points: tuple[np.ndarray, np.ndarray]  # GRPO's (H, R), every seed
    law: EntropyLawFit
    plateau_acc: float  # GRPO's mean accuracy over the plateau window
    per_seed_laws: list[tuple[str, EntropyLawFit | None]]  # None: too few points
    dynamics: dict[str, tuple[np.ndarray, np.ndarray]]  # label -> (predicted, measured)

    @property
    def grpo_first_seed(self) -> RunLog:
        """GRPO of the first seed: the sweep's and the paper settings' reference."""
        return next(
            self.runs[s.name] for s in self.main if s.method == "grpo" and s.seed == self.seeds[0]
        )


# ---------------------------------------------------------------------------- measuring
def _method_stats(runs: Sequence[RunLog], total_steps: int, acc_tag: str) -> MethodStats:
    hw_each = [window_entropy(r, total_steps) for r in runs]
    acc_each = [final_accuracy(r, acc_tag) for r in runs]
    return MethodStats(
        h0=float(np.mean([first_entropy(r) for r in runs])),
        hw=float(np.mean(hw_each)),
        hw_each=hw_each,
        acc=float(np.mean(acc_each)),
        acc_each=acc_each,
        greedy=float(np.mean([final_accuracy(r, GREEDY) for r in runs])),
    )


def _per_seed_laws(grpo: Sequence[RunLog], acc_tag: str) -> list:
    fits = []
    for g in grpo:
        h, r = paired_points([g], ENTROPY, acc_tag)
        try:
            fits.append((g.name, fit_entropy_law(h, r, context=g.name)))
        except ValueError:
            fits.append((g.name, None))
    return fits


def measure(inputs: ReportInputs) -> Measured:
    """Read the runs and compute every number of the report. Raises ``ValueError`` when
    the plan has no GRPO run or GRPO's points cannot be fitted."""
    specs, total = list(inputs.specs), inputs.total_steps
    runs = load_runs(specs, inputs.out_dir)
    acc_tag = accuracy_tag(inputs.val_k)
    main = [s for s in specs if s.group == "main"]
    by_method = {m: [runs[s.name] for s in main if s.method == m] for m in METHOD_LABELS}
    by_method = {m: rs for m, rs in by_method.items() if rs}
    if "grpo" not in by_method:
        raise ValueError("the plan has no GRPO run: the report compares against GRPO")
    grpo = by_method["grpo"]
    stats = {m: _method_stats(rs, total, acc_tag) for m, rs in by_method.items()}
    h, r = paired_points(grpo, ENTROPY, acc_tag)
    law = fit_entropy_law(h, r, context="GRPO runs of make reproduce")
    return Measured(
        runs=runs,
        main=main,
        extra=[s for s in specs if s.group in ("sweep", "paper")],
        seeds=sorted({s.seed for s in main}),
        by_method=by_method,
        stats=stats,
        law_points=(h, r),
        law=law,
        plateau_acc=float(np.mean([window_mean(g, acc_tag, total) for g in grpo])),
        per_seed_laws=_per_seed_laws(grpo, acc_tag),
        dynamics={
            METHOD_LABELS[m]: paired_points(rs, PREDICTED, MEASURED) for m, rs in by_method.items()
        },
    )


def _setting(spec: RunSpec) -> str:
    p = spec.params  # the method's own settings, the recipe's where the plan keeps them
    if spec.method == "kl_cov":
        return f"KL-Cov k={p['kl_cov_ratio']:g}, β={p['kl_cov_beta']:g}"
    if spec.method == "clip_cov":
        return f"Clip-Cov r={p['clip_cov_ratio']:g}"
    return spec.label


# ---------------------------------------------------------------------------- figures
def _draw_figures(m: Measured, inputs: ReportInputs, fig_dir: Path) -> None:
    fig_dir.mkdir(parents=True, exist_ok=True)
    val_k = inputs.val_k
    labelled = {METHOD_LABELS[k]: rs for k, rs in m.by_method.items()}
    figures.plot_series(labelled, ENTROPY, fig_dir / "entropy.png",
                        ylabel="rollout entropy (nats/token)",
                        title="policy entropy per step (log scale)", log_y=True)  # fmt: skip
    figures.plot_series(labelled, accuracy_tag(val_k), fig_dir / "accuracy.png",
                        ylabel=f"validation accuracy (avg@{val_k}, T=1)",
                        title="sampled validation accuracy", markers=True)  # fmt: skip
    figures.plot_law(*m.law_points, m.law, m.plateau_acc, fig_dir / "entropy_law.png",
                     f"validation accuracy (avg@{val_k})")  # fmt: skip
    figures.plot_dynamics(m.dynamics, fig_dir / "entropy_change.png")
    if m.extra:
        # The sweep and the paper's settings run with the first seed only.
        first = m.seeds[0]
        sweep_runs = {"GRPO": [m.grpo_first_seed]}
        for s in [x for x in m.main if x.method == "kl_cov" and x.seed == first] + m.extra:
            sweep_runs[_setting(s)] = [m.runs[s.name]]
        figures.plot_series(sweep_runs, ENTROPY, fig_dir / "sweep.png",
                            ylabel="rollout entropy (nats/token)",
                            title=f"KL-Cov (k, β) sweep and the paper's settings, seed {first}",
                            log_y=True)  # fmt: skip


# ---------------------------------------------------------------------------- sections
def _setup_section(m: Measured, inputs: ReportInputs) -> list[str]:
    total, val_k = inputs.total_steps, inputs.val_k
    lines = [
        "# Reproducing the paper's entropy effects on the tiny task",
        "",
        "This page is written by `make reproduce` (`tools/reproduce.py`); every number and "
        "figure on it is computed from the metrics of the runs listed at the end. "
        "Re-running the command rewrites it.",
        "",
    ]
    if inputs.related:
        links = "; ".join(f"[{what}]({link})" for what, link in inputs.related)
        lines += [f"Other reports of these experiments: {links}.", ""]
    lines += [
        "## Set-up",
        "",
        "- Task, tokenizer and base model: the built-in two-sum task (`docs/tiny_task.md`).",
    ]
    if inputs.build:
        model = inputs.build.get("stages", {}).get("model", {}).get("result", {})
        if model:
            lines.append(
                f"  Base model: {model['parameters'] / 1e6:.2f}M parameters, {model['steps']} "
                f"SFT steps, greedy accuracy {model['train_accuracy']:.2f} (training sums) / "
                f"{model['val_accuracy']:.2f} (validation sums)."
            )
    paper_run = any(s.group == "paper" for s in inputs.specs)
    lines += [
        f"- Every run: `examples/tiny_kl_cov.yaml` with the overrides below, {total} steps of "
        "64 prompts x 8 samples, one process (Megatron TP=1 and a colocated vLLM engine), "
        f"validation (greedy and avg@{val_k} at temperature 1 on the 50 held-out sums) "
        "every few steps.",
        f"- Methods: GRPO (PPO clip 0.2), GRPO + clip-higher (0.2 / 0.28), Clip-Cov "
        f"(r = {RECIPE['clip_cov_ratio']:g}, band (1, 5)) and KL-Cov (k = "
        f"{RECIPE['kl_cov_ratio']:g}, β = {RECIPE['kl_cov_beta']:g}); seeds "
        f"{', '.join(map(str, m.seeds))}. Every method keeps the PPO clip 0.2, so they "
        "differ only in their entropy control: the paper's Clip-Cov lifts the clip to 1 / 1 "
        "and its KL-Cov is unclipped, which drift at this task's learning rate "
        "([the tiny task](tiny_task.md))."
        + (
            f" The paper's own KL-Cov k = {paper.SETTINGS['kl_cov_ratio']:g}, β = "
            f"{paper.SETTINGS['kl_cov_beta']:g} is run too."
            if paper_run
            else ""
        ),
        f"- Command: `{inputs.command}`"
        + (
            f"; its last call ran {inputs.wall[1]} of the runs in {inputs.wall[0] / 60:.1f} "
            "min of wall time, two at a time."
            if inputs.wall
            else "."
        ),
        f"- Definitions: GRPO's *plateau* is the last quarter of the steps (steps "
        f"{plateau_start(total)}..{total}); entropy *at the plateau* is a run's mean rollout "
        f"entropy over those steps; *final accuracy* is the mean of the last {FINAL_EVALS} "
        f"validation evaluations (avg@{val_k}). Where a cell lists values in brackets they "
        "are per seed; the number before them is their mean.",
        "",
    ]
    return lines


def _methods_section(m: Measured, val_k: int, fig_rel: str) -> list[str]:
    grpo = m.stats["grpo"]
    lines = [
        "## Entropy and accuracy per method",
        "",
        f"| method | entropy at step 1 | entropy at the plateau | drop (step 1 / plateau) "
        f"| vs GRPO at the plateau | final accuracy avg@{val_k} | vs GRPO (points) "
        "| final greedy accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, st in m.stats.items():
        lines.append(
            f"| {METHOD_LABELS[method]} | {fmt(st.h0)} "
            f"| {fmt(st.hw, 4)} ({', '.join(fmt(v, 4) for v in st.hw_each)}) "
            f"| {fmt(ratio(st.h0, st.hw), 1)}x | {fmt(ratio(st.hw, grpo.hw), 1)}x "
            f"| {fmt(st.acc)} ({', '.join(fmt(v) for v in st.acc_each)}) "
            f"| {fmt(100 * (st.acc - grpo.acc), 1)} | {fmt(st.greedy)} |"
        )
    return lines + [
        "",
        f"![entropy]({fig_rel}/entropy.png)",
        "",
        f"![accuracy]({fig_rel}/accuracy.png)",
        "",
    ]


def _law_section(m: Measured, val_k: int, fig_rel: str) -> list[str]:
    fit, plateau = m.law, m.plateau_acc
    lines = [
        "## The entropy–performance law on GRPO",
        "",
        "Least squares of `R = -a·exp(H) + b` (`covrl.analysis.fit_entropy_law`, the same "
        "fit as `tools/entropy_law.py fit`) over the GRPO validation steps, H the rollout "
        f"entropy at that step and R the validation avg@{val_k}:",
        "",
        "| points | a | b | R² | predicted ceiling b − a | observed plateau "
        "| ceiling − plateau (points) |",
        "|---|---|---|---|---|---|---|",
        f"| every seed ({len(m.law_points[0])}) | {fit.a:.3f} ± {fit.a_se:.3f} "
        f"| {fit.b:.3f} ± {fit.b_se:.3f} | {fit.r2:.3f} | {fit.ceiling:.3f} ± "
        f"{fit.ceiling_se:.3f} | {plateau:.3f} | {100 * (fit.ceiling - plateau):+.1f} |",
    ]
    for name, f in m.per_seed_laws:
        if f is None:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | | |")
        else:
            lines.append(
                f"| {name} ({f.num_points}) | {f.a:.3f} | {f.b:.3f} | {f.r2:.3f} "
                f"| {f.ceiling:.3f} | | |"
            )
    return lines + ["", f"![entropy law]({fig_rel}/entropy_law.png)", ""]


def _dynamics_section(m: Measured, fig_rel: str) -> list[str]:
    lines = [
        "## Predicted vs measured entropy change",
        "",
        "Each point is one step: the first-order prediction `-Cov(log π, A)` over the step's "
        "tokens (before the update) against the change of the policy's mean entropy on the "
        "same tokens over the step's optimizer updates. The prediction assumes plain policy-"
        "gradient steps of size 1, so only signs and correlation are comparable.",
        "",
        "| runs | points | Pearson r | same sign |",
        "|---|---|---|---|",
    ]
    for label, (p, q) in m.dynamics.items():
        lines.append(
            f"| {label} | {len(p)} | {fmt(pearson(p, q), 2)} | {fmt(same_sign(p, q), 2)} |"
        )
    p_all = np.concatenate([p for p, _ in m.dynamics.values()])
    q_all = np.concatenate([q for _, q in m.dynamics.values()])
    lines.append(
        f"| all | {len(p_all)} | {fmt(pearson(p_all, q_all), 2)} "
        f"| {fmt(same_sign(p_all, q_all), 2)} |"
    )
    return lines + ["", f"![entropy change]({fig_rel}/entropy_change.png)", ""]


def _covariance_section(m: Measured) -> list[str]:
    lines = [
        "## Token covariance at step 1 (Table 1)",
        "",
        "Mean covariance `(log π − mean)·(A − mean)` of the top fraction of the tokens of "
        "a mini-batch (means over the mini-batch's tokens), and of all its tokens; "
        "averaged over the mini-batches of step 1:",
        "",
        "| run | " + " | ".join(t.removeprefix("cov/") for t in COV_TAGS) + " | all tokens |",
        "|---|" + "---|" * (len(COV_TAGS) + 1),
    ]
    for s in m.main:
        cells = []
        for tag in (*COV_TAGS, "cov/mean"):
            steps, v = values(m.runs[s.name], tag)
            cells.append(fmt(v[0]) if len(v) and steps[0] == 1 else "n/a")
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    lines.append(f"| paper, Qwen2.5-7B | {paper.COV_TOP_002} | | | | | {paper.COV_MEAN} |")
    return lines + [""]


def _selection_section(m: Measured, specs: Sequence[RunSpec]) -> list[str]:
    lines = [
        "## Which tokens Clip-Cov and KL-Cov act on",
        "",
        "Means over each run's steps: the share of a mini-batch's tokens selected, the "
        "share of the selected tokens whose advantage is above the mini-batch mean (a "
        "rewarded token the update would make more likely), and the selected tokens' mean "
        "probability next to that of all tokens.",
        "",
        "| run | selected | above-mean advantage | mean p of selected | mean p of all tokens |",
        "|---|---|---|---|---|",
    ]
    for s in [x for x in specs if x.method in ("clip_cov", "kl_cov")]:
        cells = [fmt(nan_mean(values(m.runs[s.name], tag)[1])) for tag in SELECTION_TAGS]
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _sweep_section(m: Measured, inputs: ReportInputs, fig_rel: str) -> list[str]:
    """The KL-Cov sweep and the paper's settings against GRPO (none without them)."""
    if not m.extra:
        return []
    total, first = inputs.total_steps, m.seeds[0]
    acc_tag = accuracy_tag(inputs.val_k)
    lines = [
        "## KL-Cov (k, β) sweep and the paper's settings",
        "",
        f"Seed {first}, compared with GRPO of the same seed.",
        "",
        "| run | setting | entropy at the plateau | vs GRPO | final accuracy | vs GRPO (points) |",
        "|---|---|---|---|---|---|",
    ]
    g = m.grpo_first_seed
    hg, ag = window_entropy(g, total), final_accuracy(g, acc_tag)
    same_seed = [x for x in m.main if x.method in ("kl_cov", "clip_cov") and x.seed == first]
    for s in same_seed + m.extra:
        r = m.runs[s.name]
        hw, acc = window_entropy(r, total), final_accuracy(r, acc_tag)
        lines.append(
            f"| {s.name} | {_setting(s)} | {fmt(hw, 4)} | {fmt(ratio(hw, hg), 1)}x "
            f"| {fmt(acc)} | {fmt(100 * (acc - ag), 1)} |"
        )
    return lines + ["", f"![sweep]({fig_rel}/sweep.png)", ""]


def _goal_checks(m: Measured, goals: Goals) -> list[tuple[str, str, bool]]:
    """``(goal, measured, met)`` for each goal that applies to the plan."""
    grpo, fit = m.stats["grpo"], m.law
    drop = ratio(grpo.h0, grpo.hw)
    checks = [(f"GRPO entropy falls at least {goals.grpo_entropy_drop:g}x", f"{fmt(drop, 1)}x",
               drop >= goals.grpo_entropy_drop)]  # fmt: skip
    if "kl_cov" in m.stats:
        kl = m.stats["kl_cov"]
        kept = ratio(kl.hw, grpo.hw)
        gap = 100 * (kl.acc - grpo.acc)
        checks.append((f"KL-Cov keeps at least {goals.kl_cov_entropy_ratio:g}x GRPO's entropy "
                       "at GRPO's plateau", f"{fmt(kept, 1)}x",
                       kept >= goals.kl_cov_entropy_ratio))  # fmt: skip
        checks.append((f"KL-Cov's final accuracy within {goals.accuracy_gap_points:g} points of "
                       "GRPO's", f"{gap:+.1f} points", gap >= -goals.accuracy_gap_points))  # fmt: skip
    checks.append((f"GRPO fit R² >= {goals.fit_r2:g}", f"{fit.r2:.3f}", fit.r2 >= goals.fit_r2))
    cgap = 100 * (fit.ceiling - m.plateau_acc)
    checks.append((f"predicted ceiling within {goals.ceiling_gap_points:g} points of the plateau",
                   f"{cgap:+.1f} points", abs(cgap) <= goals.ceiling_gap_points))  # fmt: skip
    checks.append(("two seeds per method", f"{len(m.seeds)}", len(m.seeds) >= 2))
    return checks


def _goals_section(m: Measured, goals: Goals, total_steps: int) -> list[str]:
    checks = _goal_checks(m, goals)
    lines = ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {goal} | {got} | {'yes' if ok else '**no**'} |" for goal, got, ok in checks]
    lines.append("")
    missed = [f"{goal} (measured: {got})" for goal, got, ok in checks if not ok]
    if missed:
        lines.append(f"**Not reproduced in these {total_steps}-step runs:** "
                     + "; ".join(missed) + ".")  # fmt: skip
    else:
        lines.append(f"Every goal is met in these {total_steps}-step runs.")
    return lines + [""]


def _runs_section(inputs: ReportInputs) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| run | method | seed | overrides of `examples/tiny_kl_cov.yaml` | minutes |",
        "|---|---|---|---|---|",
    ]
    for s in inputs.specs:
        secs = inputs.seconds.get(s.name)
        shown = " ".join(o for o in s.overrides if not o.startswith(("trainer.seed", "data.seed")))
        minutes = fmt(secs / 60 if secs else math.nan, 1)
        lines.append(f"| {s.name} | {s.label} | {s.seed} | `{shown}` | {minutes} |")
    return lines + [""]


# ---------------------------------------------------------------------------- report
def write_report(
    inputs: ReportInputs, markdown_path: str | os.PathLike, goals: Goals = Goals()
) -> str:
    """Write the markdown report and its PNGs (``<stem>/`` next to it); returns its text."""
    md_path = Path(markdown_path)
    fig_dir = md_path.with_suffix("")
    fig_rel = fig_dir.name
    m = measure(inputs)
    _draw_figures(m, inputs, fig_dir)
    lines = [
        *_setup_section(m, inputs),
        *_methods_section(m, inputs.val_k, fig_rel),
        *_law_section(m, inputs.val_k, fig_rel),
        *_dynamics_section(m, fig_rel),
        *_covariance_section(m),
        *_selection_section(m, inputs.specs),
        *_sweep_section(m, inputs, fig_rel),
        *_goals_section(m, goals, inputs.total_steps),
        *_runs_section(inputs),
    ]
    text = "\n".join(lines)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return text
