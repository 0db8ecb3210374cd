"""The run metadata of a checkpoint (``covrl_checkpoint.json``, its completion marker):
the model config, the parallel layout it was saved at, what it holds, the caller's state."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from covrl.checkpointing.errors import CheckpointError
from covrl.checkpointing.layout import METADATA_FILENAME, resolve_checkpoint
from covrl.models.hf_config import PolicyModelConfig

_FORMAT = "covrl-megatron"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointMetadata:
    """The run metadata stored as ``covrl_checkpoint.json`` in each checkpoint.

    ``model_config`` is the Hugging Face config dict of the model (with ``dtype`` set to
    the parameters' dtype); ``parallel`` the layout at save time
    (``tensor_model_parallel_size``, ``pipeline_model_parallel_size``,
    ``virtual_pipeline_model_parallel_size``, ``data_parallel_size``, ``world_size``).
    ``hf_source`` is the Hugging Face checkpoint the weights came from, if known (its
    tokenizer files are copied on export). ``extra`` is the caller's JSON state (the
    trainer's step, data cursor and config).
    """

    iteration: int
    model_config: dict[str, Any]
    params_dtype: str
    make_vocab_size_divisible_by: int
    parallel: dict[str, int | None]
    has_optimizer: bool
    has_scheduler: bool
    hf_source: str | None = None
    has_rng: bool = False  # rng/rank_<r>.pt of every rank
    has_checksums: bool = False  # checksums.json
    # The optimizer state is megatron's distributed optimizer's (its own layout).
    distributed_optimizer: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = _FORMAT
    format_version: int = _FORMAT_VERSION

    def policy_config(self) -> PolicyModelConfig:
        """The :class:`PolicyModelConfig` the checkpoint was saved with."""
        return PolicyModelConfig.from_hf(
            self.model_config,
            params_dtype=self.params_dtype,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> CheckpointMetadata:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint metadata ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            raise CheckpointError(f"{path}: field format is not {_FORMAT!r}")
        if raw.get("format_version") != _FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: field format_version={raw.get('format_version')!r} is not supported "
                f"(expected {_FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = (
            set(raw) - names,
            {
                f.name
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            }
            - set(raw),
        )
        if unknown or missing:
            raise CheckpointError(
                f"{path}: unexpected fields {sorted(unknown)} / missing fields {sorted(missing)}"
            )
        return cls(**raw)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_config_dict(config: PolicyModelConfig) -> dict[str, Any]:
    hf = config.to_hf_config().to_dict()
    hf["dtype"] = _dtype_name(config.params_dtype)
    hf.pop("torch_dtype", None)
    return hf


def check_model_config(
    config: PolicyModelConfig, metadata: CheckpointMetadata, source: str | os.PathLike
) -> None:
    """Raise :class:`CheckpointError` naming every field where ``config`` differs from
    the checkpoint's model (``source`` names the metadata file in the message)."""
    saved = metadata.policy_config()
    diffs = [
        f"{f.name}: checkpoint {getattr(saved, f.name)!r}, model {getattr(config, f.name)!r}"
        for f in dataclasses.fields(PolicyModelConfig)
        if f.compare and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if diffs:
        raise CheckpointError(
            f"{source}: model config differs from the checkpoint's: " + "; ".join(diffs)
        )


def read_metadata(root: str | os.PathLike, iteration: int | None = None) -> CheckpointMetadata:
    """The run metadata of a complete checkpoint (see :func:`resolve_checkpoint`)."""
    return CheckpointMetadata.from_file(resolve_checkpoint(root, iteration) / METADATA_FILENAME)


def _parallel_layout(num_chunks: int) -> dict[str, int | None]:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if (vpp or 1) != num_chunks:
        raise ValueError(
            f"{num_chunks} model chunks for virtual_pipeline_model_parallel_size={vpp}"
        )
    world = dist.get_world_size()
    return {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": vpp,
        "data_parallel_size": world // (tp * pp),
        "world_size": world,
    }
