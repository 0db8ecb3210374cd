"""Every rank's RNG states in a checkpoint (``rng/rank_<rank>.pt``, one file per rank).

Python's ``random``, NumPy's global generator, torch's CPU generator, every CUDA device's
generator, and megatron's model-parallel RNG tracker (its named streams). They are
restored on load when the layout (TP, PP, VPP, world size) is the one saved, so rank
``r`` gets rank ``r``'s states back; at another layout they are skipped with a warning.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from covrl.checkpointing.errors import CheckpointError
from covrl.checkpointing.metadata import CheckpointMetadata

logger = logging.getLogger(__name__)


RNG_DIRNAME = "rng"


def rng_state() -> dict[str, Any]:
    """This process's RNG states: Python ``random``, NumPy's global generator, torch's
    CPU generator, every CUDA device's generator and megatron's model-parallel tracker
    (when it is initialised). Plain lists, ints and tensors: loadable with
    ``torch.load(weights_only=True)``."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "megatron_tracker": {},
    }
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    if tracker.is_initialized():
        state["megatron_tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when this process has
    as many devices)."""
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    cuda = state["torch_cuda"]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise CheckpointError(
                f"RNG state has {len(cuda)} CUDA generators, this process sees "
                f"{torch.cuda.device_count()} devices"
            )
        torch.cuda.set_rng_state_all(cuda)
    if state["megatron_tracker"]:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))


def _rng_file(path: Path, rank: int) -> Path:
    return path / RNG_DIRNAME / f"rank_{rank:05d}.pt"


def _save_rng(tmp: Path) -> None:
    file = _rng_file(tmp, dist.get_rank())
    file.parent.mkdir(exist_ok=True)
    with open(file, "wb") as f:
        torch.save(rng_state(), f)
        f.flush()
        os.fsync(f.fileno())


def _load_rng(path: Path, metadata: CheckpointMetadata, layout: dict[str, int | None]) -> bool:
    """Restore this rank's RNG states when the layout matches; False when skipped."""
    if not metadata.has_rng or metadata.parallel != layout:
        if dist.get_rank() == 0:
            why = (
                "the checkpoint has none"
                if not metadata.has_rng
                else f"saved at {metadata.parallel}, loading at {layout}"
            )
            logger.warning("%s: RNG states not restored (%s)", path, why)
        return False
    file = _rng_file(path, dist.get_rank())
    try:
        state = torch.load(file, weights_only=True)
        set_rng_state(state)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise CheckpointError(
            f"{file}: cannot restore RNG states ({type(exc).__name__}: {exc})"
        ) from exc
    return True
