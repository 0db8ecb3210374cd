"""megatron-core on CPU through covrl.parallel: TP/PP/DP runs equal a TP=1 reference.

A tiny local-spec ``GPTModel`` is built once at TP=1 in one process; its full
state dict is the reference weights. Every other topology loads its own slices of
those weights (column-parallel weights split on dim 0, row-parallel on dim 1, the
SwiGLU ``[gate; up]`` halves split separately, pipeline stages offset by layer), runs
the same batch, and must reproduce the reference logits, loss and gradients, and,
after one Megatron DDP + Adam step, the same grad norm and new loss.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import TOPOLOGIES, launch

VOCAB, HIDDEN, HEADS, GROUPS, FFN, LAYERS = 96, 32, 4, 2, 64, 4
SEQ, GLOBAL_BATCH, MICRO_BATCH = 12, 4, 1
# Adam's eps well above float32 noise on the smallest grads: with eps=1e-8 a grad of
# 5e-8 turns a 1e-10 summation-order difference into a 3e-6 parameter difference.
LR, WD, CLIP, EPS = 1e-2, 0.01, 0.05, 1e-4
# Column-parallel weights (output dim split across TP) and row-parallel ones (input dim).
_COLUMN = ("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")
_GATED = ("linear_fc1.weight",)


def _config():
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        ffn_hidden_size=FFN,
        gated_linear_unit=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=_ps().get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=_ps().get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        variable_seq_lengths=False,
    )


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def _build_model():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    ps = _ps()
    return GPTModel(
        config=_config(),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )


def _layer_offset() -> int:
    ps = _ps()
    return (
        ps.get_pipeline_model_parallel_rank()
        * LAYERS
        // ps.get_pipeline_model_parallel_world_size()
    )


def _global_name(local_name: str, offset: int) -> str:
    """``decoder.layers.{i}.…`` on a stage -> the TP=1/PP=1 name."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + offset)
    return ".".join(parts)


def _shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a full (TP=1) tensor."""
    if name.endswith(_GATED):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)
    if name.endswith(_COLUMN):
        return full.chunk(size, dim=0)[rank]
    if name.endswith(_ROW):
        return full.chunk(size, dim=1)[rank]
    return full  # replicated: norms


def _unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`_shard` given every TP rank's slice in rank order."""
    if name.endswith(_GATED):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if name.endswith(_COLUMN):
        return torch.cat(shards, dim=0)
    if name.endswith(_ROW):
        return torch.cat(shards, dim=1)
    return shards[0]


def _gather_tp(t: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    ps = _ps()
    out = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(out, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return out


def _batch(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _run_schedule(model_chunks, tokens, labels, forward_only: bool):
    """Run the batch through megatron's schedule for this PP size (micro-batches of
    ``MICRO_BATCH``). Returns (mean loss, logits [b, s, vocab/tp] or None off the last
    stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, -1)
    micro = [
        (tokens[i : i + MICRO_BATCH], labels[i : i + MICRO_BATCH])
        for i in range(0, tokens.shape[0], MICRO_BATCH)
    ]
    logits_out, losses = [], []

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        # attention_mask=None: causal masking comes from the attention mask type.
        output = model(tok, position_ids, attention_mask=None)

        def loss_func(logits):
            logits_out.append(logits.detach().clone())
            per_token = vocab_parallel_cross_entropy(logits.float().transpose(0, 1), lab.t())
            loss = per_token.mean()
            losses.append(loss.detach().clone())
            return loss, {"loss": loss.detach()}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=model_chunks,
        num_microbatches=len(micro),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
    )
    if not _ps().is_pipeline_last_stage():
        return None, None
    return torch.stack(losses).mean(), torch.cat(logits_out, dim=0)


def _load(model, ref_state):
    tp_rank = _ps().get_tensor_model_parallel_rank()
    tp_size = _ps().get_tensor_model_parallel_world_size()
    offset = _layer_offset()
    local = model.state_dict()
    new = {}
    for name, value in local.items():
        if name.endswith("_extra_state"):
            continue
        full = ref_state[_global_name(name, offset)]
        piece = _shard(name, full, tp_rank, tp_size)
        assert piece.shape == value.shape, (name, piece.shape, value.shape)
        new[name] = piece
    model.load_state_dict(new, strict=False)


def _full_tensors(model, what: str) -> dict[str, torch.Tensor]:
    """This stage's parameters (``what="param"``) or their ``.grad`` as full (TP=1)
    tensors, by global name."""
    offset = _layer_offset()
    out = {}
    for name, p in model.named_parameters():
        t = p.detach() if what == "param" else p.grad
        out[_global_name(name.removeprefix("module."), offset)] = _unshard(name, _gather_tp(t))
    return out


def _parallel_body(ctx, ref_state):
    """Forward/backward without DDP (plain .grad), then DDP + Adam for one step."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ps = _ps()
    tokens, labels = _batch()
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
    out = {"last_stage": ps.is_pipeline_last_stage(), "dp_rank": dp_rank}

    # 1. Plain model: logits and gradients of the mean token loss (full batch here).
    model = _build_model()
    _load(model, ref_state)
    loss, logits = _run_schedule([model], tokens, labels, forward_only=False)
    if out["last_stage"]:
        out["loss"] = loss
        out["logits"] = torch.cat(_gather_tp(logits), dim=-1)
    out["grads"] = _full_tensors(model, "grad")

    # 2. Megatron DDP + Adam (grad clip on), data split over DP.
    model = _build_model()
    _load(model, ref_state)
    config = model.config
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=LR, weight_decay=WD, clip_grad=CLIP, adam_eps=EPS, bf16=False
        ),
        [ddp],
        use_gloo_process_groups=False,
    )
    # As in Megatron's training loop: the scheduler sets each group's lr and weight
    # decay (norms and biases have wd_mult=0), here a constant schedule.
    OptimizerParamScheduler(
        opt,
        init_lr=LR,
        max_lr=LR,
        min_lr=LR,
        lr_warmup_steps=0,
        lr_decay_steps=1,
        lr_decay_style="constant",
        start_wd=WD,
        end_wd=WD,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    ddp.zero_grad_buffer()
    opt.zero_grad()
    step_loss, _ = _run_schedule([ddp], tokens[rows], labels[rows], forward_only=False)
    ok, grad_norm, _ = opt.step()
    after_loss, _ = _run_schedule([ddp], tokens[rows], labels[rows], forward_only=True)
    out.update(step_ok=ok, grad_norm=grad_norm)
    # The optimizer clipped ``.grad`` in place (it aliases DDP's main_grad here).
    out["clipped_grads"] = _full_tensors(ddp, "grad")
    out["params_after"] = _full_tensors(ddp, "param")
    if out["last_stage"]:
        # Mean over DP ranks: every rank holds the same number of tokens.
        pair = torch.stack([step_loss, after_loss])
        torch.distributed.all_reduce(pair, group=ps.get_data_parallel_group())
        out["step_loss"], out["after_loss"] = (pair / dp).tolist()
    return out


def _reference_state() -> dict[str, torch.Tensor]:
    return launch(_init_body, 1)[0]


def _init_body(ctx):
    torch.manual_seed(0)
    model = _build_model()
    with torch.no_grad():
        # Non-trivial norms, so a replicated-vs-sharded mix-up would show.
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


# The interleaved schedule needs model chunks; the engine tests cover it.
LAYOUTS = {k: v for k, v in TOPOLOGIES.items() if k != "pp2vpp2"}


@pytest.fixture(scope="module")
def runs():
    ref_state = _reference_state()
    results = {}
    for name, topo in LAYOUTS.items():
        per_rank = launch(_parallel_body, ref_state=ref_state, timeout=300, **topo)
        last = next(r for r in per_rank if r["last_stage"])
        merged = {k: {} for k in ("grads", "clipped_grads", "params_after")}
        for r in per_rank:
            for k in merged:
                merged[k].update(r[k])
        results[name] = dict(last=last, per_rank=per_rank, **merged)
    return ref_state, results


@pytest.mark.parametrize("topo", ["tp2", "pp2", "tp2pp2"])
def test_logits_match_tp1(runs, topo):
    _, res = runs
    ref, got = res["tp1"]["last"]["logits"], res[topo]["last"]["logits"]
    assert got.shape == ref.shape == (GLOBAL_BATCH, SEQ, VOCAB)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        res[topo]["last"]["loss"], res["tp1"]["last"]["loss"], atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("topo", ["tp2", "pp2", "tp2pp2"])
def test_grads_match_tp1(runs, topo):
    ref_state, res = runs
    ref, got = res["tp1"]["grads"], res[topo]["grads"]
    assert set(got) == set(ref) == set(ref_state)
    for name in ref:
        assert got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=0, msg=name)


def test_reference_logits_are_not_trivial(runs):
    """Guards the comparisons above against a model that outputs constants."""
    _, res = runs
    logits = res["tp1"]["last"]["logits"]
    assert logits.std(dim=-1).min() > 1e-3


@pytest.mark.parametrize("topo", ["tp2", "pp2", "dp2", "tp2pp2"])
def test_adam_step_matches_tp1(runs, topo):
    _, res = runs
    ref, got = res["tp1"], res[topo]
    for r in got["per_rank"]:
        assert r["step_ok"]
        assert r["grad_norm"] == pytest.approx(ref["last"]["grad_norm"], rel=1e-5, abs=1e-7)
    assert got["last"]["step_loss"] == pytest.approx(ref["last"]["step_loss"], abs=1e-5)
    assert got["last"]["after_loss"] == pytest.approx(ref["last"]["after_loss"], abs=1e-5)


def test_adam_step_changes_loss(runs):
    _, res = runs
    ref = res["tp1"]["last"]
    # clip_grad=0.05 is below the norm, so clipping was exercised.
    assert ref["grad_norm"] > 0.05
    assert ref["after_loss"] < ref["step_loss"] - 1e-3


def _torch_adamw_reference(ref_state, grads):
    """One step of torch's AdamW on the reference weights with the TP=1 gradients,
    clipped by global norm as Megatron does; weight decay skips 1-D tensors (norms)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    coeff = min(1.0, CLIP / (norm + 1e-6))
    clipped = {k: g * coeff for k, g in grads.items()}
    params = {k: torch.nn.Parameter(ref_state[k].clone()) for k in grads}
    decay = [p for k, p in params.items() if p.dim() > 1]
    no_decay = [p for k, p in params.items() if p.dim() == 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        eps=EPS,
        betas=(0.9, 0.999),
    )
    for k, p in params.items():
        p.grad = clipped[k].clone()
    opt.step()
    return norm, clipped, {k: p.detach() for k, p in params.items()}


@pytest.mark.parametrize("topo", ["tp1", "tp2", "pp2", "dp2", "tp2pp2"])
def test_adam_step_matches_torch_adamw(runs, topo):
    """Megatron's optimizer + our CPU clip shim vs torch.optim.AdamW by hand."""
    ref_state, res = runs
    norm, clipped, params = _torch_adamw_reference(ref_state, res["tp1"]["grads"])
    got = res[topo]
    assert got["last"]["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert set(got["params_after"]) == set(params)
    for name in params:
        torch.testing.assert_close(
            got["clipped_grads"][name], clipped[name], atol=1e-7, rtol=1e-5, msg=name
        )
        torch.testing.assert_close(
            got["params_after"][name], params[name], atol=1e-6, rtol=0, msg=name
        )
