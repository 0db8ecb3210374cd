"""Tiny random Hugging Face Llama / Qwen2 checkpoints and a reference forward pass for
tests of the megatron-core policy model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

# hidden 64, 4 heads of 16, 4 layers; vocab 250 is not a multiple of the padding unit.
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=4,
    vocab_size=250,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


@dataclass(frozen=True)
class Variant:
    family: str  # "llama" or "qwen2"
    tied: bool
    sharded: bool  # saved with a small max_shard_size (index file + several shards)
    kv_heads: int = 2
    rope_theta: float = 10000.0


VARIANTS = {
    "qwen2": Variant("qwen2", tied=False, sharded=False, rope_theta=1e6),
    "qwen2_tied": Variant("qwen2", tied=True, sharded=True),
    "llama": Variant("llama", tied=False, sharded=True, rope_theta=5e5),
    "llama_tied": Variant("llama", tied=True, sharded=False),
    # One K/V head: fewer query groups than TP ranks at TP=2.
    "llama_mqa": Variant("llama", tied=True, sharded=True, kv_heads=1),
}


def hf_model(variant: Variant, seed: int = 0, **overrides):
    """A float32 transformers model with every parameter random (norms around 1).

    ``overrides`` replace fields of :data:`TINY` (e.g. ``head_dim=64``, which vLLM's CPU
    attention needs)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[variant.family]
    config = config_cls(
        **{**TINY, "num_key_value_heads": variant.kv_heads, **overrides},
        tie_word_embeddings=variant.tied,
        rope_parameters={"rope_type": "default", "rope_theta": variant.rope_theta},
        dtype="float32",
    )
    config._attn_implementation = "eager"  # exact reference: no fused kernels
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            # Weights large enough that logits are O(1) and a misplaced row shows.
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model


def make_checkpoint(root: Path, name: str, seed: int = 0, **overrides) -> Path:
    variant = VARIANTS[name]
    path = root / name
    model = hf_model(variant, seed, **overrides)
    model.save_pretrained(path, max_shard_size="200KB" if variant.sharded else "1GB")
    if variant.sharded:
        assert (path / "model.safetensors.index.json").is_file()
    return path


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory, in file order."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(path / f))
    return tensors


def reference_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' float32 eager logits ``[b, s, vocab]`` for a checkpoint directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(input_ids).logits


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()


def pipeline_logits(chunks, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Forward ``input_ids`` ``[b, s]`` through this rank's model chunks in pipeline order.

    Stages run one after another: each (virtual stage, pipeline rank) step broadcasts
    its hidden states ``[s, b, h]`` over the PP group to the next. Returns the logits
    gathered over TP with the vocabulary unpadded, ``[b, s, vocab_size]``, on the last
    pipeline stage; None elsewhere.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    pp_group = ps.get_pipeline_model_parallel_group()
    pp, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    b, s = input_ids.shape
    positions = torch.arange(s).expand(b, s)
    hidden_size = chunks[0].config.hidden_size
    hidden = out = None
    with torch.no_grad():
        for v, chunk in enumerate(chunks):
            for p in range(pp):
                first, last = (v, p) == (0, 0), (v, p) == (len(chunks) - 1, pp - 1)
                if p == pp_rank:
                    if not first:
                        chunk.set_input_tensor(hidden)
                    out = chunk(input_ids, positions, None)
                if last:
                    break
                hidden = out if p == pp_rank else torch.empty(s, b, hidden_size)
                dist.broadcast(hidden, src=dist.get_global_rank(pp_group, p), group=pp_group)
    if pp_rank != pp - 1:
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(out)
    return logits[..., :vocab_size]


def load_policy(checkpoint: Path, config=None) -> list:
    """This rank's megatron model chunks with the weights of ``checkpoint`` (the parallel
    state must be initialised); ``config`` defaults to ``PolicyModelConfig.from_hf``."""
    from megatron.core import parallel_state as ps

    from covrl.models import PolicyModelConfig, build_model, load_hf_weights

    config = config or PolicyModelConfig.from_hf(checkpoint)
    chunks = build_model(config)
    load_hf_weights(chunks, config, checkpoint, tp_group=ps.get_tensor_model_parallel_group())
    return chunks
