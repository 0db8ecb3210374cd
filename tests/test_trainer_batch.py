"""Batch assembly: samples -> dynamic sampling -> padded tensors and advantages ->
mini-batches split over data-parallel ranks; a fresh start setting an earlier run aside."""

from __future__ import annotations

import math

import torch

from covrl.algorithms import AdvantageConfig
from covrl.rollout import Generations
from covrl.training.batch import MiniBatchPlan, RolloutBatch


def _batch(rewards: list[float], n: int = 2) -> RolloutBatch:
    num = len(rewards)
    gens = Generations(
        prompt_index=[i // n for i in range(num)],
        prompt_ids=[[10 + i // n, 11] for i in range(num)],
        response_ids=[[20 + i] * (1 + i % 3) for i in range(num)],
        logprobs=[[-0.5] * (1 + i % 3) for i in range(num)],
        finish_reasons=["stop" if i % 2 else "length" for i in range(num)],
    )
    prompts = num // n
    batch = RolloutBatch.from_generations(
        gens,
        records=[100 + p for p in range(prompts)],
        data_sources=["s"] * prompts,
        group_offset=5,
    )
    batch.rewards = list(rewards)
    batch.acc = [float(r > 0) for r in rewards]
    return batch


def test_dynamic_sampling_and_refill_bookkeeping():
    batch = _batch([1, 0, 1, 1, 0, 0, 0, 1])  # groups 5..8; 6 and 7 are all-equal
    assert batch.group == [5, 5, 6, 6, 7, 7, 8, 8]
    assert batch.record == [100, 100, 101, 101, 102, 102, 103, 103]
    kept, num_groups = batch.dynamic_sampling()
    assert num_groups == 2 and kept.group == [5, 5, 8, 8]
    assert kept.rewards == [1, 0, 0, 1] and kept.response_ids[2] == batch.response_ids[6]
    more = _batch([0, 1, 1, 1])
    more.group = [9, 9, 10, 10]
    kept.extend(more)
    assert kept.num_groups == 4
    assert kept.first_groups(3).group == [5, 5, 8, 8, 9, 9]
    m = batch.rollout_metrics()
    assert m["rollout/reward_mean"] == 0.5 and m["rollout/truncated_fraction"] == 0.5
    lengths = [1, 2, 3, 1, 2, 3, 1, 2]
    assert m["rollout/response_length_mean"] == sum(lengths) / 8
    assert m["rollout/response_length_max"] == 3


def test_tensors_and_grpo_advantages_against_plain_python():
    batch = _batch([1, 0, 2, 0, 0.5, 1.5])
    t = batch.tensors(AdvantageConfig(estimator="grpo"), pad_token_id=0)
    for i in range(len(batch)):
        p, r = batch.prompt_ids[i], batch.response_ids[i]
        row = t.input_ids[i].tolist()
        assert row[: len(p) + len(r)] == p + r and set(row[len(p) + len(r) :]) <= {0}
        assert t.response_mask[i].nonzero().flatten().tolist() == list(
            range(len(p), len(p) + len(r))
        )
        g = i // 2
        rs = batch.rewards[2 * g : 2 * g + 2]
        mean = sum(rs) / 2
        std = math.sqrt(sum((x - mean) ** 2 for x in rs))  # unbiased, n = 2
        expected = (batch.rewards[i] - mean) / (std + 1e-6)
        values = t.advantages[i][t.response_mask[i]]
        assert torch.allclose(values, torch.full_like(values, expected), atol=1e-6)
        assert (t.advantages[i][~t.response_mask[i]] == 0).all()
        assert torch.equal(t.rollout_logp[i][t.response_mask[i]], torch.full_like(values, -0.5))


def test_minibatch_plan_partitions_rows_over_ranks():
    full = _batch([float(i % 3) for i in range(16)]).tensors(AdvantageConfig())
    old = torch.arange(16 * full.input_ids.shape[1], dtype=torch.float32).view(16, -1)
    seen: dict[int, list[int]] = {}
    for rank in range(2):
        plan = MiniBatchPlan(num_minibatches=2, rows_per_minibatch=8, dp_size=2, dp_rank=rank)
        local = plan.local_rows()
        assert local.tolist() == [4 * rank + i for i in range(4)] + [
            8 + 4 * rank + i for i in range(4)
        ]
        for k in range(2):
            pb = plan.policy_batch(k, full, old[local])
            pb.validate()
            rows = plan.rank_rows(k)
            assert torch.equal(pb.input_ids, full.input_ids[rows])
            assert torch.equal(pb.old_logp, old[rows])  # local indexing lines up
            assert torch.equal(pb.advantages, full.advantages[rows])
            seen.setdefault(k, []).extend(pb.sample_index.tolist())
    # Every row of each mini-batch exactly once, with its index in the mini-batch.
    assert {k: sorted(v) for k, v in seen.items()} == {0: list(range(8)), 1: list(range(8))}


def test_resume_none_sets_an_earlier_run_aside(tmp_path):
    from covrl.training.setup import _set_aside_previous_run

    (tmp_path / "checkpoints" / "iter_0000010").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n')
    (tmp_path / "config.yaml").write_text("kept: true\n")
    _set_aside_previous_run(tmp_path)
    (previous,) = tmp_path.glob("previous-*")
    assert (previous / "checkpoints" / "iter_0000010").is_dir()
    assert (previous / "metrics.jsonl").read_text() == '{"step": 10}\n'
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "config.yaml").is_file()
    _set_aside_previous_run(tmp_path)  # nothing left to move
    assert len(list(tmp_path.glob("previous-*"))) == 1


def test_update_metrics_average_over_the_updates_that_report_them():
    from covrl.training.steps import _update_metrics
    from covrl.training.update import UpdateResult

    def result(loss, **metrics):
        return UpdateResult(loss=loss, grad_norm=1.0, lr=1e-4, update_successful=True,
                            metrics=metrics, selected=None)  # fmt: skip

    out = _update_metrics([
        result(1.0, **{"entropy_control/selected_tokens": 0.0, "cov/top_2%": 3.0}),
        result(3.0, **{"entropy_control/selected_tokens": 4.0, "cov/top_2%": 5.0,
                       "entropy_control/selected_prob_mean": 0.25}),
    ])  # fmt: skip
    assert out["train/loss"] == 2.0 and out["cov/top_2%"] == 4.0
    assert out["cov/selected_tokens"] == 2.0
    # Only the second update selected anything: its value, not half of it.
    assert out["cov/selected_prob_mean"] == 0.25
    assert out["train/updates"] == 2.0
