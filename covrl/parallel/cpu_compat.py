"""Run megatron-core on a CPU-only PyTorch build (gloo backend).

megatron-core assumes CUDA in a handful of places that the CPU path of covrl goes
through. Each shim below is applied only when ``torch.cuda.is_available()`` is False,
never edits megatron-core's files, and is listed here with the calls that need it:

1. ``torch.cuda.current_device()`` used as a device, ``torch.cuda.synchronize()``
   - ``utils.GlobalMemoryBuffer.get_tensor`` (TP all-gather/reduce-scatter buffers),
   - ``pipeline_parallel.p2p_communication`` (shape tensors, batched p2p sync),
   - ``dist_checkpointing`` save (synchronize before writing).
   -> ``current_device`` returns :data:`ACCELERATOR`, the CPU with an explicit ordinal
   (``cpu:0``): tensors accept it also inside custom autograd backward functions, which
   run without shim 3's mode, and the device-separation test mode recognises it as the
   accelerator's. ``synchronize`` is a no-op.
2. The model-parallel RNG tracker (``tensor_parallel.random``) stores and restores CUDA
   generator states; attention always forks it, and ``model_parallel_cuda_manual_seed``
   seeds it. -> the tracker's state getter/setter and ``add`` work on the CPU default
   generator, so forked regions still get their own reproducible streams.
3. Hard-coded ``device="cuda"`` in tensor factories (pipeline schedules' loss and
   token counters, grad-norm buffers in ``optimizer.clip_grads``, DDP buffers).
   -> a torch function mode rewrites CUDA devices (and bare ints, which mean CUDA
   ordinals) to ``cpu`` in factory calls and in ``Tensor.to``/``Tensor.cuda``.
4. Tensor type-name checks: ``clip_grad_by_total_norm_fp32`` asserts
   ``torch.cuda.FloatTensor`` grads, ``Float16OptimizerWithFloat16Params`` (bf16
   training) sorts parameters by ``torch.cuda.{BFloat16,Half,Float}Tensor``.
   -> the same mode makes a no-argument ``Tensor.type()`` report the CUDA type name.

5. Activation recomputation re-runs the forward inside autograd's backward, where no
   torch function mode is active (``tensor_parallel.random.CheckpointFunction``).
   -> its backward runs under the mode of shim 3.
6. Without Apex or Transformer Engine megatron's distributed optimizer wraps torch's
   Adam, which keeps a per-parameter ``step`` tensor; loading its fully reshardable
   checkpoint state copies every state tensor by name and fails on ``step`` (restored
   from the parameter groups just before). -> the copy skips a ``step`` the loaded
   state does not carry.

The function mode is thread-local in PyTorch; it is pushed on the thread that calls
:func:`apply` (the training thread), unless a :class:`CudaToCpuMode` (or a subclass
that also tracks where each tensor would live) is already active there. Sequence
parallelism runs too: its norms are covrl's (:mod:`covrl.models.norm`), since
megatron's local fallback norm refuses it.

:func:`emulate_cuda_device` makes :func:`covrl.parallel.get_device` answer
``cuda:0`` on this CPU machine: a test instrument that runs covrl's GPU code paths
(tensors built on "the device", moved there, collectives given device tensors)
while shim 3 keeps every tensor on the CPU.
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
# What torch.cuda.current_device() answers on CPU (see shim 1).
ACCELERATOR = torch.device("cpu", 0)
_lock = threading.Lock()
_applied = False
_mode: TorchFunctionMode | None = None
_emulated_cuda = False


def _to_cpu_device(device):
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device('cuda')``, int)
    to the CPU device; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in every torch call made on this thread."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Type-name checks ("torch.cuda.BFloat16Tensor") in the optimizers.
            name = func(*args)
            return name if name.startswith("torch.cuda.") else "torch.cuda." + name[6:]
        if func is torch.Tensor.to and len(args) > 1:
            # Tensor.to(device, ...) or Tensor.to(int) with a CUDA device first.
            first = args[1]
            if isinstance(first, (str, int, torch.device)) and not isinstance(first, bool):
                args = (args[0], _to_cpu_device(first), *args[2:])
        return func(*args, **kwargs)


def _get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _tracker_add(self, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` on the CPU default generator."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


def apply() -> bool:
    """Install the CPU shims once per process (and the device mode on this thread).

    Returns True when shims are active, False when CUDA is available (nothing done).
    """
    global _applied, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _applied:
            return True
        # 1. current device / synchronize.
        # A device, not ordinal 0: autograd runs custom backward functions without the
        # function mode below, and megatron's sequence-parallel backward allocates with
        # device=torch.cuda.current_device().
        torch.cuda.current_device = lambda: ACCELERATOR  # type: ignore[assignment]
        torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

        # 2. RNG tracker on the CPU generator.
        from megatron.core.tensor_parallel import random as mpu_random

        mpu_random._get_cuda_rng_state = _get_rng_state
        mpu_random._set_cuda_rng_state = _set_rng_state
        mpu_random.CudaRNGStatesTracker.add = _tracker_add

        # 3 and 4. Device rewriting and CUDA type names (once per thread's mode stack).
        if not _rewriting_mode_active():
            _mode = CudaToCpuMode()
            _mode.__enter__()

        # 5. Recomputed forwards inside backward.
        recompute_backward = mpu_random.CheckpointFunction.backward

        def backward(ctx, *args):
            with CudaToCpuMode():
                return recompute_backward(ctx, *args)

        mpu_random.CheckpointFunction.backward = staticmethod(backward)

        # 6. torch Adam's per-parameter step in the distributed optimizer's load.
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        set_states = DistributedOptimizer._set_main_param_and_optimizer_states

        def set_main_param_and_optimizer_states(self, model_param, tensors):
            group, order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            return set_states(self, model_param, tensors)

        DistributedOptimizer._set_main_param_and_optimizer_states = (
            set_main_param_and_optimizer_states
        )
        _applied = True
    return True


def _rewriting_mode_active() -> bool:
    from torch.overrides import _get_current_function_mode_stack

    return any(isinstance(m, CudaToCpuMode) for m in _get_current_function_mode_stack())


def is_applied() -> bool:
    return _applied


def emulate_cuda_device(on: bool) -> None:
    """Make :func:`covrl.parallel.get_device` return ``cuda:0`` (``on``) on a machine
    without CUDA; the device-rewriting mode must be active for tensors to be made."""
    global _emulated_cuda
    _emulated_cuda = on


def emulates_cuda_device() -> bool:
    return _emulated_cuda
