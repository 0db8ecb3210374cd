"""The distributed test harness itself: results, error propagation, hang detection."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import DistributedTestError, first_failure, launch, run_checks


def _layout(ctx):
    from megatron.core import parallel_state as ps

    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return dict(
        rank=ctx.rank,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp=ctx.dp,
        tp_sum=t.item(),
        pid=os.getpid(),
    )


def _raise_on_rank_1(ctx):
    if ctx.rank == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()


def _hang_on_rank_0(ctx):
    if ctx.rank == 0:
        time.sleep(600)


def _exit_without_result(ctx):
    os._exit(3)


def test_layout_tp2_pp2():
    res = launch(_layout, 4, tp=2, pp=2)
    # Megatron's default order: TP ranks adjacent, PP the slowest dimension.
    assert [r["tp_rank"] for r in res] == [0, 1, 0, 1]
    assert [r["pp_rank"] for r in res] == [0, 0, 1, 1]
    assert [r["tp_sum"] for r in res] == [1.0, 1.0, 5.0, 5.0]
    assert all(r["dp"] == 1 for r in res)
    assert len({r["pid"] for r in res}) == 4


def test_layout_dp4():
    res = launch(_layout, 4)
    assert [r["dp_rank"] for r in res] == [0, 1, 2, 3]
    assert all(r["dp"] == 4 for r in res)


def test_exception_on_one_rank_fails_with_its_traceback():
    with pytest.raises(DistributedTestError, match="rank 1") as info:
        launch(_raise_on_rank_1, 2, timeout=60)
    assert "deliberate failure on rank 1" in str(info.value)
    assert "_raise_on_rank_1" in str(info.value)


def test_hung_group_is_killed_after_timeout():
    start = time.monotonic()
    with pytest.raises(
        DistributedTestError, match=r"timed out after 3s; ranks still running: \[0\]"
    ):
        launch(_hang_on_rank_0, 2, timeout=3)
    assert time.monotonic() - start < 30


def test_silent_exit_is_reported():
    with pytest.raises(DistributedTestError, match="exited with code 3"):
        launch(_exit_without_result, 1, timeout=60)


def test_bad_layout_is_rejected():
    with pytest.raises(DistributedTestError, match="not divisible"):
        launch(_layout, 2, tp=4, timeout=60)


def _host_all_reduce(ctx):
    from covrl.parallel import all_reduce

    # The body's own tensors count as device data; an explicit host tensor does not.
    all_reduce(torch.zeros(2, device="cpu"), dist.group.WORLD)


def test_device_separation_fails_the_launch():
    """Multi-rank launches run under tests/device_mode.py by default."""
    with pytest.raises(DistributedTestError) as failure:
        launch(_host_all_reduce, 2, timeout=60)
    message = str(failure.value)
    assert "collective: ProcessGroup.allreduce got host (2,) float32" in message
    assert (
        "at covrl/parallel/groups.py:" in message
        and "called from tests/test_harness.py:" in message
    )


def _device(ctx):
    from covrl.parallel import get_device

    return str(get_device())


def test_device_separation_default():
    from tests.device_mode import enabled

    assert launch(_device, 2, timeout=60) == ["cuda:0", "cuda:0"]
    assert launch(_device, 1, timeout=60) == ["cuda:0" if enabled() else "cpu"]
    assert launch(_device, 1, timeout=60, device_separation=True) == ["cuda:0"]


def _two_checks(ctx):
    def bad():
        raise ValueError("deliberate failure in one check")

    return run_checks({"good": lambda: 41 + 1, "bad": bad, "after": lambda: "still ran"})


def test_failed_check_is_named_and_does_not_hide_the_others():
    (res,) = launch(_two_checks, 1, timeout=60)
    assert res["good"] == 42 and res["after"] == "still ran"
    with pytest.raises(AssertionError, match=r"check 'bad' raised(.|\n)*deliberate failure"):
        res["bad"]
    assert first_failure([res], "bad").name == "bad"
    assert first_failure([res], "good") is None
