"""Build the built-in tiny task: two-sum data, tokenizer and warm-started base model.

Usage::

    python tools/build_tiny_task.py [--root cache/tiny_task] [--force] [--stages data,tokenizer]

Writes ``<root>/data/{train,validation}.parquet`` (verl layout), the tokenizer and the
base model into ``<root>/model`` (a Hugging Face checkpoint directory) and
``<root>/build.json`` (settings, seconds per stage, results). Stages already built with
the same settings are skipped, so running it again is cheap. See ``docs/tiny_task.md``.

Errors are reported as one line on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from covrl.tasks.tiny import DEFAULT_ROOT, STAGES, build_tiny_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"cache directory ({DEFAULT_ROOT})")
    parser.add_argument("--force", action="store_true", help="rebuild every stage")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated prefix of {','.join(STAGES)} (default: all); the stages "
        "left out are neither built nor checked",
    )
    args = parser.parse_args(argv)
    try:
        manifest = build_tiny_task(
            args.root,
            stages=[s for s in args.stages.split(",") if s],
            force=args.force,
            log=lambda m: print(m, flush=True),
        )
    except (ValueError, OSError) as exc:
        print(f"build_tiny_task: {exc}", file=sys.stderr)
        return 1
    total = sum(s["seconds"] for s in manifest["stages"].values())
    print(f"tiny task ready in {args.root} (stages took {total:.1f} s when built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
