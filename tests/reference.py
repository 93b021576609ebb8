"""The reference side of the parity tests: tiny Kimi-Linear checkpoints built with
Hugging Face transformers (5.23, pure-torch path, CPU) and the logits it computes.

Truth is `transformers.KimiLinearForCausalLM` run with the eager attention and eager
experts implementations (the code paths in `modeling_kimi_linear.py`, no kernels).
Checkpoints are written in the ORIGINAL Moonshot layout (the one the released
safetensors use), by an explicit name map written here, and re-read through
`from_pretrained` to prove transformers reads that layout back to the same model.

torch / transformers are imported inside functions only: importing this module is
cheap and never fails when they are absent (conftest skips instead).

Shapes: token ids are nested lists [B][T] of ints; logits come back as float32
numpy arrays [B, T, V].
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The released config.json key set (models/Kimi-Linear-48B-A3B-Instruct.config.json):
# tiny configs carry the same keys, only smaller values.
_RELEASED_LIKE = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_kimi.KimiLinearConfig",
        "AutoModel": "modeling_kimi.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
    },
    "bos_token_id": 1,
    "dtype": "float32",
    "eos_token_id": 2,
    "first_k_dense_replace": 1,
    "head_dim": 72,  # unused by the model (transformers overrides it); kept as released
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "kv_lora_rank": 32,
    "linear_attn_config": {
        "full_attn_layers": [4],
        "head_dim": 32,
        "kda_layers": [1, 2, 3, 5],
        "num_heads": 2,
        "short_conv_kernel_size": 4,
    },
    "mla_use_nope": True,
    "model_max_length": 4096,
    "model_type": "kimi_linear",
    "moe_intermediate_size": 32,
    "moe_layer_freq": 1,
    "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid",
    "num_attention_heads": 2,
    "num_expert_group": 1,
    "num_experts": 8,
    "num_experts_per_token": 2,
    "num_hidden_layers": 5,
    "num_key_value_heads": 2,
    "num_nextn_predict_layers": 0,
    "num_shared_experts": 1,
    "pad_token_id": 511,
    "q_lora_rank": None,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "routed_scaling_factor": 2.446,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "transformers_version": "4.57.0",
    "use_cache": True,
    "use_grouped_topk": True,
    "v_head_dim": 16,
    "vocab_size": 512,
}


def make_tiny_config(linear_head_dim: int = 32, **overrides) -> dict:
    """A tiny config.json dict in the released format (1-based layer lists).

    5 layers: KDA, KDA, KDA, MLA, KDA; layer 0 dense SwiGLU, layers 1..4 MoE
    (8 experts, top-2, one shared expert, routed scaling 2.446). KDA has 2 heads of
    `linear_head_dim`; MLA 2 heads, nope 16 + "rope" 8 (never rotated), v 16, latent 32.
    `overrides` replace top-level keys; `linear_attn_config` overrides are merged.
    """
    cfg = json.loads(json.dumps(_RELEASED_LIKE))  # deep copy
    cfg["linear_attn_config"]["head_dim"] = linear_head_dim
    lin = overrides.pop("linear_attn_config", None)
    cfg.update(overrides)
    if lin:
        cfg["linear_attn_config"].update(lin)
    return cfg


# ----------------------------------------------------------------------------- model


def _hf_config(config_dict: dict):
    """transformers' KimiLinearConfig for a released-format dict, eager paths only."""
    from transformers import KimiLinearConfig

    skip = {"auto_map", "architectures", "dtype"}
    # rope_scaling: null only triggers a deprecation warning (no RoPE is applied anyway).
    kwargs = {k: v for k, v in config_dict.items() if k not in skip and not (k == "rope_scaling" and v is None)}
    cfg = KimiLinearConfig(**kwargs)
    # Eager attention and experts: the readable torch code is the truth, not sdpa/grouped_mm.
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def _kda_layers(config_dict: dict) -> list[int]:
    """0-based indices of the KDA layers."""
    return [i - 1 for i in config_dict["linear_attn_config"]["kda_layers"]]


def _randomise_(model, seed: int) -> None:
    """Overwrite every parameter and buffer so that a wrong implementation shows.

    Projections are scaled to keep activations O(1); norms are not ones; gates are
    strong (exp(g) well below 1 on many channels, near 1 on others); the router's
    correction bias changes expert choices; lm_head gives peaked logits.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    def fan_in_normal(p, gain=1.0):
        return normal(p.shape, gain / math.sqrt(p.shape[-1]))

    out_gain = 0.6  # outputs written into the residual stream: keep it O(1) over 5 layers
    rules = [
        ("embed_tokens.weight", lambda p: normal(p.shape, 1.0)),
        ("lm_head.weight", lambda p: fan_in_normal(p, 2.5)),
        ("norm.weight", lambda p: uniform(p.shape, 0.5, 1.5)),  # every RMSNorm, o_norm too
        ("conv1d.weight", lambda p: normal(p.shape, 0.6)),
        # Per-head decay rate exp(A_log) in [0.5, 6]; dt_bias spreads softplus over
        # [0.003, 1.3], so per-channel decay runs from ~0.99 to well below 0.1.
        ("A_log", lambda p: uniform(p.shape, 0.5, 6.0).log()),
        ("dt_bias", lambda p: uniform(p.shape, -6.0, 1.0)),
        ("f_b_proj.weight", lambda p: fan_in_normal(p, 1.5)),
        ("b_proj.weight", lambda p: fan_in_normal(p, 2.0)),
        ("g_b_proj.weight", lambda p: fan_in_normal(p, 1.5)),
        ("q_proj.weight", lambda p: fan_in_normal(p, 1.5)),
        ("o_proj.weight", lambda p: fan_in_normal(p, out_gain)),
        ("down_proj.weight", lambda p: fan_in_normal(p, out_gain)),
        ("experts.down_proj", lambda p: fan_in_normal(p, out_gain)),
        ("gate.weight", lambda p: fan_in_normal(p, 1.5)),
        # Sigmoid scores spread ~0.25; a bias of this size reorders many choices.
        ("e_score_correction_bias", lambda p: normal(p.shape, 0.15)),
    ]
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            for suffix, make in rules:
                if name.endswith(suffix):
                    tensor.copy_(make(tensor))
                    break
            else:  # any other projection (k/v/f_a/g_a/kv_a/kv_b/gate_up/up/gate)
                tensor.copy_(fan_in_normal(tensor))


def new_reference_model(config_dict: dict, seed: int = 0):
    """A randomised float32 `KimiLinearForCausalLM` for `config_dict` (eval mode)."""
    import torch
    from transformers import KimiLinearForCausalLM

    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(_hf_config(config_dict)).float().eval()
    _randomise_(model, seed)
    return model


# ------------------------------------------------------------- original Moonshot layout


def original_layout(model, config_dict: dict) -> dict:
    """The model's tensors under the released checkpoint's names and shapes.

    Written out explicitly (not through save_pretrained's reverse mapping), so the
    reload check in `build_reference_checkpoint` tests transformers against it:
    conv1d [3C,1,K] -> {q,k,v}_conv1d [C,1,K]; forget_gate.* -> self_attn.*;
    experts.gate_up_proj [E,2I,H] -> experts.E.w1 (gate, first half) / w3 (up);
    experts.down_proj [E,H,I] -> experts.E.w2; sparse mlp.* -> block_sparse_moe.*;
    the dense layer-0 MLP stays mlp.{gate,up,down}_proj.
    """
    out = {}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    kda = set(_kda_layers(config_dict))
    for name, t in state.items():
        parts = name.split(".")
        if parts[0] != "model" or parts[1] != "layers":
            out[name] = t
            continue
        layer = int(parts[2])
        prefix = f"model.layers.{layer}."
        rest = name[len(prefix):]
        if rest == "self_attn.conv1d.weight":
            q, k, v = t.chunk(3, dim=0)
            out[prefix + "self_attn.q_conv1d.weight"] = q.contiguous()
            out[prefix + "self_attn.k_conv1d.weight"] = k.contiguous()
            out[prefix + "self_attn.v_conv1d.weight"] = v.contiguous()
        elif rest.startswith("self_attn.forget_gate."):
            assert layer in kda
            out[prefix + "self_attn." + rest[len("self_attn.forget_gate."):]] = t
        elif rest == "mlp.experts.gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[prefix + f"block_sparse_moe.experts.{e}.w1.weight"] = gate[e].contiguous()
                out[prefix + f"block_sparse_moe.experts.{e}.w3.weight"] = up[e].contiguous()
        elif rest == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                out[prefix + f"block_sparse_moe.experts.{e}.w2.weight"] = t[e].contiguous()
        elif rest.startswith("mlp.") and layer >= config_dict["first_k_dense_replace"]:
            out[prefix + "block_sparse_moe." + rest[len("mlp."):]] = t
        else:
            out[name] = t
    return out


def write_checkpoint(folder, config_dict: dict, tensors: dict, shards: int = 1) -> Path:
    """Write config.json and safetensors (one file, or `shards` files plus
    model.safetensors.index.json, names as the hub writes them)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    names = sorted(tensors)
    tensors = {k: tensors[k].contiguous() for k in names}
    if shards <= 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    # Contiguous runs of sorted names, so one layer may straddle two shards (as on the hub).
    groups = np.array_split(np.arange(len(names)), shards)
    weight_map, total = {}, 0
    for i, idx in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        part = {names[j]: tensors[names[j]] for j in idx}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        for k, t in part.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def read_checkpoint(folder) -> dict:
    """All tensors of a checkpoint folder (single file or sharded), as torch tensors."""
    from safetensors.torch import load_file

    folder = Path(folder)
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def build_reference_checkpoint(folder, config_dict: dict, seed: int = 0, dtype=None, shards: int = 1,
                               check_reload: bool = True) -> Path:
    """Build a randomised tiny model and save it in the original Moonshot layout.

    Weights are stored in `dtype` (default float32). With `check_reload`, the folder is
    read back through `from_pretrained` and must give the same logits as the
    in-memory model (rounded to `dtype`), which proves transformers reads this layout.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    model = new_reference_model(config_dict, seed)
    if dtype != torch.float32:
        # Round the in-memory model the same way, so it stays the truth for the files.
        with torch.no_grad():
            for p in list(model.parameters()) + list(model.buffers()):
                p.copy_(p.to(dtype).float())
    cfg = dict(config_dict, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16",
                                   torch.float16: "float16"}[dtype])
    tensors = {k: v.to(dtype) for k, v in original_layout(model, config_dict).items()}
    write_checkpoint(folder, cfg, tensors, shards=shards)
    if check_reload:
        ids = [[(7 * i + 3) % config_dict["vocab_size"] for i in range(37)]]
        want = reference_logits(model, ids)
        got = reference_logits(load_reference(folder), ids)
        err = float(np.abs(want - got).max())
        if err != 0.0:
            raise AssertionError(f"{folder}: reloaded checkpoint differs from the built model by {err}")
    return Path(folder)


def load_reference(folder):
    """The transformers model for a checkpoint folder, float32, eager paths, eval mode.

    Loading also reports tensors the layout left unused or missing: both are errors.
    """
    import torch
    from transformers import KimiLinearForCausalLM

    # transformers parses config.json itself here: the released format must be readable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
        model, info = KimiLinearForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
            output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise AssertionError(f"{folder}: transformers did not read every tensor: {bad}")
    return model.eval()


def _as_model(folder_or_model):
    """Accept a folder path or an already-loaded transformers model."""
    if isinstance(folder_or_model, (str, Path)):
        return load_reference(folder_or_model)
    return folder_or_model


# ------------------------------------------------------------------------ reference runs


def reference_logits(folder_or_model, input_ids, attention_mask=None) -> np.ndarray:
    """Full forward logits, float32 [B, T, V]. `attention_mask` [B][T]: 1 real, 0 left pad."""
    import torch

    model = _as_model(folder_or_model)
    ids = torch.tensor(input_ids, dtype=torch.long)
    mask = None if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits.float().numpy()


def reference_decode(folder_or_model, prompt_ids, n_new: int, prefill_chunks=None, decode_ids=None):
    """Prefill then single-token decode through transformers' cache.

    prompt_ids [B][P] are prefilled (in pieces of the sizes in `prefill_chunks`, which
    must sum to P, else in one call); then `n_new` tokens are fed one at a time:
    `decode_ids` [B][n_new] when given (teacher forcing, so both sides see the same
    tokens), else greedy argmax. Returns (logits [B, n_new + 1, V] float32, fed [B][n_new]):
    row 0 is the last prefill position, row i the step that fed token fed[:, i - 1].
    Equal (up to fp noise) to full-forward logits at positions P-1 .. P+n_new-1.
    """
    import torch
    from transformers import DynamicCache

    model = _as_model(folder_or_model)
    prompt = torch.tensor(prompt_ids, dtype=torch.long)
    chunks = list(prefill_chunks) if prefill_chunks else [prompt.shape[1]]
    if sum(chunks) != prompt.shape[1]:
        raise ValueError(f"prefill_chunks {chunks} do not sum to the prompt length {prompt.shape[1]}")
    cache = DynamicCache(config=model.config)
    rows, fed = [], []
    with torch.no_grad():
        start = 0
        for size in chunks:
            out = model(input_ids=prompt[:, start:start + size], past_key_values=cache, use_cache=True)
            start += size
        rows.append(out.logits[:, -1].float())
        for i in range(n_new):
            if decode_ids is not None:
                nxt = torch.tensor(decode_ids, dtype=torch.long)[:, i:i + 1]
            else:
                nxt = rows[-1].argmax(-1, keepdim=True)
            fed.append(nxt)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            rows.append(out.logits[:, -1].float())
    logits = torch.stack(rows, dim=1).numpy()
    fed_ids = torch.cat(fed, dim=1).tolist() if fed else [[] for _ in range(prompt.shape[0])]
    return logits, fed_ids


# -------------------------------------------------------------------- router near-ties


def router_margins(folder_or_model, input_ids) -> np.ndarray:
    """Smallest relative gap between the k-th and (k+1)-th `scores_for_choice` over
    all MoE layers, per position: float array [B, T].

    Gap is relative to max(1, |k-th score|); scores (sigmoid + bias) are O(1), so this
    is an absolute gap in practice. A small gap means fp noise may flip the choice.
    """
    import torch
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearTopkRouter

    model = _as_model(folder_or_model)
    ids = torch.tensor(input_ids, dtype=torch.long)
    gaps = []

    def hook(router, args, _out):
        # Recompute the router's choice scores from its input (as in its forward).
        x = args[0].reshape(-1, router.hidden_dim).float()
        scores = torch.sigmoid(x @ router.weight.float().T) + router.e_score_correction_bias
        top = scores.topk(router.top_k + 1, dim=-1).values
        gap = (top[:, -2] - top[:, -1]) / top[:, -2].abs().clamp_min(1.0)
        gaps.append(gap.reshape(ids.shape))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, KimiLinearTopkRouter)]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not gaps:
        return np.full(tuple(ids.shape), np.inf)
    return torch.stack(gaps).amin(0).numpy()


def pick_untied_tokens(folder_or_model, n_tokens: int, batch: int = 1, margin: float = 1e-3,
                       seed: int = 0, rounds: int = 60) -> list[list[int]]:
    """Random token ids [batch][n_tokens] with no near-tie in any expert choice.

    Resamples only the offending positions (the earliest token that can move a
    position's routing is the token itself), a few rounds. Raises if it cannot.
    """
    model = _as_model(folder_or_model)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, n_tokens))
    for _ in range(rounds):
        bad = router_margins(model, ids.tolist()) < margin
        if not bad.any():
            return ids.tolist()
        ids[bad] = rng.integers(0, vocab, size=int(bad.sum()))
    raise RuntimeError(f"no untied token sequence found (T={n_tokens}, margin={margin}) in {rounds} rounds")


# ---------------------------------------------------------------------- planted bugs


def _plant_router_bias_zero(t: dict, cfg: dict) -> None:
    """Router choice without e_score_correction_bias."""
    for k in t:
        if k.endswith("gate.e_score_correction_bias"):
            t[k] = t[k] * 0


def _plant_w1_w3_swap(t: dict, cfg: dict) -> None:
    """Experts' gate (w1) and up (w3) projections exchanged."""
    for k in [k for k in t if k.endswith(".w1.weight")]:
        k3 = k[: -len("w1.weight")] + "w3.weight"
        t[k], t[k3] = t[k3], t[k]


def _plant_per_head_decay(t: dict, cfg: dict) -> None:
    """Forget gate per head instead of per channel: f_b_proj rows and dt_bias
    averaged within each head."""
    d = cfg["linear_attn_config"]["head_dim"]
    for k in t:
        if k.endswith("self_attn.f_b_proj.weight"):
            w = t[k]
            t[k] = w.reshape(-1, d, w.shape[-1]).mean(1, keepdim=True).expand(-1, d, -1).reshape(w.shape)
        elif k.endswith("self_attn.dt_bias"):
            b = t[k]
            t[k] = b.reshape(-1, d).mean(1, keepdim=True).expand(-1, d).reshape(b.shape)


def _plant_kv_norm_ones(t: dict, cfg: dict) -> None:
    """MLA latent norm without its weight."""
    for k in t:
        if k.endswith("kv_a_layernorm.weight"):
            t[k] = t[k] * 0 + 1


PLANTED_BUGS = {
    "router_bias_zero": _plant_router_bias_zero,
    "w1_w3_swap": _plant_w1_w3_swap,
    "per_head_decay": _plant_per_head_decay,
    "kv_norm_ones": _plant_kv_norm_ones,
}


def write_bug_variant(src_folder, dst_folder, bug: str) -> Path:
    """Copy a checkpoint with one known bug planted in its files (see PLANTED_BUGS)."""
    cfg = json.loads((Path(src_folder) / "config.json").read_text())
    tensors = {k: v.clone() for k, v in read_checkpoint(src_folder).items()}
    PLANTED_BUGS[bug](tensors, cfg)
    return write_checkpoint(dst_folder, cfg, tensors)


# ------------------------------------------------------------------ one fixture case


@dataclass
class ReferenceCase:
    """A checkpoint folder, its config dict and the transformers model read from it,
    with token picks memoised (T=600 takes seconds to find)."""

    folder: Path
    config: dict
    model: object
    _picked: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, folder, config_dict: dict, seed: int = 0, **kwargs) -> "ReferenceCase":
        """Build the checkpoint into `folder` and read the model back from it."""
        build_reference_checkpoint(folder, config_dict, seed=seed, **kwargs)
        return cls(Path(folder), json.loads((Path(folder) / "config.json").read_text()),
                   load_reference(folder))

    def tokens(self, n_tokens: int, batch: int = 1, seed: int = 0, margin: float = 1e-3) -> list[list[int]]:
        """Untied token ids [batch][n_tokens] for this model (see pick_untied_tokens)."""
        key = (n_tokens, batch, seed, margin)
        if key not in self._picked:
            self._picked[key] = pick_untied_tokens(self.model, n_tokens, batch, margin, seed)
        return [list(row) for row in self._picked[key]]

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Reference full-forward logits [B, T, V] float32."""
        return reference_logits(self.model, input_ids, attention_mask)

    def decode(self, prompt_ids, decode_ids, prefill_chunks=None) -> np.ndarray:
        """Reference prefill + teacher-forced decode logits [B, len(decode) + 1, V]."""
        logits, _ = reference_decode(self.model, prompt_ids, len(decode_ids[0]), prefill_chunks, decode_ids)
        return logits
