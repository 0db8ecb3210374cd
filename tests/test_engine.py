"""PolicyEngine on Hugging Face checkpoints: log-prob passes and training steps.

References: transformers' float32 forward with a float64 log_softmax (log-probs and
entropies), and the TP=1 single-process run for the training step (loss and grad
norm must agree at TP2, PP2, DP2, TP2 x PP2 and the interleaved PP2 x VPP2 schedule).
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import TOPOLOGIES, launch
from tests.hf_fixtures import load_policy, make_checkpoint, reference_logits

# Four rows so that DP2 gets two each and micro-batches of 1 give several per rank;
# lengths all different (one full row) so padding is exercised at every length.
BATCH, SEQ = 4, 14
LENGTHS = [14, 9, 12, 5]  # right-padded rows
TEMPERATURE = 0.7  # != 1, so a missing temperature shows in the log-probs
STEPS = 3  # Adam's state matters from the second step on


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        ids[i, n:] = 0  # pad id
    return ids, mask


def _nll_loss_fn(global_tokens: int):
    """Token-mean next-token NLL over the whole mini-batch (all DP ranks)."""

    def loss_fn(out, micro):
        mask = micro["attention_mask"].float()
        mask[:, 0] = 0  # the first token has no prefix to be scored from
        loss = -(out.logp * mask).sum() / global_tokens
        return loss, {"tokens": mask.sum(), "entropy_sum": (out.entropy * mask).sum()}

    return loss_fn


def _engine_body(ctx, checkpoint, vpp_micro_batches=False):
    from megatron.core import parallel_state as ps

    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig

    config = PolicyModelConfig.from_hf(checkpoint)
    chunks = load_policy(checkpoint, config)
    ids, mask = _batch(config.vocab_size)
    out = {}

    # 1. Forward-only log-probs and entropies (full batch on every rank), with temperature.
    fwd = PolicyEngine(
        chunks, config, config=EngineConfig(micro_batch_size=2, temperature=TEMPERATURE)
    )
    res = fwd.forward_logprobs(ids, mask)
    out["logp"], out["entropy"] = res.logp, res.entropy

    # 2. Training: this DP rank's rows, token-mean over the global batch.
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    global_tokens = int(mask[:, 1:].sum())
    engine = PolicyEngine(
        chunks,
        config,
        OptimizerConfig(lr=3e-3, weight_decay=0.0, clip_grad=1.0),
        EngineConfig(micro_batch_size=1),
    )
    steps = []
    for _ in range(STEPS):
        r = engine.train_step(
            {"input_ids": ids[rows], "attention_mask": mask[rows]}, _nll_loss_fn(global_tokens)
        )
        steps.append(dict(loss=r.loss, grad_norm=r.grad_norm, ok=r.update_successful, **r.metrics))
    out["steps"] = steps
    out["lr"] = r.lr
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hf"), "qwen2")


@pytest.fixture(scope="module")
def runs(checkpoint):
    # Multi-rank layouts run under the device-separation mode (tests/device_mode.py).
    return {
        name: launch(_engine_body, checkpoint=checkpoint, timeout=400, **topo)
        for name, topo in TOPOLOGIES.items()
    }


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' logits -> float64 log-softmax at the engine's temperature."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(checkpoint).vocab_size
    ids, mask = _batch(vocab)
    raw = reference_logits(checkpoint, ids).double()
    logprobs = torch.log_softmax(raw / TEMPERATURE, dim=-1)
    logp = torch.zeros(BATCH, SEQ, dtype=torch.float64)
    logp[:, 1:] = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = torch.zeros(BATCH, SEQ, dtype=torch.float64)
    entropy[:, 1:] = -(logprobs.exp() * logprobs).sum(-1)[:, :-1]
    return logp, entropy, mask, raw


@pytest.mark.parametrize("topo", list(TOPOLOGIES))
def test_forward_logprobs_match_transformers(runs, reference, topo):
    logp, entropy, mask, _ = reference
    valid = mask.bool()  # padded positions are unconstrained
    for rank_out in runs[topo]:  # every rank returns the full result
        torch.testing.assert_close(rank_out["logp"].double()[valid], logp[valid], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            rank_out["entropy"].double()[valid], entropy[valid], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("topo", [t for t in TOPOLOGIES if t != "tp1"])
def test_train_steps_match_tp1(runs, topo):
    ref = runs["tp1"][0]["steps"]
    for rank_out in runs[topo]:
        got = rank_out["steps"]
        # The first step sees identical weights: loss and grad norm to 1e-5.
        assert got[0]["loss"] == pytest.approx(ref[0]["loss"], abs=1e-5)
        assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], abs=1e-5, rel=1e-5)
        assert got[0]["tokens"] == ref[0]["tokens"] == sum(LENGTHS) - BATCH
        for g, r in zip(got[1:], ref[1:], strict=True):
            assert g["loss"] == pytest.approx(r["loss"], abs=1e-4)


def test_first_step_loss_is_the_reference_nll(runs, reference):
    """Training runs at temperature 1: the step's loss is transformers' token-mean NLL."""
    _, _, mask, raw = reference
    ids, _ = _batch(raw.shape[-1])
    logprobs = torch.log_softmax(raw, dim=-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].double()
    nll = -(logprobs * valid).sum() / valid.sum()
    for topo in TOPOLOGIES:
        assert runs[topo][0]["steps"][0]["loss"] == pytest.approx(nll.item(), abs=1e-5), topo


@pytest.mark.parametrize("topo", list(TOPOLOGIES))
def test_few_steps_reduce_loss(runs, topo):
    steps = runs[topo][0]["steps"]
    assert all(s["ok"] for s in steps)
    losses = [s["loss"] for s in steps]
    assert losses[-1] < losses[0] - 0.05, losses


def _bf16_body(ctx, checkpoint):

    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig

    config = PolicyModelConfig.from_hf(checkpoint, params_dtype=torch.bfloat16)
    chunks = load_policy(checkpoint, config)
    ids, mask = _batch(config.vocab_size)
    engine = PolicyEngine(
        chunks,
        config,
        OptimizerConfig(lr=3e-3, weight_decay=0.0, clip_grad=1.0),
        EngineConfig(micro_batch_size=2, temperature=TEMPERATURE),
    )
    out = engine.forward_logprobs(ids, mask)
    engine.config.temperature = 1.0
    global_tokens = int(mask[:, 1:].sum())
    steps = [
        engine.train_step({"input_ids": ids, "attention_mask": mask}, _nll_loss_fn(global_tokens))
        for _ in range(STEPS)
    ]
    dtypes = {p.dtype for m in engine.model for p in m.parameters()}
    return dict(logp=out.logp, losses=[s.loss for s in steps], dtypes=dtypes)


@pytest.fixture(scope="module")
def bf16_runs(checkpoint):
    return {
        name: launch(_bf16_body, checkpoint=checkpoint, timeout=300, **TOPOLOGIES[name])
        for name in ("tp1", "tp2pp2")
    }


@pytest.mark.parametrize("topo", ["tp1", "tp2pp2"])
def test_bf16_engine(bf16_runs, reference, runs, topo):
    """bf16 parameters (Float16Module, fp32 main params in the optimizer): log-probs
    close to the float32 reference, and training still lowers the loss."""
    logp, _, mask, _ = reference
    valid = mask.bool() & (torch.arange(SEQ) > 0)
    got = bf16_runs[topo]
    assert got[0]["dtypes"] == {torch.bfloat16}
    err = (got[0]["logp"].double()[valid] - logp[valid]).abs()
    assert err.max() < 0.25 and err.mean() < 0.05, (err.max(), err.mean())
    losses = got[-1]["losses"]
    assert losses[0] == pytest.approx(runs["tp1"][0]["steps"][0]["loss"], abs=0.05)
    assert losses[-1] < losses[0] - 0.05, losses
