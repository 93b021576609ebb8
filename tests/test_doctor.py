"""`kimi-mlx doctor` on this CPU machine, and (through the CPU emulator) as it runs on a Mac."""

import sys
from pathlib import Path

import mlx.core as mx
from typer.testing import CliRunner

from kimi_mlx.cli import app
from kimi_mlx import doctor, moe_route
from kimi_mlx.kda import metal

sys.path.insert(0, str(Path(__file__).parent))
from metal_emu import emulate  # noqa: E402


def test_doctor_on_cpu_says_ops_paths_are_used(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)  # the kernels follow the default device
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"mlx {mx.__version__}" in out and "memory" in out
    assert "the default device is the CPU: the MLX ops paths are in use" in out
    if not mx.is_available(mx.gpu):
        assert "gpu: none" in out and "kimi-mlx[cuda]" in out
    assert "chunked  vs naive: relative error" in out and "FAILED" not in out


def test_doctor_reports_kernel_self_check_and_speed_on_metal(monkeypatch):
    """With the emulator standing in for the GPU: a self-check line per dtype and a timing line."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(doctor, "REAL_SHAPE", (2, 32, 32))
    monkeypatch.setattr(doctor, "PREFILL_T", 65)
    monkeypatch.delenv(metal.ENV_VAR, raising=False)
    metal._use_backend(metal.MetalKDA(emulate.kernel_factory("free")), available=True)
    moe_route._use_backend(moe_route.RouteKernel(emulate.kernel_factory("free"), backend="emulator"), available=True)
    try:
        lines = doctor.kernel_report()
    finally:
        metal._use_backend(None)
        moe_route._use_backend(None)
    text = "\n".join(lines)
    assert "moe route kernel (emulator) top-8 of 256: self-check passed" in text
    assert "(emulator) H=2 D=32 mlx.core.float32: self-check passed" in text
    assert "kda layer step kernel (emulator) H=2 D=32 mlx.core.bfloat16: self-check passed" in text
    assert "decode step: kernels" in text and "prefill 65: kernels" in text and "mx.fast" in text


def test_doctor_shows_a_failing_kernel(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(doctor, "REAL_SHAPE", (2, 32, 32))
    monkeypatch.delenv(metal.ENV_VAR, raising=False)
    broken = emulate.kernel_factory("free", edit=lambda name, src: src.replace("- kv * rk", "+ kv * rk"))
    metal._use_backend(metal.MetalKDA(broken), available=True)
    try:
        text = "\n".join(doctor.kernel_report())
    finally:
        metal._use_backend(None)
    assert "self-check failed" in text and "timing" not in text and "decode step" not in text
