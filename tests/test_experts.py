"""The routed-expert paths (kimi_mlx/experts.py) give the same result, and the switch works.

Tolerances, relative error ||out - ref|| / ||ref|| against the gather path (the reference):
    float32   2e-6  only the summation order differs
    bfloat16  1e-2  bf16 rounding of the intermediate activations
    quantized 2e-6  the same quantized weights, read by quantized_matmul instead of gather_qmm
The direct path runs the reference's gather matmuls with each slot's weight applied before the
down projection: float32 and quantized-in-fp32 tables as above (summation order only).
"""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx_lm.models.switch_layers import SwitchGLU  # noqa: E402

from mlx.utils import tree_map  # noqa: E402

from kimi_mlx import experts  # noqa: E402
from kimi_mlx.experts import (  # noqa: E402
    experts_direct, experts_gather, experts_grouped, get_expert_path, run_experts, set_expert_path)
from kimi_mlx.moe_route import route_ops as route  # noqa: E402 (the reference router: these tests are about the experts)

TOL = {"float32": 2e-6, "bfloat16": 1e-2, "quantized": 2e-6}
BF16_VS_REFERENCE = 1.1  # direct path, bf16: its distance to the fp32 truth over the reference's (measured 0.94-1.02)


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
    assert get_expert_path(mlp, 4) == "direct"  # decode
    assert get_expert_path(mlp, per_expert - 1) == "direct"
    assert get_expert_path(mlp, per_expert) == "grouped"  # prefill
    nn.quantize(mlp, group_size=32, bits=4)
    assert get_expert_path(mlp, 100 * per_expert) == "direct"  # quantized experts gain nothing


def test_auto_path_on_metal_is_direct(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    mlp, *_ = make_case(1)
    assert get_expert_path(mlp, 10**6) == "direct"
    assert get_expert_path(mlp, 8) == "direct"


@pytest.mark.parametrize("metal", [True, False])
def test_cuda_prefill_rule(monkeypatch, metal):
    """CUDA_GROUPED_MIN_ROWS_PER_EXPERT sends CUDA prefill (not decode, not Metal) to grouped."""
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
    monkeypatch.setattr(experts, "CUDA_GROUPED_MIN_ROWS_PER_EXPERT", 4)
    mlp, *_ = make_case(1)  # 16 experts
    assert get_expert_path(mlp, 8) == "direct"
    assert get_expert_path(mlp, 4 * 16 - 1) == "direct"
    assert get_expert_path(mlp, 4 * 16) == ("direct" if metal else "grouped")
    monkeypatch.setattr(experts, "CUDA_GROUPED_MIN_ROWS_PER_EXPERT", None)
    assert get_expert_path(mlp, 10**6) == "direct"


@pytest.mark.parametrize("device,metal,step", [("cpu", False, 512), ("gpu", True, 512), ("gpu", False, 2048)])
def test_prefill_step_per_device(monkeypatch, device, metal, step):
    """CUDA prefills 2048 tokens a step (where the grouped experts win); CPU and Metal 512."""
    from kimi_mlx.generate import prefill_step_for
    monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
    assert prefill_step_for(getattr(mx, device)) == step


def _graph_ops(out: mx.array, tmp_path) -> list[str]:
    path = str(tmp_path / "g.dot")
    mx.export_to_dot(path, out)
    return [ln.split('label ="', 1)[1].split('"', 1)[0] for ln in open(path) if "shape=rectangle" in ln]


@pytest.mark.parametrize("n,top_k", [(1, 4), (2, 8), (5, 4), (15, 4), (16, 4)])
@pytest.mark.parametrize("quantized", [False, True])
def test_direct_equals_gather(n, top_k, quantized):
    """Few rows (decode, batch decode) and many (16 x 4 = 64: sorted, the reference as is)."""
    mlp, x, ids, w = make_case(n, top_k=top_k)
    if quantized:
        nn.quantize(mlp, group_size=32, bits=4)
    ref = experts_gather(mlp, x, ids, w)
    out = experts_direct(mlp, x, ids, w)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) <= TOL["quantized" if quantized else "float32"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_direct_bfloat16_as_close_to_fp32_as_the_reference(seed):
    """bf16 activations with 4-bit experts (bf16 scales, as on a GPU): the weights meet the
    activations in bf16 before the down projection instead of the outputs in fp32 after it. Both
    paths are ~1.5-2% from the fp32 truth (same rounded weights); ours may not be further than
    the reference's distance x BF16_VS_REFERENCE."""
    mlp, x, ids, w = make_case(2, top_k=8, seed=seed)
    nn.quantize(mlp, group_size=32, bits=4)
    mlp.update(tree_map(lambda p: p.astype(mx.bfloat16) if p.dtype == mx.float32 else p, mlp.parameters()))
    xb = x.astype(mx.bfloat16)
    out, ref = experts_direct(mlp, xb, ids, w), experts_gather(mlp, xb, ids, w)
    assert out.dtype == mx.bfloat16
    mlp.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.bfloat16 else p, mlp.parameters()))
    truth = experts_gather(mlp, xb.astype(mx.float32), ids, w)
    assert rel_err(out, truth) <= BF16_VS_REFERENCE * rel_err(ref, truth)


def test_direct_slots_read_their_own_rows():
    """Each slot's down projection reads its own expert's activation: swapping two slots' ids
    (not their weights) must change the result (a wrong lhs for the down projection would not)."""
    mlp, x, ids, w = make_case(3, top_k=4)
    swapped = mx.concatenate([ids[:, 1:2], ids[:, 0:1], ids[:, 2:]], axis=-1)
    assert rel_err(experts_direct(mlp, x, swapped, w), experts_gather(mlp, x, ids, w)) > 1e-2
    assert rel_err(experts_direct(mlp, x, swapped, w), experts_gather(mlp, x, swapped, w)) <= TOL["float32"]


def test_direct_builds_no_index_kernels(tmp_path):
    """The point of the direct path: at decode its graph has no Arange (the reference builds one
    per gather matmul, 3 per MoE layer and token) and no more nodes than the reference."""
    mlp, x, ids, w = make_case(1, top_k=8)
    nn.quantize(mlp, group_size=32, bits=4)
    mx.eval(mlp.parameters())
    ours, ref = _graph_ops(experts_direct(mlp, x, ids, w), tmp_path), _graph_ops(experts_gather(mlp, x, ids, w), tmp_path)
    assert ref.count("Arange") == 3 and ours.count("Arange") == 0
    assert ours.count("GatherQMM") == 3 and len(ours) < len(ref)


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
    monkeypatch.setattr(experts, "experts_gather", lambda *a: calls.append("gather") or experts_grouped(*a))
    set_expert_path("gather")  # the reference, not the direct path
    run_experts(mlp, x, ids, w)
    assert calls[-1] == "gather"
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
