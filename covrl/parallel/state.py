"""The one entry point for devices, backends and megatron-core parallel state.

Every part of covrl that needs a device, a process group or the TP/PP/DP layout goes
through this module. Launch with ``torchrun`` (or ``srun`` + torchrun): the rendezvous
comes from the standard ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
environment. On CPU-only machines the backend is gloo and the shims of
:mod:`covrl.parallel.cpu_compat` are applied before megatron-core is used.

Rank layout is megatron-core's default order ``tp-cp-ep-dp-pp``: tensor-parallel
ranks are adjacent, pipeline stages are the slowest-varying dimension.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from covrl.parallel import cpu_compat, liveness
from covrl.utils.errors import check_field


@dataclass
class ParallelConfig:
    """Model-parallel layout. The data-parallel size is derived: ``world / (tp * pp)``."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Model chunks per pipeline stage for the interleaved schedule (None: not interleaved).
    virtual_pipeline_model_parallel_size: int | None = None

    def __post_init__(self) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        vpp = self.virtual_pipeline_model_parallel_size
        check_field(tp >= 1, "tensor_model_parallel_size", tp, "an integer >= 1")
        check_field(pp >= 1, "pipeline_model_parallel_size", pp, "an integer >= 1")
        if vpp is not None:
            check_field(
                vpp >= 1 and pp >= 2,
                "virtual_pipeline_model_parallel_size",
                vpp,
                f"None, or an integer >= 1 with pipeline_model_parallel_size >= 2 (got {pp})",
            )

    def data_parallel_size(self, world_size: int) -> int:
        """``world_size / (tp * pp)``; raises ``ValueError`` unless it divides evenly."""
        self.check_world_size(world_size)
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` unless ``tp * pp`` divides ``world_size``."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if world_size % (tp * pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}"
            )


def get_device() -> torch.device:
    """The device this rank computes on: its local CUDA device, or the CPU (``cuda:0``
    while :func:`covrl.parallel.cpu_compat.emulate_cuda_device` is on)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if cpu_compat.emulates_cuda_device():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def get_backend() -> str:
    """torch.distributed backend: nccl with CUDA, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass(frozen=True)
class DistributedTimeouts:
    """How long a job waits before it gives up (seconds).

    ``setup_s`` bounds the rendezvous and process-group creation (a rank that has not
    joined by then fails the job); ``collective_s`` bounds one collective afterwards
    (every process group: the default one and megatron's), i.e. how long a rank may
    work alone while the others wait (an export, an evaluation). A *dead* rank or node
    is found much sooner by the heartbeat (:mod:`covrl.parallel.liveness`): no
    heartbeat for ``dead_after_s`` and every process exits with
    ``PEER_LOST_EXIT_CODE`` within about ``dead_after_s + 2 * heartbeat_interval_s``.
    ``liveness=False`` turns the heartbeat off (only the timeouts remain).
    """

    setup_s: float = 45.0
    collective_s: float = 600.0
    heartbeat_interval_s: float = 2.0
    dead_after_s: float = 20.0
    liveness: bool = True

    def __post_init__(self) -> None:
        check_field(self.setup_s > 0, "setup_s", self.setup_s, "a value > 0")
        check_field(self.collective_s > 0, "collective_s", self.collective_s, "a value > 0")
        self.liveness_config()  # checks the heartbeat's timing

    def liveness_config(self) -> liveness.LivenessConfig:
        return liveness.LivenessConfig(
            interval_s=self.heartbeat_interval_s,
            dead_after_s=self.dead_after_s,
            # Just under the set-up timeout, so that a missing rank is reported by
            # name rather than by the process group's timeout error.
            join_timeout_s=max(self.setup_s - 2 * self.heartbeat_interval_s, self.dead_after_s),
        )


def init_process_group(
    timeout_minutes: float | None = None, *, timeouts: DistributedTimeouts | None = None
) -> None:
    """Initialise torch.distributed from the torchrun environment (idempotent).

    Without a launcher (no ``WORLD_SIZE``) a single-process group on a free local port
    is created, so scripts and tools also run as plain ``python``. The group is
    created with ``timeouts.setup_s`` as its timeout, then switched to
    ``timeouts.collective_s``; the heartbeat starts before the rendezvous, so a rank
    that never arrives is reported after ``setup_s``. ``timeout_minutes`` (older
    callers) sets both timeouts.
    """
    if dist.is_initialized():
        return
    timeouts = timeouts or DistributedTimeouts()
    if timeout_minutes is not None:
        seconds = 60.0 * timeout_minutes
        timeouts = dataclasses.replace(timeouts, setup_s=seconds, collective_s=seconds)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if timeouts.liveness:
        liveness.start(timeouts.liveness_config(), rank, world)
    dist.init_process_group(
        backend=get_backend(), timeout=datetime.timedelta(seconds=timeouts.setup_s)
    )
    set_collective_timeout(timeouts.collective_s)


def set_collective_timeout(seconds: float, group: dist.ProcessGroup | None = None) -> None:
    """Change the timeout of ``group``'s collectives (default: the default group)."""
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)


def initialize(
    parallel: ParallelConfig | None = None,
    *,
    seed: int = 1234,
    timeouts: DistributedTimeouts | None = None,
) -> None:
    """Initialise torch.distributed, the CPU shims and megatron-core's parallel state.

    Args:
        parallel: the TP/PP/VPP layout (default: all 1, pure data parallel).
        seed: base seed. Every rank gets ``seed`` for its default generator (the same
            across TP ranks, as megatron requires for identical dropout outside
            TP regions) and megatron's tracker gets its TP-rank offset streams.
        timeouts: set-up and collective timeouts and the heartbeat (default:
            :class:`DistributedTimeouts`). megatron's groups get ``collective_s``.
    """
    from megatron.core import parallel_state, tensor_parallel

    parallel = parallel or ParallelConfig()
    timeouts = timeouts or DistributedTimeouts()
    init_process_group(timeouts=timeouts)
    parallel.check_world_size(dist.get_world_size())
    cpu_compat.apply()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        # A float is fine: megatron builds timedelta(minutes=...).
        distributed_timeout_minutes=timeouts.collective_s / 60.0,
        # On CPU the main groups are already gloo; skip the duplicate gloo groups.
        create_gloo_process_groups=torch.cuda.is_available(),
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # The tracker seeding above leaves the default generator where it was on CPU.
    torch.manual_seed(seed)


def destroy() -> None:
    """Stop the heartbeat (this rank is done), tear down megatron-core's parallel state
    and the default process group."""
    from megatron.core import parallel_state

    # First: this rank is done (rank 0 may host the store the heartbeat uses).
    liveness.stop()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """An unused TCP port on the loopback interface (for a local rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
