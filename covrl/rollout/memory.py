"""Peak extra tensor memory of a piece of work (to check the weight sync's bound)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def peak_extra_memory(fn: Callable[[], T], device: torch.device) -> tuple[T, int]:
    """Run ``fn``; return its result and the peak of tensor bytes allocated during it
    beyond those allocated at its start (freed memory counts down).

    CUDA: the caching allocator's peak statistic. CPU: the allocations and frees that
    torch's profiler records (``profile_memory``), summed in time order; allocations
    are placed at the start of the op that made them, so the peak is exact up to
    frees inside that op; frees of blocks allocated before ``fn`` are not recorded,
    which can only raise the result. Counts every tensor allocation, vLLM's included.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    changes = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    live = peak = 0
    for _, delta in changes:
        live += delta
        peak = max(peak, live)
    return result, peak
