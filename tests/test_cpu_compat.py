"""The CPU shims for megatron-core, each against plain torch.

Each check runs in a launched rank (where :func:`covrl.parallel.initialize` applied
the shims) so the pytest process itself keeps an unpatched torch.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import launch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only shims")


def _cuda_devices_become_cpu(ctx):
    from covrl.parallel import cpu_compat

    assert cpu_compat.is_applied()
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.arange(3).cuda().device.type == "cpu"
    assert torch.arange(3).to("cuda").device.type == "cpu"
    t = torch.arange(3, dtype=torch.float32)
    assert t.to("cuda", torch.float64).dtype == torch.float64
    assert t.to(torch.float16).dtype == torch.float16  # dtype-only calls untouched
    torch.cuda.synchronize()


def _rng_tracker_forks_cpu_generator(ctx):
    from megatron.core.tensor_parallel import random as mpu_random

    tracker = mpu_random.CudaRNGStatesTracker()
    torch.manual_seed(5)
    tracker.add("a", 11)
    with tracker.fork("a"):
        first = torch.rand(4)
    outside = torch.rand(4)
    with tracker.fork("a"):
        second = torch.rand(4)
    torch.manual_seed(11)
    expected = torch.rand(8)
    torch.manual_seed(5)
    expected_outside = torch.rand(4)
    # The forked stream continues where it left off; the default stream is untouched.
    torch.testing.assert_close(torch.cat([first, second]), expected, rtol=0, atol=0)
    torch.testing.assert_close(outside, expected_outside, rtol=0, atol=0)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("b", 11)


def _clip_matches_torch(ctx, max_norm):
    from megatron.core.optimizer import optimizer as mpu_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    ref = [p.detach().clone().requires_grad_() for p in params]
    for r, p in zip(ref, params, strict=True):
        r.grad = p.grad.clone()
    total = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    mpu_optimizer.clip_grad_by_total_norm_fp32(params, max_norm, float(total))
    for r, p in zip(ref, params, strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)


def test_cuda_devices_become_cpu():
    # The shim itself: under the device-separation mode a CUDA tensor reads as cuda:0.
    launch(_cuda_devices_become_cpu, 1, device_separation=False)


def test_rng_tracker_forks_cpu_generator():
    launch(_rng_tracker_forks_cpu_generator, 1)


@pytest.mark.parametrize("max_norm", [0.1, 100.0])
def test_clip_matches_torch(max_norm):
    launch(_clip_matches_torch, 1, max_norm=max_norm)
