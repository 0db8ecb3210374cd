"""``make reproduce``: the plan's configs, the runner (skip / fail) and the report's
numbers against independent computations on synthetic runs."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from covrl.config import load_config
from experiments.reproduce import runner
from experiments.reproduce.numbers import plateau_start
from experiments.reproduce.paper import SETTINGS as PAPER
from experiments.reproduce.plan import RECIPE, default_plan
from experiments.reproduce.report import ReportInputs, write_report
from experiments.reproduce.runner import ReproduceError, run_plan

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import reproduce as reproduce_tool  # noqa: E402

CONFIG = str(REPO / "examples" / "tiny_kl_cov.yaml")


# ---------------------------------------------------------------------------- plan
def test_every_run_of_the_plan_is_a_valid_config_with_its_method():
    shared = reproduce_tool.shared_overrides(Path("cache/tiny_task"), 80, 8, 5)
    specs = default_plan((1, 2))
    assert len({s.name for s in specs}) == len(specs) == 12
    for spec in specs:
        cfg = load_config(CONFIG, [*shared, *spec.overrides])
        loss, ec = cfg.policy.loss, cfg.policy.loss.entropy_control
        assert cfg.trainer.seed == spec.seed == cfg.data.seed
        assert cfg.policy.tp == 1 and cfg.trainer.total_steps == 80
        if spec.method == "grpo":
            assert ec.method == "none" and loss.clip_range == (0.2, 0.2)
        elif spec.method == "clip_higher":
            assert ec.method == "none" and loss.clip_range == (0.2, 0.28)
        elif spec.method == "clip_cov":
            # The PPO clip stays at 0.2 (the paper's 1 / 1 drifts at this learning rate).
            assert ec.method == "clip_cov" and loss.clip_range == (0.2, 0.2)
            assert ec.clip_cov.ratio == RECIPE["clip_cov_ratio"]
            assert (ec.clip_cov.omega_low, ec.clip_cov.omega_high) == (1.0, 5.0)
        else:
            assert ec.method == "kl_cov" and ec.kl_cov.ppo_clip and loss.clip_range == (0.2, 0.2)
            if spec.group == "paper":
                assert (ec.kl_cov.ratio, ec.kl_cov.beta) == (
                    PAPER["kl_cov_ratio"],
                    PAPER["kl_cov_beta"],
                )
            elif spec.group == "main":
                assert (ec.kl_cov.ratio, ec.kl_cov.beta) == (
                    RECIPE["kl_cov_ratio"],
                    RECIPE["kl_cov_beta"],
                )
    main = [s for s in specs if s.group == "main"]
    assert sorted((s.method, s.seed) for s in main) == sorted(
        (m, seed) for m in ("grpo", "clip_higher", "clip_cov", "kl_cov") for seed in (1, 2)
    )


def test_dry_run_lists_the_runs(capsys):
    assert reproduce_tool.main(["--dry-run", "--seeds", "3", "--no-sweep"]) == 0
    out = capsys.readouterr().out
    assert "5 runs of 80 steps" in out and "kl_cov_paper_s3" in out and "grpo_s3" in out


def test_missing_base_model_is_one_clear_line(tmp_path, capsys):
    assert reproduce_tool.main(["--root", str(tmp_path / "nothing"), "--steps", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no base model" in err and "build_tiny_task" in err


def test_kept_reports_link_each_other(tmp_path):
    """Each report kept in docs/ is written with links to the others, and the committed
    copies carry them; a report written anywhere else links nothing."""
    for path in reproduce_tool.KEPT_REPORTS:
        report = REPO / path
        related = reproduce_tool.related_reports(report)
        assert len(related) == len(reproduce_tool.KEPT_REPORTS) - 1
        text = report.read_text()
        for what, link in related:
            assert (report.parent / link).is_file(), link
            assert f"[{what}]({link})" in text, path
    assert reproduce_tool.related_reports(tmp_path / "docs" / "reproduce.md") == []


# ---------------------------------------------------------------------------- runner
FAKE_RUN = r"""
import json, sys, pathlib
run_dir = pathlib.Path(sys.argv[1]); fail = sys.argv[2] == "1"
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "rollout/entropy": 0.5}) + "\n")
print("fake run", run_dir)
sys.exit(3 if fail else 0)
"""


def _fake_command(fail_names):
    def command(spec, config, shared, run_dir):
        return [
            sys.executable,
            "-c",
            FAKE_RUN,
            str(run_dir),
            "1" if spec.name in fail_names else "0",
        ]

    return command


def test_runner_keeps_finished_runs_and_names_the_failed_log(tmp_path, monkeypatch):
    specs = default_plan((1,), sweep=False, paper=False)
    monkeypatch.setattr(runner, "_command", _fake_command(set()))
    logs: list[str] = []
    seconds = run_plan(specs, out=tmp_path, config=CONFIG, shared=[], total_steps=1,
                       jobs=2, log=logs.append, poll_s=0.05)  # fmt: skip
    assert sorted(seconds) == sorted(s.name for s in specs)
    for s in specs:
        record = json.loads((tmp_path / s.name / "reproduce.json").read_text())
        assert record["command"][-2:] == [str(tmp_path / s.name), "0"]
        assert "fake run" in (tmp_path / f"{s.name}.log").read_text()
    # A second call keeps every finished run.
    logs.clear()
    assert run_plan(specs, out=tmp_path, config=CONFIG, shared=[], total_steps=1, log=logs.append,
                    poll_s=0.05) == {}  # fmt: skip
    assert all("kept" in line for line in logs)
    # A failing run stops the plan with its log file named.
    monkeypatch.setattr(runner, "_command", _fake_command({"clip_cov_s1"}))
    with pytest.raises(ReproduceError, match=r"clip_cov_s1 failed \(exit 3\).*clip_cov_s1\.log"):
        run_plan(specs, out=tmp_path, config=CONFIG, shared=[], total_steps=1, force=True,
                 jobs=1, log=logs.append, poll_s=0.05)  # fmt: skip
    assert not (tmp_path / "clip_cov_s1" / "reproduce.json").exists()


# ---------------------------------------------------------------------------- report
T = 40
A_TRUE, B_TRUE = 0.4, 1.3


def _synthetic_run(path: Path, h_floor: float, seed: int, acc_scale: float = 1.0):
    """Entropy decays from 0.8 to ``h_floor``; validation accuracy follows the law
    ``R = B - A exp(H)`` (times ``acc_scale``) plus noise; predicted/measured changes and
    step-1 covariance quantiles are made up, known numbers."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(0, T + 1):
        row = {"step": step}
        if step >= 1:
            h = h_floor + (0.8 - h_floor) * math.exp(-step / 6)
            row["rollout/entropy"] = h
            p = rng.normal()
            row["entropy_dynamics/predicted_change"] = p
            row["entropy_dynamics/measured_change"] = 0.01 * p + 0.005 * rng.normal()
            if step == 1:
                row.update({"cov/top_0.02%": 7.0, "cov/top_0.2%": 6.0, "cov/top_2%": 3.0,
                            "cov/top_20%": 1.2, "cov/top_50%": 0.7, "cov/mean": 0.09})  # fmt: skip
        if step % 5 == 0:
            h_val = row.get("rollout/entropy", 0.8)  # the same step's entropy
            acc = acc_scale * (B_TRUE - A_TRUE * math.exp(h_val)) + 0.01 * rng.normal()
            row["val/two_sum/avg@8"] = acc
            row["val/accuracy"] = min(1.0, acc + 0.1)
        rows.append(row)
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def test_report_numbers_match_independent_computations(tmp_path):
    specs = default_plan((1, 2), sweep=False, paper=True)
    floors = {"grpo": 0.02, "clip_higher": 0.04, "clip_cov": 0.2, "kl_cov": 0.3}
    data = {}
    for i, s in enumerate(specs):
        floor = floors[s.method] if s.group == "main" else 0.05
        data[s.name] = _synthetic_run(tmp_path / "runs" / s.name, floor, seed=i,
                                      acc_scale=0.9 if s.method == "kl_cov" else 1.0)  # fmt: skip
    inputs = ReportInputs(specs=specs, out_dir=tmp_path / "runs", total_steps=T, val_k=8,
                          command="make reproduce", seconds={s.name: 60.0 for s in specs},
                          wall=(600.0, 12), build=None,
                          related=[("a longer run", "long.md")])  # fmt: skip
    md = tmp_path / "docs" / "reproduce.md"
    text = write_report(inputs, md)
    assert md.read_text() == text
    assert "\nOther reports of these experiments: [a longer run](long.md).\n" in text

    # Entropy at the plateau: mean over the last quarter, by hand.
    start = plateau_start(T)
    assert start == 31

    def window(rows):
        return np.mean([r["rollout/entropy"] for r in rows if r["step"] >= start])

    def final_acc(rows):
        return np.mean([r["val/two_sum/avg@8"] for r in rows if "val/two_sum/avg@8" in r][-3:])

    g = [data["grpo_s1"], data["grpo_s2"]]
    k = [data["kl_cov_s1"], data["kl_cov_s2"]]
    hg, hk = np.mean([window(r) for r in g]), np.mean([window(r) for r in k])
    row = _table_row(text, "KL-Cov")
    assert float(row[2].split()[0]) == pytest.approx(hk, abs=5e-5)
    assert float(row[4].rstrip("x")) == pytest.approx(hk / hg, abs=0.05)
    gap = 100 * (np.mean([final_acc(r) for r in k]) - np.mean([final_acc(r) for r in g]))
    assert float(row[6]) == pytest.approx(gap, abs=0.05)
    drop = np.mean([r[1]["rollout/entropy"] for r in g]) / hg
    assert float(_table_row(text, "GRPO")[3].rstrip("x")) == pytest.approx(drop, abs=0.05)

    # Entropy-law fit: least squares through the design matrix on the pooled GRPO points.
    h, r = [], []
    for rows in g:
        for row_ in rows:
            if "val/two_sum/avg@8" in row_ and "rollout/entropy" in row_:
                h.append(row_["rollout/entropy"])
                r.append(row_["val/two_sum/avg@8"])
    X = np.column_stack([-np.exp(h), np.ones(len(h))])
    (a, b), *_ = np.linalg.lstsq(X, np.asarray(r), rcond=None)
    fit_row = _table_row(text, f"every seed ({len(h)})")
    assert float(fit_row[1].split()[0]) == pytest.approx(a, abs=1e-3)
    assert float(fit_row[2].split()[0]) == pytest.approx(b, abs=1e-3)
    assert float(fit_row[4].split()[0]) == pytest.approx(b - a, abs=1e-3)
    assert a == pytest.approx(A_TRUE, abs=0.05) and b == pytest.approx(B_TRUE, abs=0.05)

    # Predicted vs measured: Pearson r by its definition, pooled over the GRPO seeds.
    p = np.concatenate([[x["entropy_dynamics/predicted_change"] for x in rows[1:]] for rows in g])
    m = np.concatenate([[x["entropy_dynamics/measured_change"] for x in rows[1:]] for rows in g])
    r_ref = ((p - p.mean()) * (m - m.mean())).sum() / math.sqrt(
        ((p - p.mean()) ** 2).sum() * ((m - m.mean()) ** 2).sum()
    )
    dyn = _table_row(text, "GRPO")  # the first "GRPO" row is the method table; find dynamics
    dyn = [line for line in text.splitlines() if line.startswith(f"| GRPO | {len(p)} |")]
    assert len(dyn) == 1 and float(dyn[0].split("|")[3]) == pytest.approx(r_ref, abs=0.005)

    # Goals: KL-Cov's 0.3 floor vs GRPO's 0.02 is > 10x; its accuracy is 10% lower.
    assert re.search(r"\| KL-Cov keeps at least 10x .*\| yes \|", text)
    assert re.search(r"\| KL-Cov's final accuracy within 2 points .*\| \*\*no\*\* \|", text)
    assert "| two seeds per method | 2 | yes |" in text
    assert re.search(
        r"\*\*Not reproduced in these 40-step runs:\*\* .*KL-Cov's final accuracy", text
    )
    # Table 1 row and the figures.
    assert _table_row(text, "grpo_s1")[1:7] == [
        "7.000",
        "6.000",
        "3.000",
        "1.200",
        "0.700",
        "0.090",
    ]
    from PIL import Image

    for name in ("entropy", "accuracy", "entropy_law", "entropy_change", "sweep"):
        png = tmp_path / "docs" / "reproduce" / f"{name}.png"
        assert f"(reproduce/{name}.png)" in text
        with Image.open(png) as im:
            assert im.size[0] >= 600 and im.size[1] >= 400


def test_report_needs_grpo(tmp_path):
    specs = [s for s in default_plan((1,), sweep=False, paper=False) if s.method != "grpo"]
    for s in specs:
        _synthetic_run(tmp_path / s.name, 0.1, seed=0)
    inputs = ReportInputs(specs=specs, out_dir=tmp_path, total_steps=T, val_k=8, command="x",
                          seconds={}, wall=None, build=None)  # fmt: skip
    with pytest.raises(ValueError, match="no GRPO run"):
        write_report(inputs, tmp_path / "r.md")
