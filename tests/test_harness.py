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


def _collectives_under_lint(ctx):
    """Each case in its own lint, so every verdict is reported."""
    from megatron.core import parallel_state as ps

    from tests.device_lint import DeviceLint

    group = ps.get_data_parallel_group()
    on_device = torch.ones(4).to(torch.device("cpu"))  # as the engine moves its batch
    cases = {
        "host_factory": lambda: dist.all_reduce(torch.zeros(3), group=group),
        "host_copy": lambda: dist.broadcast(on_device.cpu(), src=0, group=group),
        "derived_from_host": lambda: dist.all_reduce(torch.arange(3.0) * 2, group=group),
        "device_factory": lambda: dist.all_reduce(
            torch.zeros(3, device=on_device.device), group=group
        ),
        "derived_from_device": lambda: dist.all_reduce(on_device * 2, group=group),
        "host_scalar_times_device": lambda: dist.all_reduce(
            on_device * torch.tensor(2.0), group=group
        ),
        "object_collective": lambda: dist.broadcast_object_list([{"a": 1}], src=0, group=group),
        "mixed_op": lambda: torch.zeros(4) + on_device,
    }
    verdicts = {}
    for name, case in cases.items():
        with DeviceLint() as lint:
            case()
        try:
            lint.check()
            verdicts[name] = "clean"
        except AssertionError as exc:
            verdicts[name] = str(exc)
    return verdicts


def _host_all_reduce(ctx):
    # The harness counts a test body's own tensors as device data; a host copy is not.
    dist.all_reduce(torch.zeros(2).cpu())


@pytest.fixture(scope="module")
def lint_verdicts():
    # Its own lints only: a launch-wide one would also see the deliberate offences.
    return launch(_collectives_under_lint, 1, timeout=60, device_lint=False)[0]


@pytest.mark.parametrize("case", ["host_factory", "host_copy", "derived_from_host", "mixed_op"])
def test_device_lint_flags_host_tensors(lint_verdicts, case):
    verdict = lint_verdicts[case]
    assert verdict != "clean"
    assert "_collectives_under_lint" in verdict  # names the call site
    if case != "mixed_op":
        assert "got a host tensor" in verdict


@pytest.mark.parametrize(
    "case",
    [
        "device_factory",
        "derived_from_device",
        "host_scalar_times_device",
        "object_collective",
    ],
)
def test_device_lint_passes_device_tensors(lint_verdicts, case):
    assert lint_verdicts[case] == "clean"


def test_device_lint_fails_the_launch():
    with pytest.raises(DistributedTestError, match="allreduce got a host tensor"):
        launch(_host_all_reduce, 2, timeout=60, device_lint=True)


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
