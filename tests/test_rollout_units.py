"""Rollout pieces without a vLLM engine: the sync stream's checks and buckets, mismatch
metrics and IS weights (against float64 formulas), the padded batch, and the
start-up errors (on every rank, no hang)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.harness import launch
from tests.hf_fixtures import make_checkpoint
from tests.test_rollout import ROLLOUT_MODEL


def _stream(shapes, bucket_bytes, source=None):
    from covrl.rollout import BucketedWeightStream

    if source is None:
        source = [(n, torch.full(s, float(i))) for i, (n, s) in enumerate(shapes.items())]
    return BucketedWeightStream(source, shapes, bucket_bytes, torch.float32, torch.device("cpu"))


SHAPES = {"a": (4, 8), "b": (16,), "c": (8, 8), "d": (2,)}  # 128, 64, 256, 8 bytes


@pytest.mark.parametrize("bucket", [1, 200, 300, 10_000])
def test_stream_buckets_and_bound(bucket):
    """The loader sees every tensor once, in order; a bucket never exceeds the
    bucket size unless it is one tensor (the bound: bucket + largest tensor)."""
    held = []
    stream = _stream(SHAPES, bucket)
    seen = []
    for name, t in stream:
        seen.append(name)
        assert torch.all(t == list(SHAPES).index(name))
        held.append(t.numel() * 4)
    assert seen == list(SHAPES)
    st = stream.stats
    assert st.bytes == sum(held) == 456 and st.tensors == 4
    assert st.largest_tensor_bytes == 256
    assert st.peak_bucket_bytes <= max(bucket, st.largest_tensor_bytes)
    expected_buckets = {1: 4, 200: 3, 300: 2, 10_000: 1}[bucket]
    assert st.buckets == expected_buckets


@pytest.mark.parametrize(
    "source, message",
    [
        (
            [("a", torch.zeros(4, 8)), ("b", torch.zeros(16)), ("c", torch.zeros(8, 8))],
            "without tensors ['d']",
        ),
        (
            [("a", torch.zeros(4, 8)), ("x", torch.zeros(2))],
            "tensor x arrived but vLLM's model has no",
        ),
        ([("a", torch.zeros(4, 8)), ("a", torch.zeros(4, 8))], "tensor a arrived a second time"),
        ([("a", torch.zeros(8, 4))], "tensor a has shape (8, 4), vLLM's model expects (4, 8)"),
    ],
    ids=["missing", "unexpected", "duplicate", "misshaped"],
)
def test_stream_errors_name_the_tensor(source, message):
    from covrl.rollout import WeightSyncError

    with pytest.raises(WeightSyncError) as info:
        list(_stream(SHAPES, 1 << 20, source))
    assert message in str(info.value)


def test_mismatch_metrics_against_float64():
    from covrl.parallel import SINGLE_PROCESS
    from covrl.rollout import mismatch_metrics

    g = torch.Generator().manual_seed(0)
    rollout = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 3
    train = rollout + 0.2 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=g) > 0.3
    m = mismatch_metrics(rollout.float(), train.float(), mask, group=SINGLE_PROCESS)
    d = [
        float(t - r)
        for t, r, k in zip(train.flatten(), rollout.flatten(), mask.flatten(), strict=True)
        if k
    ]
    assert m["tokens"] == len(d)
    assert m["abs_diff_mean"] == pytest.approx(sum(map(abs, d)) / len(d), abs=1e-6)
    assert m["abs_diff_max"] == pytest.approx(max(map(abs, d)), abs=1e-6)
    assert m["kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / len(d), abs=1e-6)
    assert m["frac_over_threshold"] == pytest.approx(sum(abs(x) > 0.1 for x in d) / len(d))
    same = mismatch_metrics(rollout, rollout.clone(), mask, group=SINGLE_PROCESS)
    assert same["abs_diff_max"] == same["kl_k3"] == 0.0
    with pytest.raises(TypeError, match="group=None is ambiguous"):
        mismatch_metrics(rollout, train, mask, group=None)


def test_truncated_is_weights():
    from covrl.rollout import RolloutCorrectionConfig, truncated_is_weights

    train = torch.tensor([[0.0, -1.0, -2.0, -0.1]])
    rollout = torch.tensor([[-1.0, -1.0, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = truncated_is_weights(train, rollout, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, math.exp(-1.0), 0.0]]))
    assert RolloutCorrectionConfig("none").weights(train, rollout, mask) is None
    assert torch.equal(RolloutCorrectionConfig("tis", 2.0).weights(train, rollout, mask), w)
    with pytest.raises(ValueError, match="mode='bogus': expected 'none' or 'tis'"):
        RolloutCorrectionConfig("bogus")
    with pytest.raises(ValueError, match="cap=0.0: expected a value > 0"):
        RolloutCorrectionConfig("tis", 0.0)


def test_split_evenly():
    from covrl.rollout.generations import split_evenly

    assert split_evenly(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_evenly(1, 2) == [range(0, 1), range(1, 1)]


def _gather_body(ctx):
    """Each replica contributes different ragged rows; every rank must get the
    leaders' rows in rank order. Also mismatch metrics pooled over the world."""
    from covrl.parallel import SINGLE_PROCESS, get_device
    from covrl.rollout import mismatch_metrics
    from covrl.rollout.generations import gather_replica_rows

    out = {}
    for replica_size in (1, 2):
        replica = ctx.rank // replica_size
        ids = [[100 * replica + j] * (j + replica) for j in range(2 + replica)]
        values = [[-0.5 * x for x in row] for row in ids]
        codes = [(replica + j) % 2 for j in range(len(ids))]
        out[replica_size] = gather_replica_rows(ids, values, codes, replica_size, get_device())
    d = get_device()
    train = torch.full((2, 3), -1.0, device=d)
    rollout = torch.full((2, 3), -1.0 - 0.1 * (ctx.rank + 1))  # from the host, as Generations
    out["mismatch"] = mismatch_metrics(
        rollout, train, torch.ones(2, 3, device=d), group=SINGLE_PROCESS
    )
    import torch.distributed as dist

    out["pooled"] = mismatch_metrics(
        rollout, train, torch.ones(2, 3, device=d), group=dist.group.WORLD
    )
    return out


def test_gather_rows_and_pooled_mismatch():
    """World 2 under the device lint (collective tensors where NCCL needs them)."""
    results = launch(_gather_body, world_size=2, timeout=120)
    for replica_size, leaders in ((1, [0, 1]), (2, [0])):
        want_ids, want_vals, want_codes = [], [], []
        for replica in leaders:
            ids = [[100 * replica + j] * (j + replica) for j in range(2 + replica)]
            want_ids += ids
            want_vals += [[-0.5 * x for x in row] for row in ids]
            want_codes += [(replica + j) % 2 for j in range(len(ids))]
        for r in results:
            assert r[replica_size] == (want_ids, want_vals, want_codes)
    assert results[0]["mismatch"]["abs_diff_max"] == pytest.approx(0.1, abs=1e-6)
    for r in results:  # pooled over both ranks: |d| 0.1 and 0.2, six tokens each
        assert r["pooled"]["tokens"] == 12
        assert r["pooled"]["abs_diff_mean"] == pytest.approx(0.15, abs=1e-6)
        assert r["pooled"]["abs_diff_max"] == pytest.approx(0.2, abs=1e-6)


def _start_body(ctx, checkpoints):
    """Start an engine on each checkpoint; each must fail on every rank, naming why."""
    from covrl.rollout import RolloutConfig, RolloutEngine

    errors = {}
    for name, per_rank in checkpoints.items():
        try:
            RolloutEngine(per_rank[ctx.rank], RolloutConfig(tensor_parallel_size=per_rank[-1]))
            errors[name] = None
        except RuntimeError as exc:
            errors[name] = str(exc)
    return errors


@pytest.fixture(scope="module")
def start_errors(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_errors")
    good = make_checkpoint(root / "good", "qwen2", **ROLLOUT_MODEL)
    small_heads = make_checkpoint(root / "small_heads", "qwen2")  # head_dim 16
    unknown = make_checkpoint(root / "unknown", "qwen2", **ROLLOUT_MODEL)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (unknown / "config.json").write_text(json.dumps(cfg))
    cases = {  # per-rank checkpoint, then the rollout TP size
        "architecture": [unknown, unknown, 1],
        "head_dim": [small_heads, small_heads, 1],
        "rank1_only": [good, small_heads, 1],
        "rollout_tp": [good, good, 3],
    }
    return launch(_start_body, world_size=2, checkpoints=cases, timeout=300)


def test_start_errors_on_every_rank(start_errors):
    for errors in start_errors:  # both ranks raised, with the same message
        assert errors == start_errors[0]
    e = start_errors[0]
    assert "architectures=['NoSuchModelForCausalLM'] is not loadable by vLLM" in e["architecture"]
    assert "head_dim=16" in e["head_dim"] and "CPU attention" in e["head_dim"]
    assert "failed on rank 1" in e["rank1_only"] and "head_dim=16" in e["rank1_only"]
    assert "rollout.tensor_parallel_size=3" in e["rollout_tp"]
