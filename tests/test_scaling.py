"""covrl.scaling: the per-GPU memory model, checked against hand-computed numbers for a
small config, parameter counts of real models (transformers, megatron-core shards), and
the printed plans of the 7B/32B examples."""

from __future__ import annotations

import pytest

from covrl.models.hf_config import PolicyModelConfig
from covrl.scaling import (
    GIB,
    PUBLISHED_CONFIGS,
    Layout,
    activation_bytes_per_token_layer,
    estimate_memory,
    layer_params,
    model_config,
    stage_params,
    total_params,
)
from tests.harness import launch

# hidden 64, FFN 160, 4 heads of 16, 2 K/V heads, 2 layers, vocab 250 (padded to 256 at
# TP=2: a multiple of 128 * 2), untied embeddings, Qwen2 QKV bias.
SMALL_HF = dict(
    model_type="qwen2",
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=250,
    tie_word_embeddings=False,
)
SMALL = PolicyModelConfig.from_hf(SMALL_HF)


def test_small_config_by_hand():
    # One layer: Wq 64x64, Wk and Wv 64x32, Wo 64x64, QKV bias 64+32+32,
    # gate/up/down 3 x 64x160, two norms of 64.
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 128 + 3 * 64 * 160 + 2 * 64
    assert layer == 43264
    assert layer_params(SMALL) == layer
    # Two layers, input embedding and output layer 250x64, final norm.
    assert total_params(SMALL) == 2 * 43264 + 2 * 250 * 64 + 64 == 118592
    assert SMALL.padded_vocab_size(2) == 256 and SMALL.padded_vocab_size(4) == 512

    layout = Layout(
        nodes=1, gpus_per_node=2, tp=2, pp=1, micro_batch_size=2, seq_length=32,
        vllm_tp=2, gpu_memory_utilization=0.5, gpu_memory_gib=1.0,
    )  # fmt: skip
    est = estimate_memory(SMALL, layout)
    # Per TP rank: half of every matrix and bias, full norms; embeddings 256x64 / 2 each.
    p = 2 * ((43264 - 128) // 2 + 128) + 2 * (256 * 64 // 2) + 64
    assert p == 59840 and est.params_per_gpu == p
    assert (est.weights, est.gradients, est.optimizer) == (2 * p, 4 * p, 12 * p)
    # Activations per token and layer: 8h replicated + (4h + 4gd + 6f)/t sharded
    # = 512 + (256 + 128 + 960) / 2 = 1184 bytes; 2 layers x 64 tokens; logits 6 x 64 x 128.
    assert activation_bytes_per_token_layer(SMALL, 2) == 1184
    assert est.activations == 2 * 64 * 1184 + 6 * 64 * 128 == 200704
    # vLLM: half of 1 GiB; bf16 weights over vLLM TP 2; KV per token per GPU:
    # K and V x 2 layers x 1 head x 16 x 2 bytes = 128 bytes.
    assert est.vllm_budget == GIB // 2
    assert est.vllm_weights == 118592
    assert est.kv_cache == GIB // 2 - 118592
    assert est.kv_tokens == (GIB // 2 - 118592) // 128
    assert est.train_phase == 18 * p + 200704
    assert est.rollout_phase == 18 * p + GIB // 2
    assert est.fits is False  # 4 GiB reserve > 1 GiB GPU


def test_pipeline_interleaving_and_distributed_optimizer_by_hand():
    four_layers = PolicyModelConfig.from_hf({**SMALL_HF, "num_hidden_layers": 4})
    layout = Layout(
        nodes=1, gpus_per_node=8, tp=1, pp=2, vpp=2, micro_batch_size=1, seq_length=10,
        vllm_tp=1, gpu_memory_utilization=0.5, distributed_optimizer=True,
    )  # fmt: skip
    est = estimate_memory(four_layers, layout)
    # PP=2: two layers per stage plus the larger embedding end (256x64 + final norm).
    assert est.params_per_gpu == 2 * 43264 + 256 * 64 + 64
    # DP = 8 / 2 = 4 shards the fp32 main parameters and Adam moments.
    assert est.optimizer == 12 * est.params_per_gpu // 4
    # 1F1B interleaved: L * (1 + (pp - 1) / (pp * vpp)) = 4 * 1.25 = 5 layers' worth;
    # per token and layer 512 + 1344 at TP=1; logits 6 bytes x 10 tokens x 256 columns.
    per_tok = 8 * 64 + (4 * 64 + 4 * 32 + 6 * 160)
    assert per_tok == 1856
    assert est.activations == 5 * 10 * per_tok + 6 * 10 * 256


@pytest.mark.parametrize("tied", [False, True])
def test_total_params_match_transformers(tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = {**SMALL_HF, "tie_word_embeddings": tied}
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    assert total_params(PolicyModelConfig.from_hf(cfg)) == sum(
        p.numel() for p in model.parameters()
    )


def _local_params(ctx, hf):
    from covrl.models import build_model
    from covrl.models.hf_config import PolicyModelConfig

    chunks = build_model(PolicyModelConfig.from_hf(hf, params_dtype="float32"))
    return sum(p.numel() for c in chunks for p in c.parameters())


@pytest.mark.parametrize("topology", [dict(world_size=2, tp=2), dict(world_size=2, pp=2)])
def test_stage_params_match_megatron_shards(topology):
    """The largest rank's share of a real megatron-core GPTModel, as the model counts."""
    counts = launch(_local_params, hf=SMALL_HF, **topology)
    tp, pp = topology.get("tp", 1), topology.get("pp", 1)
    assert max(counts) == stage_params(SMALL, tp, pp)


def test_layout_errors_name_the_problem():
    shape = model_config("/nowhere/Qwen2.5-7B")  # 28 heads, 4 K/V heads
    with pytest.raises(ValueError, match="num_attention_heads=28"):
        estimate_memory(shape, Layout(1, 8, 8, 1, 1, 1024, 1, 0.5))
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        estimate_memory(shape, Layout(1, 6, 4, 1, 1, 1024, 1, 0.5))
    with pytest.raises(ValueError, match="no published config"):
        model_config("/nowhere/SomeModel-3B")
    assert model_config("/nowhere/Qwen2.5-32B-Instruct") == PolicyModelConfig.from_hf(
        PUBLISHED_CONFIGS["qwen2.5-32b"]
    )


def test_sequence_parallel_and_full_recompute_by_hand():
    layout = dict(
        nodes=1, gpus_per_node=2, tp=2, pp=1, micro_batch_size=1, seq_length=64, vllm_tp=2,
        gpu_memory_utilization=0.5, gpu_memory_gib=1.0,
    )  # fmt: skip
    plain = estimate_memory(SMALL, Layout(**layout))
    sp = estimate_memory(SMALL, Layout(**layout, sequence_parallel=True))
    full = estimate_memory(SMALL, Layout(**layout, recompute_granularity="full"))
    both = estimate_memory(
        SMALL, Layout(**layout, sequence_parallel=True, recompute_granularity="full")
    )
    logits = 6 * 64 * 128
    # Sequence parallel: the 8h = 512 replicated bytes split over TP=2 -> 256 + 672.
    assert activation_bytes_per_token_layer(SMALL, 2, sequence_parallel=True) == 928
    assert sp.activations == 2 * 64 * 928 + logits
    # Full recompute: each layer's input (2h = 128 bytes) per token, plus one layer's
    # whole set recomputed in the backward pass.
    assert full.activations == 2 * 64 * 128 + 64 * 1184 + logits
    assert both.activations == 2 * 64 * 64 + 64 * 928 + logits
    assert plain.activations == 2 * 64 * 1184 + logits
    # Selective recompute (core attention) saves nothing under flash attention.
    selective = estimate_memory(SMALL, Layout(**layout, recompute_granularity="selective"))
    assert selective.activations == plain.activations


def test_paper_layouts_fit_80gb_and_the_alternatives_do_not():
    """The examples' layouts fit; without the memory savers they do not."""
    tokens = 20480  # packed micro-batches of two full-length (10240-token) sequences
    big, small = model_config("Qwen2.5-32B"), model_config("Qwen2.5-7B")
    savers = dict(sequence_parallel=True, distributed_optimizer=True)
    assert estimate_memory(big, Layout(4, 8, 8, 2, 1, tokens, 4, 0.6, **savers)).fits
    assert not estimate_memory(big, Layout(4, 8, 8, 2, 1, tokens, 4, 0.6)).fits
    assert not estimate_memory(
        big, Layout(4, 8, 8, 2, 1, tokens, 4, 0.6, sequence_parallel=True)
    ).fits  # the optimizer state must be sharded over DP too
    assert estimate_memory(small, Layout(4, 8, 4, 1, 1, tokens, 2, 0.65, **savers)).fits
    assert not estimate_memory(small, Layout(4, 8, 4, 1, 1, tokens, 2, 0.65)).fits
    # The sizes Hugging Face lists for the checkpoints: 32.8 B and 7.62 B parameters.
    assert round(total_params(big) / 1e9, 2) == 32.76
    assert round(total_params(small) / 1e9, 2) == 7.62
