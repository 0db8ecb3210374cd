"""Process groups as explicit arguments: the single-process scope, rank/size, all-reduce.

Functions that reduce a scope over the ranks holding it (a selection over the
data-parallel group, a softmax over the tensor-parallel group, mismatch metrics over
the data-parallel group, rewards and the preemption flag over the world) take that
group as a required argument. ``None`` is refused: in torch.distributed it means the
whole world, so a caller who forgot the group would otherwise silently get a per-rank
answer. A caller whose data is all in this process says so with
:data:`SINGLE_PROCESS`; the world is ``torch.distributed.group.WORLD``.

"No reduction" is therefore always :data:`SINGLE_PROCESS`, never ``None``. The few
arguments that may be ``None`` name a default, never "no group": a megatron group
argument (``tp_group`` / ``pp_group`` of :mod:`covrl.models.hf_weights`) defaults to
megatron's group of that kind, and torch-level helpers that take a ``group`` for
torch.distributed's own calls (a timeout, a gather of rows on every rank) default to
the world, as torch.distributed does.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
import torch.distributed as dist


class _SingleProcess:
    """The type of :data:`SINGLE_PROCESS` (one instance, survives pickling)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SINGLE_PROCESS"

    def __reduce__(self) -> str:
        return "SINGLE_PROCESS"


SINGLE_PROCESS = _SingleProcess()
"""The scope is this process's data alone: no collective runs."""

Group: TypeAlias = dist.ProcessGroup | _SingleProcess


def check_group(group: Group, name: str = "group") -> None:
    """Raise TypeError unless ``group`` is a process group or :data:`SINGLE_PROCESS`."""
    if group is SINGLE_PROCESS or isinstance(group, dist.ProcessGroup):
        return
    if group is None:
        raise TypeError(
            f"{name}=None is ambiguous: pass the process group the data is split over "
            "(e.g. the data-parallel group), or covrl.parallel.SINGLE_PROCESS when this "
            "process holds all of it"
        )
    raise TypeError(
        f"{name} must be a torch.distributed ProcessGroup or covrl.parallel.SINGLE_PROCESS, "
        f"got {type(group).__name__}"
    )


def rank_and_size(group: Group, name: str = "group") -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size (``(0, 1)`` for
    :data:`SINGLE_PROCESS`)."""
    check_group(group, name)
    if group is SINGLE_PROCESS:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(
    t: torch.Tensor, group: Group, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group`` (nothing for :data:`SINGLE_PROCESS`);
    returns ``t``. On GPU clusters the group is NCCL: ``t`` must be on the device."""
    check_group(group)
    if group is not SINGLE_PROCESS:
        dist.all_reduce(t, op=op, group=group)
    return t
