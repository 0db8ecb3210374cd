"""Clip-Cov / KL-Cov end to end on the megatron policy: the split does not matter.

Two PPO epochs (:func:`covrl.training.ppo_update`) over one GRPO mini-batch of a tiny
Qwen2 policy: each epoch takes the current log-probs with a no-grad forward, selects
tokens over the whole mini-batch and data-parallel group, then runs the gradient
micro-batches.
The selected tokens, the loss and the grad norm must be the same for one micro-batch
on one rank, four micro-batches on each of two DP ranks, eight micro-batches on one
rank, and under TP=2 and PP=2 -- the property the public per-micro-batch selection
lacks.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import launch
from tests.hf_fixtures import load_policy, make_checkpoint

# Two GRPO groups of four responses (~70 response tokens): eight rows split as 1 x 8,
# 2 x 4 and 8 x 1 micro-batches; prompts of 4 tokens, responses up to 10.
BATCH, SEQ, PROMPT, GROUP = 8, 14, 4, 4
EPOCHS = 2  # the second epoch is off-policy (KL-Cov's |logp - logp_old| is live)


def _rollout(vocab: int):
    """Right-padded prompt+response rows, response mask, GRPO advantages."""
    from covrl.algorithms import broadcast_to_tokens, grpo_advantages

    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    lengths = torch.randint(PROMPT + 3, SEQ + 1, (BATCH,), generator=g)
    positions = torch.arange(SEQ)
    mask = (positions < lengths[:, None]).long()
    ids = ids * mask
    response = mask.bool() & (positions >= PROMPT)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = broadcast_to_tokens(grpo_advantages(rewards, torch.arange(BATCH) // GROUP), response)
    return ids, mask, response, adv


def _config(method: str):
    from covrl.algorithms import (
        ClipCovConfig,
        EntropyControlConfig,
        KLCovConfig,
        PolicyLossConfig,
    )

    # Ratios and band sized for ~70 tokens, so several tokens are selected; PPO clip
    # 0.2 so that Clip-Cov's "not clipped" filter has tokens to exclude.
    return PolicyLossConfig(
        clip_ratio_low=0.2,
        clip_ratio_high=0.2,
        entropy_control=EntropyControlConfig(
            method=method,
            seed=5,
            clip_cov=ClipCovConfig(ratio=0.1, omega_low=0.05, omega_high=5.0),
            kl_cov=KLCovConfig(ratio=0.1, beta=1.0),
        ),
    )


def _body(ctx, checkpoint, micro_batch_size):
    from megatron.core import parallel_state as ps

    from covrl.algorithms import canonical_token_ids
    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig
    from covrl.training import PolicyBatch, ppo_update

    model_config = PolicyModelConfig.from_hf(checkpoint)
    ids, mask, response, adv = _rollout(model_config.vocab_size)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    dp_group = ps.get_data_parallel_group()
    rows = torch.arange(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    ids, mask, response, adv = ids[rows], mask[rows], response[rows], adv[rows]
    token_ids = canonical_token_ids(rows, response)
    out = {}
    for method in ("kl_cov", "clip_cov"):
        cfg = _config(method)
        chunks = load_policy(checkpoint, model_config)
        engine = PolicyEngine(
            chunks,
            model_config,
            OptimizerConfig(lr=5e-5, weight_decay=0.0, clip_grad=10.0),
            EngineConfig(micro_batch_size=micro_batch_size),
        )
        old_logp = engine.forward_logprobs(ids, mask).logp
        batch = PolicyBatch(
            input_ids=ids,
            attention_mask=mask,
            response_mask=response,
            sample_index=rows,
            old_logp=old_logp,
            advantages=adv,
        )
        epochs = []
        for epoch in range(EPOCHS):
            # The current policy, as the update's selection pass sees it.
            logp = engine.forward_logprobs(ids, mask).logp
            r = ppo_update(engine, batch, cfg, step=epoch, dp_group=dp_group)
            epochs.append(
                dict(
                    loss=r.loss,
                    grad_norm=r.grad_norm,
                    num_selected=r.metrics["entropy_control/selected_tokens"],
                    selected_ids=sorted(token_ids[r.selected].tolist()),
                    max_abs_log_ratio=float((logp - old_logp)[response].abs().max()),
                )
            )
        out[method] = epochs
    return out


LAYOUTS = {
    "dp1_mb1": dict(world_size=1, micro_batch_size=8),
    "dp2_mb4": dict(world_size=2, micro_batch_size=1),
    "dp1_mb8": dict(world_size=1, micro_batch_size=1),
    "tp2_mb2": dict(world_size=2, tp=2, micro_batch_size=2),
    "pp2_mb4": dict(world_size=2, pp=2, micro_batch_size=2),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("hf"), "qwen2")
    return {
        # Multi-rank layouts run under the device-separation mode (tests/device_mode.py).
        name: launch(_body, checkpoint=checkpoint, timeout=400, **layout)
        for name, layout in LAYOUTS.items()
    }


def _selected_ids(per_rank, method, epoch):
    ids = []
    for r in per_rank:
        ids += r[method][epoch]["selected_ids"]
    return sorted(set(ids))


@pytest.mark.parametrize("method", ["kl_cov", "clip_cov"])
@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "dp1_mb1"])
def test_same_selection_loss_and_grad_norm(runs, method, layout):
    ref, got = runs["dp1_mb1"], runs[layout]
    for epoch in range(EPOCHS):
        assert _selected_ids(got, method, epoch) == _selected_ids(ref, method, epoch)
        for r in got:
            g, e = r[method][epoch], ref[0][method][epoch]
            assert g["num_selected"] == e["num_selected"]
            assert g["loss"] == pytest.approx(e["loss"], abs=1e-6, rel=1e-5)
            assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("method", ["kl_cov", "clip_cov"])
def test_selection_is_active(runs, method):
    ref = runs["dp1_mb1"][0][method]
    tokens = int(_rollout(250)[2].sum())
    for epoch in range(EPOCHS):
        # floor(0.1 * N) tokens for KL-Cov; Clip-Cov draws as many from its band.
        assert ref[epoch]["num_selected"] == len(_selected_ids(runs["dp1_mb1"], method, epoch))
        if method == "kl_cov":
            assert ref[epoch]["num_selected"] == int(0.1 * tokens)
        else:
            assert 0 < ref[epoch]["num_selected"] <= int(0.1 * tokens)
    # The second epoch is off-policy, so KL-Cov's |logp - logp_old| term is live.
    assert ref[0]["max_abs_log_ratio"] == 0.0
    assert ref[1]["max_abs_log_ratio"] > 1e-2
    assert min(e["grad_norm"] for e in ref) > 0.1
