"""RolloutEngine at world 1 / vLLM TP1: generation, weight sync, log-prob modes.

References: transformers' float32 forward (float64 log-softmax) and greedy decoding;
megatron-core's log-probs (PolicyEngine) of the same weights before and after a real
optimizer step. vLLM runs once, in one launched rank, for every check here.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import launch
from tests.hf_fixtures import load_policy, make_checkpoint

# vLLM's CPU attention needs head_dim >= 32: 4 heads of 64.
ROLLOUT_MODEL = dict(hidden_size=256)
KV_CACHE_BYTES = 64 << 20
TEMPERATURE = 0.7


def rollout_checkpoint(root, name: str):
    return make_checkpoint(root, name, seed=0, **ROLLOUT_MODEL)


def fixed_sequences(vocab: int, lengths=(12, 7, 16, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return ids, mask


def row_logps(logp: torch.Tensor, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Per-sequence log-probs of tokens 1.. from ``[b, s]`` aligned log-probs."""
    return [logp[i, 1 : len(x)].double() for i, x in enumerate(seqs)]


def hf_reference(model, seqs: list[list[int]], temperature: float = 1.0) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for x in seqs:
            logits = model(torch.tensor([x])).logits[0].double()
            lp = torch.log_softmax(logits / temperature, -1)
            out.append(lp[:-1].gather(-1, torch.tensor(x[1:])[:, None]).squeeze(-1))
    return out


def hf_model_from(checkpoint, state: dict[str, torch.Tensor] | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
        if model.config.tie_word_embeddings:
            model.tie_weights()
    return model


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(ids[0, len(p) :].tolist())
    return out


def nll_loss_fn(global_tokens: int):
    def loss_fn(out, micro):
        mask = micro["attention_mask"].float()
        mask[:, 0] = 0
        return -(out.logp * mask).sum() / global_tokens, {}

    return loss_fn


def _world1_body(ctx, checkpoint):
    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig, export_hf_weights
    from covrl.rollout import RolloutConfig, RolloutEngine, SamplingConfig
    from covrl.training import PolicyBatch

    config = PolicyModelConfig.from_hf(checkpoint)
    seqs = fixed_sequences(config.vocab_size)
    prompts = [s[:5] for s in seqs]
    out: dict = {"seqs": seqs, "prompts": prompts}

    engine = RolloutEngine(
        checkpoint,
        RolloutConfig(kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=64),
    )
    # 1. vLLM's prompt log-probs of the checkpoint as loaded from disk.
    out["vllm_initial"] = engine.prompt_logprobs(seqs)

    # 2. Megatron model, one optimizer step that visibly changes the weights.
    chunks = load_policy(checkpoint, config)
    trainer = PolicyEngine(
        chunks,
        config,
        OptimizerConfig(lr=2e-2, weight_decay=0.0, clip_grad=1.0),
        EngineConfig(micro_batch_size=2),
    )
    ids, mask = padded(seqs)
    out["pre_sync"] = engine.prompt_logprobs(seqs)
    trainer.train_step(
        {"input_ids": ids, "attention_mask": mask}, nll_loss_fn(int(mask[:, 1:].sum()))
    )
    scorer = PolicyEngine(trainer.model, config, config=EngineConfig(micro_batch_size=2))
    out["megatron_new"] = row_logps(scorer.forward_logprobs(ids, mask).logp, seqs)
    out["vllm_stale"] = engine.prompt_logprobs(seqs)

    # 3. Sync with buckets of one tensor, then of the whole model: same result.
    out["sync_small"] = engine.sync_weights(chunks, config, bucket_mb=1e-6, measure_memory=True)
    out["vllm_small"] = engine.prompt_logprobs(seqs)
    out["sync_whole"] = engine.sync_weights(chunks, config, bucket_mb=1024, measure_memory=True)
    out["vllm_whole"] = engine.prompt_logprobs(seqs)
    out["sync_default"] = engine.sync_weights(chunks, config)
    out["state"] = {n: t.clone() for n, t in export_hf_weights(chunks, config)}

    # 4. Greedy decoding (compared with transformers on the synced weights).
    out["greedy"] = engine.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=8))

    # 5. Sampling: n per prompt, seeded, log-probs of the temperature-scaled policy.
    sampling = SamplingConfig(n=3, temperature=TEMPERATURE, max_tokens=10)
    a = engine.generate(prompts, sampling, seed=7)
    out["sample_a"], out["sample_b"] = a, engine.generate(prompts, sampling, seed=7)
    out["sample_c"] = engine.generate(prompts, sampling, seed=8)
    batch = PolicyBatch.from_generations(a)
    hot = PolicyEngine(
        trainer.model,
        config,
        config=EngineConfig(micro_batch_size=len(a), temperature=TEMPERATURE),
    )
    out["sample_batch"] = batch
    out["sample_megatron_logp"] = hot.forward_logprobs(batch.input_ids, batch.attention_mask).logp
    # Stop tokens end a response (and are part of it).
    stop = a.response_ids[0][2]
    out["stop_token"] = stop
    out["stopped"] = engine.generate(
        prompts[:1],
        SamplingConfig(n=1, temperature=TEMPERATURE, max_tokens=10, stop_token_ids=[stop]),
        seed=7,
    )

    # 6. A sync from a model whose tensors differ from vLLM's: clear error, nothing loaded.
    import dataclasses

    bad = dataclasses.replace(config, ffn_hidden_size=config.ffn_hidden_size * 2)
    try:
        engine.sync_weights(chunks, bad)
        out["bad_sync"] = None
    except RuntimeError as exc:
        out["bad_sync"] = str(exc)
    out["after_bad_sync"] = engine.prompt_logprobs(seqs)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return rollout_checkpoint(tmp_path_factory.mktemp("rollout_hf"), "qwen2")


@pytest.fixture(scope="module")
def world1(checkpoint):
    return launch(_world1_body, world_size=1, checkpoint=checkpoint, timeout=400)[0]


def max_abs_diff(a: list, b: list) -> float:
    return max(
        (torch.as_tensor(x).double() - torch.as_tensor(y).double()).abs().max().item()
        for x, y in zip(a, b, strict=True)
    )


def mean_abs_diff(a: list, b: list) -> float:
    diffs = torch.cat(
        [
            (torch.as_tensor(x).double() - torch.as_tensor(y).double())
            for x, y in zip(a, b, strict=True)
        ]
    )
    return diffs.abs().mean().item()


def test_prompt_logprobs_match_transformers(world1, checkpoint):
    ref = hf_reference(hf_model_from(checkpoint), world1["seqs"])
    assert max_abs_diff(world1["vllm_initial"], ref) < 1e-4


def test_sync_brings_the_optimizer_step_into_vllm(world1):
    new = world1["megatron_new"]
    stale = mean_abs_diff(world1["vllm_stale"], new)
    synced = mean_abs_diff(world1["vllm_small"], new)
    assert synced < 1e-5, synced
    assert stale > 1e3 * synced and stale > 1e-2, (stale, synced)
    assert max_abs_diff(world1["vllm_small"], new) < 1e-4


def test_bucket_size_does_not_change_the_weights(world1):
    assert world1["vllm_small"] == world1["vllm_whole"]
    small, whole = world1["sync_small"], world1["sync_whole"]
    assert small["bytes"] == whole["bytes"] > 0
    assert small["buckets"] == small["tensors"] == whole["tensors"]
    assert whole["buckets"] == 1
    # One tensor per bucket: never more than the largest tensor held at once.
    assert small["peak_bucket_bytes"] == small["largest_tensor_bytes"]
    assert whole["peak_bucket_bytes"] == whole["bytes"]


def test_sync_extra_memory_is_bounded(world1, checkpoint):
    """Measured peak extra memory of a sync (resident-set high-water mark): within
    the bucket + 2 x largest tensor + 2 x vLLM's largest layer, plus slack for the
    allocator's and the interpreter's own pages."""
    from covrl.models import PolicyModelConfig
    from covrl.rollout.weight_sync import sync_memory_bound

    config = PolicyModelConfig.from_hf(checkpoint)
    for key in ("sync_small", "sync_whole"):
        m = world1[key]
        bound = sync_memory_bound(config, m, itemsize=4)
        assert 0 <= m["peak_extra_bytes"] <= bound + (16 << 20), (key, m, bound)


def test_greedy_matches_transformers(world1, checkpoint):
    model = hf_model_from(checkpoint, world1["state"])
    ref = hf_greedy(model, world1["prompts"], max_tokens=8)
    gens = world1["greedy"]
    assert gens.response_ids == ref
    assert gens.finish_reasons == ["length"] * len(ref)


def test_seeded_sampling_reproducible_and_grouped(world1):
    a, b, c = world1["sample_a"], world1["sample_b"], world1["sample_c"]
    n, prompts = 3, world1["prompts"]
    assert a.prompt_index == [i // n for i in range(n * len(prompts))]
    assert a.prompt_ids == [prompts[i // n] for i in range(n * len(prompts))]
    assert a.response_ids == b.response_ids and a.logprobs == b.logprobs
    assert a.response_ids != c.response_ids
    # The n samples of a prompt are distinct draws.
    assert len({tuple(r) for r in a.response_ids[:n]}) > 1


def test_rollout_logprobs_are_the_temperature_scaled_policy(world1):
    """vLLM's sampled-token log-probs equal megatron's log_softmax(logits / T)."""
    from covrl.parallel import SINGLE_PROCESS
    from covrl.rollout import mismatch_metrics

    batch = world1["sample_batch"]
    m = mismatch_metrics(
        batch.rollout_logp,
        world1["sample_megatron_logp"],
        batch.response_mask,
        group=SINGLE_PROCESS,
    )
    assert m["tokens"] == sum(world1["sample_a"].response_lengths)
    assert m["abs_diff_max"] < 1e-4, m
    assert m["frac_over_threshold"] == 0.0


def test_stop_token_ends_the_response(world1):
    g = world1["stopped"]
    stop = world1["stop_token"]
    assert g.finish_reasons == ["stop"]
    assert g.response_ids[0][-1] == stop and stop not in g.response_ids[0][:-1]


def test_mismatched_sync_is_refused_before_loading(world1):
    msg = world1["bad_sync"]
    assert msg is not None and "mlp.gate_proj.weight" in msg and "mis-shaped" in msg
    assert world1["after_bad_sync"] == world1["vllm_whole"]
