"""Hugging Face <-> megatron-core weights for Llama / Qwen2 ``GPTModel`` chunks, streamed.

Loading (:func:`load_hf_weights`) reads a safetensors checkpoint (``model.safetensors``
or shards listed in ``model.safetensors.index.json``) straight into this rank's model
chunks; each rank reads only the rows/columns it owns. Export
(:func:`export_hf_weights`) is an iterator over full Hugging Face tensors, gathered over
TP and broadcast over PP one parameter at a time; :func:`save_hf_checkpoint` writes it
as a sharded safetensors checkpoint.

Megatron layouts (``t`` = TP size, ``r`` = TP rank, ``G`` query groups of ``q = heads/G``
query heads, head dim ``d``, hidden ``H``, MLP width ``F``, vocab ``V`` padded to ``Vp``):

- ``linear_qkv.weight`` / ``.bias``: the full tensor is ``[G * (q + 2) * d, H]``, grouped
  per query group: the group's ``q`` query heads, then its key head, then its value head
  (see ``SelfAttention.get_query_key_value_tensors``). Rank ``r`` holds rows
  ``[r, r + 1) * G(q + 2)d / t`` -- whole groups when ``G >= t``, part of one group when
  ``G < t`` (megatron then all-gathers and picks the group in the forward pass).
- ``linear_fc1.weight``: rank ``r`` holds ``[gate rows r; up rows r]``, each ``F / t``
  rows (the local SwiGLU chunks its output in two).
- ``linear_proj`` / ``linear_fc2``: row-parallel, columns split in ``t`` blocks.
- ``word_embeddings`` / ``output_layer``: rows split in ``t`` blocks of ``Vp / t``; rows
  ``V..Vp`` are padding (zero after loading, dropped on export).
- norms: replicated. With the Transformer Engine spec the pre-attention and pre-MLP
  norms are fused into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from covrl.models.hf_config import PolicyModelConfig
from covrl.parallel import raise_if_any_rank, rank_and_size
from covrl.utils import checksums
from covrl.utils.atomic_io import (
    describe_write_error,
    fsync_tree,
    recover_dir,
    recoverable_dir,
    replace_dir,
    temporary_sibling,
)
from covrl.utils.errors import type_and_message

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Norm parameter names of the Transformer Engine spec -> the local spec's names.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class WeightEntry:
    """One megatron parameter of the whole model and the Hugging Face tensors it holds.

    ``key`` is the parameter's name in a single-stage local-spec ``GPTModel`` (global
    layer numbers), e.g. ``decoder.layers.3.self_attention.linear_qkv.weight``.
    ``kind`` says how it is split over TP and (un)fused: ``replicated``, ``vocab``,
    ``qkv``, ``gate_up`` or ``row``.
    """

    key: str
    kind: str
    hf_names: tuple[str, ...]
    layer: int | None = None  # global decoder layer, None for embedding / head / final norm


def weight_entries(config: PolicyModelConfig, *, include_tied_output: bool = False):
    """All megatron parameters of the model in export order (see
    ``PolicyModelConfig.hf_weight_shapes``). With tied embeddings there is no
    ``output_layer.weight`` entry unless ``include_tied_output`` (then it maps to
    ``model.embed_tokens.weight``: the last stage's copy when PP > 1)."""
    entries = [
        WeightEntry("embedding.word_embeddings.weight", "vocab", ("model.embed_tokens.weight",))
    ]
    for i in range(config.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = [h + f"self_attn.{p}_proj" for p in "qkv"]
        entries += [
            WeightEntry(
                m + "input_layernorm.weight", "replicated", (h + "input_layernorm.weight",), i
            ),
            WeightEntry(
                m + "self_attention.linear_qkv.weight", "qkv", tuple(a + ".weight" for a in attn), i
            ),
        ]
        if config.add_qkv_bias:
            entries.append(
                WeightEntry(
                    m + "self_attention.linear_qkv.bias", "qkv", tuple(a + ".bias" for a in attn), i
                )
            )
        entries += [
            WeightEntry(
                m + "self_attention.linear_proj.weight", "row", (h + "self_attn.o_proj.weight",), i
            ),
            WeightEntry(
                m + "pre_mlp_layernorm.weight",
                "replicated",
                (h + "post_attention_layernorm.weight",),
                i,
            ),
            WeightEntry(
                m + "mlp.linear_fc1.weight",
                "gate_up",
                (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                i,
            ),
            WeightEntry(m + "mlp.linear_fc2.weight", "row", (h + "mlp.down_proj.weight",), i),
        ]
    entries.append(
        WeightEntry("decoder.final_layernorm.weight", "replicated", ("model.norm.weight",))
    )
    if not config.tie_word_embeddings:
        entries.append(WeightEntry("output_layer.weight", "vocab", ("lm_head.weight",)))
    elif include_tied_output:
        entries.append(WeightEntry("output_layer.weight", "vocab", ("model.embed_tokens.weight",)))
    return entries


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def _local_parameters(model_chunks: Sequence[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by :class:`WeightEntry` key (global layer numbers; TE norm
    names mapped to the local spec's)."""
    params: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        chunk = unwrap_model(chunk)
        for name, param in chunk.named_parameters():
            m = _LAYER_RE.match(name)
            if m:
                layer = chunk.decoder.layers[int(m.group(1))]
                rest = _TE_ALIASES.get(m.group(2), m.group(2))
                # layer_number is 1-based and already includes the PP/VPP offset.
                key = f"decoder.layers.{layer.layer_number - 1}.{rest}"
            else:
                key = name
            if key in params:
                raise RuntimeError(f"megatron parameter {key} appears in two model chunks")
            params[key] = param
    return params


def _layer_owners(model_chunks: Sequence[torch.nn.Module], num_layers: int) -> list[int]:
    """Pipeline rank that holds each global decoder layer, from megatron's layout."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    cfg = unwrap_model(model_chunks[0]).config
    pp, vpp = cfg.pipeline_model_parallel_size, cfg.virtual_pipeline_model_parallel_size
    owners = [-1] * num_layers
    for p in range(pp):
        for v in range(vpp) if vpp else [None]:
            offset = get_transformer_layer_offset(cfg, vp_stage=v, pp_rank=p)
            for i in range(offset, offset + get_num_layers_to_build(cfg, vp_stage=v, pp_rank=p)):
                owners[i] = p
    if -1 in owners:
        raise RuntimeError(f"layers {[i for i, o in enumerate(owners) if o < 0]} have no stage")
    return owners


# ---------------------------------------------------------------------------- reading
def _is_complete_export(path: Path) -> bool:
    """An export directory is complete once its checksum manifest (written last) exists."""
    return (path / checksums.MANIFEST_FILENAME).is_file()


def verify_hf_checkpoint(path: str | os.PathLike, *, digest: bool = True) -> int:
    """Check a Hugging Face checkpoint directory against its ``checksums.json`` (written
    by :func:`save_hf_checkpoint`): every file's size, and its SHA-256 unless
    ``digest`` is False. Raises ``ValueError`` naming every bad file. Returns the number
    of files checked, 0 for a directory without a manifest (e.g. from the Hub)."""
    path = Path(path)
    try:
        manifest = checksums.read_manifest(path)
        if manifest is None:
            return 0
        problems = checksums.check_sizes(path, manifest)
        if not problems and digest:
            problems = checksums.check_digests(path, manifest)
    except checksums.ChecksumError as exc:
        problems = [str(exc)]
    if problems:
        raise ValueError("; ".join(problems))
    return len(manifest)


class HFCheckpointReader:
    """Slice-wise access to a Hugging Face safetensors checkpoint directory.

    Reads ``model.safetensors.index.json`` when present (sharded checkpoint), else the
    single ``model.safetensors``. Only the requested slice of a tensor is read from
    disk; ``elements_read`` counts what was read.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        path = Path(path)
        if not path.is_dir():
            # An export with overwrite interrupted between its two renames.
            path = recoverable_dir(path, _is_complete_export) or path
        index = path / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not a mapping")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{index}: not a safetensors index ({type_and_message(exc)})"
                ) from exc
        elif (path / SAFE_WEIGHTS_NAME).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"{path}: no {SAFE_WEIGHTS_INDEX_NAME} or {SAFE_WEIGHTS_NAME} (only safetensors "
                "checkpoints are supported)"
            )
        self.path = path
        self._stack = contextlib.ExitStack()
        handles: dict[str, object] = {}

        def handle(file: str):
            if file not in handles:
                try:
                    handles[file] = self._stack.enter_context(
                        safe_open(str(path / file), framework="pt", device="cpu")
                    )
                except Exception as exc:  # SafetensorError, OSError: name the file
                    self._stack.close()
                    raise ValueError(
                        f"{path / file}: not a readable safetensors file ({type_and_message(exc)})"
                    ) from exc
            return handles[file]

        if weight_map is None:
            f = handle(SAFE_WEIGHTS_NAME)
            weight_map = dict.fromkeys(f.keys(), SAFE_WEIGHTS_NAME)
        self._file_names = dict(weight_map)
        self._files = {name: handle(file) for name, file in weight_map.items()}
        self.elements_read = 0

    def names(self) -> set[str]:
        return set(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._files[name].get_slice(name).get_shape())

    def read(self, name: str, rows: slice = slice(None), cols: slice | None = None) -> torch.Tensor:
        """``tensor[rows]`` (or ``tensor[rows, cols]``), reading only that slice."""
        try:
            sl = self._files[name].get_slice(name)
            t = sl[rows] if cols is None else sl[rows, cols]
        except Exception as exc:  # a file truncated or changed since it was opened
            file = self.path / self._file_names[name]
            raise ValueError(
                f"{file}: cannot read tensor {name} ({type_and_message(exc)})"
            ) from exc
        self.elements_read += t.numel()
        return t

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _qkv_segments(config: PolicyModelConfig, hf_names: tuple[str, ...]):
    """``(fused_start, length, hf_name, hf_start)`` row runs of the fused QKV tensor,
    in megatron's per-group order: q heads of the group, its k head, its v head."""
    d, q = config.head_dim, config.heads_per_group
    segments, pos = [], 0
    for g in range(config.num_query_groups):
        for name, start, length in (
            (hf_names[0], g * q * d, q * d),
            (hf_names[1], g * d, d),
            (hf_names[2], g * d, d),
        ):
            segments.append((pos, length, name, start))
            pos += length
    return segments


def _read_shard(
    entry: WeightEntry, reader: HFCheckpointReader, config: PolicyModelConfig, r: int, t: int
) -> torch.Tensor:
    """TP rank ``r``'s shard of ``entry`` read from the checkpoint (only owned slices)."""
    if entry.kind == "replicated":
        return reader.read(entry.hf_names[0])
    if entry.kind == "row":
        cols = reader.shape(entry.hf_names[0])[1] // t
        return reader.read(entry.hf_names[0], slice(None), slice(r * cols, (r + 1) * cols))
    if entry.kind == "gate_up":
        n = config.ffn_hidden_size // t
        rows = slice(r * n, (r + 1) * n)
        return torch.cat([reader.read(name, rows) for name in entry.hf_names])
    if entry.kind == "vocab":
        n = config.padded_vocab_size(t) // t
        lo, hi = r * n, min((r + 1) * n, config.vocab_size)
        real = reader.read(entry.hf_names[0], slice(lo, max(lo, hi)))
        pad = torch.zeros((n - real.shape[0], *real.shape[1:]), dtype=real.dtype)
        return torch.cat([real, pad]) if pad.shape[0] else real
    if entry.kind == "qkv":
        total = (config.num_attention_heads + 2 * config.num_query_groups) * config.head_dim
        lo, hi = r * total // t, (r + 1) * total // t
        parts = []
        for start, length, name, hf_start in _qkv_segments(config, entry.hf_names):
            a, b = max(lo, start), min(hi, start + length)
            if a < b:
                parts.append(reader.read(name, slice(hf_start + a - start, hf_start + b - start)))
        return torch.cat(parts)
    raise ValueError(f"unknown weight kind {entry.kind!r}")


@dataclass
class LoadStats:
    """What :func:`load_hf_weights` did on this rank."""

    parameters: int  # megatron parameters filled
    elements_loaded: int  # elements of this rank's parameters
    elements_read: int  # elements read from the checkpoint (padding not included)


def load_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    config: PolicyModelConfig,
    checkpoint: str | os.PathLike,
    *,
    tp_group: dist.ProcessGroup | None = None,
    strict: bool = True,
    verify: bool = True,
) -> LoadStats:
    """Fill this rank's model chunks from a Hugging Face safetensors checkpoint.

    Every parameter of every chunk is set: the shard this TP rank owns is read (and
    converted to the parameter's dtype), vocabulary pad rows are zero, a tied model's
    last-stage ``output_layer`` copy gets the word embeddings. No communication: each
    rank reads its own slices. ``tp_group`` defaults to megatron's TP group.

    With ``strict`` the checkpoint must hold exactly the tensors of ``config``
    (``lm_head.weight`` may also be present when embeddings are tied; rotary
    ``inv_freq`` buffers are ignored). Raises ``ValueError`` on a missing, unexpected or
    mis-shaped tensor, and a ``ValueError`` naming the file for an unreadable,
    truncated or (with ``verify``, against the directory's ``checksums.json`` when it
    has one) corrupted file.
    """
    verify_hf_checkpoint(checkpoint, digest=verify)
    r, t = _tp_rank_size(tp_group)
    expected = config.hf_weight_shapes()
    entries = {e.key: e for e in weight_entries(config, include_tied_output=True)}
    params = _local_parameters(model_chunks)
    with HFCheckpointReader(checkpoint) as reader:
        names = reader.names()
        missing = [n for n in expected if n not in names]
        if missing:
            hint = ""
            if missing == ["lm_head.weight"]:
                hint = (
                    " (config field tie_word_embeddings=False expects an lm_head.weight; "
                    "expected tie_word_embeddings=True for a checkpoint without one)"
                )
            raise ValueError(f"{checkpoint}: missing tensors {missing[:8]}{hint}")
        for name, shape in expected.items():
            if reader.shape(name) != shape:
                raise ValueError(
                    f"{checkpoint}: tensor {name} has shape {reader.shape(name)}, expected {shape}"
                )
        if strict:
            allowed = set(expected) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
            extra = sorted(n for n in names - allowed if not n.endswith("rotary_emb.inv_freq"))
            if extra:
                raise ValueError(
                    f"{checkpoint}: unexpected tensors {extra[:8]} for a {config.model_type} "
                    f"model (add_qkv_bias={config.add_qkv_bias}, "
                    f"tie_word_embeddings={config.tie_word_embeddings})"
                )
        loaded = 0
        with torch.no_grad():
            for key, param in params.items():
                if key not in entries:
                    raise ValueError(f"megatron parameter {key} has no Hugging Face mapping")
                shard = _read_shard(entries[key], reader, config, r, t)
                if shard.shape != param.shape:
                    raise ValueError(
                        f"megatron parameter {key}: shard of {entries[key].hf_names} has shape "
                        f"{tuple(shard.shape)}, the parameter {tuple(param.shape)}"
                    )
                param.data.copy_(shard)
                loaded += param.numel()
        return LoadStats(len(params), loaded, reader.elements_read)


def _tp_rank_size(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) in ``tp_group``; None: megatron's tensor-parallel group."""
    if tp_group is None:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    return rank_and_size(tp_group, "tp_group")


# ---------------------------------------------------------------------------- export
def _full_shape(entry: WeightEntry, config: PolicyModelConfig) -> tuple[int, ...]:
    """Shape of the gathered megatron tensor (vocab unpadded; gate_up as [gate; up])."""
    h = config.hidden_size
    if entry.kind == "qkv":
        rows = (config.num_attention_heads + 2 * config.num_query_groups) * config.head_dim
        return (rows, h) if entry.key.endswith("weight") else (rows,)
    if entry.kind == "gate_up":
        return (2 * config.ffn_hidden_size, h)
    if entry.kind == "vocab":
        return (config.vocab_size, h)
    if entry.kind == "row":
        cols = config.num_attention_heads * config.head_dim
        return (h, cols) if "linear_proj" in entry.key else (h, config.ffn_hidden_size)
    return (h,)


def _shard_shape(entry: WeightEntry, config: PolicyModelConfig, t: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard of ``entry`` (the padded vocabulary included)."""
    if entry.kind == "replicated":
        return _full_shape(entry, config)
    if entry.kind == "vocab":
        return (config.padded_vocab_size(t) // t, config.hidden_size)
    full = _full_shape(entry, config)
    if entry.kind == "row":
        return (full[0], full[1] // t)
    return (full[0] // t, *full[1:])


def _gather_tp(
    entry: WeightEntry,
    local: torch.Tensor,
    config: PolicyModelConfig,
    group,
    t: int,
    stats: ExportStats | None = None,
) -> torch.Tensor:
    """The full megatron tensor of ``entry`` from every TP rank's shard."""
    local = local.detach()
    if entry.kind == "replicated" or t == 1:
        shards = [local]
    else:
        shards = [torch.empty_like(local) for _ in range(t)]
        dist.all_gather(shards, local.contiguous(), group=group)
        if stats is not None:
            stats.tp_bytes_received += (t - 1) * _nbytes(tuple(local.shape), local.dtype)
            stats.tp_bytes_sent += (t - 1) * _nbytes(tuple(local.shape), local.dtype)
    if entry.kind == "replicated":
        return local
    if entry.kind == "row":
        return torch.cat(shards, dim=1)
    if entry.kind == "gate_up":  # [g0; u0 | g1; u1 | ...] -> [g0; g1; ...; u0; u1; ...]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    full = torch.cat(shards) if len(shards) > 1 else shards[0]
    return full[: config.vocab_size] if entry.kind == "vocab" else full


@dataclass
class ExportStats:
    """Bytes one rank moved while streaming :func:`export_hf_weights`.

    ``pp_*``: over the pipeline-parallel group (across nodes in a multi-node layout);
    ``tp_*``: over the tensor-parallel group (inside a node). All-gathers count the
    shards of the other ranks as received and this rank's shard once per peer as sent
    (what a ring moves per rank).
    """

    pp_bytes_received: int = 0
    pp_bytes_sent: int = 0
    tp_bytes_received: int = 0
    tp_bytes_sent: int = 0

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _split_hf(entry: WeightEntry, full: torch.Tensor, config: PolicyModelConfig):
    """Hugging Face tensors of one gathered megatron tensor (views into ``full``)."""
    if entry.kind == "qkv":
        g, q, d = config.num_query_groups, config.heads_per_group, config.head_dim
        grouped = full.view(g, q + 2, d, *full.shape[1:])
        rest = full.shape[1:]
        return (
            grouped[:, :q].reshape(g * q * d, *rest),
            grouped[:, q].reshape(g * d, *rest),
            grouped[:, q + 1].reshape(g * d, *rest),
        )
    if entry.kind == "gate_up":
        return full.chunk(2, dim=0)
    return (full,)


def export_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    config: PolicyModelConfig,
    *,
    dtype: torch.dtype | None = None,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    stats: ExportStats | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the model as full Hugging Face tensors: ``(name, tensor)`` pairs.

    Order and names: exactly ``config.hf_weight_shapes()`` (embedding, layers 0..L-1,
    final norm, ``lm_head`` unless tied), with those shapes; the vocabulary is
    unpadded and QKV / gate-up are un-fused. Tensors have ``dtype`` (default: the
    config's ``params_dtype``; a bare bf16 ``GPTModel`` still has float32 norms until
    ``Float16Module`` casts it), are on the parameters' device, and are read-only:
    they may share memory with each other (q/k/v of one layer are views of one
    buffer) or with a live parameter (a replicated one without TP/PP), so clone what
    you keep across an optimizer step.

    Collective: every rank of the model-parallel group (all TP and PP ranks of one
    data-parallel replica) must consume the whole iterator, in step, and every one of
    them yields the same stream. Per megatron parameter, each TP rank of the owning
    stage broadcasts its shard (cast to ``dtype``) over its PP group, then every stage
    all-gathers the shards over its TP group. Across pipeline stages (across nodes at
    scale) only shards travel: each rank receives ``1/t`` of every tensor it does not
    own over PP, and the ``(t-1)/t`` rest over TP inside its node, instead of the whole
    tensor over PP. One rank holds at most one full parameter (plus its shards) at a
    time. Groups default to megatron's TP and PP groups. ``stats``, when given, counts
    the bytes this rank received and sent over each group.
    """
    from megatron.core import parallel_state

    tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
    pp_group = pp_group or parallel_state.get_pipeline_model_parallel_group()
    t = dist.get_world_size(tp_group)
    pp, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)

    params = _local_parameters(model_chunks)
    entries = weight_entries(config)
    owners = _layer_owners(model_chunks, config.num_layers)

    def owner(e: WeightEntry) -> int:
        if e.layer is not None:
            return owners[e.layer]
        return 0 if e.key.startswith("embedding.") else pp - 1

    # The layout computed from megatron's rules must match what this rank holds.
    mine = {e.key for e in entries if owner(e) == pp_rank}
    held = set(params) - {"output_layer.weight"} if config.tie_word_embeddings else set(params)
    if mine != held:
        raise RuntimeError(
            f"pipeline rank {pp_rank} holds {sorted(held ^ mine)[:4]} contrary to the "
            "layer layout (only even PP/VPP layouts are supported)"
        )
    dtype = dtype or config.params_dtype
    device = next(iter(params.values())).device
    for e in entries:
        src = owner(e)
        if src == pp_rank:
            shard = params[e.key].detach().to(dtype).contiguous()
        else:
            shard = torch.empty(_shard_shape(e, config, t), dtype=dtype, device=device)
        if pp > 1:
            # The shard crosses the pipeline (the network at scale), not the full tensor.
            dist.broadcast(shard, src=dist.get_global_rank(pp_group, src), group=pp_group)
            if stats is not None:
                nbytes = _nbytes(tuple(shard.shape), dtype)
                if src == pp_rank:
                    stats.pp_bytes_sent += nbytes
                else:
                    stats.pp_bytes_received += nbytes
        full = _gather_tp(e, shard, config, tp_group, t, stats)
        yield from zip(e.hf_names, _split_hf(e, full, config), strict=True)


# ---------------------------------------------------------------------------- saving
def _plan_shards(
    shapes: dict[str, tuple[int, ...]], itemsize: int, max_shard_bytes: int
) -> list[list[str]]:
    """Greedy, in export order: a shard closes before it would exceed the limit."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_hf_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    config: PolicyModelConfig,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    copy_files_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
) -> Path:
    """Write the model as a Hugging Face checkpoint directory; global rank 0 writes.

    Collective over all ranks: the model-parallel ranks of data-parallel replica 0
    stream :func:`export_hf_weights`, other replicas only wait. Rank 0 writes
    safetensors shards of at most ``max_shard_bytes`` (a single ``model.safetensors``
    when everything fits, else ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``) and ``config.json`` (with ``dtype``), in that
    order, one shard in memory at a time. Tensors are cast to ``dtype`` (default: the
    config's ``params_dtype``). Files other than weights and config (tokenizer,
    generation config) are copied from ``copy_files_from`` if given.

    Atomic: everything is written to a temporary sibling directory, then
    ``checksums.json`` (size and SHA-256 of every file, checked by
    :func:`load_hf_weights`), fsynced, and renamed to ``path``; an existing ``path`` is
    an error unless ``overwrite`` (crash-safe: see :mod:`covrl.utils.atomic_io`). A
    failure on rank 0 (a full disk is named as such) is raised on every rank.
    """
    from megatron.core import parallel_state

    path = Path(path).absolute()
    dtype = dtype or config.params_dtype
    writer = dist.get_rank() == 0
    # Decide on rank 0 and share, so that no rank enters the stream alone.
    status = None
    if writer:
        try:
            # Finish an overwrite interrupted between its renames; drop temporary copies.
            recover_dir(path, _is_complete_export)
            if path.exists() and not overwrite:
                status = f"{path} exists (pass overwrite=True to replace it)"
        except OSError as exc:
            status = f"{path}: {describe_write_error(exc, path.parent)}"
    raise_if_any_rank(status, dist.group.WORLD, error_type=FileExistsError)

    shapes = config.hf_weight_shapes()
    shards = _plan_shards(shapes, torch.empty((), dtype=dtype).element_size(), max_shard_bytes)
    n = len(shards)
    files = (
        [SAFE_WEIGHTS_NAME]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    shard_of = {name: i for i, names in enumerate(shards) for name in names}
    tmp = temporary_sibling(path)
    error: str | None = None
    if writer:
        try:
            tmp.mkdir(parents=True)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = describe_write_error(exc, path.parent)

    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        bucket: dict[str, torch.Tensor] = {}
        stream = export_hf_weights(
            model_chunks, config, dtype=dtype, tp_group=tp_group, pp_group=pp_group
        )
        for name, tensor in stream:
            if not writer or error is not None:
                continue  # keep consuming: the other ranks are in the same collectives
            try:
                bucket[name] = tensor.to(device="cpu", copy=True).contiguous()
                i = shard_of[name]
                if name == shards[i][-1]:
                    _write_shard(tmp / files[i], bucket)
                    bucket = {}
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = describe_write_error(exc, path.parent)

    if writer and error is None:
        try:
            if n > 1:
                index = {
                    "metadata": {"total_size": sum(_nbytes(s, dtype) for s in shapes.values())},
                    "weight_map": {name: files[shard_of[name]] for name in shapes},
                }
                (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            hf_config = config.to_hf_config()
            hf_config.dtype = dtype
            hf_config.save_pretrained(tmp)
            if copy_files_from is not None:
                _copy_extra_files(Path(copy_files_from), tmp)
            # Last: its presence marks the export complete (see _is_complete_export).
            checksums.write_manifest(tmp, checksums.digests(tmp, checksums.list_files(tmp)))
            fsync_tree(tmp)
            replace_dir(tmp, path)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = describe_write_error(exc, path.parent)
    if writer and error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    raise_if_any_rank(error, dist.group.WORLD, what=f"saving Hugging Face checkpoint to {path}")
    return path


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def _write_shard(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})


_WEIGHT_FILE_RE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.index\.json)$")


def _copy_extra_files(src: Path, dst: Path) -> None:
    """Tokenizer and generation files: everything but weights and ``config.json``."""
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not _WEIGHT_FILE_RE.search(f.name):
            shutil.copy2(f, dst / f.name)
