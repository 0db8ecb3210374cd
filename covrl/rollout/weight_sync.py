"""Megatron -> vLLM weight sync: validated, bucketed streams of Hugging Face tensors.

The source is :func:`covrl.models.export_hf_weights`: per megatron parameter, the
owning pipeline stage's TP ranks broadcast their shards over their PP groups, then
every stage all-gathers the shards over TP (inside a node), so every rank of a
model-parallel group sees the same stream of full Hugging Face tensors while only
shards cross the pipeline. Each rank hosts one vLLM worker (TP rank of a rollout replica),
and vLLM's loader takes full checkpoint tensors and keeps its own TP slice, so every
rank needs every tensor; data-parallel replicas of training each stream their own
copy, with no communication between them.

:class:`BucketedWeightStream` sits between the export and vLLM's loader. It checks
every tensor's name and shape against the checkpoint vLLM was built from, casts it to
vLLM's dtype, and hands tensors on in buckets of about ``bucket_bytes``: the export
runs ahead of the loader by at most one bucket. Extra memory during a sync is thus
bounded by one bucket plus the largest tensor (a tensor larger than the bucket is a
bucket of its own), plus the per-layer buffer vLLM's in-place reload keeps until a
layer's last tensor arrives. The whole stream goes to ONE ``reload_weights`` call:
vLLM's layer-wise reload only processes a layer once all of its tensors arrived
within the same call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch


class WeightSyncError(RuntimeError):
    """A tensor of the sync stream is missing, unexpected or mis-shaped."""


@dataclass
class SyncStats:
    """What one sync moved (this rank)."""

    bytes: int = 0  # bytes handed to vLLM's loader
    tensors: int = 0
    buckets: int = 0
    peak_bucket_bytes: int = 0  # largest bucket held at once
    largest_tensor_bytes: int = 0

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def sync_memory_bound(model_config, stats: dict[str, float], itemsize: int) -> int:
    """The bound on a sync's extra memory, in bytes: the largest bucket, plus twice the
    largest tensor (under TP the gathered shards and their concatenation), plus twice
    vLLM's largest layer (the fresh copy its layer-wise reload loads into and, on
    CPU, the packed copy its GEMM uses). ``stats`` are ``sync_weights``'s metrics;
    ``itemsize`` is bytes per element of vLLM's weights."""
    c = model_config
    qkv = (c.num_attention_heads + 2 * c.num_query_groups) * c.head_dim * c.hidden_size
    layer = itemsize * max(qkv, 2 * c.ffn_hidden_size * c.hidden_size, c.vocab_size * c.hidden_size)
    return int(stats["peak_bucket_bytes"] + 2 * stats["largest_tensor_bytes"] + 2 * layer)


def shape_errors(
    expected: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...]], source: str
) -> str | None:
    """A message naming the missing, unexpected and mis-shaped tensors, or None."""
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    bad = [
        f"{n} {tuple(actual[n])} (expected {tuple(expected[n])})"
        for n in expected
        if n in actual and tuple(actual[n]) != tuple(expected[n])
    ]
    parts = []
    if missing:
        parts.append(f"missing tensors {missing[:8]}")
    if extra:
        parts.append(f"unexpected tensors {extra[:8]}")
    if bad:
        parts.append(f"mis-shaped tensors {bad[:8]}")
    return f"{source}: " + "; ".join(parts) if parts else None


class BucketedWeightStream:
    """Iterate ``(name, tensor)`` pairs for vLLM's loader, checked and bucketed.

    Args:
        source: ``(hf_name, tensor)`` pairs (full Hugging Face tensors).
        expected: name -> shape of every tensor the stream must contain, once each.
        bucket_bytes: about how many bytes are collected before the bucket is handed on.
        dtype, device: what vLLM's weights are (tensors are cast / moved once, here).

    Raises :class:`WeightSyncError` naming the tensor on an unexpected, duplicate or
    mis-shaped tensor (at that tensor) or on missing ones (at the end). ``stats`` is
    filled as the stream is consumed.
    """

    def __init__(
        self,
        source: Iterable[tuple[str, torch.Tensor]],
        expected: dict[str, tuple[int, ...]],
        bucket_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be > 0")
        self.source = source
        self.expected = expected
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype
        self.device = device
        self.stats = SyncStats()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        seen: set[str] = set()
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in self.source:
            if name not in self.expected or name in seen:
                what = "a second time" if name in seen else "but vLLM's model has no such tensor"
                raise WeightSyncError(f"weight sync: tensor {name} arrived {what}")
            if tuple(tensor.shape) != tuple(self.expected[name]):
                raise WeightSyncError(
                    f"weight sync: tensor {name} has shape {tuple(tensor.shape)}, vLLM's model "
                    f"expects {tuple(self.expected[name])}"
                )
            seen.add(name)
            tensor = tensor.to(device=self.device, dtype=self.dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > self.bucket_bytes:
                yield from self._flush(bucket, size)
                bucket, size = [], 0
            bucket.append((name, tensor))
            size += nbytes
            self.stats.largest_tensor_bytes = max(self.stats.largest_tensor_bytes, nbytes)
        if bucket:
            yield from self._flush(bucket, size)
        missing = [n for n in self.expected if n not in seen]
        if missing:
            raise WeightSyncError(f"weight sync: the stream ended without tensors {missing[:8]}")

    def _flush(self, bucket: list[tuple[str, torch.Tensor]], size: int):
        self.stats.buckets += 1
        self.stats.peak_bucket_bytes = max(self.stats.peak_bucket_bytes, size)
        self.stats.tensors += len(bucket)
        self.stats.bytes += size
        while bucket:
            # Hand over and drop our reference, so the loader alone decides its lifetime.
            yield bucket.pop(0)
