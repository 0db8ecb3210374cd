"""Bad inputs to the trainer on two ranks: every rank raises the same one-line error
naming the problem, none is left waiting in a collective."""

from __future__ import annotations

import pytest

from tests.harness import launch
from tests.trainer_fixtures import run_overrides, shared_assets


def _errors_body(ctx, assets, root, garbage):
    import torch.distributed as dist

    from covrl.config import ConfigError, load_config
    from covrl.data import load_prompt_dataset, load_tokenizer
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
    tokenizer = load_tokenizer(assets["model"])
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
