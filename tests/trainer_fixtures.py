"""Assets for trainer tests: the two-sum data and tokenizer (covrl.tasks) and a tiny random
Qwen2 policy with head_dim 64 (vLLM's CPU attention), plus reward functions for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# hidden 128 = 2 heads x 64; two layers; ~0.3M parameters with the 64-token vocabulary.
# What the trainer prints (rank 0) once its preemption handlers are installed: a signal
# sent after this line is never lost, whatever the length of a step.
HANDLERS_READY = "SIGTERM or SIGUSR1 saves a checkpoint"

TINY_POLICY = dict(
    hidden_size=128,
    num_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=256,
    max_position_embeddings=64,
)


def build_assets(root: Path, seed: int = 0) -> dict[str, str]:
    """Data, tokenizer and a random tiny Qwen2 checkpoint under ``root``."""
    from transformers import Qwen2ForCausalLM

    from covrl.tasks import load_task_tokenizer
    from covrl.tasks.tiny import TinyTaskPaths, build_tiny_task
    from covrl.tasks.warm_start import BaseModelConfig, qwen2_config

    paths = TinyTaskPaths(root)
    build_tiny_task(root, log=lambda _: None)
    tokenizer = load_task_tokenizer(paths.model_dir)
    config = qwen2_config(BaseModelConfig(**TINY_POLICY), tokenizer)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # logits of O(1): samples vary, rewards are not all equal
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(paths.model_dir)
    return {
        "model": str(paths.model_dir),
        "train": str(paths.train_file),
        "val": str(paths.validation_file),
    }


def shared_assets(tmp_path_factory) -> dict[str, str]:
    """:func:`build_assets` once per pytest session, shared by the trainer test modules."""
    root = tmp_path_factory.getbasetemp() / "trainer_assets"
    marker = root / "assets.json"
    if not marker.is_file():
        assets = build_assets(root)
        marker.write_text(json.dumps(assets))
    return json.loads(marker.read_text())


def run_overrides(assets: dict[str, str], run_dir: Path, **extra) -> list[str]:
    """Dotted overrides of a small, fast run (2 prompts x 4 samples, 8 tokens)."""
    values = {
        "policy.model_path": assets["model"],
        "policy.optim.lr": 1e-3,
        "policy.optim.weight_decay": 0.0,
        "policy.engine.micro_batch_size": 2,
        "data.train_files": f"[{assets['train']}]",
        "data.val_files": f"[{assets['val']}]",
        "data.max_prompt_length": 32,
        "data.train_batch_size": 4,
        "data.val_max_prompts": 8,
        "algorithm.ppo_mini_batch_size": 2,
        "algorithm.ppo_epochs": 2,
        "algorithm.max_num_gen_batches": 2,
        "sampling.n": 4,
        "sampling.max_tokens": 8,
        "rollout.kv_cache_memory_bytes": 16 << 20,
        "rollout.max_model_len": 64,
        "validation.test_freq": 2,
        "validation.k": 2,
        "reward.sources": "{two_sum: tests.trainer_fixtures:digit_reward}",
        "reward.timeout_s": 30,
        "trainer.run_dir": str(run_dir),
        "trainer.total_steps": 3,
        "trainer.progress_bar": False,
        "trainer.seed": 7,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _has_digit(solution_str: str) -> float:
    return 1.0 if any(c.isdigit() for c in solution_str) else 0.0


def digit_reward(data_source, solution_str, ground_truth, extra_info=None):
    """1 when the response contains a digit: about 60% of the random tiny policy's
    8-token samples do, so most groups mix 0s and 1s, and RL can push either way."""
    return _has_digit(solution_str)


def inverted_digit_reward(data_source, solution_str, ground_truth, extra_info=None):
    """Rewards the opposite of :func:`digit_reward`, still reporting whether the
    response contains a digit as the accuracy (verl's ``{"score", "acc"}`` dict)."""
    acc = _has_digit(solution_str)
    return {"score": 1.0 - acc, "acc": acc}


def nan_reward(data_source, solution_str, ground_truth, extra_info=None):
    return float("nan")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def nan_for_seven(data_source, solution_str, ground_truth, extra_info=None):
    """NaN for a response containing "7" (a broken user reward), else 0."""
    return float("nan") if "7" in solution_str else 0.0


def zero_reward(data_source, solution_str, ground_truth, extra_info=None):
    """0 for every response: every group's rewards are equal, so DAPO dynamic sampling
    keeps no group and the step skips its update."""
    return 0.0
