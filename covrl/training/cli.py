"""``covrl-train``: train a policy from a YAML config with dotted overrides.

    covrl-train --config examples/tiny_kl_cov.yaml trainer.total_steps=10 policy.tp=2
    torchrun --nproc_per_node 2 -m covrl.training.cli --config ... [--resume auto|none|PATH]

Exit codes: 0 done (or preempted after saving a checkpoint), 2 a configuration / data /
reward / checkpoint problem (one line on stderr naming it), 1 anything else.

``COVRL_DEVICE_SEPARATION=1`` (or ``report``; test suite, source checkout) runs the
trainer under ``tests/device_mode.py``: an emulated accelerator that reports
host/device tensor mixes (with ``1``: exit code 3) and host syncs per step.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="covrl-train",
        description="RL post-training (GRPO, Clip-Cov, KL-Cov) of a Hugging Face policy.",
    )
    p.add_argument("--config", help="YAML run config (see examples/ and docs/training.md)")
    p.add_argument(
        "--resume",
        default="auto",
        help="auto: continue from the newest complete checkpoint in the run directory "
        "(default); none: start over; or a checkpoint directory",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.total_steps=10")
    return p


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("COVRL_DEVICE_SEPARATION", "0") not in ("", "0"):
        # A test instrument of the source checkout, not of the installed package.
        from tests.device_mode import run_cli

        return run_cli(_main, argv)
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from covrl.checkpointing import CheckpointError
    from covrl.config import ConfigError, load_config
    from covrl.data import DataError
    from covrl.rewards import RewardError
    from covrl.utils.errors import first_line

    rank = os.environ.get("RANK", "0")
    try:
        config = load_config(args.config, args.overrides)
        from covrl.training.loop import train

        train(config, resume=args.resume)
    except (ConfigError, DataError, RewardError, CheckpointError) as exc:
        print(f"covrl-train: error (rank {rank}): {first_line(exc)}", file=sys.stderr, flush=True)
        _shutdown()
        return 2
    _shutdown()
    return 0


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        from covrl.parallel import destroy

        destroy()


if __name__ == "__main__":
    sys.exit(main())
