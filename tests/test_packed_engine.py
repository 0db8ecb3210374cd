"""Packed sequences (THD, token-budget micro-batches) give what padded rows give.

One launch per layout (TP1, TP2, PP2), each on the tiny Qwen2 and the tied Llama
fixtures: the engine's log-probs and entropies, then one KL-Cov ``ppo_update`` (the
selection over the mini-batch, the loss and the gradients), for token budgets from one
sequence per micro-batch to the whole batch in one pack, against the same passes on
right-padded micro-batches of two rows. The padded passes are themselves checked
against transformers in tests/test_engine.py; here the reference is the padded run and
transformers' float64 log-probs. Agreement is to float32 rounding: log-probs and
entropies within 1e-6 of each value, gradients within 1e-5 of each tensor's largest
entry, the selected tokens exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import launch
from tests.hf_fixtures import load_policy, make_checkpoint, reference_logits

# Six rows, lengths 5..21 (one fills the width), prompts of 4 tokens.
LENGTHS = [21, 9, 14, 5, 17, 11]
BATCH, SEQ, PROMPT = len(LENGTHS), max(LENGTHS), 4
# One sequence per micro-batch (the longest fits alone), a few per pack, all in one.
BUDGETS = [21, 40, sum(LENGTHS)]
FIXTURES = ["qwen2", "llama_tied"]
LAYOUTS = {
    "tp1": dict(world_size=1),
    "tp2": dict(world_size=2, tp=2),
    "pp2": dict(world_size=2, pp=2),
}


def _batch(vocab: int):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, vocab, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ)
    mask = (positions < torch.tensor(LENGTHS)[:, None]).long()
    ids = ids * mask
    response = mask.bool() & (positions >= PROMPT)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5])[:, None].expand(BATCH, SEQ) * response
    noise = 0.3 * torch.randn(BATCH, SEQ, generator=g)
    return ids, mask, response, adv.contiguous(), noise


def _config():
    from covrl.algorithms import EntropyControlConfig, KLCovConfig, PolicyLossConfig

    return PolicyLossConfig(
        entropy_control=EntropyControlConfig(method="kl_cov", kl_cov=KLCovConfig(ratio=0.2))
    )


def _run(checkpoint, model_config, engine_config, batch, old_logp):
    """Forward pass and one ppo_update on a fresh engine; outputs on the host."""
    from covrl.engine import OptimizerConfig, PolicyEngine
    from covrl.parallel import SINGLE_PROCESS
    from covrl.training import ppo_update

    engine = PolicyEngine(
        load_policy(checkpoint, model_config),
        model_config,
        OptimizerConfig(lr=1e-4, weight_decay=0.0, clip_grad=1e9),
        engine_config,
    )
    out = engine.forward_logprobs(batch.input_ids, batch.attention_mask, lengths=LENGTHS)
    batch.old_logp = old_logp
    result = ppo_update(engine, batch, _config(), step=3, dp_group=SINGLE_PROCESS)
    # The step's gradients stay in DDP's buffers after the optimizer step.
    grads = {
        f"{i}.{name}": p.main_grad.detach().clone().cpu()
        for i, chunk in enumerate(engine.model)
        for name, p in chunk.named_parameters()
    }
    return dict(
        logp=out.logp.cpu(),
        entropy=out.entropy.cpu(),
        loss=result.loss,
        grad_norm=result.grad_norm,
        selected=result.selected.cpu(),
        num_selected=result.metrics["entropy_control/selected_tokens"],
        grads=grads,
    )


def _body(ctx, checkpoints):
    from covrl.engine import EngineConfig
    from covrl.models import PolicyModelConfig
    from covrl.training import PolicyBatch

    out = {}
    for name, checkpoint in checkpoints.items():
        config = PolicyModelConfig.from_hf(checkpoint)
        ids, mask, response, adv, noise = _batch(config.vocab_size)
        # Off-policy old log-probs (the KL-Cov penalty is live), the same for every run.
        old_logp = (reference_logprobs(checkpoint, ids) + noise).float() * response

        def batch(ids=ids, mask=mask, response=response, adv=adv):
            return PolicyBatch(
                input_ids=ids,
                attention_mask=mask,
                response_mask=response,
                sample_index=torch.arange(BATCH),
                advantages=adv,
                lengths=list(LENGTHS),
            )

        padded = EngineConfig(micro_batch_size=2)
        runs = {"padded": _run(checkpoint, config, padded, batch(), old_logp)}
        for budget in BUDGETS:
            packed = EngineConfig(max_tokens_per_micro_batch=budget)
            runs[budget] = _run(checkpoint, config, packed, batch(), old_logp)
        with pytest.raises(ValueError, match="max_tokens_per_micro_batch=20"):
            too_small = EngineConfig(max_tokens_per_micro_batch=20)
            _run(checkpoint, config, too_small, batch(), old_logp)
        out[name] = runs
    return out


def reference_logprobs(checkpoint, ids: torch.Tensor) -> torch.Tensor:
    """transformers' float64 log-probs ``[b, s]`` of the tokens (position 0 is 0)."""
    logprobs = torch.log_softmax(reference_logits(checkpoint, ids).double(), dim=-1)
    ref = torch.zeros(ids.shape, dtype=torch.float64)
    ref[:, 1:] = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return ref


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: make_checkpoint(root, name) for name in FIXTURES}


@pytest.fixture(scope="module")
def runs(checkpoints):
    return {
        name: launch(_body, checkpoints=checkpoints, timeout=400, **layout)
        for name, layout in LAYOUTS.items()
    }


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fixture", FIXTURES)
def test_packed_logprobs_match_padded_and_transformers(runs, checkpoints, layout, fixture):
    ids, mask, *_ = _batch(250)
    ref = reference_logprobs(checkpoints[fixture], ids)
    valid = mask.bool()
    valid[:, 0] = False
    for rank_out in runs[layout]:
        padded = rank_out[fixture]["padded"]
        for budget in BUDGETS:
            got = rank_out[fixture][budget]
            for key in ("logp", "entropy"):
                # Float32 rounding of other summation orders: 1e-6 of each value
                # (|log-probs| reach ~10 here, where one ulp is ~1e-6).
                rel = ((got[key] - padded[key]) / padded[key].abs().clamp(min=1))[valid]
                assert rel.abs().max() <= 1e-6, (budget, key, float(rel.abs().max()))
                assert (got[key][~mask.bool()] == 0).all()
            assert (got["logp"].double() - ref)[valid].abs().max() < 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fixture", FIXTURES)
def test_packed_update_matches_padded(runs, layout, fixture):
    """The same tokens selected, the same loss and the same gradients, whatever the
    packing."""
    for rank_out in runs[layout]:
        padded = rank_out[fixture]["padded"]
        assert padded["num_selected"] >= 3
        for budget in BUDGETS:
            got = rank_out[fixture][budget]
            assert torch.equal(got["selected"], padded["selected"]), budget
            assert got["loss"] == pytest.approx(padded["loss"], abs=1e-6)
            assert got["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-6, abs=1e-6)
            assert got["grads"].keys() == padded["grads"].keys()
            # Float32 sums over the same tokens in another order: each tensor to 1e-5
            # of its largest entry (measured: 3e-6 at most, the embedding's scatter-add).
            for name, grad in got["grads"].items():
                ref = padded["grads"][name]
                diff = float((grad - ref).abs().max())
                assert diff <= 1e-5 * float(ref.abs().max()), (budget, name, diff)
