"""The device-separation mode (tests/device_mode.py): each rule fires on a minimal
example and stays quiet on its correct version; it catches the trainer's host mask
multiplying device entropies and the host-mask entropy-change sums.

Every case runs in one launch of two ranks (a real data-parallel group for the
collectives), each under its own :class:`DeviceSeparation` (the launch itself is not
under the mode, so the cases' deliberate offences are theirs alone).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

from tests.harness import launch

HERE = "tests/test_device_mode.py"


def _line(func, needle: str) -> int:
    """The line number of the first source line of ``func`` containing ``needle``."""
    lines, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(lines) if needle in line)


def _cases(dev: torch.device, group) -> dict:
    """name -> code run under the mode ``m`` (host tensors: factories without a device)."""
    import torch.nn.functional as F

    def host():
        return torch.ones(4)

    def device():
        return torch.ones(4, device=dev)

    def linear(moved: bool):
        layer = torch.nn.Linear(4, 4)
        if moved:
            layer.cuda(torch.cuda.current_device())  # as build_model does on GPU
        return layer(device())

    def paused(m):
        with m.paused():
            return host() * device()

    def gloo_group():  # a host group on GPU too
        return dist.new_group([0, 1], backend="gloo")

    return {
        # (a) ops mixing host and device tensors
        "host_times_device": lambda m: host() * device(),
        "host_scalar_times_device": lambda m: device() * torch.tensor(2.0),
        "python_scalar_times_device": lambda m: device() * 2.0,
        "moved_before_mixing": lambda m: host().to(dev) * device(),
        "moved_with_cuda": lambda m: host().cuda() * device(),
        "factory_device_of_device": lambda m: torch.zeros(4, device=device().device) + device(),
        "factory_device_of_host": lambda m: torch.zeros(4, device=host().device) + device(),
        "factory_cuda_ordinal": lambda m: torch.zeros(4, device=0) + device(),
        "like_follows_device": lambda m: torch.zeros_like(device()) + device(),
        "like_follows_host": lambda m: torch.zeros_like(host()) + device(),
        "cpu_copy_mixed": lambda m: device().cpu() + device(),
        "derived_from_host": lambda m: (torch.arange(4.0) * 2).add_(device()),
        "cat_host_and_device": lambda m: torch.cat([host(), device()]),
        "where_host_mask": lambda m: torch.where(host() > 0, device(), 0.0),
        "copy_into_device": lambda m: device().copy_(host()),
        "index_device_with_host": lambda m: device()[torch.tensor([0, 2])],
        "index_host_with_device": lambda m: host()[torch.tensor([0, 2], device=dev)],
        "module_moved": lambda m: linear(moved=True),
        "module_not_moved": lambda m: linear(moved=False),
        "functional_on_host_weight": lambda m: F.linear(device(), torch.ones(4, 4)),
        "type_as_moves": lambda m: host().type_as(device()) * device(),
        "equal_host_device": lambda m: torch.equal(host(), device()),
        "paused": paused,
        # (b) collectives
        "all_reduce_host": lambda m: dist.all_reduce(torch.zeros(3), group=group),
        "all_reduce_device": lambda m: dist.all_reduce(torch.zeros(3, device=dev), group=group),
        "all_reduce_derived_from_device": lambda m: dist.all_reduce(device() * 2, group=group),
        "broadcast_cpu_copy": lambda m: dist.broadcast(device().cpu(), src=0, group=group),
        "all_gather_host": lambda m: dist.all_gather(
            [torch.empty(4, device=dev) for _ in range(2)], host(), group=group
        ),
        "object_collective": lambda m: dist.broadcast_object_list([{"a": 1}], src=0, group=group),
        "explicit_gloo_group": lambda m: dist.all_reduce(torch.zeros(3), group=gloo_group()),
    }


def _sync_cases() -> dict:
    """name -> code whose host syncs are counted (on device tensor ``d``) or not (on
    host tensor ``h``)."""
    return {
        "item": lambda d, h: d.sum().item(),
        "tolist": lambda d, h: d.tolist(),
        "bool": lambda d, h: bool(d.sum() > 0),
        "if": lambda d, h: 1 if (d > 2).any() else 0,
        "float": lambda d, h: float(d[0]),
        "int": lambda d, h: int(d[0]),
        "cpu": lambda d, h: d.cpu(),
        "to_cpu": lambda d, h: d.to("cpu"),
        "numpy": lambda d, h: d.cpu().numpy(),
        "nonzero": lambda d, h: torch.nonzero(d),
        "boolean_mask": lambda d, h: d[d > 1],
        "copy_to_host": lambda d, h: h.copy_(d),
        "host_only": lambda d, h: (h.sum().item(), h.tolist(), bool(h.any()), h[h > 1]),
        "device_only": lambda d, h: (d * 2 + d.sum()).exp(),
    }


def _body(ctx):
    from megatron.core import parallel_state as ps

    from covrl.ops import sampled_entropy_change
    from covrl.ops.token_covariance import masked_scope_sums
    from covrl.parallel import get_device
    from covrl.training import steps
    from tests.device_mode import DeviceSeparation, place

    group = ps.get_data_parallel_group()
    out = {"rules": {}, "syncs": {}, "bugs": {}}

    def verdict(mode):
        return [(v.kind, v.op, v.site, v.via) for v in mode.violations]

    with DeviceSeparation():
        dev = get_device()
        x = torch.ones(3, device=dev)
        out["device"] = (str(dev), str(x.device), str(torch.ones(3).device), place(x))
        out["backend"] = dist.get_backend(group)
    out["device_after"] = str(get_device())
    out["backend_after"] = dist.get_backend(group)
    for name, case in _cases(torch.device("cuda", 0), group).items():
        with DeviceSeparation() as mode:
            case(mode)
        out["rules"][name] = verdict(mode)
    for name, case in _sync_cases().items():
        with DeviceSeparation() as mode, mode.step(1):
            case(torch.arange(4.0, device=get_device()), torch.arange(4.0))
        report = mode.report()["host_syncs"]
        out["syncs"][name] = {
            s["kind"]: s["count"] for s in report.get("1", {"sites": []})["sites"]
        }

    def host_mask():  # a response mask built on the host, not moved to the engine
        return torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3

    def on_device(t):
        return t.to(get_device())

    def device_mask():
        return on_device(host_mask())

    # The trainer's token mean of the engine's entropy over the batch's mask.
    for name, mask in (("token_mean", host_mask), ("token_mean_device_mask", device_mask)):
        with DeviceSeparation() as mode:
            steps._token_mean(on_device(torch.rand(4, 6)), mask(), group)
        out["bugs"][name] = verdict(mode)
    out["bugs"]["token_mean_line"] = _line(steps._token_mean, "* mask")

    # The entropy-change prediction: device log-probs and advantages.
    for name, mask in (("entropy_change", host_mask), ("entropy_change_device_mask", device_mask)):
        with DeviceSeparation() as mode:
            logp = on_device(torch.rand(4, 6).log())
            adv = on_device(torch.randn(4, 6))
            sampled_entropy_change(logp, adv, 1.0, mask(), group=group)
        out["bugs"][name] = verdict(mode)
    out["bugs"]["entropy_change_where_line"] = _line(masked_scope_sums, "torch.where")
    return out


@pytest.fixture(scope="module")
def results():
    # Not under the launch-wide mode: each case has its own.
    return launch(_body, 2, timeout=120, device_separation=False)[0]


def test_device_reads_as_cuda_under_the_mode(results):
    assert results["device"] == ("cuda:0", "cuda:0", "cpu", "device")
    assert results["device_after"] == "cpu"
    # covrl's code choosing a communication device sees the GPU run's backend.
    assert (results["backend"], results["backend_after"]) == ("nccl", "gloo")


# case -> (kind, op, the source line of _cases the call site is on)
FLAGGED = {
    "host_times_device": ("mix", "Tensor.mul", None),
    "factory_device_of_host": ("mix", "Tensor.add", None),
    "like_follows_host": ("mix", "Tensor.add", None),
    "cpu_copy_mixed": ("mix", "Tensor.add", None),
    "derived_from_host": ("mix", "Tensor.add_", None),
    "cat_host_and_device": ("mix", "torch.cat", None),
    "where_host_mask": ("mix", "torch.where", None),
    "index_host_with_device": ("mix", "Tensor.__getitem__", None),
    "module_not_moved": ("mix", "torch._C._nn.linear", "return layer(device())"),
    "functional_on_host_weight": ("mix", "torch._C._nn.linear", None),
    "equal_host_device": ("mix", "torch.equal", None),
    "all_reduce_host": ("collective", "ProcessGroup.allreduce", None),
    "broadcast_cpu_copy": ("collective", "ProcessGroup.broadcast", None),
    "all_gather_host": ("collective", "ProcessGroup.allgather", None),
}
CLEAN = [
    "host_scalar_times_device",
    "python_scalar_times_device",
    "moved_before_mixing",
    "moved_with_cuda",
    "factory_device_of_device",
    "factory_cuda_ordinal",
    "like_follows_device",
    "copy_into_device",
    "index_device_with_host",
    "module_moved",
    "type_as_moves",
    "paused",
    "all_reduce_device",
    "all_reduce_derived_from_device",
    "object_collective",
    "explicit_gloo_group",
]


def test_every_case_is_checked():
    cases = set(_cases(torch.device("cpu"), None))
    assert set(FLAGGED) | set(CLEAN) == cases and not set(FLAGGED) & set(CLEAN)


@pytest.mark.parametrize("case", sorted(FLAGGED))
def test_rule_fires(results, case):
    kind, op, needle = FLAGGED[case]
    found = results["rules"][case]
    assert [(k, o) for k, o, _, _ in found] == [(kind, op)], found
    # The call site: the line of the case (a call may span the next lines).
    line = _line(_cases, needle or f'"{case}"')
    path, _, at = found[0][2].rpartition(":")
    assert path == HERE and line <= int(at) <= line + 2, found


@pytest.mark.parametrize("case", CLEAN)
def test_rule_stays_quiet(results, case):
    assert results["rules"][case] == []


@pytest.mark.parametrize(
    "case", ["item", "tolist", "bool", "if", "float", "int", "cpu", "to_cpu", "nonzero"]
)
def test_host_sync_is_counted(results, case):
    kind = {"if": "bool", "to_cpu": "cpu"}.get(case, case)
    assert results["syncs"][case] == {kind: 1}


def test_other_host_syncs(results):
    assert results["syncs"]["numpy"] == {"cpu": 1}  # the .cpu() before it
    assert results["syncs"]["boolean_mask"] == {"boolean_mask": 1}
    assert results["syncs"]["copy_to_host"] == {"copy_to_host": 1}
    assert results["syncs"]["host_only"] == {}
    assert results["syncs"]["device_only"] == {}


def test_catches_host_mask_in_token_mean(results):
    """``steps._token_mean`` with the engine's entropy (device) and the batch's response
    mask (host): the multiplication a CUDA run fails at."""
    bugs = results["bugs"]
    site = f"covrl/training/steps.py:{bugs['token_mean_line']}"
    assert [(kind, op, s) for kind, op, s, _ in bugs["token_mean"]] == [("mix", "Tensor.mul", site)]
    assert bugs["token_mean_device_mask"] == []


def test_catches_host_mask_in_entropy_change(results):
    """``sampled_entropy_change`` (the trainer's entropy-change prediction) with device
    log-probs and advantages and a host mask: its sums are built on the mask's device,
    mixed with the log-probs and all-reduced over the data-parallel group."""
    bugs = results["bugs"]
    found = {(kind, op): (site, via) for kind, op, site, via in bugs["entropy_change"]}
    where = f"covrl/ops/token_covariance.py:{bugs['entropy_change_where_line']}"
    assert found[("mix", "torch.where")][0] == where
    site, via = found[("collective", "ProcessGroup.allreduce")]
    assert site.startswith("covrl/parallel/groups.py:")
    assert via.startswith("covrl/ops/token_covariance.py:")
    assert bugs["entropy_change_device_mask"] == []
