"""Runs a plan of ``make reproduce`` as trainer jobs, a few at a time, and keeps finished ones.

Every run is one ``covrl.training.cli`` job (torchrun, one process, Megatron TP=1, a
colocated vLLM engine) with the spec's overrides, followed (``pass_at_k``) by
``tools/pass_at_k.py eval`` on the run's Hugging Face export; the base model's pass@k
is one more job (``base``). ``jobs`` jobs go at a time (one per CPU core). Each run
writes ``<out>/<name>/`` (the trainer's run directory: ``metrics.jsonl``, TensorBoard
events, ``hf/``, ``pass_at_k.json``) and ``<out>/<name>.log`` (its console output);
``<out>/<name>/reproduce.json`` records the commands once the job has finished, so a
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

from experiments.reproduce.numbers import BASE_RUN, PASS_AT_K_FILE, pass_at_k_path
from experiments.reproduce.plan import RunSpec

__all__ = ["ReproduceError", "read_record", "record_path", "run_plan"]

REPO = Path(__file__).resolve().parents[2]
# pass@k: samples per prompt and the sampler's seed (the same for every policy).
PASS_AT_K_N = 64
PASS_AT_K_SEED = 0


class ReproduceError(RuntimeError):
    """A run of the plan failed; the message names it and its log file."""


@dataclass
class _Job:
    name: str
    what: str  # for the progress lines
    commands: list[list[str]]  # run one after the other
    run_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    log_file: object = None
    started: float = 0.0
    next_command: int = 0


def _command(spec: RunSpec, config: str, shared: Sequence[str], run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "covrl.training.cli", "--config", config, "--resume", "none",
        *shared, *spec.overrides, f"trainer.run_dir={run_dir}",
    ]  # fmt: skip


def _pass_at_k_command(model: Path, config: Path, out: Path, data: Path | None = None) -> list[str]:
    """pass@k of ``model`` with ``config``'s reward and vLLM settings, on ``data`` (None:
    the config's validation files)."""
    return [
        sys.executable, str(REPO / "tools" / "pass_at_k.py"), "eval", "--model", str(model),
        "--config", str(config), "--out", str(out), "-n", str(PASS_AT_K_N),
        "--seed", str(PASS_AT_K_SEED), *(["--data", str(data)] if data is not None else []),
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


def _recorded(commands: list[list[str]]) -> list[list[str]]:
    """The commands as recorded: without the interpreter, which may move."""
    return [c[1:] for c in commands]


def _is_done(run_dir: Path, commands: list[list[str]], needs: str) -> bool:
    record = read_record(run_dir)
    if record is None:
        return False
    return record.get("commands") == _recorded(commands) and (run_dir / needs).is_file()


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
    pass_at_k: tuple[Path, Path] | None = None,
    log: Callable[[str], None] = print,
    poll_s: float = 2.0,
    progress_every_s: float = 60.0,
) -> dict[str, float]:
    """Run ``specs`` (``jobs`` at a time) into ``out``; returns seconds per job started.

    With ``pass_at_k`` (the base model's directory and the validation parquet), every run
    is followed by the pass@k evaluation of its export, and the base model's is a job of
    its own (``base``, first).
    Finished jobs with the same commands are skipped unless ``force``. Stops at the
    first failed command (the other jobs are terminated) with :class:`ReproduceError`
    naming its log file. ``OMP_NUM_THREADS=1`` per job: one core each.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo_jobs: list[tuple[_Job, str]] = []
    if pass_at_k is not None:
        # The base model on the held-out sums, with the YAML's reward and vLLM settings.
        model, data = pass_at_k
        cmd = _pass_at_k_command(model, Path(config), pass_at_k_path(out, BASE_RUN), data)
        job = _Job(BASE_RUN, "pass@k of the base model", [cmd], out / BASE_RUN,
                   out / f"{BASE_RUN}.log")  # fmt: skip
        todo_jobs.append((job, PASS_AT_K_FILE))
    for spec in specs:
        run_dir = out / spec.name
        cmds = [_command(spec, config, shared, run_dir)]
        if pass_at_k is not None:
            cmds.append(_pass_at_k_command(run_dir / "hf", run_dir / "config.yaml",
                                           pass_at_k_path(out, spec.name)))  # fmt: skip
        what = f"{spec.label}, seed {spec.seed}"
        todo_jobs.append((_Job(spec.name, what, cmds, run_dir, out / f"{spec.name}.log"),
                          PASS_AT_K_FILE if pass_at_k is not None else "metrics.jsonl"))  # fmt: skip
    pending: list[_Job] = []
    for job, needs in todo_jobs:
        if not force and _is_done(job.run_dir, job.commands, needs):
            log(f"  {job.name}: done before, kept")
            continue
        pending.append(job)
    todo = len(pending)
    running: list[_Job] = []
    seconds: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = last_progress = time.monotonic()
    finished = 0

    def start_next(job: _Job) -> None:
        job.proc = subprocess.Popen(
            job.commands[job.next_command], stdout=job.log_file, stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        job.next_command += 1

    try:
        while pending or running:
            while pending and len(running) < jobs:
                job = pending.pop(0)
                shutil.rmtree(job.run_dir, ignore_errors=True)
                job.log_file = open(job.log_path, "w")  # noqa: SIM115 - closed when it ends
                job.started = time.monotonic()
                start_next(job)
                running.append(job)
                log(f"  {job.name}: started ({job.what})")
            time.sleep(poll_s)
            for job in list(running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                if rc != 0:
                    running.remove(job)
                    job.log_file.close()
                    raise ReproduceError(f"run {job.name} failed (exit {rc}); see {job.log_path}")
                if job.next_command < len(job.commands):
                    job.log_file.flush()
                    start_next(job)
                    continue
                running.remove(job)
                job.log_file.close()
                took = time.monotonic() - job.started
                seconds[job.name] = took
                job.run_dir.mkdir(parents=True, exist_ok=True)
                record_path(job.run_dir).write_text(json.dumps(
                    {"commands": _recorded(job.commands), "seconds": took}, indent=1) + "\n")  # fmt: skip
                finished += 1
                log(f"  {job.name}: finished in {took / 60:.1f} min [{finished}/{todo}]")
            now = time.monotonic()
            if running and now - last_progress >= progress_every_s:
                last_progress = now
                states = ", ".join(
                    f"{j.name} step {_last_step(j.run_dir)}/{total_steps}" for j in running
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
