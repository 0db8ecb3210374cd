"""Peak extra memory of a piece of work (to check the weight sync's bound)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_memory(fn: Callable[[], T], device: torch.device) -> tuple[T, int]:
    """Run ``fn``; return its result and the peak memory it used beyond what was in
    use at its start, in bytes.

    CUDA: the caching allocator's peak of allocated tensor memory. CPU (Linux): the
    process's resident-set high-water mark, reset just before ``fn`` (writing 5 to
    ``/proc/self/clear_refs``) and read after it, minus the resident set before: every
    page the process touched, torch's tensors, oneDNN's packed weights and the
    allocator's caches included.
    """
    # An emulated CUDA device on a CPU machine (tests/device_mode.py) has no CUDA
    # allocator: its tensors are host memory.
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base

    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    result = fn()
    return result, 1024 * max(0, _status_kib("VmHWM") - base)
