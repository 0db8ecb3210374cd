"""Megatron-core policy model from Hugging Face Llama / Qwen2 checkpoints.

One launch per parallel layout loads every tiny checkpoint variant (qwen2 / llama,
tied / untied, single-file / sharded, fewer K/V heads than TP ranks), runs a forward
pass, streams the export and saves a checkpoint; the tests below assert on the
results against transformers' float32 eager model.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from covrl.models import PolicyModelConfig, validate_parallel_layout, vocab_size_with_padding
from covrl.parallel import ParallelConfig
from tests.harness import TOPOLOGIES, launch, run_checks
from tests.hf_fixtures import (
    TINY,
    VARIANTS,
    digest,
    make_checkpoint,
    pipeline_logits,
    read_checkpoint,
    reference_logits,
)

SAVE_SHARD_BYTES = 200_000  # the tiny models are ~0.6 MB: several output shards


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    input_ids = torch.randint(
        0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(7)
    )
    paths = {name: make_checkpoint(root, name) for name in VARIANTS}
    return {
        "paths": paths,
        "input_ids": input_ids,
        "logits": {n: reference_logits(p, input_ids) for n, p in paths.items()},
        "tensors": {n: read_checkpoint(p) for n, p in paths.items()},
    }


def _topology_body(ctx, paths, input_ids, out_root):
    """Every checkpoint variant on this layout, each a named check."""
    checks = {name: partial(_variant, ctx, name, paths, input_ids, out_root) for name in paths}
    return run_checks(checks)


def _variant(ctx, name, paths, input_ids, out_root):
    """Load, forward, export and save one checkpoint variant on this rank."""
    from megatron.core import parallel_state as ps

    from covrl.models import (
        PolicyModelConfig,
        build_model,
        export_hf_weights,
        load_hf_weights,
        save_hf_checkpoint,
    )

    tp_rank = ps.get_tensor_model_parallel_rank()
    path = paths[name]
    config = PolicyModelConfig.from_hf(path)
    chunks = build_model(config)
    stats = load_hf_weights(chunks, config, path)
    r = {
        "stats": vars(stats),
        "logits": pipeline_logits(chunks, input_ids, config.vocab_size),
        "names": [],
        "digests": {},
        "tensors": {},
    }
    if chunks[0].pre_process:
        emb = chunks[0].embedding.word_embeddings.weight
        rows = torch.arange(emb.shape[0]) + tp_rank * emb.shape[0]
        r["pad_rows"] = emb[rows >= config.vocab_size].detach().clone()
        r["padded_vocab"] = emb.shape[0] * ctx.tp
    for hf_name, tensor in export_hf_weights(chunks, config):
        r["names"].append(hf_name)
        r["digests"][hf_name] = digest(tensor)
        if ctx.rank == 0:
            r["tensors"][hf_name] = tensor.clone()
    save_hf_checkpoint(
        chunks,
        config,
        Path(out_root) / name,
        max_shard_bytes=SAVE_SHARD_BYTES if VARIANTS[name].sharded else 2**40,
        copy_files_from=path,
    )
    if name == "qwen2" and ctx.rank == 0 and ctx.world_size == 1:
        # bfloat16 parameters from a float32 checkpoint: the export is the rounded copy.
        bf16 = PolicyModelConfig.from_hf(path, params_dtype=torch.bfloat16)
        bf16_chunks = build_model(bf16)
        load_hf_weights(bf16_chunks, bf16, path)
        r["bf16"] = {n: t.clone() for n, t in export_hf_weights(bf16_chunks, bf16)}
    if name == "llama":
        # Untied config + tied checkpoint; llama config + qwen2 checkpoint (biases).
        r["errors"] = {}
        for other in ("llama_tied", "qwen2"):
            try:
                load_hf_weights(chunks, config, paths[other])
            except ValueError as exc:
                r["errors"][other] = str(exc)
    return r


# Every layout, dp2 included (two replicas: both export, replica 0 saves).
@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def run(request, reference, tmp_path_factory):
    topology = request.param
    out_root = tmp_path_factory.mktemp(f"export-{topology}")
    results = launch(
        _topology_body,
        **TOPOLOGIES[topology],
        paths=reference["paths"],
        input_ids=reference["input_ids"],
        out_root=str(out_root),
    )
    return {"topology": topology, "ranks": results, "out_root": out_root}


def _last_stage_ranks(run):
    layout = TOPOLOGIES[run["topology"]]
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    return [r for r in range(layout["world_size"]) if r // tp == pp - 1]


# ---------------------------------------------------------------------------- logits
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(run, reference, variant):
    expected = reference["logits"][variant]
    assert expected.abs().mean() > 0.3  # weights large enough for a real comparison
    for rank in _last_stage_ranks(run):
        logits = run["ranks"][rank][variant]["logits"]
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_vocab_padding_rows_are_zero(run):
    layout = TOPOLOGIES[run["topology"]]
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    for variant in VARIANTS:
        holders = [r[variant] for r in run["ranks"] if "pad_rows" in r[variant]]
        # The first stage's TP ranks of every replica hold the embedding.
        assert len(holders) == layout["world_size"] // pp
        holders = holders[:tp]  # replica 0 (ranks are tp-fastest)
        assert holders[0]["padded_vocab"] == vocab_size_with_padding(250, 128, tp)
        pad = torch.cat([h["pad_rows"] for h in holders])
        assert pad.shape[0] == holders[0]["padded_vocab"] - 250
        assert torch.count_nonzero(pad) == 0


# ---------------------------------------------------------------------------- export
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trip_is_bit_identical(run, reference, variant):
    original = reference["tensors"][variant]
    exported = run["ranks"][0][variant]["tensors"]
    if VARIANTS[variant].tied:
        assert "lm_head.weight" not in exported
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert exported[name].shape == tensor.shape, name
        assert torch.equal(exported[name], tensor), name
    # Order is the documented one, and every rank yields the same stream.
    config = PolicyModelConfig.from_hf(reference["paths"][variant])
    for rank_result in run["ranks"]:
        assert rank_result[variant]["names"] == list(config.hf_weight_shapes())
        assert rank_result[variant]["digests"] == run["ranks"][0][variant]["digests"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_checkpoint_round_trip(run, reference, variant):
    saved = run["out_root"] / variant
    files = sorted(p.name for p in saved.iterdir())
    assert "config.json" in files and "generation_config.json" in files
    index = saved / "model.safetensors.index.json"
    assert index.is_file() == VARIANTS[variant].sharded
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        assert len(shards) > 1 and all(s in files for s in shards)
    tensors = read_checkpoint(saved)
    original = reference["tensors"][variant]
    assert sorted(tensors) == sorted(original)
    assert all(torch.equal(tensors[n], original[n]) for n in original)
    assert PolicyModelConfig.from_hf(saved) == PolicyModelConfig.from_hf(
        reference["paths"][variant]
    )
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_saved_checkpoint_loads_in_transformers(run, reference):
    if run["topology"] != "tp2pp2":
        pytest.skip("once is enough: the tensors are compared bitwise for every layout")
    for variant in VARIANTS:
        logits = reference_logits(run["out_root"] / variant, reference["input_ids"])
        assert torch.equal(logits, reference["logits"][variant])


def test_each_rank_reads_only_its_slices(run):
    for variant in VARIANTS:
        total = _model_elements(variant)
        for rank_result in run["ranks"]:
            stats = rank_result[variant]["stats"]
            assert stats["elements_read"] <= stats["elements_loaded"]
            layout = TOPOLOGIES[run["topology"]]
            if layout.get("tp", 1) * layout.get("pp", 1) == 1:
                assert stats["elements_read"] == total
            else:  # half the layers, or half of every matrix, or both
                assert stats["elements_read"] < 0.6 * total, stats


def _model_elements(variant: str) -> int:
    config = PolicyModelConfig.from_hf(
        {
            **TINY,
            "model_type": VARIANTS[variant].family,
            "num_key_value_heads": VARIANTS[variant].kv_heads,
            "tie_word_embeddings": VARIANTS[variant].tied,
        }
    )
    return sum(torch.Size(s).numel() for s in config.hf_weight_shapes().values())


def test_bfloat16_parameters(run, reference):
    if run["topology"] != "tp1":
        pytest.skip("dtype handling does not depend on the layout")
    exported = run["ranks"][0]["qwen2"]["bf16"]
    original = reference["tensors"]["qwen2"]
    assert list(exported) == list(
        PolicyModelConfig.from_hf(reference["paths"]["qwen2"]).hf_weight_shapes()
    )
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name


def test_load_errors_name_the_field(run):
    errors = run["ranks"][0]["llama"]["errors"]
    assert (
        "tie_word_embeddings" in errors["llama_tied"] and "lm_head.weight" in errors["llama_tied"]
    )
    assert "unexpected tensors" in errors["qwen2"] and "q_proj.bias" in errors["qwen2"]


# ---------------------------------------------------------------------------- config
def _cfg(family="llama", **fields):
    return {**TINY, "model_type": family, **fields}


def test_config_fields_map_to_megatron():
    c = PolicyModelConfig.from_hf(
        _cfg("qwen2", rope_theta=1e6, tie_word_embeddings=True, torch_dtype="bfloat16")
    )
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (4, 64, 96)
    assert (c.num_attention_heads, c.num_query_groups, c.head_dim) == (4, 2, 16)
    assert c.rotary_base == 1e6 and c.layernorm_epsilon == 1e-6
    assert c.add_qkv_bias and c.tie_word_embeddings
    assert c.params_dtype == torch.bfloat16
    assert PolicyModelConfig.from_hf(_cfg(), params_dtype="float32").params_dtype == torch.float32
    llama = PolicyModelConfig.from_hf(_cfg(head_dim=32))
    assert not llama.add_qkv_bias and not llama.tie_word_embeddings and llama.head_dim == 32
    assert vocab_size_with_padding(250, 128, 1) == 256
    assert vocab_size_with_padding(250, 128, 4) == 512
    assert vocab_size_with_padding(256, 8, 2) == 256
    assert c.padded_vocab_size(2) == 256


# Published config.json files (abridged to the architecture fields).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "hidden_act": "silu",
    "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 151936,
}  # fmt: skip
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}  # fmt: skip


def test_published_configs():
    qwen = PolicyModelConfig.from_hf(QWEN25_05B)
    assert (qwen.num_query_groups, qwen.head_dim, qwen.rotary_base) == (2, 64, 1e6)
    assert qwen.tie_word_embeddings and qwen.add_qkv_bias and qwen.params_dtype == torch.bfloat16
    assert (qwen.padded_vocab_size(1), qwen.padded_vocab_size(2)) == (151936, 152064)
    validate_parallel_layout(qwen, ParallelConfig(2, 2, 3), 4)
    with pytest.raises(ValueError, match="num_attention_heads=14"):
        validate_parallel_layout(qwen, ParallelConfig(4, 1), 4)
    with pytest.raises(ValueError, match="rope_type='llama3'"):
        PolicyModelConfig.from_hf(LLAMA32_1B)
    llama = PolicyModelConfig.from_hf({**LLAMA32_1B, "rope_scaling": None})
    assert (llama.rotary_base, llama.num_query_groups, llama.head_dim) == (5e5, 8, 64)


def test_transformer_config():
    tf = PolicyModelConfig.from_hf(_cfg("qwen2")).transformer_config(ParallelConfig(2, 2, 2))
    assert tf.normalization == "RMSNorm" and tf.gated_linear_unit and tf.add_qkv_bias
    assert not tf.add_bias_linear and tf.hidden_dropout == 0 and tf.attention_dropout == 0
    assert tf.num_query_groups == 2 and tf.kv_channels == 16 and tf.ffn_hidden_size == 96
    assert (tf.tensor_model_parallel_size, tf.pipeline_model_parallel_size) == (2, 2)
    assert tf.virtual_pipeline_model_parallel_size == 2


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(model_type="mistral"), "model_type"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (
            dict(model_type="qwen2", use_sliding_window=True, sliding_window=64),
            "use_sliding_window",
        ),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(dtype="float64"), "dtype"),
    ],
)
def test_unsupported_config_names_the_field(fields, field):
    with pytest.raises(ValueError, match=field):
        PolicyModelConfig.from_hf(_cfg(**fields))


@pytest.mark.parametrize(
    "fields, parallel, world, field",
    [
        (
            dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6),
            (4, 1, None),
            4,
            "num_attention_heads",
        ),
        (
            dict(hidden_size=192, num_attention_heads=12, num_key_value_heads=6),
            (4, 1, None),
            4,
            "num_query_groups",
        ),
        (dict(intermediate_size=90), (4, 1, None), 4, "ffn_hidden_size"),
        (dict(num_hidden_layers=6), (1, 4, None), 4, "num_layers"),
        (dict(), (1, 2, 4), 2, "num_layers"),
        (dict(), (2, 2, None), 6, "world size"),
        (dict(), (1, 1, None), 1, "make_vocab_size_divisible_by"),
    ],
)
def test_parallel_layout_validation(fields, parallel, world, field):
    divisor = 0 if field == "make_vocab_size_divisible_by" else 128
    config = PolicyModelConfig.from_hf(_cfg(**fields), make_vocab_size_divisible_by=divisor)
    with pytest.raises(ValueError, match=field):
        validate_parallel_layout(config, ParallelConfig(*parallel), world)


def test_parallel_layout_accepts_megatron_layouts():
    config = PolicyModelConfig.from_hf(_cfg(num_key_value_heads=1))
    validate_parallel_layout(config, ParallelConfig(4, 1), 4)  # groups divide TP
    validate_parallel_layout(config, ParallelConfig(2, 2, 2), 8)  # 4 layers over 2 x 2 chunks
