"""PNG figures of the entropy law, of training runs and of pass@k (matplotlib, headless).

Figures are built on :class:`matplotlib.figure.Figure` directly (the Agg canvas), so
nothing depends on a display or on pyplot's global state. Each figure is exactly
``size`` inches at ``dpi``: ``round(w * dpi) x round(h * dpi)`` pixels.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from covrl.analysis.pass_at_k import PassAtKResult
from covrl.analysis.report import DEFAULT_TAGS, RunAnalysis, Tags
from covrl.analysis.run_logs import RunLog

DEFAULT_SIZE = (8.0, 5.0)
DEFAULT_DPI = 100
COV_PREFIX = "cov/"


def figure_size(text: str) -> tuple[float, float]:
    """A command-line figure size ``WxH`` in inches (``8x5``) -> ``(w, h)``."""
    import argparse

    try:
        w, h = (float(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT in inches, e.g. 8x5, got {text!r}"
        ) from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return w, h


def add_figure_arguments(parser) -> None:
    """``--size WxH`` and ``--dpi`` of an ``argparse`` parser that draws figures."""
    w, h = DEFAULT_SIZE
    parser.add_argument(
        "--size",
        type=figure_size,
        default=DEFAULT_SIZE,
        metavar="WxH",
        help=f"figure size in inches (default: {w:g}x{h:g})",
    )
    parser.add_argument(
        "--dpi", type=int, default=DEFAULT_DPI, help="pixels per inch (default: %(default)s)"
    )


def new_figure(size: tuple[float, float], dpi: int, nrows: int = 1, sharex: bool = False):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, axes


def save_figure(fig, path: str | os.PathLike, dpi: int) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_fit(
    an: RunAnalysis,
    path: str | os.PathLike,
    *,
    size: tuple[float, float] = DEFAULT_SIZE,
    dpi: int = DEFAULT_DPI,
) -> str:
    """R against H: the points (fitted / held out), the fitted curve down to H = 0, and the
    ceiling ``b - a`` with its standard-error band."""
    f = an.fit
    fig, (ax,) = new_figure(size, dpi)
    h_max = max(float(an.entropy.max()), an.current_entropy) * 1.08
    grid = np.linspace(0.0, h_max, 200)
    ax.plot(grid, f.predict(grid), color="C0", lw=2, label=f"fit: R = {f.b:.3g} − {f.a:.3g}·exp(H)")
    ax.axhline(
        f.ceiling,
        color="C3",
        ls="--",
        lw=1.5,
        label=f"ceiling b − a = {f.ceiling:.4f} ± {f.ceiling_se:.2g} (H = 0)",
    )
    ax.axhspan(f.ceiling - f.ceiling_se, f.ceiling + f.ceiling_se, color="C3", alpha=0.12, lw=0)
    fitted = an.fitted_mask
    scope = "all steps" if an.fit_until is None else f"steps ≤ {an.fit_until}"
    ax.scatter(
        an.entropy[fitted],
        an.accuracy[fitted],
        s=22,
        color="C0",
        zorder=3,
        label=f"fitted points ({scope}, n = {int(fitted.sum())})",
    )
    if (~fitted).any():
        ax.scatter(
            an.entropy[~fitted],
            an.accuracy[~fitted],
            s=26,
            facecolors="none",
            edgecolors="C1",
            linewidths=1.3,
            zorder=3,
            label=f"held-out points (n = {int((~fitted).sum())})",
        )
    ax.axvline(
        an.current_entropy,
        color="0.5",
        ls=":",
        lw=1,
        label=f"last logged entropy (step {an.current_step})",
    )
    text = [
        f"a = {f.a:.4g} ± {f.a_se:.2g}",
        f"b = {f.b:.4g} ± {f.b_se:.2g}",
        f"R² = {f.r2:.3f}, RMSE = {f.rmse:.3g}",
        f"dR/dH at step {an.current_step} = {an.slope_now:.3g}",
    ]
    if an.held_out is not None:
        text.append(f"held-out RMSE = {an.held_out.rmse:.3g}, max = {an.held_out.max_abs:.3g}")
    # Legend and numbers outside the axes: the points and the curve may fill any corner.
    ax.text(
        1.03,
        0.0,
        "\n".join(text),
        transform=ax.transAxes,
        ha="left",
        va="bottom",
        fontsize=8.5,
        bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, ec="0.7"),
    )
    ax.set_xlim(0.0, h_max)
    ax.margins(y=0.1)  # room above the ceiling line
    ax.set_xlabel(f"policy entropy H  ({an.tags.entropy})")
    ax.set_ylabel(f"performance R  ({an.tags.accuracy})")
    ax.set_title(f"{an.run.name}: R = −a·exp(H) + b")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
    return save_figure(fig, path, dpi)


def plot_runs(
    runs: Sequence[RunLog],
    path: str | os.PathLike,
    tags: Tags = DEFAULT_TAGS,
    *,
    log_entropy: bool = False,
    size: tuple[float, float] = DEFAULT_SIZE,
    dpi: int = DEFAULT_DPI,
) -> str:
    """Entropy (top) and accuracy (bottom) against step, one colour per run."""
    fig, (ax_h, ax_r) = new_figure(size, dpi, nrows=2, sharex=True)
    for i, run in enumerate(runs):
        h, r = run.series(tags.entropy), run.series(tags.accuracy)
        ax_h.plot(h.steps, h.values, color=f"C{i}", lw=1.5, label=run.name)
        ax_r.plot(r.steps, r.values, color=f"C{i}", lw=1.5, marker="o", ms=3, label=run.name)
    if log_entropy:
        ax_h.set_yscale("log")
    ax_h.set_ylabel(f"entropy\n({tags.entropy})")
    ax_r.set_ylabel(f"accuracy\n({tags.accuracy})")
    ax_r.set_xlabel("step")
    ax_h.set_title("entropy and accuracy over training")
    for ax in (ax_h, ax_r):
        ax.grid(alpha=0.3)
    ax_h.legend(loc="best", fontsize=8)
    return save_figure(fig, path, dpi)


def _top_fraction(tag: str) -> float | None:
    """``cov/top_0.02%`` -> 0.0002; None for other tags."""
    m = re.fullmatch(re.escape(COV_PREFIX) + r"top_([0-9.eE+-]+)%", tag)
    return float(m.group(1)) / 100.0 if m else None


def covariance_tags(run: RunLog) -> tuple[list[str], list[str]]:
    """``(quantile_tags, other_tags)`` under ``cov/``: mean and top-fraction means (largest
    fraction first), then the rest (selected / candidate counts ...)."""
    tags = run.tags_with_prefix(COV_PREFIX)
    tops = sorted(
        (t for t in tags if _top_fraction(t) is not None), key=_top_fraction, reverse=True
    )
    quantiles = ([f"{COV_PREFIX}mean"] if f"{COV_PREFIX}mean" in tags else []) + tops
    return quantiles, [t for t in tags if t not in quantiles]


def _log_scale_if_wide(ax, values: np.ndarray) -> None:
    """Log y axis for values spanning over two decades; symmetric log (linear around 0)
    when some are <= 0 (the mean covariance can be negative, counts can be 0)."""
    values = values[np.isfinite(values)]
    nonzero = np.abs(values[values != 0])
    if nonzero.size == 0 or nonzero.max() <= 100 * nonzero.min():
        return
    if (values > 0).all():
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=float(nonzero.min()))


def plot_covariance(
    run: RunLog,
    path: str | os.PathLike,
    *,
    size: tuple[float, float] = DEFAULT_SIZE,
    dpi: int = DEFAULT_DPI,
) -> str | None:
    """The token-covariance summary over steps (mean and mean of the top fractions) and the
    other ``cov/`` scalars below, on log axes where they span decades; None without any."""
    quantiles, others = covariance_tags(run)
    if not quantiles and not others:
        return None
    panels = [p for p in (quantiles, others) if p]
    fig, axes = new_figure(size, dpi, nrows=len(panels), sharex=True)
    for ax, group in zip(axes, panels, strict=True):
        for i, tag in enumerate(group):
            s = run.series(tag)
            ax.plot(s.steps, s.values, color=f"C{i}", lw=1.4, label=tag)
        _log_scale_if_wide(ax, np.concatenate([run.series(t).values for t in group]))
        ax.set_ylabel("covariance: mean,\nmean of top fraction" if group is quantiles else "value")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8, ncol=2)
    axes[0].set_title(f"{run.name}: token covariance Cov(log π, A) over training")
    axes[-1].set_xlabel("step")
    return save_figure(fig, path, dpi)


def plot_pass_at_k(
    results: Sequence[tuple[str, PassAtKResult]],
    path: str | os.PathLike,
    *,
    size: tuple[float, float] = DEFAULT_SIZE,
    dpi: int = DEFAULT_DPI,
) -> str:
    """pass@k against k (log x, powers of two marked) for each ``(label, result)`` (top),
    and each result's distinct correct answers per prompt, prompts sorted by it (bottom)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, (ax_k, ax_d) = new_figure(size, dpi, nrows=2)
    n_max = max(r.n for _, r in results)
    for i, (label, r) in enumerate(results):
        k = np.arange(1, r.n + 1)
        ax_k.plot(
            k,
            r.pass_at_k,
            color=f"C{i}",
            lw=1.8,
            label=f"{label}: pass@1 {r.at(1):.3f}, pass@{r.n} {r.at(r.n):.3f}",
        )
        distinct = sorted((p.distinct_correct for p in r.prompts), reverse=True)
        ax_d.step(
            np.arange(1, len(distinct) + 1),
            distinct,
            where="mid",
            color=f"C{i}",
            lw=1.5,
            label=f"{label}: mean {r.mean_distinct_correct:.2f} of n = {r.n}",
        )
    ax_k.set_xscale("log", base=2)
    ticks = [2**e for e in range(int(np.log2(n_max)) + 1)]
    ax_k.xaxis.set_major_locator(FixedLocator(ticks))
    ax_k.xaxis.set_minor_locator(NullLocator())
    ax_k.set_xticklabels([str(t) for t in ticks])
    ax_k.set_xlim(1, n_max)
    ax_k.set_xlabel("k (samples per prompt)")
    ax_k.set_ylabel("pass@k")
    ax_k.set_title("pass@k (unbiased estimator) and distinct correct answers")
    ax_d.set_xlabel("prompt (sorted by distinct correct answers)")
    ax_d.set_ylabel("distinct correct\nanswers per prompt")
    ax_d.set_ylim(bottom=0)
    for ax in (ax_k, ax_d):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path, dpi)
