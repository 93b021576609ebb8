"""Each weight-renaming step alone, checked against what the original tensors mean."""

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.config import ModelArgs
from kimi_mlx.errors import ModelFormatError
from kimi_mlx.kda_layer import ShortConv
from kimi_mlx.weights import conv_to_mlx, flatten_dt_bias, rename_moe_block, split_kv_b, stack_experts, to_mlx_layout

P = "model.layers.1"


def _experts(E=4, hidden=8, inter=6):
    rng = np.random.default_rng(0)
    w = {}
    for e in range(E):
        w[f"{P}.block_sparse_moe.experts.{e}.w1.weight"] = mx.array(rng.normal(size=(inter, hidden)).astype(np.float32))
        w[f"{P}.block_sparse_moe.experts.{e}.w3.weight"] = mx.array(rng.normal(size=(inter, hidden)).astype(np.float32))
        w[f"{P}.block_sparse_moe.experts.{e}.w2.weight"] = mx.array(rng.normal(size=(hidden, inter)).astype(np.float32))
    return w


def test_stack_experts_maps_w1_gate_w3_up_w2_down():
    w = _experts()
    out = stack_experts(dict(w), 4)
    gate = out[f"{P}.mlp.switch_mlp.gate_proj.weight"]
    up = out[f"{P}.mlp.switch_mlp.up_proj.weight"]
    down = out[f"{P}.mlp.switch_mlp.down_proj.weight"]
    assert gate.shape == (4, 6, 8) and down.shape == (4, 8, 6)
    for e in range(4):
        assert mx.array_equal(gate[e], w[f"{P}.block_sparse_moe.experts.{e}.w1.weight"])
        assert mx.array_equal(up[e], w[f"{P}.block_sparse_moe.experts.{e}.w3.weight"])
        assert mx.array_equal(down[e], w[f"{P}.block_sparse_moe.experts.{e}.w2.weight"])
    assert not any("block_sparse_moe" in k for k in out)


def test_stack_experts_missing_expert_names_tensor():
    w = _experts()
    del w[f"{P}.block_sparse_moe.experts.2.w3.weight"]
    with pytest.raises(ModelFormatError, match=r"experts\.2\.w3"):
        stack_experts(w, 4)


def test_rename_moe_block_router_and_shared_expert():
    w = {
        f"{P}.block_sparse_moe.gate.weight": mx.zeros((4, 8)),
        f"{P}.block_sparse_moe.gate.e_score_correction_bias": mx.zeros((4,)),
        f"{P}.block_sparse_moe.shared_experts.up_proj.weight": mx.zeros((6, 8)),
        "model.layers.0.mlp.gate_proj.weight": mx.zeros((6, 8)),
    }
    assert set(rename_moe_block(w)) == {
        f"{P}.mlp.gate.weight",
        f"{P}.mlp.e_score_correction_bias",
        f"{P}.mlp.shared_experts.up_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
    }


def test_conv_to_mlx_keeps_causal_conv_semantics():
    """The renamed weight, used by our ShortConv, computes torch's causal depthwise conv."""
    C, K, T = 5, 4, 9
    rng = np.random.default_rng(1)
    w_torch = rng.normal(size=(C, 1, K)).astype(np.float32)  # [C, 1, K]
    x = rng.normal(size=(1, T, C)).astype(np.float32)
    out = conv_to_mlx({f"{P}.self_attn.q_conv1d.weight": mx.array(w_torch)})
    w = out[f"{P}.self_attn.q_conv.conv.weight"]
    assert w.shape == (C, K, 1)
    conv = ShortConv(C, K)
    conv.conv.weight = w
    y, window = conv(mx.array(x), None)
    # torch conv1d with left padding K-1: y[t, c] = sum_j w[c, 0, j] * x[t - (K-1) + j, c]
    xp = np.concatenate([np.zeros((K - 1, C), np.float32), x[0]])
    ref = np.stack([(w_torch[:, 0, :].T * xp[t : t + K]).sum(0) for t in range(T)])
    ref = ref / (1 + np.exp(-ref))  # SiLU
    np.testing.assert_allclose(np.array(y[0]), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(window[0]), x[0, -(K - 1) :])


def test_split_kv_b_gives_per_head_keys_and_values():
    args = ModelArgs(num_attention_heads=3, qk_nope_head_dim=4, v_head_dim=5, kv_lora_rank=6)
    rng = np.random.default_rng(2)
    kv_b = rng.normal(size=(3 * (4 + 5), 6)).astype(np.float32)  # [H*(Dn+Dv), R]
    c = rng.normal(size=(7, 6)).astype(np.float32)  # 7 latents
    out = split_kv_b({f"{P}.self_attn.kv_b_proj.weight": mx.array(kv_b)}, args)
    wk, wv = np.array(out[f"{P}.self_attn.embed_q.weight"]), np.array(out[f"{P}.self_attn.unembed_out.weight"])
    assert wk.shape == (3, 6, 4) and wv.shape == (3, 5, 6)
    kv = (c @ kv_b.T).reshape(7, 3, 9)  # the reference expansion: [S, H, Dn+Dv]
    for h in range(3):
        np.testing.assert_allclose(c @ wk[h], kv[:, h, :4], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c @ wv[h].T, kv[:, h, 4:], rtol=1e-5, atol=1e-5)


def test_flatten_dt_bias():
    out = flatten_dt_bias({f"{P}.self_attn.dt_bias": mx.zeros((1, 1, 8))})
    assert out[f"{P}.self_attn.dt_bias"].shape == (8,)


def test_to_mlx_layout_is_idempotent():
    args = ModelArgs(num_experts=4, num_attention_heads=3, qk_nope_head_dim=4, v_head_dim=5, kv_lora_rank=6)
    w = _experts()
    w[f"{P}.self_attn.q_conv1d.weight"] = mx.ones((5, 1, 4))
    w["model.layers.3.self_attn.kv_b_proj.weight"] = mx.ones((27, 6))
    once = to_mlx_layout(w, args)
    twice = to_mlx_layout(dict(once), args)
    assert set(once) == set(twice)
    assert all(mx.array_equal(once[k], twice[k]) for k in once)
