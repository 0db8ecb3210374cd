"""Run logs on rank 0: TensorBoard scalars, the same scalars as JSON lines, a progress bar.

Every step's scalars go to ``<run_dir>/tensorboard/`` (``torch.utils.tensorboard``) and
``<run_dir>/metrics.jsonl`` (one object per step, ``{"step": N, "<tag>": value, ...}``)
under the same tag names (``rollout/entropy``, ``train/pg_clipfrac``, ``time/update``,
...; see docs/training.md). Other ranks construct the logger too and do nothing, so the
loop needs no rank checks. A resumed run appends: readers keep the value written last
for a repeated step (:mod:`covrl.analysis.run_logs`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

METRICS_JSONL = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

__all__ = ["METRICS_JSONL", "TENSORBOARD_DIR", "MetricsLogger", "PhaseTimer"]


class PhaseTimer:
    """Wall-clock seconds per phase of one step: ``with timer("rollout"): ...``.

    A phase entered twice in a step (refill generation batches) accumulates.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


class MetricsLogger:
    """Scalars to TensorBoard + JSON lines and a progress line, on rank 0 only.

    Args:
        run_dir: the run directory.
        enabled: True on the rank that logs (rank 0).
        total_steps: for the progress bar's ETA.
        initial_step: the step a resumed run starts after.
        progress_bar: a tqdm bar on stderr, or one line per step (with the ETA) when
            stderr is not a terminal.
        show: tags shown on the progress bar, with short labels.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool,
        total_steps: int,
        initial_step: int = 0,
        progress_bar: bool = True,
        show: Mapping[str, str] | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.show = dict(show or {})
        self._writer = self._jsonl = self._bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=os.fspath(self.run_dir / TENSORBOARD_DIR))
        self._jsonl = open(self.run_dir / METRICS_JSONL, "a", buffering=1)  # noqa: SIM115
        self._total, self._start_step = total_steps, initial_step
        self._started = time.monotonic()
        # A live bar on a terminal; one plain line per step in a log file (batch jobs).
        self._lines = progress_bar and not sys.stderr.isatty()
        if progress_bar and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=initial_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write one step's scalars (non-finite values go to JSON as null and are left
        out of TensorBoard) and advance the progress bar."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        record = {"step": step}
        record.update({k: (v if math.isfinite(v) else None) for k, v in sorted(clean.items())})
        self._jsonl.write(json.dumps(record) + "\n")
        for tag, value in clean.items():
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()
        parts = {label: f"{clean[tag]:.4g}" for tag, label in self.show.items() if tag in clean}
        if self._bar is not None:
            self._bar.set_postfix(parts, refresh=False)
            self._bar.update(1)
        elif self._lines and step > self._start_step:
            done = step - self._start_step
            eta = (time.monotonic() - self._started) / done * (self._total - step)
            fields = " ".join(f"{k} {v}" for k, v in parts.items())
            print(
                f"step {step}/{self._total} {fields} eta {eta / 60:.1f} min",
                file=sys.stderr,
                flush=True,
            )

    def print(self, message: str) -> None:
        """A line on rank 0 that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._writer = self._jsonl = self._bar = None
