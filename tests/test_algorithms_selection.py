"""Selection in one process: brute-force references, invariance under random splits
(hypothesis), the distributed primitives' local logic, the random keys, covariance
metrics and degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from covrl.algorithms import (
    ClipCovConfig,
    EntropyControlConfig,
    KLCovConfig,
    PolicyLossConfig,
    canonical_token_ids,
    covariance_summary,
    global_loss_count,
    prepare_selection,
    selection_count,
)
from covrl.ops import kth_largest, select_top_k, uniform_keys
from covrl.ops.order_statistics import float_to_ordered_int
from covrl.parallel import SINGLE_PROCESS
from tests.token_fixtures import (
    DATASETS,
    collate,
    make_samples,
    reference_selection,
    selection_batches,
    split,
)


def _cfg(method, ratio=0.05, omega=(0.2, 5.0), **ec):
    # The PPO clip range of reference_selection's "not clipped" filter.
    return PolicyLossConfig(
        clip_ratio_low=0.2,
        clip_ratio_high=0.2,
        entropy_control=EntropyControlConfig(
            method=method,
            kl_cov=KLCovConfig(ratio=ratio),
            clip_cov=ClipCovConfig(ratio=ratio, omega_low=omega[0], omega_high=omega[1]),
            **ec,
        ),
    )


def _selected_ids(mbs, result):
    return sorted(
        torch.cat([mb["token_ids"][m] for mb, m in zip(mbs, result.masks, strict=True)]).tolist()
    )


@settings(max_examples=40, deadline=None)
@given(
    ds=st.sampled_from(DATASETS),
    data_seed=st.integers(0, 5),
    n_mb=st.integers(1, 8),
    order_seed=st.integers(0, 10_000),
    method=st.sampled_from(["kl_cov", "clip_cov"]),
    ratio=st.sampled_from([1e-3, 0.02, 0.05, 0.3]),
    step=st.integers(0, 1000),
)
def test_selection_is_invariant_under_random_splits(
    ds, data_seed, n_mb, order_seed, method, ratio, step
):
    samples = make_samples(ds, seed=data_seed)
    cfg = _cfg(method, ratio)
    mbs = split(samples, 1, 0, n_mb, order_seed)
    got = _selected_ids(
        mbs, prepare_selection(selection_batches(mbs), cfg, step=step, group=SINGLE_PROCESS)
    )
    ref = reference_selection(samples, method, ratio, omega=(0.2, 5.0), seed=0, step=step)
    assert got == sorted(ref)


@pytest.mark.parametrize("method", ["kl_cov", "clip_cov"])
def test_old_logp_source(method):
    samples = make_samples("continuous", seed=3)
    cfg = _cfg(method, 0.05, logp_source="old")
    mbs = split(samples, 1, 0, 3, 1)
    got = _selected_ids(
        mbs,
        prepare_selection(
            selection_batches(mbs, with_logp=False), cfg, step=2, group=SINGLE_PROCESS
        ),
    )
    ref = reference_selection(samples, method, 0.05, omega=(0.2, 5.0), step=2, use_current=False)
    assert got == sorted(ref)
    with pytest.raises(ValueError, match=r"batches\[0\].logp is None"):
        prepare_selection(
            selection_batches(mbs, with_logp=False), _cfg(method), step=2, group=SINGLE_PROCESS
        )


# --- primitives ----------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    vals=st.lists(st.integers(-3, 3), min_size=0, max_size=60),
    k=st.integers(0, 65),
    as_float=st.booleans(),
    id_seed=st.integers(0, 100),
    elig_seed=st.integers(0, 100),
)
def test_select_top_k_matches_sort(vals, k, as_float, id_seed, elig_seed):
    n = len(vals)
    values = torch.tensor(vals, dtype=torch.float64 if as_float else torch.int64)
    ids = torch.randperm(10 * n + 1, generator=torch.Generator().manual_seed(id_seed))[:n]
    eligible = torch.rand(n, generator=torch.Generator().manual_seed(elig_seed)) < 0.8
    got = select_top_k(values, ids, eligible, k, group=SINGLE_PROCESS)
    order = sorted((i for i in range(n) if eligible[i]), key=lambda i: (-vals[i], ids[i].item()))
    expect = torch.zeros(n, dtype=torch.bool)
    expect[order[:k]] = True
    assert torch.equal(got, expect)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=80, deadline=None)
@given(
    vals=st.lists(st.one_of(finite, st.sampled_from([0.0, -0.5, 1.25])), min_size=1, max_size=80),
    data=st.data(),
)
def test_kth_largest_matches_sort(vals, data):
    x = torch.tensor(vals, dtype=torch.float64)
    ranks = data.draw(st.lists(st.integers(1, len(vals)), min_size=1, max_size=5))
    # Split into uneven segments: the result must not depend on the segmentation.
    cut = data.draw(st.integers(0, len(vals)))
    got = kth_largest(
        [float_to_ordered_int(x[:cut]), float_to_ordered_int(x[cut:])], ranks, SINGLE_PROCESS
    )
    keys = sorted(float_to_ordered_int(x).tolist(), reverse=True)
    assert got.tolist() == [keys[r - 1] for r in ranks]


def test_ordered_int_preserves_order():
    x = torch.tensor([-1e300, -2.5, -1e-300, 0.0, 1e-300, 3.0, 1e300], dtype=torch.float64)
    k = float_to_ordered_int(x)
    assert torch.equal(torch.argsort(k), torch.arange(7))


def test_covariance_summary_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    cov = torch.randn(5000, generator=g, dtype=torch.float64) ** 3
    cov[:100] = 0.75  # a tie set
    # Padding holds -inf (as the selection pass lays it out) and must not count.
    mask = torch.rand(5000, generator=g) < 0.8
    padded = torch.where(mask, cov, float("-inf"))
    valid = cov[mask]
    n = valid.numel()
    fracs = (2e-4, 2e-3, 2e-2, 0.2, 0.5, 1.0)
    got = covariance_summary([padded[:1234].view(2, 617), padded[1234:]], n, fracs, SINGLE_PROCESS)
    s = torch.sort(valid, descending=True).values
    assert got["cov/mean"] == pytest.approx(valid.mean().item(), rel=1e-12)
    for f in fracs:
        k = max(1, int(round(f * n, 9)))
        assert got[f"cov/top_{f * 100:g}%"] == pytest.approx(s[:k].mean().item(), rel=1e-12)


def test_selection_count():
    assert selection_count(0.29, 100) == 29  # floating 0.29 * 100 = 28.999...
    assert selection_count(2e-3, 400) == 1  # k * N < 1 -> 1
    assert selection_count(2e-3, 0) == 0
    assert selection_count(2e-4, 1_000_000) == 200
    assert selection_count(1.0, 7) == 7


def test_uniform_keys_properties():
    ids = canonical_token_ids(torch.arange(64), torch.ones(64, 64, dtype=torch.bool)).flatten()
    k = uniform_keys(ids, seed=1, step=2)
    assert k.dtype == torch.int64 and (k >= 0).all() and (k < 2**62).all()
    assert k.unique().numel() == ids.numel()
    assert torch.equal(k, uniform_keys(ids, seed=1, step=2))
    assert not torch.equal(k, uniform_keys(ids, seed=1, step=3))
    assert not torch.equal(k, uniform_keys(ids, seed=2, step=2))
    # Rank-order statistics look uniform: the smallest-key quarter of a row is a
    # uniform draw, so every position is chosen about equally often across steps.
    cand = ids[:20]
    hits = torch.zeros(20)
    for step in range(2000):
        hits[torch.argsort(uniform_keys(cand, seed=5, step=step))[:5]] += 1
    expected = 2000 * 5 / 20
    assert ((hits - expected).abs() < 5 * (expected * 0.75) ** 0.5).all()
    chi2 = ((hits - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # 19 dof: p < 1e-4 beyond ~45


# --- degenerate inputs -----------------------------------------------------------------


def _one(samples):
    return [collate(samples, left_pad=False)]


def test_all_equal_advantages_zero_covariance():
    samples = make_samples("continuous")
    for s in samples:
        s["adv"] = torch.full_like(s["adv"], 0.7)
    mbs = _one(samples)
    res = prepare_selection(
        selection_batches(mbs), _cfg("clip_cov", omega=(1.0, 5.0)), step=0, group=SINGLE_PROCESS
    )
    assert not any(m.any() for m in res.masks)
    assert res.metrics["entropy_control/candidates"] == 0
    assert res.metrics["cov/mean"] == 0 and res.metrics["cov/top_0.02%"] == 0
    # KL-Cov still takes K tokens (all tie at 0): the smallest canonical ids.
    res = prepare_selection(
        selection_batches(mbs), _cfg("kl_cov", 0.05), step=0, group=SINGLE_PROCESS
    )
    n = int(mbs[0]["mask"].sum())
    k = int(0.05 * n)
    assert _selected_ids(mbs, res) == sorted(mbs[0]["token_ids"][mbs[0]["mask"]].tolist())[:k]


def test_no_candidate_in_band():
    mbs = _one(make_samples())
    res = prepare_selection(
        selection_batches(mbs), _cfg("clip_cov", omega=(1e6, 2e6)), step=0, group=SINGLE_PROCESS
    )
    assert not any(m.any() for m in res.masks)
    assert res.metrics["entropy_control/selected_tokens"] == 0


def test_fewer_candidates_than_requested_takes_all():
    samples = make_samples()
    mbs = _one(samples)
    cfg = _cfg("clip_cov", ratio=0.9, omega=(0.2, 5.0))
    res = prepare_selection(selection_batches(mbs), cfg, step=0, group=SINGLE_PROCESS)
    assert (
        res.metrics["entropy_control/selected_tokens"]
        == res.metrics["entropy_control/candidates"]
        > 0
    )


def test_kn_below_one_selects_one():
    mbs = _one(make_samples())
    res = prepare_selection(
        selection_batches(mbs), _cfg("kl_cov", ratio=1e-4), step=0, group=SINGLE_PROCESS
    )
    assert sum(int(m.sum()) for m in res.masks) == 1


def test_empty_masks():
    mbs = _one(make_samples())
    for mb in mbs:
        mb["mask"][:] = False
    for method in ("kl_cov", "clip_cov"):
        res = prepare_selection(selection_batches(mbs), _cfg(method), step=0, group=SINGLE_PROCESS)
        assert not any(m.any() for m in res.masks)
        assert res.metrics["entropy_control/num_tokens"] == 0
        assert res.metrics["entropy_control/selected_fraction"] == 0


def test_single_valid_token():
    mbs = _one(make_samples())
    mbs[0]["mask"][:] = False
    mbs[0]["mask"][3, 1] = True
    mbs[0]["token_ids"] = canonical_token_ids(mbs[0]["sample_index"], mbs[0]["mask"])
    res = prepare_selection(selection_batches(mbs), _cfg("kl_cov"), step=0, group=SINGLE_PROCESS)
    assert torch.equal(res.masks[0], mbs[0]["mask"])
    assert res.metrics["cov/mean"] == 0.0
    # Its covariance is 0: outside any band above 0.
    res = prepare_selection(selection_batches(mbs), _cfg("clip_cov"), step=0, group=SINGLE_PROCESS)
    assert not res.masks[0].any()


@pytest.mark.parametrize(
    "field,name", [("adv", "advantages"), ("old_logp", "old_logp"), ("logp", "logp")]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_named(field, name, value):
    mbs = _one(make_samples())
    mbs[0][field][2, 0] = value  # row 2, first token: valid under right padding
    with pytest.raises(ValueError, match=rf"non-finite.*\b{name}\b"):
        prepare_selection(selection_batches(mbs), _cfg("kl_cov"), step=0, group=SINGLE_PROCESS)


def test_microbatch_scope_touches_zero_covariance_microbatches():
    """The public per-micro-batch behaviour: a micro-batch whose advantages are all equal
    has zero covariance everywhere, yet KL-Cov still penalises one of its tokens; the
    minibatch scope penalises exactly K tokens of the whole mini-batch."""
    samples = make_samples()
    flat = [s for s in samples if s["index"] in (4, 5, 6, 7)]  # the all-equal-reward group
    rest = [s for s in samples if s["index"] not in (4, 5, 6, 7)]
    mbs = [collate(flat, left_pad=False), collate(rest, left_pad=True)]
    assert all((s["adv"] == s["adv"][0]).all() for s in flat)
    local = prepare_selection(
        selection_batches(mbs),
        _cfg("kl_cov", 2e-3, scope="microbatch"),
        step=0,
        group=SINGLE_PROCESS,
    )
    assert local.masks[0].sum() == 1 and local.masks[1].sum() == 1
    glob = prepare_selection(
        selection_batches(mbs), _cfg("kl_cov", 2e-3), step=0, group=SINGLE_PROCESS
    )
    n = sum(int(mb["mask"].sum()) for mb in mbs)
    assert sum(int(m.sum()) for m in glob.masks) == max(1, int(2e-3 * n)) == 1


@pytest.mark.parametrize("block", [1, 5, 64])
@pytest.mark.parametrize("method", ["kl_cov", "clip_cov"])
@pytest.mark.parametrize("ds", DATASETS)
def test_block_size_does_not_change_the_selection(monkeypatch, block, method, ds):
    """Tiny blocks: blocks spanning micro-batches, KL-Cov's running top-K across blocks
    (and its rescan when the cut falls among ties), Clip-Cov candidates from many
    blocks; the selection, counts and covariance summary stay those of the reference."""
    import covrl.ops.token_blocks as token_blocks

    samples = make_samples(ds, seed=1)
    mbs = split(samples, 1, 0, 3, 7)
    ratios = [2e-3, 0.05, 0.3, 1.0] if ds != "ties" else [0.05, 0.3]
    expected = {}
    for ratio in ratios:
        cfg = _cfg(method, ratio)
        expected[ratio] = prepare_selection(
            selection_batches(mbs), cfg, step=3, group=SINGLE_PROCESS
        )
    monkeypatch.setitem(token_blocks._BLOCK_SLOTS, "cpu", block)
    for ratio in ratios:
        res = prepare_selection(
            selection_batches(mbs), _cfg(method, ratio), step=3, group=SINGLE_PROCESS
        )
        ref = reference_selection(samples, method, ratio, omega=(0.2, 5.0), step=3)
        assert _selected_ids(mbs, res) == sorted(ref)
        # Block sums add in another order: the covariance summary may move in its last bits.
        assert res.metrics == pytest.approx(expected[ratio].metrics, rel=1e-12, abs=1e-15)
        assert {k: v for k, v in res.metrics.items() if k.startswith("entropy_control/")} == {
            k: v for k, v in expected[ratio].metrics.items() if k.startswith("entropy_control/")
        }
    for mb in mbs:
        mb["adv"] = torch.full_like(mb["adv"], 0.3)  # every covariance ties at 0
    res = prepare_selection(
        selection_batches(mbs), _cfg("kl_cov", 0.05), step=0, group=SINGLE_PROCESS
    )
    ids = sorted(torch.cat([mb["token_ids"][mb["mask"]] for mb in mbs]).tolist())
    assert _selected_ids(mbs, res) == ids[: max(1, int(0.05 * len(ids)))]


def test_ordered_int_round_trip_and_order_on_random_bits():
    from covrl.ops.order_statistics import ordered_int_to_float

    g = torch.Generator().manual_seed(4)
    bits = torch.randint(-(2**63), 2**63 - 1, (20_000,), generator=g, dtype=torch.int64)
    x = bits.view(torch.float64)
    specials = [float("-inf"), -1e308, -5e-324, -0.0, 0.0, 5e-324, 1e308, float("inf")]
    x = torch.cat([x[~torch.isnan(x)], torch.tensor(specials, dtype=torch.float64)])
    k = float_to_ordered_int(x)
    assert torch.equal(ordered_int_to_float(k).view(torch.int64), x.view(torch.int64))
    order = torch.argsort(k)
    assert (x[order][1:] >= x[order][:-1]).all()  # -0.0 and 0.0 compare equal
    assert k[-5] + 1 == k[-4] == 0  # -0.0 sorts just below 0.0


@pytest.mark.parametrize("block", [1, 5, 64])
@pytest.mark.parametrize("with_valid", [False, True])
def test_blockwise_covariance_summary_matches_sort(block, with_valid):
    """:class:`CovarianceSummary` fed in blocks (padding as ``-inf`` or by a mask, over
    finite junk) equals the sorting reference, for any block size."""
    from covrl.algorithms.metrics import CovarianceSummary

    g = torch.Generator().manual_seed(block)
    cov = torch.randn(3000, generator=g, dtype=torch.float64) ** 3
    cov[:60] = 0.75  # a tie set
    cov[60:90] = 0.0
    mask = torch.rand(3000, generator=g) < 0.7
    padded = torch.where(mask, cov, 123.0 if with_valid else float("-inf"))
    valid = cov[mask]
    n = valid.numel()
    fracs = (2e-4, 2e-3, 2e-2, 0.2, 0.5, 1.0)
    summary = CovarianceSummary(fracs, cov.device)
    blocks = list(zip(padded.split(block), mask.split(block), strict=True))
    for values, m in blocks:
        summary.add(values, m if with_valid else None)
    got = summary.result(n, lambda i, pos: blocks[i][0].index_select(0, pos), SINGLE_PROCESS)
    s = torch.sort(valid, descending=True).values
    assert got["cov/mean"] == pytest.approx(valid.mean().item(), rel=1e-12)
    for f in fracs:
        k = max(1, int(round(f * n, 9)))
        assert got[f"cov/top_{f * 100:g}%"] == pytest.approx(s[:k].mean().item(), rel=1e-12)
    whole = covariance_summary([torch.where(mask, cov, float("-inf"))], n, fracs, SINGLE_PROCESS)
    assert got == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("ds", DATASETS)
def test_covariance_summary_same_from_every_pass(monkeypatch, ds):
    """The summary fed from KL-Cov's or Clip-Cov's selection pass, or from its own
    pass (method none, micro-batch scope), at any block size and split, is the
    mini-batch's and matches the covariance computed by sorting."""
    import covrl.ops.token_blocks as token_blocks

    samples = make_samples(ds, seed=2)
    reference = None
    for block in [1, 5, 64, 1 << 16]:
        monkeypatch.setitem(token_blocks._BLOCK_SLOTS, "cpu", block)
        for n_mb in [1, 3]:
            mbs = split(samples, 1, 0, n_mb, 5)
            for method, scope in [
                ("kl_cov", "minibatch"),
                ("clip_cov", "minibatch"),
                ("none", "minibatch"),
                ("kl_cov", "microbatch"),
            ]:
                res = prepare_selection(
                    selection_batches(mbs),
                    _cfg(method, 0.05, scope=scope),
                    step=1,
                    group=SINGLE_PROCESS,
                )
                stats = {k: v for k, v in res.metrics.items() if k.startswith("cov/")}
                assert len(stats) == 6
                if reference is None:
                    reference = stats
                assert stats == pytest.approx(reference, rel=1e-12, abs=1e-15)
    # Sorting reference from the tensors themselves.
    mbs = split(samples, 1, 0, 1, 5)
    mask = torch.cat([mb["mask"].reshape(-1) for mb in mbs]).bool()
    logp = torch.cat([mb["logp"].reshape(-1) for mb in mbs]).double()[mask]
    adv = torch.cat([mb["adv"].reshape(-1) for mb in mbs]).double()[mask]
    cov = (logp - logp.mean()) * (adv - adv.mean())
    s = torch.sort(cov, descending=True).values
    assert reference["cov/mean"] == pytest.approx(cov.mean().item(), rel=1e-9, abs=1e-12)
    for f in EntropyControlConfig().cov_top_fractions:
        k = selection_count(f, cov.numel())
        assert reference[f"cov/top_{f * 100:g}%"] == pytest.approx(
            s[:k].mean().item(), rel=1e-9, abs=1e-12
        )


def test_a_forgotten_group_is_refused():
    """``None`` means the whole world in torch.distributed: it must not mean "this rank"."""
    mbs = split(make_samples("continuous", seed=3), 1, 0, 2, 0)
    with pytest.raises(TypeError, match="group=None is ambiguous"):
        prepare_selection(selection_batches(mbs), _cfg("kl_cov"), step=0, group=None)
    with pytest.raises(TypeError, match="group=None is ambiguous"):
        global_loss_count([mb["mask"] for mb in mbs], "token-mean", None)


@pytest.mark.parametrize("method", ["kl_cov", "clip_cov"])
def test_selected_token_location_metrics(method):
    """Fraction of selected tokens with an above-mean advantage and their mean probability,
    recomputed in float64 from the returned masks and the raw samples."""
    samples = make_samples("continuous", seed=3)
    mbs = split(samples, 1, 0, 3, 7)
    res = prepare_selection(selection_batches(mbs), _cfg(method, 0.2), step=5, group=SINGLE_PROCESS)
    valid_adv = torch.cat([mb["adv"][mb["mask"].bool()] for mb in mbs]).double()
    valid_logp = torch.cat([mb["logp"][mb["mask"].bool()] for mb in mbs]).double()
    sel_adv = torch.cat([mb["adv"][m] for mb, m in zip(mbs, res.masks, strict=True)]).double()
    sel_logp = torch.cat([mb["logp"][m] for mb, m in zip(mbs, res.masks, strict=True)]).double()
    assert len(sel_adv) > 0
    m = res.metrics
    assert m["entropy_control/selected_tokens"] == len(sel_adv)
    assert m["entropy_control/selected_positive_adv_fraction"] == pytest.approx(
        (sel_adv > valid_adv.mean()).double().mean().item(), abs=1e-12
    )
    assert m["entropy_control/selected_prob_mean"] == pytest.approx(
        sel_logp.exp().mean().item(), rel=1e-9
    )
    assert m["entropy_control/prob_mean"] == pytest.approx(valid_logp.exp().mean().item(), rel=1e-9)
