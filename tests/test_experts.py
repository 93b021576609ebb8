"""The two routed-expert paths (kimi_mlx/experts.py) give the same result, and the switch works.

Tolerances, relative error ||out - ref|| / ||ref|| against the gather path (the reference):
    float32   2e-6  only the summation order differs
    bfloat16  1e-2  bf16 rounding of the intermediate activations
    quantized 2e-6  the same quantized weights, read by quantized_matmul instead of gather_qmm
"""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx_lm.models.switch_layers import SwitchGLU  # noqa: E402

from kimi_mlx import experts  # noqa: E402
from kimi_mlx.experts import experts_gather, experts_grouped, get_expert_path, run_experts, set_expert_path  # noqa: E402
from kimi_mlx.moe import route  # noqa: E402

TOL = {"float32": 2e-6, "bfloat16": 1e-2, "quantized": 2e-6}


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def make_case(n: int, hidden=64, inter=32, num_experts=16, top_k=4, seed=0, skew=False):
    """A SwitchGLU with distinct experts and routed inputs; `skew` leaves most experts unused."""
    mx.random.seed(seed)
    mlp = SwitchGLU(hidden, inter, num_experts)
    gate = nn.Linear(hidden, num_experts, bias=False)
    x = mx.random.normal((n, hidden))
    bias = mx.where(mx.arange(num_experts) < top_k + 1, 10.0, 0.0) if skew else mx.zeros((num_experts,))
    ids, w = route(gate(x), bias, top_k, True, 2.446)
    mx.eval(mlp.parameters(), x, ids, w)
    return mlp, x, ids, w


@pytest.fixture(autouse=True)
def auto_path(monkeypatch):
    monkeypatch.delenv(experts.ENV_VAR, raising=False)
    set_expert_path(None)
    yield
    set_expert_path(None)


@pytest.mark.parametrize("n", [1, 5, 37, 300])
def test_grouped_equals_gather_float32(n):
    mlp, x, ids, w = make_case(n)
    ref = experts_gather(mlp, x, ids, w)
    out = experts_grouped(mlp, x, ids, w)
    assert out.shape == (n, 64) and out.dtype == mx.float32
    assert rel_err(out, ref) <= TOL["float32"]


def test_grouped_with_most_experts_unused():
    """Experts that receive no rows are skipped; the others still line up with their rows."""
    mlp, x, ids, w = make_case(50, skew=True)
    assert len(set(ids.reshape(-1).tolist())) <= 5
    assert rel_err(experts_grouped(mlp, x, ids, w), experts_gather(mlp, x, ids, w)) <= TOL["float32"]


def test_grouped_weights_each_expert_by_its_own_score():
    """Swapping the routing weights of two slots must change the output (the weights follow the rows)."""
    mlp, x, ids, w = make_case(20)
    swapped = mx.concatenate([w[:, 1:2], w[:, 0:1], w[:, 2:]], axis=1)
    assert rel_err(experts_grouped(mlp, x, ids, swapped), experts_gather(mlp, x, ids, w)) > 1e-2


def test_grouped_equals_gather_bfloat16():
    """bf16 experts (MLX's CPU gather_mm is fp32-only, so the reference runs the same rounded
    weights in fp32)."""
    mlp, x, ids, w = make_case(64)
    mlp.set_dtype(mx.bfloat16)
    xb = x.astype(mx.bfloat16)
    out = experts_grouped(mlp, xb, ids, w)
    assert out.dtype == mx.bfloat16
    mlp.set_dtype(mx.float32)
    assert rel_err(out, experts_gather(mlp, xb.astype(mx.float32), ids, w)) <= TOL["bfloat16"]


@pytest.mark.parametrize("bits,mode", [(4, "affine"), (8, "affine"), (4, "mxfp4")])
def test_grouped_equals_gather_quantized(bits, mode):
    mlp, x, ids, w = make_case(40, hidden=128, inter=64)
    nn.quantize(mlp, group_size=32 if mode == "mxfp4" else 64, bits=bits, mode=mode)
    mx.eval(mlp.parameters())
    assert rel_err(experts_grouped(mlp, x, ids, w), experts_gather(mlp, x, ids, w)) <= TOL["quantized"]


def test_auto_path_on_cpu(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    mlp, *_ = make_case(1)
    per_expert = experts.CPU_GROUPED_MIN_ROWS_PER_EXPERT * 16
    assert get_expert_path() == "auto"
    assert get_expert_path(mlp, 4) == "gather"  # decode
    assert get_expert_path(mlp, per_expert - 1) == "gather"
    assert get_expert_path(mlp, per_expert) == "grouped"  # prefill
    nn.quantize(mlp, group_size=32, bits=4)
    assert get_expert_path(mlp, 100 * per_expert) == "gather"  # quantized experts gain nothing


def test_auto_path_on_a_gpu_is_gather(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    mlp, *_ = make_case(1)
    assert get_expert_path(mlp, 10**6) == "gather"


def test_forcing_a_path(monkeypatch):
    mlp, x, ids, w = make_case(8)
    calls = []
    monkeypatch.setattr(experts, "experts_grouped", lambda *a: calls.append("grouped") or experts_gather(*a))
    set_expert_path("grouped")
    run_experts(mlp, x, ids, w)
    set_expert_path(None)
    monkeypatch.setenv(experts.ENV_VAR, "grouped")
    assert get_expert_path(mlp, 1) == "grouped"
    run_experts(mlp, x, ids, w)
    assert calls == ["grouped", "grouped"]
    set_expert_path("gather")  # the function beats the env var
    assert get_expert_path(mlp, 10**6) == "gather"


def test_unknown_path_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown expert path 'fast'"):
        set_expert_path("fast")
    monkeypatch.setenv(experts.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="KIMI_MLX_EXPERT_PATH"):
        get_expert_path()


def test_model_logits_equal_on_both_paths():
    """A whole tiny model: prefill on the grouped path equals the gather path."""
    from kimi_mlx import Model, ModelArgs
    from tests.tiny import TINY_CONFIG, random_weights

    model = Model(ModelArgs.from_dict(TINY_CONFIG))
    model.load_weights(list(random_weights().items()))
    ids = mx.random.randint(0, model.args.vocab_size, (2, 70)).astype(mx.int32)
    set_expert_path("gather")
    ref = model(ids)
    set_expert_path("grouped")
    out = model(ids)
    assert rel_err(out, ref) <= TOL["float32"]
