"""examples/: every config loads and validates; the Qwen2.5 recipes carry the paper's
values (typed here from the paper's recipe, not read from the code) and fit their
Slurm layout; the Slurm dry run prints the plan."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from covrl.config import load_config
from covrl.scaling import Layout, estimate_memory, model_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
RECIPES = [p for p in EXAMPLES if p.name.startswith("qwen2.5-")]

# The paper's training setup (Cui et al., 2025, Sec. "Experiments"; the brief's table):
# GRPO advantages over 8 responses, 256 prompts per rollout batch, mini-batches of 32
# prompts, lr 1e-6 constant, grad clip 1.0, no reference KL, no entropy bonus,
# responses of 8192 tokens at temperature 1.0, token-mean loss, dynamic sampling.
COMMON = {
    "algorithm.advantage.estimator": "grpo",
    "algorithm.advantage.dynamic_sampling": True,
    "sampling.n": 8,
    "data.train_batch_size": 256,
    "algorithm.ppo_mini_batch_size": 32,
    "policy.optim.lr": 1e-6,
    "policy.optim.lr_decay_style": "constant",
    "policy.optim.clip_grad": 1.0,
    "policy.loss.kl_coeff": 0.0,
    "policy.loss.entropy_coeff": 0.0,
    "sampling.max_tokens": 8192,
    "sampling.temperature": 1.0,
    "policy.loss.loss_agg_mode": "token-mean",
}
# Method-defining values: Clip-Cov r = 2e-4, omega in (1, 5), clip range 1/1 in the
# paper's runs; KL-Cov k = 2e-3 (7B) / 2e-4 (32B), beta = 1; clip-higher 0.2 / 0.28.
METHODS = {
    "grpo": {"method": "none", "clip_ratio_low": 0.2, "clip_ratio_high": 0.2},
    "clip_higher": {"method": "none", "clip_ratio_low": 0.2, "clip_ratio_high": 0.28},
    "clip_cov": {
        "method": "clip_cov", "clip_ratio_low": 1.0, "clip_ratio_high": 1.0,
        "clip_cov.ratio": 2e-4, "clip_cov.omega_low": 1.0, "clip_cov.omega_high": 5.0,
    },
    "kl_cov": {"method": "kl_cov", "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
               "kl_cov.beta": 1.0},
}  # fmt: skip
KL_COV_RATIO = {"7b": 2e-3, "32b": 2e-4}
# The Slurm scripts' allocation: 4 nodes x 8 GPUs.
WORLD = 32


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_method_and_size_has_an_example():
    names = {p.stem for p in RECIPES}
    assert names == {f"qwen2.5-{s}_{m}" for s in KL_COV_RATIO for m in METHODS}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.warnings() == []
    if path in RECIPES:
        assert cfg.check_layout(WORLD) == WORLD // (cfg.policy.tp * cfg.policy.pp)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_values_match_the_paper(path):
    cfg = load_config(path)
    size, method = re.fullmatch(r"qwen2\.5-(\d+b)_(\w+)", path.stem).groups()
    for key, value in COMMON.items():
        assert _get(cfg, key) == value, key
    loss = cfg.policy.loss
    expected = dict(METHODS[method])
    if method == "kl_cov":
        expected["kl_cov.ratio"] = KL_COV_RATIO[size]
    for key, value in expected.items():
        where = loss if key.startswith("clip_ratio") else loss.entropy_control
        assert _get(where, key) == pytest.approx(value), key
    # The recipe's rollout: 2048-token prompts; vLLM TP=2 as in the paper's scripts for
    # 7B, TP=4 for 32B as in verl's DAPO 32B script (docs/scaling.md says why).
    assert cfg.data.max_prompt_length == 2048
    assert cfg.rollout.tensor_parallel_size == {"7b": 2, "32b": 4}[size]
    assert cfg.rollout.max_model_len == 2048 + 8192


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_fits_80gb_gpus(path):
    cfg = load_config(path)
    layout = Layout.of_run(cfg, nodes=4, gpus_per_node=8)
    # Packed micro-batches hold at least one full-length sequence.
    longest = cfg.data.max_prompt_length + cfg.sampling.max_tokens
    assert cfg.policy.engine.max_tokens_per_micro_batch >= longest
    est = estimate_memory(model_config(cfg.policy.model_path), layout)
    assert est.fits, est.table()


def _dry_run(home: Path, path: str, **extra: str) -> subprocess.CompletedProcess:
    """`COVRL_DRY_RUN=1 bash slurm/train_32b.sh` from ``home`` outside Slurm, with
    ``PATH`` and no other Slurm or covrl variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "COVRL_"))}
    env.update(COVRL_DRY_RUN="1", PATH=path, **extra)
    return subprocess.run(
        ["bash", "slurm/train_32b.sh", "policy.optim.lr=5e-7"],
        cwd=home, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _checkout_without_venv(tmp_path: Path) -> Path:
    """A checkout of the launcher, the recipes and the package, without a ``.venv``."""
    home = tmp_path / "checkout"
    home.mkdir()
    for name in ("slurm", "examples", "covrl"):
        (home / name).symlink_to(REPO / name)
    return home


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def test_dry_run_prints_layout_commands_and_memory():
    """`COVRL_DRY_RUN=1 bash slurm/train_32b.sh` outside Slurm: the scripts' defaults."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = _dry_run(REPO, path, COVRL_PYTHON=sys.executable)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "4 node(s) x 8 rank(s)" in out
    # torchrun: the checkout's .venv/bin/torchrun when it has one, else PATH's.
    commands = re.findall(r"^  \[node\d\] (\S*torchrun .*)$", out, re.M)
    assert len(commands) == 4 and len(set(commands)) == 1  # c10d: the same on every node
    assert "--nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:" in commands[0]
    assert (
        commands[0]
        .rstrip()
        .endswith(
            "-m covrl.training.cli --config examples/qwen2.5-32b_kl_cov.yaml --resume auto "
            f"trainer.run_dir={REPO}/outputs/covrl-dryrun policy.optim.lr=5e-7"
        )
    )
    assert "layout: 4 nodes x 8 GPUs = 32; train TP=8 PP=2 DP=2; vLLM TP=4 (8 replicas)" in out
    assert "packed micro-batches of up to 20480 tokens" in out
    assert "distributed optimizer, sequence parallel" in out
    for term in ("weights (bf16)", "gradients", "optimizer", "activations", "KV cache"):
        assert term in out
    assert re.search(r"^  fits\s+yes$", out, re.M)


def test_dry_run_uses_the_checkouts_venv_without_activation(tmp_path):
    """As the README shows it, with no environment activated: a checkout with a
    ``.venv`` runs its python and torchrun; one without says in one line what to do."""
    home = _checkout_without_venv(tmp_path)
    bare = f"{tmp_path / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    # PATH's python3 has no site-packages: it cannot import covrl's dependencies.
    _executable(tmp_path / "bin" / "python3", f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')

    proc = _dry_run(home, bare)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "python3: ModuleNotFoundError: No module named" in lines[0], lines[0]
    assert "make install" in lines[0] and "COVRL_PYTHON" in lines[0], lines[0]

    venv = home / ".venv" / "bin"
    _executable(venv / "python", f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    _executable(venv / "torchrun", "#!/bin/sh\nexit 1\n")
    proc = _dry_run(home, bare)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[node0] {venv / 'torchrun'} --nnodes=4" in proc.stdout
    assert "layout: 4 nodes x 8 GPUs = 32" in proc.stdout
