"""The run config: YAML + dotted overrides -> typed dataclasses, errors naming the key."""

from __future__ import annotations

import pytest

from covrl.algorithms import EntropyTargetConfig, PolicyLossConfig
from covrl.config import ConfigError, RunConfig, load_config, save_config, to_yaml
from covrl.training.cli import main

REQUIRED = ["policy.model_path=/m", "data.train_files=[a.parquet]", "trainer.run_dir=/r"]


def _write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_typed(tmp_path):
    path = _write(
        tmp_path,
        """
policy:
  model_path: /models/x
  tp: 2
  loss:
    clip_ratio_high: 0.28
    entropy_control:
      method: kl_cov
      cov_top_fractions: [0.01, 0.1]
data:
  train_files: [a.parquet, b.parquet]
trainer:
  run_dir: runs/x
""",
    )
    c = load_config(
        path, ["policy.tp=4", "sampling.n=8", "policy.loss.entropy_control.kl_cov.beta=5"]
    )
    assert isinstance(c, RunConfig) and isinstance(c.policy.loss, PolicyLossConfig)
    assert c.policy.tp == 4  # the override wins over the file
    assert c.policy.parallel().tensor_model_parallel_size == 4
    assert c.policy.loss.clip_ratio_high == 0.28
    assert c.policy.loss.entropy_control.kl_cov.beta == 5.0
    assert c.policy.loss.entropy_control.cov_top_fractions == (0.01, 0.1)  # tuple again
    assert c.data.train_files == ["a.parquet", "b.parquet"]
    assert c.sampling.n == 8


def test_saved_config_loads_back_identical(tmp_path):
    c = load_config(
        None, [*REQUIRED, "policy.loss.entropy_control.method=clip_cov", "reward.sources={a: m:f}"]
    )
    path = save_config(c, tmp_path)
    assert load_config(path) == c


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["trainer.bogus=1"], "unknown key trainer.bogus"),
        (["policy.loss.no_such=1"], "unknown key policy.loss.no_such"),
        (["policy.tp=two"], "policy.tp"),
        (["policy.loss.entropy_control.method=kl"], "policy.loss.entropy_control.method"),
        (["policy.loss.entropy_control.clip_cov.ratio=2"], "clip_cov.ratio=2.0"),
        (["policy.dtype=fp8"], "policy: dtype='fp8'"),
        (["sampling.n=0"], "sampling: n=0: expected an integer >= 1"),
        (["algorithm.ppo_epochs=0"], "algorithm: ppo_mini_batch_size=32 and ppo_epochs=0"),
        (["policy.engine.micro_batch_size=0"], "policy.engine: micro_batch_size=0: expected"),
        (
            ["policy.optim.lr_decay_style=cosin"],
            "policy.optim: lr_decay_style='cosin': expected one of constant, linear, cosine",
        ),
        (["policy.optim.adam_beta2=1"], "policy.optim: adam_beta2=1.0: expected a value in [0, 1)"),
        (["policy.tp=0"], "policy: tp=0, pp=1, vpp=None: tensor_model_parallel_size=0"),
        (["rollout.log_level=LOUD"], "rollout: log_level='LOUD': expected one of DEBUG"),
        (["algorithm.rollout_correction.mode=is"], "algorithm.rollout_correction: mode='is'"),
        (["trainer.setup_timeout_s=0"], "trainer: setup_timeout_s=0.0"),
        (["sampling.temperature=0"], "sampling.temperature=0.0: expected a value > 0"),
        (["policy.tp"], "expected key.sub=value"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*REQUIRED, *overrides])
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_required_keys_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="policy.model_path is required"):
        load_config(None, ["data.train_files=[a]", "trainer.run_dir=/r"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(_write(tmp_path, "policy: [unclosed\n"))
    with pytest.raises(ConfigError, match="unknown key polciy"):
        load_config(_write(tmp_path, "polciy:\n  tp: 2\n"))


_TARGET = "policy.loss.entropy_control.target"


def test_entropy_target_from_overrides_and_yaml(tmp_path):
    assert load_config(None, REQUIRED).policy.loss.entropy_control.target is None
    c = load_config(
        None, [*REQUIRED, "policy.loss.entropy_control.method=kl_cov", f"{_TARGET}.value=0.3"]
    )
    assert c.policy.loss.entropy_control.target == EntropyTargetConfig(value=0.3)
    scheduled = [
        *REQUIRED,
        "policy.loss.entropy_control.method=kl_cov",
        f"{_TARGET}.schedule=cosine",
        f"{_TARGET}.start=0.6",
        f"{_TARGET}.end=0.25",
        f"{_TARGET}.steps=100",
        f"{_TARGET}.knob=beta",
        f"{_TARGET}.knob_max=20",
    ]
    c = load_config(None, scheduled)
    target = c.policy.loss.entropy_control.target
    assert (target.schedule, target.steps, target.knob_bounds) == ("cosine", 100, (0.01, 20.0))
    assert target.target_at(51) == pytest.approx(0.425)
    assert load_config(save_config(c, tmp_path)) == c
    path = _write(
        tmp_path,
        """
policy:
  model_path: /m
  loss:
    entropy_control:
      method: clip_cov
      target: {value: 0.2, knob_min: 1.0e-4, knob_max: 0.01}
data: {train_files: [a.parquet]}
trainer: {run_dir: /r}
""",
    )
    assert load_config(path).policy.loss.entropy_control.target.knob_bounds == (1e-4, 0.01)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ([f"{_TARGET}.value=0.3"], "policy.loss.entropy_control: entropy_control.target needs"),
        (["KL", f"{_TARGET}.value=-1"], "policy.loss.entropy_control.target: target.value=-1.0"),
        (["KL", f"{_TARGET}.value=high"], f"{_TARGET}.value"),
        (["KL", f"{_TARGET}.schedule=exp"], f"{_TARGET}.schedule"),
        (["KL", f"{_TARGET}.schedule=linear", f"{_TARGET}.start=0.5"], "target.end=None"),
        (["KL", f"{_TARGET}.steps=2.5"], f"{_TARGET}.steps"),
        (["KL", f"{_TARGET}.value=0.3", f"{_TARGET}.knob_max=2"], "target.knob_max=2.0"),
        (["KL", f"{_TARGET}.no_such=1"], f"unknown key {_TARGET}.no_such"),
        (
            [
                f"{_TARGET}.value=0.3",
                "policy.loss.entropy_control.method=clip_cov",
                f"{_TARGET}.knob=beta",
            ],
            "knob='beta' drives KL-Cov's beta",
        ),
    ],
)
def test_entropy_target_bad_values_name_the_key(overrides, needle):
    overrides = ["policy.loss.entropy_control.method=kl_cov" if o == "KL" else o for o in overrides]
    with pytest.raises(ConfigError) as info:
        load_config(None, [*REQUIRED, *overrides])
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_temperature_is_set_once(tmp_path):
    """The engine's temperature is sampling.temperature; a config that sets it for the
    engine as well is told where it lives."""
    c = load_config(None, [*REQUIRED, "sampling.temperature=0.7"])
    assert c.engine_config().temperature == 0.7
    assert "temperature" not in to_yaml(c).split("sampling:")[0]
    for source in (
        ["policy.engine.temperature=0.7"],
        _write(tmp_path, "policy:\n  engine:\n    temperature: 1.0\n"),
    ):
        path, overrides = (None, source) if isinstance(source, list) else (source, [])
        with pytest.raises(ConfigError) as info:
            load_config(path, [*REQUIRED, *overrides])
        message = str(info.value)
        assert "policy.engine.temperature is not a setting" in message, message
        assert "set sampling.temperature instead" in message, message


def test_library_configs_check_on_construction():
    """The sections are the library's own configs: a bad value fails when built."""
    from covrl.engine import EngineConfig, OptimizerConfig
    from covrl.parallel import DistributedTimeouts, ParallelConfig
    from covrl.rollout import RolloutConfig, SamplingConfig

    cases = [
        (lambda: EngineConfig(temperature=0.0), "temperature=0.0: expected a value > 0"),
        (lambda: EngineConfig(logprob_chunk_size=0), "logprob_chunk_size=0: expected"),
        (lambda: OptimizerConfig(lr=-1.0), "lr=-1.0: expected a value >= 0"),
        (lambda: OptimizerConfig(lr=float("nan")), "lr=nan: expected a value >= 0"),
        (lambda: OptimizerConfig(clip_grad=-1.0), "clip_grad=-1.0: expected a value >= 0"),
        (lambda: OptimizerConfig(lr_decay_style="WSD"), "lr_decay_style='WSD': expected"),
        (lambda: ParallelConfig(2, 1, 2), "virtual_pipeline_model_parallel_size=2: expected"),
        (lambda: DistributedTimeouts(collective_s=0), "collective_s=0: expected a value > 0"),
        (lambda: RolloutConfig(gpu_memory_utilization=1.5), "gpu_memory_utilization=1.5"),
        (lambda: SamplingConfig(top_k=0), "top_k=0: expected -1 (off) or an integer >= 1"),
    ]
    for build, needle in cases:
        with pytest.raises(ValueError) as info:
            build()
        assert needle in str(info.value), str(info.value)
    assert SamplingConfig(temperature=0.0).temperature == 0.0  # greedy decoding
    with pytest.raises(ValueError, match="must divide the world size 6"):
        RolloutConfig(tensor_parallel_size=4).check_world_size(6)
    with pytest.raises(ValueError, match="not divisible"):
        ParallelConfig(2, 2).check_world_size(6)
    assert ParallelConfig(2, 2).data_parallel_size(8) == 2


def test_layout_checks_and_warnings():
    c = load_config(None, [*REQUIRED, "data.train_batch_size=8", "algorithm.ppo_mini_batch_size=3"])
    with pytest.raises(ConfigError, match="multiple of algorithm.ppo_mini_batch_size=3"):
        c.check_layout(1)
    c = load_config(
        None,
        [
            *REQUIRED,
            "data.train_batch_size=2",
            "algorithm.ppo_mini_batch_size=1",
            "sampling.n=3",
            "policy.engine.micro_batch_size=2",
        ],
    )
    with pytest.raises(ConfigError, match="split evenly"):
        c.check_layout(1)
    c = load_config(None, [*REQUIRED, "policy.tp=2"])
    with pytest.raises(ConfigError, match="not divisible"):
        c.check_layout(3)
    assert c.check_layout(4) == 2
    on_policy = load_config(
        None,
        [*REQUIRED, "policy.loss.entropy_control.method=kl_cov", "data.train_batch_size=32"],
    )
    assert any("fully on-policy" in w for w in on_policy.warnings())
    off_policy = load_config(None, [*REQUIRED, "policy.loss.entropy_control.method=kl_cov"])
    assert off_policy.warnings() == []


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["--resume", "none", *REQUIRED, "trainer.bogus=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key trainer.bogus" in err[0]
