"""A tiny Qwen2 base model for the two-sum task, supervised-warm-started on megatron-core.

The model is initialised by megatron-core (``covrl.models.build_model``), trained with
``PolicyEngine.train_step`` on a next-token loss over the response tokens of worked
answers, evaluated by greedy decoding, and exported with
``covrl.models.save_hf_checkpoint``: the same code paths an RL run uses on a real
checkpoint.

The SFT target for a prompt is a *uniformly random* correct answer, so the warm-started
policy spreads its probability over many correct answers (high entropy on the answer
digits): the room that RL's entropy collapse, and Clip-Cov / KL-Cov, act on. Training
stops early, once greedy accuracy on the training sums reaches ``stop_accuracy``:
a partly trained policy leaves RL something to improve.

Layout: any TP size with PP = 1 and DP = 1 (one data stream), in the process group
and megatron parallel state the caller initialised (``covrl.parallel.initialize``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from covrl.tasks import two_sum
from covrl.utils.errors import check_field


@dataclass(frozen=True)
class BaseModelConfig:
    """The architecture (a Qwen2 decoder). ``hidden_size / num_attention_heads`` is the
    head dim: 64, the smallest vLLM's CPU attention takes."""

    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            check_field(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        heads = self.num_attention_heads
        check_field(
            self.hidden_size % heads == 0,
            "hidden_size",
            self.hidden_size,
            f"a multiple of num_attention_heads={heads} (the head dim is their ratio)",
        )
        check_field(
            heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            self.num_key_value_heads,
            f"a divisor of num_attention_heads={heads}",
        )
        check_field(self.rope_theta > 0, "rope_theta", self.rope_theta, "a value > 0")


@dataclass(frozen=True)
class WarmStartConfig:
    """Supervised warm start: AdamW on random correct answers of the training sums."""

    max_steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    # Cosine decay from lr to min_lr over max_steps (after the warm-up).
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    eval_every: int = 25
    # Stop at the first evaluation whose greedy accuracy on the training sums is this high.
    stop_accuracy: float = 0.45
    max_new_tokens: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_every", "max_new_tokens"):
            check_field(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check_field(self.lr >= 0, "lr", self.lr, "a value >= 0")
        check_field(
            0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"0 <= min_lr <= lr={self.lr}"
        )
        for name in ("warmup_steps", "weight_decay", "clip_grad"):
            check_field(getattr(self, name) >= 0, name, getattr(self, name), "a value >= 0")
        check_field(
            self.stop_accuracy >= 0,
            "stop_accuracy",
            self.stop_accuracy,
            "a value >= 0 (above 1: never stop early)",
        )


def qwen2_config(model: BaseModelConfig, tokenizer):
    """The transformers ``Qwen2Config`` of the base model for ``tokenizer``."""
    from transformers import Qwen2Config

    return Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=len(tokenizer),
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads,
        head_dim=model.hidden_size // model.num_attention_heads,
        max_position_embeddings=model.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        tie_word_embeddings=model.tie_word_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def encode_prompt(tokenizer, messages) -> list[int]:
    """Chat-template token ids of a prompt, ending with the assistant header."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class AnswerSampler:
    """Batches of (prompt, uniformly random correct answer) over the training sums.

    Each row is ``prompt ids + answer ids + eos``, right-padded with ``pad_id``;
    ``response_mask`` marks the answer and eos tokens (the tokens the loss scores).
    """

    def __init__(
        self, tokenizer, sums: list[int], seed: int, template: str = two_sum.PROMPT_TEMPLATE
    ) -> None:
        self.tokenizer = tokenizer
        self.sums = sums
        self.prompts = {
            s: encode_prompt(tokenizer, two_sum.prompt_messages(s, template)) for s in sums
        }
        self.rng = random.Random(seed)
        self._answer_ids: dict[str, list[int]] = {}

    def _answer(self, text: str) -> list[int]:
        if text not in self._answer_ids:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._answer_ids[text] = ids + [self.tokenizer.eos_token_id]
        return self._answer_ids[text]

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        rows, starts = [], []
        for _ in range(size):
            target = self.rng.choice(self.sums)
            prompt = self.prompts[target]
            rows.append(prompt + self._answer(two_sum.sample_answer(target, self.rng)))
            starts.append(len(prompt))
        width = max(map(len, rows))
        ids = torch.full((size, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros(size, width, dtype=torch.long)
        response = torch.zeros(size, width, dtype=torch.bool)
        for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            response[i, start : len(row)] = True
        return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


def next_token_loss(count: int):
    """Token-mean negative log-likelihood of the response tokens, normalised by the
    mini-batch's ``count`` of response tokens (PolicyEngine loss-function form)."""
    from covrl.algorithms import aggregate_loss

    def loss_fn(outputs, micro):
        mask = micro["response_mask"]
        loss = aggregate_loss(-outputs.logp, mask, "token-mean", count)
        return loss, {"tokens": mask.sum().float()}

    return loss_fn


def evaluate(
    model_chunk,
    tokenizer,
    sums: list[int],
    settings: WarmStartConfig,
    tp_group,
    template: str = two_sum.PROMPT_TEMPLATE,
):
    """Greedy accuracy of the policy on the prompts of ``sums`` (user message
    ``template``), and its responses."""
    from covrl.tasks.greedy import greedy_accuracy

    prompts = [encode_prompt(tokenizer, two_sum.prompt_messages(s, template)) for s in sums]
    return greedy_accuracy(
        model_chunk,
        prompts,
        [str(s) for s in sums],
        score=two_sum.compute_score,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        max_new_tokens=settings.max_new_tokens,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        tp_group=tp_group,
    )


def warm_start(
    model_dir: str | Path,
    task: two_sum.TwoSumConfig,
    model_settings: BaseModelConfig,
    settings: WarmStartConfig,
    *,
    log: Callable[[str], None] = print,
    transformer_impl: str = "auto",
) -> dict:
    """Initialise, warm-start and export the base model into ``model_dir``.

    ``model_dir`` must already hold the tokenizer; its files are kept and
    ``config.json``, ``model.safetensors`` and ``generation_config.json`` are
    (re)written. ``transformer_impl``: the layer spec (``covrl.models.build_model``).
    Collective over the initialised process group. Returns the steps, seconds,
    accuracies and parameter count.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine
    from covrl.models import PolicyModelConfig, build_model, save_hf_checkpoint, unwrap_model
    from covrl.tasks.tokenizer import load_task_tokenizer

    if ps.get_pipeline_model_parallel_world_size() != 1 or ps.get_data_parallel_world_size() != 1:
        raise ValueError(
            "warm_start runs with pipeline and data parallel size 1 (tensor parallel only); "
            f"got pp={ps.get_pipeline_model_parallel_world_size()}, "
            f"dp={ps.get_data_parallel_world_size()}"
        )
    model_dir = Path(model_dir)
    tokenizer = load_task_tokenizer(model_dir)
    config = PolicyModelConfig.from_hf(qwen2_config(model_settings, tokenizer))
    chunks = build_model(config, transformer_impl=transformer_impl)
    engine = PolicyEngine(
        chunks,
        config,
        optimizer=OptimizerConfig(
            lr=settings.lr,
            min_lr=settings.min_lr,
            weight_decay=settings.weight_decay,
            clip_grad=settings.clip_grad,
            lr_warmup_steps=settings.warmup_steps,
            lr_decay_steps=settings.max_steps,
            lr_decay_style="cosine",
        ),
        config=EngineConfig(micro_batch_size=settings.batch_size),
    )
    model = unwrap_model(engine.model[0])
    tp_group = ps.get_tensor_model_parallel_group()
    params = sum(torch.Size(shape).numel() for shape in config.hf_weight_shapes().values())
    sums = two_sum.split_sums(task)
    sampler = AnswerSampler(tokenizer, sums["train"], settings.seed, task.prompt_template)
    log(f"base model: {params / 1e6:.2f}M parameters, vocab {config.vocab_size}")

    start = time.perf_counter()
    history, step, loss = [], 0, float("nan")
    while True:
        if step % settings.eval_every == 0 or step == settings.max_steps:
            train_acc, _ = evaluate(
                model, tokenizer, sums["train"], settings, tp_group, task.prompt_template
            )
            val_acc, _ = evaluate(
                model, tokenizer, sums["validation"], settings, tp_group, task.prompt_template
            )
            elapsed = time.perf_counter() - start
            history.append(
                {"step": step, "loss": loss, "train_accuracy": train_acc, "val_accuracy": val_acc}
            )
            log(
                f"  sft step {step:5d}  loss {loss:.3f}  greedy accuracy train {train_acc:.3f}"
                f"  validation {val_acc:.3f}  ({elapsed:.0f} s)"
            )
            if train_acc >= settings.stop_accuracy or step >= settings.max_steps:
                break
        batch = sampler.batch(settings.batch_size)
        count = int(batch["response_mask"].sum())
        loss = engine.train_step(batch, next_token_loss(count)).loss
        step += 1
    seconds = time.perf_counter() - start

    # Written next to the tokenizer first, so the export copies it and its checksum.
    if dist.get_rank() == 0:
        _write_generation_config(model_dir, tokenizer)
    dist.barrier()
    save_hf_checkpoint(engine.model, config, model_dir, copy_files_from=model_dir, overwrite=True)
    final = history[-1]
    return {
        "parameters": params,
        "steps": step,
        "sft_seconds": round(seconds, 2),
        "train_accuracy": final["train_accuracy"],
        "val_accuracy": final["val_accuracy"],
        # The weights are bit-identical between builds with the same thread count only:
        # the summation order of the CPU kernels follows it.
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }


def _write_generation_config(model_dir: Path, tokenizer) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(model_dir)
