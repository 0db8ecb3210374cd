"""The report's numbers: what it reads from each run's ``metrics.jsonl`` and how.

Tags (written by the trainer):

- ``rollout/entropy``: the policy's mean entropy (nats/token) over the step's rollout
  response tokens, ``H``;
- ``val/two_sum/avg@k``: sampled (temperature 1) validation accuracy, the ``R`` of the
  entropy law; ``val/accuracy``: greedy validation accuracy;
- ``entropy_dynamics/{predicted,measured}_change``: ``-Cov(log pi, A)`` of the step's
  tokens and the entropy change the update phase actually made on them;
- ``cov/top_*``: the covariance quantiles of a mini-batch, averaged over the step's
  mini-batches (Table 1 of the paper);
- ``cov/selected_*``, ``cov/prob_mean``: where the Clip-Cov / KL-Cov tokens sit;
  ``cov/candidates``: Clip-Cov's band candidates, ``cov/num_tokens``: a mini-batch's tokens;
- ``train/pg_clipfrac``, ``train/approx_kl_k3``: how far each update moves off the
  rollout policy;
- ``entropy_control/target``: the entropy target of a run that holds one.

Definitions (stated in the report too): GRPO's *plateau* is the last quarter of the
steps; a run's entropy "at the plateau" is its mean ``H`` over those steps; its *final
accuracy* is the mean of its last three validation evaluations. Every function returns
nan where a run logs nothing to compute from.

The *share of net covariance* the top fraction ``f`` of a mini-batch's ``N`` tokens
carries is ``n_f * mean_f / (N * mean)`` with ``n_f = max(1, floor(f N))`` (the count the
selection takes), ``mean_f`` the mean covariance of those tokens (``cov/top_<f>``) and
``mean`` that of all tokens (``cov/mean``): the covariance the top tokens drive against
the mini-batch's total, which the negative covariance of the others offsets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covrl.analysis import RunLog, Series, align, read_jsonl
from experiments.reproduce.plan import RunSpec

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
TARGET = "entropy_control/target"
CLIPFRAC = "train/pg_clipfrac"
APPROX_KL = "train/approx_kl_k3"
PLATEAU_FRACTION = 0.25
FINAL_EVALS = 3
PASS_AT_K_FILE = "pass_at_k.json"
BASE_RUN = "base"  # the pass@k record of the base model, next to the runs


def accuracy_tag(val_k: int) -> str:
    """The sampled validation accuracy of the two-sum task with ``val_k`` samples."""
    return f"val/two_sum/avg@{val_k}"


def pass_at_k_path(out_dir: str | os.PathLike, name: str) -> Path:
    """Where the pass@k JSON of run ``name`` (or of the base model, ``base``) is kept."""
    return Path(out_dir) / name / PASS_AT_K_FILE


def load_runs(specs: Sequence[RunSpec], out_dir: str | os.PathLike) -> dict[str, RunLog]:
    out_dir = Path(out_dir)
    return {s.name: read_jsonl(out_dir / s.name / "metrics.jsonl", name=s.name) for s in specs}


def values(run: RunLog, tag: str, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``tag`` from step ``first`` on, finite values only."""
    if not run.has(tag):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    s = run.series(tag)
    keep = (s.steps >= first) & np.isfinite(s.values)
    return s.steps[keep], s.values[keep]


def plateau_start(total_steps: int) -> int:
    """First step of the plateau window (the last quarter of the steps)."""
    return total_steps - max(1, round(total_steps * PLATEAU_FRACTION)) + 1


def quarter_mean(run: RunLog, tag: str, total_steps: int, quarter: int) -> float:
    """Mean of ``tag`` over quarter ``quarter`` (1..4) of the steps: steps
    ``floor((q-1) T / 4) + 1 .. floor(q T / 4)``."""
    lo, hi = (quarter - 1) * total_steps // 4 + 1, quarter * total_steps // 4
    steps, v = values(run, tag)
    return nan_mean(v[(steps >= lo) & (steps <= hi)])


def last_quarter_fall(runs: Sequence[RunLog], total_steps: int) -> float:
    """How much of the runs' entropy fall happens in the last quarter of the steps: the
    drop from the third quarter's mean to the last quarter's, over the drop from step 1
    to the last quarter's mean (means over ``runs``). Small: the entropy has plateaued."""
    h1 = np.mean([first_entropy(r) for r in runs])
    h3 = np.mean([quarter_mean(r, ENTROPY, total_steps, 3) for r in runs])
    h4 = np.mean([quarter_mean(r, ENTROPY, total_steps, 4) for r in runs])
    return ratio(float(h3 - h4), float(h1 - h4))


def last_quarter_change(runs: Sequence[RunLog], tag: str, total_steps: int) -> float:
    """Mean of ``tag`` over the last quarter minus over the third (means over ``runs``)."""
    q3 = np.mean([quarter_mean(r, tag, total_steps, 3) for r in runs])
    q4 = np.mean([quarter_mean(r, tag, total_steps, 4) for r in runs])
    return float(q4 - q3)


def top_fraction(tag: str) -> float:
    """The fraction of a ``cov/top_<pct>%`` tag (``cov/top_2%`` -> 0.02)."""
    return float(tag.removeprefix("cov/top_").removesuffix("%")) / 100


def net_share(row: dict[str, float], fraction: float) -> float:
    """The share of net covariance the top ``fraction`` of the tokens carries (module
    docstring), from a step's ``cov/top_*``, ``cov/mean`` and ``cov/num_tokens``."""
    tag = f"cov/top_{100 * fraction:g}%"
    n, mean = row.get("cov/num_tokens", math.nan), row.get("cov/mean", math.nan)
    if tag not in row or not np.isfinite(n) or not mean:
        return math.nan
    count = max(1, math.floor(fraction * n))
    return count * row[tag] / (n * mean)


def interpolate_share(fractions: Sequence[float], shares: Sequence[float], k: float) -> float:
    """The share at ``k`` by linear interpolation between the measured fractions around
    it (nan outside their range)."""
    f, s = np.asarray(fractions, dtype=float), np.asarray(shares, dtype=float)
    keep = np.isfinite(s)
    f, s = f[keep], s[keep]
    order = np.argsort(f)
    f, s = f[order], s[order]
    if len(f) == 0 or not f[0] <= k <= f[-1]:
        return math.nan
    return float(np.interp(k, f, s))


def step_row(run: RunLog, step: int) -> dict[str, float]:
    """Every tag's value at ``step`` (the tags the run logs there)."""
    out = {}
    for tag in run.scalars:
        steps, v = values(run, tag)
        hit = np.flatnonzero(steps == step)
        if len(hit):
            out[tag] = float(v[hit[0]])
    return out


def nan_mean(x: np.ndarray) -> float:
    """The mean, nan for no values."""
    return float(x.mean()) if len(x) else math.nan


def window_mean(run: RunLog, tag: str, total_steps: int) -> float:
    """Mean of ``tag`` over the plateau window (nan if it logs nothing there)."""
    return nan_mean(values(run, tag, plateau_start(total_steps))[1])


def window_entropy(run: RunLog, total_steps: int) -> float:
    return window_mean(run, ENTROPY, total_steps)


def first_entropy(run: RunLog) -> float:
    _, h = values(run, ENTROPY)
    return float(h[0]) if len(h) else math.nan


def final_accuracy(run: RunLog, tag: str) -> float:
    return nan_mean(values(run, tag)[1][-FINAL_EVALS:])


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def same_sign(x: np.ndarray, y: np.ndarray) -> float:
    """The share of pairs whose signs agree (nan for none)."""
    return nan_mean(np.sign(x) == np.sign(y))


def stepped_points(
    runs: Sequence[RunLog], tag_x: str, tag_y: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, x, y)`` at the steps where a run logs both tags with finite values,
    pooled over ``runs`` (e.g. entropy and validation accuracy at the validation steps)."""
    parts = [align(Series(*values(run, tag_x)), Series(*values(run, tag_y))) for run in runs]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def paired_points(runs: Sequence[RunLog], tag_x: str, tag_y: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of :func:`stepped_points`."""
    return stepped_points(runs, tag_x, tag_y)[1:]


def ratio(x: float, y: float) -> float:
    """``x / y``, nan when either is missing or ``y`` is zero."""
    return x / y if y and np.isfinite(x) and np.isfinite(y) else math.nan


def fmt(x: float, digits: int = 3) -> str:
    """A table cell: ``x`` to ``digits`` decimals, ``n/a`` when missing."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"
