"""Policy losses, aggregation and loss metrics against float64 references (values and
gradients wrt logp), and the degenerate inputs of a loss step."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from covrl.algorithms import (
    ClipCovConfig,
    EntropyControlConfig,
    KLCovConfig,
    PolicyLossConfig,
    aggregate_loss,
    compute_policy_loss,
    global_loss_count,
    megatron_loss_scale,
    policy_metric_sums,
    reduce_metric_sums,
)
from covrl.parallel import SINGLE_PROCESS

B, S = 6, 20


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [20, 13, 0, 1, 7, 18]  # row 2 is empty, row 3 has one token
    mask = torch.zeros(B, S, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    old = -torch.rand(B, S, generator=g) * 4
    # Log-ratios wide enough to hit both clip sides and the dual clip.
    logp = old + 0.8 * torch.randn(B, S, generator=g)
    adv = torch.randn(B, S, generator=g)
    adv[0, :3] = 0.0
    sel = (torch.rand(B, S, generator=g) < 0.2) & mask
    ent = torch.rand(B, S, generator=g) * 2
    ref = logp + 0.5 * torch.randn(B, S, generator=g)
    nan = torch.tensor(float("nan"))
    # Padding holds garbage; it must never reach the loss or the gradient.
    fill = [torch.where(mask, t, nan) for t in (logp, old, adv, ent, ref)]
    return (*fill, mask, sel)


def _ref_token_loss(lp, old, adv, sel, ent, ref, cfg: PolicyLossConfig):
    """float64 reference of the per-token loss, written piecewise."""
    (low, high), c = cfg.clip_range, cfg.clip_ratio_c
    r = torch.exp(lp - old)
    ec = cfg.entropy_control
    if ec.method == "kl_cov" and not ec.kl_cov.ppo_clip:
        loss = -adv * r
    else:
        pos = -adv * torch.minimum(r, torch.full_like(r, 1 + high))
        neg = -adv * torch.maximum(r, torch.full_like(r, 1 - low))
        if c is not None:
            neg = torch.minimum(neg, -adv * c)
        loss = torch.where(adv > 0, pos, torch.where(adv < 0, neg, torch.zeros_like(r)))
    if ec.method == "clip_cov":
        loss = torch.where(sel, torch.zeros_like(loss), loss)
    if ec.method == "kl_cov":
        loss = loss + torch.where(sel, ec.kl_cov.beta * (lp - old).abs(), torch.zeros_like(loss))
    loss = loss - cfg.entropy_coeff * ent
    d = lp - ref
    kl = {
        "k1": d,
        "abs": d.abs(),
        "k2": 0.5 * d * d,
        "k3": torch.exp(-d) + d - 1,
    }[cfg.kl_estimator]
    return loss + cfg.kl_coeff * kl


def _ref_aggregate(tok, mask, mode, const):
    rows = [tok[i][mask[i]] for i in range(tok.shape[0])]
    if mode == "token-mean":
        n = int(mask.sum())
        return sum(r.sum() for r in rows) / max(n, 1)
    nonempty = [r for r in rows if r.numel()]
    if mode == "seq-mean-token-mean":
        return sum(r.mean() for r in nonempty) / len(nonempty)
    return sum(r.sum() / (const or 1.0) for r in nonempty) / len(nonempty)


def _ec(method="none", **kw):
    return EntropyControlConfig(method=method, **kw)


CONFIGS = {
    "ppo": PolicyLossConfig(),
    "clip_higher_no_dual": PolicyLossConfig(clip_ratio_high=0.28, clip_ratio_c=None),
    "dual_clip_2": PolicyLossConfig(clip_ratio_c=2.0),
    # Clip-Cov under the PPO clip range of "ppo", and with the paper's range of 1.
    "clip_cov": PolicyLossConfig(
        clip_ratio_low=0.2, clip_ratio_high=0.2, entropy_control=_ec("clip_cov")
    ),
    "clip_cov_range_1": PolicyLossConfig(entropy_control=_ec("clip_cov")),
    "kl_cov": PolicyLossConfig(entropy_control=_ec("kl_cov")),
    "kl_cov_beta_half_clip": PolicyLossConfig(
        entropy_control=_ec("kl_cov", kl_cov=KLCovConfig(beta=0.5, ppo_clip=True))
    ),
    "entropy_bonus": PolicyLossConfig(entropy_coeff=0.01),
    **{
        f"ref_kl_{e}": PolicyLossConfig(kl_coeff=0.2, kl_estimator=e)
        for e in ("k1", "abs", "k2", "k3")
    },
    "all": PolicyLossConfig(
        entropy_coeff=0.003, kl_coeff=0.05, entropy_control=_ec("kl_cov", kl_cov=KLCovConfig())
    ),
}
MODES = [
    ("token-mean", None),
    ("seq-mean-token-mean", None),
    ("seq-mean-token-sum", None),
    ("seq-mean-token-sum", 20.0),
]


@pytest.mark.parametrize("mode,const", MODES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_grad_match_float64_reference(name, mode, const):
    cfg = CONFIGS[name]
    logp, old, adv, ent, ref, mask, sel = _data()
    use_sel = cfg.entropy_control.method != "none"

    leaf = logp.clone().requires_grad_(True)
    out = compute_policy_loss(
        leaf,
        old_logp=old,
        advantages=adv,
        mask=mask,
        config=cfg,
        selected=sel if use_sel else None,
        entropy=ent,
        ref_logp=ref,
    )
    count = global_loss_count([mask], mode, SINGLE_PROCESS)
    loss = aggregate_loss(out.token_loss, mask, mode, count, const)
    loss.backward()

    z = torch.zeros((), dtype=torch.float64)
    lp64 = torch.where(mask, logp.double(), z).requires_grad_(True)
    args = [torch.where(mask, t.double(), z) for t in (old, adv)]
    tok = _ref_token_loss(
        lp64, *args, sel, *[torch.where(mask, t.double(), z) for t in (ent, ref)], cfg
    )
    ref_loss = _ref_aggregate(tok, mask, mode, const)
    ref_loss.backward()

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(leaf.grad.double(), lp64.grad, rtol=1e-5, atol=1e-7)
    assert (leaf.grad[~mask] == 0).all()
    torch.testing.assert_close(
        out.token_loss.double(), torch.where(mask, tok, z).detach(), rtol=1e-5, atol=1e-6
    )


def test_ppo_analytic_gradient_and_clip_flags():
    cfg = CONFIGS["ppo"]
    logp, old, adv, _, _, mask, _ = _data(1)
    leaf = logp.clone().requires_grad_(True)
    out = compute_policy_loss(leaf, old_logp=old, advantages=adv, mask=mask, config=cfg)
    out.token_loss.sum().backward()
    r = torch.exp(logp.double() - old.double())
    a = adv.double()
    clipped = ((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8))
    dual = (a < 0) & (r > 3.0)
    assert clipped.any() and dual.any()
    assert torch.equal(out.clipped, clipped & mask)
    assert torch.equal(out.dual_clipped, dual & mask)
    # d(-A r)/dlogp = -A r where unclipped; 0 where a clip is active.
    expect = torch.where(mask & ~clipped & ~dual, -a * r, 0.0)
    torch.testing.assert_close(leaf.grad.double(), expect, rtol=1e-5, atol=1e-7)


def test_clip_cov_zeroes_selected_terms_but_keeps_them_in_denominator():
    logp, old, adv, _, _, mask, sel = _data(2)
    cfg = CONFIGS["clip_cov"]
    base = compute_policy_loss(
        logp, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["ppo"]
    ).token_loss
    out = compute_policy_loss(
        logp, old_logp=old, advantages=adv, mask=mask, config=cfg, selected=sel
    )
    assert (out.token_loss[sel] == 0).all()
    assert torch.equal(out.token_loss[~sel], base[~sel])
    n = global_loss_count([mask], "token-mean", SINGLE_PROCESS)
    assert aggregate_loss(out.token_loss, mask, "token-mean", n).item() == pytest.approx(
        base[mask & ~sel].sum().item() / mask.sum().item(), rel=1e-6
    )


def test_kl_cov_is_inert_on_policy():
    # One update per rollout batch: logp == logp_old, the penalty and its gradient vanish.
    _, old, adv, _, _, mask, sel = _data(3)
    leaf = old.clone().requires_grad_(True)
    out = compute_policy_loss(
        leaf, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["kl_cov"], selected=sel
    )
    out.token_loss.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.where(mask, -adv, 0.0))


def test_megatron_scaling_composes_to_the_minibatch_gradient():
    """M micro-batches on D ranks, Megatron dividing by M and averaging over D."""
    logp, old, adv, _, _, mask, _ = _data(4)
    cfg = CONFIGS["ppo"]
    mode = "seq-mean-token-mean"
    theta = torch.zeros((), requires_grad=True)
    full = aggregate_loss(
        compute_policy_loss(
            logp + theta, old_logp=old, advantages=adv, mask=mask, config=cfg
        ).token_loss,
        mask,
        mode,
        global_loss_count([mask], mode, SINGLE_PROCESS),
    )
    (g_full,) = torch.autograd.grad(full, theta)
    rows = [[0, 1], [2], [3, 4, 5]]  # 3 micro-batches "on 2 ranks" (rank 0: first two)
    parts = [(logp[r], old[r], adv[r], mask[r]) for r in rows]
    count = global_loss_count([p[3] for p in parts], mode, SINGLE_PROCESS)
    ranks = [[0, 1], [2]]
    avg = 0.0
    for mbs in ranks:
        g = 0.0
        for j in mbs:
            lp, o, a, m = parts[j]
            loss = aggregate_loss(
                compute_policy_loss(
                    lp + theta, old_logp=o, advantages=a, mask=m, config=cfg
                ).token_loss,
                m,
                mode,
                count,
            )
            (gj,) = torch.autograd.grad(loss * megatron_loss_scale(len(mbs), 2) / len(mbs), theta)
            g += gj.item()
        avg += g / 2
    assert avg == pytest.approx(g_full.item(), rel=1e-6)


def test_metric_sums_against_reference():
    logp, old, adv, ent, _, mask, _ = _data(6)
    cfg = CONFIGS["dual_clip_2"]
    halves = [slice(0, 3), slice(3, 6)]
    sums = [
        policy_metric_sums(
            compute_policy_loss(
                logp[h], old_logp=old[h], advantages=adv[h], mask=mask[h], config=cfg
            ),
            ent[h],
        )
        for h in halves
    ]
    got = reduce_metric_sums(sums, SINGLE_PROCESS)
    lr = (logp.double() - old.double())[mask]
    r, a = lr.exp(), adv.double()[mask]
    assert got["pg_clipfrac"] == pytest.approx(
        (((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8))).double().mean().item()
    )
    assert got["pg_clipfrac_dual"] == pytest.approx(((a < 0) & (r > 2.0)).double().mean().item())
    assert got["approx_kl_k2"] == pytest.approx((0.5 * lr**2).mean().item())
    assert got["approx_kl_k3"] == pytest.approx((r - 1 - lr).mean().item())
    assert got["entropy"] == pytest.approx(ent.double()[mask].mean().item())


# --- degenerate inputs ---------------------------------------------------------------


def test_empty_mask_gives_zero_loss_and_zero_grad():
    logp, old, adv, _, _, _, _ = _data()
    mask = torch.zeros(B, S, dtype=torch.bool)
    leaf = logp.clone().requires_grad_(True)
    out = compute_policy_loss(
        leaf, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["kl_cov"], selected=mask
    )
    for mode, const in MODES:
        count = global_loss_count([mask], mode, SINGLE_PROCESS)
        assert count.item() == 0
        loss = aggregate_loss(out.token_loss, mask, mode, count, const)
        assert loss.item() == 0.0
    loss.backward()
    assert (leaf.grad == 0).all()
    sums = reduce_metric_sums([policy_metric_sums(out)], SINGLE_PROCESS)
    assert all(v == 0.0 for v in sums.values())


def test_single_valid_token():
    logp, old, adv, _, _, _, _ = _data()
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[4, 2] = True
    leaf = logp.clone().requires_grad_(True)
    out = compute_policy_loss(leaf, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["ppo"])
    aggregate_loss(
        out.token_loss, mask, "token-mean", global_loss_count([mask], "token-mean", SINGLE_PROCESS)
    ).backward()
    r = math.exp(logp[4, 2].item() - old[4, 2].item())
    a = adv[4, 2].item()
    clipped = (a > 0 and r > 1.2) or (a < 0 and (r < 0.8 or r > 3.0))
    assert leaf.grad[4, 2].item() == pytest.approx(0.0 if clipped else -a * r, rel=1e-6)
    assert leaf.grad.count_nonzero() <= 1


@pytest.mark.parametrize("bad", ["logp", "old_logp", "advantages", "entropy", "ref_logp"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_named(bad, value):
    logp, old, adv, ent, ref, mask, _ = _data()
    t = dict(logp=logp, old_logp=old, advantages=adv, entropy=ent, ref_logp=ref)
    t[bad] = t[bad].clone()
    t[bad][1, 5] = value  # a valid position
    cfg = PolicyLossConfig(entropy_coeff=0.01, kl_coeff=0.1)
    with pytest.raises(ValueError, match=rf"non-finite.*\b{bad}\b \(1 of"):
        compute_policy_loss(
            t["logp"],
            old_logp=t["old_logp"],
            advantages=t["advantages"],
            mask=mask,
            config=cfg,
            entropy=t["entropy"],
            ref_logp=t["ref_logp"],
        )


def test_argument_errors():
    logp, old, adv, _, _, mask, sel = _data()
    with pytest.raises(ValueError, match="needs the selection mask"):
        compute_policy_loss(
            logp, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["clip_cov"]
        )
    with pytest.raises(ValueError, match="method is 'none'"):
        compute_policy_loss(
            logp, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["ppo"], selected=sel
        )
    with pytest.raises(ValueError, match="needs the entropy"):
        compute_policy_loss(
            logp, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["entropy_bonus"]
        )
    with pytest.raises(ValueError, match="needs ref_logp"):
        compute_policy_loss(
            logp, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["ref_kl_k3"]
        )
    with pytest.raises(ValueError, match=r"old_logp has shape \(6, 19\)"):
        compute_policy_loss(
            logp, old_logp=old[:, 1:], advantages=adv, mask=mask, config=CONFIGS["ppo"]
        )
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(logp, mask, "token-sum", 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: PolicyLossConfig(clip_ratio_c=1.0),
        lambda: PolicyLossConfig(clip_ratio_low=-0.1),
        lambda: PolicyLossConfig(kl_estimator="k4"),
        lambda: PolicyLossConfig(loss_agg_mode="sum"),
        lambda: ClipCovConfig(omega_low=5.0, omega_high=1.0),
        lambda: ClipCovConfig(ratio=0.0),
        lambda: KLCovConfig(ratio=1.5),
        lambda: EntropyControlConfig(method="clip-cov"),
        lambda: EntropyControlConfig(scope="global"),
    ],
)
def test_config_validation(make):
    with pytest.raises(ValueError):
        make()


def test_clip_cov_alone_is_the_papers_recipe():
    def clip_range(method, **kwargs):
        ec = EntropyControlConfig(method=method)
        return PolicyLossConfig(entropy_control=ec, **kwargs).clip_range

    assert clip_range("clip_cov") == (1.0, 1.0)  # Cui et al. 2025, Clip-Cov runs
    assert clip_range("kl_cov") == clip_range("none") == (0.2, 0.2)
    assert clip_range("clip_cov", clip_ratio_low=0.2, clip_ratio_high=0.28) == (0.2, 0.28)


def test_paper_defaults():
    ec = EntropyControlConfig()
    assert (ec.clip_cov.ratio, ec.clip_cov.omega_low, ec.clip_cov.omega_high) == (2e-4, 1.0, 5.0)
    assert (ec.kl_cov.ratio, ec.kl_cov.beta, ec.kl_cov.ppo_clip) == (2e-3, 1.0, False)
    assert ec.scope == "minibatch" and ec.logp_source == "current"


def _autograd_surrogate(logp, old, adv, mask, sel, p):
    """The surrogate composed of plain autograd ops (float64 reference of SurrogateLoss)."""
    z = torch.zeros((), dtype=logp.dtype)
    lp, old, adv = (torch.where(mask, t, z) for t in (logp, old, adv))
    lr = lp - old
    r = torch.exp(lr.clamp(-p.log_ratio_clamp, p.log_ratio_clamp))
    loss = -adv * r
    if p.ppo_clip:
        loss = torch.maximum(loss, -adv * r.clamp(1 - p.clip_ratio_low, 1 + p.clip_ratio_high))
        if p.clip_ratio_c is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -adv * p.clip_ratio_c), loss)
    if p.stop_selected:
        loss = torch.where(sel, z, loss)
    if p.kl_beta is not None:
        loss = loss + torch.where(sel, p.kl_beta * lr.abs(), z)
    return torch.where(mask, loss, z)


@pytest.mark.parametrize("name", ["ppo", "clip_higher_no_dual", "clip_cov", "kl_cov", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_surrogate_function_matches_float64_autograd(name, dtype):
    from covrl.algorithms.policy_loss import SurrogateLoss, SurrogateParams

    cfg = CONFIGS[name]
    logp, old, adv, _, _, mask, sel = _data(5)
    logp = logp.clone()
    logp[0, 4:6] = old[0, 4:6] + torch.tensor([25.0, -25.0])  # log-ratio clamp active
    params = SurrogateParams.from_config(replace(cfg, log_ratio_clamp=20.0))
    leaf = logp.to(dtype, copy=True).requires_grad_(True)
    out, lr, clipped, dual = SurrogateLoss.apply(
        leaf, old.to(dtype), adv.to(dtype), mask, sel, params
    )
    weights = torch.rand(B, S, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (out * weights.to(dtype)).sum().backward()

    lp64 = logp.double().requires_grad_(True)
    ref = _autograd_surrogate(lp64, old.double(), adv.double(), mask, sel, params)
    (ref * weights).sum().backward()
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    torch.testing.assert_close(leaf.grad.double(), lp64.grad, **tol)
    assert leaf.grad[0, 4:6].eq(0).all() or params.kl_beta is not None
    assert not lr.requires_grad and lr.dtype == dtype
    assert torch.equal(lr, torch.where(mask, logp.to(dtype) - old.to(dtype), 0).to(dtype))
    assert not (clipped | dual)[~mask].any()
    if not params.ppo_clip:
        assert not (clipped | dual).any()


def test_finite_check_clears_a_float32_overflow_false_alarm():
    # Finite log-ratios whose float32 sum overflows: the cheap check trips, the exact
    # diagnosis finds every input and loss term finite, so no error.
    logp, old, adv, _, _, mask, _ = _data(7)
    old = torch.where(mask, torch.full_like(old, -3e38), old)
    logp = torch.where(mask, torch.full_like(logp, -1e38), logp)
    out = compute_policy_loss(logp, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["ppo"])
    assert torch.isfinite(out.token_loss).all()
    assert not math.isfinite(out.log_ratio.sum().item())


def test_non_finite_log_ratio_of_finite_inputs_is_an_error():
    logp, old, adv, _, _, mask, _ = _data(8)
    logp, old = logp.clone(), old.clone()
    logp[1, 5], old[1, 5] = 3e38, -3e38  # finite inputs, log-ratio overflows to inf
    with pytest.raises(ValueError, match="non-finite policy loss terms"):
        compute_policy_loss(logp, old_logp=old, advantages=adv, mask=mask, config=CONFIGS["ppo"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_padding_zeroer_matches_masked(dtype):
    from covrl.ops.masking import PaddingZeroer, masked

    g = torch.Generator().manual_seed(9)
    mask = torch.rand(5, 7, generator=g) < 0.6
    x = torch.randn(5, 7, generator=g).to(dtype)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)
    x[~mask & (torch.arange(7) % 2 == 0)] = float("nan")  # garbage at padding
    zero = PaddingZeroer(mask)
    for t in (x, x.t().contiguous().t(), x[:, ::2]):
        m = mask if t.shape == mask.shape else mask[:, ::2]
        z = PaddingZeroer(m) if t.shape != mask.shape else zero
        got, want = z(t), masked(t, m)
        assert got.dtype == dtype and got.shape == t.shape
        # Bitwise equal (NaN at valid positions included); +0.0 at padding.
        bits = [r.contiguous().view(torch.uint8) for r in (got, want)]
        assert torch.equal(*bits)
