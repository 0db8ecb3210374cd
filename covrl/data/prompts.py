"""Prompt datasets in verl's parquet layout, tokenised with the policy's chat template.

A row (DAPO-Math-17k, the paper's evaluation sets and :mod:`covrl.tasks` ship this way)::

    prompt         list<struct<role: string, content: string>>   chat messages
    data_source    string                                        picks the reward function
    reward_model   struct<style: string, ground_truth: ...>      the verifier's answer
    extra_info     struct<...> (optional)                        passed to the reward function

Files are read with pyarrow; prompts are rendered with the tokenizer's chat template
(``add_generation_prompt=True``) and tokenised once at load time. Prompts longer than
``max_prompt_length`` tokens are dropped and counted. A malformed file or row raises a
:class:`DataError` naming the file, the row and the field.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covrl.utils.errors import first_line

__all__ = [
    "DataError",
    "PromptDataset",
    "PromptRecord",
    "load_prompt_dataset",
    "load_policy_tokenizer",
]


class DataError(ValueError):
    """A missing, unreadable or malformed data file (the message names file/row/field)."""


@dataclass(frozen=True)
class PromptRecord:
    """One tokenised prompt.

    ``prompt_ids``: the chat-templated prompt's token ids. ``ground_truth`` and
    ``extra_info`` are passed to the reward function as read.
    """

    prompt_ids: tuple[int, ...]
    data_source: str
    ground_truth: Any
    extra_info: dict | None
    source: str  # "<file>:<row>", for error messages


@dataclass
class PromptDataset:
    records: list[PromptRecord]
    files: list[str]
    num_rows: int  # rows read, before filtering
    num_dropped_too_long: int = 0
    data_sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]


def load_policy_tokenizer(model_path: str | os.PathLike, *, require_chat_template: bool = True):
    """The policy checkpoint's tokenizer (``transformers.AutoTokenizer``), checked for
    what the trainer needs: a :class:`DataError` naming ``policy.model_path`` when the
    directory is missing or its tokenizer cannot be loaded, or (with
    ``require_chat_template``) has no chat template."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    if not path.is_dir():
        raise DataError(f"policy.model_path={os.fspath(path)!r}: directory does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise DataError(f"{path}: cannot load the tokenizer: {first_line(exc)}") from None
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{path}: the tokenizer has no chat_template (set data.apply_chat_template=false "
            "to feed the prompt text as is)"
        )
    return tokenizer


def _field_error(file: str, row: int, name: str, problem: str) -> DataError:
    return DataError(f"{file}: row {row}: field {name}: {problem}")


def _messages(value: Any, file: str, row: int, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # a plain-text prompt: one user message
        return [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        raise _field_error(
            file, row, key, f"expected a non-empty list of chat messages, got {value!r:.80}"
        )
    out = []
    for j, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise _field_error(
                file, row, f"{key}[{j}]", f"expected {{role: str, content: str}}, got {m!r:.80}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _read_table(path: Path, columns: Sequence[str]):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - arrow raises several types
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing} (has {table.column_names}); expected verl's "
            "layout: prompt, data_source, reward_model.ground_truth, extra_info"
        )
    return table


def load_prompt_dataset(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    *,
    max_prompt_length: int,
    prompt_key: str = "prompt",
    apply_chat_template: bool = True,
    max_prompts: int | None = None,
) -> PromptDataset:
    """Read, template and tokenise the prompts of one or more parquet files (in order).

    Raises :class:`DataError` for a missing/unreadable file, a missing column, a
    malformed row (naming the row and field), or no prompt left after filtering.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [os.fspath(f) for f in files]
    if not files:
        raise DataError("no data files given")
    records: list[PromptRecord] = []
    num_rows = dropped = 0
    for name in files:
        path = Path(name)
        table = _read_table(path, [prompt_key, "data_source", "reward_model"])
        has_extra = "extra_info" in table.column_names
        columns = {c: table.column(c).to_pylist() for c in table.column_names}
        for row in range(table.num_rows):
            if max_prompts is not None and len(records) >= max_prompts:
                break
            num_rows += 1
            messages = _messages(columns[prompt_key][row], name, row, prompt_key)
            source = columns["data_source"][row]
            if not isinstance(source, str) or not source:
                raise _field_error(name, row, "data_source", f"expected a string, got {source!r}")
            reward_model = columns["reward_model"][row]
            if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
                raise _field_error(
                    name,
                    row,
                    "reward_model.ground_truth",
                    f"missing (reward_model={reward_model!r:.80})",
                )
            extra = columns["extra_info"][row] if has_extra else None
            if extra is not None and not isinstance(extra, dict):
                raise _field_error(name, row, "extra_info", f"expected a struct, got {extra!r:.80}")
            if apply_chat_template:
                ids = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
            if len(ids) > max_prompt_length:
                dropped += 1
                continue
            records.append(
                PromptRecord(
                    prompt_ids=tuple(int(t) for t in ids),
                    data_source=source,
                    ground_truth=reward_model["ground_truth"],
                    extra_info=extra,
                    source=f"{name}:{row}",
                )
            )
    if not records:
        raise DataError(
            f"{', '.join(files)}: no prompts left ({num_rows} rows read, {dropped} longer than "
            f"data.max_prompt_length={max_prompt_length} tokens)"
        )
    return PromptDataset(
        records=records,
        files=files,
        num_rows=num_rows,
        num_dropped_too_long=dropped,
        data_sources=sorted({r.data_source for r in records}),
    )
