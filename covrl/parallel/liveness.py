"""Liveness: a dead rank or node makes every process of the job exit, fast and non-zero.

A process-group timeout alone does not give that. On gloo, a rank whose *node* died
(no TCP reset reaches the peers) leaves the others blocked in the next collective, or
in ``connectFullMesh`` during set-up, for the whole group timeout (30 minutes by
default); NCCL behaves the same way without its own watchdog. A collective timeout
short enough to catch dead peers would also kill jobs where one rank legitimately
works alone for a while (a checkpoint export, an evaluation).

So each rank runs a heartbeat thread over the job's rendezvous store (the TCPStore at
``MASTER_ADDR:MASTER_PORT`` that torchrun's agent or rank 0 hosts; its own client
connection, independent of the process groups, so it works the same on gloo and NCCL):

- every ``interval_s`` it increments its counter ``hb/<rank>``;
- it watches one peer, the next rank that has not finished (``rank + 1``, cyclically:
  any set of dead ranks, short of all, has a live predecessor that watches one of
  them); a counter that stays unchanged for ``dead_after_s`` (or is still 0
  ``join_timeout_s`` after start: the rank never joined) makes the watcher publish
  ``abort`` with the reason;
- it polls ``abort``: once set, every rank prints the reason and exits;
- a store that does not answer for ``dead_after_s`` (its host died or froze; a
  watchdog thread times the heartbeat's requests, which have no timeout of their own)
  is fatal as well.

When the job is lost (a dead peer, an abort, a lost store) under torchrun, the worker
also SIGKILLs its agent: the agents' rendezvous store is hosted by one of the agents,
not necessarily on this rank's node, and its requests have no reply timeout, so with a
frozen store host the agent would stay blocked after its workers exited (measured:
> 100 s, ``read_timeout`` or not).

Store traffic is three small requests per rank per interval, independent of the world
size. The heartbeat is a Python thread: a rank whose main thread holds the GIL for
``dead_after_s`` (a long C call that does not release it) looks dead to its watcher;
raise ``dead_after_s`` for such code. Exiting means: one line on stderr naming this rank and the cause, every child
process of this rank killed (checkpoint writers, vLLM workers), then
``os._exit(PEER_LOST_EXIT_CODE)`` from the heartbeat thread, which works while the main
thread is blocked inside a collective (collectives and store waits release the GIL).

A rank that finishes normally (``stop``, called by ``covrl.parallel.destroy`` and at
interpreter exit) marks ``done/<rank>`` and is no longer watched; where rank 0 hosts
the store (no torchrun agent), its ``stop`` waits (at most ``dead_after_s``) for the
others to be done, so that the store does not vanish under them. A rank that ends with
an uncaught exception publishes ``abort`` first, so its peers do not wait for it.

Keys live under ``covrl/liveness/<restart>/<generation>/``: torchrun's restart count
(its agent store outlives restarts) and the number of times this process started a
monitor (every rank starts the same number).
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

# EX_TEMPFAIL: the job failed because of another process; rerunning it may succeed.
PEER_LOST_EXIT_CODE = 75

_ABORT_KEY = "abort"


@dataclass(frozen=True)
class LivenessConfig:
    """Heartbeat timing (seconds). A dead peer is noticed after at most
    ``dead_after_s + interval_s`` and every rank exits one ``interval_s`` later."""

    interval_s: float = 2.0
    dead_after_s: float = 20.0
    # A rank whose first heartbeat has not arrived this long after start never joined.
    join_timeout_s: float = 45.0

    def __post_init__(self) -> None:
        if not 0 < self.interval_s < self.dead_after_s:
            raise ValueError(
                f"liveness interval_s={self.interval_s} must be > 0 and below "
                f"dead_after_s={self.dead_after_s}"
            )
        if self.join_timeout_s < self.dead_after_s:
            raise ValueError(
                f"liveness join_timeout_s={self.join_timeout_s} must be >= "
                f"dead_after_s={self.dead_after_s}"
            )


def _kill_descendants() -> None:
    """Kill every process below this one (they would outlive ``os._exit``)."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - best effort on the way out
        return
    for child in children:
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass


def _kill_torchrun_agent() -> None:
    """SIGKILL this worker's torchrun agent (its parent). Used when the job is lost: the
    agent's rendezvous store may live on the dead or frozen node, and its requests have
    no reply timeout, so the agent would block for good after its workers exit."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        cmdline = " ".join(parent.cmdline())
        if "torch.distributed.run" in cmdline or "torchrun" in cmdline:
            parent.kill()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def exit_now(message: str, code: int = PEER_LOST_EXIT_CODE, *, kill_agent: bool = True) -> None:
    """Print ``message`` as one line on stderr, kill this rank's child processes (and,
    with ``kill_agent``, its torchrun agent) and exit at once with ``code`` (no cleanup
    handlers: the main thread may be blocked)."""
    rank = os.environ.get("RANK", "0")
    try:
        sys.stderr.write(f"covrl: [rank {rank}] {' '.join(message.split())}; exiting ({code})\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed stderr must not keep us alive
        pass
    _kill_descendants()
    if kill_agent:
        _kill_torchrun_agent()
    os._exit(code)


def _rank0_hosts_store() -> bool:
    """Whether rank 0 hosts the rendezvous store (plain env:// without torchrun's agent)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


class LivenessMonitor:
    """The heartbeat thread of one rank (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        config: LivenessConfig,
        namespace: str,
    ):
        self.host, self.port = host, port
        self.rank, self.world_size = rank, world_size
        self.config = config
        self.namespace = namespace
        self._stop = threading.Event()
        self._store: dist.Store | None = None
        self._connected = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"covrl-liveness-{rank}", daemon=True
        )
        # Store requests have no reply timeout of their own (a frozen host would block
        # the heartbeat forever): a second thread watches the heartbeat's progress.
        self._progress = time.monotonic()
        self._watchdog = threading.Thread(
            target=self._watch, name=f"covrl-liveness-watchdog-{rank}", daemon=True
        )

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def stop(self) -> None:
        """This rank finished normally: the heartbeat thread marks it done and ends."""
        if self._stop.is_set():
            return
        self._stop.set()
        # Bounded: with a frozen store the thread stays blocked (a daemon, it dies with us).
        self._thread.join(timeout=self.config.dead_after_s + 2 * self.config.interval_s)

    def _mark_done(self, store: dist.Store) -> None:
        try:
            store.set(f"done/{self.rank}", "1")
            if self.rank == 0 and _rank0_hosts_store():
                # Keep the store up until the others are done too (or dead_after_s):
                # their heartbeat would read its disappearance as this node's death.
                others = [f"done/{r}" for r in range(1, self.world_size)]
                deadline = time.monotonic() + self.config.dead_after_s
                while not store.check(others) and time.monotonic() < deadline:
                    time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the peers may be gone already
            pass

    def abort(self, reason: str) -> None:
        """Make every rank exit with ``reason`` (this one included, within an interval)."""
        self._connected.wait(timeout=self.config.dead_after_s)
        if self._store is None:
            exit_now(reason, 1, kill_agent=False)
        try:
            self._store.set(_ABORT_KEY, f"rank {self.rank}: {reason}")
        except Exception:  # noqa: BLE001 - no store: at least this rank goes
            exit_now(reason, 1, kill_agent=False)

    # ------------------------------------------------------------------ thread
    def _connect(self) -> dist.Store:
        timeout = datetime.timedelta(seconds=self.config.join_timeout_s)
        try:
            client = dist.TCPStore(
                self.host, self.port, is_master=False, timeout=timeout, wait_for_workers=False
            )
        except Exception as exc:  # noqa: BLE001
            exit_now(
                f"cannot reach the rendezvous store at {self.host}:{self.port} within "
                f"{self.config.join_timeout_s:.0f} s ({type(exc).__name__}: {exc})"
            )
        # Later requests must fail fast when the store's host dies.
        client.set_timeout(datetime.timedelta(seconds=self.config.dead_after_s))
        return dist.PrefixStore(self.namespace, client)

    def _next_watched(self, store: dist.Store, current: int) -> int | None:
        """The first rank after ``current - 1`` (cyclically, not this one) not done."""
        for step in range(self.world_size - 1):
            peer = (current + step) % self.world_size
            if peer == self.rank:
                peer = (peer + 1) % self.world_size
            if not store.check([f"done/{peer}"]):
                return peer
        return None

    def _run(self) -> None:
        cfg = self.config
        store = self._connect()
        self._store = store
        self._progress = time.monotonic()
        self._connected.set()
        # Without torchrun's agent, rank 0 hosts the store: once it has finished, losing
        # the store is the end of the job, not a failure.
        host_is_rank0 = _rank0_hosts_store()
        host_done = False
        start = time.monotonic()
        watched = (self.rank + 1) % self.world_size
        last_value, last_change = 0, start
        while not self._stop.is_set():
            try:
                store.add(f"hb/{self.rank}", 1)
                if host_is_rank0 and self.rank != 0:
                    host_done = host_done or store.check(["done/0"])
                if store.check([_ABORT_KEY]):
                    reason = store.get(_ABORT_KEY).decode(errors="replace")
                    exit_now(f"job aborted by {reason}")
                peer = self._next_watched(store, watched)
                if peer is None:  # everyone else finished
                    self._progress = time.monotonic()
                    self._stop.wait(cfg.interval_s)
                    continue
                if peer != watched:
                    watched, last_value, last_change = peer, 0, time.monotonic()
                value = store.add(f"hb/{peer}", 0)  # read without blocking
                now = time.monotonic()
                if value != last_value:
                    last_value, last_change = value, now
                elif value == 0 and now - start > cfg.join_timeout_s:
                    self._declare_dead(
                        store, f"rank {peer} did not join within {cfg.join_timeout_s:.0f} s"
                    )
                elif value > 0 and now - last_change > cfg.dead_after_s:
                    self._declare_dead(
                        store,
                        f"rank {peer} is dead or stalled: no heartbeat for "
                        f"{now - last_change:.0f} s",
                    )
            except Exception as exc:  # noqa: BLE001 - the store is the job's lifeline
                if self._stop.is_set() or host_done:
                    return
                exit_now(
                    f"lost the rendezvous store at {self.host}:{self.port} "
                    f"({type(exc).__name__}: {exc})",
                )
            self._progress = time.monotonic()
            self._stop.wait(cfg.interval_s)
        self._mark_done(store)

    def _watch(self) -> None:
        cfg = self.config
        tick = time.monotonic()
        while not self._stop.wait(cfg.interval_s):
            now = time.monotonic()
            starved, tick = now - tick > 2 * cfg.interval_s, now
            if starved:  # this thread did not run either (the GIL was held): not the store
                self._progress = max(self._progress, now - cfg.interval_s)
            if not self._connected.is_set():
                continue  # connecting: bounded by the store's own connect timeout
            stalled = now - self._progress
            if stalled > cfg.dead_after_s and not self._stop.is_set():
                exit_now(
                    f"lost the rendezvous store at {self.host}:{self.port} (no reply for "
                    f"{stalled:.0f} s)",
                )

    def _declare_dead(self, store: dist.Store, reason: str) -> None:
        try:
            store.set(_ABORT_KEY, f"rank {self.rank}: {reason}")
        finally:
            exit_now(reason)


# ---------------------------------------------------------------------------- process-wide
_monitor: LivenessMonitor | None = None
_generation = 0
_hooks_installed = False


def _excepthook(exc_type, exc, tb) -> None:
    if _monitor is not None and not issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
        _original_excepthook(exc_type, exc, tb)
        try:
            _monitor._store.set(  # type: ignore[union-attr]
                _ABORT_KEY,
                f"rank {_monitor.rank}: uncaught {exc_type.__name__}: {' '.join(str(exc).split())}",
            )
        except Exception:  # noqa: BLE001
            pass
        return
    _original_excepthook(exc_type, exc, tb)


_original_excepthook = sys.excepthook


def start(config: LivenessConfig, rank: int, world_size: int) -> LivenessMonitor | None:
    """Start this process's monitor (replacing a previous one) for a job rendezvousing
    at ``MASTER_ADDR:MASTER_PORT``. No monitor for a single process."""
    global _monitor, _generation, _hooks_installed
    stop()
    _generation += 1
    if world_size < 2:
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _monitor = LivenessMonitor(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        rank,
        world_size,
        config,
        namespace=f"covrl/liveness/{restart}/{_generation}",
    )
    if not _hooks_installed:
        atexit.register(stop)
        sys.excepthook = _excepthook
        _hooks_installed = True
    _monitor.start()
    return _monitor


def stop() -> None:
    """Mark this rank done and stop its monitor (no-op without one)."""
    global _monitor
    if _monitor is not None:
        monitor, _monitor = _monitor, None
        monitor.stop()


def abort(reason: str) -> None:
    """Make every rank of the job exit non-zero, printing ``reason`` (use when this rank
    failed where its peers may be waiting in a collective). Without a monitor (single
    process or liveness off) this process exits with code 1."""
    if _monitor is None:
        exit_now(reason, 1, kill_agent=False)
    _monitor.abort(reason)


def monitor() -> LivenessMonitor | None:
    """This process's running monitor, if any."""
    return _monitor
