"""Run a test body in N processes with gloo on CPU and megatron-core parallel state.

Usage (the body must be a module-level function so child processes can import it)::

    def _body(ctx, n):
        # ctx.rank, ctx.world_size, ctx.tp, ctx.pp, ctx.dp; parallel_state is initialised
        ...
        return {"loss": loss}          # any picklable value; tensors are fine

    def test_something():
        results = launch(_body, world_size=2, tp=2, n=3)   # one entry per rank
        assert results[0]["loss"] == ...

Processes are forked from a forkserver that has already imported torch and
megatron-core, so a launch costs about a second instead of an import per process.
Still, a launch is not free: let one launch run many checks for one topology (return
a dict of results and assert on it in several tests through a module-scoped fixture).

Failures: an exception on any rank fails the launch with every failing rank's
traceback; a group that does not finish within ``timeout`` seconds is killed and the
launch fails naming the ranks that were still running. A body running many checks
passes them through :func:`run_checks`: a check that raises is recorded under its name
and the others still run; reading its result in the test raises an AssertionError that
names it and carries its traceback.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from covrl.parallel import free_port

_PRELOAD = ["torch", "torch.distributed", "megatron.core", "covrl.parallel"]
_ctx = None


def _mp_context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(_PRELOAD)
    return _ctx


# The layouts the model tests cover, as ``launch`` keyword arguments.
TOPOLOGIES: dict[str, dict] = {
    "tp1": dict(world_size=1),
    "tp2": dict(world_size=2, tp=2),
    "pp2": dict(world_size=2, pp=2),
    "dp2": dict(world_size=2),
    "tp2pp2": dict(world_size=4, tp=2, pp=2),
    "pp2vpp2": dict(world_size=2, pp=2, vpp=2),
}


@dataclass
class RankContext:
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    vpp: int | None


class DistributedTestError(AssertionError):
    """A rank raised, or the group hung."""


@dataclass
class CheckFailure:
    """A check of :func:`run_checks` that raised on this rank."""

    name: str
    traceback: str


class CheckResults(dict):
    """Results of named checks; reading a failed check raises an AssertionError naming
    it (with its traceback), so one bad check fails only the tests that read it."""

    def __getitem__(self, name):
        value = super().__getitem__(name)
        if isinstance(value, CheckFailure):
            raise AssertionError(f"check {value.name!r} raised on a rank:\n{value.traceback}")
        return value


def first_failure(per_rank: list[Mapping], name: str) -> CheckFailure | None:
    """The failure of check ``name`` on the first rank where it raised, if any."""
    for results in per_rank:
        value = dict.get(results, name) if isinstance(results, dict) else None
        if isinstance(value, CheckFailure):
            return value
    return None


def run_checks(checks: Mapping[str, Callable[[], Any]]) -> CheckResults:
    """Run each named check in order, recording an exception instead of stopping.

    For checks that fail alike on every rank (a wrong value, a rejected input); a check
    that raises on one rank inside a collective still leaves its peers waiting.
    """
    results = CheckResults()
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception:  # noqa: BLE001 - reported by name to the test that reads it
            results[name] = CheckFailure(name, traceback.format_exc())
    return results


def _worker(fn, rank, world_size, port, tp, pp, vpp, seed, device_separation, kwargs, queue):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        from covrl.parallel import ParallelConfig, destroy, initialize

        separation = contextlib.nullcontext()
        if device_separation:
            from tests.device_mode import DeviceSeparation

            separation = DeviceSeparation(test_code_on_device=True)
        # Entered before the parallel state: its mode replaces cpu_compat's.
        with separation:
            parallel = ParallelConfig(tp, pp, vpp)
            initialize(parallel, seed=seed)
            dp = parallel.data_parallel_size(world_size)
            ctx = RankContext(rank, world_size, tp, pp, dp, vpp)
            result = fn(ctx, **kwargs)
        if device_separation:
            separation.check()
        # Plain bytes: torch's own pickling of tensors through a Queue shares storage
        # by file descriptor, which dies with this process.
        buf = io.BytesIO()
        torch.save(_to_cpu(result), buf)
        queue.put((rank, "ok", buf.getvalue()))
        destroy()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent verbatim
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _to_cpu(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def launch(
    fn,
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    seed: int = 1234,
    timeout: float = 300.0,
    device_separation: bool | None = None,
    **kwargs,
) -> list[Any]:
    """Run ``fn(ctx, **kwargs)`` on ``world_size`` ranks; return the per-rank results.

    ``device_separation``: run ``fn`` under :class:`tests.device_mode.DeviceSeparation`
    (an emulated accelerator, the test body's own tensors on the device); a rank on
    which an op mixed host and device tensors, or a collective got a host tensor, fails
    naming the op and its call site. None (default): on for multi-rank launches, and
    for every launch when the environment sets ``COVRL_DEVICE_SEPARATION`` (``1``).
    """
    if device_separation is None:
        from tests.device_mode import enabled

        device_separation = world_size > 1 or enabled()
    ctx = _mp_context()
    queue = ctx.Queue()
    port = free_port()
    procs = []
    for rank in range(world_size):
        p = ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, tp, pp, vpp, seed, device_separation, kwargs, queue),
            # Not daemonic: ranks may start processes of their own (megatron-core's
            # checkpoint writer does); the finally-block below reaps every rank.
            daemon=False,
        )
        p.start()
        procs.append(p)

    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    clean = False
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                running = [r for r in range(world_size) if r not in results and r not in errors]
                raise DistributedTestError(
                    f"{fn.__name__} (world_size={world_size}, tp={tp}, pp={pp}) timed out "
                    f"after {timeout:.0f}s; ranks still running: {running}" + _format_errors(errors)
                )
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and r not in results and r not in errors
                ]
                # A rank that died without reporting (segfault, os._exit, OOM kill).
                for r in dead:
                    time.sleep(0.5)  # its message may still be in flight
                    if queue.empty():
                        errors[r] = f"process exited with code {procs[r].exitcode} without a result"
                # One failed rank usually leaves its peers blocked in a collective.
                if errors:
                    deadline = min(deadline, time.monotonic() + 10.0)
                continue
            if status == "ok":
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + 10.0)
        clean = not errors
    finally:
        for p in procs:
            p.join(timeout=10.0 if clean else 0.0)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise DistributedTestError(
            f"{fn.__name__} (world_size={world_size}, tp={tp}, pp={pp}) failed"
            + _format_errors(errors)
        )
    return [results[r] for r in range(world_size)]


def _format_errors(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
