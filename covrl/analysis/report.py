"""Per-run entropy-law analysis and the markdown comparison of runs.

:func:`analyze_run` pairs a run's entropy and accuracy tags by step and fits
``R = -a exp(H) + b`` (optionally on a prefix of the run, scoring the rest);
:func:`summarize_run` and :func:`compare_table` tabulate several runs (method comparison:
final and best accuracy, entropy at the end and at its plateau, entropy ratios).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from covrl.analysis.entropy_law import (
    EntropyLawError,
    EntropyLawFit,
    HeldOutError,
    fit_entropy_law,
    fit_prefix,
)
from covrl.analysis.run_logs import RunLog, RunLogError, align

DEFAULT_ENTROPY_TAG = "rollout/entropy"
DEFAULT_ACCURACY_TAG = "val/accuracy"


@dataclass(frozen=True)
class Tags:
    """Which scalar tags hold the entropy ``H`` and the performance ``R``."""

    entropy: str = DEFAULT_ENTROPY_TAG
    accuracy: str = DEFAULT_ACCURACY_TAG


DEFAULT_TAGS = Tags()


@dataclass(frozen=True)
class RunAnalysis:
    """A run's law fit. Arrays are ``[m]`` over the steps logging both tags."""

    run: RunLog
    tags: Tags
    steps: np.ndarray
    entropy: np.ndarray
    accuracy: np.ndarray
    fit: EntropyLawFit
    fit_until: int | None
    held_out: HeldOutError | None
    current_step: int  # last step logging a finite entropy
    current_entropy: float
    skipped_steps: np.ndarray  # steps left out for a NaN / inf entropy or accuracy

    @property
    def fitted_mask(self) -> np.ndarray:
        """``[m]`` bool: the points the fit used."""
        if self.fit_until is None:
            return np.ones(len(self.steps), dtype=bool)
        return self.steps <= self.fit_until

    @property
    def slope_now(self) -> float:
        """``dR/dH`` at the current (last logged) entropy."""
        return float(self.fit.slope(self.current_entropy))


def _context(run: RunLog, tags: Tags) -> str:
    return f"run {run.name!r} from {run.source}, H={tags.entropy!r}, R={tags.accuracy!r}"


def analyze_run(
    run: RunLog, tags: Tags = DEFAULT_TAGS, fit_until: int | None = None
) -> RunAnalysis:
    """Fit the law on a run (on steps ``<= fit_until`` when given, the rest held out).

    Raises:
        RunLogError: a tag is missing or empty.
        EntropyLawError: no common steps, too few points, constant entropy, no held-out
            points; the message names the run, its file and the tags.
    """
    h_series, h_bad = run.series(tags.entropy).finite()
    r_series, r_bad = run.series(tags.accuracy).finite()
    steps, h, r = align(h_series, r_series)
    ctx = _context(run, tags)
    if len(h_series) == 0 or len(r_series) == 0:
        raise EntropyLawError(f"no finite values ({ctx})")
    if len(steps) == 0:
        raise EntropyLawError(
            f"no step logs both tags with finite values ({ctx}; entropy at steps "
            f"{int(h_series.steps[0])}..{int(h_series.steps[-1])}, accuracy at steps "
            f"{int(r_series.steps[0])}..{int(r_series.steps[-1])})"
        )
    if fit_until is None:
        fit, held = fit_entropy_law(h, r, steps=steps, context=ctx), None
    else:
        fit, held = fit_prefix(steps, h, r, fit_until, context=ctx)
    return RunAnalysis(
        run=run,
        tags=tags,
        steps=steps,
        entropy=h,
        accuracy=r,
        fit=fit,
        fit_until=fit_until,
        held_out=held,
        current_step=int(h_series.steps[-1]),
        current_entropy=float(h_series.values[-1]),
        skipped_steps=np.union1d(h_bad, r_bad),
    )


def analysis_dict(an: RunAnalysis) -> dict:
    """JSON-serializable summary of :func:`analyze_run` (nan becomes None)."""

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    d = {
        "run": an.run.name,
        "source": an.run.source,
        "entropy_tag": an.tags.entropy,
        "accuracy_tag": an.tags.accuracy,
        "fit_until": an.fit_until,
        "fit": {k: clean(v) for k, v in an.fit.as_dict().items()},
        "current_step": an.current_step,
        "current_entropy": an.current_entropy,
        "dR_dH_current": an.slope_now,
        "held_out": None,
        "skipped_steps": an.skipped_steps.tolist(),
    }
    if an.held_out is not None:
        d["held_out"] = {k: clean(v) for k, v in vars(an.held_out).items()}
    return d


def format_analysis(an: RunAnalysis) -> str:
    """Human-readable fit report."""
    f = an.fit
    scope = "all steps" if an.fit_until is None else f"steps <= {an.fit_until}"
    lines = [
        f"run {an.run.name} ({an.run.source})",
        f"  R = -a*exp(H) + b   H: {an.tags.entropy}   R: {an.tags.accuracy}",
        f"  fit on {scope}: {f.num_points} points, H in [{f.entropy_min:.4g}, {f.entropy_max:.4g}]",
        f"  a = {f.a:.6g} +/- {f.a_se:.3g}",
        f"  b = {f.b:.6g} +/- {f.b_se:.3g}",
        f"  ceiling b - a (H = 0) = {f.ceiling:.6g} +/- {f.ceiling_se:.3g}",
        f"  R^2 = {f.r2:.4f}   RMSE = {f.rmse:.4g}",
        f"  dR/dH at step {an.current_step} (H = {an.current_entropy:.4g}) = {an.slope_now:.4g}",
    ]
    if len(an.skipped_steps):
        shown = an.skipped_steps[:10].tolist()
        more = " ..." if len(an.skipped_steps) > 10 else ""
        lines.append(f"  left out {len(an.skipped_steps)} steps with NaN/inf values: {shown}{more}")
    if an.held_out is not None:
        e = an.held_out
        lines.append(
            f"  held out: {e.num_points} points, steps {e.first_step}..{e.last_step}: "
            f"RMSE = {e.rmse:.4g}, max |error| = {e.max_abs:.4g}, mean error = {e.mean:+.4g}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class RunSummary:
    """One row of the comparison table."""

    name: str
    last_step: int
    final_accuracy: float
    best_accuracy: float
    best_step: int
    final_entropy: float
    plateau_entropy: float  # mean over the last ``plateau_fraction`` of entropy points
    plateau_fraction: float
    fit: EntropyLawFit | None
    fit_note: str  # why there is no fit, when there is none


def summarize_run(
    run: RunLog, tags: Tags = DEFAULT_TAGS, plateau_fraction: float = 0.2
) -> RunSummary:
    """Accuracy and entropy summary of one run, plus its law fit over all steps if possible."""
    if not 0.0 < plateau_fraction <= 1.0:
        raise ValueError(f"plateau_fraction must be in (0, 1], got {plateau_fraction}")
    h, _ = run.series(tags.entropy).finite()
    r, _ = run.series(tags.accuracy).finite()
    if len(h) == 0 or len(r) == 0:
        raise EntropyLawError(f"no finite values ({_context(run, tags)})")
    tail = max(1, math.ceil(plateau_fraction * len(h) - 1e-9))  # 0.07 * 100 = 7.000000000000001
    best = int(np.argmax(r.values))  # first occurrence of the best accuracy
    try:
        fit, note = analyze_run(run, tags).fit, ""
    except EntropyLawError as exc:
        fit, note = None, str(exc)
    return RunSummary(
        name=run.name,
        last_step=int(max(h.steps[-1], r.steps[-1])),
        final_accuracy=float(r.values[-1]),
        best_accuracy=float(r.values[best]),
        best_step=int(r.steps[best]),
        final_entropy=float(h.values[-1]),
        plateau_entropy=float(h.values[-tail:].mean()),
        plateau_fraction=plateau_fraction,
        fit=fit,
        fit_note=note,
    )


def compare_table(summaries: Sequence[RunSummary], baseline: str | None = None) -> str:
    """Markdown table over runs; entropy ratios are against ``baseline`` (default: the first)."""
    if not summaries:
        raise RunLogError("no runs to compare")
    names = [s.name for s in summaries]
    base_name = names[0] if baseline is None else baseline
    if base_name not in names:
        raise RunLogError(f"baseline run {base_name!r} is not among the runs {names}")
    base = summaries[names.index(base_name)]

    def ratio(x: float, y: float) -> str:
        return f"{x / y:.3g}" if y > 0 else "n/a"

    fractions = sorted({f"{s.plateau_fraction:.0%}" for s in summaries})
    pct = "/".join(fractions)
    lines = [
        f"| run | last step | final R | best R (step) | final H | plateau H | "
        f"plateau H / {base_name} | ceiling b-a | R^2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for s in summaries:
        if s.fit is not None:
            ceiling = f"{s.fit.ceiling:.4f} ± {s.fit.ceiling_se:.2g}"
            r2 = f"{s.fit.r2:.3f}" if math.isfinite(s.fit.r2) else "n/a"
        else:
            ceiling = r2 = "n/a"
            notes.append(f"- {s.name}: no fit: {s.fit_note}")
        lines.append(
            f"| {s.name} | {s.last_step} | {s.final_accuracy:.4f} | "
            f"{s.best_accuracy:.4f} ({s.best_step}) | {s.final_entropy:.4g} | "
            f"{s.plateau_entropy:.4g} | {ratio(s.plateau_entropy, base.plateau_entropy)} | "
            f"{ceiling} | {r2} |"
        )
    lines.append("")
    lines.append(
        f"R: accuracy, H: entropy. Plateau H: mean entropy over the last {pct} of its logged "
        "steps. Ceiling b-a ± standard error: the law R = -a·exp(H) + b fitted on all steps "
        "logging both tags."
    )
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)
