"""Checkpoints and conversion under faults: kills during a save, damaged files, a full
disk, the tracker, leftovers.

Kill points: during two saves (an overwrite of ``iter_0000001`` with new weights, then
a new ``iter_0000002``) every file-system change below the checkpoint root (open for
writing, mkdir, rename, replace, unlink, rmtree, in this process and in megatron-core's
forked writers) first copies the root aside: each copy is the state a SIGKILL at that
moment leaves (page cache and disk agree for a killed process). Every copy must load
(checksums verified) with exactly the old or the new weights, and the tidy-up that
starts the next save must leave only complete checkpoints. The copy taken between the
two renames of the overwrite (no ``iter_0000001``, only its ``.old`` and ``.tmp``
copies) must load the new weights and be put back in place by the next save.

A real SIGKILL lands in a 2-rank torchrun that saves in a loop: no process (agent,
ranks, checkpoint writers) may outlive it, and the root must still load.
"""

from __future__ import annotations

import builtins
import io
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from covrl.utils import checksums
from tests.fault_programs import TAG_VAR, tagged_processes
from tests.harness import launch
from tests.hf_fixtures import make_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- kill points
class KillPoints:
    """Copies ``root`` to ``out/<n>-<event>`` before each change below ``root``."""

    def __init__(self, root: Path, out: Path):
        self.root, self.out = str(root), out
        self.saved = {}

    def _under_root(self, path) -> bool:
        try:
            return os.fspath(path).startswith(self.root)
        except TypeError:
            return False

    def snapshot(self, event: str) -> None:
        name = f"{time.monotonic_ns()}-{os.getpid()}-{event}"
        try:
            shutil.copytree(self.root, self.out / name, symlinks=True)
        except (shutil.Error, FileNotFoundError):
            shutil.rmtree(self.out / name, ignore_errors=True)  # raced with a writer

    def __enter__(self):
        def wrap(owner, attr, event, check):
            original = getattr(owner, attr)
            self.saved[(owner, attr)] = original

            def hooked(*args, **kwargs):
                if args and self._under_root(args[0]) and check(args, kwargs):
                    self.snapshot(event)
                return original(*args, **kwargs)

            setattr(owner, attr, hooked)

        def writing(args, kwargs):
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            return any(c in mode for c in "wax+")

        always = lambda args, kwargs: True  # noqa: E731
        wrap(builtins, "open", "open", writing)
        wrap(io, "open", "open", writing)
        for attr in ("rename", "replace", "mkdir", "unlink", "remove"):
            wrap(os, attr, attr, always)
        wrap(shutil, "rmtree", "rmtree", always)
        return self

    def __exit__(self, *exc):
        for (owner, attr), original in self.saved.items():
            setattr(owner, attr, original)


def _param(chunks) -> torch.Tensor:
    from covrl.models import unwrap_model

    return unwrap_model(chunks[0]).embedding.word_embeddings.weight


def _kill_points_body(ctx, hf: Path, root: Path, shots: Path):
    from covrl import checkpointing as ck
    from covrl.checkpointing.save import _tidy_root
    from covrl.models import PolicyModelConfig, build_model, load_hf_weights

    config = PolicyModelConfig.from_hf(hf)
    chunks = build_model(config)
    load_hf_weights(chunks, config, hf)
    old = _param(chunks).detach().clone()
    ck.save_checkpoint(root, 1, chunks, config)
    with torch.no_grad():
        _param(chunks).add_(1.0)
    new = _param(chunks).detach().clone()
    with KillPoints(root, shots):
        ck.save_checkpoint(root, 1, chunks, config, overwrite=True)
        ck.save_checkpoint(root, 2, chunks, config)

    out: dict = {"cases": {}}
    probe = build_model(config)
    for shot in sorted(shots.iterdir(), key=lambda p: int(p.name.split("-")[0])):
        entries = sorted(os.listdir(shot))
        case: dict = {"entries": entries}
        try:
            ck.load_checkpoint(shot, probe, config)
            got = _param(probe)
            case["loaded"] = (
                "old" if torch.equal(got, old) else "new" if torch.equal(got, new) else "other"
            )
        except ck.CheckpointError as exc:
            case["loaded"] = f"error: {exc}"
        case["between_renames"] = (
            "iter_0000001" not in entries
            and any(e.startswith(".iter_0000001.old-") for e in entries)
            and any(e.startswith(".iter_0000001.tmp-") for e in entries)
        )
        if case["between_renames"]:
            # The next run: a full save, then iteration 1 must hold the new weights.
            ck.save_checkpoint(shot, 3, chunks, config)
            ck.load_checkpoint(shot, probe, config, iteration=1)
            case["iter1_after_next_save"] = "new" if torch.equal(_param(probe), new) else "old"
        else:
            _tidy_root(shot)  # what the next save does first
        case["after_tidy"] = sorted(os.listdir(shot))
        case["complete_after_tidy"] = ck.list_checkpoints(shot)
        out["cases"][shot.name] = case

    # The tracker never moves back; leftovers of killed writes are removed.
    (root / f".{ck.TRACKER_FILENAME}.tmp-deadbeef").write_text("7\n")
    ck.save_checkpoint(root, 0, chunks, config)
    out["tracker_after_older_save"] = ck.read_tracker(root)
    out["root_after_older_save"] = sorted(os.listdir(root))
    from covrl.models import save_hf_checkpoint

    export = root.parent / "export"
    (root.parent / ".export.tmp-0badf00d").mkdir()
    save_hf_checkpoint(chunks, config, export)
    out["export_siblings"] = sorted(os.listdir(root.parent))
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf"), "qwen2")


@pytest.fixture(scope="module")
def kill_points(hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill_points")
    return launch(
        _kill_points_body, world_size=1, hf=hf, root=tmp / "root", shots=tmp / "shots",
        timeout=600,
    )[0]  # fmt: skip


def test_kill_points_cover_the_save(kill_points):
    cases = kill_points["cases"]
    assert len(cases) >= 20, sorted(cases)
    assert sum(c["between_renames"] for c in cases.values()) >= 1  # the overwrite window


def test_every_kill_point_loads_old_or_new_weights(kill_points):
    bad = {
        k: c["loaded"] for k, c in kill_points["cases"].items() if c["loaded"] not in ("old", "new")
    }
    assert bad == {}


def test_interrupted_overwrite_recovers_the_new_copy(kill_points):
    for name, case in kill_points["cases"].items():
        if case["between_renames"]:
            assert case["loaded"] == "new", name
            assert case["iter1_after_next_save"] == "new", name
            assert case["complete_after_tidy"] == [1, 3], name


def test_next_save_leaves_only_complete_checkpoints(kill_points):
    from covrl.checkpointing import TRACKER_FILENAME

    for name, case in kill_points["cases"].items():
        hidden = [e for e in case["after_tidy"] if e.startswith(".")]
        assert hidden == [], name
        assert 1 in case["complete_after_tidy"], name
        iters = [e for e in case["after_tidy"] if e.startswith("iter_")]
        assert len(iters) == len(case["complete_after_tidy"]), name
        assert TRACKER_FILENAME in case["after_tidy"], name


def test_tracker_never_moves_back(kill_points):
    assert kill_points["tracker_after_older_save"] == 2
    assert kill_points["root_after_older_save"] == [
        "iter_0000000", "iter_0000001", "iter_0000002", "latest_checkpointed_iteration.txt",
    ]  # fmt: skip


def test_leftover_temporaries_are_removed(kill_points):
    assert kill_points["export_siblings"] == ["export", "root", "shots"]


# ---------------------------------------------------------------------------- damaged files
def _flip_byte(file: Path) -> None:
    """Flip one byte in the middle of the file (inside the tensor data)."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)


def _largest(directory: Path, suffix: str) -> Path:
    return max(directory.glob(f"*{suffix}"), key=lambda p: p.stat().st_size)


def _damage_body(ctx, hf: Path, root: Path):
    import torch.distributed as dist

    from covrl import checkpointing as ck
    from covrl.models import (
        PolicyModelConfig,
        build_model,
        load_hf_weights,
        save_hf_checkpoint,
    )

    config = PolicyModelConfig.from_hf(hf)
    chunks = build_model(config)
    load_hf_weights(chunks, config, hf)
    good = ck.save_checkpoint(root / "good", 0, chunks, config)
    save_hf_checkpoint(chunks, config, root / "hf_good")
    if ctx.rank == 0:
        for case, damage in (("flipped", _flip_byte), ("truncated", _truncate)):
            copy = root / case / good.name
            shutil.copytree(good, copy)
            damage(_largest(copy, ".distcp"))
        copy = root / "missing" / good.name
        shutil.copytree(good, copy)
        _largest(copy, ".distcp").unlink()
        for case, damage in (("hf_flipped", _flip_byte), ("hf_truncated", _truncate)):
            shutil.copytree(root / "hf_good", root / case)
            damage(root / case / "model.safetensors")
        # A checkpoint from elsewhere (no checksums.json) with a corrupted header.
        shutil.copytree(hf, root / "hf_header")
        with open(root / "hf_header" / "model.safetensors", "r+b") as f:
            f.write(b"\xff" * 8)  # header length: far beyond the file
    dist.barrier()

    out: dict = {}
    for case in ("flipped", "truncated", "missing"):
        out[case] = _expect_error(ck.load_checkpoint, root / case / good.name, chunks, config)
    # The opt-out reads flipped bytes silently (sizes are still checked).
    ck.load_checkpoint(root / "flipped" / good.name, chunks, config, verify=False)
    out["flipped_no_verify"] = "loaded"
    for case in ("hf_flipped", "hf_truncated", "hf_header"):
        try:
            load_hf_weights(chunks, config, root / case)
            out[case] = "<no error>"
        except ValueError as exc:
            out[case] = str(exc)
    return out


def _expect_error(fn, *args, **kwargs) -> str:
    from covrl.checkpointing import CheckpointError

    try:
        fn(*args, **kwargs)
    except CheckpointError as exc:
        return str(exc)
    return "<no error>"


@pytest.fixture(scope="module")
def damaged(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    return root, launch(_damage_body, world_size=2, tp=2, hf=hf, root=root, timeout=600)


def test_damaged_megatron_files_are_named_on_every_rank(damaged):
    root, results = damaged
    for rank, out in enumerate(results):
        assert "sha256 mismatch, the file is corrupted" in out["flipped"], (rank, out["flipped"])
        assert "(truncated or overwritten)" in out["truncated"], (rank, out["truncated"])
        assert "missing (listed in checksums.json)" in out["missing"], (rank, out["missing"])
        for case in ("flipped", "truncated", "missing"):
            assert f"{root / case / 'iter_0000000'}/__" in out[case], (rank, out[case])
            assert ".distcp" in out[case] and "\n" not in out[case]
        assert out["flipped_no_verify"] == "loaded"


def test_damaged_hf_files_are_named(damaged):
    root, results = damaged
    for out in results:
        assert f"{root / 'hf_flipped' / 'model.safetensors'}: sha256 mismatch" in out["hf_flipped"]
        assert f"{root / 'hf_truncated' / 'model.safetensors'}: " in out["hf_truncated"]
        assert "(truncated or overwritten)" in out["hf_truncated"]
        header = out["hf_header"]
        assert f"{root / 'hf_header' / 'model.safetensors'}: not a readable safetensors" in header


# ---------------------------------------------------------------------------- full disk
@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """An 8 MiB tmpfs (root can mount one); skipped where the machine cannot."""
    mount = tmp_path_factory.mktemp("tmpfs")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves about ``leave`` bytes free."""
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    with open(ballast, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def _disk_body(ctx, hf: Path, disk: Path):
    from covrl import checkpointing as ck
    from covrl.checkpointing import save as ck_save
    from covrl.models import PolicyModelConfig, build_model, load_hf_weights, save_hf_checkpoint

    config = PolicyModelConfig.from_hf(hf)
    chunks = build_model(config)
    load_hf_weights(chunks, config, hf)
    root = disk / "ckpt"
    ck.save_checkpoint(root, 1, chunks, config)
    ballast = _fill(disk, leave=200 * 1024)
    out = {"free": shutil.disk_usage(disk).free}

    def state():
        return dict(tracker=ck.read_tracker(root), entries=sorted(os.listdir(root)))

    out["preflight"] = _expect_error(ck.save_checkpoint, root, 2, chunks, config)
    out["preflight_state"] = state()
    # Space that vanishes during the write (another writer): megatron-core's writer fails.
    saved = ck_save._check_free_space
    ck_save._check_free_space = lambda *args: None
    try:
        out["midway"] = _expect_error(ck.save_checkpoint, root, 2, chunks, config)
    finally:
        ck_save._check_free_space = saved
    out["midway_state"] = state()
    try:
        save_hf_checkpoint(chunks, config, disk / "hf")
        out["hf"] = "<no error>"
    except RuntimeError as exc:
        out["hf"] = str(exc)
    out["disk_entries"] = sorted(os.listdir(disk))
    ballast.unlink()
    ck.save_checkpoint(root, 2, chunks, config)  # space again: works
    out["after"] = state()
    return out


def test_full_disk_is_named_and_leaves_nothing(hf, small_disk):
    out = launch(_disk_body, world_size=1, hf=hf, disk=small_disk, timeout=600)[0]
    root = small_disk / "ckpt"
    assert out["free"] < 300 * 1024
    kept = dict(tracker=1, entries=["iter_0000001", "latest_checkpointed_iteration.txt"])
    for case in ("preflight", "midway"):
        assert out[case].startswith(f"saving checkpoint {root / 'iter_0000002'} failed: "), out[
            case
        ]
        assert f"no space left on the device of {root}" in out[case], out[case]
        assert out[f"{case}_state"] == kept
    assert "the checkpoint needs about" in out["preflight"]
    assert f"saving Hugging Face checkpoint to {small_disk / 'hf'} failed" in out["hf"]
    assert "no space left on the device" in out["hf"]
    assert out["disk_entries"] == ["ballast", "ckpt"]
    assert out["after"]["tracker"] == 2


# ---------------------------------------------------------------------------- the CLI
def _cli(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launcher, str(REPO / "tools" / "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("convert_checkpoint.py ")]


def test_cli_malformed_config_names_the_file(hf, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf, src)
    (src / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64,')
    proc = _cli("hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    [line] = _error_lines(proc)
    assert line.startswith(f"convert_checkpoint.py hf-to-megatron: error: {src / 'config.json'}: ")


def test_cli_verify_names_the_corrupted_file(damaged):
    root, _ = damaged
    proc = _cli("verify", str(root / "hf_flipped"))
    assert proc.returncode == 1
    [line] = _error_lines(proc)
    assert f"{root / 'hf_flipped' / 'model.safetensors'}: sha256 mismatch" in line
    assert checksums.verify_directory(root / "good" / "iter_0000000") > 0  # the undamaged one


def test_cli_missing_shard_is_one_line_on_every_rank(damaged, tmp_path):
    root, _ = damaged
    ckpt = root / "missing" / "iter_0000000"
    proc = _cli(
        "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--tp", "2", nproc=2
    )
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert sorted(line.split("] ")[0] for line in lines) == [
        "convert_checkpoint.py megatron-to-hf: error: [rank 0",
        "convert_checkpoint.py megatron-to-hf: error: [rank 1",
    ], proc.stderr[-3000:]
    for line in lines:
        assert f"{ckpt}/__" in line and ".distcp: missing (listed in checksums.json)" in line


# ---------------------------------------------------------------------------- real SIGKILL


def _start_saver(tmp: Path, hf: Path, name: str, torchrun: bool):
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({TAG_VAR: tag, "OMP_NUM_THREADS": "1"})
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    log = tmp / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [*launcher, str(REPO / "tests" / "fault_programs.py"), "saver", str(tmp / name), str(hf)],
            env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return proc, tag, log


def _saving_rank0(proc: subprocess.Popen) -> psutil.Process:
    """The rank-0 process (the saver itself, or its torchrun worker)."""
    top = psutil.Process(proc.pid)
    for p in [top, *top.children(recursive=True)]:
        env = p.environ()
        if env.get("RANK", "0") == "0" and "fault_programs.py" in " ".join(p.cmdline()):
            if "TORCHELASTIC_RUN_ID" in env or p.pid == proc.pid:
                return p
    raise AssertionError("no rank-0 saver process")


@pytest.fixture(scope="module")
def killed_savers(hf, tmp_path_factory):
    """A plain-python saver and a 2-rank torchrun saver, each SIGKILLed (rank 0) in the
    middle of its third save or later; returns what was left and when."""
    from covrl import checkpointing as ck

    tmp = tmp_path_factory.mktemp("savers")
    runs = {name: _start_saver(tmp, hf, name, name == "torchrun") for name in ("plain", "torchrun")}
    out = {}
    try:
        deadline = time.monotonic() + 300
        pending = set(runs)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                proc, tag, log = runs[name]
                assert proc.poll() is None, log.read_text()[-3000:]
                if "saved 2" in log.read_text():
                    victim = _saving_rank0(proc)
                    time.sleep(0.05 + 0.3 * random.random())  # somewhere inside a save
                    victim.kill()
                    killed = time.monotonic()
                    while tagged_processes(tag) and time.monotonic() - killed < 60:
                        time.sleep(0.2)
                    left = [" ".join(p.cmdline())[:200] for p in tagged_processes(tag)]
                    proc.wait(timeout=60)
                    out[name] = dict(
                        left=left,
                        gone_after_s=time.monotonic() - killed,
                        rc=proc.returncode,
                        resolved=ck.resolve_checkpoint(tmp / name).name,
                        verified=checksums.verify_directory(ck.resolve_checkpoint(tmp / name)),
                    )
                    pending.discard(name)
            time.sleep(0.1)
        assert not pending, {n: runs[n][2].read_text()[-2000:] for n in pending}
        return out
    finally:
        for proc, tag, _ in runs.values():
            for p in tagged_processes(tag):
                p.kill()
            proc.wait(timeout=30)


@pytest.mark.parametrize("name", ["plain", "torchrun"])
def test_sigkill_during_save_leaves_no_process_and_a_loadable_checkpoint(killed_savers, name):
    run = killed_savers[name]
    print(f"{name}: every process gone {run['gone_after_s']:.1f} s after the SIGKILL")
    assert run["left"] == []
    assert run["gone_after_s"] < 30
    assert run["rc"] != 0
    assert run["resolved"] == "iter_0000001" and run["verified"] > 0


# ---------------------------------------------------------------------------- one rank fails
def _one_rank_fails_body(ctx, hf: Path, root: Path):
    from megatron.core import dist_checkpointing

    from covrl import checkpointing as ck
    from covrl.models import PolicyModelConfig, build_model

    config = PolicyModelConfig.from_hf(hf)
    chunks = build_model(config)
    if ctx.rank == 1:  # its writer fails; rank 0 finishes its part and waits in the barrier

        def failing_save(*args, **kwargs):
            raise OSError(28, "No space left on device (injected)")

        dist_checkpointing.save = failing_save
    ck.save_checkpoint(root, 1, chunks, config)
    return "saved"


def test_a_save_failing_on_one_rank_ends_the_job_on_every_rank(hf, tmp_path):
    """Rank 1 fails inside the collective writer while rank 0 waits in megatron-core's
    barrier: rank 1 publishes the cause, and rank 0 does not wait for the collective
    timeout (it exits with code 75, or fails at once on the closed connection)."""
    from covrl.parallel import PEER_LOST_EXIT_CODE
    from tests.harness import DistributedTestError

    start = time.monotonic()
    with pytest.raises(DistributedTestError) as failure:
        launch(_one_rank_fails_body, world_size=2, tp=2, hf=hf, root=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert "--- rank 0 ---" in message and "timed out" not in message, message
    rank0, rank1 = message.split("--- rank 0 ---")[1].split("--- rank 1 ---")
    assert "No space left on device (injected)" in rank1 or str(PEER_LOST_EXIT_CODE) in rank1
    # Rank 0 learns it from the abort (code 75) or, on one host, from the closed socket.
    assert f"exited with code {PEER_LOST_EXIT_CODE}" in rank0 or (
        f"saving checkpoint {tmp_path / 'iter_0000001'} failed" in rank0
    ), rank0
    assert elapsed < 60
    assert not any(p.name.startswith(".iter_") for p in tmp_path.iterdir())
