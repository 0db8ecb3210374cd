"""Greedy decoding with a megatron-core policy, and greedy accuracy on a task.

Used to evaluate a base model while it is being warm-started, without a rollout
engine. Decoding recomputes the whole prefix every step (no KV cache): the tiny
task's sequences are ~30 tokens, so a step is one small batched forward pass.

Layout: the model's output layer returns vocab-parallel logits ``[b, s, Vp/tp]``;
the argmax is taken per TP shard (padding columns ``>= vocab_size`` excluded) and the
winners are all-gathered over the TP group, so the full vocabulary is never gathered.
Ties go to the lowest token id, as ``torch.argmax`` on the full row does. Pipeline
parallelism is not supported here (PP = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from covrl.parallel import get_device


def vocab_parallel_argmax(
    logits: torch.Tensor, *, vocab_size: int, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Global argmax ids ``[n]`` of vocab-parallel logits ``[n, Vp/tp]`` (same on all
    TP ranks)."""
    local = logits.shape[-1]
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    size = dist.get_world_size(tp_group) if tp_group is not None else 1
    start = rank * local
    valid = max(0, min(local, vocab_size - start))
    shard = logits.float().clone()
    shard[:, valid:] = float("-inf")
    value, index = shard.max(dim=-1)  # first maximum within the shard
    if size == 1:
        return index
    values = [torch.empty_like(value) for _ in range(size)]
    ids = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(values, value, group=tp_group)
    dist.all_gather(ids, index + start, group=tp_group)
    best = torch.stack(values).argmax(dim=0)  # first (lowest-id) shard among equal maxima
    return torch.stack(ids).gather(0, best.unsqueeze(0)).squeeze(0)


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), each ending at ``eos_id``
    (included) or after ``max_new_tokens``. ``model`` is a single megatron
    ``GPTModel`` chunk (PP = 1) returning ``[b, s, Vp/tp]`` logits."""
    was_training = model.training
    model.eval()
    device = get_device()
    rows = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))
    for _ in range(max_new_tokens):
        if not active:
            break
        lengths = [len(rows[i]) for i in active]
        width = max(lengths)
        ids = torch.full((len(active), width), pad_id, dtype=torch.long)
        for j, i in enumerate(active):
            ids[j, : lengths[j]] = torch.tensor(rows[i])
        # The model's inputs on its device; one host sync per step for the new tokens.
        ids = ids.to(device)
        position_ids = torch.arange(width, device=device).unsqueeze(0).expand_as(ids)
        # Causal attention and right padding: the padding never reaches a real token.
        logits = model(ids, position_ids, attention_mask=None)
        last = logits[torch.arange(len(active)), torch.tensor(lengths) - 1]
        next_ids = vocab_parallel_argmax(last, vocab_size=vocab_size, tp_group=tp_group).tolist()
        still = []
        for j, i in enumerate(active):
            token = next_ids[j]
            rows[i].append(token)
            outputs[i].append(token)
            if token != eos_id:
                still.append(i)
        active = still
    model.train(was_training)
    return outputs


def greedy_accuracy(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    ground_truths: Sequence[str],
    *,
    score: Callable[[str, str], float],
    decode: Callable[[list[int]], str],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
) -> tuple[float, list[str]]:
    """Mean ``score(decode(greedy response), ground_truth)`` over the prompts, and the
    decoded responses."""
    responses = greedy_generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        vocab_size=vocab_size,
        tp_group=tp_group,
    )
    texts = [decode(r) for r in responses]
    scores = [score(t, g) for t, g in zip(texts, ground_truths, strict=True)]
    return sum(scores) / max(1, len(scores)), texts
