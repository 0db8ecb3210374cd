"""Megatron checkpoints (``covrl.checkpointing``) and the conversion CLI.

One save launch at TP2 x PP2 (world 4) writes every checkpoint: tiny Hugging Face
checkpoints converted to Megatron, a training run with optimizer state, and saves made
to fail midway. Load launches at TP1, TP2, PP2 and PP2 x VPP2 read them back:
  - HF -> Megatron (TP2 x PP2) -> Megatron (other layout) -> HF must reproduce the
    original safetensors bit for bit (names, shapes, dtypes);
  - resuming training from the checkpoint must give the steps of the run that never
    stopped (loss and grad norm of the next step check the weights, the step after
    it checks the restored Adam moments, step count and lr schedule).
The CLI runs as a subprocess (plain python, one process) end to end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import TOPOLOGIES, launch
from tests.hf_fixtures import digest, make_checkpoint, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("qwen2", "llama_mqa")  # untied + q/k/v biases; tied + sharded + 1 K/V head
LOAD_TOPOLOGIES = ("tp1", "tp2", "pp2", "pp2vpp2")
BATCH, SEQ = 4, 12
SAVED_AT = 2  # training steps before the checkpoint
RESUMED = range(SAVED_AT, SAVED_AT + 2)  # steps after it, compared with the uninterrupted run
SETTINGS = dict(lr=3e-3, weight_decay=0.1, clip_grad=1.0, lr_warmup_steps=2, lr_decay_steps=6)


def _batch(vocab: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5 + step)  # a new batch each step: Adam's state matters
    return {
        "input_ids": torch.randint(0, vocab, (BATCH, SEQ), generator=g),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
    }


def _loss_fn(out, micro):
    mask = micro["attention_mask"].float()
    mask[:, 0] = 0  # the first token has no prefix
    return -(out.logp * mask).sum() / (BATCH * (SEQ - 1)), {}


def _engine(config, chunks):
    from covrl.engine import EngineConfig, OptimizerConfig, PolicyEngine

    return PolicyEngine(chunks, config, OptimizerConfig(**SETTINGS), EngineConfig())


def _steps(engine, steps: range) -> list[dict[str, float]]:
    out = []
    for step in steps:
        r = engine.train_step(_batch(engine.vocab_size, step), _loss_fn)
        out.append(dict(loss=r.loss, grad_norm=r.grad_norm, lr=r.lr))
    return out


def _draws() -> list[float]:
    """The next draw of every generator a checkpoint restores (and advances them)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():  # the TP-rank stream (dropout in TP regions)
        tracker = torch.rand(1).item()
    return [random.random(), float(np.random.rand()), torch.rand(1).item(), tracker]


def _reseed(rank: int) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(100 + rank)
    np.random.seed(100 + rank)
    tensor_parallel.model_parallel_cuda_manual_seed(777)
    torch.manual_seed(100 + rank)


def _expect_error(fn, *args, **kwargs) -> str:
    """The CheckpointError message of the call (returned, not raised, so that a launch
    goes on and the tests assert on it)."""
    from covrl.checkpointing import CheckpointError

    try:
        fn(*args, **kwargs)
    except CheckpointError as exc:
        return str(exc)
    return f"<{fn.__name__} raised no CheckpointError>"


# ---------------------------------------------------------------------------- save launch
def _save_body(ctx, hf: dict[str, Path], root: Path):
    from covrl import checkpointing as ck
    from covrl.checkpointing import save as ck_save
    from covrl.models import PolicyModelConfig, build_model, load_hf_weights

    out: dict = {}

    # 1. HF -> Megatron at TP2 x PP2.
    for name, path in hf.items():
        config = PolicyModelConfig.from_hf(path)
        chunks = build_model(config)
        load_hf_weights(chunks, config, path)
        ck.save_checkpoint(root / name, 0, chunks, config, hf_source=path)

    # 2. Errors on load: a different model config, optimizer state that is not there.
    wrong = dataclasses.replace(config, layernorm_epsilon=1e-5, num_query_groups=4)
    out["config_error"] = _expect_error(ck.load_checkpoint, root / name, chunks, wrong)
    engine = _engine(config, chunks)
    out["no_optimizer_error"] = _expect_error(
        ck.load_checkpoint, root / name, engine.model, config, optimizer=engine.optimizer
    )

    # 3. Training: one step, save with optimizer + scheduler, then continue.
    train = root / "train"
    config = PolicyModelConfig.from_hf(hf["qwen2"])
    engine = _engine(config, build_model(config))
    out["before"] = _steps(engine, range(SAVED_AT))
    ck.save_checkpoint(
        train,
        1,
        engine.model,
        config,
        optimizer=engine.optimizer,
        scheduler=engine.scheduler,  # label 1
    )
    out["draws_after_save"] = _draws()
    out["continued"] = _steps(engine, RESUMED)
    # Same layout, fresh model and optimizer: must be the same to the bit.
    resumed = _engine(config, build_model(config))
    _reseed(ctx.rank)  # a restarted process: other seeds than the run's
    out["draws_fresh_process"] = _draws()
    ck.load_checkpoint(
        train, resumed.model, config, optimizer=resumed.optimizer, scheduler=resumed.scheduler
    )
    out["draws_after_load"] = _draws()
    out["resumed_same_layout"] = _steps(resumed, RESUMED)

    # 4. Saves that fail midway (rank 0's commit raises), into the "train" root.
    def boom(*args, **kwargs):
        raise OSError("injected failure")

    def state():
        try:  # what a plain load would pick; an error is a result to assert on
            resolved = ck.resolve_checkpoint(train).name
        except ck.CheckpointError as exc:
            resolved = f"error: {exc}"
        return dict(
            tracker=ck.read_tracker(train),
            complete=ck.list_checkpoints(train),
            entries=sorted(os.listdir(train)),
            resolved=resolved,
        )

    crash: dict = {}
    save = dict(optimizer=engine.optimizer, scheduler=engine.scheduler)
    saved = (ck_save.fsync_tree, ck_save._remove_quietly, ck_save.write_text_atomic)
    try:
        # a) after all shards are written, before the rename: error on every rank,
        #    the temporary directory removed.
        ck_save.fsync_tree = boom
        crash["a_error"] = _expect_error(ck.save_checkpoint, train, 2, engine.model, config, **save)
        crash["a"] = state()
        # b) the same as a hard crash there: nothing cleans up.
        ck_save._remove_quietly = lambda path: None
        crash["b_error"] = _expect_error(ck.save_checkpoint, train, 2, engine.model, config, **save)
        crash["b"] = state()
        crash["b_explicit"] = _expect_error(ck.resolve_checkpoint, train, 2)
        # c) after the rename, before the tracker update.
        ck_save.fsync_tree, ck_save._remove_quietly, _ = saved
        ck_save.write_text_atomic = boom
        crash["c_error"] = _expect_error(ck.save_checkpoint, train, 3, engine.model, config, **save)
        crash["c"] = state()
    finally:
        ck_save.fsync_tree, ck_save._remove_quietly, ck_save.write_text_atomic = saved
    # d) the next good save removes the leftovers of b).
    ck.save_checkpoint(train, 4, engine.model, config, **save)
    crash["d"] = state()
    out["crash"] = crash
    return out


# ---------------------------------------------------------------------------- load launch
def _load_body(ctx, hf: dict[str, Path], root: Path, out_dir: Path, topo: str):
    from covrl import checkpointing as ck
    from covrl.models import PolicyModelConfig, build_model, save_hf_checkpoint

    out: dict = {}
    for name in hf:
        meta = ck.read_metadata(root / name)
        config = meta.policy_config()
        chunks = build_model(config)
        loaded = ck.load_checkpoint(root / name, chunks, config)
        assert loaded == meta
        save_hf_checkpoint(chunks, config, out_dir / f"{name}-{topo}")
        out[name] = dict(
            metadata=meta, config_matches=config == PolicyModelConfig.from_hf(hf[name])
        )

    config = PolicyModelConfig.from_hf(hf["qwen2"])

    def resume(load_optimizer: bool) -> list[dict[str, float]]:
        engine = _engine(config, build_model(config))
        ck.load_checkpoint(
            root / "train",
            engine.model,
            config,
            iteration=1,
            optimizer=engine.optimizer,
            scheduler=engine.scheduler,
            load_optimizer=load_optimizer,
        )
        return _steps(engine, RESUMED)

    out["resumed"] = resume(load_optimizer=True)
    if topo == "tp1":
        # Control: fresh Adam moments give the same next step but not the one after.
        out["fresh_adam"] = resume(load_optimizer=False)
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_checkpoint(root, name) for name in VARIANTS}


@pytest.fixture(scope="module")
def megatron_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("megatron")


@pytest.fixture(scope="module")
def saved(hf, megatron_root):
    results = launch(_save_body, hf=hf, root=megatron_root, timeout=300, **TOPOLOGIES["tp2pp2"])
    draws = ("draws_after_save", "draws_fresh_process", "draws_after_load")
    return {**results[0], "ranks": [{k: r[k] for k in draws} for r in results]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return tmp_path_factory.mktemp("exported")


@pytest.fixture(scope="module")
def loaded(hf, megatron_root, saved, exported):
    return {
        topo: launch(
            _load_body,
            hf=hf,
            root=megatron_root,
            out_dir=exported,
            topo=topo,
            timeout=300,
            **TOPOLOGIES[topo],
        )
        for topo in LOAD_TOPOLOGIES
    }


def _assert_same_checkpoint(original: Path, copy: Path) -> None:
    a, b = read_checkpoint(original), read_checkpoint(copy)
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert (b[name].shape, b[name].dtype) == (t.shape, t.dtype), name
        assert digest(b[name]) == digest(t), name


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("topo", LOAD_TOPOLOGIES)
@pytest.mark.parametrize("name", VARIANTS)
def test_hf_megatron_hf_roundtrip_is_bit_identical(hf, loaded, exported, name, topo):
    _assert_same_checkpoint(hf[name], exported / f"{name}-{topo}")


def test_checkpoint_layout_and_metadata(hf, loaded, megatron_root):
    from covrl.checkpointing import METADATA_FILENAME, TRACKER_FILENAME

    root = megatron_root / "qwen2"
    assert sorted(os.listdir(root)) == ["iter_0000000", TRACKER_FILENAME]
    assert (root / TRACKER_FILENAME).read_text() == "0\n"
    files = os.listdir(root / "iter_0000000")
    assert {METADATA_FILENAME, "metadata.json", "common.pt", ".metadata"} <= set(files)
    assert any(f.endswith(".distcp") for f in files)
    meta = loaded["tp1"][0]["qwen2"]["metadata"]
    assert meta.iteration == 0 and meta.hf_source == str(hf["qwen2"].absolute())
    assert meta.parallel == dict(
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        virtual_pipeline_model_parallel_size=None,
        data_parallel_size=1,
        world_size=4,
    )
    assert (meta.has_optimizer, meta.has_scheduler) == (False, False)
    assert all(r[name]["config_matches"] for rs in loaded.values() for r in rs for name in VARIANTS)


@pytest.mark.parametrize("topo", ["tp2pp2", *LOAD_TOPOLOGIES])
def test_resumed_training_matches_uninterrupted(saved, loaded, topo):
    ref = saved["continued"]
    runs = (
        [saved["resumed_same_layout"]] if topo == "tp2pp2" else [r["resumed"] for r in loaded[topo]]
    )
    for got in runs:
        for g, r in zip(got, ref, strict=True):
            if topo == "tp2pp2":  # same layout: same arithmetic
                assert g == r
            else:
                assert g["loss"] == pytest.approx(r["loss"], abs=1e-6, rel=1e-6)
                assert g["grad_norm"] == pytest.approx(r["grad_norm"], abs=1e-6, rel=1e-6)
                assert g["lr"] == r["lr"]


def test_resume_restores_every_rank_rng_state(saved):
    """At the saved layout every rank draws, after loading, exactly what it drew right
    after saving (Python, NumPy, torch CPU, megatron's tracker); the control shows the
    reseeded process draws something else."""
    assert len({tuple(r["draws_after_save"]) for r in saved["ranks"]}) > 1  # per-rank states
    for rank_out in saved["ranks"]:
        assert rank_out["draws_after_load"] == rank_out["draws_after_save"]
        diff = zip(rank_out["draws_fresh_process"], rank_out["draws_after_save"], strict=True)
        assert all(a != b for a, b in diff)


def test_resume_needs_the_optimizer_state(saved, loaded):
    """The comparison above can fail: with the weights and the lr schedule restored but
    fresh Adam moments, the next step is the same and the one after it is not."""
    ref, got = saved["continued"], loaded["tp1"][0]["fresh_adam"]
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], abs=1e-6)
    assert [g["lr"] for g in got] == [r["lr"] for r in ref]
    assert abs(got[1]["loss"] - ref[1]["loss"]) > 1e-3
    assert saved["before"][0]["lr"] < ref[0]["lr"]  # the warm-up schedule is in play


def test_load_errors_name_the_problem(saved, megatron_root):
    msg = saved["config_error"]
    assert str(megatron_root / "llama_mqa" / "iter_0000000" / "covrl_checkpoint.json") in msg
    assert "layernorm_epsilon: checkpoint 1e-06, model 1e-05" in msg
    assert "num_query_groups: checkpoint 1, model 4" in msg
    assert "no optimizer state" in saved["no_optimizer_error"]


def test_failed_save_leaves_previous_checkpoint(saved, megatron_root):
    crash, train = saved["crash"], megatron_root / "train"
    for case in "abc":
        assert "injected failure" in crash[f"{case}_error"]
    # a) error before the rename: nothing new, nothing left behind.
    assert crash["a"] == dict(
        tracker=1,
        complete=[1],
        entries=["iter_0000001", "latest_checkpointed_iteration.txt"],
        resolved="iter_0000001",
    )
    # b) crash before the rename: a hidden temporary directory that is not a checkpoint.
    b = crash["b"]
    assert (b["tracker"], b["complete"], b["resolved"]) == (1, [1], "iter_0000001")
    leftovers = [e for e in b["entries"] if e.startswith(".iter_0000002.tmp-")]
    assert len(leftovers) == 1 and len(b["entries"]) == 3
    assert f"{train / 'iter_0000002'}: checkpoint does not exist" in crash["b_explicit"]
    # c) crash between the rename and the tracker update: the tracker still says 1.
    c = crash["c"]
    assert (c["tracker"], c["complete"], c["resolved"]) == (1, [1, 3], "iter_0000001")
    # d) the next save completes and removes b)'s leftovers.
    assert crash["d"] == dict(
        tracker=4,
        complete=[1, 3, 4],
        entries=[
            "iter_0000001",
            "iter_0000003",
            "iter_0000004",
            "latest_checkpointed_iteration.txt",
        ],
        resolved="iter_0000004",
    )


def test_incomplete_and_missing_checkpoints_are_not_loaded(saved, megatron_root, tmp_path):
    from covrl import checkpointing as ck

    shutil.copytree(megatron_root / "qwen2" / "iter_0000000", tmp_path / "iter_0000005")
    (tmp_path / "iter_0000005" / ck.METADATA_FILENAME).unlink()  # no completion marker
    assert ck.list_checkpoints(tmp_path) == []
    msg = _expect_error(ck.resolve_checkpoint, tmp_path)
    assert str(tmp_path / ck.TRACKER_FILENAME) in msg and "no tracker" in msg
    (tmp_path / ck.TRACKER_FILENAME).write_text("5\n")
    for args in [(tmp_path,), (tmp_path, 5), (tmp_path / "iter_0000005",)]:
        msg = _expect_error(ck.resolve_checkpoint, *args)
        assert f"{tmp_path / 'iter_0000005'}: incomplete checkpoint" in msg
        assert ck.METADATA_FILENAME in msg
    assert "does not exist" in _expect_error(ck.resolve_checkpoint, tmp_path / "nowhere")
    (tmp_path / ck.TRACKER_FILENAME).write_text("five\n")
    assert "expected an iteration number" in _expect_error(ck.read_tracker, tmp_path)

    good = megatron_root / "qwen2" / "iter_0000000"
    meta = (good / ck.METADATA_FILENAME).read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(meta.replace('"format_version": 1', '"format_version": 7'))
    assert "format_version=7" in _expect_error(ck.CheckpointMetadata.from_file, bad)


# ---------------------------------------------------------------------------- CLI
def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"convert_checkpoint.py {args[0]} failed:\n{proc.stderr[-4000:]}")
    return proc


def test_cli_roundtrip(hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf["llama_mqa"], src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    proc = _cli(
        "hf-to-megatron", "--hf", str(src), "--out", str(megatron), "--tp", "1", "--pp", "1",
        "--verify",
    )  # fmt: skip
    assert "verified" in proc.stdout
    assert (megatron / "latest_checkpointed_iteration.txt").read_text() == "0\n"
    proc = _cli(
        "megatron-to-hf", "--ckpt", str(megatron), "--out", str(back), "--tp", "1", "--pp", "1",
        "--verify",
    )  # fmt: skip
    assert "verified" in proc.stdout
    _assert_same_checkpoint(src, back)
    # Tokenizer files come from the source recorded in the checkpoint.
    assert (back / "tokenizer_config.json").read_text() == '{"model_max_length": 128}\n'


def test_cli_errors_are_one_line(tmp_path):
    proc = _cli(
        "megatron-to-hf",
        "--ckpt",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "o"),
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"convert_checkpoint.py megatron-to-hf: error: {tmp_path / 'none'}: "
        "checkpoint directory does not exist"
    ]
