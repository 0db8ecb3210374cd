"""Scalar logs of training runs: TensorBoard event files, JSON lines and CSV.

A run is read into a :class:`RunLog`: ``{tag: Series}`` with each series sorted by step,
one value per step. The trainer writes the same tag names to both of its logs
(``<run_dir>/tensorboard/`` and ``<run_dir>/metrics.jsonl``); a CSV has a ``step`` column
and one column per tag (e.g. ``step,entropy,accuracy``).

When a step occurs more than once (a run resumed from a checkpoint replays the steps after
it), the value written last wins. TensorBoard stores scalars as float32, so values read
from event files carry float32 rounding; JSON lines and CSV keep float64.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METRICS_JSONL = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_EVENT_MARKER = "tfevents"


class RunLogError(ValueError):
    """A run's logs are missing, unreadable, or lack a requested tag."""


@dataclass(frozen=True)
class Series:
    """One scalar tag over a run: ``steps`` ``[n]`` int64 increasing, ``values`` ``[n]`` float64."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def finite(self) -> tuple[Series, np.ndarray]:
        """``(series without NaN/inf values, [k] steps that had them)``."""
        ok = np.isfinite(self.values)
        return Series(self.steps[ok], self.values[ok]), self.steps[~ok]

    @classmethod
    def from_points(cls, points: Iterable[tuple[int, float]]) -> Series:
        """Sorted by step; for a repeated step the point given last wins."""
        last: dict[int, float] = {}
        for step, value in points:
            last[int(step)] = float(value)
        steps = np.array(sorted(last), dtype=np.int64)
        return cls(steps, np.array([last[s] for s in steps.tolist()], dtype=np.float64))


@dataclass(frozen=True)
class RunLog:
    """The scalar tags of one run. ``source`` names the file or directory they came from."""

    name: str
    source: str
    scalars: Mapping[str, Series]

    @property
    def tags(self) -> list[str]:
        return sorted(self.scalars)

    def has(self, tag: str) -> bool:
        return tag in self.scalars and len(self.scalars[tag]) > 0

    def series(self, tag: str) -> Series:
        """The series of ``tag``; a :class:`RunLogError` naming the run and file if absent."""
        if not self.scalars:
            raise RunLogError(f"run {self.name!r}: no scalars in {self.source}")
        s = self.scalars.get(tag)
        if s is None:
            shown = ", ".join(self.tags[:30]) + (" ..." if len(self.tags) > 30 else "")
            raise RunLogError(
                f"run {self.name!r}: tag {tag!r} not found in {self.source}; available tags: "
                f"{shown}"
            )
        if len(s) == 0:
            raise RunLogError(f"run {self.name!r}: tag {tag!r} has no values in {self.source}")
        return s

    def tags_with_prefix(self, prefix: str) -> list[str]:
        return [t for t in self.tags if t.startswith(prefix) and len(self.scalars[t]) > 0]


def align(a: Series, b: Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The steps present in both series: ``(steps, a_values, b_values)``, each ``[m]``."""
    steps, ia, ib = np.intersect1d(a.steps, b.steps, assume_unique=True, return_indices=True)
    return steps, a.values[ia], b.values[ib]


# --------------------------------------------------------------------------- readers


def _is_event_file(name: str) -> bool:
    return _EVENT_MARKER in name


def _event_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding event files, shallowest first."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(_is_event_file(f) for f in filenames):
            found.append(Path(dirpath))
    return sorted(found, key=lambda p: (len(p.relative_to(root).parts), str(p)))


def _accumulate(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalar points of one event file or one directory of event files (in file order)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    # size_guidance 0 keeps every point (the default reservoir-samples 10000 per tag).
    acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    try:
        acc.Reload()
    except Exception as exc:  # corrupt records surface as assorted errors
        raise RunLogError(f"cannot read TensorBoard events in {path}: {exc}") from exc
    tags = acc.Tags()
    points: dict[str, list[tuple[int, float]]] = {}
    for tag in tags.get(ea.SCALARS, []):
        points[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    # Writers using the tensor summary format (tf.summary v2) log scalars as 0-d tensors.
    for tag in tags.get(ea.TENSORS, []):
        events = acc.Tensors(tag)
        arrays = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
        if tag not in points and all(
            a.ndim == 0 and np.issubdtype(a.dtype, np.number) for a in arrays
        ):
            points[tag] = [(e.step, float(a)) for e, a in zip(events, arrays, strict=True)]
    return points


def read_tensorboard(path: str | os.PathLike, name: str | None = None) -> RunLog:
    """Scalars from one event file or a directory tree of event files.

    Files in one directory are read in order (a resumed run appends a new file; its points
    replace the replayed steps). Event files in a subdirectory ``d`` (as written by
    ``SummaryWriter.add_scalars``) contribute their tags as ``d/<tag>``.
    """
    path = Path(path)
    if not path.exists():
        raise RunLogError(f"no such file or directory: {path}")
    if path.is_file():
        scalars = {t: Series.from_points(p) for t, p in _accumulate(path).items()}
        return RunLog(name or _default_name(path), str(path), scalars)
    dirs = _event_dirs(path)
    if not dirs:
        raise RunLogError(f"no TensorBoard event files (*{_EVENT_MARKER}*) under {path}")
    merged: dict[str, list[tuple[int, float]]] = {}
    for d in dirs:
        rel = d.relative_to(path).as_posix()
        for tag, pts in _accumulate(d).items():
            merged.setdefault(tag if rel == "." else f"{rel}/{tag}", []).extend(pts)
    scalars = {t: Series.from_points(p) for t, p in merged.items()}
    return RunLog(name or _default_name(path), str(path), scalars)


def _number(value: object) -> float | None:
    """A JSON value as a float, or None for non-scalars (strings, lists, null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def read_jsonl(path: str | os.PathLike, name: str | None = None) -> RunLog:
    """Scalars from JSON lines ``{"step": N, "<tag>": value, ...}``, one object per line.

    Non-numeric fields are ignored; blank lines are skipped.
    """
    path = Path(path)
    points: dict[str, list[tuple[int, float]]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise RunLogError(f"cannot read {path}: {exc.strerror or exc}") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunLogError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise RunLogError(
                f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
            )
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise RunLogError(f"{path}:{lineno}: expected an integer 'step' field, got {step!r}")
        for key, value in record.items():
            v = _number(value)
            if key != "step" and v is not None:
                points.setdefault(key, []).append((step, v))
    scalars = {t: Series.from_points(p) for t, p in points.items()}
    return RunLog(name or _default_name(path), str(path), scalars)


def read_csv(path: str | os.PathLike, name: str | None = None) -> RunLog:
    """Scalars from a CSV with a header: a ``step`` column and one column per tag.

    Empty cells are missing values; any other cell must parse as a float.
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise RunLogError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not rows:
        return RunLog(name or _default_name(path), str(path), {})
    header = [h.strip() for h in rows[0]]
    if "step" not in header:
        raise RunLogError(f"{path}: the header needs a 'step' column, got {header}")
    step_col = header.index("step")
    points: dict[str, list[tuple[int, float]]] = {h: [] for h in header if h != "step"}
    for lineno, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise RunLogError(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)}")
        try:
            step = int(row[step_col])
        except ValueError:
            raise RunLogError(
                f"{path}:{lineno}: step {row[step_col]!r} is not an integer"
            ) from None
        for col, cell in zip(header, row, strict=True):
            if col == "step" or not cell.strip():
                continue
            try:
                points[col].append((step, float(cell)))
            except ValueError:
                raise RunLogError(
                    f"{path}:{lineno}: column {col!r}: {cell!r} is not a number"
                ) from None
    scalars = {t: Series.from_points(p) for t, p in points.items()}
    return RunLog(name or _default_name(path), str(path), scalars)


def _default_name(path: Path) -> str:
    """The run directory's name: ``runs/grpo/metrics.jsonl`` and ``runs/grpo/tensorboard`` -> grpo."""
    path = path.resolve()
    if path.is_file() and (path.name == METRICS_JSONL or _is_event_file(path.name)):
        path = path.parent
    if path.name == TENSORBOARD_DIR:
        path = path.parent
    return path.stem if path.is_file() else path.name


SOURCES = ("auto", "tensorboard", "jsonl", "csv")


def load_run(path: str | os.PathLike, source: str = "auto", name: str | None = None) -> RunLog:
    """Read a run from a run directory or a log file.

    ``source="auto"``: a file by its name (``*.jsonl``, ``*.csv``, ``*tfevents*``); a
    directory by its TensorBoard events (``<dir>/tensorboard/``, else event files directly
    in ``<dir>``), else ``<dir>/metrics.jsonl``. ``"tensorboard"`` / ``"jsonl"`` / ``"csv"``
    force the format (a directory then means its ``tensorboard/`` or ``metrics.jsonl``).
    """
    if source not in SOURCES:
        raise RunLogError(f"source must be one of {SOURCES}, got {source!r}")
    path = Path(path)
    if not path.exists():
        raise RunLogError(f"no such file or directory: {path}")
    if path.is_file():
        kind = source
        if kind == "auto":
            if _is_event_file(path.name):
                kind = "tensorboard"
            elif path.suffix in (".jsonl", ".json", ".ndjson"):
                kind = "jsonl"
            elif path.suffix == ".csv":
                kind = "csv"
            else:
                raise RunLogError(
                    f"{path}: unknown log format (expected *.jsonl, *.csv or a *tfevents* "
                    "file); pass the source explicitly"
                )
        reader = {"tensorboard": read_tensorboard, "jsonl": read_jsonl, "csv": read_csv}[kind]
        return reader(path, name)
    tb_dir = path / TENSORBOARD_DIR
    jsonl = path / METRICS_JSONL
    has_tb_dir = tb_dir.is_dir() and bool(_event_dirs(tb_dir))
    has_top_events = any(_is_event_file(p.name) for p in path.iterdir() if p.is_file())
    if source in ("auto", "tensorboard") and (has_tb_dir or has_top_events):
        return read_tensorboard(tb_dir if has_tb_dir else path, name or _default_name(path))
    if source in ("auto", "jsonl") and jsonl.is_file():
        return read_jsonl(jsonl, name or _default_name(path))
    if source == "csv":
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) == 1:
            return read_csv(csvs[0], name or _default_name(path))
        raise RunLogError(f"{path}: expected exactly one *.csv file, found {len(csvs)}")
    wanted = {
        "auto": f"TensorBoard event files in {tb_dir} or {path}, or {jsonl}",
        "tensorboard": f"TensorBoard event files in {tb_dir} or {path}",
        "jsonl": str(jsonl),
    }[source]
    raise RunLogError(f"run directory {path}: found no logs (looked for {wanted})")
