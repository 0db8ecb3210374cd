"""ppo_update with rollout-correction weights and a reference KL, against float64 autograd.

The reference is written out here from the loss's definition, on the transformers
model in float64: per response token ``w * max(-A r, -A clip(r, 0.8, 1.2))`` (capped at
``-3 A`` for ``A < 0``) plus ``kl_coeff * k3(logp, ref)``, token-mean over the
mini-batch, and the global gradient norm of its backward. The megatron policy runs it
as one mini-batch on one rank (two micro-batches) and split over two DP ranks.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import launch
from tests.hf_fixtures import load_policy, make_checkpoint

# Four rows of up to 12 tokens, prompts of 4: about 25 response tokens.
BATCH, SEQ, PROMPT = 4, 12, 4
LENGTHS = [12, 9, 11, 7]
CLIP, DUAL_CLIP, KL_COEFF = 0.2, 3.0, 0.1


def _batch(vocab: int):
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ)
    mask = (positions < torch.tensor(LENGTHS)[:, None]).long()
    ids = ids * mask
    response = mask.bool() & (positions >= PROMPT)
    adv = torch.randn(BATCH, 1, generator=g).expand(BATCH, SEQ) * response
    # Off-policy noise large enough that the clip and the dual-clip both act.
    old_noise = 0.4 * torch.randn(BATCH, SEQ, generator=g)
    ref_noise = 0.3 * torch.randn(BATCH, SEQ, generator=g)
    # Truncated IS weights min(exp(x), 2): some truncated, all far from 1.
    weights = torch.exp(0.5 * torch.randn(BATCH, SEQ, generator=g)).clamp(max=2.0)
    return ids, mask, response, adv.contiguous(), old_noise, ref_noise, weights


def _hf_logp(model, ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` float64 log-probs aligned as the engine's (position 0 is 0)."""
    logits = model(ids).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([logp.new_zeros(ids.shape[0], 1), logp], dim=1)


def _reference(checkpoint):
    """Loss, grad norm and clip fraction in float64, and the float32 inputs of the update."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
    model = model.double().eval()
    ids, mask, response, adv, old_noise, ref_noise, weights = _batch(model.config.vocab_size)
    with torch.no_grad():
        logp0 = _hf_logp(model, ids)
    old_logp = ((logp0 + old_noise) * response).float()
    ref_logp = ((logp0 + ref_noise) * response).float()

    logp = _hf_logp(model, ids)
    a = adv.double()
    ratio = torch.exp(logp - old_logp.double())
    surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP, 1 + CLIP))
    clipped = (-a * ratio.clamp(1 - CLIP, 1 + CLIP)) > (-a * ratio)
    surrogate = torch.where((a < 0) & (surrogate > -a * DUAL_CLIP), -a * DUAL_CLIP, surrogate)
    d = ref_logp.double() - logp
    k3 = torch.exp(d) - d - 1
    token = weights.double() * surrogate + KL_COEFF * k3
    loss = token[response].sum() / response.sum()
    unweighted = (surrogate + KL_COEFF * k3)[response].sum() / response.sum()
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
    return dict(
        loss=float(loss.detach()),
        unweighted_loss=float(unweighted.detach()),
        grad_norm=float(grad_norm),
        clipfrac=float(clipped[response].double().mean()),
        ref_kl=float(k3.detach()[response].mean()),
        inputs=dict(
            ids=ids,
            mask=mask,
            response=response,
            adv=adv.float(),
            old_logp=old_logp,
            ref_logp=ref_logp,
            weights=weights.float(),
        ),
    )


def _body(ctx, checkpoint, inputs, micro_batch_size):
    from megatron.core import parallel_state as ps

    from covrl.algorithms import PolicyLossConfig
    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig
    from covrl.training import PolicyBatch, ppo_update

    model_config = PolicyModelConfig.from_hf(checkpoint)
    chunks = load_policy(checkpoint, model_config)
    engine = PolicyEngine(
        chunks,
        model_config,
        OptimizerConfig(lr=1e-4, weight_decay=0.0, clip_grad=100.0),
        EngineConfig(micro_batch_size=micro_batch_size),
    )
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = torch.arange(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    batch = PolicyBatch(
        input_ids=inputs["ids"][rows],
        attention_mask=inputs["mask"][rows],
        response_mask=inputs["response"][rows],
        sample_index=rows,
        old_logp=inputs["old_logp"][rows],
        advantages=inputs["adv"][rows],
        ref_logp=inputs["ref_logp"][rows],
        rollout_weights=inputs["weights"][rows],
    )
    config = PolicyLossConfig(
        clip_ratio_low=CLIP, clip_ratio_high=CLIP, clip_ratio_c=DUAL_CLIP, kl_coeff=KL_COEFF
    )
    r = ppo_update(engine, batch, config, step=0, dp_group=ps.get_data_parallel_group())
    return dict(loss=r.loss, grad_norm=r.grad_norm, ok=r.update_successful, **r.metrics)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("hf"), "qwen2")
    ref = _reference(checkpoint)
    layouts = {"dp1_mb2": (1, 2), "dp2_mb1": (2, 1)}  # (world size, micro-batch size)
    runs = {
        name: launch(
            _body,
            world_size=world,
            checkpoint=checkpoint,
            inputs=ref["inputs"],
            micro_batch_size=mbs,
        )
        for name, (world, mbs) in layouts.items()
    }
    return ref, runs


def test_reference_is_sensitive_to_the_weights(results):
    ref, _ = results
    assert abs(ref["loss"] - ref["unweighted_loss"]) > 1e-2
    assert 0.0 < ref["clipfrac"] < 1.0


@pytest.mark.parametrize("layout", ["dp1_mb2", "dp2_mb1"])
def test_weighted_loss_and_gradient_match_reference(results, layout):
    ref, runs = results
    for r in runs[layout]:
        assert r["ok"]
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert r["pg_clipfrac"] == pytest.approx(ref["clipfrac"], abs=1e-9)
        assert r["ref_kl"] == pytest.approx(ref["ref_kl"], rel=1e-4, abs=1e-7)
        assert r["num_tokens"] == int(ref["inputs"]["response"].sum())


def test_batch_validation_names_the_field():
    from covrl.training import PolicyBatch

    z = torch.zeros(2, 5)
    batch = PolicyBatch(
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        response_mask=torch.ones(2, 5, dtype=torch.bool),
        sample_index=torch.arange(2),
        old_logp=z,
        advantages=z,
        rollout_weights=torch.zeros(2, 4),
    )
    with pytest.raises(ValueError, match="rollout_weights has shape"):
        batch.validate()
