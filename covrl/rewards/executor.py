"""Run reward scorers with a hard per-sample time limit.

A verifier can hang on a pathological answer: sympy on ``10^{10^{10}}`` spends its
time in C integer arithmetic, which a ``SIGALRM`` (math-verify's own limit, which also
works only in a main thread) cannot interrupt. So scoring runs in one long-lived worker
process per trainer rank: the trainer sends one sample at a time and waits at most
``timeout_s`` for its answer; on a timeout the worker is killed, the sample scores 0,
and a fresh worker takes the remaining samples. Scorer modules are imported in the
worker before the first sample, outside any sample's limit.

A scorer that raises, or returns something that is not a finite number, is an error
(:class:`~covrl.rewards.registry.RewardError` naming the function, the data source and
the sample), never a silent 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from covrl.rewards.registry import RewardError

__all__ = ["RewardExecutor", "ScoreRequest", "ScoreResult"]


@dataclass(frozen=True)
class ScoreRequest:
    spec: str
    data_source: str
    solution_str: str
    ground_truth: Any
    extra_info: dict | None = None
    source: str = ""  # where the prompt came from ("<file>:<row>"), for messages


@dataclass(frozen=True)
class ScoreResult:
    reward: float
    acc: float
    timed_out: bool = False


class _Timeout(Exception):
    pass


class RewardExecutor:
    """Scores :class:`ScoreRequest` lists; see the module docstring.

    Args:
        timeout_s: per-sample limit; a sample over it scores ``reward=0, acc=0``.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"reward.timeout_s={timeout_s} must be > 0")
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None  # answers from the worker
        self._send_conn: Connection | None = None  # requests to the worker
        self._warm: set[str] = set()

    # ------------------------------------------------------------------ process mode
    def _start(self) -> None:
        # A fresh interpreter: the trainer holds threads (gloo, vLLM) that a fork would
        # copy in an undefined state, and multiprocessing's spawn would re-import the
        # trainer's main module (the whole training stack) in the worker.
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "covrl.rewards.worker", str(from_parent), str(to_parent)],
            pass_fds=(from_parent, to_parent),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(from_parent)
        os.close(to_parent)
        self._send_conn = Connection(to_child, readable=False)
        self._conn = Connection(from_child, writable=False)
        self._warm = set()

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _warm_up(self, specs: set[str]) -> None:
        """Import scorers in the worker outside any sample's time limit."""
        if not self._alive():
            self._kill()
            self._start()
        todo = sorted(specs - self._warm)
        if not todo:
            return
        self._send_conn.send(todo)
        try:
            reply = self._conn.recv()
        except EOFError:
            self._kill()
            raise RewardError(f"reward worker died importing {todo}") from None
        if reply[0] == "error":
            raise RewardError(reply[1])
        self._warm.update(todo)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        for conn in (self._conn, self._send_conn):
            if conn is not None:
                conn.close()
        self._proc = self._conn = self._send_conn = None

    def _score_in_worker(self, request: ScoreRequest) -> ScoreResult:
        self._warm_up({request.spec})
        self._send_conn.send(request)
        if not self._conn.poll(self.timeout_s):
            self._kill()
            return ScoreResult(0.0, 0.0, timed_out=True)
        try:
            reply = self._conn.recv()
        except EOFError:
            code = self._proc.poll() if self._proc is not None else None
            self._kill()
            raise RewardError(
                f"reward worker died (exit code {code}) scoring data_source="
                f"{request.data_source!r} with {request.spec!r}"
            ) from None
        if reply[0] == "error":
            raise RewardError(reply[1])
        return ScoreResult(reply[1], reply[2])

    # ------------------------------------------------------------------ API
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Score every request in order. Raises :class:`RewardError` (naming the
        sample's source) when a scorer fails."""
        out = []
        if requests:
            self._warm_up({r.spec for r in requests})
        for request in requests:
            try:
                out.append(self._score_in_worker(request))
            except RewardError as exc:
                where = f" (prompt {request.source})" if request.source else ""
                raise RewardError(f"{exc}{where}") from None
        return out

    def close(self) -> None:
        if self._send_conn is not None:
            try:
                self._send_conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._kill()

    def __enter__(self) -> RewardExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
