"""The report's PNGs: per-step series by method, the entropy-law fit and its early-fit
prediction, predicted vs measured entropy change, entropy against an entropy target.
100 dpi, on :func:`covrl.analysis.plots.new_figure`."""

from __future__ import annotations

import numpy as np

from covrl.analysis.plots import new_figure, save_figure
from experiments.reproduce.numbers import ENTROPY, TARGET, fmt, pearson, values

_DPI = 100
_STYLES = ("-", "--", ":", "-.")


def plot_series(runs_by_label, tag, path, *, ylabel, title, log_y=False, markers=False):
    """``tag`` over the steps of every run: one colour per label, one line style per run."""
    fig, (ax,) = new_figure((8.0, 4.5), _DPI)
    for i, (label, runs) in enumerate(runs_by_label.items()):
        for j, run in enumerate(runs):
            steps, ys = values(run, tag)
            ax.plot(
                steps, ys, color=f"C{i}", ls=_STYLES[j % len(_STYLES)], lw=1.5,
                marker="o" if markers else None, ms=3, label=f"{label} ({run.name})",
            )  # fmt: skip
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, _DPI)


def plot_law(h, r, fit, plateau, path, acc_label, early=None):
    """GRPO's validation points, the fitted law, its ceiling and the observed plateau;
    with ``early`` = ``(fit, mask of the points it was fitted on, last step)``, also the
    law fitted on the early points only."""
    fig, (ax,) = new_figure((7.0, 4.5), _DPI)
    if early is None:
        ax.scatter(h, r, s=14, color="C0", label="GRPO validation points (every seed)")
    else:
        efit, head, until = early
        ax.scatter(h[head], r[head], s=14, color="C0",
                   label=f"GRPO validation points, steps <= {until}")  # fmt: skip
        ax.scatter(h[~head], r[~head], s=14, color="C0", marker="x",
                   label=f"GRPO validation points, steps > {until} (held out)")  # fmt: skip
    grid = np.linspace(0.0, float(h.max()) * 1.05, 200)
    ax.plot(grid, fit.predict(grid), color="C1", lw=2,
            label=f"R = {fit.b:.3f} − {fit.a:.3f}·exp(H), R² {fit.r2:.3f}")  # fmt: skip
    if early is not None:
        ax.plot(grid, efit.predict(grid), color="C4", lw=1.5, ls="--",
                label=f"fitted on steps <= {until}: R = {efit.b:.3f} − {efit.a:.3f}·exp(H)")  # fmt: skip
    ax.axhline(
        fit.ceiling, color="C3", ls="--", label=f"predicted ceiling b − a = {fit.ceiling:.3f}"
    )
    ax.axhline(plateau, color="C2", ls=":", label=f"observed plateau {plateau:.3f}")
    ax.set_xlabel("policy entropy H (nats/token)")
    ax.set_ylabel(acc_label)
    ax.set_title("entropy–performance law on GRPO")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, _DPI)


def plot_dynamics(points_by_label, path):
    """Per-step ``(predicted, measured)`` entropy changes, one colour per label."""
    fig, (ax,) = new_figure((6.5, 5.0), _DPI)
    for i, (label, (p, m)) in enumerate(points_by_label.items()):
        ax.scatter(
            p, m, s=10, color=f"C{i}", alpha=0.7, label=f"{label} (r = {fmt(pearson(p, m), 2)})"
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("predicted change  −Cov(log π, A)  (step size 1)")
    ax.set_ylabel("measured entropy change over the update (nats/token)")
    ax.set_title("per-step entropy change: predicted vs measured")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, _DPI)


def plot_targets(runs_by_label, path):
    """Rollout entropy (solid) against the entropy target (dashed) of each run that holds
    one: one colour per label, one line style per seed."""
    fig, (ax,) = new_figure((8.0, 4.5), _DPI)
    for i, (label, runs) in enumerate(runs_by_label.items()):
        for j, run in enumerate(runs):
            steps, h = values(run, ENTROPY)
            ax.plot(steps, h, color=f"C{i}", ls=_STYLES[j % len(_STYLES)], lw=1.3,
                    label=f"{label} ({run.name}): entropy")  # fmt: skip
        steps, t = values(runs[0], TARGET)
        ax.plot(steps, t, color="black", ls="--", lw=1.2, label=f"{label}: target")
    ax.set_xlabel("step")
    ax.set_ylabel("rollout entropy (nats/token)")
    ax.set_title("entropy held by KL-Cov's controller against its target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, _DPI)
