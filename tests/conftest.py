"""Session fixtures: tiny reference checkpoints built once per test session.

Each `ref*` fixture is a `reference.ReferenceCase` (folder, config dict, the
transformers model read back from the folder). They skip cleanly when torch or
transformers are not installed (both are test-only dependencies).
"""

from __future__ import annotations

import pytest


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
