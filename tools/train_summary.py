"""Print the closing note of a run: build breakdown, RL time per phase, accuracy change.

Usage::

    python tools/train_summary.py RUN_DIR [--build cache/tiny_task/build.json]

Reads ``RUN_DIR/metrics.jsonl`` (written by ``covrl-train``) and, when given and
present, the tiny task's build manifest. Errors are one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from covrl.tasks.summary import summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run directory (trainer.run_dir)")
    parser.add_argument("--build", default=None, help="the task's build.json (optional)")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.build, args.run_dir))
    except (ValueError, OSError, KeyError) as exc:
        print(f"train_summary: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
