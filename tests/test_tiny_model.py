"""The tiny task's base model: built by the megatron-core warm start, exported as a Hugging
Face checkpoint, and read back by transformers, vLLM and the megatron engine (TP 1 and 2).

The model here is the default pipeline with a smaller architecture and a few SFT steps
(the cached default model takes minutes). References: transformers' float32 forward
(float64 log-softmax) and its greedy ``generate``; an independent answer checker.
"""

from __future__ import annotations

import pytest
import torch

from covrl.tasks import two_sum
from covrl.tasks.tiny import STAGES, TinyTaskConfig, TinyTaskPaths, build_tiny_task
from covrl.tasks.warm_start import BaseModelConfig, WarmStartConfig
from tests.harness import launch
from tests.test_rollout import hf_reference, padded
from tests.test_tasks import _reference_score

pytestmark = pytest.mark.slow

SETTINGS = TinyTaskConfig(
    model=BaseModelConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=256,
    ),
    warm_start=WarmStartConfig(
        max_steps=30, batch_size=32, lr=3e-3, warmup_steps=5, eval_every=30, stop_accuracy=1.1
    ),
)
MAX_NEW = 10


def _vocab_size(model_dir) -> int:
    from covrl.tasks.tokenizer import load_task_tokenizer

    return len(load_task_tokenizer(model_dir))


def _parameters(h: int, f: int, v: int, layers: int = 2) -> int:
    """Parameters of a Qwen2 decoder with untied embeddings (q/k/v biases, SwiGLU)."""
    layer = h + 3 * (h * h + h) + h * h + h + 3 * h * f
    return 2 * v * h + layers * layer + h


def _sequences(tokenizer, n: int = 6) -> list[list[int]]:
    """Prompt + answer token sequences (right answers and wrong ones)."""
    from covrl.tasks.warm_start import encode_prompt

    out = []
    for i, target in enumerate(two_sum.split_sums(two_sum.TwoSumConfig())["validation"][:n]):
        a = 10 + i
        b = target - a if i % 2 == 0 else 10 + (7 * i) % 80
        answer = tokenizer(two_sum.format_answer(a, b), add_special_tokens=False)["input_ids"]
        out.append(encode_prompt(tokenizer, two_sum.prompt_messages(target)) + answer + [2])
    return out


def _megatron_checks(model_dir, seqs):
    """This layout's log-probs of ``seqs`` and greedy validation accuracy/responses."""
    from megatron.core import parallel_state as ps

    from covrl.engine import PolicyEngine
    from covrl.models import PolicyModelConfig, build_model, load_hf_weights
    from covrl.tasks.tokenizer import load_task_tokenizer
    from covrl.tasks.warm_start import evaluate

    config = PolicyModelConfig.from_hf(model_dir)
    chunks = build_model(config)
    load_hf_weights(chunks, config, model_dir)
    engine = PolicyEngine(chunks, config)
    ids, mask = padded(seqs)
    logp = engine.forward_logprobs(ids, mask).logp
    tokenizer = load_task_tokenizer(model_dir)
    sums = two_sum.split_sums(two_sum.TwoSumConfig())["validation"]
    settings = WarmStartConfig(max_new_tokens=MAX_NEW)
    accuracy, texts = evaluate(
        chunks[0], tokenizer, sums, settings, ps.get_tensor_model_parallel_group()
    )
    return {"logp": logp, "accuracy": accuracy, "texts": texts}


def _build_body(ctx, root, seqs):
    """World 1: the whole build (the model stage in this initialised state), then the
    TP1 engine and vLLM on the exported checkpoint."""
    from covrl.rollout import RolloutConfig, RolloutEngine, SamplingConfig
    from covrl.tasks.warm_start import encode_prompt

    manifest = build_tiny_task(root, SETTINGS, stages=STAGES, log=lambda _: None)
    paths = TinyTaskPaths(root)
    out = _megatron_checks(paths.model_dir, seqs)
    out["manifest"] = manifest
    from covrl.tasks.tokenizer import load_task_tokenizer

    tokenizer = load_task_tokenizer(paths.model_dir)
    sums = two_sum.split_sums(two_sum.TwoSumConfig())["validation"]
    prompts = [encode_prompt(tokenizer, two_sum.prompt_messages(s)) for s in sums]
    engine = RolloutEngine(paths.model_dir, RolloutConfig(kv_cache_memory_bytes=16 << 20))
    out["vllm_logp"] = engine.prompt_logprobs(seqs)
    greedy = engine.generate(
        prompts, SamplingConfig(temperature=0.0, max_tokens=MAX_NEW, stop_token_ids=[2])
    )
    out["vllm_greedy"] = [list(r) for r in greedy.response_ids]
    return out


def _tp2_body(ctx, model_dir, seqs):
    return _megatron_checks(model_dir, seqs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from covrl.tasks.tokenizer import load_task_tokenizer

    root = tmp_path_factory.mktemp("tiny_model")
    build_tiny_task(root, SETTINGS, log=lambda _: None)
    paths = TinyTaskPaths(root)
    seqs = _sequences(load_task_tokenizer(paths.model_dir))
    tp1 = launch(_build_body, world_size=1, root=root, seqs=seqs, timeout=600)[0]
    tp2 = launch(_tp2_body, world_size=2, tp=2, model_dir=paths.model_dir, seqs=seqs)
    return {"paths": paths, "seqs": seqs, "tp1": tp1, "tp2": tp2}


@pytest.fixture(scope="module")
def hf(built):
    from transformers import AutoModelForCausalLM

    from covrl.tasks.tokenizer import load_task_tokenizer

    model_dir = built["paths"].model_dir
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model, load_task_tokenizer(model_dir)


def test_manifest_records_stages_and_model(built):
    manifest = built["tp1"]["manifest"]
    model = manifest["stages"]["model"]["result"]
    assert model["steps"] == 30
    # hf_weight_shapes of the small model: the trained tokenizer's vocabulary (33 pieces
    # on this corpus), hidden 128, SwiGLU 256, 2 layers.
    h, f, v = 128, 256, _vocab_size(built["paths"].model_dir)
    assert model["parameters"] == _parameters(h, f, v)
    files = built["paths"].stage_files("model") + built["paths"].stage_files("tokenizer")
    assert all(f.is_file() for f in files)


def test_hf_config_and_generation_config(hf):
    model, tokenizer = hf
    assert model.config.model_type == "qwen2"
    assert model.config.head_dim == 64
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert model.generation_config.eos_token_id == 2


def test_megatron_and_vllm_logprobs_match_transformers(built, hf):
    model, _ = hf
    seqs = built["seqs"]
    ref = hf_reference(model, seqs)
    for name in ("tp1", "tp2"):
        logp = built[name]["logp"] if name == "tp1" else built["tp2"][0]["logp"]
        for i, x in enumerate(seqs):
            got = logp[i, 1 : len(x)].double()
            torch.testing.assert_close(got, ref[i], atol=2e-5, rtol=0, msg=name)
    torch.testing.assert_close(built["tp2"][0]["logp"], built["tp2"][1]["logp"], atol=0, rtol=0)
    for i, _ in enumerate(seqs):
        got = torch.tensor(built["tp1"]["vllm_logp"][i], dtype=torch.float64)
        torch.testing.assert_close(got, ref[i], atol=1e-4, rtol=0, msg="vllm")


def test_greedy_accuracy_matches_transformers_and_reference_scorer(built, hf):
    model, tokenizer = hf
    from covrl.tasks.warm_start import encode_prompt

    sums = two_sum.split_sums(two_sum.TwoSumConfig())["validation"]
    texts, vllm_texts = [], []
    with torch.no_grad():
        for s, vllm_ids in zip(sums, built["tp1"]["vllm_greedy"], strict=True):
            prompt = encode_prompt(tokenizer, two_sum.prompt_messages(s))
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=2,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
            texts.append(tokenizer.decode(out, skip_special_tokens=True))
            vllm_texts.append(tokenizer.decode(vllm_ids, skip_special_tokens=True))
    accuracy = sum(_reference_score(t, s) for t, s in zip(texts, sums, strict=True)) / len(sums)
    for result in (built["tp1"], *built["tp2"]):
        assert result["texts"] == texts
        assert result["accuracy"] == pytest.approx(accuracy)
    assert vllm_texts == texts
    # The warm start learned the answer format.
    assert sum("\\boxed{" in t for t in texts) > len(texts) // 2


def test_vocab_parallel_argmax_ties_and_padding():
    """Single-rank behaviour; the TP path is covered by the TP2 greedy run above."""
    from covrl.tasks.greedy import vocab_parallel_argmax

    logits = torch.tensor([[0.0, 2.0, 2.0, 9.0], [1.0, 0.5, 1.0, -1.0]])
    # Column 3 is padding (vocab_size 3): never chosen; ties go to the lowest id.
    assert vocab_parallel_argmax(logits, vocab_size=3, tp_group=None).tolist() == [1, 0]


def test_make_train_short_run(built, tmp_path):
    """`make train` on the small model: 2 RL steps of examples/tiny_kl_cov.yaml at TP=2,
    then the closing note (build breakdown, phase times, where the outputs are)."""
    import os
    import subprocess
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from covrl.analysis import read_jsonl

    repo = Path(__file__).resolve().parents[1]
    root, run_dir = built["paths"].root, tmp_path / "run"
    overrides = {
        "trainer.total_steps": 2,
        "trainer.progress_bar": "false",
        "trainer.entropy_change_freq": 1,
        "data.train_batch_size": 8,
        "data.val_max_prompts": 8,
        "algorithm.ppo_mini_batch_size": 4,
        "sampling.n": 4,
        "policy.engine.micro_batch_size": 16,
        "validation.test_freq": 2,
        "validation.k": 2,
    }
    command = [
        "make",
        "-o",
        ".venv/.covrl-installed",  # the suite already runs inside the installed venv
        "train",
        f"TINY_ROOT={root}",
        f"TRAIN_RUN_DIR={run_dir}",
        "BUILD_ARGS=--stages data,tokenizer",  # keep the small model built above
        "TRAIN_ARGS=" + " ".join(f"{k}={v}" for k, v in overrides.items()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = read_jsonl(run_dir / "metrics.jsonl")
    assert run.series("rollout/entropy").steps.tolist() == [1, 2]
    assert run.series("val/two_sum/accuracy").steps.tolist() == [0, 2]
    assert run.has("time/rollout") and run.has("time/update") and run.has("time/sync")
    note = proc.stdout
    assert "RL: 2 steps" in note and "mean seconds per step by phase" in note
    assert f"TensorBoard logs: {run_dir / 'tensorboard'}" in note
    assert f"exported checkpoint (Hugging Face): {run_dir / 'hf'}" in note
    params = _parameters(128, 256, _vocab_size(root / "model"))
    assert f"base model: {params / 1e6:.2f}M parameters, 30 SFT steps" in note
    assert any((run_dir / "tensorboard").iterdir())
    AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert AutoTokenizer.from_pretrained(run_dir / "hf").chat_template
