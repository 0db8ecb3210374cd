"""Batch assembly: samples -> dynamic sampling -> this rank's padded tensors with
advantages, split into mini-batches over data-parallel ranks; a fresh start setting an
earlier run aside."""

from __future__ import annotations

import math

import pytest
import torch

from covrl.algorithms import AdvantageConfig
from covrl.rollout import Generations
from covrl.training.batch import (
    MiniBatchLayout,
    PolicyBatch,
    dynamic_sampling,
    rank_batch,
    rollout_metrics,
)


def _samples(rewards: list[float], n: int = 2) -> Generations:
    num = len(rewards)
    gens = Generations(
        prompt_index=[i // n for i in range(num)],
        prompt_ids=[[10 + i // n, 11] for i in range(num)],
        response_ids=[[20 + i] * (1 + i % 3) for i in range(num)],
        logprobs=[[-0.5] * (1 + i % 3) for i in range(num)],
        finish_reasons=["stop" if i % 2 else "length" for i in range(num)],
    )
    prompts = num // n
    gens.annotate(
        records=[100 + p for p in range(prompts)], data_sources=["s"] * prompts, group_offset=5
    )
    gens.rewards = list(rewards)
    gens.acc = [float(r > 0) for r in rewards]
    return gens


def test_dynamic_sampling_and_refill_bookkeeping():
    gens = _samples([1, 0, 1, 1, 0, 0, 0, 1])  # groups 5..8; 6 and 7 are all-equal
    assert gens.group == [5, 5, 6, 6, 7, 7, 8, 8]
    assert gens.record == [100, 100, 101, 101, 102, 102, 103, 103]
    kept = dynamic_sampling(gens)
    assert kept.num_groups == 2 and kept.group == [5, 5, 8, 8]
    assert kept.rewards == [1, 0, 0, 1] and kept.response_ids[2] == gens.response_ids[6]
    assert kept.prompt_index == [0, 0, 3, 3] and kept.logprobs[2] == gens.logprobs[6]
    more = _samples([0, 1, 1, 1])
    more.group = [9, 9, 10, 10]
    kept.extend(more)
    assert kept.num_groups == 4
    assert kept.first_groups(3).group == [5, 5, 8, 8, 9, 9]
    m = rollout_metrics(gens)
    assert m["rollout/reward_mean"] == 0.5 and m["rollout/truncated_fraction"] == 0.5
    lengths = [1, 2, 3, 1, 2, 3, 1, 2]
    assert m["rollout/response_length_mean"] == sum(lengths) / 8
    assert m["rollout/response_length_max"] == 3
    assert m["rollout/response_tokens"] == sum(lengths)


def test_extend_an_empty_selection():
    """A first generation batch whose groups dynamic sampling all dropped is empty; the
    next batch's kept groups extend it (every field, annotations included)."""
    nothing = dynamic_sampling(_samples([1, 1, 0, 0]))  # both groups all-equal
    assert len(nothing) == 0
    more = _samples([0, 1, 1, 1])
    nothing.extend(more)
    assert nothing.logprobs == more.logprobs and nothing.group == more.group
    assert nothing.rewards == more.rewards and len(nothing) == 4
    more.extend(dynamic_sampling(_samples([1, 1])))  # and the other way round
    assert len(more) == 4


def test_extend_refuses_samples_without_the_same_annotations():
    scored = _samples([1, 0])
    raw = Generations([0], [[1]], [[2]], [[-0.1]], ["stop"])
    with pytest.raises(ValueError, match="group is set on one side only"):
        scored.extend(raw)


def test_from_generations_alignment():
    g = Generations(
        prompt_index=[0, 0, 1],
        prompt_ids=[[5, 6], [5, 6], [7]],
        response_ids=[[1, 2, 3], [4], [8, 9]],
        logprobs=[[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6]],
        finish_reasons=["stop", "length", "stop"],
    )
    b = PolicyBatch.from_generations(g, pad_token_id=0)
    b.validate()
    assert b.input_ids.tolist() == [[5, 6, 1, 2, 3], [5, 6, 4, 0, 0], [7, 8, 9, 0, 0]]
    assert b.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert b.response_mask.tolist() == [
        [False, False, True, True, True],
        [False, False, True, False, False],
        [False, True, True, False, False],
    ]
    assert b.rollout_logp[0, 2:].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert b.rollout_logp[2, 1:3].tolist() == pytest.approx([-0.5, -0.6])
    assert b.sample_index.tolist() == [0, 1, 2]
    assert g.response_lengths == [3, 1, 2]
    rows = PolicyBatch.from_generations(g, [2, 0], sample_index=[7, 8], seq_len=6)
    assert rows.input_ids.tolist() == [[7, 8, 9, 0, 0, 0], [5, 6, 1, 2, 3, 0]]
    assert rows.sample_index.tolist() == [7, 8]
    with pytest.raises(ValueError, match="seq_len=4 is shorter than the longest sample"):
        PolicyBatch.from_generations(g, seq_len=4)


def test_rank_batch_grpo_advantages_against_plain_python():
    gens = _samples([1, 0, 2, 0, 0.5, 1.5])
    layout = MiniBatchLayout(num_minibatches=1, rows_per_minibatch=6, dp_size=1, dp_rank=0)
    t = rank_batch(
        gens, layout, AdvantageConfig(estimator="grpo"), pad_token_id=0, device=torch.device("cpu")
    )
    for i in range(len(gens)):
        p, r = gens.prompt_ids[i], gens.response_ids[i]
        row = t.input_ids[i].tolist()
        assert row[: len(p) + len(r)] == p + r and set(row[len(p) + len(r) :]) <= {0}
        assert t.response_mask[i].nonzero().flatten().tolist() == list(
            range(len(p), len(p) + len(r))
        )
        g = i // 2
        rs = gens.rewards[2 * g : 2 * g + 2]
        mean = sum(rs) / 2
        std = math.sqrt(sum((x - mean) ** 2 for x in rs))  # unbiased, n = 2
        expected = (gens.rewards[i] - mean) / (std + 1e-6)
        values = t.advantages[i][t.response_mask[i]]
        assert torch.allclose(values, torch.full_like(values, expected), atol=1e-6)
        assert (t.advantages[i][~t.response_mask[i]] == 0).all()
        assert torch.equal(t.rollout_logp[i][t.response_mask[i]], torch.full_like(values, -0.5))


def test_reinforce_pp_whitening_over_the_whole_step():
    """REINFORCE++'s token whitening spans every response token of the step, whichever
    rank holds the row: a rank's rows equal the same rows of the one-rank batch."""
    gens = _samples([1, 0, 2, 0, 0.5, 1.5, 3, 1])
    config = AdvantageConfig(estimator="reinforce_pp_baseline")
    cpu = torch.device("cpu")
    whole = rank_batch(
        gens,
        MiniBatchLayout(num_minibatches=2, rows_per_minibatch=4, dp_size=1, dp_rank=0),
        config,
        pad_token_id=0,
        device=cpu,
    )
    values = whole.advantages[whole.response_mask].double()
    assert abs(values.mean().item()) < 1e-6 and abs(values.std().item() - 1) < 1e-5
    for rank in range(2):
        layout = MiniBatchLayout(num_minibatches=2, rows_per_minibatch=4, dp_size=2, dp_rank=rank)
        part = rank_batch(gens, layout, config, pad_token_id=0, device=cpu)
        rows = [i for k in range(2) for i in layout.rank_samples(k)]
        s = part.input_ids.shape[1]
        assert torch.equal(part.advantages, whole.advantages[rows][:, :s])


def test_minibatch_layout_partitions_samples_over_ranks():
    gens = _samples([float(i % 3) for i in range(16)])
    seen: dict[int, list[int]] = {}
    for rank in range(2):
        layout = MiniBatchLayout(num_minibatches=2, rows_per_minibatch=8, dp_size=2, dp_rank=rank)
        batch = rank_batch(
            gens, layout, AdvantageConfig(), pad_token_id=0, device=torch.device("cpu")
        )
        assert [list(layout.rank_samples(k)) for k in range(2)] == [
            [4 * rank + i for i in range(4)],
            [8 + 4 * rank + i for i in range(4)],
        ]
        for k in range(2):
            pb = batch.rows(layout.minibatch(k))
            pb.validate()
            for j, i in enumerate(layout.rank_samples(k)):
                n = len(gens.prompt_ids[i]) + len(gens.response_ids[i])
                assert pb.input_ids[j, :n].tolist() == gens.prompt_ids[i] + gens.response_ids[i]
            seen.setdefault(k, []).extend(pb.sample_index.tolist())
    # Every row of each mini-batch exactly once, with its index in the mini-batch.
    assert {k: sorted(v) for k, v in seen.items()} == {0: list(range(8)), 1: list(range(8))}
    with pytest.raises(ValueError, match="do not split over 3 data-parallel ranks"):
        MiniBatchLayout(num_minibatches=1, rows_per_minibatch=8, dp_size=3, dp_rank=0)


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
