"""Device separation on CPU: run covrl as if it had an accelerator, and report every
place where a GPU run would mix host and device tensors.

On a GPU cluster a tensor lives either on the host or on the CUDA device; an op that
mixes a host tensor with device tensors, or an NCCL collective given a host tensor,
fails at its first execution. On this CPU machine every tensor is on the CPU, so such
code passes every test. :class:`DeviceSeparation` emulates the accelerator:

* ``covrl.parallel.get_device()`` returns ``cuda:0``, and every tensor carries a tag,
  *device* or *host*, for where a GPU run would hold it (an attribute on the tensor;
  untagged tensors, e.g. the gradients autograd's C++ engine makes, are unknown and
  never flagged). One torch function mode, a ``cpu_compat.CudaToCpuMode`` that also
  tags, sees every torch call (``cpu_compat.apply()`` pushes no second rewriting mode
  while it is active).
* Tags: a factory given a CUDA device (``"cuda"``, ``cuda:N``, an int ordinal) makes a
  device tensor, as do ``.to(<cuda>)`` and ``.cuda()``; a factory without a device
  (``torch.zeros(n)``, ``torch.tensor(list)``, ``torch.arange``), ``from_numpy``,
  ``.cpu()`` and ``.to("cpu")`` make host tensors; ``.to(other)`` and
  ``.type_as(other)`` follow ``other``; ``*_like``, ``new_*`` and ``torch.tensor(t)``
  follow their input unless given a device; every other op's outputs take the tag of
  its tensor inputs (device if any input is on the device), an in-place op leaves its
  target's tag, ``nn.Parameter(data)`` takes the tag of ``data`` and ``p.data = x``
  gives ``p`` the tag of ``x`` (so ``module.cuda()`` moves a module's parameters).
  Reading ``.device`` of a device tensor answers ``cuda:0``, so
  ``torch.zeros(n, device=x.device)`` follows ``x``'s real place (torch.distributed's
  own reads still see the CPU: it picks the group's backend by the device).
  ``.is_cuda`` stays the real (False): megatron picks CUDA-only APIs with it.
* Flagged (:class:`Violation`): (a) ``mix``: an op given a device tensor and a host
  tensor of one or more dimensions (0-dim host tensors and Python numbers are fine,
  as CUDA allows CPU scalars; so are ``copy_``, indexing a device tensor with host
  indices, and metadata checks); (b) ``collective``: a ``ProcessGroup`` collective
  given a host tensor. Every group counts as a device group (NCCL on GPU: megatron's
  groups and the default group), except groups created with an explicit gloo backend;
  object collectives (``broadcast_object_list`` ...) are exempt: torch moves their
  bytes itself. ``torch.distributed.get_backend`` answers ``nccl`` for device groups
  to the project's callers, so code choosing its communication device sees what a GPU
  run sees.
* Counted, not flagged (:class:`HostSync`): every host sync on a device tensor:
  ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()`` / ``.to("cpu")``, a copy into a
  host tensor, ``bool(t)`` (``if t``), ``float(t)``, ``int(t)``, ``t.__index__``,
  formatting, ``torch.equal`` / ``allclose``, and the ops whose output size depends on
  the data (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing and
  assignment), per training step (:meth:`DeviceSeparation.step`).

Each finding names the op and its call site: the innermost frame outside torch,
megatron-core and this mode (``covrl/training/steps.py:45``), the frame that called
that function, and the innermost frame outside torch when that is megatron's own code.

Not checked, and why:

* vLLM's internals (``vllm.LLM`` construction, ``generate``, sleep / wake-up, cache
  resets): on GPU vLLM manages its own devices, and its outputs reach covrl as Python
  lists (host data, correct on GPU too). The mode is paused there: a plain
  ``CudaToCpuMode`` takes its place (vLLM's compiled sampler helpers cannot trace a
  tagging mode). A weight reload (``collective_rpc("reload_weights")``) is paused
  too, except while covrl's weight stream produces the next tensor, so the export
  (gathers over the TP / PP groups) is checked; covrl code that vLLM runs inside its
  worker (``collective_rpc(fn)``) is not.
* Code in ``tests/`` when ``test_code_on_device`` is set (the harness's setting): a
  test body stands for the caller that holds its data on the device, so its factories
  make device tensors, and its own comparisons with host references are not flagged
  (an explicit ``device="cpu"`` still makes a host tensor).
* Tensors made outside torch's Python API (autograd's gradients, ``torch.load``) are
  untagged; megatron's CPU path builds its tensor-parallel weights on the host
  (``use_cpu_initialization``, where a GPU run builds them on the device), which the
  mode follows: ``build_model`` then moves the chunks, as on GPU.
* Other threads: the mode is thread-local (the training thread's), while
  ``get_device()`` answers ``cuda:0`` on every thread; covrl runs no torch code on
  other threads.

CUDA sleep mode: vLLM has none on CPU, so a rollout on released weights never fails
here. Under the mode, ``covrl.rollout.RolloutEngine.sleep()`` (with
``rollout.enable_sleep_mode``) marks the engine's vLLM weights as released, as
sleep level 2 does on CUDA (``RolloutEngine.weights_released`` then says so); a
weight reload restores them, and vLLM's ``generate`` on released weights raises
(:data:`RELEASED_WEIGHTS_ERROR`).

Use: ``with DeviceSeparation() as mode: ...; mode.check()`` (raises AssertionError
listing the violations); ``tests.harness.launch`` runs bodies under it; the trainer
CLI runs under it with ``COVRL_DEVICE_SEPARATION=1`` or ``report``
(:func:`run_cli`): a JSON report per rank in ``<run_dir>/device_separation/``
(violations, host syncs per step), a summary on stderr, and with ``1`` exit code 3
when anything was flagged (with ``report`` the run's own exit code: the test reads
the reports, :func:`assert_no_violations`). The CLI imports this module from the
source checkout (tests/ is not installed): the mode is a test instrument (it patches
torch.distributed, ``nn.Parameter`` and vLLM), not part of the package.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from types import FunctionType

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._device import _device_constructors

from covrl.parallel import cpu_compat
from covrl.parallel.cpu_compat import ACCELERATOR, CudaToCpuMode

DEVICE, HOST = "device", "host"
ENV = "COVRL_DEVICE_SEPARATION"
REPORT_DIRNAME = "device_separation"
# Exit code of a CLI run under the mode that finished with violations.
VIOLATION_EXIT_CODE = 3
RELEASED_WEIGHTS_ERROR = "generate() on released vLLM weights"

_TAG = "_covrl_place"
# On a vllm.LLM: its weights were released by an emulated sleep (level 2).
_RELEASED = "_covrl_weights_released"
_CUDA = torch.device("cuda", 0)
REPO = Path(__file__).resolve().parents[1]
_TESTS_DIR = str(REPO / "tests") + os.sep


def _package_dir(name: str) -> str:
    spec = find_spec(name)
    return (list(spec.submodule_search_locations)[0] + os.sep) if spec else "\0"


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_DISTRIBUTED_DIR = _TORCH_DIR + "distributed" + os.sep
_MEGATRON_DIR = _package_dir("megatron")
_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep
_SELF_FILES = (os.path.abspath(__file__), os.path.abspath(cpu_compat.__file__))

# ---------------------------------------------------------------------------- tags


def place(t: Tensor) -> str | None:
    """Where a GPU run would hold ``t``: DEVICE, HOST or None (unknown)."""
    return getattr(t, _TAG, None)


def _set(t: Tensor, where: str | None) -> None:
    if where is not None:
        setattr(t, _TAG, where)


def _place_of_device(device) -> str | None:
    """DEVICE for a CUDA device spec (or an int ordinal, or ``cpu:0``: what megatron's
    ``torch.cuda.current_device()`` answers on CPU, see covrl.parallel.cpu_compat),
    HOST for the CPU."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return DEVICE
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        return DEVICE if device == ACCELERATOR or device.type == "cuda" else HOST
    return None


def _tensors(args, kwargs) -> list[Tensor]:
    """Tensor arguments, one level into lists and tuples (torch.cat, collectives)."""
    found = []
    for seq in (args, kwargs.values()):
        for a in seq:
            if isinstance(a, Tensor):
                found.append(a)
            elif type(a) in (list, tuple):
                for b in a:
                    if isinstance(b, Tensor):
                        found.append(b)
                    elif type(b) in (list, tuple):
                        found.extend(c for c in b if isinstance(c, Tensor))
    return found


# ---------------------------------------------------------------------------- findings


@dataclass
class Violation:
    """An op or collective a GPU run would reject."""

    kind: str  # "mix" | "collective"
    op: str
    detail: str
    site: str  # innermost frame outside torch, megatron and the mode
    origin: str  # innermost frame outside torch (megatron's line), "" if the same
    via: str  # the frame that called ``site``'s function (outside torch and megatron)
    count: int = 1

    def __str__(self) -> str:
        where = self.site + (f" (in {self.origin})" if self.origin else "")
        where += f", called from {self.via}" if self.via else ""
        times = f" [x{self.count}]" if self.count > 1 else ""
        return f"{self.kind}: {self.op} {self.detail} at {where}{times}"


@dataclass(frozen=True)
class HostSync:
    """A device-to-host synchronisation: ``kind`` (``item``, ``tolist``, ``bool`` ...)."""

    kind: str
    site: str
    origin: str


def _short(filename: str, lineno: int) -> str:
    path = os.path.abspath(filename)
    if path.startswith(str(REPO) + os.sep):
        path = os.path.relpath(path, REPO)
    elif "site-packages" + os.sep in path:
        path = path.split("site-packages" + os.sep, 1)[1]
    return f"{path}:{lineno}"


def _library(name: str) -> bool:
    """Frames that are never a call site: torch, the mode, the standard library."""
    return (
        name.startswith(_TORCH_DIR)
        or name in _SELF_FILES
        or (name.startswith(_STDLIB_DIR) and "site-packages" not in name)
    )


def _call_site(frame) -> tuple[str, str, str]:
    """(site, origin, via) of the calling code; see :class:`Violation`."""
    origin = site = via = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not _library(name):
            here = _short(name, frame.f_lineno)
            if origin is None:
                origin = here
            if not name.startswith(_MEGATRON_DIR):
                if site is None:
                    site = here
                else:
                    via = here
                    break
        frame = frame.f_back
    site = site or origin or "<unknown>"
    return site, ("" if origin in (None, site) else origin), via or ""


def _in_tests(frame) -> bool:
    """Whether the innermost frame outside torch and the mode is a tests/ module."""
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or name in _SELF_FILES):
            return name.startswith(_TESTS_DIR)
        frame = frame.f_back
    return False


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if isinstance(func, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(func)
    owner = getattr(func, "__objclass__", None)
    if owner is not None and issubclass(owner, torch._C.TensorBase):
        return f"Tensor.{name}"
    if getattr(torch, name, None) is func:
        return f"torch.{name}"
    module = getattr(func, "__module__", None) or ""
    return f"{module}.{getattr(func, '__qualname__', name)}".lstrip(".")


def _describe(t: Tensor) -> str:
    return f"{place(t) or 'unknown'} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


# ---------------------------------------------------------------------------- the mode

_T = torch.Tensor
# Getters of properties, by descriptor (a property read reaches the mode as the
# descriptor's bound __get__).
_DEVICE_PROPERTY = torch._C.TensorBase.__dict__["device"]
_METHOD_WRAPPER = type(_T.device.__get__)
_FACTORIES = set(_device_constructors()) | {torch.from_numpy, torch.frombuffer}
# Ops that accept host and device tensors together on CUDA (moves, and metadata
# checks such as nn.Module._apply's before it sets ``param.data``).
_MIXING_ALLOWED = {
    _T.copy_,
    _T.__setitem__,
    _T.__getitem__,
    _T.to,
    torch._has_compatible_shallow_copy_type,
    torch.is_same_size,
    _T.is_set_to,
}
# Result is host data: one sync per call on a device tensor.
_SYNC_RESULT = {
    _T.item: "item",
    _T.tolist: "tolist",
    _T.numpy: "numpy",
    _T.__bool__: "bool",
    _T.__float__: "float",
    _T.__int__: "int",
    _T.__index__: "index",
    _T.__complex__: "complex",
    _T.__format__: "format",
    _T.__repr__: "repr",
    _T.__array__: "numpy",
    _T.is_nonzero: "bool",
    torch.equal: "equal",
    torch.allclose: "allclose",
    _T.equal: "equal",
    _T.allclose: "allclose",
}
# Output size depends on the data: the host waits for the device.
_SYNC_SHAPE = {
    torch.nonzero: "nonzero",
    _T.nonzero: "nonzero",
    torch.argwhere: "nonzero",
    _T.argwhere: "nonzero",
    torch.masked_select: "masked_select",
    _T.masked_select: "masked_select",
    torch.unique: "unique",
    _T.unique: "unique",
    torch.unique_consecutive: "unique",
    _T.unique_consecutive: "unique",
}


@functools.cache
def _is_collective(func) -> bool:
    """torch.distributed's functions (some reach the mode): the collective rule's."""
    return (getattr(func, "__module__", None) or "").startswith("torch.distributed")


class _TaggingMode(CudaToCpuMode):
    """``CudaToCpuMode`` that also tags tensors and records findings for its owner."""

    def __init__(self, owner: DeviceSeparation):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs if kwargs is not None else {}
        if type(func) is _METHOD_WRAPPER:
            return self._property(func, args)
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(self, func, args, kwargs)
        requested = None
        if "device" in kwargs and kwargs["device"] is not None:
            requested = _place_of_device(kwargs["device"])
            kwargs["device"] = cpu_compat._to_cpu_device(kwargs["device"])
        out = func(*args, **kwargs)
        inputs = _tensors(args, kwargs)
        where = requested
        if inputs and _is_collective(func):
            return out  # in place; checked by the ProcessGroup wrappers
        if inputs:
            combined = self._combine(func, inputs)
            where = where or combined
            if func in _SYNC_SHAPE and combined == DEVICE:
                self.owner._sync(_SYNC_SHAPE[func])
        elif where is None and func in _FACTORIES:
            on_device = self.owner.test_code_on_device and _in_tests(sys._getframe(1))
            where = DEVICE if on_device else HOST
        if where is not None:
            self._tag_outputs(out, args, where)
        return out

    # ------------------------------------------------------------------ helpers
    def _combine(self, func, inputs: list[Tensor]) -> str | None:
        """The tag of an op's outputs; records a mix of device and host tensors."""
        device = host = None
        for t in inputs:
            p = getattr(t, _TAG, None)
            if p == DEVICE:
                device = t
            elif p == HOST and (host is None or host.dim() == 0):
                host = t
        if device is not None:
            if host is not None and host.dim() > 0 and func not in _MIXING_ALLOWED:
                self.owner._violation(
                    "mix",
                    _op_name(func),
                    f"got {_describe(host)} with {_describe(device)}",
                )
            return DEVICE
        return HOST if host is not None else None

    @staticmethod
    def _tag_outputs(out, args, where: str) -> None:
        first = args[0] if args else None
        if isinstance(out, Tensor):
            if out is not first:  # in place: the target stays where it is
                setattr(out, _TAG, where)
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, Tensor) and t is not first:
                    setattr(t, _TAG, where)

    def _property(self, func, args):
        descriptor = func.__self__
        if func.__name__ == "__get__":
            self_t = args[0] if args else None
            if descriptor is _DEVICE_PROPERTY:
                # torch.distributed picks the group's backend by the tensor's device.
                if getattr(self_t, _TAG, None) == DEVICE and not sys._getframe(
                    2
                ).f_code.co_filename.startswith(_TORCH_DISTRIBUTED_DIR):
                    return _CUDA
                return func(*args)
            out = func(*args)
            if isinstance(out, Tensor) and out is not self_t and getattr(out, _TAG, None) is None:
                _set(out, getattr(self_t, _TAG, None))  # .data, .T, .grad, .real ...
            return out
        out = func(*args)
        if func.__name__ == "__set__" and descriptor.__name__ == "data" and len(args) == 2:
            _set(args[0], getattr(args[1], _TAG, None))  # p.data = x: p is now where x is
        return out


def _moved(t: Tensor, out: Tensor, where: str | None) -> Tensor:
    """``out`` tagged ``where``. On CPU a move returns its input; on GPU it would be a
    new tensor and the input would stay where it was: give back a view instead."""
    if where is None:
        return out
    if out is t and getattr(t, _TAG, None) != where:
        out = out.view_as(out)
    setattr(out, _TAG, where)
    return out


def _to(mode: _TaggingMode, func, args, kwargs):
    self_t, rest = args[0], list(args[1:])
    where = None
    if kwargs.get("device") is not None:
        where = _place_of_device(kwargs["device"])
        kwargs["device"] = cpu_compat._to_cpu_device(kwargs["device"])
    elif rest and isinstance(rest[0], Tensor):
        where = getattr(rest[0], _TAG, None)
    elif rest and isinstance(rest[0], (str, int, torch.device)) and not isinstance(rest[0], bool):
        where = _place_of_device(rest[0])
        rest[0] = cpu_compat._to_cpu_device(rest[0])
    if where == HOST and getattr(self_t, _TAG, None) == DEVICE:
        mode.owner._sync("cpu")
    out = func(self_t, *rest, **kwargs)
    return _moved(self_t, out, where or getattr(self_t, _TAG, None))


def _cuda(mode, func, args, kwargs):
    return _moved(args[0], args[0], DEVICE)


def _cpu(mode, func, args, kwargs):
    if getattr(args[0], _TAG, None) == DEVICE:
        mode.owner._sync("cpu")
    return _moved(args[0], func(*args, **kwargs), HOST)


def _type(mode, func, args, kwargs):
    if len(args) == 1 and not kwargs:
        return CudaToCpuMode.__torch_function__(mode, func, (), args, kwargs)
    return func(*args, **kwargs)


def _copy(mode, func, args, kwargs):
    dst, src = args[0], args[1]
    if getattr(dst, _TAG, None) == HOST and getattr(src, _TAG, None) == DEVICE:
        mode.owner._sync("copy_to_host")
    return func(*args, **kwargs)


def _index_tensors(index) -> list[Tensor]:
    items = index if isinstance(index, tuple) else (index,)
    return [i for i in items if isinstance(i, Tensor)]


def _check_index(mode, func, target: Tensor, index) -> None:
    where = getattr(target, _TAG, None)
    for i in _index_tensors(index):
        p = getattr(i, _TAG, None)
        if where == HOST and p == DEVICE and target.dim() > 0:
            mode.owner._violation(
                "mix",
                _op_name(func),
                f"indexes {_describe(target)} with {_describe(i)}",
            )
        elif p == DEVICE and i.dtype in (torch.bool, torch.uint8):
            mode.owner._sync("boolean_mask")


def _getitem(mode, func, args, kwargs):
    target, index = args[0], args[1]
    _check_index(mode, func, target, index)
    out = func(*args, **kwargs)
    if isinstance(out, Tensor) and out is not target:
        _set(out, getattr(target, _TAG, None))
    return out


def _setitem(mode, func, args, kwargs):
    target, index, value = args
    _check_index(mode, func, target, index)
    if (
        isinstance(value, Tensor)
        and getattr(target, _TAG, None) == HOST
        and getattr(value, _TAG, None) == DEVICE
    ):
        mode.owner._sync("copy_to_host")
    return func(*args, **kwargs)


def _iter(mode, func, args, kwargs):
    items = list(func(*args, **kwargs))
    where = getattr(args[0], _TAG, None)
    for t in items:
        if isinstance(t, Tensor):
            _set(t, where)
    return iter(items)


def _sync_result(mode, func, args, kwargs):
    inputs = _tensors(args, kwargs)
    if mode._combine(func, inputs) == DEVICE:  # also checks torch.equal's two inputs
        mode.owner._sync(_SYNC_RESULT[func])
    return func(*args, **kwargs)


def _type_as(mode, func, args, kwargs):
    """``t.type_as(other)`` converts to ``other``'s type, device included."""
    where = getattr(args[1], _TAG, None) or getattr(args[0], _TAG, None)
    return _moved(args[0], func(*args, **kwargs), where)


_HANDLERS: dict[Callable, Callable] = {
    _T.to: _to,
    _T.cuda: _cuda,
    _T.cpu: _cpu,
    _T.type: _type,
    _T.copy_: _copy,
    _T.__getitem__: _getitem,
    _T.__setitem__: _setitem,
    _T.__iter__: _iter,
    _T.type_as: _type_as,
    **{f: _sync_result for f in _SYNC_RESULT},
}


# ---------------------------------------------------------------------------- collectives

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


def _in_project(frame) -> bool:
    name = frame.f_code.co_filename
    # The checkout's own .venv lies inside the repository too.
    return (
        name.startswith(str(REPO) + os.sep)
        and "site-packages" not in name
        and name not in _SELF_FILES
    )


class DeviceSeparation:
    """Context manager: run the enclosed code with an emulated accelerator (see the
    module docstring); collect ``violations`` and ``host_syncs`` (this thread).

    Args:
        test_code_on_device: tensors made by factories called from ``tests/`` (without
            an explicit device) are device tensors, and ops called from ``tests/`` are
            not checked: a test body stands for the caller holding its data on the
            device (the harness's setting).
    """

    def __init__(self, *, test_code_on_device: bool = False):
        self.test_code_on_device = test_code_on_device
        self._violations: dict[tuple[str, str, str], Violation] = {}
        # step label -> HostSync -> count; label None: outside any step.
        self.host_syncs: dict[int | None, Counter] = {}
        self._step: int | None = None
        self._mode = _TaggingMode(self)
        self._plain = CudaToCpuMode()
        self._paused = 0
        self._exempt = threading.local()
        self._host_groups: set[int] = set()
        self._saved: list[tuple[object, str, object]] = []
        self._active = False

    # ------------------------------------------------------------------ findings
    @property
    def violations(self) -> list[Violation]:
        return list(self._violations.values())

    def _violation(self, kind: str, op: str, detail: str) -> None:
        site, origin, via = _call_site(sys._getframe(1))
        if self.test_code_on_device and site.startswith("tests" + os.sep):
            return
        key = (kind, op, site)
        if key in self._violations:
            self._violations[key].count += 1
        else:
            self._violations[key] = Violation(kind, op, detail, site, origin, via)

    def _sync(self, kind: str) -> None:
        site, origin, _ = _call_site(sys._getframe(1))
        self.host_syncs.setdefault(self._step, Counter())[HostSync(kind, site, origin)] += 1

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Attribute the host syncs of the enclosed code to training step ``step``."""
        previous, self._step = self._step, step
        try:
            yield
        finally:
            self._step = previous

    def check(self) -> None:
        """Raise AssertionError listing every violation (op, call site, count)."""
        if self._violations:
            raise AssertionError(
                f"{len(self._violations)} host/device separation violation(s) (a GPU run "
                "fails there):\n" + "\n".join(str(v) for v in self._violations.values())
            )

    def report(self) -> dict:
        """JSON-ready: violations, and host syncs per step with their call sites."""
        steps = {}
        for step, counts in self.host_syncs.items():
            steps["outside_steps" if step is None else str(step)] = {
                "total": sum(counts.values()),
                "sites": [
                    {**asdict(s), "count": n}
                    for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].site))
                ],
            }
        return {
            "violations": [asdict(v) for v in self._violations.values()],
            "host_syncs": steps,
        }

    # ------------------------------------------------------------------ pausing
    def _swap(self, leave: torch.overrides.TorchFunctionMode, enter) -> bool:
        from torch.overrides import _get_current_function_mode, _pop_mode, _push_mode

        if _get_current_function_mode() is not leave:
            return False
        _pop_mode()
        _push_mode(enter)
        return True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Neither tag nor check the enclosed code (code that is not the project's);
        CUDA devices are still rewritten to the CPU."""
        swapped = self._swap(self._mode, self._plain)
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if swapped:
                self._swap(self._plain, self._mode)

    @contextlib.contextmanager
    def resumed(self) -> Iterator[None]:
        """Check the enclosed code inside a :meth:`paused` region."""
        swapped = self._swap(self._plain, self._mode)
        paused, self._paused = self._paused, 0
        try:
            yield
        finally:
            self._paused = paused
            if swapped:
                self._swap(self._mode, self._plain)

    def _pausing(self, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            with self.paused():
                return original(*args, **kwargs)

        return wrapper

    # ------------------------------------------------------------------ patches
    def _patch(self, owner, name: str, replacement) -> None:
        self._saved.append((owner, name, owner.__dict__[name] if name in vars(owner) else None))
        setattr(owner, name, replacement)

    def _wrap_collective(self, name: str, original):
        @functools.wraps(original)
        def checked(group, *args, **kwargs):
            if not (self._paused or getattr(self._exempt, "on", False)) and (
                id(group) not in self._host_groups
            ):
                for t in _tensors(args, kwargs):
                    if getattr(t, _TAG, None) == HOST:
                        self._violation("collective", f"ProcessGroup.{name}", f"got {_describe(t)}")
                        break
            return original(group, *args, **kwargs)

        return checked

    def _wrap_object_collective(self, original):
        @functools.wraps(original)
        def exempt(*args, **kwargs):
            previous = getattr(self._exempt, "on", False)
            self._exempt.on = True
            try:
                return original(*args, **kwargs)
            finally:
                self._exempt.on = previous

        return exempt

    def _wrap_new_group(self, original):
        @functools.wraps(original)
        def new_group(*args, **kwargs):
            group = original(*args, **kwargs)
            backend = kwargs.get("backend") or (args[2] if len(args) > 2 else None)
            if backend is not None and "gloo" in str(backend).lower() and group is not None:
                self._host_groups.add(id(group))
            return group

        return new_group

    def _wrap_get_backend(self, original):
        @functools.wraps(original)
        def get_backend(group=None):
            backend = original(group)
            caller = sys._getframe(1)
            if (
                not self._paused
                and _in_project(caller)
                and id(group if group is not None else dist.group.WORLD) not in self._host_groups
            ):
                return "nccl"
            return backend

        return get_backend

    def _patch_distributed(self) -> None:
        for name in _COLLECTIVES:
            original = getattr(dist.ProcessGroup, name)
            self._patch(dist.ProcessGroup, name, self._wrap_collective(name, original))
        c10d = dist.distributed_c10d
        for name in _OBJECT_COLLECTIVES:
            wrapped = self._wrap_object_collective(getattr(c10d, name))
            self._patch(c10d, name, wrapped)
            self._patch(dist, name, wrapped)
        new_group = self._wrap_new_group(c10d.new_group)
        self._patch(c10d, "new_group", new_group)
        self._patch(dist, "new_group", new_group)
        self._patch(dist, "get_backend", self._wrap_get_backend(dist.get_backend))

    def _patch_parameters(self) -> None:
        """``nn.Parameter(data)`` wraps ``data`` in a new tensor object outside torch's
        function API: it takes the tag of ``data``."""
        make = torch.nn.Parameter.__new__

        def new(cls, data=None, requires_grad=True):
            param = make(cls, data, requires_grad)
            _set(param, HOST if data is None else getattr(data, _TAG, None))
            return param

        self._patch(torch.nn.Parameter, "__new__", staticmethod(new))

    def _patch_rollout(self) -> None:
        """vLLM paused; CUDA sleep-mode semantics for covrl's RolloutEngine: ``sleep()``
        releases vLLM's weights (level 2), ``weights_released`` says so, a reload of the
        weights restores them, and vLLM's ``generate`` on released weights raises."""
        from covrl.rollout import RolloutEngine

        mode = self
        engine_init = RolloutEngine.__init__
        engine_sleep = RolloutEngine.sleep
        released = vars(RolloutEngine).get("weights_released")

        @functools.wraps(engine_init)
        def init(engine, *args, **kwargs):
            mode._patch_vllm()
            engine_init(engine, *args, **kwargs)

        @functools.wraps(engine_sleep)
        def sleep(engine, *args, **kwargs):
            engine_sleep(engine, *args, **kwargs)
            if engine.config.enable_sleep_mode and not torch.cuda.is_available():
                setattr(engine.llm, _RELEASED, True)  # level 2: nothing backed up

        self._patch(RolloutEngine, "__init__", init)
        self._patch(RolloutEngine, "sleep", sleep)
        if isinstance(released, property):

            def weights_released(engine) -> bool:
                return released.fget(engine) or getattr(engine.llm, _RELEASED, False)

            self._patch(RolloutEngine, "weights_released", property(weights_released))

    def _patch_vllm(self) -> None:
        with self.paused():
            from vllm import LLM

        if "_covrl_paused" in vars(LLM):
            return
        mode = self
        for name in ("__init__", "sleep", "wake_up", "reset_prefix_cache"):
            self._patch(LLM, name, self._pausing(getattr(LLM, name)))
        generate = LLM.generate
        collective_rpc = LLM.collective_rpc

        @functools.wraps(generate)
        def checked_generate(llm, *args, **kwargs):
            if getattr(llm, _RELEASED, False):
                raise RuntimeError(
                    f"{RELEASED_WEIGHTS_ERROR}: sleep() dropped the weights (CUDA sleep "
                    "level 2, emulated on CPU) and no weight sync has reloaded them since"
                )
            with mode.paused():
                return generate(llm, *args, **kwargs)

        @functools.wraps(collective_rpc)
        def rpc(llm, method, *args, **kwargs):
            inner = kwargs.get("kwargs") or {}
            if "weights_iterator" in inner:
                inner = dict(inner)
                inner["weights_iterator"] = mode._checked_iterator(inner["weights_iterator"])
                kwargs["kwargs"] = inner
            with mode.paused():
                out = collective_rpc(llm, method, *args, **kwargs)
            if method == "reload_weights":
                setattr(llm, _RELEASED, False)
            return out

        self._patch(LLM, "generate", checked_generate)
        self._patch(LLM, "collective_rpc", rpc)
        self._patch(LLM, "_covrl_paused", True)

    def _checked_iterator(self, iterator):
        """Each item of covrl's weight stream produced with the mode on."""
        iterator = iter(iterator)
        while True:
            with self.resumed():
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> DeviceSeparation:
        self._patch_distributed()
        self._patch_parameters()
        self._patch_rollout()
        cpu_compat.emulate_cuda_device(True)
        self._mode.__enter__()
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        from torch.overrides import _get_current_function_mode_stack

        if self._active:
            stack = _get_current_function_mode_stack()
            if stack and stack[-1] is self._mode:
                self._mode.__exit__(*exc)
            self._active = False
        cpu_compat.emulate_cuda_device(False)
        for owner, name, original in reversed(self._saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()


# ---------------------------------------------------------------------------- the CLI


def read_reports(run_dir: str | os.PathLike) -> list[dict]:
    """Every rank's report under ``run_dir`` (one file per rank and process)."""
    root = Path(run_dir) / REPORT_DIRNAME
    return [json.loads(p.read_text()) for p in sorted(root.glob("*.json"))]


def format_violations(reports: list[dict]) -> str:
    seen = {}
    for r in reports:
        for v in r["violations"]:
            seen.setdefault((v["kind"], v["op"], v["site"]), Violation(**v))
    return "\n".join(str(v) for v in seen.values())


def assert_no_violations(run_dir: str | os.PathLike) -> list[dict]:
    """Raise AssertionError naming each op and call site a GPU run would fail at;
    return the reports (at least one must exist)."""
    reports = read_reports(run_dir)
    assert reports, f"no device-separation report in {Path(run_dir) / REPORT_DIRNAME}"
    text = format_violations(reports)
    assert not text, f"host/device separation violations in {run_dir}:\n{text}"
    return reports


def _summary(report: dict, rank: str, path: Path | None) -> str:
    steps = {k: v["total"] for k, v in report["host_syncs"].items()}
    lines = [
        f"device separation (rank {rank}): {len(report['violations'])} violation(s); host "
        f"syncs per step {steps}" + (f"; report {path}" if path else "")
    ]
    lines += [f"  {Violation(**v)}" for v in report["violations"]]
    return "\n".join(lines)


def enabled() -> bool:
    """Whether the environment asks for the mode (``COVRL_DEVICE_SEPARATION``)."""
    return os.environ.get(ENV, "0") not in ("", "0")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run the trainer CLI's ``main(argv)`` under the mode; write this rank's report to
    ``<run_dir>/device_separation/rank<R>-<pid>.json`` and print a summary on stderr.
    Host syncs are attributed to the training step that made them.

    ``COVRL_DEVICE_SEPARATION=1``: return :data:`VIOLATION_EXIT_CODE` when the run
    flagged anything (else ``main``'s code); ``=report``: always ``main``'s code (the
    caller reads the reports, :func:`assert_no_violations`).
    """
    import covrl.training.loop as loop

    setting = os.environ.get(ENV, "1")
    if setting not in ("1", "report"):
        raise ValueError(f"{ENV}={setting!r}: expected 1 (exit code 3 on a violation) or report")
    for name in ("train", "train_step"):
        if not isinstance(getattr(loop, name, None), FunctionType):
            raise RuntimeError(
                f"{ENV}: covrl.training.loop.{name} is gone; update tests/device_mode.py"
            )
    mode = DeviceSeparation()
    run_dir: list[str] = []
    train, train_step = loop.train, loop.train_step

    @functools.wraps(train)
    def recording_train(config, *args, **kwargs):
        run_dir.append(config.trainer.run_dir)
        return train(config, *args, **kwargs)

    @functools.wraps(train_step)
    def counted_step(run, step, *args, **kwargs):
        with mode.step(step):
            return train_step(run, step, *args, **kwargs)

    rank = os.environ.get("RANK", "0")
    code = 1
    loop.train, loop.train_step = recording_train, counted_step
    try:
        with mode:
            code = main(argv)
    finally:
        loop.train, loop.train_step = train, train_step
        report = mode.report()
        path = None
        if run_dir:
            path = Path(run_dir[0]) / REPORT_DIRNAME / f"rank{rank}-{os.getpid()}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"rank": int(rank), **report}, indent=1))
        print(_summary(report, rank, path), file=sys.stderr, flush=True)
    if report["violations"] and code == 0 and setting == "1":
        return VIOLATION_EXIT_CODE
    return code
