"""Entropy-law tooling: the closed-form fit against a design-matrix least squares and
Monte Carlo spreads, held-out prediction error, TensorBoard / JSON lines / CSV readers,
the live monitor, the comparison table and the command-line tool's PNGs."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from covrl.analysis import (
    EntropyLawError,
    EntropyLawMonitor,
    EntropyLawMonitorConfig,
    RunLogError,
    Tags,
    analyze_run,
    compare_table,
    fit_entropy_law,
    fit_prefix,
    load_run,
    prediction_error,
    summarize_run,
)

H_TAG, R_TAG = "rollout/entropy", "val/accuracy"
A_TRUE, B_TRUE = 0.25, 0.62
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def entropy_curve(steps: np.ndarray, h0=1.1, floor=0.05, rate=0.03) -> np.ndarray:
    """A collapsing entropy: exponential decay from h0 to floor."""
    return floor + (h0 - floor) * np.exp(-rate * steps)


def synthetic_points(n: int, noise: float, rng: np.random.Generator, a=A_TRUE, b=B_TRUE):
    """``n`` validation points of the law with Gaussian noise in R."""
    steps = np.arange(n) * 5
    h = entropy_curve(steps)
    return steps, h, b - a * np.exp(h) + noise * rng.standard_normal(n)


def reference_ols(h: np.ndarray, r: np.ndarray):
    """Least squares through the design matrix [-exp(H), 1]: (a, b) and their covariance."""
    X = np.column_stack([-np.exp(h), np.ones_like(h)])
    coef, *_ = np.linalg.lstsq(X, r, rcond=None)
    resid = r - X @ coef
    s2 = resid @ resid / (len(h) - 2)
    return coef, s2 * np.linalg.inv(X.T @ X), resid


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_records(
    a=A_TRUE, b=B_TRUE, steps=120, val_every=4, noise=0.01, seed=0, cov=False, entropy=None
):
    """Trainer-style metrics: entropy every step, validation every ``val_every`` steps."""
    rng = np.random.default_rng(seed)
    s = np.arange(steps + 1)
    h = entropy_curve(s) if entropy is None else entropy(s)
    records = []
    for step, hv in zip(s.tolist(), h.tolist(), strict=True):
        rec = {"step": step, H_TAG: hv, "train/lr": 1e-6, "note": "text is ignored"}
        if step % val_every == 0:
            rec[R_TAG] = b - a * math.exp(hv) + noise * rng.standard_normal()
        if cov:
            rec["cov/mean"] = -1e-3 + 1e-5 * step
            rec["cov/top_0.02%"] = 5.0 * math.exp(-step / 60)
            rec["cov/top_2%"] = 0.4 * math.exp(-step / 60)
            rec["cov/selected"] = 12.0
        records.append(rec)
    return records


# --------------------------------------------------------------------------- the fit


def test_fit_matches_design_matrix_least_squares_and_recovers_parameters():
    rng = np.random.default_rng(1)
    _, h, r = synthetic_points(60, 0.01, rng)
    fit = fit_entropy_law(h, r)
    coef, cov, resid = reference_ols(h, r)
    np.testing.assert_allclose([fit.a, fit.b], coef, rtol=1e-9)
    np.testing.assert_allclose([fit.a_se, fit.b_se], np.sqrt(np.diag(cov)), rtol=1e-7)
    np.testing.assert_allclose(fit.cov_ab, cov[0, 1], rtol=1e-7)
    # Ceiling b - a with the variance of the difference from the full covariance matrix.
    np.testing.assert_allclose(
        fit.ceiling_se, math.sqrt(np.array([-1, 1]) @ cov @ [-1, 1]), rtol=1e-7
    )
    np.testing.assert_allclose(fit.rmse, math.sqrt(np.mean(resid**2)), rtol=1e-9)
    np.testing.assert_allclose(fit.r2, 1 - resid @ resid / np.sum((r - r.mean()) ** 2), rtol=1e-9)
    np.testing.assert_allclose(fit.slope(0.5), -fit.a * math.exp(0.5))
    assert abs(fit.a - A_TRUE) < 3 * fit.a_se
    assert abs(fit.b - B_TRUE) < 3 * fit.b_se
    assert abs(fit.ceiling - (B_TRUE - A_TRUE)) < 3 * fit.ceiling_se
    # Noise-free points are fitted exactly.
    exact = fit_entropy_law(h, B_TRUE - A_TRUE * np.exp(h))
    assert exact.a == pytest.approx(A_TRUE, rel=1e-12) and exact.b == pytest.approx(
        B_TRUE, rel=1e-12
    )
    assert exact.rmse < 1e-12 and exact.r2 == pytest.approx(1.0)


def test_standard_errors_match_the_spread_over_seeds():
    """The reported standard errors against the empirical spread of 400 independent fits."""
    rng = np.random.default_rng(2)
    fits = [fit_entropy_law(*synthetic_points(30, 0.02, rng)[1:]) for _ in range(400)]
    est = np.array([[f.a, f.b, f.ceiling] for f in fits])
    se = np.array([[f.a_se, f.b_se, f.ceiling_se] for f in fits])
    # Mean estimate unbiased; spread equals the typical standard error (within sampling
    # error of a standard deviation from 400 draws, about 3.5%).
    np.testing.assert_allclose(
        est.mean(0), [A_TRUE, B_TRUE, B_TRUE - A_TRUE], atol=3 * est.std(0).max() / math.sqrt(400)
    )
    np.testing.assert_allclose(est.std(0, ddof=1), np.sqrt((se**2).mean(0)), rtol=0.12)
    # Coverage of +/- 2 standard errors (t with 28 dof: 94.5%).
    covered = (np.abs(est - [A_TRUE, B_TRUE, B_TRUE - A_TRUE]) < 2 * se).mean(0)
    assert ((covered > 0.91) & (covered < 0.98)).all(), covered


def test_prefix_fit_scores_only_the_held_out_points():
    steps = np.arange(0, 200, 5)
    h = entropy_curve(steps)
    r = B_TRUE - A_TRUE * np.exp(h)
    late = steps > 40
    r_shifted = np.where(late, r + np.where(steps % 10 == 0, 0.03, -0.01), r)
    fit, held = fit_prefix(steps, h, r_shifted, 40)
    # Fitted on the exact prefix (step 40 included): the true parameters.
    assert fit.num_points == int((~late).sum()) == 9
    assert fit.a == pytest.approx(A_TRUE, rel=1e-10) and fit.b == pytest.approx(B_TRUE, rel=1e-10)
    errs = np.where(steps[late] % 10 == 0, 0.03, -0.01)
    assert held.num_points == late.sum()
    assert (held.first_step, held.last_step) == (45, 195)
    assert held.rmse == pytest.approx(math.sqrt(np.mean(errs**2)), rel=1e-9)
    assert held.max_abs == pytest.approx(0.03, rel=1e-9)
    assert held.mean == pytest.approx(errs.mean(), abs=1e-12)
    # All points together would dilute the error with the exactly fitted prefix.
    everything = prediction_error(fit, h, r_shifted, steps=steps)
    assert everything.rmse < held.rmse and everything.num_points == len(steps)
    with pytest.raises(EntropyLawError, match="no held-out points after step 195"):
        fit_prefix(steps, h, r, 195)


@pytest.mark.parametrize(
    "h, r, match",
    [
        ([], [], "no \\(entropy, accuracy\\) points"),
        ([0.5, 0.4], [0.1, 0.2], "too few points: 2"),
        ([0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.2], "entropy is constant"),
        ([0.5, float("nan"), 0.3], [0.1, 0.2, 0.3], "non-finite .* at indices \\[1\\]"),
        ([800.0, 1.0, 2.0], [0.1, 0.2, 0.3], "exp\\(H\\) overflows"),
    ],
)
def test_fit_rejects_meaningless_inputs(h, r, match):
    with pytest.raises(EntropyLawError, match=match) as info:
        fit_entropy_law(h, r, context="run 'x'")
    assert "run 'x'" in str(info.value)


# --------------------------------------------------------------------------- readers


def test_tensorboard_event_files_read_back_exactly(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(3)
    values = {tag: rng.random(25) for tag in (H_TAG, R_TAG, "cov/top_0.02%")}
    with SummaryWriter(str(tmp_path / "grpo" / "tensorboard")) as w:
        for step in range(25):
            for tag, v in values.items():
                if tag != R_TAG or step % 3 == 0:
                    w.add_scalar(tag, float(v[step]), step * 2)
    run = load_run(tmp_path / "grpo")
    assert run.name == "grpo" and run.source.endswith("tensorboard")
    assert run.tags == sorted(values)
    for tag, v in values.items():
        keep = np.arange(25) % 3 == 0 if tag == R_TAG else np.ones(25, bool)
        s = run.series(tag)
        np.testing.assert_array_equal(s.steps, np.arange(0, 50, 2)[keep])
        # TensorBoard stores float32: exactly the float32 image of what was written.
        np.testing.assert_array_equal(s.values, v[keep].astype(np.float32).astype(np.float64))
    # A resumed run appends a new event file replaying steps 40..; its values win.
    with SummaryWriter(str(tmp_path / "grpo" / "tensorboard")) as w:
        for step in range(40, 60, 2):
            w.add_scalar(H_TAG, 0.5, step)
    s = load_run(tmp_path / "grpo").series(H_TAG)
    np.testing.assert_array_equal(s.steps, np.arange(0, 60, 2))
    np.testing.assert_array_equal(s.values[:20], values[H_TAG][:20].astype(np.float32))
    assert (s.values[20:] == 0.5).all()
    # Tensor-format scalars (tf.summary v2 layout) are read too.
    with SummaryWriter(str(tmp_path / "v2")) as w:
        for step in range(5):
            w.add_scalar(H_TAG, float(values[H_TAG][step]), step, new_style=True)
    np.testing.assert_array_equal(
        load_run(tmp_path / "v2").series(H_TAG).values, values[H_TAG][:5].astype(np.float32)
    )
    # A single event file is a run too.
    (event_file,) = sorted((tmp_path / "grpo" / "tensorboard").glob("*tfevents*"))[:1]
    assert load_run(event_file).series(R_TAG).steps.tolist() == [0, 6, 12, 18, 24, 30, 36, 42, 48]


def test_jsonl_and_csv_inputs(tmp_path):
    records = run_records(steps=20)
    records.insert(5, {"step": 3, H_TAG: 9.0})  # replayed after a resume: the later value wins
    records.append({"step": 3, H_TAG: 0.7})
    path = write_jsonl(tmp_path / "kl_cov" / "metrics.jsonl", records)
    path.write_text(path.read_text() + "\n")  # trailing blank line
    run = load_run(tmp_path / "kl_cov")
    assert run.name == "kl_cov" and run.source == str(path)
    assert sorted(run.tags) == sorted([H_TAG, R_TAG, "train/lr"])  # the string field is skipped
    h = run.series(H_TAG)
    expected = {r["step"]: r[H_TAG] for r in records}
    np.testing.assert_array_equal(h.steps, sorted(expected))
    np.testing.assert_array_equal(h.values, [expected[s] for s in sorted(expected)])
    assert h.values[3] == 0.7

    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("step,entropy,accuracy\n0,1.25,0.1\n10,0.5,\n20,0.25,0.4\n\n")
    run = load_run(csv_path)
    assert run.name == "mine" and run.tags == ["accuracy", "entropy"]
    assert run.series("entropy").values.tolist() == [1.25, 0.5, 0.25]
    assert run.series("accuracy").steps.tolist() == [0, 20]


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("bad.jsonl", '{"step": 0, "a": 1}\n{"step": 1, "a": \n', r"bad.jsonl:2: invalid JSON"),
        ("nostep.jsonl", '{"a": 1}\n', r"nostep.jsonl:1: expected an integer 'step'"),
        ("nostep.csv", "epoch,entropy\n0,1\n", r"nostep.csv: the header needs a 'step' column"),
        ("cell.csv", "step,entropy\n0,1\n1,high\n", r"cell.csv:3: column 'entropy': 'high'"),
        ("ragged.csv", "step,entropy\n0,1,2\n", r"ragged.csv:2: 3 fields, the header has 2"),
        ("notes.txt", "hello\n", r"notes.txt: unknown log format"),
    ],
)
def test_malformed_logs_name_the_file_and_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(RunLogError, match=match):
        load_run(tmp_path / name)


def test_run_errors_name_run_file_and_tag(tmp_path):
    with pytest.raises(RunLogError, match=r"run directory .*empty_dir: found no logs"):
        (tmp_path / "empty_dir").mkdir()
        load_run(tmp_path / "empty_dir")
    write_jsonl(tmp_path / "empty" / "metrics.jsonl", [])
    with pytest.raises(RunLogError, match=r"run 'empty': no scalars in .*metrics.jsonl"):
        analyze_run(load_run(tmp_path / "empty"))
    write_jsonl(tmp_path / "noval" / "metrics.jsonl", [{"step": 0, H_TAG: 1.0}])
    with pytest.raises(
        RunLogError,
        match=r"run 'noval': tag 'val/accuracy' not found in "
        r".*metrics.jsonl; available tags: rollout/entropy",
    ):
        analyze_run(load_run(tmp_path / "noval"))
    flat = run_records(entropy=lambda s: np.full(len(s), 0.4))
    write_jsonl(tmp_path / "flat" / "metrics.jsonl", flat)
    with pytest.raises(
        EntropyLawError,
        match=r"entropy is constant .*run 'flat' from .*"
        r"metrics.jsonl, H='rollout/entropy', R='val/accuracy'",
    ):
        analyze_run(load_run(tmp_path / "flat"))
    write_jsonl(
        tmp_path / "apart" / "metrics.jsonl", [{"step": 1, H_TAG: 1.0}, {"step": 2, R_TAG: 0.3}]
    )
    with pytest.raises(EntropyLawError, match=r"no step logs both tags .*run 'apart'"):
        analyze_run(load_run(tmp_path / "apart"))
    with pytest.raises(EntropyLawError, match=r"too few points: 2 .*steps <= 4, run 'short'"):
        write_jsonl(tmp_path / "short" / "metrics.jsonl", run_records(steps=40))
        analyze_run(load_run(tmp_path / "short"), fit_until=4)


def test_non_finite_steps_are_left_out_and_reported(tmp_path):
    records = run_records(steps=60)
    records[8][R_TAG] = float("nan")  # json writes NaN, which Python reads back
    records[58][H_TAG] = float("inf")
    run = load_run(write_jsonl(tmp_path / "diverged" / "metrics.jsonl", records))
    an = analyze_run(run)
    assert an.skipped_steps.tolist() == [8, 58]
    assert 8 not in an.steps and an.fit.num_points == 16 - 1
    assert (an.current_step, an.current_entropy) == (60, records[60][H_TAG])
    clean = [r for r in records if r["step"] not in (8, 58)]
    ref = analyze_run(load_run(write_jsonl(tmp_path / "clean" / "metrics.jsonl", clean)))
    assert an.fit == ref.fit


# --------------------------------------------------------------------------- monitor


def test_monitor_reports_the_running_fit():
    mon = EntropyLawMonitor(EntropyLawMonitorConfig(min_points=4))
    rng = np.random.default_rng(4)
    steps, h, r = synthetic_points(12, 0.01, rng)
    assert mon.update(0, 1.0, None) == {}
    outs = [mon.update(int(s), float(hv), float(rv)) for s, hv, rv in zip(steps, h, r, strict=True)]
    assert outs[:3] == [{}, {}, {}]
    for k in range(3, 12):
        ref = fit_entropy_law(h[: k + 1], r[: k + 1])
        out = outs[k]
        assert out["entropy_law/a"] == pytest.approx(ref.a, rel=1e-12)
        assert out["entropy_law/ceiling"] == pytest.approx(ref.b - ref.a, rel=1e-12)
        assert out["entropy_law/ceiling_se"] == pytest.approx(ref.ceiling_se, rel=1e-12)
        assert out["entropy_law/r2"] == pytest.approx(ref.r2, rel=1e-12)
        assert out["entropy_law/dR_dH"] == pytest.approx(-ref.a * math.exp(h[k]), rel=1e-12)
        assert out["entropy_law/num_points"] == k + 1
        if k > 3:  # the point against the fit on the points before it
            prev = fit_entropy_law(h[:k], r[:k])
            assert out["entropy_law/prediction_error"] == pytest.approx(
                r[k] - (prev.b - prev.a * math.exp(h[k])), rel=1e-12
            )
        else:
            assert "entropy_law/prediction_error" not in out
    # Checkpoint round trip, then a resume that replays from step 30 (index 6).
    state = json.loads(json.dumps(mon.state_dict()))
    other = EntropyLawMonitor(EntropyLawMonitorConfig(min_points=4))
    other.load_state_dict(state)
    out = other.update(30, float(h[6]), float(r[6]) + 0.1)
    ref = fit_entropy_law(np.append(h[:6], h[6]), np.append(r[:6], r[6] + 0.1))
    assert other.steps == [0, 5, 10, 15, 20, 25, 30]
    assert out["entropy_law/b"] == pytest.approx(ref.b, rel=1e-12)
    assert mon.update(999, float("nan"), 0.5) == {}
    flat = EntropyLawMonitor(EntropyLawMonitorConfig(min_points=3))
    assert [flat.update(s, 0.3, 0.1 * s) for s in range(4)] == [{}] * 4
    # Constant accuracy: a = 0 and R^2 undefined, so r2 is left out (not logged as NaN).
    const = EntropyLawMonitor(EntropyLawMonitorConfig(min_points=3))
    out = [const.update(s, 1.0 - 0.1 * s, 0.4) for s in range(3)][-1]
    assert abs(out["entropy_law/a"]) < 1e-15 and "entropy_law/r2" not in out


# --------------------------------------------------------------------------- compare + CLI


def _table_rows(table: str) -> dict[str, list[str]]:
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| run")]
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in rows)
    }


def test_compare_table(tmp_path):
    base = run_records(steps=99, seed=5)
    high = run_records(steps=99, seed=6, entropy=lambda s: entropy_curve(s, floor=0.6))
    flat = run_records(steps=99, seed=7, entropy=lambda s: np.full(len(s), 0.4))
    runs = []
    for name, recs in (("grpo", base), ("kl_cov", high), ("flat", flat)):
        runs.append(load_run(write_jsonl(tmp_path / name / "metrics.jsonl", recs)))
    summaries = [summarize_run(run, Tags(), plateau_fraction=0.25) for run in runs]
    rows = _table_rows(compare_table(summaries))
    for name, recs in (("grpo", base), ("kl_cov", high)):
        acc = [(r["step"], r[R_TAG]) for r in recs if R_TAG in r]
        ent = [r[H_TAG] for r in recs]
        best_step, best = max(acc, key=lambda p: p[1])
        plateau = np.mean(ent[-25:])  # the last 25% of 100 entropy points
        base_plateau = np.mean([r[H_TAG] for r in base][-25:])
        fit = analyze_run(load_run(tmp_path / name)).fit
        assert rows[name] == [
            "99",
            f"{acc[-1][1]:.4f}",
            f"{best:.4f} ({best_step})",
            f"{ent[-1]:.4g}",
            f"{plateau:.4g}",
            f"{plateau / base_plateau:.3g}",
            f"{fit.ceiling:.4f} ± {fit.ceiling_se:.2g}",
            f"{fit.r2:.3f}",
        ]
    assert float(rows["kl_cov"][5]) > 3  # entropy kept well above the collapsed baseline
    assert rows["flat"][-2:] == ["n/a", "n/a"]
    table = compare_table(summaries, baseline="kl_cov")
    assert "plateau H / kl_cov" in table and "last 25%" in table
    assert re.search(r"- flat: no fit: entropy is constant", table)
    assert _table_rows(table)["kl_cov"][5] == "1"
    with pytest.raises(RunLogError, match="baseline run 'nope' is not among"):
        compare_table(summaries, baseline="nope")


@pytest.fixture(scope="module")
def cli():
    path = Path(__file__).resolve().parents[1] / "tools" / "entropy_law.py"
    spec = importlib.util.spec_from_file_location("entropy_law_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decodes every pixel: a truncated file fails here
        return im.size


def test_cli_fit_plot_compare(tmp_path, cli, capsys):
    write_jsonl(tmp_path / "grpo" / "metrics.jsonl", run_records(cov=True))
    write_jsonl(
        tmp_path / "clip_cov" / "metrics.jsonl",
        run_records(entropy=lambda s: entropy_curve(s, floor=0.5), seed=1),
    )
    runs = [str(tmp_path / "grpo"), str(tmp_path / "clip_cov")]

    assert cli(["fit", *runs, "--fit-until", "40", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = json.loads(lines[0])
    an = analyze_run(load_run(tmp_path / "grpo"), fit_until=40)
    assert first["run"] == "grpo" and first["fit"]["a"] == an.fit.a
    assert first["held_out"]["rmse"] == an.held_out.rmse and first["current_step"] == 120

    out = tmp_path / "plots"
    assert (
        cli(["plot", *runs, "--out", str(out), "--fit-until", "40", "--size", "6x4", "--dpi", "50"])
        == 0
    )
    written = sorted(p.name for p in out.iterdir())
    assert written == ["cov_grpo.png", "fit_clip_cov.png", "fit_grpo.png", "runs.png"]
    assert capsys.readouterr().out.split() == [
        str(out / n) for n in ["runs.png", "fit_grpo.png", "cov_grpo.png", "fit_clip_cov.png"]
    ]
    for name in written:
        assert _png_size(out / name) == (300, 200)

    table_path = tmp_path / "table.md"
    assert cli(["compare", *runs, "--labels", "GRPO,Clip-Cov", "--out", str(table_path)]) == 0
    printed = capsys.readouterr().out
    assert table_path.read_text() == printed and set(_table_rows(printed)) == {"GRPO", "Clip-Cov"}

    # CSV input with its own column names.
    csv_path = tmp_path / "mine.csv"
    rng = np.random.default_rng(8)
    steps, h, r = synthetic_points(20, 0.005, rng)
    csv_path.write_text(
        "step,entropy,accuracy\n"
        + "".join(
            f"{s},{float(hv)!r},{float(rv)!r}\n" for s, hv, rv in zip(steps, h, r, strict=True)
        )
    )
    assert (
        cli(
            [
                "fit",
                str(csv_path),
                "--entropy-tag",
                "entropy",
                "--accuracy-tag",
                "accuracy",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["fit"]["b"] == pytest.approx(
        fit_entropy_law(h, r).b, rel=1e-12
    )

    # Errors: one line on stderr, exit status 1.
    assert cli(["fit", str(csv_path)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: run 'mine': tag 'rollout/entropy' not found in ")
        and err.count("\n") == 1
    )
    assert cli(["fit", runs[0], runs[0]]) == 1
    assert "two runs are named 'grpo'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli(["compare", runs[0], "--plateau-fraction", "1.5"])
    assert exc.value.code == 2
