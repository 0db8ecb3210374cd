"""Runs a plan of ``make reproduce`` as trainer jobs, a few at a time, and keeps finished ones.

Every run is one ``covrl.training.cli`` job (torchrun, one process, Megatron TP=1, a
colocated vLLM engine) with the spec's overrides; ``jobs`` runs go at a time (one per
CPU core). Each run writes ``<out>/<name>/`` (the trainer's run directory:
``metrics.jsonl``, TensorBoard events) and ``<out>/<name>.log`` (its console output);
``<out>/<name>/reproduce.json`` records the command once the run has finished, so a
second ``make reproduce`` only re-runs what is missing or was run with other settings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.reproduce.plan import RunSpec

__all__ = ["ReproduceError", "read_record", "record_path", "run_plan"]


class ReproduceError(RuntimeError):
    """A run of the plan failed; the message names it and its log file."""


@dataclass
class _Job:
    spec: RunSpec
    command: list[str]
    run_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    log_file: object = None
    started: float = 0.0


def _command(spec: RunSpec, config: str, shared: Sequence[str], run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "covrl.training.cli", "--config", config, "--resume", "none",
        *shared, *spec.overrides, f"trainer.run_dir={run_dir}",
    ]  # fmt: skip


def record_path(run_dir: Path) -> Path:
    """Where a finished run's record (its command and seconds) is written."""
    return run_dir / "reproduce.json"


def read_record(run_dir: Path) -> dict | None:
    """A finished run's record (``command``, ``seconds``), or None (unfinished)."""
    try:
        return json.loads(record_path(run_dir).read_text())
    except (OSError, ValueError):
        return None


def _is_done(run_dir: Path, command: list[str]) -> bool:
    record = read_record(run_dir)
    if record is None:
        return False
    return record.get("command") == command[1:] and (run_dir / "metrics.jsonl").is_file()


def _last_step(run_dir: Path) -> int:
    """The last step in ``metrics.jsonl`` (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def run_plan(
    specs: Sequence[RunSpec],
    *,
    out: str | os.PathLike,
    config: str,
    shared: Sequence[str],
    total_steps: int,
    jobs: int = 2,
    force: bool = False,
    log: Callable[[str], None] = print,
    poll_s: float = 2.0,
    progress_every_s: float = 60.0,
) -> dict[str, float]:
    """Run ``specs`` (``jobs`` at a time) into ``out``; returns seconds per run started.

    Finished runs with the same command are skipped unless ``force``. Stops at the
    first failed run (the others are terminated) with :class:`ReproduceError` naming its
    log file. ``OMP_NUM_THREADS=1`` per run: one core each.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pending: list[_Job] = []
    for spec in specs:
        run_dir = out / spec.name
        cmd = _command(spec, config, shared, run_dir)
        if not force and _is_done(run_dir, cmd):
            log(f"  {spec.name}: done before, kept")
            continue
        pending.append(_Job(spec, cmd, run_dir, out / f"{spec.name}.log"))
    todo = len(pending)
    running: list[_Job] = []
    seconds: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = last_progress = time.monotonic()
    finished = 0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                job = pending.pop(0)
                shutil.rmtree(job.run_dir, ignore_errors=True)
                job.log_file = open(job.log_path, "w")  # noqa: SIM115 - closed when it ends
                job.proc = subprocess.Popen(
                    job.command, stdout=job.log_file, stderr=subprocess.STDOUT, env=env
                )
                job.started = time.monotonic()
                running.append(job)
                log(f"  {job.spec.name}: started ({job.spec.label}, seed {job.spec.seed})")
            time.sleep(poll_s)
            for job in list(running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                running.remove(job)
                job.log_file.close()
                took = time.monotonic() - job.started
                seconds[job.spec.name] = took
                if rc != 0:
                    raise ReproduceError(
                        f"run {job.spec.name} failed (exit {rc}); see {job.log_path}"
                    )
                record_path(job.run_dir).write_text(
                    json.dumps({"command": job.command[1:], "seconds": took}, indent=1) + "\n"
                )
                finished += 1
                log(f"  {job.spec.name}: finished in {took / 60:.1f} min [{finished}/{todo}]")
            now = time.monotonic()
            if running and now - last_progress >= progress_every_s:
                last_progress = now
                states = ", ".join(
                    f"{j.spec.name} step {_last_step(j.run_dir)}/{total_steps}" for j in running
                )
                log(
                    f"  [{(now - start) / 60:.1f} min] {finished}/{todo} finished; "
                    f"running: {states}"
                )
    finally:
        for job in running:
            job.proc.terminate()
        for job in running:
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
            job.log_file.close()
    return seconds
