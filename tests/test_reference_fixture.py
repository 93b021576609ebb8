"""Self-checks of the reference fixture (tests/reference.py): torch/transformers only.

If these fail, test_parity.py proves nothing: the layout, the randomisation and the
reference cache paths are checked here, against transformers itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FP32_TOL = 1e-3  # the max-abs logit tolerance test_parity uses for float32


def _released_config() -> dict | None:
    """The released config.json handed to the project, if this checkout can see it."""
    root = Path(__file__).resolve().parents[1]
    for base in (root / "shared", root.parent / "shared"):
        path = base / "models" / "Kimi-Linear-48B-A3B-Instruct.config.json"
        if path.exists():
            return json.loads(path.read_text())
    return None


def test_tiny_config_has_released_keys(reference_module):
    released = _released_config()
    if released is None:
        pytest.skip("released config.json not found (shared/models)")
    tiny = reference_module.make_tiny_config()
    assert set(tiny) == set(released)
    assert set(tiny["linear_attn_config"]) == set(released["linear_attn_config"])


def test_tiny_config_layer_pattern(reference_module):
    """1-based lists become KDA,KDA,KDA,MLA,KDA; layer 0 dense, the rest MoE."""
    cfg = reference_module._hf_config(reference_module.make_tiny_config())
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention", "linear_attention"]
    assert cfg.mlp_layer_types == ["dense"] + ["sparse"] * 4
    assert cfg.routed_scaling_factor != 1.0 and cfg.n_shared_experts == 1 and cfg.q_lora_rank is None
    tiny = reference_module.make_tiny_config()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert 0 <= tiny[key] < tiny["vocab_size"]


def _expected_names(cfg: dict) -> set[str]:
    """Every tensor name of the original Moonshot layout for a tiny config."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    kda = {i - 1 for i in cfg["linear_attn_config"]["kda_layers"]}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        if n in kda:
            names |= {p + f"self_attn.{w}" for w in ("A_log", "dt_bias")}
            names |= {p + f"self_attn.{w}.weight" for w in (
                "q_proj", "k_proj", "v_proj", "q_conv1d", "k_conv1d", "v_conv1d", "f_a_proj", "f_b_proj",
                "b_proj", "g_a_proj", "g_b_proj", "o_norm", "o_proj")}
        else:
            names |= {p + f"self_attn.{w}.weight" for w in (
                "q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")}
        if n < cfg["first_k_dense_replace"]:
            names |= {p + f"mlp.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")}
        else:
            m = p + "block_sparse_moe."
            names |= {m + "gate.weight", m + "gate.e_score_correction_bias"}
            names |= {m + f"shared_experts.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")}
            names |= {m + f"experts.{e}.{w}.weight" for e in range(cfg["num_experts"]) for w in ("w1", "w2", "w3")}
    return names


@pytest.mark.parametrize("case", ["ref32", "ref128"])
def test_checkpoint_is_original_layout(reference_module, request, case):
    """Names and shapes are those of the released checkpoint."""
    ref = request.getfixturevalue(case)
    cfg = ref.config
    tensors = reference_module.read_checkpoint(ref.folder)
    assert set(tensors) == _expected_names(cfg)
    lin = cfg["linear_attn_config"]
    h, d, k = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
    p = "model.layers.0.self_attn."
    assert tuple(tensors[p + "q_conv1d.weight"].shape) == (h * d, 1, k)
    assert tuple(tensors[p + "A_log"].shape) == (1, 1, h, 1)
    assert tuple(tensors[p + "dt_bias"].shape) == (h * d,)
    assert tuple(tensors[p + "f_a_proj.weight"].shape) == (d, cfg["hidden_size"])
    assert tuple(tensors[p + "o_norm.weight"].shape) == (d,)
    e = "model.layers.1.block_sparse_moe.experts.0."
    assert tuple(tensors[e + "w1.weight"].shape) == (cfg["moe_intermediate_size"], cfg["hidden_size"])
    assert tuple(tensors[e + "w2.weight"].shape) == (cfg["hidden_size"], cfg["moe_intermediate_size"])
    mla = "model.layers.3.self_attn."
    assert tuple(tensors[mla + "kv_a_proj_with_mqa.weight"].shape) == (
        cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], cfg["hidden_size"])
    assert json.loads((ref.folder / "config.json").read_text()) == ref.config


def test_layout_matches_save_pretrained(reference_module, ref32, tmp_path):
    """transformers' own save_pretrained writes the same tensors under the same
    names, except that it calls the dense layer-0 MLP `block_sparse_moe.*`."""
    model = reference_module.new_reference_model(ref32.config, seed=0)
    model.save_pretrained(tmp_path)
    saved = reference_module.read_checkpoint(tmp_path)
    ours = reference_module.read_checkpoint(ref32.folder)
    renamed = {k.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): v for k, v in saved.items()}
    assert set(renamed) == set(ours)
    for k in ours:
        assert np.array_equal(renamed[k].float().numpy(), ours[k].float().numpy()), k
    assert any(k.startswith("model.layers.0.block_sparse_moe.") for k in saved)


def test_sharded_checkpoint(reference_module, ref32, ref32_sharded):
    """3 shards + index: same tensors, index covers all of them, same reference logits."""
    index = json.loads((ref32_sharded.folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in ref32_sharded.folder.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    single = reference_module.read_checkpoint(ref32.folder)
    assert set(index["weight_map"]) == set(single)
    assert set(index["weight_map"].values()) == set(shards)
    ids = ref32.tokens(65)
    assert np.array_equal(ref32.logits(ids), ref32_sharded.logits(ids))


def test_bf16_checkpoint(reference_module, ref32_bf16):
    """Stored in bfloat16 like the release; transformers reads it back (the reload
    check inside build_reference_checkpoint passed) and config says so."""
    import torch

    tensors = reference_module.read_checkpoint(ref32_bf16.folder)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert ref32_bf16.config["dtype"] == "bfloat16"


@pytest.mark.parametrize("case", ["ref32", "ref128"])
def test_randomisation_shows_bugs(reference_module, request, case):
    """Norm weights are not ones, gates are strong, the correction bias changes
    expert choices, logits are peaked: a bug in any of these moves the logits."""
    import torch
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearForgetGate, KimiLinearTopkRouter

    ref = request.getfixturevalue(case)
    tensors = reference_module.read_checkpoint(ref.folder)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            assert float(t.std()) > 0.1, name  # not all ones

    seen = {"decay": [], "changed": []}

    def on_gate(_mod, _args, out):
        seen["decay"].append(out.exp().flatten())

    def on_router(mod, args, _out):
        x = args[0].reshape(-1, mod.hidden_dim).float()
        s = torch.sigmoid(x @ mod.weight.float().T)
        with_bias = (s + mod.e_score_correction_bias).topk(mod.top_k).indices.sort(-1).values
        without = s.topk(mod.top_k).indices.sort(-1).values
        seen["changed"].append((with_bias != without).any(-1).float().mean())

    hooks = [m.register_forward_hook(on_gate) for m in ref.model.modules() if isinstance(m, KimiLinearForgetGate)]
    hooks += [m.register_forward_hook(on_router) for m in ref.model.modules() if isinstance(m, KimiLinearTopkRouter)]
    try:
        logits = ref.logits(ref.tokens(200))
    finally:
        for h in hooks:
            h.remove()
    decay = torch.cat(seen["decay"])
    assert float((decay < 0.5).float().mean()) > 0.1  # strong forgetting on many channels
    assert float((decay > 0.95).float().mean()) > 0.1  # long memory on others
    assert min(float(c) for c in seen["changed"]) > 0.2  # bias reorders choices
    assert logits.std() > 1.0 and np.all(np.isfinite(logits))
    top = np.sort(logits, -1)
    assert np.median(top[..., -1] - top[..., -2]) > 0.1  # not flat: top-1 is meaningful


@pytest.mark.parametrize("case", ["ref32", "ref128"])
@pytest.mark.parametrize("chunks", [None, [50, 50], [1, 64, 35]], ids=["one", "50+50", "1+64+35"])
def test_reference_cache_matches_full_forward(request, case, chunks):
    """transformers' cache paths (chunked prefill, single-token decode) agree with its
    full forward: the decode reference is trustworthy."""
    ref = request.getfixturevalue(case)
    ids = ref.tokens(105, batch=2, seed=3)
    full = ref.logits(ids)
    dec = ref.decode([r[:100] for r in ids], [r[100:] for r in ids], prefill_chunks=chunks)
    assert dec.shape == (2, 6, ref.config["vocab_size"])
    assert np.abs(dec - full[:, 99:]).max() < FP32_TOL / 10


def test_reference_greedy_decode(reference_module, ref32):
    """Without decode_ids, tokens are the greedy argmax and are returned."""
    ids = ref32.tokens(20)
    logits, fed = reference_module.reference_decode(ref32.model, ids, 4)
    assert len(fed[0]) == 4 and fed[0][0] == int(logits[0, 0].argmax())
    assert all(fed[0][i] == int(logits[0, i].argmax()) for i in range(4))


def test_reference_left_padding_equals_single_runs(ref32):
    """Left padding with attention_mask changes nothing on the real tokens."""
    a, b = ref32.tokens(40, seed=4)[0], ref32.tokens(70, seed=5)[0]
    pad = ref32.config["pad_token_id"]
    batch = [[pad] * 30 + a, b]
    mask = [[0] * 30 + [1] * 40, [1] * 70]
    both = ref32.logits(batch, mask)
    assert np.all(np.isfinite(both))
    assert np.abs(both[0, 30:] - ref32.logits([a])[0]).max() < FP32_TOL / 10
    assert np.abs(both[1] - ref32.logits([b])[0]).max() < FP32_TOL / 10


@pytest.mark.parametrize("n_tokens,batch", [(65, 2), pytest.param(600, 1, marks=pytest.mark.slow)])
def test_pick_untied_tokens(reference_module, ref32, n_tokens, batch):
    """Picked sequences keep every expert choice clear of near-ties, deterministically.
    (T=600, B=1, seed 0 is the pick test_parity uses: memoised, found once.)"""
    ids = ref32.tokens(n_tokens, batch=batch)
    assert len(ids) == batch and all(len(r) == n_tokens for r in ids)
    assert reference_module.router_margins(ref32.model, ids).min() >= 1e-3
    if n_tokens < 100:
        assert reference_module.pick_untied_tokens(ref32.model, n_tokens, batch, 1e-3, seed=0) == ids


@pytest.mark.parametrize("bug", ["router_bias_zero", "w1_w3_swap", "per_head_decay", "kv_norm_ones"])
def test_planted_bug_moves_reference_logits(ref32, bug_variant, bug):
    """Each planted bug moves the reference logits far beyond the float32 tolerance,
    so test_parity's guards have room."""
    ids = ref32.tokens(65, seed=8)
    err = np.abs(bug_variant(bug).logits(ids) - ref32.logits(ids)).max()
    assert err > 100 * FP32_TOL, f"{bug}: max logit change only {err}"
