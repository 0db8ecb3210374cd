"""Convert policy checkpoints between Hugging Face and Megatron (``covrl.checkpointing``).

Usage (one process per model-parallel rank; extra processes form data-parallel
replicas, which only duplicate the work)::

    # Hugging Face safetensors -> <out>/iter_0000000 + latest_checkpointed_iteration.txt
    python tools/convert_checkpoint.py hf-to-megatron --hf PATH --out DIR --tp 1 --pp 1
    torchrun --nproc_per_node 4 tools/convert_checkpoint.py hf-to-megatron \\
        --hf PATH --out DIR --tp 2 --pp 2 [--vpp V] [--dtype bf16|fp32] [--iteration N] \\
        [--transformer-impl auto|transformer_engine|local]

    # Megatron checkpoint (any save layout) -> Hugging Face directory
    torchrun --nproc_per_node 2 tools/convert_checkpoint.py megatron-to-hf \\
        --ckpt DIR [--iteration N] --out PATH --tp 2 --pp 1 [--dtype bf16|fp32] \\
        [--copy-files-from HF_PATH]

``hf-to-megatron`` builds the model at the given layout, streams the Hugging Face
weights into it (each rank reads only its shards) and saves a Megatron checkpoint that
any other layout can load. ``--dtype`` defaults to the Hugging Face config's dtype.
``--transformer-impl`` chooses the layer spec the model is built with (``auto``:
Transformer Engine on CUDA, where it is required, megatron's local modules on CPU).
Checkpoints do not depend on it: one written with either spec loads with the other.

``megatron-to-hf`` loads the checkpoint (the tracker's iteration unless
``--iteration``; ``--ckpt`` may also be an ``iter_NNNNNNN`` directory) and writes a
Hugging Face checkpoint with ``--dtype`` (default: the checkpoint's). Tokenizer and
generation files are copied from ``--copy-files-from``, else from the Hugging Face
source recorded in the checkpoint when it still exists.

Both directions check the input's ``checksums.json`` when it has one (skip the digests
with ``--no-verify-input``) and write one for the output. ``--verify`` then reads the
output back: every file against its checksum, and every tensor against the model in
memory (bit for bit).

    # check a checkpoint directory (Megatron iter_NNNNNNN or Hugging Face) on its own
    python tools/convert_checkpoint.py verify PATH

Errors are reported as one line on stderr (per rank) with exit status 1 (2 for usage
errors).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from covrl.models.model import TRANSFORMER_IMPLS

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert policy checkpoints between Hugging Face and Megatron formats.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def layout(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
        p.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
        p.add_argument(
            "--transformer-impl",
            choices=TRANSFORMER_IMPLS,
            default="auto",
            help="layer spec: auto (Transformer Engine on CUDA, local on CPU), "
            "transformer_engine, or local (on CUDA: the opt-out, unfused attention)",
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        p.add_argument("--verify", action="store_true", help="read the output back and compare it")
        p.add_argument(
            "--no-verify-input",
            action="store_true",
            help="check only the input files' sizes, not their checksums",
        )

    h2m = sub.add_parser("hf-to-megatron", help="Hugging Face -> Megatron checkpoint")
    h2m.add_argument("--hf", required=True, help="Hugging Face checkpoint directory")
    h2m.add_argument("--out", required=True, help="Megatron checkpoint root directory")
    h2m.add_argument("--iteration", type=int, default=0, help="iteration to save as")
    layout(h2m)

    m2h = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> Hugging Face")
    m2h.add_argument("--ckpt", required=True, help="checkpoint root or iter_NNNNNNN directory")
    m2h.add_argument("--iteration", type=int, default=None, help="default: the tracker's")
    m2h.add_argument("--out", required=True, help="Hugging Face output directory")
    m2h.add_argument(
        "--copy-files-from", default=None, help="copy tokenizer / generation files from here"
    )
    m2h.add_argument(
        "--max-shard-bytes", type=int, default=5 * 1024**3, help="safetensors shard size limit"
    )
    layout(m2h)

    ver = sub.add_parser("verify", help="check a checkpoint directory against checksums.json")
    ver.add_argument("path", help="Megatron checkpoint (root or iter_NNNNNNN) or HF directory")
    return parser


def _build(config, parallel, transformer_impl: str):
    """This rank's chunks; 16-bit models wrapped in ``Float16Module`` as the engine does
    (it casts the norms, which the local spec creates in float32)."""
    from megatron.core.transformer.module import Float16Module

    from covrl.models import build_model

    chunks = build_model(config, parallel, transformer_impl=transformer_impl)
    if config.params_dtype != torch.float32:
        chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
    return chunks


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _hf_config(hf: Path, dtype: torch.dtype | None):
    """The model config of a Hugging Face directory; errors name ``config.json``."""
    from covrl.models import PolicyModelConfig

    file = hf / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"--hf {hf}: no config.json (not a Hugging Face checkpoint)")
    try:
        return PolicyModelConfig.from_hf(file, params_dtype=dtype)
    except ValueError as exc:
        message = " ".join(str(exc).split())
        raise ValueError(message if str(file) in message else f"{file}: {message}") from exc


def _same_tensors(a: dict, b: dict, where: Path) -> None:
    """Raise naming the first tensor where ``b`` (read back) differs from ``a``."""
    if sorted(a) != sorted(b):
        raise RuntimeError(f"--verify: {where} holds tensors {sorted(b)[:4]}..., not the model's")
    for name, t in a.items():
        u = b[name]
        if u.shape != t.shape or u.dtype != t.dtype or not torch.equal(u, t):
            raise RuntimeError(f"--verify: {where}: tensor {name} differs from the model")


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def hf_to_megatron(args: argparse.Namespace) -> None:
    from covrl import checkpointing
    from covrl.models import (
        load_hf_weights,
        resolve_transformer_impl,
        validate_parallel_layout,
        verify_hf_checkpoint,
    )
    from covrl.parallel import ParallelConfig, initialize

    # Everything checkable is checked before the (slow) distributed set-up.
    hf = Path(args.hf)
    config = _hf_config(hf, DTYPES.get(args.dtype))
    parallel = ParallelConfig(args.tp, args.pp, args.vpp)
    validate_parallel_layout(config, parallel, _world_size())
    resolve_transformer_impl(args.transformer_impl)
    verify_hf_checkpoint(hf, digest=not args.no_verify_input)
    target = checkpointing.checkpoint_path(args.out, args.iteration)
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"--out: {target} exists (pass --overwrite to replace it)")

    initialize(parallel)
    chunks = _build(config, parallel, args.transformer_impl)
    load_hf_weights(chunks, config, hf, verify=False)  # (verified above)
    path = checkpointing.save_checkpoint(
        args.out, args.iteration, chunks, config, hf_source=hf, overwrite=args.overwrite
    )
    if args.verify:
        fresh = _build(config, parallel, args.transformer_impl)
        checkpointing.load_checkpoint(path, fresh, config, load_rng=False, verify=True)
        _same_tensors(_state(chunks), _state(fresh), path)
    if _is_rank0():
        checked = ", verified" if args.verify else ""
        print(f"saved {path} ({config.model_type}, {config.params_dtype}, {parallel}{checked})")


def _state(chunks) -> dict:
    from covrl.models import unwrap_model

    return {
        f"{i}.{k}": v
        for i, c in enumerate(chunks)
        for k, v in unwrap_model(c).state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def megatron_to_hf(args: argparse.Namespace) -> None:
    from covrl import checkpointing
    from covrl.models import (
        export_hf_weights,
        resolve_transformer_impl,
        save_hf_checkpoint,
        validate_parallel_layout,
    )
    from covrl.models.hf_weights import HFCheckpointReader
    from covrl.parallel import ParallelConfig, initialize

    ckpt = checkpointing.resolve_checkpoint(args.ckpt, args.iteration)
    metadata = checkpointing.CheckpointMetadata.from_file(ckpt / checkpointing.METADATA_FILENAME)
    config = metadata.policy_config()
    parallel = ParallelConfig(args.tp, args.pp, args.vpp)
    validate_parallel_layout(config, parallel, _world_size())
    resolve_transformer_impl(args.transformer_impl)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out: {out} exists (pass --overwrite to replace it)")
    copy_from = args.copy_files_from
    if copy_from is not None and not Path(copy_from).is_dir():
        raise FileNotFoundError(f"--copy-files-from {copy_from}: not a directory")
    if copy_from is None and metadata.hf_source and Path(metadata.hf_source).is_dir():
        copy_from = metadata.hf_source

    initialize(parallel)
    chunks = _build(config, parallel, args.transformer_impl)
    checkpointing.load_checkpoint(
        ckpt, chunks, config, load_rng=False, verify=not args.no_verify_input
    )
    dtype = DTYPES.get(args.dtype)
    path = save_hf_checkpoint(
        chunks,
        config,
        out,
        dtype=dtype,
        max_shard_bytes=args.max_shard_bytes,
        copy_files_from=copy_from,
        overwrite=args.overwrite,
    )
    if args.verify:
        # Every rank re-exports (collective) and compares with what rank 0 wrote.
        from covrl.models import verify_hf_checkpoint

        verify_hf_checkpoint(path)
        expected = {n: t.clone() for n, t in export_hf_weights(chunks, config, dtype=dtype)}
        with HFCheckpointReader(path) as reader:
            written = {n: reader.read(n) for n in reader.names()}
        _same_tensors(expected, written, path)
    if _is_rank0():
        copied = f", files copied from {copy_from}" if copy_from else ""
        checked = ", verified" if args.verify else ""
        print(f"saved {path} from {ckpt} (iteration {metadata.iteration}{copied}{checked})")


def verify(args: argparse.Namespace) -> None:
    """Check a directory against its manifest (no distributed set-up needed)."""
    from covrl import checkpointing
    from covrl.utils import checksums

    path = Path(args.path)
    if not (path / checksums.MANIFEST_FILENAME).is_file() and path.is_dir():
        try:  # a Megatron checkpoint root: check the tracker's checkpoint
            path = checkpointing.resolve_checkpoint(path)
        except checkpointing.CheckpointError:
            pass
    n = checksums.verify_directory(path)
    print(f"{path}: {n} files match {checksums.MANIFEST_FILENAME}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {
        "hf-to-megatron": hf_to_megatron,
        "megatron-to-hf": megatron_to_hf,
        "verify": verify,
    }[args.command]
    try:
        command(args)
    # CheckpointError is a RuntimeError; a missing Transformer Engine an ImportError.
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        rank = f"[rank {os.environ['RANK']}] " if _world_size() > 1 else ""
        message = " ".join(str(exc).split())  # one line
        # One write with its newline: ranks share the stream, and print's separate
        # write of the end would let another rank's line land in between.
        sys.stderr.write(f"convert_checkpoint.py {args.command}: error: {rank}{message}\n")
        sys.stderr.flush()
        return 1
    finally:
        if torch.distributed.is_initialized():  # (importing megatron-core costs seconds)
            from covrl.parallel import destroy

            destroy()
    return 0


if __name__ == "__main__":  # dist_checkpointing.save starts spawn-context processes
    sys.exit(main())
