"""GPU smoke test: covrl's CUDA path on one GPU, stage by stage, in a few minutes.

One command on a machine with torch (CUDA) and transformers::

    python tools/gpu_smoke.py --kit gpu_kit --out gpu_smoke.json

``--kit DIR`` puts the pure-Python packages the GPU path needs and such a machine may
lack (megatron-core, omegaconf and antlr4) on the path; build the kit on a machine that
has covrl installed with ``python tools/gpu_smoke.py --make-kit gpu_kit``. No vLLM, no
Transformer Engine and no package registry are needed: responses are sampled with
transformers, and the layer spec is Transformer Engine's when it imports, else the
local one (``--transformer-impl``).

Stages (one process, world size 1; each records pass/fail, its numbers and the error
text; a failing stage does not stop the others; see docs/gpu.md):

    backend        NCCL on cuda:0 with covrl's CPU shims not applied
    mixed_precision  bf16 policy, megatron's mixed-precision optimizer (fp32 main
                   weights and gradient buffer): one train_step, finite grad norm
    logprob_parity log-probs vs transformers: fp32 max |dlogp| < 1e-4, bf16 mean < 5e-3
    step_functions the trainer's old log-probs, ppo_update with KL-Cov and with
                   Clip-Cov, and entropy change, on responses sampled with transformers
    export_stream  the weights stream after an update loaded into transformers gives
                   the engine's log-probs; its extra memory within the sync bound
    checkpoint     save and load into a fresh engine: parameters, optimizer state,
                   scheduler and RNG states bit-exact, the next step identical
    stage_memory   one Qwen2.5-32B TP8 x PP4 stage (a random model of its per-GPU
                   shape, 1.07 B parameters) at 1k/2k/4k tokens vs covrl/scaling/memory.py

``--device cpu`` runs the same logic on the CPU (gloo, the shims applied, the memory
stage at a tiny size); checks that only mean something on a GPU are then recorded as
skipped. The JSON (``--out``) is rewritten after every stage, so it exists even if the
process dies; a table is printed at the end. Exit status 0 when every stage passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
STAGES = (
    "backend",
    "mixed_precision",
    "logprob_parity",
    "step_functions",
    "export_stream",
    "checkpoint",
    "stage_memory",
)
# Distributions the GPU path imports beyond torch + transformers (and their
# dependencies), found by importing it: megatron-core; covrl.config's omegaconf (with
# antlr4 for interpolations). Everything else it imports (numpy, safetensors, psutil,
# tensorboard, pyarrow, matplotlib, tqdm) ships with such a machine's stack.
KIT_DISTRIBUTIONS = ("megatron-core", "omegaconf", "antlr4-python3-runtime")
_KIT_MODULES = ("megatron.core", "omegaconf", "covrl")
KIT_SITE = "site"
KIT_MANIFEST = "kit.json"

# The tiny policy: a random Qwen2 (q/k/v biases), head_dim 64, 4 layers.
TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=1000,
    max_position_embeddings=256,
)


# ---------------------------------------------------------------------------- the kit
def make_kit(out: Path) -> dict:
    """Copy the installed files of :data:`KIT_DISTRIBUTIONS` into ``out/site`` (a folder
    to put on ``sys.path``; compiled modules tied to this Python version are left out:
    megatron-core's only one is its dataset index helper, unused here)."""
    from importlib import metadata

    site = out / KIT_SITE
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    manifest = {"python": sys.version.split()[0], "distributions": {}, "left_out": []}
    for name in KIT_DISTRIBUTIONS:
        dist = metadata.distribution(name)
        copied = 0
        for rel in dist.files or []:
            src = Path(dist.locate_file(rel))
            parts = Path(rel).parts
            if parts[0] == ".." or "__pycache__" in parts or not src.is_file():
                continue
            if src.suffix == ".so" and ".abi3." not in src.name:
                manifest["left_out"].append(str(rel))
                continue
            dst = site / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied += src.stat().st_size
        manifest["distributions"][name] = {"version": dist.version, "bytes": copied}
    (out / KIT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def use_kit(kit: Path) -> None:
    site = kit / KIT_SITE
    if not site.is_dir():
        raise SystemExit(f"--kit {kit}: no {KIT_SITE}/ folder (build it with --make-kit {kit})")
    sys.path.insert(0, str(site))


# ---------------------------------------------------------------------------- recording
class Stage:
    """Checks and numbers of one stage. ``gpu_only`` checks are recorded as skipped
    (ok None) on the CPU."""

    def __init__(self, name: str, on_gpu: bool) -> None:
        self.name, self.on_gpu = name, on_gpu
        self.checks: list[dict] = []
        self.numbers: dict = {}
        self.error: str | None = None
        self.seconds = 0.0

    def check(self, name: str, ok: bool, value=None, limit=None, gpu_only: bool = False):
        skipped = gpu_only and not self.on_gpu
        self.checks.append(
            {
                "name": name,
                "ok": None if skipped else bool(ok),
                "value": _plain(value),
                "limit": _plain(limit),
            }
        )

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        return "fail" if any(c["ok"] is False for c in self.checks) else "pass"

    def record(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "checks": self.checks,
            "numbers": _plain(self.numbers),
            "error": self.error,
        }


def _plain(value):
    """JSON-safe: floats rounded to 6 significant digits, NaN/inf as strings."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _finite(*values: float) -> bool:
    return all(math.isfinite(float(v)) for v in values)


# ---------------------------------------------------------------------------- helpers
def _tiny_checkpoint(root: Path, seed: int = 0) -> Path:
    """A random tiny Qwen2 saved in float32. Weights of std 0.02 (a trained model's
    scale): logits small enough that bf16 rounding stays near a real model's (with std
    0.08, transformers' own bf16 log-probs are 0.03 from its fp32 ones), and a
    distribution wide enough that samples and rewards vary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **TINY,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    path = root / "tiny_qwen2"
    model.save_pretrained(path)
    return path


def _hf_model(path: Path, dtype, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval().requires_grad_(False) if device else model.eval()


def _hf_logp(model, input_ids, attention_mask):
    """transformers' per-token log-probs ``[b, s]`` aligned like the engine's (entry t
    scores token t; entry 0 is 0), in float64 from the model's logits."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return torch.cat([logp.new_zeros(logp.shape[0], 1), logp], dim=1)


def _engine(path: Path, dtype, impl: str, optimizer=True, micro_batch_size: int = 4, **optim):
    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig, build_model, load_hf_weights

    config = PolicyModelConfig.from_hf(path, params_dtype=dtype)
    chunks = build_model(config, transformer_impl=impl)
    load_hf_weights(chunks, config, path)
    settings = OptimizerConfig(**{"lr": 1e-3, "weight_decay": 0.0, **optim}) if optimizer else None
    return PolicyEngine(chunks, config, settings, EngineConfig(micro_batch_size=micro_batch_size))


def _random_batch(vocab: int, rows: int, seq: int, seed: int, device=None):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    for r in range(rows):  # right padding of varying length
        mask[r, seq - r % 4 :] = 0
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def _nll_loss(rows: int, seq: int):
    def loss_fn(out, micro):
        mask = micro["attention_mask"].float()
        mask[:, 0] = 0
        return -(out.logp * mask).sum() / (rows * seq), {}

    return loss_fn


# ---------------------------------------------------------------------------- stages
def stage_backend(st: Stage, ctx) -> None:
    import torch
    import torch.distributed as dist

    from covrl.parallel import cpu_compat, get_device

    device = get_device()
    backend = dist.get_backend()
    st.numbers.update(device=str(device), backend=backend, shims=cpu_compat.is_applied())
    st.check("backend is nccl", backend == "nccl", backend, "nccl", gpu_only=True)
    st.check("device is cuda:0", str(device) == "cuda:0", str(device), "cuda:0", gpu_only=True)
    st.check("CPU shims not applied", not cpu_compat.is_applied(), gpu_only=True)
    x = torch.arange(4, dtype=torch.float32, device=device)
    dist.all_reduce(x)
    st.check("all_reduce on the device", x.device == device and x.tolist() == [0, 1, 2, 3])
    if device.type == "cuda":
        st.numbers.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )


def stage_mixed_precision(st: Stage, ctx) -> None:
    import torch
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params

    from covrl.models import unwrap_model

    engine = _engine(ctx.hf, torch.bfloat16, ctx.impl)
    # get_megatron_optimizer returns a ChainedOptimizer over one optimizer per group.
    opts = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
    params = [p for m in engine.model for p in m.parameters()]
    main = [p for o in opts for g in getattr(o, "fp32_from_float16_groups", []) for p in g]
    st.numbers.update(
        optimizers=[type(o).__name__ for o in opts], parameters=sum(p.numel() for p in params)
    )
    st.check(
        "megatron mixed-precision optimizer",
        all(isinstance(o, Float16OptimizerWithFloat16Params) for o in opts),
    )
    st.check("bf16 parameters", all(p.dtype == torch.bfloat16 for p in params))
    st.check("fp32 main weights", bool(main) and all(p.dtype == torch.float32 for p in main))
    grad_dtypes = {p.main_grad.dtype for p in params}
    st.check("fp32 gradient buffer", grad_dtypes == {torch.float32}, sorted(map(str, grad_dtypes)))
    ids, mask = _random_batch(engine.vocab_size, 8, 48, seed=1)
    before = unwrap_model(engine.model[0]).output_layer.weight.detach().clone()
    r = engine.train_step({"input_ids": ids, "attention_mask": mask}, _nll_loss(8, 48))
    moved = (unwrap_model(engine.model[0]).output_layer.weight - before).abs().max().item()
    st.numbers.update(loss=r.loss, grad_norm=r.grad_norm, max_weight_change=moved)
    st.check("update successful", r.update_successful)
    st.check("finite grad norm > 0", _finite(r.grad_norm) and r.grad_norm > 0, r.grad_norm)
    st.check("finite loss", _finite(r.loss), r.loss)
    st.check("weights moved", moved > 0, moved)
    if engine.device.type == "cuda":
        st.numbers["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30


def stage_logprob_parity(st: Stage, ctx) -> None:
    import torch

    # The fp32 reference must not use TF32 tensor-core matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = ctx.device
    for name, dtype, stat, limit in (
        ("fp32", torch.float32, "max", 1e-4),
        ("bf16", torch.bfloat16, "mean", 5e-3),
    ):
        engine = _engine(ctx.hf, dtype, ctx.impl, optimizer=False)
        ids, mask = _random_batch(engine.vocab_size, 8, 96, seed=2)
        ours = engine.forward_logprobs(ids, mask).logp.double()
        ref = _hf_logp(_hf_model(ctx.hf, dtype, device), ids.to(device), mask.to(device))
        fp32_ref = (
            ref
            if dtype == torch.float32
            else _hf_logp(_hf_model(ctx.hf, torch.float32, device), ids.to(device), mask.to(device))
        )
        real = mask.bool().to(device).clone()
        real[:, 0] = False
        d = (ours.to(device) - ref)[real].abs()
        d32 = (ours.to(device) - fp32_ref)[real].abs()
        value = d.max().item() if stat == "max" else d.mean().item()
        st.numbers[name] = {
            "max_abs_dlogp": d.max().item(),
            "mean_abs_dlogp": d.mean().item(),
            "mean_abs_dlogp_vs_fp32_reference": d32.mean().item(),
            "tokens": int(real.sum()),
        }
        st.check(f"{name} {stat} |dlogp| vs transformers", value < limit, value, limit)
        del engine


def _generate(hf_model, vocab: int, prompts: int, n: int, prompt_len: int, new: int, seed: int):
    """``prompts x n`` responses sampled at temperature 1 with transformers (in place
    of vLLM) and their sampling log-probs, as a :class:`Generations`."""
    import torch

    from covrl.rollout import Generations

    device = next(hf_model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, vocab, (prompts, prompt_len), generator=g)
    torch.manual_seed(seed)
    out = hf_model.generate(
        prompt_ids.repeat_interleave(n, 0).to(device),
        attention_mask=torch.ones(prompts * n, prompt_len, dtype=torch.long, device=device),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new,
        min_new_tokens=new,
        eos_token_id=None,
        pad_token_id=0,
    )
    full = torch.ones_like(out)
    logp = _hf_logp(hf_model, out, full)[:, prompt_len:].float().cpu()
    responses = out[:, prompt_len:].cpu()
    rows = prompts * n
    gens = Generations(
        prompt_index=[i // n for i in range(rows)],
        prompt_ids=[prompt_ids[i // n].tolist() for i in range(rows)],
        response_ids=[responses[i].tolist() for i in range(rows)],
        logprobs=[logp[i].tolist() for i in range(rows)],
        finish_reasons=["length"] * rows,
    )
    gens.annotate(list(range(prompts)), ["smoke"] * prompts, group_offset=0)
    # A reward that varies within groups: more even than odd token ids.
    gens.rewards = [float(sum(t % 2 == 0 for t in r) * 2 > len(r)) for r in gens.response_ids]
    gens.acc = list(gens.rewards)
    return gens


def stage_step_functions(st: Stage, ctx) -> None:
    import torch

    from covrl.algorithms import AdvantageConfig, PolicyLossConfig
    from covrl.algorithms.config import ClipCovConfig, EntropyControlConfig, KLCovConfig
    from covrl.config import AlgorithmConfig
    from covrl.training.batch import MiniBatchLayout, rank_batch
    from covrl.training.steps import entropy_change, old_logprobs, update_policy

    prompts, n, minibatches = 8, 4, 2
    hf = _hf_model(ctx.hf, torch.float32, ctx.device)
    gens = _generate(hf, TINY["vocab_size"], prompts, n, prompt_len=12, new=20, seed=3)
    del hf
    engine = _engine(ctx.hf, torch.float32, ctx.impl)
    layout = MiniBatchLayout(
        num_minibatches=minibatches,
        rows_per_minibatch=prompts * n // minibatches,
        dp_size=engine.dp_size,
        dp_rank=engine.dp_rank,
    )
    batch = rank_batch(gens, layout, AdvantageConfig(), pad_token_id=0, device=engine.device)
    st.check("batch on the engine's device", batch.input_ids.device == engine.device)
    losses = {
        "kl_cov": EntropyControlConfig(method="kl_cov", kl_cov=KLCovConfig(ratio=0.05)),
        "clip_cov": EntropyControlConfig(
            method="clip_cov", clip_cov=ClipCovConfig(ratio=0.05, omega_low=-1e9, omega_high=1e9)
        ),
    }
    algorithm = AlgorithmConfig(ppo_mini_batch_size=prompts // minibatches, ppo_epochs=1)
    run = SimpleNamespace(
        engine=engine,
        ref_engine=None,
        entropy_target=None,
        config=SimpleNamespace(algorithm=algorithm),
    )
    old = old_logprobs(run, batch, layout)
    st.numbers["old_logprobs"] = old
    # The rollout log-probs came from transformers in float32: the trainer must agree.
    st.check(
        "trainer vs sampler max |dlogp| (fp32)",
        old["mismatch/abs_diff_max"] < 1e-4,
        old["mismatch/abs_diff_max"],
        1e-4,
    )
    st.check("rollout entropy finite", _finite(old["rollout/entropy"]), old["rollout/entropy"])
    for step, (name, ec) in enumerate(losses.items(), start=1):
        run.config.policy = SimpleNamespace(loss=PolicyLossConfig(entropy_control=ec))
        metrics = update_policy(run, batch, layout, step, old["rollout/entropy"])
        st.numbers[name] = metrics
        selected = metrics.get("cov/selected_tokens", 0.0)
        st.check(f"{name}: updates successful", metrics["train/skipped_updates"] == 0)
        st.check(
            f"{name}: finite loss and grad norm",
            _finite(metrics["train/loss"], metrics["train/grad_norm"]),
            [metrics["train/loss"], metrics["train/grad_norm"]],
        )
        st.check(f"{name}: tokens selected", selected > 0, selected)
    change = entropy_change(run, batch, layout)
    st.numbers["entropy_change"] = change
    st.check("entropy change finite", _finite(*change.values()), change)
    ctx.trained = (engine, batch)  # for the export stage


def stage_export_stream(st: Stage, ctx) -> None:
    import torch

    from covrl.rollout.memory import peak_extra_memory
    from covrl.rollout.weight_sync import BucketedWeightStream, sync_memory_bound

    if getattr(ctx, "trained", None) is None:
        raise RuntimeError("needs the engine updated by step_functions, which did not finish")
    engine, batch = ctx.trained
    config = engine.model_config
    hf = _hf_model(ctx.hf, torch.float32, ctx.device)  # the pre-update weights
    params = dict(hf.named_parameters())
    stream = BucketedWeightStream(
        engine.hf_weights(torch.float32),
        config.hf_weight_shapes(),
        bucket_bytes=1 << 20,
        dtype=torch.float32,
        device=ctx.device,
    )

    def load():
        with torch.no_grad():
            for name, tensor in stream:
                params[name].copy_(tensor)

    _, peak = peak_extra_memory(load, ctx.device)
    bound = sync_memory_bound(config, stream.stats.metrics(), 4)
    ours = engine.forward_logprobs(batch.input_ids, batch.attention_mask).logp.double()
    ref = _hf_logp(hf, batch.input_ids.to(ctx.device), batch.attention_mask.to(ctx.device))
    d = (ours.to(ctx.device) - ref)[batch.response_mask.to(ctx.device)].abs().max().item()
    st.numbers.update(stats=stream.stats.metrics(), peak_extra_bytes=peak, bound_bytes=bound)
    st.numbers["max_abs_dlogp"] = d
    st.check("every tensor streamed", stream.stats.tensors == len(config.hf_weight_shapes()))
    st.check("transformers with the streamed weights: max |dlogp|", d < 1e-4, d, 1e-4)
    st.check("extra memory within the sync bound", peak <= bound, peak, bound, gpu_only=True)


def _tensors_equal(a, b, path="") -> list[str]:
    """Paths where two nested states differ (tensors bit for bit)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys"]
        return [d for k in a for d in _tensors_equal(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _tensors_equal(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [path]


def _rng_states():
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }


def stage_checkpoint(st: Stage, ctx) -> None:
    import torch

    from covrl.models import unwrap_model

    def fresh():
        return _engine(ctx.hf, torch.bfloat16, ctx.impl, lr_warmup_steps=2, lr_decay_steps=10,
                       lr_decay_style="cosine")  # fmt: skip

    a = fresh()
    ids, mask = _random_batch(a.vocab_size, 8, 40, seed=4)
    batch = {"input_ids": ids, "attention_mask": mask}
    for _ in range(2):
        a.train_step(batch, _nll_loss(8, 40))
    rng = _rng_states()
    path = a.save_checkpoint(ctx.tmp / "ckpt", a.num_steps)
    torch.manual_seed(12345)  # move every generator on before loading
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(12345)
    torch.rand(3, device=ctx.device)
    b = fresh()
    b.load_checkpoint(path)
    params = {
        "a": {k: v for k, v in unwrap_model(a.model[0]).state_dict().items() if v is not None},
        "b": {k: v for k, v in unwrap_model(b.model[0]).state_dict().items() if v is not None},
    }
    diffs = {
        "parameters": _tensors_equal(params["a"], params["b"]),
        "optimizer": _tensors_equal(a.optimizer.state_dict(), b.optimizer.state_dict()),
        "scheduler": _tensors_equal(a.scheduler.state_dict(), b.scheduler.state_dict()),
        "rng": _tensors_equal(rng, _rng_states()),
    }
    st.numbers["differences"] = {k: v[:4] for k, v in diffs.items()}
    for what, diff in diffs.items():
        st.check(f"{what} bit-exact", not diff, len(diff))
    st.check("CUDA RNG restored", not diffs["rng"] and bool(rng["cuda"]), gpu_only=True)
    ra, rb = (e.train_step(batch, _nll_loss(8, 40)) for e in (a, b))
    st.numbers["next_step"] = {
        "loss": [ra.loss, rb.loss],
        "grad_norm": [ra.grad_norm, rb.grad_norm],
    }
    st.check(
        "next step identical", (ra.loss, ra.grad_norm, ra.lr) == (rb.loss, rb.grad_norm, rb.lr)
    )


def stage_shape(full: bool) -> dict:
    """Hugging Face config fields of the model of one GPU of a Qwen2.5-32B TP8 x PP4 stage:
    16 of 64 layers, heads / K-V heads / FFN divided by TP=8, the vocabulary shard of
    TP=8 as its vocabulary (tied: one embedding matrix, as the first or last stage has).
    ``full=False``: a tiny model of the same form for CPU runs."""
    from covrl.models import PolicyModelConfig
    from covrl.scaling import PUBLISHED_CONFIGS

    base = PolicyModelConfig.from_hf(PUBLISHED_CONFIGS["qwen2.5-32b"])
    tp, pp = 8, 4
    if not full:
        return dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=512)  # fmt: skip
    return dict(
        hidden_size=base.hidden_size,
        intermediate_size=base.ffn_hidden_size // tp,
        num_hidden_layers=base.num_layers // pp,
        num_attention_heads=base.num_attention_heads // tp,
        num_key_value_heads=base.num_query_groups // tp,
        head_dim=base.head_dim,
        vocab_size=base.padded_vocab_size(tp) // tp,
    )


def stage_stage_memory(st: Stage, ctx) -> None:
    import torch

    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig, build_model
    from covrl.scaling import (
        PUBLISHED_CONFIGS,
        activation_bytes_per_token_layer,
        stage_params,
        total_params,
    )

    on_gpu = ctx.device.type == "cuda"
    shape = stage_shape(full=on_gpu)
    tokens = ctx.memory_tokens
    hf = {
        **PUBLISHED_CONFIGS["qwen2.5-32b"],
        **shape,
        "tie_word_embeddings": True,
        "max_position_embeddings": max(tokens) + 1,
    }
    model = PolicyModelConfig.from_hf(
        hf, params_dtype=torch.bfloat16, make_vocab_size_divisible_by=1
    )
    p = total_params(model)
    st.numbers["parameters"] = p
    if on_gpu:
        qwen32 = PolicyModelConfig.from_hf(PUBLISHED_CONFIGS["qwen2.5-32b"])
        expected = stage_params(qwen32, 8, 4)
        st.check("stage shape = scaling.stage_params(32B, tp8, pp4)", p == expected, p, expected)
        per_token = (
            16 * activation_bytes_per_token_layer(qwen32, 8) + 6 * qwen32.padded_vocab_size(8) // 8
        )
    else:
        per_token = (
            model.num_layers * activation_bytes_per_token_layer(model, 1) + 6 * model.vocab_size
        )
    engine = PolicyEngine(
        build_model(model, transformer_impl=ctx.impl),
        model,
        OptimizerConfig(lr=1e-6, weight_decay=0.0),
        EngineConfig(micro_batch_size=1),
    )
    gib = 2**30
    predicted_state = 18 * p  # bf16 weights 2P + fp32 grads 4P + fp32 main and Adam 12P
    heads = model.num_attention_heads
    results = []
    for i, s in enumerate([tokens[0], *tokens]):  # the first step allocates Adam's state
        ids, mask = _random_batch(model.vocab_size, 1, s, seed=10 + i)
        mask[:] = 1
        if on_gpu:
            torch.cuda.synchronize()
            static = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        r = engine.train_step({"input_ids": ids, "attention_mask": mask}, _nll_loss(1, s))
        seconds = time.perf_counter() - start
        if i == 0:
            continue
        row = {"tokens": s, "seconds": seconds, "grad_norm": r.grad_norm}
        predicted = per_token * s
        # Megatron's local attention keeps [heads, s, s] scores in fp32 and bf16
        # probabilities per layer; Transformer Engine's fused attention keeps none.
        unfused = (
            0 if ctx.impl_resolved == "transformer_engine" else 6 * heads * s * s * model.num_layers
        )
        row.update(predicted_activation_bytes=predicted, unfused_attention_bytes=unfused)
        if on_gpu:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - static
            row.update(state_bytes=static, activation_peak_bytes=peak)
            row["ratio_to_prediction"] = peak / (predicted + unfused)
            st.check(f"{s} tokens: training state within 5% of 18 P", abs(static / predicted_state - 1) < 0.05,
                     static / gib, predicted_state / gib)  # fmt: skip
            st.check(f"{s} tokens: activations within 0.5-1.5x of the model", 0.5 <= row["ratio_to_prediction"] <= 1.5,
                     row["ratio_to_prediction"], [0.5, 1.5])  # fmt: skip
        st.check(f"{s} tokens: finite grad norm", _finite(r.grad_norm), r.grad_norm)
        results.append(row)
    st.numbers.update(predicted_state_bytes=predicted_state, runs=results)


STAGE_FUNCTIONS = {name: globals()[f"stage_{name}"] for name in STAGES}


# ---------------------------------------------------------------------------- main
def _table(records: list[dict]) -> str:
    lines = [f"{'stage':<16} {'status':<6} {'s':>6}  checks (failed first)"]
    for r in records:
        failed = [c["name"] for c in r["checks"] if c["ok"] is False]
        passed = sum(c["ok"] is True for c in r["checks"])
        skipped = sum(c["ok"] is None for c in r["checks"])
        note = f"{passed} passed, {skipped} skipped"
        if failed:
            note = f"FAILED: {'; '.join(failed)} | " + note
        if r["error"]:
            note = "ERROR: " + r["error"].strip().splitlines()[-1][:100]
        lines.append(f"{r['name']:<16} {r['status']:<6} {r['seconds']:>6.1f}  {note}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default="gpu_smoke.json", help="JSON results (rewritten per stage)")
    p.add_argument("--kit", help="folder made by --make-kit, put on the import path")
    p.add_argument("--make-kit", metavar="DIR", help="build the kit into DIR and exit")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
    p.add_argument(
        "--memory-tokens",
        default=None,
        help="sequence lengths of stage_memory (default 1024,2048,4096 on cuda, 32,64,128 on cpu)",
    )
    p.add_argument(
        "--transformer-impl",
        choices=["auto", "transformer_engine", "local"],
        default=None,
        help="layer spec (default: auto when Transformer Engine imports, else local)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.make_kit:
        manifest = make_kit(Path(args.make_kit))
        total = sum(d["bytes"] for d in manifest["distributions"].values())
        print(f"kit in {args.make_kit}: {manifest['distributions']} ({total / 2**20:.1f} MiB)")
        return 0
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    if args.kit:
        use_kit(Path(args.kit))
    sys.path.insert(0, str(REPO))
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; known: {','.join(STAGES)}")

    import torch

    for module in _KIT_MODULES:
        __import__(module)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible (use --device cpu for a dry run)")
    from covrl.models import resolve_transformer_impl, transformer_engine_import_error
    from covrl.parallel import ParallelConfig, destroy, get_device, initialize
    from covrl.utils.versions import software_versions

    impl = args.transformer_impl or (
        "auto" if transformer_engine_import_error() is None else "local"
    )
    on_gpu = args.device == "cuda"
    default_tokens = "1024,2048,4096" if on_gpu else "32,64,128"
    out = Path(args.out)
    report = {
        "device": args.device,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": software_versions(),
        "transformer_impl": impl,
        # Where the GPU path's packages were imported from (the kit's, when given).
        "modules": {m: str(Path(sys.modules[m].__file__).parent) for m in _KIT_MODULES},
        "stages": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="covrl-smoke-") as tmp:
        initialize(ParallelConfig(), seed=1234)
        ctx = SimpleNamespace(
            device=get_device(),
            tmp=Path(tmp),
            impl=impl,
            impl_resolved=resolve_transformer_impl(impl),
            memory_tokens=[int(t) for t in (args.memory_tokens or default_tokens).split(",")],
            trained=None,
        )
        ctx.hf = _tiny_checkpoint(ctx.tmp)
        for name in stages:
            st = Stage(name, on_gpu)
            t0 = time.perf_counter()
            try:
                STAGE_FUNCTIONS[name](st, ctx)
            except Exception:  # noqa: BLE001 - recorded; the next stage still runs
                st.error = traceback.format_exc()
            st.seconds = time.perf_counter() - t0
            if on_gpu:
                torch.cuda.empty_cache()
            report["stages"].append(st.record())
            report["seconds"] = round(time.perf_counter() - start, 1)
            report["passed"] = all(s["status"] == "pass" for s in report["stages"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"[{st.status}] {name} ({st.seconds:.1f} s)", flush=True)
        ctx.trained = None
        destroy()
    print(_table(report["stages"]))
    print(f"{'all passed' if report['passed'] else 'FAILED'} in {report['seconds']} s; {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":  # dist_checkpointing.save starts spawn-context processes
    sys.exit(main())
