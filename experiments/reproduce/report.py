"""The report of ``make reproduce``: markdown and PNGs, every number computed from the
runs' metrics and pass@k files (:mod:`experiments.reproduce.numbers` says which tags and
definitions).

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
from covrl.analysis.entropy_law import HeldOutError, fit_prefix
from covrl.analysis.pass_at_k import PassAtKResult
from covrl.analysis.plots import plot_pass_at_k
from experiments.reproduce import figures, paper
from experiments.reproduce.numbers import (
    APPROX_KL,
    BASE_RUN,
    CLIPFRAC,
    COV_TAGS,
    ENTROPY,
    FINAL_EVALS,
    GREEDY,
    MEASURED,
    PREDICTED,
    SELECTION_TAGS,
    TARGET,
    accuracy_tag,
    final_accuracy,
    first_entropy,
    fmt,
    interpolate_share,
    last_quarter_change,
    last_quarter_fall,
    load_runs,
    nan_mean,
    net_share,
    paired_points,
    pass_at_k_path,
    pearson,
    plateau_start,
    ratio,
    same_sign,
    step_row,
    stepped_points,
    top_fraction,
    values,
    window_entropy,
    window_mean,
)
from experiments.reproduce.plan import (
    MAIN_METHODS,
    METHOD_LABELS,
    RECIPE,
    TARGET_KL_COV,
    TARGETS,
    RunSpec,
)

__all__ = ["Goals", "Measured", "ReportInputs", "measure", "write_report"]


@dataclass(frozen=True)
class Goals:
    """The targets the report checks."""

    grpo_entropy_drop: float = 10.0
    plateau_fall_share: float = 0.05  # the last quarter's share of GRPO's entropy fall
    settled_points: float = 2.0  # GRPO's accuracy change over the last quarter
    entropy_ratio: float = 10.0  # Clip-Cov / KL-Cov vs GRPO at GRPO's plateau
    accuracy_gap_points: float = 2.0
    fit_r2: float = 0.9
    ceiling_gap_points: float = 3.0
    target_relative_mae: float = 0.15
    minutes: float = 60.0


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
class TargetStats:
    """An entropy-target run: its errors over the second half of the steps."""

    mae: float  # mean |H - target| (nats)
    relative_mae: float  # mean |H - target| / target
    knob_last: float  # the knob at the last step
    acc: float  # final sampled accuracy
    held: float  # mean rollout entropy over the second half (nats)


@dataclass(frozen=True)
class Measured:
    """What the runs measure, computed once for the figures and the text."""

    runs: dict[str, RunLog]
    main: list[RunSpec]  # the four methods, every seed
    target: list[RunSpec]  # KL-Cov with an entropy target, every seed
    seeds: list[int]
    by_method: dict[str, list[RunLog]]  # runs per method (main and target), those that ran
    stats: dict[str, MethodStats]
    law_points: tuple[np.ndarray, np.ndarray, np.ndarray]  # GRPO's (H, R, step), every seed
    law: EntropyLawFit
    early: tuple[int, EntropyLawFit, HeldOutError] | None  # (last fitted step, fit, error)
    plateau_acc: float  # GRPO's mean accuracy over the plateau window
    fall_share: float  # the last quarter's share of GRPO's entropy fall
    acc_change: float  # GRPO's accuracy, last quarter minus third quarter
    per_seed_laws: list[tuple[str, EntropyLawFit | None]]  # None: too few points
    dynamics: dict[str, tuple[np.ndarray, np.ndarray]]  # label -> (predicted, measured)
    target_stats: dict[str, TargetStats]  # per target run
    pass_at_k: dict[str, PassAtKResult]  # per run name (and BASE_RUN), those evaluated
    pooled_pass_at_k: dict[str, PassAtKResult]  # per method over its seeds, those evaluated


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


def _target_stats(run: RunLog, total_steps: int, acc_tag: str) -> TargetStats:
    """Errors of the rollout entropy against the target over the second half."""
    s_h, h = values(run, ENTROPY)
    s_t, t = values(run, TARGET)
    steps, ih, it = np.intersect1d(s_h, s_t, return_indices=True)
    half = steps > total_steps // 2
    err = np.abs(h[ih][half] - t[it][half])
    _, knob = values(run, "entropy_control/knob")
    return TargetStats(
        mae=nan_mean(err),
        relative_mae=nan_mean(err / t[it][half]),
        knob_last=float(knob[-1]) if len(knob) else math.nan,
        acc=final_accuracy(run, acc_tag),
        held=nan_mean(h[ih][half]),
    )


def _read_pass_at_k(specs: Sequence[RunSpec], out_dir: Path) -> dict[str, PassAtKResult]:
    import json

    found = {}
    for name in [BASE_RUN, *(s.name for s in specs)]:
        path = pass_at_k_path(out_dir, name)
        if path.is_file():
            found[name] = PassAtKResult.from_dict(json.loads(path.read_text()), str(path))
    return found


def _pooled_pass_at_k(
    results: dict[str, PassAtKResult], runs: Sequence[RunLog]
) -> PassAtKResult | None:
    """A method's pass@k over its seeds' ``runs``: every seed's prompts, the curves
    averaged (None when none was evaluated or their sample counts differ)."""
    mine = [results[r.name] for r in runs if r.name in results]
    if not mine or len({x.n for x in mine}) != 1:
        return None
    curve = np.mean([x.pass_at_k for x in mine], axis=0)
    prompts = [p for x in mine for p in x.prompts]
    return PassAtKResult(n=mine[0].n, prompts=prompts, pass_at_k=curve.tolist())


def measure(inputs: ReportInputs) -> Measured:
    """Read the runs and compute every number of the report. Raises ``ValueError`` when
    the plan has no GRPO run or GRPO's points cannot be fitted."""
    specs, total = list(inputs.specs), inputs.total_steps
    runs = load_runs(specs, inputs.out_dir)
    acc_tag = accuracy_tag(inputs.val_k)
    main = [s for s in specs if s.group == "main"]
    target = [s for s in specs if s.group == "target"]
    by_method = {m: [runs[s.name] for s in specs if s.method == m] for m in METHOD_LABELS}
    by_method = {m: rs for m, rs in by_method.items() if rs}
    if "grpo" not in by_method:
        raise ValueError("the plan has no GRPO run: the report compares against GRPO")
    grpo = by_method["grpo"]
    stats = {m: _method_stats(rs, total, acc_tag) for m, rs in by_method.items()}
    st, h, r = stepped_points(grpo, ENTROPY, acc_tag)
    law = fit_entropy_law(h, r, context="GRPO runs of make reproduce")
    until = total // 3
    try:
        efit, held = fit_prefix(st, h, r, until, context="GRPO runs of make reproduce")
        early = (until, efit, held)
    except ValueError:
        early = None
    pass_at_k = _read_pass_at_k(specs, Path(inputs.out_dir))
    return Measured(
        runs=runs,
        main=main,
        target=target,
        seeds=sorted({s.seed for s in main}),
        by_method=by_method,
        stats=stats,
        law_points=(h, r, st),
        law=law,
        early=early,
        plateau_acc=float(np.mean([window_mean(g, acc_tag, total) for g in grpo])),
        fall_share=last_quarter_fall(grpo, total),
        acc_change=last_quarter_change(grpo, acc_tag, total),
        per_seed_laws=_per_seed_laws(grpo, acc_tag),
        dynamics={
            METHOD_LABELS[m]: paired_points(rs, PREDICTED, MEASURED)
            for m, rs in by_method.items()
            if m in MAIN_METHODS
        },
        target_stats={s.name: _target_stats(runs[s.name], total, acc_tag) for s in target},
        pass_at_k=pass_at_k,
        pooled_pass_at_k={
            m: pooled
            for m, rs in by_method.items()
            if (pooled := _pooled_pass_at_k(pass_at_k, rs)) is not None
        },
    )


# ---------------------------------------------------------------------------- figures
def _draw_figures(m: Measured, inputs: ReportInputs, fig_dir: Path) -> None:
    fig_dir.mkdir(parents=True, exist_ok=True)
    val_k = inputs.val_k
    labelled = {METHOD_LABELS[k]: rs for k, rs in m.by_method.items() if k in MAIN_METHODS}
    figures.plot_series(labelled, ENTROPY, fig_dir / "entropy.png",
                        ylabel="rollout entropy (nats/token)",
                        title="policy entropy per step (log scale)", log_y=True)  # fmt: skip
    figures.plot_series(labelled, accuracy_tag(val_k), fig_dir / "accuracy.png",
                        ylabel=f"validation accuracy (avg@{val_k}, T=1)",
                        title="sampled validation accuracy", markers=True)  # fmt: skip
    h, r, st = m.law_points
    early = None if m.early is None else (m.early[1], st <= m.early[0], m.early[0])
    figures.plot_law(h, r, m.law, m.plateau_acc, fig_dir / "entropy_law.png",
                     f"validation accuracy (avg@{val_k})", early=early)  # fmt: skip
    figures.plot_dynamics(m.dynamics, fig_dir / "entropy_change.png")
    pooled = [("base model", m.pass_at_k[BASE_RUN])] if BASE_RUN in m.pass_at_k else []
    pooled += [(METHOD_LABELS[k], result) for k, result in m.pooled_pass_at_k.items()]
    if pooled:
        plot_pass_at_k(pooled, fig_dir / "pass_at_k.png", size=(8.0, 7.0))
    targets = {METHOD_LABELS[k]: rs for k, rs in m.by_method.items() if k in TARGETS}
    if targets:
        figures.plot_targets(targets, fig_dir / "entropy_target.png")


# ---------------------------------------------------------------------------- sections
def _setup_section(m: Measured, inputs: ReportInputs) -> list[str]:
    total, val_k = inputs.total_steps, inputs.val_k
    lines = [
        "# Reproducing the paper's entropy effects on the tiny task",
        "",
        "This page is written by `make reproduce` (`tools/reproduce.py`); every number and "
        "figure on it is computed from the metrics and pass@k files of the runs listed at "
        "the end. Re-running the command rewrites it.",
        "",
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
    lines += [
        f"- Every run: `examples/tiny_kl_cov.yaml` with the overrides below, {total} steps of "
        "64 prompts x 8 samples and 4 optimizer steps per rollout batch (mini-batches of 16 "
        "prompts), one process (Megatron TP=1 and a colocated vLLM engine), validation "
        f"(greedy and avg@{val_k} at temperature 1 on the 50 held-out sums) every few steps.",
        f"- Methods, as in the paper: GRPO (PPO clip 0.2), Clip-Cov (r = "
        f"{RECIPE['clip_cov_ratio']:g}, band (1, 5), PPO clip 1 / 1) and KL-Cov (k = "
        f"{RECIPE['kl_cov_ratio']:g}, β = {RECIPE['kl_cov_beta']:g}, unclipped surrogate), "
        "and GRPO with the clip lifted to 1 / 1 as the control for Clip-Cov's clip; no dual "
        f"clip. Seeds {', '.join(map(str, m.seeds))}.",
    ]
    if m.target:
        lines.append(
            f"- Entropy target: KL-Cov (k = {TARGET_KL_COV['kl_cov_ratio']:g}) whose β is set "
            "every step by the feedback controller (`policy.loss.entropy_control.target`, "
            f"docs/entropy_control.md; β within [{TARGET_KL_COV['knob_min']:g}, "
            f"{TARGET_KL_COV['knob_max']:g}], starting from 1), with a "
            f"constant target of {TARGETS['kl_cov_target']['value']:g} nats and a cosine "
            f"schedule from {TARGETS['kl_cov_schedule']['start']:g} to "
            f"{TARGETS['kl_cov_schedule']['end']:g} over the run."
        )
    lines += [
        f"- Command: `{inputs.command}`"
        + (
            f"; its last call ran {inputs.wall[1]} runs (and their pass@k) in "
            f"{inputs.wall[0] / 60:.1f} min of wall time, two at a time."
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


def _regime_section(m: Measured) -> list[str]:
    lines = [
        "## How far each update moves: clip fraction and KL",
        "",
        "Means over every optimizer step of the runs (and the largest step mean): the share "
        "of tokens the PPO clip acts on (`train/pg_clipfrac`) and the k3 estimate of "
        "KL(rollout policy ‖ updated policy) (`train/approx_kl_k3`). At the paper's scale "
        f"clip fractions run from {100 * paper.CLIPFRAC_RANGE[0]:g} % to "
        f"{100 * paper.CLIPFRAC_RANGE[1]:g} %. Clip-Cov's clip of 1 / 1 acts only beyond "
        "ratios of 0 and 2 and KL-Cov's surrogate has no clip, so their clip fractions are "
        "near zero by construction: their KL shows how far they move.",
        "",
        "| method | PPO clip | clip fraction, mean (max) | approx. KL k3, mean (max) |",
        "|---|---|---|---|",
    ]
    clips = {"grpo": "0.2", "grpo_clip1": "1 / 1", "clip_cov": "1 / 1", "kl_cov": "none"}
    for method in (x for x in MAIN_METHODS if x in m.by_method):
        cells = []
        for tag in (CLIPFRAC, APPROX_KL):
            v = np.concatenate([values(r, tag)[1] for r in m.by_method[method]])
            scale, unit = (100, " %") if tag == CLIPFRAC else (1, "")
            cells.append(
                f"{fmt(scale * nan_mean(v), 3)}{unit} ({fmt(scale * (v.max() if len(v) else math.nan), 3)}{unit})"
            )
        lines.append(f"| {METHOD_LABELS[method]} | {clips[method]} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def _choice_section(m: Measured) -> list[str]:
    """The numbers behind k and r: GRPO's step-1 share of net covariance by fraction, and
    Clip-Cov's band against its selected count."""
    grpo = m.by_method["grpo"]
    rows = [step_row(g, 1) for g in grpo]
    fractions = sorted({top_fraction(t) for row in rows for t in row if t.startswith("cov/top_")})
    shares = [nan_mean(np.array([net_share(row, f) for row in rows])) for f in fractions]
    k = RECIPE["kl_cov_ratio"]
    lines = [
        "## Choosing KL-Cov's k and Clip-Cov's r",
        "",
        "KL-Cov's k: the share of a mini-batch's net covariance that its top fraction of "
        "tokens carries, `n·mean_top / (N·mean_all)` with n = max(1, floor(k N)), from "
        "GRPO's step-1 mini-batches (mean over seeds; before any update, as the paper's "
        "Table 1). The paper's k = 2e-3 carries about "
        f"{paper.KL_COV_NET_SHARE:g}x with its Table 1; k is chosen where the same holds here.",
        "",
        "| top fraction | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
        "| share of net covariance | " + " | ".join(f"{fmt(s, 2)}x" for s in shares) + " |",
        "",
        f"At k = {k:g}: {fmt(interpolate_share(fractions, shares, k), 2)}x (interpolated "
        "between the measured fractions).",
        "",
    ]
    clip = m.by_method.get("clip_cov", [])
    if clip:
        lines += [
            "Clip-Cov's r: the band (1 < cov < 5, not PPO-clipped) holds the candidates the "
            "draw samples from; per mini-batch (means over a step's mini-batches):",
            "",
            "| run | tokens | band at step 1 | selected at step 1 | band, mean over the run "
            "| band, smallest step mean | steps where every candidate was taken |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in clip:
            _, cand = values(run, "cov/candidates")
            _, sel = values(run, "cov/selected_tokens")
            _, n = values(run, "cov/num_tokens")
            n_steps = min(len(cand), len(sel))
            all_taken = int(np.sum(sel[:n_steps] >= cand[:n_steps])) if n_steps else 0
            lines.append(
                f"| {run.name} | {fmt(n[0] if len(n) else math.nan, 0)} "
                f"| {fmt(cand[0] if len(cand) else math.nan, 1)} "
                f"| {fmt(sel[0] if len(sel) else math.nan, 1)} | {fmt(nan_mean(cand), 1)} "
                f"| {fmt(cand.min() if len(cand) else math.nan, 1)} | {all_taken} of {n_steps} |"
            )
        lines.append("")
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
        f"Has GRPO plateaued? Its entropy falls by {fmt(100 * m.fall_share, 1)} % of its "
        "whole fall (step 1 to the last quarter's mean) between the third and the last "
        f"quarter of the steps, and its accuracy changes by {fmt(100 * m.acc_change, 1)} "
        "points between them (means over seeds).",
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
    lines.append("")
    if m.early is not None:
        until, efit, held = m.early
        lines += [
            f"**As a predictor.** Fitted on the first third of the steps only (steps <= "
            f"{until}, {efit.num_points} points, as `tools/entropy_law.py fit --fit-until "
            f"{until}`): a = {efit.a:.3f}, b = {efit.b:.3f}, R² {efit.r2:.3f}, ceiling "
            f"{efit.ceiling:.3f}. On the {held.num_points} held-out points (steps "
            f"{held.first_step}..{held.last_step}) its predictions miss the measured "
            f"accuracy by {100 * held.rmse:.1f} points RMSE (largest {100 * held.max_abs:.1f}, "
            f"mean {100 * held.mean:+.1f}: measured minus predicted); its ceiling lies "
            f"{100 * (efit.ceiling - plateau):+.1f} points from the observed plateau.",
            "",
        ]
    return lines + [f"![entropy law]({fig_rel}/entropy_law.png)", ""]


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


def _pass_at_k_section(m: Measured, fig_rel: str) -> list[str]:
    if not m.pass_at_k:
        return []
    lines = [
        "## pass@k and distinct correct answers",
        "",
        "64 samples per held-out sum at temperature 1 from each final policy's export "
        "(`tools/pass_at_k.py eval` on the run's `hf/`) and from the base model: pass@k "
        "with the unbiased estimator, and the distinct correct answers (ordered pairs) "
        "among a prompt's 64 samples, averaged over the 50 prompts. Per method: the mean "
        "over its seeds (per seed in brackets).",
        "",
        "| policy | pass@1 | pass@4 | pass@16 | pass@64 | distinct correct of 64 |",
        "|---|---|---|---|---|---|",
    ]
    if BASE_RUN in m.pass_at_k:
        b = m.pass_at_k[BASE_RUN]
        cells = [fmt(b.at(k)) for k in (1, 4, 16, 64)] + [fmt(b.mean_distinct_correct, 2)]
        lines.append("| base model | " + " | ".join(cells) + " |")
    for method, runs in m.by_method.items():
        results = [m.pass_at_k[r.name] for r in runs if r.name in m.pass_at_k]
        if not results:
            continue
        cells = []
        for k in (1, 4, 16, 64):
            each = [x.at(k) for x in results]
            cells.append(f"{fmt(np.mean(each))} ({', '.join(fmt(v) for v in each)})")
        each = [x.mean_distinct_correct for x in results]
        cells.append(f"{fmt(np.mean(each), 2)} ({', '.join(fmt(v, 2) for v in each)})")
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    return lines + ["", f"![pass@k]({fig_rel}/pass_at_k.png)", ""]


def _best_fixed(m: Measured) -> tuple[str, float]:
    """The fixed-coefficient method (Clip-Cov or KL-Cov) with the best final accuracy."""
    fixed = {k: m.stats[k].acc for k in ("clip_cov", "kl_cov") if k in m.stats}
    if not fixed:
        return "", math.nan
    best = max(fixed, key=fixed.get)
    return METHOD_LABELS[best], fixed[best]


def _target_section(m: Measured, val_k: int, total: int, fig_rel: str) -> list[str]:
    if not m.target:
        return []
    label, acc_best = _best_fixed(m)
    fit = m.law
    lines = [
        "## Holding an entropy target",
        "",
        f"Over the second half of the steps ({total // 2 + 1}..{total}): the mean absolute "
        "error of the rollout entropy against the target (nats, and relative to the "
        "target), the mean entropy held, the knob β at the last step and the final "
        f"accuracy (avg@{val_k}) next to the best fixed-coefficient method ({label}, "
        f"{fmt(acc_best)}) and next to the accuracy GRPO's entropy-law fit gives at the "
        f"entropy held (`R = -{fit.a:.3f}·exp(H) + {fit.b:.3f}`, above).",
        "",
        "| run | mean abs. error (nats) | relative to the target | entropy held "
        "| β at the end | final accuracy | vs best fixed (points) | the law at the entropy held |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in m.target:
        t = m.target_stats[s.name]
        lines.append(
            f"| {s.name} | {fmt(t.mae, 4)} | {fmt(100 * t.relative_mae, 1)} % "
            f"| {fmt(t.held, 3)} | {fmt(t.knob_last, 4)} | {fmt(t.acc)} "
            f"| {fmt(100 * (t.acc - acc_best), 1)} | {fmt(fit.predict(t.held))} |"
        )
    lines += [
        "",
        "GRPO's fitted law gives the accuracy GRPO had when its entropy was at the level a "
        "run holds. Holding an entropy above the fixed methods' plateau therefore costs "
        "accuracy on this task unless the method does better than GRPO at that entropy; "
        "the last column is that reference for each run.",
    ]
    return lines + ["", f"![entropy target]({fig_rel}/entropy_target.png)", ""]


def _goal_checks(m: Measured, goals: Goals, inputs: ReportInputs) -> list[tuple[str, str, bool]]:
    """``(goal, measured, met)`` for each goal that applies to the plan."""
    grpo, fit = m.stats["grpo"], m.law
    drop = ratio(grpo.h0, grpo.hw)
    checks = [
        (f"GRPO's entropy falls at least {goals.grpo_entropy_drop:g}x", f"{fmt(drop, 1)}x",
         drop >= goals.grpo_entropy_drop),
        (f"GRPO's entropy has plateaued: the last quarter adds under "
         f"{100 * goals.plateau_fall_share:g} % of its fall",
         f"{fmt(100 * m.fall_share, 1)} %", m.fall_share < goals.plateau_fall_share),
        (f"GRPO's accuracy has settled: it changes under {goals.settled_points:g} points "
         "over the last quarter", f"{100 * m.acc_change:+.1f} points",
         abs(100 * m.acc_change) < goals.settled_points),
        (f"GRPO fit R² >= {goals.fit_r2:g}", f"{fit.r2:.3f}", fit.r2 >= goals.fit_r2),
    ]  # fmt: skip
    cgap = 100 * (fit.ceiling - m.plateau_acc)
    checks.append((f"predicted ceiling within {goals.ceiling_gap_points:g} points of the plateau",
                   f"{cgap:+.1f} points", abs(cgap) <= goals.ceiling_gap_points))  # fmt: skip
    if m.early is not None:
        held = m.early[2]
        checks.append(("the law fitted on the first third predicts the rest (error stated)",
                       f"RMSE {100 * held.rmse:.1f} points", True))  # fmt: skip
    for method in ("clip_cov", "kl_cov"):
        if method not in m.stats:
            continue
        st, name = m.stats[method], METHOD_LABELS[method]
        kept, gap = ratio(st.hw, grpo.hw), 100 * (st.acc - grpo.acc)
        checks.append((f"{name} keeps at least {goals.entropy_ratio:g}x GRPO's entropy at "
                       "GRPO's plateau", f"{fmt(kept, 1)}x", kept >= goals.entropy_ratio))  # fmt: skip
        checks.append((f"{name}'s final accuracy within {goals.accuracy_gap_points:g} points of "
                       "GRPO's", f"{gap:+.1f} points", gap >= -goals.accuracy_gap_points))  # fmt: skip
    g_pass = m.pooled_pass_at_k.get("grpo")
    for method in ("clip_cov", "kl_cov"):
        mine = m.pooled_pass_at_k.get(method)
        if g_pass is None or mine is None:
            continue
        name = METHOD_LABELS[method]
        n = min(mine.n, g_pass.n)
        checks.append((f"{name}'s pass@{n} at least GRPO's",
                       f"{mine.at(n):.3f} vs {g_pass.at(n):.3f}", mine.at(n) >= g_pass.at(n)))  # fmt: skip
        d, dg = mine.mean_distinct_correct, g_pass.mean_distinct_correct
        checks.append((f"{name}'s distinct correct answers at least GRPO's",
                       f"{d:.2f} vs {dg:.2f}", d >= dg))  # fmt: skip
    _, acc_best = _best_fixed(m)
    for method in TARGETS:
        runs = [s.name for s in m.target if s.method == method]
        if not runs:
            continue
        rel = float(np.mean([m.target_stats[r].relative_mae for r in runs]))
        acc = float(np.mean([m.target_stats[r].acc for r in runs]))
        name = METHOD_LABELS[method]
        checks.append((f"{name}: mean abs. error over the second half below "
                       f"{100 * goals.target_relative_mae:g} % of the target",
                       f"{100 * rel:.1f} %", rel < goals.target_relative_mae))  # fmt: skip
        gap = 100 * (acc - acc_best)
        checks.append((f"{name}: final accuracy within {goals.accuracy_gap_points:g} points "
                       "of the best fixed-coefficient method", f"{gap:+.1f} points",
                       gap >= -goals.accuracy_gap_points))  # fmt: skip
    checks.append(("two seeds per method", f"{len(m.seeds)}", len(m.seeds) >= 2))
    if inputs.wall and inputs.wall[1] == len(inputs.specs):
        minutes = inputs.wall[0] / 60
        checks.append((f"every run in one call under {goals.minutes:g} minutes",
                       f"{minutes:.1f} min", minutes < goals.minutes))  # fmt: skip
    return checks


def _goals_section(m: Measured, goals: Goals, inputs: ReportInputs) -> list[str]:
    checks = _goal_checks(m, goals, inputs)
    lines = ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {goal} | {got} | {'yes' if ok else '**no**'} |" for goal, got, ok in checks]
    lines.append("")
    missed = [f"{goal} (measured: {got})" for goal, got, ok in checks if not ok]
    if missed:
        lines.append(f"**Not reproduced in these {inputs.total_steps}-step runs:** "
                     + "; ".join(missed) + ".")  # fmt: skip
    else:
        lines.append(f"Every goal is met in these {inputs.total_steps}-step runs.")
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
    total = inputs.total_steps
    lines = [
        *_setup_section(m, inputs),
        *_goals_section(m, goals, inputs),
        *_regime_section(m),
        *_choice_section(m),
        *_methods_section(m, inputs.val_k, fig_rel),
        *_law_section(m, inputs.val_k, fig_rel),
        *_pass_at_k_section(m, fig_rel),
        *_target_section(m, inputs.val_k, total, fig_rel),
        *_dynamics_section(m, fig_rel),
        *_covariance_section(m),
        *_selection_section(m, inputs.specs),
        *_runs_section(inputs),
    ]
    text = "\n".join(lines)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return text
