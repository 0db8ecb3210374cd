"""Split invariance of Clip-Cov / KL-Cov selection, losses and gradients across DP ranks.

The same mini-batch (16 responses, ~450 tokens, NaN in every padding slot) runs under
three layouts:

* ``dp1_mb1``: one rank, one micro-batch, samples in canonical order;
* ``dp2_mb4``: two data-parallel ranks, four uneven micro-batches each, samples shuffled
  and dealt to ranks, micro-batches padded left or right to different widths;
* ``dp1_mb8``: one rank, eight uneven micro-batches, another shuffle.

With the ``minibatch`` scope the selected tokens, the per-token gradients (reassembled
in canonical order), the summed loss, the gradient of a parameter shared by all tokens
(through Megatron's loss scaling and DP averaging) and the step metrics must agree.
The ``microbatch`` scope (the public implementation's behaviour) must not.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.harness import CheckResults, first_failure, launch, run_checks
from tests.token_fixtures import (
    DATASETS,
    collate,
    make_samples,
    reference_selection,
    selection_batches,
    split,
)

STEP = 7  # optimizer step and seed of Clip-Cov's draw (any values)
SEED = 11

# name -> (config kwargs, entropy-control kwargs)
CASES = {
    "kl_cov": ({}, dict(method="kl_cov", kl_cov=dict(ratio=0.05))),
    "kl_cov_default": ({}, dict(method="kl_cov")),
    "kl_cov_ppo_clip": (
        dict(loss_agg_mode="seq-mean-token-sum", loss_norm_constant=48.0),
        dict(method="kl_cov", kl_cov=dict(ratio=0.05, ppo_clip=True)),
    ),
    "clip_cov": (
        dict(loss_agg_mode="seq-mean-token-mean"),
        dict(method="clip_cov", clip_cov=dict(ratio=0.05, omega_low=0.2, omega_high=5.0)),
    ),
    "clip_cov_default": ({}, dict(method="clip_cov", clip_cov=dict(omega_low=0.5))),
    "ppo": (dict(entropy_coeff=0.01, kl_coeff=0.1, clip_ratio_high=0.28), dict(method="none")),
    # Large K: half the tokens (big gathers, boundary inside a tie set on "ties").
    "kl_cov_half": ({}, dict(method="kl_cov", kl_cov=dict(ratio=0.5))),
    # More requested than there are candidates: all candidates, on every layout.
    "clip_cov_all": ({}, dict(method="clip_cov", clip_cov=dict(ratio=0.9, omega_low=0.2))),
}
MICROBATCH_SCOPE_CASES = ("kl_cov", "clip_cov")
TOPOLOGIES = {"dp1_mb1": (1, 1, None), "dp2_mb4": (2, 4, 5), "dp1_mb8": (1, 8, 9)}


def make_config(case: str, scope: str = "minibatch"):
    from covrl.algorithms import (
        ClipCovConfig,
        EntropyControlConfig,
        KLCovConfig,
        PolicyLossConfig,
    )

    kwargs, ec = CASES[case]
    ec = dict(ec)
    if "kl_cov" in ec:
        ec["kl_cov"] = KLCovConfig(**ec["kl_cov"])
    if "clip_cov" in ec:
        ec["clip_cov"] = ClipCovConfig(**ec["clip_cov"])
    return PolicyLossConfig(
        entropy_control=EntropyControlConfig(scope=scope, seed=SEED, **ec), **kwargs
    )


def _run_step(mbs, cfg, group, dp):
    from covrl.algorithms import (
        aggregate_loss,
        compute_policy_loss,
        global_loss_count,
        megatron_loss_scale,
        policy_metric_sums,
        prepare_selection,
        reduce_metric_sums,
    )

    sel = prepare_selection(
        selection_batches(mbs),
        cfg,
        step=STEP,
        group=group,
    )
    count = global_loss_count([mb["mask"] for mb in mbs], cfg.loss_agg_mode, group)
    theta = torch.zeros((), requires_grad=True)  # a parameter every token depends on
    scale = megatron_loss_scale(len(mbs), dp)
    ids, grads, selected, metric_sums, loss_sum = [], [], [], [], 0.0
    for i, mb in enumerate(mbs):
        leaf = mb["logp"].clone().requires_grad_(True)
        out = compute_policy_loss(
            leaf + theta,
            old_logp=mb["old_logp"],
            advantages=mb["adv"],
            mask=mb["mask"],
            config=cfg,
            selected=None if sel.masks is None else sel.masks[i],
            entropy=mb["entropy"],
            ref_logp=mb["ref_logp"],
        )
        loss = aggregate_loss(
            out.token_loss, mb["mask"], cfg.loss_agg_mode, count, cfg.loss_norm_constant
        )
        # What Megatron does with the returned loss: divide by the micro-batch count.
        (loss * scale / len(mbs)).backward()
        loss_sum += loss.item()
        m = mb["mask"]
        assert torch.isfinite(leaf.grad).all() and (leaf.grad[~m] == 0).all()
        ids.append(mb["token_ids"][m])
        grads.append(leaf.grad[m] / dp)  # undo the DP factor of the scale (exact for dp=2)
        if sel.masks is not None:
            assert not (sel.masks[i] & ~m).any()
            selected.append(mb["token_ids"][sel.masks[i]])
        metric_sums.append(policy_metric_sums(out, mb["entropy"]))
    theta_grad = theta.grad.clone()
    if group is not None:
        torch.distributed.all_reduce(theta_grad, group=group)
    theta_grad /= dp  # DDP averages over the DP group
    return dict(
        ids=torch.cat(ids),
        grads=torch.cat(grads),
        selected=torch.cat(selected) if selected else torch.zeros(0, dtype=torch.int64),
        loss=loss_sum,
        theta_grad=theta_grad,
        metrics={**sel.metrics, **reduce_metric_sums(metric_sums, group)},
        num_mb=len(mbs),
    )


def _body(ctx, n_mb, order_seed):
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    rank = ps.get_data_parallel_rank()
    checks = {}
    for ds in DATASETS:
        samples = make_samples(ds)
        if order_seed is None:
            mbs = [collate(samples, left_pad=False, extra=0)]
        else:
            mbs = split(samples, ctx.dp, rank, n_mb, order_seed)
        for case in CASES:
            cfg = make_config(case)
            checks[f"{ds}/{case}/minibatch"] = partial(_run_step, mbs, cfg, group, ctx.dp)
        for case in MICROBATCH_SCOPE_CASES:
            cfg = make_config(case, "microbatch")
            checks[f"{ds}/{case}/microbatch"] = partial(_run_step, mbs, cfg, group, ctx.dp)
    checks["rpp"] = partial(_reinforce_pp, rank, ctx.dp, group)
    checks["nan"] = partial(_nan_on_last_rank, rank, ctx.dp, group)
    return run_checks(checks)


def _nan_on_last_rank(rank, dp, group):
    """NaN in one rank's advantages: every rank must raise (none may hang)."""
    from covrl.algorithms import prepare_selection

    mbs = split(make_samples(), dp, rank, 2, order_seed=1)
    if rank == dp - 1:
        mbs[1]["adv"][0, mbs[1]["mask"][0].nonzero()[0]] = float("nan")
    batches = selection_batches(mbs)
    try:
        prepare_selection(batches, make_config("kl_cov"), step=0, group=group)
    except ValueError as e:
        return str(e)
    return None


def _reinforce_pp(rank, dp, group):
    """REINFORCE++-baseline whitening over a batch spread over ranks (whole groups each)."""
    from covrl.algorithms import reinforce_pp_baseline_advantages

    g = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (16,), generator=g).double()
    labels = torch.arange(16) // 4
    mask = torch.rand(16, 10, generator=g) < 0.7
    mine = (labels % dp) == rank
    adv = reinforce_pp_baseline_advantages(
        rewards[mine], labels[mine], mask[mine], process_group=group
    )
    full = reinforce_pp_baseline_advantages(rewards, labels, mask)
    return dict(max_err=(adv - full[mine]).abs().max().item())


def _merge(per_rank: list[dict]) -> dict:
    """Concatenate ranks, reorder tokens canonically, sum losses (a check that failed
    on any rank stays a failure, raised by the tests that read it)."""
    merged = CheckResults()
    for key in per_rank[0]:
        failure = first_failure(per_rank, key)
        if failure is not None:
            merged[key] = failure
            continue
        rs = [r[key] for r in per_rank]
        if key in ("rpp", "nan"):
            merged[key] = rs
            continue
        ids = torch.cat([r["ids"] for r in rs])
        order = torch.argsort(ids)
        merged[key] = dict(
            ids=ids[order],
            grads=torch.cat([r["grads"] for r in rs])[order],
            selected=sorted(torch.cat([r["selected"] for r in rs]).tolist()),
            loss=sum(r["loss"] for r in rs),
            theta_grad=[r["theta_grad"].item() for r in rs],
            metrics=[r["metrics"] for r in rs],
            num_mb=sum(r["num_mb"] for r in rs),
        )
    return merged


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, (dp, n_mb, order_seed) in TOPOLOGIES.items():
        out[name] = _merge(launch(_body, dp, n_mb=n_mb, order_seed=order_seed))
    return out


MINIBATCH_KEYS = [f"{ds}/{case}/minibatch" for ds in DATASETS for case in CASES]


@pytest.mark.parametrize("key", MINIBATCH_KEYS)
def test_minibatch_scope_is_split_invariant(runs, key):
    base = runs["dp1_mb1"][key]
    for topo in ("dp2_mb4", "dp1_mb8"):
        other = runs[topo][key]
        assert torch.equal(other["ids"], base["ids"])
        assert other["selected"] == base["selected"], topo
        # A token's gradient is an elementwise function of the token and the global
        # count: bitwise the same whatever the split.
        assert torch.equal(other["grads"], base["grads"]), topo
        assert other["loss"] == pytest.approx(base["loss"], rel=1e-5, abs=1e-7)
        for g in other["theta_grad"]:
            assert g == pytest.approx(base["theta_grad"][0], rel=1e-5, abs=1e-7)
        # Every rank reports the same global metrics, equal to the single-rank ones.
        for m in other["metrics"]:
            assert m.keys() == base["metrics"][0].keys()
            for name, v in m.items():
                assert v == pytest.approx(base["metrics"][0][name], rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("key", MINIBATCH_KEYS)
def test_shared_parameter_grad_is_sum_of_token_grads(runs, key):
    r = runs["dp1_mb1"][key]
    assert r["theta_grad"][0] == pytest.approx(r["grads"].double().sum().item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("ds", DATASETS)
@pytest.mark.parametrize(
    "case",
    ["kl_cov", "kl_cov_default", "kl_cov_half", "clip_cov", "clip_cov_default", "clip_cov_all"],
)
def test_selection_matches_brute_force_reference(runs, ds, case):
    cfg = make_config(case)
    ec = cfg.entropy_control
    ref = reference_selection(
        make_samples(ds),
        ec.method,
        ec.selection_ratio,
        omega=(ec.clip_cov.omega_low, ec.clip_cov.omega_high),
        clip=(*cfg.clip_range, cfg.clip_ratio_c),
        seed=SEED,
        step=STEP,
    )
    got = runs["dp1_mb1"][f"{ds}/{case}/minibatch"]["selected"]
    assert set(got) == ref and len(got) == len(ref)


@pytest.mark.parametrize("ds", DATASETS)
def test_selection_counts(runs, ds):
    r = runs["dp2_mb4"]
    n = r[f"{ds}/kl_cov/minibatch"]["ids"].numel()
    assert len(r[f"{ds}/kl_cov/minibatch"]["selected"]) == int(0.05 * n)
    assert len(r[f"{ds}/kl_cov_default/minibatch"]["selected"]) == 1  # 2e-3 * N < 1
    clip = r[f"{ds}/clip_cov/minibatch"]
    n_cand = clip["metrics"][0]["entropy_control/candidates"]
    assert 0 < len(clip["selected"]) == int(0.05 * n) < n_cand
    assert clip["metrics"][0]["entropy_control/selected_tokens"] == len(clip["selected"])
    every = r[f"{ds}/clip_cov_all/minibatch"]
    assert len(every["selected"]) == every["metrics"][0]["entropy_control/candidates"] > 0


@pytest.mark.parametrize("ds", DATASETS)
def test_clip_cov_selected_tokens_get_no_gradient(runs, ds):
    r = runs["dp2_mb4"][f"{ds}/clip_cov/minibatch"]
    sel = torch.isin(r["ids"], torch.tensor(r["selected"]))
    assert sel.any() and (r["grads"][sel] == 0).all()
    assert (r["grads"][~sel] != 0).any()


def test_ties_dataset_exercises_tie_breaking(runs):
    # The KL-Cov boundary falls inside a set of tokens with one covariance value.
    samples = make_samples("ties")
    lp = torch.cat([s["logp"] for s in samples]).double()
    a = torch.cat([s["adv"] for s in samples]).double()
    cov = (lp - lp.mean()) * (a - a.mean())
    k = int(0.05 * cov.numel())
    top = torch.sort(cov, descending=True).values
    assert top[k - 1] == top[k]


@pytest.mark.parametrize("ds", DATASETS)
@pytest.mark.parametrize("case", MICROBATCH_SCOPE_CASES)
def test_microbatch_scope_depends_on_split(runs, ds, case):
    key = f"{ds}/{case}/microbatch"
    sels = {t: runs[t][key]["selected"] for t in TOPOLOGIES}
    # Each micro-batch selects on its own: different sets, at least one per micro-batch.
    assert sels["dp1_mb1"] != sels["dp2_mb4"] and sels["dp1_mb1"] != sels["dp1_mb8"]
    assert sels["dp2_mb4"] != sels["dp1_mb8"]
    for t in TOPOLOGIES:
        assert len(sels[t]) >= runs[t][key]["num_mb"]
    # With one micro-batch on one rank, both scopes are the same thing.
    assert sels["dp1_mb1"] == runs["dp1_mb1"][f"{ds}/{case}/minibatch"]["selected"]


def test_reinforce_pp_whitening_over_dp_group(runs):
    for topo in TOPOLOGIES:
        for r in runs[topo]["rpp"]:
            assert r["max_err"] < 1e-12


def test_non_finite_input_on_one_rank_raises_on_every_rank(runs):
    msgs = runs["dp2_mb4"]["nan"]
    assert msgs[1] is not None and "advantages (micro-batch 1)" in msgs[1]
    assert msgs[0] is not None and "advantages on another rank" in msgs[0]
    assert "advantages (micro-batch 1)" in runs["dp1_mb8"]["nan"][0]
