"""Bad inputs to the trainer on two ranks: every rank raises the same one-line error
naming the problem, none is left waiting in a collective."""

from __future__ import annotations

import pytest

from tests.harness import launch
from tests.trainer_fixtures import run_overrides, shared_assets


def _errors_body(ctx, assets, root, garbage):
    import torch.distributed as dist

    from covrl.config import ConfigError, load_config
    from covrl.data import DataError, load_policy_tokenizer, load_prompt_dataset
    from covrl.parallel import raise_if_any_rank
    from covrl.rewards import RewardError, RewardExecutor, RewardRegistry
    from covrl.rollout import Generations
    from covrl.training.scoring import score_batch
    from covrl.training.setup import build_run

    out = {}
    cases = {
        "missing_model": {"policy.model_path": f"{root}/no_such_model"},
        "malformed_parquet": {"data.train_files": f"[{garbage}]"},
        "empty_after_filter": {"data.max_prompt_length": 2},
        "bad_reward_spec": {"reward.sources": "{two_sum: no_such_module_xyz:score}"},
        "te_without_cuda": {"policy.transformer_impl": "transformer_engine"},
    }
    for name, extra in cases.items():
        config = load_config(None, run_overrides(assets, f"{root}/{name}", **extra))
        try:
            build_run(config)
            out[name] = None
        except ConfigError as exc:
            out[name] = str(exc)

    # A user function returning NaN for the sample rank 0 scores: rank 1 raises too.
    tokenizer = load_policy_tokenizer(assets["model"])
    data = load_prompt_dataset(assets["train"], tokenizer, max_prompt_length=64)
    seven = tokenizer.encode("7", add_special_tokens=False)
    two = tokenizer.encode("2", add_special_tokens=False)
    batch = Generations(
        prompt_index=[0, 0, 1, 1],
        group=[0, 0, 1, 1],
        record=[0, 0, 1, 1],
        prompt_ids=[list(data[0].prompt_ids)] * 2 + [list(data[1].prompt_ids)] * 2,
        response_ids=[seven, two, two, two],
        logprobs=[[0.0] * len(seven), [0.0] * len(two), [0.0] * len(two), [0.0] * len(two)],
        finish_reasons=["stop"] * 4,
        data_source=["two_sum"] * 4,
    )
    registry = RewardRegistry({"two_sum": "tests.trainer_fixtures:nan_for_seven"})
    with RewardExecutor(timeout_s=30) as executor:
        try:
            score_batch(batch, data, tokenizer, registry, executor, group=dist.group.WORLD)
            out["nan_reward"] = None
        except RewardError as exc:
            out["nan_reward"] = str(exc)
        # Afterwards the ranks still agree and score normally.
        registry = RewardRegistry({"two_sum": "tests.trainer_fixtures:digit_reward"})
        score_batch(batch, data, tokenizer, registry, executor, group=dist.group.WORLD)
        out["rewards_after"] = batch.rewards

    # The shared helper: an exception with a blank message on rank 1 and none on rank 0
    # (with and without an operation name), then a failure on both ranks.
    cases = {
        "blank": ({1: ValueError(" \n ")}, None),
        "blank_what": ({1: ValueError("")}, "checking the data"),
        "both": ({0: DataError("rank 0's problem\nsecond line"), 1: KeyError()}, None),
    }
    for name, (errors, what) in cases.items():
        try:
            raise_if_any_rank(
                errors.get(ctx.rank), dist.group.WORLD, error_type=ConfigError, what=what
            )
            out[name] = None
        except ConfigError as exc:
            out[name] = str(exc)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    assets = shared_assets(tmp_path_factory)
    garbage = root / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not a parquet file")
    return launch(
        _errors_body, world_size=2, timeout=240, assets=assets, root=str(root), garbage=str(garbage)
    )


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_model", "no_such_model"),
        ("malformed_parquet", "garbage.parquet: not a readable parquet file"),
        ("empty_after_filter", "no prompts left (109 rows read, 109 longer than"),
        ("bad_reward_spec", "cannot import no_such_module_xyz"),
        ("te_without_cuda", "transformer_impl=transformer_engine needs CUDA"),
        ("nan_reward", "returned nan, expected a finite number"),
    ],
)
def test_error_on_every_rank(results, case, needle):
    messages = [r[case] for r in results]
    assert messages[0] is not None and needle in messages[0], messages[0]
    assert messages[0] == messages[1]
    assert "\n" not in messages[0]


def test_nan_error_names_function_and_prompt(results):
    message = results[1]["nan_reward"]
    assert "tests.trainer_fixtures:nan_for_seven" in message and "train.parquet:0" in message
    assert results[0]["rewards_after"] == results[1]["rewards_after"] == [1.0, 1.0, 1.0, 1.0]


def test_one_error_on_every_rank_from_any_rank(results):
    """A blank message is named by the exception's type, never an IndexError on the
    failing rank while the other waits; every rank raises the same line naming it."""
    expected = {
        "blank": "ValueError (on rank 1)",
        "blank_what": "checking the data failed on rank 1: ValueError",
        "both": "rank 0's problem (on rank 0 and 1 other rank)",
    }
    for case, message in expected.items():
        assert [r[case] for r in results] == [message, message], case


def test_single_process_and_message_helpers():
    from covrl.config import ConfigError
    from covrl.parallel import SINGLE_PROCESS, raise_if_any_rank
    from covrl.utils.errors import first_line, type_and_message

    assert first_line(ValueError("  first\nsecond ")) == "first"
    assert first_line(ValueError("  \n ")) == first_line(ValueError()) == "ValueError"
    assert type_and_message(OSError("a\n  b")) == "OSError: a b"
    assert type_and_message(KeyError()) == "KeyError"
    raise_if_any_rank(None, SINGLE_PROCESS)  # nothing failed: no error, no collective
    with pytest.raises(ConfigError, match=r"^ValueError \(on rank 0\)$"):
        raise_if_any_rank(ValueError(), SINGLE_PROCESS, error_type=ConfigError)
    with pytest.raises(RuntimeError, match=r"^sync failed on rank 0: error with an empty"):
        raise_if_any_rank("  ", SINGLE_PROCESS, what="sync")
    with pytest.raises(TypeError, match="group=None is ambiguous"):
        raise_if_any_rank(None, None)
