"""The compiled decode step (kimi_mlx/decode.py) against the eager model on the naive recurrence.

The truth for every decode step is the eager layer code with KDA on `kda_naive` (one token at a
time, fp32 state). Awkward sizes: a prompt of 37 tokens (not a multiple of the 64-token chunk),
a first token on a fresh cache (T = 1 prompt), batch 2, KDA head dims 32 and 128.
"""

from __future__ import annotations


import mlx.core as mx
import pytest
from tiny import TINY_CONFIG, tiny_model

from kimi_mlx.decode import get_decode_path, set_decode_path
from kimi_mlx.kda import set_kda_path

TOL = 1e-4  # fp32 weights and activations: relative error of logits, ||out - ref|| / ||ref||
TOL_FP32 = 1e-5  # one fp32 MoE layer, two orders of the same sums


def _decode(model, prompt: mx.array, steps: int, path: str, kda: str | None) -> list[mx.array]:
    """Logits of `steps` greedy decode steps after prefilling prompt [B, T] (the prompt eagerly)."""
    set_kda_path(kda)
    try:
        cache = model.make_cache()
        set_decode_path(path)  # a prompt of one token is itself a decode step, on a fresh cache
        logits = model(prompt, cache=cache)[:, -1:]
        out = []
        for _ in range(steps):
            token = mx.argmax(logits[:, -1], axis=-1)[:, None]  # [B, 1]
            logits = model(token, cache=cache)
            out.append(logits.astype(mx.float32))
        mx.eval(out)
        assert all(c.offset == prompt.shape[1] + steps for c in cache)
        return out
    finally:
        set_decode_path(None)
        set_kda_path(None)


def _rel(a: mx.array, b: mx.array) -> float:
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


@pytest.mark.parametrize("head_dim, batch, prompt_len", [(32, 2, 37), (128, 1, 37), (32, 1, 1)])
def test_compiled_decode_matches_naive_recurrence(head_dim, batch, prompt_len):
    model = tiny_model(head_dim)
    prompt = mx.random.randint(3, TINY_CONFIG["vocab_size"], (batch, prompt_len), key=mx.random.key(prompt_len))
    ref = _decode(model, prompt, 4, "eager", "naive")
    for kda in (None, "naive"):  # auto's decode path (mx_fast on the CPU) and the recurrence itself
        out = _decode(model, prompt, 4, "compiled", kda)
        for step, (o, r) in enumerate(zip(out, ref)):
            err = _rel(o, r)
            assert err < TOL, f"step {step}, KDA path {kda or 'auto'}: relative error {err:.2e}"
    # Each layer was traced once per KDA path (the switch is part of the trace key), not per call.
    fns = model.layers[1].__dict__["_decode_fns"]
    assert len(fns) == 2 and all(f is not None for f in fns.values())


def test_compiled_decode_sees_new_weights():
    """The layers' parameters are inputs of the trace, not constants baked into it."""
    model = tiny_model(32)
    prompt = mx.array([[5, 6, 7]])
    before = _decode(model, prompt, 1, "compiled", None)[0]
    layer = model.layers[1]
    layer.post_attention_layernorm.weight = 2 * layer.post_attention_layernorm.weight
    after = _decode(model, prompt, 1, "compiled", None)[0]
    eager = _decode(model, prompt, 1, "eager", None)[0]
    assert _rel(after, before) > 1e-3
    assert _rel(after, eager) < TOL
    # A weight inside a fused projection group (q, k, v run as one matmul at decode) replaced too.
    layer.self_attn.k_proj.weight = 2 * layer.self_attn.k_proj.weight
    mla = next(layer.self_attn for layer in model.layers if not layer.is_kda)
    mla.kv_a_proj_with_mqa.weight = -mla.kv_a_proj_with_mqa.weight
    again = _decode(model, prompt, 1, "compiled", None)[0]
    assert _rel(again, after) > 1e-3
    assert _rel(again, _decode(model, prompt, 1, "eager", None)[0]) < TOL


def test_decode_switch(monkeypatch):
    assert get_decode_path() == ("eager" if mx.default_device() == mx.cpu else "compiled")  # auto
    monkeypatch.setenv("KIMI_MLX_DECODE", "compiled")
    assert get_decode_path() == "compiled"
    monkeypatch.setenv("KIMI_MLX_DECODE", "fast")
    with pytest.raises(Exception, match="KIMI_MLX_DECODE"):
        get_decode_path()
    with pytest.raises(Exception, match="valid: compiled, eager"):
        set_decode_path("jit")


def _moe(quantized: bool, shared: int = 1):
    import mlx.nn as nn

    from kimi_mlx.config import ModelArgs
    from kimi_mlx.moe import SparseMoE

    args = ModelArgs.from_dict({**TINY_CONFIG, "hidden_size": 64, "moe_intermediate_size": 64, "num_experts": 6,
                                "num_experts_per_token": 3, "num_shared_experts": shared})
    mx.random.seed(5)
    moe = SparseMoE(args)
    moe.e_score_correction_bias = 0.1 * mx.random.normal((6,))
    if quantized:
        nn.quantize(moe, group_size=32, bits=4)
    mx.eval(moe.parameters())
    return moe


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("B, T", [(1, 1), (2, 3)])
def test_fused_moe_equals_the_moe_layer(quantized, B, T):
    """FusedMoE (the shared expert as expert E, gate/up as one gather) against SparseMoE's own code."""
    from kimi_mlx.fused import FusedMoE

    moe = _moe(quantized)
    x = mx.random.normal((B, T, 64), key=mx.random.key(B * 10 + T))
    ref = moe(x)
    assert FusedMoE.supported(moe)
    fused = FusedMoE(moe)
    assert _rel(fused.run(moe, x, fused.arrays()), ref) < TOL_FP32
    assert _rel(moe(x), ref) < TOL_FP32  # the layer's weights are views of the buffers now: same layer
    # New weights for the shared expert: the buffers are made again, not read stale.
    down = moe.shared_experts.down_proj
    if quantized:
        down.scales = 2 * down.scales
    else:
        down.weight = 2 * down.weight
    ref2 = moe(x)
    assert _rel(ref2, ref) > 1e-3
    assert _rel(fused.run(moe, x, fused.arrays()), ref2) < TOL_FP32


def test_fused_moe_leaves_many_rows_and_forced_paths_to_the_layer(monkeypatch):
    """From SORT_MIN_ROWS (token, expert) rows on, or with an expert path forced, FusedMoE runs the
    layer's own code."""
    from kimi_mlx import fused

    moe = _moe(True)
    x = mx.random.normal((16, 1, 64), key=mx.random.key(7))  # 16 tokens x 4 slots = 64 rows
    ref = moe(x)
    f = fused.FusedMoE(moe)
    calls = []
    monkeypatch.setattr(fused, "route", lambda *a, **k: calls.append(1))
    assert _rel(f.run(moe, x, f.arrays()), ref) < TOL_FP32 and not calls
    # A forced expert path too (FusedMoE is the direct one): few rows, the layer's own code.
    from kimi_mlx.experts import set_expert_path

    set_expert_path("gather")
    try:
        assert _rel(f.run(moe, x[:1], f.arrays()), moe(x[:1])) < TOL_FP32 and not calls
    finally:
        set_expert_path(None)


def test_fused_moe_needs_a_shared_expert_shaped_like_a_routed_one():
    from kimi_mlx.fused import FusedMoE

    assert not FusedMoE.supported(_moe(True, shared=2))  # shared intermediate 128 != 64
    assert not FusedMoE.supported(_moe(False, shared=0))


def test_fused_moe_leaves_parallel_moe_layers_alone():
    """An expert-parallel MoE (its own __call__ reduces across ranks) keeps its own code."""
    from kimi_mlx.fused import FusedMoE
    from kimi_mlx.parallel.expert import ExpertParallelMoE

    moe = _moe(True)
    parallel = ExpertParallelMoE.__new__(ExpertParallelMoE)
    parallel.__dict__.update(moe.__dict__)
    assert FusedMoE.supported(moe) and not FusedMoE.supported(parallel)


def test_decode_step_reads_the_switches_once_per_token_not_per_layer(monkeypatch):
    """DecodeStep: the path switches (env reads) and kernel-readiness checks are read once per
    model call; a model twice as deep reads them as often (they were read in every layer)."""
    import copy

    from kimi_mlx import Model, ModelArgs
    from kimi_mlx.switch import PathSwitch

    reads = []
    real = PathSwitch.forced
    monkeypatch.setattr(PathSwitch, "forced", lambda self: (reads.append(1), real(self))[1])
    counts = []
    for depth in (4, 8):
        cfg = copy.deepcopy(TINY_CONFIG)
        cfg["num_hidden_layers"] = depth
        cfg["linear_attn_config"]["kda_layers"] = [i for i in range(1, depth + 1) if i % 4]
        cfg["linear_attn_config"]["full_attn_layers"] = [i for i in range(1, depth + 1) if i % 4 == 0]
        model = Model(ModelArgs.from_dict(cfg))
        cache = model.make_cache()
        set_decode_path("compiled")
        try:
            mx.eval(model(mx.array([[3]]), cache=cache))  # traces
            reads.clear()
            mx.eval(model(mx.array([[4]]), cache=cache))
            counts.append(len(reads))
        finally:
            set_decode_path(None)
    assert counts[0] == counts[1] and counts[0] <= 12, f"switch reads per token at depth 4 and 8: {counts}"
