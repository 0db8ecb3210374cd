"""``policy.transformer_impl``: Transformer Engine is required on CUDA, the local spec is
the explicit opt-out, and a missing or broken Transformer Engine is a clear error."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import pytest

from covrl.config import ConfigError, load_config
from covrl.models import TransformerEngineUnavailable, resolve_transformer_impl


def test_auto_is_local_on_cpu_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_transformer_impl("auto", cuda=False) == "local"
        assert resolve_transformer_impl("local", cuda=False) == "local"


@pytest.mark.parametrize("impl", ["auto", "transformer_engine"])
def test_missing_transformer_engine_on_cuda_is_an_error(impl):
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(TransformerEngineUnavailable) as info:
        resolve_transformer_impl(impl, cuda=True)
    message = str(info.value)
    # The exception as raised.
    assert "ModuleNotFoundError: No module named 'transformer_engine'" in message
    assert "pip install --no-build-isolation 'transformer-engine[pytorch" in message
    assert "-c constraints/gpu-" in message
    assert "policy.transformer_impl=local" in message  # the opt-out
    assert "\n" not in message


def test_broken_transformer_engine_names_the_exception(monkeypatch):
    """A TE build that does not match torch fails while loading its extension."""
    broken = types.ModuleType("transformer_engine")
    broken.__path__ = []  # a package, so that the submodule import is attempted
    monkeypatch.setitem(sys.modules, "transformer_engine", broken)

    class Loader:
        def find_spec(self, name, path=None, target=None):
            if name == "transformer_engine.pytorch":
                raise OSError(
                    "transformer_engine_torch.so: undefined symbol: _ZN3c104cuda9SetDevice"
                )
            return None

    monkeypatch.setattr(sys, "meta_path", [Loader(), *sys.meta_path])
    with pytest.raises(TransformerEngineUnavailable, match="OSError: .*undefined symbol"):
        resolve_transformer_impl("auto", cuda=True)


def test_local_on_cuda_is_the_opt_out_with_a_memory_warning():
    with pytest.warns(UserWarning, match=r"unfused attention .* seq, seq"):
        assert resolve_transformer_impl("local", cuda=True) == "local"


def test_transformer_engine_on_cpu_and_unknown_values_are_errors():
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_transformer_impl("transformer_engine", cuda=False)
    with pytest.raises(ValueError, match="transformer_impl='fused'"):
        resolve_transformer_impl("fused", cuda=False)


def test_config_field_is_checked():
    base = ["policy.model_path=m", "data.train_files=[t]", "trainer.run_dir=r"]
    assert load_config(None, base).policy.transformer_impl == "auto"
    assert load_config(None, [*base, "policy.transformer_impl=local"]).policy.transformer_impl == (
        "local"
    )
    with pytest.raises(ConfigError, match="policy: transformer_impl='fused'"):
        load_config(None, [*base, "policy.transformer_impl=fused"])


def test_convert_tool_takes_the_layer_spec(tmp_path):
    """``--transformer-impl`` reaches the model build: TE on a CPU-only machine is a
    one-line error before anything is converted."""
    import os
    import subprocess
    from pathlib import Path

    from tests.hf_fixtures import make_checkpoint

    repo = Path(__file__).resolve().parents[1]
    hf = make_checkpoint(tmp_path, "qwen2")
    proc = subprocess.run(
        [
            sys.executable,
            str(repo / "tools" / "convert_checkpoint.py"),
            "hf-to-megatron",
            "--hf",
            str(hf),
            "--out",
            str(tmp_path / "out"),
            "--transformer-impl",
            "transformer_engine",
        ],
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "transformer_impl=transformer_engine needs CUDA" in lines[-1]
    assert not (tmp_path / "out").exists()
