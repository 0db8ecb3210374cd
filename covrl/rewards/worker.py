"""The reward worker process: ``python -m covrl.rewards.worker <read_fd> <write_fd>``.

Started by :class:`covrl.rewards.RewardExecutor`; it receives requests over one pipe and
answers over the other (see :func:`serve`). It imports only the scorers it is asked
for, never the training stack.
"""

from __future__ import annotations

import signal
import sys
from multiprocessing.connection import Connection

from covrl.rewards.registry import call_scorer, resolve_scorer


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the trainer dies, even while a scorer hangs."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(recv: Connection, send: Connection) -> None:
    """Worker loop: a list of specs -> import them, answer ``("ok",)``; a request ->
    ``("ok", reward, acc)``; errors -> ``("error", message)``; None or EOF -> exit."""
    # The trainer handles Ctrl-C and preemption signals (a batch system signals every
    # process of the job); this process ends when the trainer does (EOF, or SIGKILL).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()
    while True:
        try:
            request = recv.recv()
        except EOFError:
            return
        if request is None:
            return
        try:
            if isinstance(request, list):
                for spec in request:
                    resolve_scorer(spec)
                send.send(("ok",))
                continue
            value = call_scorer(
                request.spec,
                request.data_source,
                request.solution_str,
                request.ground_truth,
                request.extra_info,
            )
            send.send(("ok", value.reward, value.acc))
        except Exception as exc:  # noqa: BLE001 - reported to the trainer
            send.send(("error", str(exc)))


if __name__ == "__main__":
    serve(
        Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    )
