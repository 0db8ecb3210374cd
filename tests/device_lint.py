"""On CPU, check that every collective gets tensors on the device NCCL would need on GPU.

On a GPU cluster megatron's process groups are NCCL, and NCCL only accepts CUDA
tensors; on this CPU machine every group is gloo and every tensor is on the CPU, so a
collective on a tensor that a GPU run would have left on the host (``torch.zeros(n)``
without ``device=``, a ``.cpu()`` copy) passes here and fails on the first CUDA step.

:class:`DeviceLint` tells the two kinds of CPU tensor apart by where they come from.
A torch function mode marks as *host* tensors every tensor made by a factory
(``torch.zeros``, ``torch.tensor``, ``torch.arange`` ...) without a ``device``
argument, and every ``.cpu()`` result; an op whose tensor inputs are all host
tensors gives host tensors; ``.to(device)``, ``.cuda()`` and factories given a device
give *device* tensors, and so does every tensor made before the lint started (model
parameters, the caller's batch before the code under test moves it). Each
``ProcessGroup`` collective (all-reduce, all-gather, broadcast, reduce-scatter,
send/recv ...) then records a violation, with the calling code's location, when it gets
a host tensor. Object collectives (``broadcast_object_list`` ...) are exempt: torch
moves their bytes to the group's device itself.

An explicit ``device="cpu"`` counts as a device (on CPU it cannot be told apart from
``device=x.device``); megatron's separate gloo groups, which want CPU tensors, do not
exist on CPU (``create_gloo_process_groups`` is off there).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_leaves

# Where a tensor would live on GPU: an attribute on the tensor; absent means device.
_WHERE = "_device_lint_where"
HOST, NEUTRAL = "host", "neutral"

_LINT_FILES = ("device_lint.py", "cpu_compat.py")

# ProcessGroup methods that move tensors (torch.distributed's functions all end in one).
_COLLECTIVES = (
    "allreduce",
    "allreduce_coalesced",
    "allgather",
    "_allgather_base",
    "allgather_coalesced",
    "allgather_into_tensor_coalesced",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "_reduce_scatter_base",
    "reduce_scatter_tensor_coalesced",
    "alltoall",
    "alltoall_base",
    "gather",
    "scatter",
    "send",
    "recv",
    "recv_anysource",
)
_OBJECT_COLLECTIVES = (
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
)


def _where(t: torch.Tensor) -> str | None:
    return getattr(t, _WHERE, None)


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and _where(t) == HOST


def _mark(out, where: str | None) -> None:
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            setattr(t, _WHERE, where)


def _gives_device(args, kwargs) -> bool:
    """``Tensor.to(...)`` arguments that name a device."""
    if kwargs.get("device") is not None:
        return True
    return any(
        isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool))
        for a in args[1:]
    )


# Ops that accept host and device tensors together on GPU.
_MIXING_ALLOWED = {
    torch.Tensor.__getitem__,
    torch.Tensor.__setitem__,
    torch.Tensor.copy_,
    torch.Tensor.to,
}


class _ProvenanceMode(TorchFunctionMode):
    """Marks tensors host / device / neutral as the module docstring describes, and
    records ops that mix a host tensor of more than one element with device tensors
    (CUDA rejects those; a host scalar is fine)."""

    def __init__(self, test_data_on_device: bool):
        super().__init__()
        self.factories = _device_constructors()
        self.test_data_on_device = test_data_on_device
        self.mixed: list[str] = []

    def _combine(self, func, inputs: list[torch.Tensor]) -> str | None:
        places = [_where(t) for t in inputs]
        if all(p == NEUTRAL for p in places):
            return NEUTRAL
        if all(p in (HOST, NEUTRAL) for p in places):
            return HOST
        host = [t for t in inputs if _where(t) == HOST and t.dim() > 0]
        if host and func not in _MIXING_ALLOWED:
            name = getattr(func, "__qualname__", repr(func))
            self.mixed.append(
                f"{name} mixes a host tensor {tuple(host[0].shape)} with device tensors "
                f"at\n{_caller()}"
            )
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, (torch.Tensor, tuple, list)):
            return out
        moves = func is torch.Tensor.cuda or (
            func is torch.Tensor.to and _gives_device(args, kwargs)
        )
        if func in (torch.Tensor.cpu, torch.Tensor.pin_memory) or moves:
            if out is args[0]:
                # On CPU the move returns its input; on GPU it would be a new tensor,
                # and the input stays where it was.
                out = out.view_as(out)
            _mark(out, None if moves else HOST)
        elif func in self.factories and "device" in kwargs and kwargs["device"] is not None:
            # device=x.device follows x, which cannot be told on CPU: compatible with both.
            _mark(out, NEUTRAL)
        else:
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if inputs:
                where = self._combine(func, inputs)
                if not (args and out is args[0]):  # in place: the tensor stays put
                    _mark(out, where)
            elif func in self.factories and not (self.test_data_on_device and _made_by_test_code()):
                _mark(out, HOST)
        return out


@dataclass
class Violation:
    collective: str
    tensor: str
    where: str

    def __str__(self) -> str:
        return f"{self.collective} got a host tensor {self.tensor} at\n{self.where}"


def _made_by_test_code() -> bool:
    """Whether the innermost frame outside torch and the lint is a test module's."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and not name.endswith(_LINT_FILES):
            return f"{os.sep}tests{os.sep}" in name
        frame = frame.f_back
    return False


def _caller() -> str:
    """The innermost frames outside torch, where the collective was asked for."""
    frames = [
        f
        for f in traceback.extract_stack()[:-3]
        if "/torch/" not in f.filename and not f.filename.endswith(_LINT_FILES)
    ]
    return "".join(traceback.format_list(frames[-3:]))


class DeviceLint:
    """Context manager: collect :class:`Violation` s in ``violations`` (this thread).

    ``check()`` raises AssertionError listing them (each call site once).
    ``test_data_on_device``: tensors made by factories called from a ``tests/`` module
    count as device tensors: a test body stands for the caller whose data a GPU run
    holds on the device (the harness uses this; covrl's own factories stay checked).
    """

    def __init__(self, *, test_data_on_device: bool = False):
        self.violations: list[Violation] = []
        self._mode = _ProvenanceMode(test_data_on_device)
        self._saved: dict[tuple[object, str], object] = {}
        self._exempt = threading.local()

    def _wrap_collective(self, name: str, original):
        @functools.wraps(original)
        def checked(group, *args, **kwargs):
            if not getattr(self._exempt, "on", False):
                for t in tree_leaves((args, kwargs)):
                    if _is_host(t):
                        self.violations.append(
                            Violation(
                                f"ProcessGroup.{name}",
                                f"{tuple(t.shape)} {t.dtype}",
                                _caller(),
                            )
                        )
            return original(group, *args, **kwargs)

        return checked

    def _wrap_object_collective(self, original):
        @functools.wraps(original)
        def exempt(*args, **kwargs):
            self._exempt.on = True
            try:
                return original(*args, **kwargs)
            finally:
                self._exempt.on = False

        return exempt

    def _patch(self, owner, name: str, replacement) -> None:
        self._saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, replacement)

    def __enter__(self) -> DeviceLint:
        for name in _COLLECTIVES:
            self._patch(
                dist.ProcessGroup,
                name,
                self._wrap_collective(name, getattr(dist.ProcessGroup, name)),
            )
        c10d = dist.distributed_c10d
        for name in _OBJECT_COLLECTIVES:
            wrapped = self._wrap_object_collective(getattr(c10d, name))
            self._patch(c10d, name, wrapped)
            self._patch(dist, name, wrapped)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved.clear()

    def check(self) -> None:
        mixed = sorted(set(self._mode.mixed))
        if mixed:
            raise AssertionError("\n".join(mixed))
        unique = {(v.collective, v.where): v for v in self.violations}
        if unique:
            raise AssertionError(
                f"{len(unique)} collective call site(s) got host tensors (NCCL on GPU "
                "needs them on the CUDA device):\n" + "\n".join(str(v) for v in unique.values())
            )
