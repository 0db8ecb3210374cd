"""The built-in tiny task: two-sum data, its tokenizer and a warm-started base model.

Everything is built once into a cache directory (default ``cache/tiny_task``) and
reused::

    cache/tiny_task/
      data/train.parquet, data/validation.parquet     verl layout (covrl.tasks.two_sum)
      model/                                           Hugging Face checkpoint directory:
        config.json, model.safetensors,                  a tiny Qwen2, warm-started
        tokenizer.model, tokenizer.json, ...             sentencepiece tokenizer
      build.json                                       what was built, with what settings,
                                                       how long each stage took, accuracy

A stage is skipped when ``build.json`` records it as done with the same settings and
its files are still there; changing a setting rebuilds that stage and the ones after it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from covrl.tasks import two_sum
from covrl.tasks.warm_start import BaseModelConfig, WarmStartConfig
from covrl.utils.errors import check_field

DEFAULT_ROOT = "cache/tiny_task"
MANIFEST = "build.json"
STAGES = ("data", "tokenizer", "model")
# The stages that need no training (seconds): what tests and data tools usually want.
ASSET_STAGES = ("data", "tokenizer")
Log = Callable[[str], None]


@dataclass(frozen=True)
class TokenizerConfig:
    """The sentencepiece tokenizer (:func:`covrl.tasks.tokenizer.train_tokenizer`).
    ``chat_template``: ``compact`` (ChatML without role names) or ``chatml``."""

    vocab_size: int = 64
    user_symbols: tuple[str, ...] = ("\\boxed{",)
    model_max_length: int = 64
    chat_template: str = "compact"

    def __post_init__(self) -> None:
        from covrl.tasks.tokenizer import CHAT_TEMPLATES

        for name in ("vocab_size", "model_max_length"):
            check_field(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check_field(
            self.chat_template in CHAT_TEMPLATES,
            "chat_template",
            self.chat_template,
            f"one of {', '.join(sorted(CHAT_TEMPLATES))}",
        )


@dataclass(frozen=True)
class TinyTaskConfig:
    """Everything a build depends on; each stage's part is recorded in the manifest."""

    task: two_sum.TwoSumConfig = field(default_factory=two_sum.TwoSumConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    def stage_settings(self, stage: str) -> dict:
        """The settings ``stage`` depends on (its own and the earlier stages')."""
        parts = {"data": {"task": asdict(self.task)}}
        parts["tokenizer"] = {**parts["data"], "tokenizer": _jsonable(asdict(self.tokenizer))}
        parts["model"] = {
            **parts["tokenizer"],
            "model": asdict(self.model),
            "warm_start": asdict(self.warm_start),
        }
        return parts[stage]


@dataclass(frozen=True)
class TinyTaskPaths:
    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_file(self) -> Path:
        return self.data_dir / "train.parquet"

    @property
    def validation_file(self) -> Path:
        return self.data_dir / "validation.parquet"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def stage_files(self, stage: str) -> list[Path]:
        return {
            "data": [self.train_file, self.validation_file],
            "tokenizer": [
                self.model_dir / name
                for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
            ],
            "model": [
                self.model_dir / name
                for name in ("config.json", "model.safetensors", "generation_config.json")
            ],
        }[stage]


def read_manifest(paths: TinyTaskPaths) -> dict:
    try:
        return json.loads(paths.manifest.read_text())
    except FileNotFoundError:
        return {"stages": {}}
    except (json.JSONDecodeError, OSError) as exc:
        raise ValueError(f"{paths.manifest}: unreadable build manifest ({exc})") from exc


def stage_is_current(paths: TinyTaskPaths, settings: TinyTaskConfig, stage: str) -> bool:
    """Whether ``stage`` was built with ``settings`` and its files are all present."""
    record = read_manifest(paths).get("stages", {}).get(stage)
    return (
        record is not None
        and record.get("settings") == settings.stage_settings(stage)
        and all(f.is_file() for f in paths.stage_files(stage))
    )


def _write_manifest(paths: TinyTaskPaths, manifest: dict) -> None:
    from covrl.utils.atomic_io import write_text_atomic

    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.manifest, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _jsonable(value):
    """Tuples as lists, so settings compare equal after a JSON round trip."""
    return json.loads(json.dumps(value))


def build_data(paths: TinyTaskPaths, settings: TinyTaskConfig, log: Log) -> dict:
    files = two_sum.write_dataset(settings.task, paths.data_dir)
    sums = two_sum.split_sums(settings.task)
    return {"files": files, "rows": {k: len(v) for k, v in sums.items()}}


def build_tokenizer(paths: TinyTaskPaths, settings: TinyTaskConfig, log: Log) -> dict:
    from covrl.tasks.tokenizer import train_tokenizer

    tok = settings.tokenizer
    tokenizer = train_tokenizer(
        two_sum.corpus(settings.task),
        paths.model_dir,
        vocab_size=tok.vocab_size,
        user_symbols=tok.user_symbols,
        model_max_length=tok.model_max_length,
        chat_template=tok.chat_template,
    )
    return {"vocab_size": len(tokenizer), "dir": str(paths.model_dir)}


def build_base_model(paths: TinyTaskPaths, settings: TinyTaskConfig, log: Log) -> dict:
    """Warm-start the base model (one process, TP = 1, unless the caller already
    initialised a parallel layout) and export it into the model directory."""
    import torch.distributed as dist

    from covrl.parallel import ParallelConfig, destroy, initialize
    from covrl.tasks.warm_start import warm_start

    owns_state = not dist.is_initialized()
    if owns_state:
        initialize(ParallelConfig(), seed=settings.warm_start.seed)
    try:
        return warm_start(
            paths.model_dir, settings.task, settings.model, settings.warm_start, log=log
        )
    finally:
        if owns_state:
            destroy()


BUILDERS: dict[str, Callable[[TinyTaskPaths, TinyTaskConfig, Log], dict]] = {
    "data": build_data,
    "tokenizer": build_tokenizer,
    "model": build_base_model,
}


def build_tiny_task(
    root: str | os.PathLike = DEFAULT_ROOT,
    settings: TinyTaskConfig | None = None,
    *,
    stages: Sequence[str] = ASSET_STAGES,
    force: bool = False,
    log: Log = print,
) -> dict:
    """Build (or reuse) ``stages`` (a prefix of :data:`STAGES`) into ``root``; returns
    the manifest. The default builds the data and the tokenizer; pass
    ``stages=STAGES`` for the warm-started base model too (minutes). One process: the
    model stage initialises its own single-rank process group unless one exists.

    A stage is rebuilt when ``force``, when it is not current (see
    :func:`stage_is_current`), or when an earlier stage was rebuilt.
    """
    if tuple(stages) != STAGES[: len(stages)]:
        raise ValueError(f"stages={list(stages)}: expected a prefix of {list(STAGES)}")
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"build_tiny_task runs in one process; the process group has "
            f"{dist.get_world_size()} ranks"
        )
    settings = settings or TinyTaskConfig()
    paths = TinyTaskPaths(Path(root))
    manifest = read_manifest(paths)
    rebuilt = False
    for stage in stages:
        if not (force or rebuilt) and stage_is_current(paths, settings, stage):
            record = manifest["stages"][stage]
            log(f"[{stage}] up to date (built in {record['seconds']:.1f} s), skipping")
            continue
        log(f"[{stage}] building ...")
        start = time.perf_counter()
        result = BUILDERS[stage](paths, settings, log)
        seconds = time.perf_counter() - start
        manifest["stages"][stage] = {
            "settings": settings.stage_settings(stage),
            "seconds": round(seconds, 2),
            "result": result,
        }
        _write_manifest(paths, manifest)
        rebuilt = True
        summary = {k: v for k, v in result.items() if k != "history"}
        log(f"[{stage}] done in {seconds:.1f} s: {json.dumps(summary)}")
    return manifest
