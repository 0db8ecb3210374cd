"""The two-sum task: dataset rows, splits, scorer, and its sentencepiece tokenizer."""

from __future__ import annotations

import random

import pytest

from covrl.tasks import two_sum
from covrl.tasks.tiny import TinyTaskConfig, TinyTaskPaths, build_tiny_task


# ----------------------------------------------------------------------------- data
def test_rows_are_deterministic_and_in_verl_layout():
    config = two_sum.TwoSumConfig()
    for split in ("train", "validation"):
        rows = two_sum.make_rows(config, split)
        assert rows == two_sum.make_rows(two_sum.TwoSumConfig(), split)
        for i, row in enumerate(rows):
            assert row["data_source"] == "two_sum"
            assert row["reward_model"]["style"] == "rule"
            target = int(row["reward_model"]["ground_truth"])
            assert row["prompt"] == [{"role": "user", "content": f"Sum to {target}"}]
            assert row["extra_info"]["split"] == split and row["extra_info"]["index"] == i
            assert row["extra_info"]["target_sum"] == target
            # Independent count of the ordered pairs of 2-digit numbers.
            count = sum(1 for a in range(10, 100) for b in range(10, 100) if a + b == target)
            assert row["extra_info"]["num_solutions"] == count


def test_splits_are_disjoint_and_cover_the_range():
    config = two_sum.TwoSumConfig(min_sum=30, max_sum=188, num_validation=50, seed=0)
    sums = two_sum.split_sums(config)
    assert len(sums["validation"]) == 50 and len(sums["train"]) == 109
    assert not set(sums["train"]) & set(sums["validation"])
    assert sorted(sums["train"] + sums["validation"]) == list(range(30, 189))
    other = two_sum.split_sums(two_sum.TwoSumConfig(seed=1))
    assert other["validation"] != sums["validation"]


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="num_validation=0"):
        two_sum.TwoSumConfig(num_validation=0)
    with pytest.raises(ValueError, match="max_sum=250"):
        two_sum.TwoSumConfig(max_sum=250)
    with pytest.raises(ValueError, match="split='test'"):
        two_sum.make_rows(two_sum.TwoSumConfig(), "test")


def test_written_parquet_matches_rows(tmp_path):
    import pyarrow.parquet as pq

    config = two_sum.TwoSumConfig()
    files = two_sum.write_dataset(config, tmp_path / "a")
    again = two_sum.write_dataset(config, tmp_path / "b")
    for split, path in files.items():
        table = pq.read_table(path)
        assert table.to_pylist() == two_sum.make_rows(config, split)
        assert pq.read_table(again[split]).equals(table)


def test_sampled_answers_are_correct_and_spread():
    rng = random.Random(0)
    answers = [two_sum.sample_answer(109, rng) for _ in range(400)]
    assert all(two_sum.compute_score(a, "109") == 1.0 for a in answers)
    # 90 correct answers: 400 uniform draws hit most of them.
    assert len(set(answers)) > 70


# ----------------------------------------------------------------------------- scorer
def _reference_score(text: str, target: int) -> float:
    """Independent: scan from the end for the last "\\boxed{" whose braces close."""
    key = "\\boxed{"
    positions = [i for i in range(len(text)) if text.startswith(key, i)]
    for pos in reversed(positions):
        depth, j = 1, pos + len(key)
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            inner = text[pos + len(key) : j - 1].replace(" ", "")
            parts = inner.split("+")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                return 0.0
            if not all(10 <= int(p) <= 99 and len(p) == 2 for p in parts):
                return 0.0
            return float(int(parts[0]) + int(parts[1]) == target)
    return 0.0


CASES = [
    ("\\boxed{45+28}", 73, 1.0),
    ("so \\boxed{ 45 + 28 }", 73, 1.0),
    ("\\boxed{28+45}", 73, 1.0),
    ("\\boxed{45+29}", 73, 0.0),  # wrong sum
    ("\\boxed{5+68}", 73, 0.0),  # one digit
    ("\\boxed{05+68}", 73, 0.0),  # leading zero
    ("\\boxed{100+9}", 109, 0.0),  # three digits
    ("\\boxed{45+28+0}", 73, 0.0),
    ("\\boxed{45-28}", 17, 0.0),
    ("\\boxed{45+28", 73, 0.0),  # never closed
    ("\\boxed{10+10} then \\boxed{45+28}", 73, 1.0),  # the last one counts
    ("\\boxed{45+28} then \\boxed{10+10}", 73, 0.0),
    ("\\boxed{45+28} \\boxed{10+1", 73, 1.0),  # unclosed last: the earlier complete one
    ("\\boxed{{45}+28}", 73, 0.0),
    ("45+28", 73, 0.0),  # no box
    ("", 73, 0.0),
    ("\\boxed{}", 73, 0.0),
    ("\\boxed{99+99}", 198, 1.0),
]


@pytest.mark.parametrize("text,target,expected", CASES)
def test_score_cases(text, target, expected):
    assert _reference_score(text, target) == expected  # the reference agrees with the table
    assert two_sum.compute_score(text, str(target)) == expected
    assert two_sum.compute_score(text, target, {"split": "train"}) == expected


def test_score_agrees_with_reference_on_random_texts():
    rng = random.Random(1)
    alphabet = "0123456789+ {}x\\boxed"
    for _ in range(3000):
        pieces = []
        for _ in range(rng.randint(0, 3)):
            if rng.random() < 0.7:
                a, b = rng.randint(0, 120), rng.randint(0, 120)
                pieces.append(f"\\boxed{{{a:0{rng.choice([1, 2])}d}+{b}}}")
            else:
                pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))))
        text = " ".join(pieces)
        target = rng.randint(20, 198)
        assert two_sum.compute_score(text, str(target)) == _reference_score(text, target), text


# ----------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    manifest = build_tiny_task(root, TinyTaskConfig(), log=lambda m: None)
    return TinyTaskPaths(root), manifest


@pytest.fixture(scope="module")
def qwen2_dir(built, tmp_path_factory):
    """The tokenizer files next to a Qwen2 config.json, as in the base model's directory
    (AutoTokenizer then loads them as Qwen2Tokenizer)."""
    import shutil

    from transformers import Qwen2Config

    paths, _ = built
    path = tmp_path_factory.mktemp("qwen2_tok")
    for file in paths.model_dir.iterdir():  # the tokenizer files (and chat_template.jinja)
        shutil.copy(file, path / file.name)
    Qwen2Config(vocab_size=64, hidden_size=128, num_attention_heads=2).save_pretrained(path)
    return path


def test_tokenizer_loads_and_round_trips(built, qwen2_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    paths, _ = built
    sp = spm.SentencePieceProcessor(model_file=str(paths.model_dir / "tokenizer.model"))
    texts = two_sum.corpus(two_sum.TwoSumConfig())
    sample = random.Random(0).sample(texts, 300) + [t for t in texts if "Write" in t]
    for directory in (paths.model_dir, qwen2_dir):
        tok = AutoTokenizer.from_pretrained(directory)
        assert len(tok) == sp.get_piece_size()
        for text in sample:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == sp.encode(text), (directory, text)  # sentencepiece's segmentation
            assert tok.decode(ids) == text
    # Every digit is its own token (one sampling decision per digit).
    ids = tok("\\boxed{45+28}", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["\\boxed{", "4", "5", "+", "2", "8", "}"]


@pytest.mark.parametrize("where", ["model_dir", "qwen2_dir"])
def test_tokenizer_special_ids_and_chat_template(built, qwen2_dir, where):
    from transformers import AutoTokenizer

    paths, _ = built
    tok = AutoTokenizer.from_pretrained(paths.model_dir if where == "model_dir" else qwen2_dir)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    messages = two_sum.prompt_messages(73)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The compact template: no role names; the assistant's turn follows <|im_end|>.
    assert text == "<|im_start|>Sum to 73<|im_end|>"
    whole = messages + [{"role": "assistant", "content": "\\boxed{45+28}"}]
    assert tok.apply_chat_template(whole, tokenize=False) == text + "\\boxed{45+28}<|im_end|>"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1  # no extra bos; one <|im_end|>
    assert tok.decode(ids) == text
    answer = tok("\\boxed{45+28}<|im_end|>", add_special_tokens=False)["input_ids"]
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer, skip_special_tokens=True) == "\\boxed{45+28}"


def test_chatml_template_and_unknown_template(built):
    """The first version's template (ChatML with role names) stays available by name;
    an unknown name is an error naming the choices."""
    from covrl.tasks.tokenizer import SPM_FILE, hf_tokenizer_from_spm

    paths, _ = built
    tok = hf_tokenizer_from_spm(paths.model_dir / SPM_FILE, chat_template="chatml")
    text = tok.apply_chat_template(
        two_sum.prompt_messages(73, two_sum.LONG_PROMPT_TEMPLATE),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>user\nWrite two 2-digit numbers that sum to 73.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="chatml"):
        hf_tokenizer_from_spm(paths.model_dir / SPM_FILE, chat_template="llama")


def test_build_skips_current_stages_and_rebuilds_changed(built, tmp_path):
    paths, manifest = built
    logs = []
    again = build_tiny_task(paths.root, TinyTaskConfig(), log=logs.append)
    assert all("skipping" in line for line in logs) and again == manifest
    # Another task setting rebuilds data and everything after it.
    settings = TinyTaskConfig(task=two_sum.TwoSumConfig(seed=3))
    logs.clear()
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(paths.root, root)
    build_tiny_task(root, settings, log=logs.append)
    assert not any("skipping" in line for line in logs)
