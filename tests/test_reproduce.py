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
from experiments.reproduce.plan import RECIPE, TARGET_KL_COV, TARGETS, default_plan
from experiments.reproduce.report import ReportInputs, write_report
from experiments.reproduce.runner import ReproduceError, run_plan

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import reproduce as reproduce_tool  # noqa: E402

CONFIG = str(REPO / "examples" / "tiny_kl_cov.yaml")


# ---------------------------------------------------------------------------- plan
def test_every_run_of_the_plan_is_a_valid_config_with_its_method():
    shared = reproduce_tool.shared_overrides(Path("cache/tiny_task"), 300, 8, 5)
    specs = default_plan((1, 2), total_steps=300)
    assert len({s.name for s in specs}) == len(specs) == 12
    for spec in specs:
        cfg = load_config(CONFIG, [*shared, *spec.overrides])
        loss, ec = cfg.policy.loss, cfg.policy.loss.entropy_control
        assert cfg.trainer.seed == spec.seed == cfg.data.seed
        assert cfg.policy.tp == 1 and cfg.trainer.total_steps == 300
        assert cfg.trainer.export_hf and loss.clip_ratio_c is None  # no dual clip anywhere
        assert (ec.target is None) == (spec.group == "main")
        if spec.method == "grpo":
            assert ec.method == "none" and loss.clip_range == (0.2, 0.2)
        elif spec.method == "grpo_clip1":
            assert ec.method == "none" and loss.clip_range == (1.0, 1.0)
        elif spec.method == "clip_cov":
            # The paper's Clip-Cov: PPO clip 1 / 1, band (1, 5).
            assert ec.method == "clip_cov" and loss.clip_range == (1.0, 1.0)
            assert ec.clip_cov.ratio == RECIPE["clip_cov_ratio"]
            assert (ec.clip_cov.omega_low, ec.clip_cov.omega_high) == (1.0, 5.0)
        else:
            # The paper's KL-Cov: the unclipped surrogate.
            assert ec.method == "kl_cov" and not ec.kl_cov.ppo_clip
            ratio = (
                TARGET_KL_COV["kl_cov_ratio"] if spec.group == "target" else RECIPE["kl_cov_ratio"]
            )
            assert (ec.kl_cov.ratio, ec.kl_cov.beta) == (ratio, RECIPE["kl_cov_beta"])
            if spec.group == "target":
                # The controller drives beta within its bounds, starting from the paper's 1.
                assert ec.target.knob == "beta"
                assert (ec.target.knob_min, ec.target.knob_max) == (
                    TARGET_KL_COV["knob_min"], TARGET_KL_COV["knob_max"])  # fmt: skip
            if spec.method == "kl_cov_target":
                assert ec.target.schedule == "constant"
                assert ec.target.value == TARGETS["kl_cov_target"]["value"]
            elif spec.method == "kl_cov_schedule":
                t = TARGETS["kl_cov_schedule"]
                assert (ec.target.schedule, ec.target.start, ec.target.end) == (
                    "cosine", t["start"], t["end"])  # fmt: skip
                assert ec.target.steps == 300 and ec.target.target_at(301) == t["end"]
    main = [s for s in specs if s.group == "main"]
    assert sorted((s.method, s.seed) for s in main) == sorted(
        (m, seed) for m in ("grpo", "grpo_clip1", "clip_cov", "kl_cov") for seed in (1, 2)
    )


def test_dry_run_lists_the_runs(capsys):
    assert reproduce_tool.main(["--dry-run", "--seeds", "3", "--no-targets"]) == 0
    out = capsys.readouterr().out
    assert "4 runs of 300 steps" in out and "grpo_clip1_s3" in out and "target" not in out


def test_missing_base_model_is_one_clear_line(tmp_path, capsys):
    assert reproduce_tool.main(["--root", str(tmp_path / "nothing"), "--steps", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no base model" in err and "build_tiny_task" in err


# ---------------------------------------------------------------------------- runner
FAKE_RUN = r"""
import json, sys, pathlib
run_dir = pathlib.Path(sys.argv[1]); fail = sys.argv[2] == "1"
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "rollout/entropy": 0.5}) + "\n")
print("fake run", run_dir)
sys.exit(3 if fail else 0)
"""
FAKE_PASS = r"""
import sys, pathlib
model, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("{}")
print("fake pass@k of", model)
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


def _fake_pass_at_k(model, config, out, data=None):
    return [sys.executable, "-c", FAKE_PASS, str(model), str(out)]


def test_runner_keeps_finished_runs_and_names_the_failed_log(tmp_path, monkeypatch):
    specs = default_plan((1,), targets=False)
    monkeypatch.setattr(runner, "_command", _fake_command(set()))
    logs: list[str] = []
    seconds = run_plan(specs, out=tmp_path, config=CONFIG, shared=[], total_steps=1,
                       jobs=2, log=logs.append, poll_s=0.05)  # fmt: skip
    assert sorted(seconds) == sorted(s.name for s in specs)
    for s in specs:
        record = json.loads((tmp_path / s.name / "reproduce.json").read_text())
        assert record["commands"][0][-2:] == [str(tmp_path / s.name), "0"]
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


def test_runner_follows_each_run_with_its_pass_at_k_and_the_base_model(tmp_path, monkeypatch):
    specs = default_plan((1,), targets=False)[:2]
    monkeypatch.setattr(runner, "_command", _fake_command(set()))
    monkeypatch.setattr(runner, "_pass_at_k_command", _fake_pass_at_k)
    base = (tmp_path / "model", tmp_path / "validation.parquet")
    seconds = run_plan(specs, out=tmp_path / "out", config=CONFIG, shared=[], total_steps=1,
                       jobs=2, pass_at_k=base, log=lambda m: None, poll_s=0.05)  # fmt: skip
    assert sorted(seconds) == sorted(["base", *(s.name for s in specs)])
    for s in specs:
        log = (tmp_path / "out" / f"{s.name}.log").read_text()
        # The run, then the pass@k of its export, in one log.
        assert log.index("fake run") < log.index(
            f"fake pass@k of {tmp_path / 'out' / s.name / 'hf'}"
        )
        assert (tmp_path / "out" / s.name / "pass_at_k.json").is_file()
        assert (
            len(json.loads((tmp_path / "out" / s.name / "reproduce.json").read_text())["commands"])
            == 2
        )
    assert f"fake pass@k of {tmp_path / 'model'}" in (tmp_path / "out" / "base.log").read_text()
    assert (tmp_path / "out" / "base" / "pass_at_k.json").is_file()


# ---------------------------------------------------------------------------- report
T = 40
A_TRUE, B_TRUE = 0.4, 1.3
N_TOKENS = 1024
COV_TOP = {"0.02%": 7.0, "0.2%": 6.0, "2%": 3.0, "5%": 2.2, "10%": 1.6, "20%": 1.2, "50%": 0.7}
COV_MEAN = 0.09
N_SAMPLES = 64


def _target_at(method: str, step: int) -> float:
    """The entropy targets of the synthetic target runs (independent of the library)."""
    if method == "kl_cov_target":
        return 0.36
    p = min((step - 1) / T, 1.0)
    return 0.25 + (0.6 - 0.25) * (1 + math.cos(math.pi * p)) / 2


def _synthetic_run(path: Path, method: str, h_floor: float, seed: int, acc_scale: float = 1.0):
    """Entropy decays from 0.8 to ``h_floor`` (target runs: the target plus a known
    wobble); validation accuracy follows the law ``R = B - A exp(H)`` (times
    ``acc_scale``) plus noise; the other tags are made-up, known numbers."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(0, T + 1):
        row = {"step": step}
        if step >= 1:
            if method.startswith("kl_cov_") and method != "kl_cov":
                target = _target_at(method, step)
                h = target + 0.03 * math.sin(step)
                row["entropy_control/target"] = target
                row["entropy_control/knob"] = 0.1 + 0.001 * step
            else:
                h = h_floor + (0.8 - h_floor) * math.exp(-step / 6)
            row["rollout/entropy"] = h
            p = rng.normal()
            row["entropy_dynamics/predicted_change"] = p
            row["entropy_dynamics/measured_change"] = 0.01 * p + 0.005 * rng.normal()
            row["train/pg_clipfrac"] = float(rng.uniform(0, 0.02))
            row["train/approx_kl_k3"] = float(rng.uniform(0, 0.004))
            row["cov/num_tokens"] = float(N_TOKENS)
            if method == "clip_cov":
                row["cov/candidates"] = float(100 - 2.5 * step)  # below 20 from step 33
                row["cov/selected_tokens"] = float(min(20, 100 - 2.5 * step))
            if step == 1:
                row.update({f"cov/top_{k}": v for k, v in COV_TOP.items()})
                row["cov/mean"] = COV_MEAN
        if step % 5 == 0:
            h_val = row.get("rollout/entropy", 0.8)  # the same step's entropy
            acc = acc_scale * (B_TRUE - A_TRUE * math.exp(h_val)) + 0.01 * rng.normal()
            row["val/two_sum/avg@8"] = acc
            row["val/accuracy"] = min(1.0, acc + 0.1)
        rows.append(row)
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _pass_at_k_reference(counts: list[int], n: int) -> np.ndarray:
    """Mean over prompts of 1 - C(n - c, k) / C(n, k), k = 1..n, in exact integers."""
    return np.array(
        [np.mean([1 - math.comb(n - c, k) / math.comb(n, k) for c in counts])
         for k in range(1, n + 1)]
    )  # fmt: skip


def _write_pass_at_k(path: Path, counts: list[int], distinct: list[int]) -> np.ndarray:
    curve = _pass_at_k_reference(counts, N_SAMPLES)
    data = {
        "n": N_SAMPLES,
        "pass_at_k": curve.tolist(),
        "prompts": [
            {"correct": c, "distinct_correct": d} for c, d in zip(counts, distinct, strict=True)
        ],
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "pass_at_k.json").write_text(json.dumps(data))
    return curve


def _section(text: str, heading: str) -> str:
    """The text of the report's section ``## heading`` (up to the next one)."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def test_report_numbers_match_independent_computations(tmp_path):
    specs = default_plan((1, 2), total_steps=T)
    floors = {"grpo": 0.02, "grpo_clip1": 0.03, "clip_cov": 0.2, "kl_cov": 0.3}
    runs_dir = tmp_path / "runs"
    data, curves, distinct = {}, {}, {}
    for i, s in enumerate(specs):
        data[s.name] = _synthetic_run(runs_dir / s.name, s.method, floors.get(s.method, 0.0),
                                      seed=i, acc_scale=0.9 if s.method == "kl_cov" else 1.0)  # fmt: skip
        if s.group == "main":
            counts = [(3 * i + 7 * j) % (N_SAMPLES + 1) for j in range(5)]
            distinct[s.name] = [min(c, 2 + i) for c in counts]
            curves[s.name] = _write_pass_at_k(runs_dir / s.name, counts, distinct[s.name])
    curves["base"] = _write_pass_at_k(runs_dir / "base", [1, 5, 9, 0, 30], [1, 4, 6, 0, 20])
    inputs = ReportInputs(specs=specs, out_dir=runs_dir, total_steps=T, val_k=8,
                          command="make reproduce", seconds={s.name: 60.0 for s in specs},
                          wall=(600.0, 12), build=None)  # fmt: skip
    md = tmp_path / "docs" / "reproduce.md"
    text = write_report(inputs, md)
    assert md.read_text() == text

    # Entropy at the plateau: mean over the last quarter, by hand.
    start = plateau_start(T)
    assert start == 31

    def window(rows, lo=start, hi=T, tag="rollout/entropy"):
        return np.mean([r[tag] for r in rows if lo <= r["step"] <= hi and tag in r])

    def final_acc(rows):
        return np.mean([r["val/two_sum/avg@8"] for r in rows if "val/two_sum/avg@8" in r][-3:])

    g = [data["grpo_s1"], data["grpo_s2"]]
    k = [data["kl_cov_s1"], data["kl_cov_s2"]]
    hg, hk = np.mean([window(r) for r in g]), np.mean([window(r) for r in k])
    methods = _section(text, "Entropy and accuracy per method")
    row = _table_row(methods, "KL-Cov")
    assert float(row[2].split()[0]) == pytest.approx(hk, abs=5e-5)
    assert float(row[4].rstrip("x")) == pytest.approx(hk / hg, abs=0.05)
    gap = 100 * (np.mean([final_acc(r) for r in k]) - np.mean([final_acc(r) for r in g]))
    assert float(row[6]) == pytest.approx(gap, abs=0.05)
    drop = np.mean([r[1]["rollout/entropy"] for r in g]) / hg
    assert float(_table_row(methods, "GRPO")[3].rstrip("x")) == pytest.approx(drop, abs=0.05)

    # Plateau: the last quarter's share of the fall (quarters 21..30 and 31..40).
    h1 = np.mean([r[1]["rollout/entropy"] for r in g])
    h3 = np.mean([window(r, 21, 30) for r in g])
    h4 = np.mean([window(r, 31, 40) for r in g])
    share = 100 * (h3 - h4) / (h1 - h4)
    found = re.search(r"Its entropy falls by ([0-9.]+) % of its", text)
    assert found and float(found.group(1)) == pytest.approx(share, abs=0.05)

    # Entropy-law fit: least squares through the design matrix on the pooled GRPO points,
    # and on the first third only (steps <= 13) with its error on the rest.
    pts = [(r_["step"], r_["rollout/entropy"], r_["val/two_sum/avg@8"]) for rows in g
           for r_ in rows if "val/two_sum/avg@8" in r_ and "rollout/entropy" in r_]  # fmt: skip
    st, h, r = (np.array(x) for x in zip(*pts, strict=True))

    def lstsq(hh, rr):
        X = np.column_stack([-np.exp(hh), np.ones(len(hh))])
        return np.linalg.lstsq(X, rr, rcond=None)[0]

    a, b = lstsq(h, r)
    fit_row = _table_row(text, f"every seed ({len(h)})")
    assert float(fit_row[1].split()[0]) == pytest.approx(a, abs=1e-3)
    assert float(fit_row[2].split()[0]) == pytest.approx(b, abs=1e-3)
    assert float(fit_row[4].split()[0]) == pytest.approx(b - a, abs=1e-3)
    assert a == pytest.approx(A_TRUE, abs=0.05) and b == pytest.approx(B_TRUE, abs=0.05)
    head = st <= T // 3
    ea, eb = lstsq(h[head], r[head])
    rmse = math.sqrt(np.mean((r[~head] - (eb - ea * np.exp(h[~head]))) ** 2))
    found = re.search(r"a = ([0-9.]+), b = ([0-9.]+), R² .*? by ([0-9.]+) points RMSE", text)
    assert found, "early-fit sentence"
    assert float(found.group(1)) == pytest.approx(ea, abs=1e-3)
    assert float(found.group(2)) == pytest.approx(eb, abs=1e-3)
    assert float(found.group(3)) == pytest.approx(100 * rmse, abs=0.05)

    # Choosing k: the share of net covariance per fraction, n = max(1, floor(f N)).
    shares = _table_row(text, "share of net covariance")[1:]
    for cell, (pct, top) in zip(
        shares, sorted(COV_TOP.items(), key=lambda x: float(x[0][:-1])), strict=True
    ):
        f = float(pct[:-1]) / 100
        expect = max(1, math.floor(f * N_TOKENS)) * top / (N_TOKENS * COV_MEAN)
        assert float(cell.rstrip("x")) == pytest.approx(expect, abs=0.005), pct
    # Clip-Cov's band: candidates 100 - 2.5 step, 20 selected while there are 20.
    band = _table_row(text, "clip_cov_s1")
    cand = np.array([100 - 2.5 * s_ for s_ in range(1, T + 1)])
    assert float(band[2]) == pytest.approx(97.5) and float(band[3]) == pytest.approx(20)
    assert float(band[4]) == pytest.approx(cand.mean(), abs=0.05)
    assert float(band[5]) == pytest.approx(cand.min(), abs=0.05)
    assert band[6] == f"{int(np.sum(cand <= 20))} of {T}"

    # How far each update moves: means (and the largest step) over GRPO's steps.
    reg = _table_row(
        _section(text, "How far each update moves: clip fraction and KL"), "GRPO, clip 1 / 1"
    )
    cf = np.concatenate([[x["train/pg_clipfrac"] for x in rows[1:]] for rows in
                         (data["grpo_clip1_s1"], data["grpo_clip1_s2"])])  # fmt: skip
    mean_cf, max_cf = (float(v.rstrip("%) ")) for v in reg[2].split(" % ("))
    assert mean_cf == pytest.approx(100 * cf.mean(), abs=5e-4)
    assert max_cf == pytest.approx(100 * cf.max(), abs=5e-4)

    # pass@k: the base model and each method's mean over its seeds.
    passk = _section(text, "pass@k and distinct correct answers")
    base = _table_row(passk, "base model")
    for cell, kk in zip(base[1:5], (1, 4, 16, 64), strict=True):
        assert float(cell) == pytest.approx(curves["base"][kk - 1], abs=5.1e-4)
    cells = _table_row(passk, "GRPO")
    for cell, kk in zip(cells[1:5], (1, 4, 16, 64), strict=True):
        expect = (curves["grpo_s1"][kk - 1] + curves["grpo_s2"][kk - 1]) / 2
        assert float(cell.split()[0]) == pytest.approx(expect, abs=5.1e-4)
    expect = np.mean([np.mean(distinct["grpo_s1"]), np.mean(distinct["grpo_s2"])])
    assert float(cells[5].split()[0]) == pytest.approx(expect, abs=5.1e-3)

    # Entropy target: mean |H - target| over the second half (steps 21..40).
    for name in ("kl_cov_target_s1", "kl_cov_schedule_s2"):
        pairs = [(x["rollout/entropy"], x["entropy_control/target"]) for x in data[name]
                 if x["step"] > T // 2 and "entropy_control/target" in x]  # fmt: skip
        err = np.array([abs(hh - tt) for hh, tt in pairs])
        rel = np.mean([abs(hh - tt) / tt for hh, tt in pairs])
        row = _table_row(text, name)
        assert float(row[1]) == pytest.approx(err.mean(), abs=5e-5)
        assert float(row[2].rstrip(" %")) == pytest.approx(100 * rel, abs=0.05)

    # Dynamics: Pearson r by its definition, pooled over the GRPO seeds.
    p = np.concatenate([[x["entropy_dynamics/predicted_change"] for x in rows[1:]] for rows in g])
    m = np.concatenate([[x["entropy_dynamics/measured_change"] for x in rows[1:]] for rows in g])
    r_ref = ((p - p.mean()) * (m - m.mean())).sum() / math.sqrt(
        ((p - p.mean()) ** 2).sum() * ((m - m.mean()) ** 2).sum()
    )
    dyn = _table_row(_section(text, "Predicted vs measured entropy change"), "GRPO")
    assert dyn[1] == str(len(p)) and float(dyn[2]) == pytest.approx(r_ref, abs=0.005)

    # Goals: KL-Cov's 0.3 floor vs GRPO's 0.02 is > 10x; its accuracy is 10% lower.
    assert re.search(r"\| KL-Cov keeps at least 10x .*\| yes \|", text)
    assert re.search(r"\| KL-Cov's final accuracy within 2 points .*\| \*\*no\*\* \|", text)
    assert re.search(r"\| KL-Cov, constant target: mean abs\. error .*\| yes \|", text)
    assert "| two seeds per method | 2 | yes |" in text
    assert "| every run in one call under 60 minutes | 10.0 min | yes |" in text
    assert re.search(
        r"\*\*Not reproduced in these 40-step runs:\*\* .*KL-Cov's final accuracy", text
    )
    # Table 1 row and the figures.
    assert _table_row(text, "grpo_s1")[1:7] == ["7.000", "6.000", "3.000", "1.200", "0.700",
                                                "0.090"]  # fmt: skip
    from PIL import Image

    for name in ("entropy", "accuracy", "entropy_law", "entropy_change", "pass_at_k",
                 "entropy_target"):  # fmt: skip
        png = tmp_path / "docs" / "reproduce" / f"{name}.png"
        assert f"(reproduce/{name}.png)" in text
        with Image.open(png) as im:
            assert im.size[0] >= 600 and im.size[1] >= 400


def test_report_needs_grpo(tmp_path):
    specs = [s for s in default_plan((1,), targets=False) if s.method != "grpo"]
    for s in specs:
        _synthetic_run(tmp_path / s.name, s.method, 0.1, seed=0)
    inputs = ReportInputs(specs=specs, out_dir=tmp_path, total_steps=T, val_k=8, command="x",
                          seconds={}, wall=None, build=None)  # fmt: skip
    with pytest.raises(ValueError, match="no GRPO run"):
        write_report(inputs, tmp_path / "r.md")
