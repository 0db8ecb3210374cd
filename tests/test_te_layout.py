"""The Transformer Engine layer spec's names on CPU: Hugging Face weights in and out, and
distributed checkpoints across the two layer specs.

Transformer Engine is not installed here, so ``tests.te_fixtures.to_te_layout`` re-shapes
a local-spec model into the TE spec's module tree (norms fused into ``linear_qkv`` /
``linear_fc1`` as ``layer_norm_weight``, ``_extra_state`` entries where TE has them).
Checked against independent references: transformers' float32 forward, the original
safetensors bytes, and an uninterrupted training run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness import launch
from tests.hf_fixtures import digest, make_checkpoint, read_checkpoint, reference_logits

BATCH, SEQ = 4, 12
SETTINGS = dict(lr=3e-3, weight_decay=0.1, clip_grad=1.0)


def _batch(vocab: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11 + step)
    return {
        "input_ids": torch.randint(0, vocab, (BATCH, SEQ), generator=g),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
    }


def _loss_fn(out, micro):
    mask = micro["attention_mask"].float()
    mask[:, 0] = 0
    return -(out.logp * mask).sum() / (BATCH * (SEQ - 1)), {}


def _chunks(config, hf: Path | None, te: bool):
    from covrl.models import build_model, load_hf_weights
    from tests.te_fixtures import to_te_layout

    chunks = build_model(config)
    if te:
        chunks = [to_te_layout(c) for c in chunks]
    if hf is not None:
        load_hf_weights(chunks, config, hf)
    return chunks


def _export_digests(chunks, config) -> dict[str, str]:
    from covrl.models import export_hf_weights

    return {name: digest(t) for name, t in export_hf_weights(chunks, config)}


# ---------------------------------------------------------------------------- HF weights
def _hf_body(ctx, paths: dict[str, Path], input_ids: torch.Tensor):
    from covrl.models import PolicyModelConfig, export_hf_weights, load_hf_weights
    from tests.hf_fixtures import pipeline_logits

    out = {}
    for name, path in paths.items():
        config = PolicyModelConfig.from_hf(path)
        te = _chunks(config, None, te=True)
        names = [n for n, _ in te[0].named_parameters()]
        stats = load_hf_weights(te, config, path)
        local = _chunks(config, path, te=False)
        out[name] = {
            "param_names": names,
            "state_keys": list(te[0].state_dict()),
            "parameters_loaded": stats.parameters,
            "te_logits": pipeline_logits(te, input_ids, config.vocab_size),
            "local_logits": pipeline_logits(local, input_ids, config.vocab_size),
            "export": {n: t.clone() for n, t in export_hf_weights(te, config)},
        }
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("te-hf")
    return {name: make_checkpoint(root, name) for name in ("qwen2", "llama_tied")}


@pytest.fixture(scope="module")
def hf_run(hf):
    input_ids = torch.randint(0, 250, (2, 13), generator=torch.Generator().manual_seed(3))
    result = launch(_hf_body, world_size=1, paths=hf, input_ids=input_ids)[0]
    return result, input_ids


def test_te_layout_has_the_te_names(hf_run):
    result, _ = hf_run
    r = result["qwen2"]
    names = r["param_names"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in names
    assert not [n for n in names if "input_layernorm" in n or "pre_mlp_layernorm" in n]
    keys = r["state_keys"]
    for key in (
        "decoder.layers.0.self_attention.core_attention._extra_state",
        "decoder.layers.0.self_attention.linear_qkv._extra_state",
        "decoder.layers.0.mlp.linear_fc2._extra_state",
        "decoder.final_layernorm._extra_state",
    ):
        assert key in keys


@pytest.mark.parametrize("name", ["qwen2", "llama_tied"])
def test_te_layout_loads_hf_weights_like_transformers(hf, hf_run, name):
    result, input_ids = hf_run
    r = result[name]
    expected = reference_logits(hf[name], input_ids)
    assert expected.abs().mean() > 0.3
    torch.testing.assert_close(r["te_logits"], expected, rtol=1e-4, atol=1e-4)
    # Same arithmetic as the local spec (fused norm = norm, then linear).
    torch.testing.assert_close(r["te_logits"], r["local_logits"], rtol=1e-6, atol=1e-6)
    # Every parameter filled: 4 layers x (qkv, proj, fc1, fc2 + 2 fused norms) + ...
    assert r["parameters_loaded"] == len(r["param_names"])


@pytest.mark.parametrize("name", ["qwen2", "llama_tied"])
def test_te_layout_export_is_the_checkpoint_bit_for_bit(hf, hf_run, name):
    result, _ = hf_run
    original = read_checkpoint(hf[name])
    exported = result[name]["export"]
    if name.endswith("_tied"):
        original.pop("lm_head.weight", None)  # tied: the embedding is the head
    assert sorted(exported) == sorted(original)
    for n, t in exported.items():
        assert t.dtype == original[n].dtype and torch.equal(t, original[n]), n


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint_body(ctx, hf: Path, root: Path):
    """Train, save with one layer spec, load into the other, train on; both directions.
    Then the errors a real mismatch must still raise."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from covrl import checkpointing as ck
    from covrl.checkpointing.load import _load_model_state as load_model_state
    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig, unwrap_model

    config = PolicyModelConfig.from_hf(hf)

    def engine(te: bool) -> PolicyEngine:
        return PolicyEngine(
            _chunks(config, hf, te), config, OptimizerConfig(**SETTINGS), EngineConfig()
        )

    def steps(e, rng):
        return [
            (r.loss, r.grad_norm)
            for r in (e.train_step(_batch(config.vocab_size, s), _loss_fn) for s in rng)
        ]

    out: dict = {}
    for src, dst in (("te", "local"), ("local", "te")):
        a = engine(src == "te")
        steps(a, range(2))
        path = a.save_checkpoint(root / src, 2)
        saved = _export_digests(a.model, config)
        uninterrupted = steps(a, range(2, 4))
        b = engine(dst == "te")
        b.load_checkpoint(path)
        loaded = _export_digests(b.model, config)
        resumed = steps(b, range(2, 4))
        case = {
            "saved": saved,
            "loaded": loaded,
            "uninterrupted": uninterrupted,
            "resumed": resumed,
        }
        if ctx.rank == 0:
            # Sharded objects are listed as "<key>/shard_<i>_<n>".
            case["ckpt_keys"] = sorted(
                {k.split("/shard_")[0] for k in load_sharded_metadata(str(path))}
            )
        if dst == "te":
            layer = unwrap_model(b.model[0]).decoder.layers[0]
            case["te_received"] = {
                "linear_qkv": layer.self_attention.linear_qkv.__dict__.get("loaded_extra_states"),
                "core_attention": layer.self_attention.core_attention.__dict__.get(
                    "loaded_extra_states"
                ),
            }
        out[f"{src}->{dst}"] = case

    # A real tensor the checkpoint lacks is still an error (a parameter of a layer spec
    # neither checkpoint has), and so is a state-dict entry other than _extra_state.
    extra = _chunks(config, hf, te=True)
    for layer in extra[0].decoder.layers:
        proj = layer.self_attention.linear_proj
        proj.register_parameter("scale", torch.nn.Parameter(torch.ones(3)))
    errors = {}
    try:
        ck.load_checkpoint(root / "local", extra, config, load_rng=False)
    except ck.CheckpointError as exc:
        errors["absent_tensor"] = str(exc)
    plain = _chunks(config, hf, te=False)
    state = plain[0].state_dict()
    del state["decoder.final_layernorm.weight"]
    try:
        load_model_state(plain[0], state, root / "local")
    except ck.CheckpointError as exc:
        errors["missing_entry"] = str(exc)
    state = plain[0].state_dict()
    del state["decoder.layers.0.self_attention.linear_qkv._extra_state"]
    load_model_state(plain[0], state, root / "local")  # tolerated
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def ckpt_run(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("te-ckpt")
    return launch(_checkpoint_body, world_size=2, tp=2, hf=hf["qwen2"], root=root)


@pytest.mark.parametrize("direction", ["te->local", "local->te"])
def test_checkpoint_loads_across_layer_specs(ckpt_run, direction):
    for rank in ckpt_run:
        case = rank[direction]
        assert case["loaded"] == case["saved"]  # every weight, bit for bit
        # Adam moments, step count and schedule came along: training goes on identically.
        for (l1, g1), (l2, g2) in zip(case["uninterrupted"], case["resumed"], strict=True):
            assert l2 == pytest.approx(l1, rel=1e-6, abs=1e-7)
            assert g2 == pytest.approx(g1, rel=1e-5, abs=1e-7)


def test_checkpoints_differ_only_in_extra_state(ckpt_run):
    te = set(ckpt_run[0]["te->local"]["ckpt_keys"])
    local = set(ckpt_run[0]["local->te"]["ckpt_keys"])
    only_te = te - local
    # TE's final norm saves an extra state, the local torch norm none: the case the
    # cross-spec load has to tolerate is really there.
    assert any(k.endswith("final_layernorm._extra_state") for k in only_te)
    assert all(k.endswith("_extra_state") for k in only_te)
    assert not local - te


def test_te_modules_get_no_fp8_state_from_a_local_checkpoint(ckpt_run):
    received = ckpt_run[0]["local->te"]["te_received"]
    # The local spec's linear layers save None as their extra state.
    assert received["linear_qkv"] == [None]
    # Not saved by megatron for attention: never passed (missing, tolerated).
    assert received["core_attention"] is None


def test_real_mismatches_are_still_errors(ckpt_run):
    errors = ckpt_run[0]["errors"]
    assert "scale" in errors["absent_tensor"] and "lacks" in errors["absent_tensor"]
    assert "decoder.final_layernorm.weight" in errors["missing_entry"]
