"""Megatron -> vLLM weight sync across layouts, on 4 ranks in one launch.

Training layouts TP1 (DP4), TP2 (DP2), PP2 (DP2) and TP2 x PP2 sync into vLLM TP1
(4 rollout replicas) and TP2 (2 replicas), on the tiny Qwen2 and the tied-embedding
Llama. Every layout loads a different checkpoint, so each sync must really replace
vLLM's weights; vLLM's log-probs are compared with transformers' on that checkpoint.
At TP2 x PP2 -> vLLM TP2 also: a real optimizer step then sync (against megatron's
new log-probs), greedy decoding against transformers, seeded sampling.
"""

from __future__ import annotations

import pytest

from tests.harness import launch
from tests.hf_fixtures import load_policy, make_checkpoint
from tests.test_rollout import (
    KV_CACHE_BYTES,
    ROLLOUT_MODEL,
    TEMPERATURE,
    fixed_sequences,
    hf_greedy,
    hf_model_from,
    hf_reference,
    max_abs_diff,
    mean_abs_diff,
    nll_loss_fn,
    padded,
    row_logps,
)

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
FAMILIES = ("qwen2", "llama_tied")
ROLLOUT_TPS = (1, 2)  # engines started one after another, one launch per family
ENGINES = [(f, r) for f in FAMILIES for r in ROLLOUT_TPS]
WORLD = 4


def _checkpoint_seed(layout: str) -> int:
    return 1 + list(LAYOUTS).index(layout)


def _train_layout(tp: int, pp: int):
    from covrl.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(tp, pp), seed=1234)


def _megatron(checkpoint):
    from covrl.models import PolicyModelConfig

    config = PolicyModelConfig.from_hf(checkpoint)
    return config, load_policy(checkpoint, config)


def _step_and_generate(ctx, engine, config, chunks, seqs, out):
    """At the current layout: optimizer step, sync, greedy and seeded sampling."""
    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import export_hf_weights
    from covrl.rollout import SamplingConfig
    from covrl.training import PolicyBatch

    ids, mask = padded(seqs)
    trainer = PolicyEngine(
        chunks,
        config,
        OptimizerConfig(lr=2e-2, weight_decay=0.0, clip_grad=1.0),
        EngineConfig(micro_batch_size=2),
    )
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(r * len(seqs) // dp, (r + 1) * len(seqs) // dp)
    trainer.train_step(
        {"input_ids": ids[rows], "attention_mask": mask[rows]},
        nll_loss_fn(int(mask[:, 1:].sum())),
    )
    scorer = PolicyEngine(trainer.model, config, config=EngineConfig(micro_batch_size=2))
    out["megatron_new"] = row_logps(scorer.forward_logprobs(ids, mask).logp, seqs)
    out["vllm_stale"] = engine.prompt_logprobs(seqs)
    out["sync_metrics"] = engine.sync_weights(chunks, config, bucket_mb=0.5, measure_memory=True)
    out["vllm_synced"] = engine.prompt_logprobs(seqs)
    state = {n: t.clone() for n, t in export_hf_weights(chunks, config)}
    out["state"] = state if ctx.rank == 0 else None

    prompts = [s[:5] for s in seqs]
    out["greedy"] = engine.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=8))
    sampling = SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=6)
    out["sample_a"] = engine.generate(prompts, sampling, seed=3)
    out["sample_b"] = engine.generate(prompts, sampling, seed=3)
    hot = PolicyEngine(
        trainer.model,
        config,
        config=EngineConfig(micro_batch_size=len(out["sample_a"]), temperature=TEMPERATURE),
    )
    batch = PolicyBatch.from_generations(out["sample_a"])
    out["sample_megatron_logp"] = hot.forward_logprobs(batch.input_ids, batch.attention_mask).logp


def _layouts_body(ctx, family, checkpoints):
    import dataclasses

    from vllm.distributed import parallel_state as vllm_ps

    from covrl.rollout import RolloutConfig, RolloutEngine

    seqs = fixed_sequences(250)
    out: dict = {}
    # Deleting a vLLM engine destroys every torch.distributed group (vLLM's shutdown
    # tears down the default group), so earlier engines stay alive, unused; the next
    # engine gets vLLM's model-parallel groups (and their shared memory) anew.
    # (Two engines with the same TP size in one process collide on the name of the
    # shared-memory segment of vLLM's CPU TP communicator: one launch per family.)
    engines = []
    for rollout_tp in ROLLOUT_TPS:
        if engines:
            vllm_ps.destroy_model_parallel()
        engine = RolloutEngine(
            checkpoints["base"],
            RolloutConfig(
                tensor_parallel_size=rollout_tp,
                kv_cache_memory_bytes=KV_CACHE_BYTES,
                max_model_len=64,
            ),
        )
        for layout, (tp, pp) in LAYOUTS.items():
            _train_layout(tp, pp)
            config, chunks = _megatron(checkpoints[layout])
            from megatron.core import parallel_state as ps

            key = (family, rollout_tp, layout)
            out[key] = {"sync": engine.sync_weights(chunks, config)}
            out[key]["pp_rank"] = ps.get_pipeline_model_parallel_rank()
            out[key]["logp"] = engine.prompt_logprobs(seqs)
            if (family, rollout_tp, layout) == ("qwen2", 2, "tp2pp2"):
                _step_and_generate(ctx, engine, config, chunks, seqs, out[key])
        # A model whose tensors differ from vLLM's (tying flipped: lm_head.weight
        # missing or unexpected): refused on every rank before anything is sent.
        bad = dataclasses.replace(config, tie_word_embeddings=not config.tie_word_embeddings)
        try:
            engine.sync_weights(chunks, bad)
        except RuntimeError as exc:
            out[(family, rollout_tp, "bad_sync")] = str(exc)
        engines.append(engine)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_layouts")
    out = {}
    for family in FAMILIES:
        out[family] = {"base": make_checkpoint(root / "base", family, seed=0, **ROLLOUT_MODEL)}
        for layout in LAYOUTS:
            out[family][layout] = make_checkpoint(
                root / layout, family, seed=_checkpoint_seed(layout), **ROLLOUT_MODEL
            )
    return out


@pytest.fixture(scope="module")
def launches(checkpoints):
    return {
        family: launch(
            _layouts_body,
            world_size=WORLD,
            family=family,
            checkpoints=checkpoints[family],
            timeout=600,
        )
        for family in FAMILIES
    }


@pytest.fixture(scope="module")
def runs(launches):
    """Per rank: every result of both launches."""
    return [{k: v for f in FAMILIES for k, v in launches[f][r].items()} for r in range(WORLD)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("engine", ENGINES, ids=[f"{f}-vllm_tp{r}" for f, r in ENGINES])
def test_synced_logprobs_match_transformers(runs, checkpoints, engine, layout):
    family, rollout_tp = engine
    ref = hf_reference(hf_model_from(checkpoints[family][layout]), fixed_sequences(250))
    for rank_out in runs:
        err = max_abs_diff(rank_out[(family, rollout_tp, layout)]["logp"], ref)
        assert err < 1e-4, err


def _tp2pp2():
    return ("qwen2", 2, "tp2pp2")


def _expected_pp_bytes(config, tp: int, pp: int, pp_rank: int) -> tuple[int, int]:
    """Bytes a rank receives over PP in a sync: each tensor its stage does not hold,
    as its TP shard (padded vocabulary rows included); and the whole tensors, which a
    gather-then-broadcast order would send. Written from the Hugging Face names."""
    import re

    per_stage = config.num_layers // pp
    shards = whole = 0
    for name, shape in config.hf_weight_shapes().items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        stage = int(m.group(1)) // per_stage if m else (0 if "embed" in name else pp - 1)
        if stage == pp_rank:
            continue
        rows = shape[0]
        if "embed_tokens" in name or "lm_head" in name:
            rows = config.padded_vocab_size(tp)
        numel = rows * (shape[1] if len(shape) > 1 else 1)
        shards += 4 * (numel if name.endswith("norm.weight") else numel // tp)
        whole += 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
    return shards, whole


@pytest.mark.parametrize("layout", ["pp2", "tp2pp2"])
def test_sync_sends_shards_across_the_pipeline(runs, checkpoints, layout):
    """Only TP shards cross the pipeline group: a rank receives over PP the shards of
    the tensors its stage does not hold (half of them at TP2), and the rest over TP."""
    from covrl.models import PolicyModelConfig

    tp, pp = LAYOUTS[layout]
    for family in FAMILIES:
        config = PolicyModelConfig.from_hf(checkpoints[family]["base"])
        for rank_out in runs:
            o = rank_out[(family, 2, layout)]
            shards, whole = _expected_pp_bytes(config, tp, pp, o["pp_rank"])
            m = o["sync"]
            assert m["pp_bytes_received"] == shards, (family, m, shards)
            assert m["pp_bytes_sent"] > 0 and m["pp_bytes_received"] > 0
            if tp > 1:
                assert m["pp_bytes_received"] < 0.6 * whole, (m, whole)
                assert m["tp_bytes_received"] > 0


def test_step_then_sync_matches_megatron(runs, checkpoints):
    from covrl.models import PolicyModelConfig
    from covrl.rollout.weight_sync import sync_memory_bound

    for rank_out in runs:
        o = rank_out[_tp2pp2()]
        new = o["megatron_new"]
        stale, synced = mean_abs_diff(o["vllm_stale"], new), mean_abs_diff(o["vllm_synced"], new)
        assert synced < 1e-5 and max_abs_diff(o["vllm_synced"], new) < 1e-4, synced
        assert stale > 1e3 * synced and stale > 1e-2, (stale, synced)
        # Extra memory of that sync (TP gathers + PP broadcasts + vLLM's reload),
        # resident-set high-water mark, within the bound plus allocator slack.
        m = o["sync_metrics"]
        bound = sync_memory_bound(PolicyModelConfig.from_hf(checkpoints["qwen2"]["base"]), m, 4)
        assert m["peak_extra_bytes"] <= bound + (16 << 20), (m, bound)


def test_greedy_after_sync_matches_transformers(runs, checkpoints):
    o0 = runs[0][_tp2pp2()]
    model = hf_model_from(checkpoints["qwen2"]["tp2pp2"], o0["state"])
    ref = hf_greedy(model, [s[:5] for s in fixed_sequences(250)], max_tokens=8)
    for rank_out in runs:
        assert rank_out[_tp2pp2()]["greedy"].response_ids == ref


def test_sampling_identical_on_every_rank_and_seeded(runs):
    from covrl.parallel import SINGLE_PROCESS
    from covrl.rollout import mismatch_metrics
    from covrl.training import PolicyBatch

    a0 = runs[0][_tp2pp2()]["sample_a"]
    for rank_out in runs:
        o = rank_out[_tp2pp2()]
        assert o["sample_a"] == a0 and o["sample_b"] == a0
        batch = PolicyBatch.from_generations(o["sample_a"])
        m = mismatch_metrics(
            batch.rollout_logp,
            o["sample_megatron_logp"],
            batch.response_mask,
            group=SINGLE_PROCESS,
        )
        assert m["abs_diff_max"] < 1e-4, m
    assert a0.prompt_index == [i // 2 for i in range(len(a0))]


@pytest.mark.parametrize("engine", ENGINES, ids=[f"{f}-vllm_tp{r}" for f, r in ENGINES])
def test_mismatched_sync_refused_on_every_rank(runs, engine):
    family, rollout_tp = engine
    what = "unexpected" if family.endswith("tied") else "missing"
    for rank_out in runs:
        msg = rank_out[(family, rollout_tp, "bad_sync")]
        assert f"{what} tensors ['lm_head.weight']" in msg, msg


def test_sync_metrics(runs):
    for rank_out in runs:
        for key, o in rank_out.items():
            if key[2] == "bad_sync":
                continue
            m = o["sync"]
            assert m["bytes"] > 0 and m["time_s"] > 0 and m["tensors"] > 0, key
            assert m["peak_bucket_bytes"] <= 512 * 2**20 + m["largest_tensor_bytes"]
