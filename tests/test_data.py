"""Prompt data: verl parquet layout, chat template, length filter, resumable sampling,
errors naming file / row / field."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from covrl.data import DataError, EpochSampler, load_policy_tokenizer, load_prompt_dataset
from covrl.tasks import two_sum
from tests.trainer_fixtures import shared_assets


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_policy_tokenizer(shared_assets(tmp_path_factory)["model"])


def _write(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _rows(n: int) -> list[dict]:
    return two_sum.make_rows(two_sum.TwoSumConfig(), "train")[:n]


def test_rows_tokenised_with_the_chat_template(tmp_path, tokenizer):
    rows = _rows(5)
    data = load_prompt_dataset(
        _write(tmp_path / "a.parquet", rows), tokenizer, max_prompt_length=64
    )
    assert len(data) == 5 and data.num_dropped_too_long == 0
    for row, record in zip(rows, data.records, strict=True):
        text = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=False
        )
        # The compact template: the assistant's turn starts right after <|im_end|>.
        assert text == "<|im_start|>" + row["prompt"][0]["content"] + "<|im_end|>"
        assert list(record.prompt_ids) == tokenizer.encode(text, add_special_tokens=False)
        assert record.data_source == "two_sum"
        assert record.ground_truth == row["reward_model"]["ground_truth"]
        assert record.extra_info == row["extra_info"]
    assert data.records[2].source.endswith("a.parquet:2")


def test_long_prompts_dropped_and_counted(tmp_path, tokenizer):
    rows = _rows(4)
    rows[1]["prompt"] = [{"role": "user", "content": "Write two numbers " * 20}]
    path = _write(tmp_path / "a.parquet", rows)
    lengths = [
        len(r.prompt_ids)
        for r in load_prompt_dataset(path, tokenizer, max_prompt_length=512).records
    ]
    data = load_prompt_dataset(path, tokenizer, max_prompt_length=max(lengths) - 1)
    assert len(data) == 3 and data.num_dropped_too_long == 1 and data.num_rows == 4
    with pytest.raises(DataError, match="no prompts left .*4 rows read, 4 longer than"):
        load_prompt_dataset(path, tokenizer, max_prompt_length=3)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r.update(prompt=[{"role": "user"}]), "row 1: field prompt[0]"),
        (
            lambda r: r.update(reward_model={"style": "rule", "ground_truth": None}),
            "row 1: field reward_model.ground_truth",
        ),
        (lambda r: r.update(prompt=[]), "row 1: field prompt"),
    ],
)
def test_malformed_rows_name_file_row_field(tmp_path, tokenizer, mutate, needle):
    rows = _rows(3)
    for r in rows:  # uniform schema, so one bad row is representable
        r["prompt"] = [dict(m) for m in r["prompt"]]
    mutate(rows[1])
    path = tmp_path / "bad.parquet"
    _write(path, rows)
    with pytest.raises(DataError) as info:
        load_prompt_dataset(path, tokenizer, max_prompt_length=64)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_file_level_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_prompt_dataset(tmp_path / "missing.parquet", tokenizer, max_prompt_length=64)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="garbage.parquet: not a readable parquet file"):
        load_prompt_dataset(garbage, tokenizer, max_prompt_length=64)
    no_column = _write(tmp_path / "nocol.parquet", [{"prompt": "hi", "data_source": "x"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['reward_model'\]"):
        load_prompt_dataset(no_column, tokenizer, max_prompt_length=64)
    with pytest.raises(DataError, match="directory does not exist"):
        load_policy_tokenizer(tmp_path / "no_model")


def test_sampler_epochs_seeded_and_resumable():
    s = EpochSampler(10, 3, seed=5)
    batches = [s.next_batch() for _ in range(7)]  # 3 per epoch, tail of 1 skipped
    for epoch in range(2):
        seen = [i for b in batches[3 * epoch : 3 * epoch + 3] for i in b]
        assert len(set(seen)) == 9
    assert batches[:3] != batches[3:6]  # a new order each epoch
    again = EpochSampler(10, 3, seed=5)
    assert [again.next_batch() for _ in range(3)] == batches[:3]
    assert EpochSampler(10, 3, seed=6).next_batch() != batches[0]
    # Resume from a saved cursor: the same batches follow.
    s = EpochSampler(10, 3, seed=5)
    for _ in range(4):
        s.next_batch()
    state = s.state_dict()
    resumed = EpochSampler(10, 3, seed=5)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(3)] == batches[4:7]
    with pytest.raises(ValueError, match="different data or data.seed"):
        EpochSampler(11, 3, seed=5).load_state_dict(state)
    assert [EpochSampler(4, 2, seed=0, shuffle=False).next_batch() for _ in range(2)] == [
        [0, 1],
        [0, 1],
    ]
