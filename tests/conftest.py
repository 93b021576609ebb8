"""Session fixtures: tiny reference checkpoints built once per test session.

Each `ref*` fixture is a `reference.ReferenceCase` (folder, config dict, the
transformers model read back from the folder). They skip cleanly when torch or
transformers are not installed (both are test-only dependencies).
"""

from __future__ import annotations

import os

import pytest

# GPU mode: KIMI_MLX_TEST_DEVICE=gpu runs the suite with MLX's GPU (CUDA or Metal) as the default
# device, =cpu on the CPU; unset, MLX's own default. CI runs the CPU suite (mlx[cpu]); a session
# with a GPU runs e.g. `KIMI_MLX_TEST_DEVICE=gpu MLX_ENABLE_TF32=0 pytest tests/test_parity.py`
# (TF32 off for suites that compare fp32 models, whose every projection is an fp32 GEMM) and
# `KIMI_MLX_TEST_DEVICE=gpu pytest tests/test_kda.py tests/test_precision.py` (TF32 on: the
# paths that must stay fp32 keep it by themselves, kimi_mlx/precision.py).
TEST_DEVICES = ("cpu", "gpu")


def pytest_configure(config):
    name = os.environ.get("KIMI_MLX_TEST_DEVICE")
    if name:
        if name not in TEST_DEVICES:
            raise pytest.UsageError(f"KIMI_MLX_TEST_DEVICE={name!r}; valid: {', '.join(TEST_DEVICES)}")
        import mlx.core as mx

        if name == "gpu" and not mx.is_available(mx.gpu):
            raise pytest.UsageError("KIMI_MLX_TEST_DEVICE=gpu but this MLX has no GPU backend (mlx[cuda13] or a Mac)")
        mx.set_default_device(mx.gpu if name == "gpu" else mx.cpu)


@pytest.fixture(scope="session")
def reference_module():
    """The `reference` helper module, after checking torch/transformers exist."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # 2 shared CPU cores: the tiny reference runs fastest single-threaded anyway.
    torch.set_num_threads(1)
    import reference

    return reference


@pytest.fixture(scope="session")
def ref32(reference_module, tmp_path_factory):
    """KDA head dim 32, float32 weights, one safetensors file."""
    cfg = reference_module.make_tiny_config(linear_head_dim=32)
    return reference_module.ReferenceCase.build(tmp_path_factory.mktemp("ref32"), cfg, seed=0)


@pytest.fixture(scope="session")
def ref128(reference_module, tmp_path_factory):
    """KDA head dim 128 (the released head size), 16 experts top-4, float32."""
    cfg = reference_module.make_tiny_config(linear_head_dim=128, num_experts=16, num_experts_per_token=4)
    return reference_module.ReferenceCase.build(tmp_path_factory.mktemp("ref128"), cfg, seed=1)


@pytest.fixture(scope="session")
def ref32_sharded(reference_module, ref32, tmp_path_factory):
    """The same weights as `ref32`, written as 3 shards plus model.safetensors.index.json."""
    return reference_module.ReferenceCase.build(tmp_path_factory.mktemp("ref32_sharded"), ref32.config,
                                                seed=0, shards=3)


@pytest.fixture(scope="session")
def ref32_bf16(reference_module, tmp_path_factory):
    """Head dim 32 stored in bfloat16, as the released checkpoint is; the reference
    runs float32 on the bf16-rounded weights."""
    import torch

    cfg = reference_module.make_tiny_config(linear_head_dim=32)
    return reference_module.ReferenceCase.build(tmp_path_factory.mktemp("ref32_bf16"), cfg, seed=2,
                                                dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def bug_variant(reference_module, ref32, tmp_path_factory):
    """Factory: bug name -> ReferenceCase of `ref32` with that bug planted in its files."""
    built = {}

    def make(bug: str):
        if bug not in built:
            folder = reference_module.write_bug_variant(ref32.folder, tmp_path_factory.mktemp(bug), bug)
            built[bug] = reference_module.ReferenceCase(folder, ref32.config, reference_module.load_reference(folder))
        return built[bug]

    return make
