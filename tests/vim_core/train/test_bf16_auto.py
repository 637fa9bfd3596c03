"""train.bf16: auto turns autocast on exactly where bf16 matmuls are native, and the metrics say what ran.

On a CPU without AVX-512 bf16 is emulated and 12-20x slower than fp32, so auto must stay off there; with
AVX-512 BF16 or AMX it is on. The host's kind varies, so the flag set is given where the rule is tested,
and a real trainer run checks the recorded dtype against this host's own /proc/cpuinfo.
"""

from pathlib import Path

import pytest
import torch

from tests.vim_core.train.test_trainer_run import _params
from vim_core.config import parse_params
from vim_core.errors import ConfigError
from vim_core.train import loop
from vim_core.train.transformer_trainer import train_transformer


def _matmul_dtype(bf16) -> torch.dtype:
    a = torch.randn(8, 8)
    with loop.autocast_context("cpu", bf16):
        return (a @ a).dtype


def test_auto_is_on_only_with_a_native_bf16_flag(monkeypatch):
    monkeypatch.setattr(loop, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})  # AVX-512 without BF16
    assert not loop.uses_bf16("cpu", "auto") and _matmul_dtype("auto") == torch.float32
    assert _matmul_dtype(True) == torch.bfloat16  # an explicit true is obeyed anywhere
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(loop, "cpu_flags", lambda flag=flag: {"avx512f", flag})
        assert loop.uses_bf16("cpu", "auto") and _matmul_dtype("auto") == torch.bfloat16
        assert _matmul_dtype(False) == torch.float32
    if not torch.cuda.is_available():
        assert not loop.native_bf16("cuda")


def test_cpu_flags_are_this_hosts():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = loop.cpu_flags()
    assert ("avx512_bf16" in flags) == (" avx512_bf16" in text)
    assert loop.native_bf16("cpu") == any(f" {f}" in text for f in ("avx512_bf16", "amx_bf16"))


def test_the_setting_accepts_true_false_and_auto_only(stage2, tmp_path):
    for value in (True, False, "auto"):
        raw = _params(stage2, tmp_path, "transformer", bf16=value)
        assert parse_params(raw).transformer.train.bf16 == value
    with pytest.raises(ConfigError, match="bf16"):
        parse_params(_params(stage2, tmp_path, "transformer", bf16="fast"))


def test_a_real_run_records_the_dtype_auto_chose(stage2, tmp_path):
    raw = _params(stage2, tmp_path, "transformer", steps=6, bf16="auto")
    metrics = train_transformer(parse_params(raw).transformer, seed=0).metrics
    assert metrics["autocast"] == ("bf16" if loop.native_bf16("cpu") else "fp32")
    raw = _params(stage2, tmp_path / "off", "transformer", steps=6, bf16=False)
    assert train_transformer(parse_params(raw).transformer, seed=0).metrics["autocast"] == "fp32"
