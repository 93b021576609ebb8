"""kimi-mlx against mlx-lm's `kimi_linear` on a GPU at the real size: one process, the very same arrays.

    PYTHONPATH=$PWD python3 bench/bench_gpu.py              # full size (27 layers, 256 experts, 4-bit)
    python bench/bench_gpu.py --tiny                        # a tiny model on the CPU: checks this script
    python bench/bench_gpu.py --only decode,breakdown       # some sections only

The model: random 4-bit weights (the router gate 8-bit, as mlx-lm quantizes it) in mlx-lm's
layout, generated on the device in seconds (random packed words, scales that keep activations
O(1)); both libraries' models are handed the SAME arrays (one copy in memory), so weights and
memory are shared and every difference is code. Sections (each prints as it finishes; the full
table is printed last and written as JSON to $OUT/bench_gpu.json or --out):

  decode     tok/s inside each library's own generate loop (kimi_mlx.generate.generate_tokens,
             mlx_lm.generate.generate_step), at 1k and 64k tokens of context; median of >= 5
             runs, the libraries alternating. The context is planted (random latents, KDA states
             and conv windows of the right shapes), not prefilled: decode cost depends on the
             cache's size, not its values, and prefilling 64k through mlx-lm takes minutes.
  breakdown  one synced decode step (forward + argmax): graph-building time on the host, op
             count (nodes of the graph, from mx.export_to_dot), and for kimi-mlx a per-op table
             of the step (each op evaluated on its own: the times add up to more than the step,
             but show where it goes).
  prefill    time to first token (TTFT) and prompt tok/s for prompts of 1k..128k tokens through
             each library's generate loop; ours up to the largest size whose predicted time fits
             --prefill-cap and the call's deadline (--budget), mlx-lm's while under --theirs-cap;
             then our variants at 4k (--prefill-steps, --prefill-experts, --prefill-combos).
  memory     per prefill size: our peak, the memory resident before it, against `kimi-mlx plan`
             for that context (mlx-lm's model beside ours keeps the pre-fusion copies of our
             decode-fused weights: counted and taken off, see fused_duplicate_bytes).
  agreement  float32 activations (float parameters cast, same quantized weights), 16 tokens:
             relative difference of our logits against mlx-lm's, top-1 agreement.
  mx_fast    mlx-lm with mx.fast.gated_delta_update substituted for its KDA (closer to what a
             Mac runs): decode at 1k and prefill at 1k / 4k.

Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kimi_mlx  # noqa: E402
from kimi_mlx.config import ModelArgs  # noqa: E402
from kimi_mlx.generate import DEFAULT_PREFILL_STEP, generate_tokens  # noqa: E402
from kimi_mlx.loading import _check_names_and_shapes, _quantize_like_checkpoint, cast_weights  # noqa: E402
from kimi_mlx.model import FP32_PARAMS, Model  # noqa: E402
from kimi_mlx.plan import plan_memory  # noqa: E402

FULL_CONFIG = ROOT / "tests" / "data" / "kimi_linear_48b_a3b_config.json"
TINY_CONFIG = {
    "model_type": "kimi_linear", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64,
    "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64,
    "mla_use_nope": True, "q_lora_rank": None, "num_experts": 8, "num_experts_per_token": 2,
    "moe_intermediate_size": 128, "num_shared_experts": 1, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.446, "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
    "num_expert_group": 1, "topk_group": 1, "use_grouped_topk": True, "moe_layer_freq": 1,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "model_max_length": 1048576, "tie_word_embeddings": False,
    "linear_attn_config": {"full_attn_layers": [4], "kda_layers": [1, 2, 3], "num_heads": 4, "head_dim": 64,
                           "short_conv_kernel_size": 4},
}
GROUP, BITS, GATE_BITS = 64, 4, 8
# Views and bookkeeping in export_to_dot's graph: nodes, but no kernel of their own.
VIEW_OPS = {"Reshape", "Broadcast", "Squeeze", "ExpandDims", "Transpose", "Slice", "StopGradient", "Depends",
            "AsStrided", "Split", "Unflatten", "Flatten"}


# --------------------------------------------------------------------------------------------
# The model: random 4-bit weights in mlx-lm's layout, shared by both libraries
# --------------------------------------------------------------------------------------------

def quantized_config(base: dict) -> dict:
    """config.json as mlx-lm writes it for a 4-bit conversion (its rule: the router gate at 8 bits)."""
    cfg = dict(base)
    q = {"group_size": GROUP, "bits": BITS}
    for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        q[f"model.layers.{i}.mlp.gate"] = {"group_size": GROUP, "bits": GATE_BITS}
    cfg["quantization"] = q
    return cfg


def random_weights(theirs, seed: int = 0) -> dict[str, mx.array]:
    """Random parameters for every array of mlx-lm's (quantized) model, evaluated a layer at a time.

    Packed words are random bits; scale s and bias -s (2^b - 1) / 2 make each dequantized weight
    uniform with std ~ 1 / sqrt(in), so activations stay O(1) through 27 layers."""
    mx.random.seed(seed)
    params = dict(tree_flatten(theirs.parameters()))
    out: dict[str, mx.array] = {}
    bf16, f32 = mx.bfloat16, mx.float32
    for name, p in params.items():
        base = name.rsplit(".", 1)[0]
        if p.dtype == mx.uint32:  # packed quantized words
            w = mx.random.randint(-(2**31), 2**31 - 1, p.shape, dtype=mx.int32).view(mx.uint32)
        elif name.endswith((".scales", ".biases")):
            bits = params[base + ".weight"].shape[-1] * 32 // (p.shape[-1] * GROUP)
            levels = 2**bits
            s = 1.0 / ((levels / 12**0.5) * (p.shape[-1] * GROUP) ** 0.5)
            w = mx.full(p.shape, s if name.endswith(".scales") else -s * (levels - 1) / 2, dtype=bf16)
        elif name.endswith("A_log"):
            w = mx.log(mx.random.uniform(1.0, 16.0, p.shape)).astype(f32)
        elif name.endswith(("dt_bias", "e_score_correction_bias")):
            w = (0.1 * mx.random.normal(p.shape)).astype(f32)
        elif name.endswith("conv.weight"):
            w = (0.5 * mx.random.normal(p.shape)).astype(bf16)
        elif p.ndim == 1:  # norm weights
            w = mx.ones(p.shape, dtype=bf16)
        else:
            w = (mx.random.normal(p.shape) * p.shape[-1] ** -0.5).astype(bf16)
        out[name] = w
        if name.endswith(".weight") or len(out) % 16 == 0:
            mx.eval(w)
    mx.eval(list(out.values()))
    return out


def build_models(config: dict):
    """(theirs: mlx-lm's Model, ours: kimi_mlx's Model, weights) holding the same arrays."""
    from mlx_lm.models import kimi_linear

    margs = kimi_linear.ModelArgs.from_dict(config)
    theirs = kimi_linear.Model(margs)  # random init is lazy: never computed, replaced below
    nn.quantize(theirs, group_size=GROUP, bits=BITS,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and theirs.quant_predicate(p, m))
    weights = random_weights(theirs)
    theirs.load_weights(list(weights.items()), strict=True)
    theirs.eval()

    args = ModelArgs.from_dict(config)
    ours = Model(args)
    _quantize_like_checkpoint(ours, args, weights)
    _check_names_and_shapes(ours, weights, {}, Path("<bench weights>"))
    ours.load_weights(list(cast_weights(weights, None).items()), strict=True)
    ours.eval()
    return theirs, ours, weights


# --------------------------------------------------------------------------------------------
# Caches with a planted context (decode cost depends on the cache's size, not its values)
# --------------------------------------------------------------------------------------------

def planted_caches(config: dict, context: int, seed: int):
    """(our cache list, mlx-lm's cache list) for `context` tokens already seen, same random content."""
    from mlx_lm.models.cache import ArraysCache, KVCache

    key = mx.random.key(seed)
    args = ModelArgs.from_dict(config)
    H, D, K = args.kda_heads, args.kda_head_dim, args.conv_kernel
    R, P = args.kv_lora_rank, args.qk_rope_head_dim
    ours, theirs = [], []
    for i in range(args.num_hidden_layers):
        key, k1, k2 = mx.random.split(key, 3)
        if args.is_kda_layer(i):
            conv = [(0.5 * mx.random.normal((1, K - 1, H * D), key=k)).astype(mx.bfloat16)
                    for k in mx.random.split(k1, 3)]
            state = 0.1 * mx.random.normal((1, H, D, D), key=k2)
            c = kimi_mlx.cache.KDACache()
            c.conv, c.recurrent, c.offset = list(conv), state, context
            t = ArraysCache(size=4)
            for j, a in enumerate([*conv, state]):
                t[j] = a
            t.advance(context) if hasattr(t, "advance") else None
            ours.append(c)
            theirs.append(t)
        else:
            latent = mx.random.normal((1, context, R + P), key=k1).astype(mx.bfloat16)
            c = kimi_mlx.cache.LatentCache()
            c.update(latent)
            t = KVCache()
            t.update_and_fetch(latent[:, None, :, :R], latent[:, None, :, R:])
            ours.append(c)
            theirs.append(t)
    mx.eval([c.state for c in ours], [c.state for c in theirs])
    return ours, theirs


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

class Deadline:
    """The call's time budget: a measurement runs only when its predicted time fits what is left."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, predicted: float) -> bool:
        return predicted < self.left()


@contextmanager
def decode_path(name: str | None):
    """Our decode steps on one path ("compiled" / "eager", kimi_mlx/decode.py) for a while."""
    from kimi_mlx.decode import set_decode_path

    set_decode_path(name)
    try:
        yield
    finally:
        set_decode_path(None)


@contextmanager
def forced(kda: str | None = None, experts: str | None = None, kernels: str | None = None):
    """Our KDA path / expert path / kernel mode forced for a while (kimi_mlx's own switches)."""
    from kimi_mlx.experts import set_expert_path
    from kimi_mlx.kda import set_kda_path, set_kernel_mode

    set_kda_path(kda)
    set_expert_path(experts)
    set_kernel_mode(kernels)
    try:
        yield
    finally:
        set_kda_path(None)
        set_expert_path(None)
        set_kernel_mode(None)


# Our variants measured beside the default (name -> context manager factory): the KDA layer's
# one-kernel decode step against its ops step, and the experts' direct path against mlx-lm's
# SwitchGLU (the reference). The eager decode path is timed in the step section.
DECODE_VARIANTS = {"ours-kernels-ops": lambda: forced(kernels="ops"),
                   "ours-experts-gather": lambda: forced(experts="gather")}


def decode_run(lib: str, model, cache, n_tokens: int, token: int = 1, gen_kwargs=None) -> float:
    """tok/s of `n_tokens` decoded by the library's own loop after one prompt token (first token
    excluded: it is the prompt's). lib: "ours", "theirs" or one of DECODE_VARIANTS."""
    if lib in DECODE_VARIANTS:
        with DECODE_VARIANTS[lib]():
            return decode_run("ours", model, cache, n_tokens, token, gen_kwargs)
    if lib == "ours":
        gen = generate_tokens(model, mx.array([token]), cache, max_tokens=n_tokens, **(gen_kwargs or {}))
    else:
        from mlx_lm.generate import generate_step

        gen = generate_step(mx.array([token]), model, prompt_cache=cache, max_tokens=n_tokens)
    t_first = None
    n = 0
    for n, _ in enumerate(gen, start=1):
        if n == 1:
            t_first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - t_first)


def ttft_run(lib: str, model, config: dict, prompt: mx.array, **kwargs) -> float:
    """Seconds from the call to the first generated token, fresh cache (prompt processing included)."""
    t0 = time.perf_counter()
    if lib == "ours":
        gen = generate_tokens(model, prompt, model.make_cache(), max_tokens=1, **kwargs)
    else:
        from mlx_lm.generate import generate_step

        gen = generate_step(prompt, model, prompt_cache=model.make_cache(), max_tokens=1)
    next(iter(gen))
    return time.perf_counter() - t0


def count_ops(*outputs) -> tuple[int, int]:
    """(all graph nodes, nodes that run a kernel) of the lazy graph behind `outputs`."""
    path = "/tmp/_bench_gpu_graph.dot"
    mx.export_to_dot(path, *outputs)
    labels = [line.split('label ="', 1)[1].split('"', 1)[0] for line in open(path) if "shape=rectangle" in line]
    os.remove(path)
    return len(labels), sum(1 for lab in labels if lab not in VIEW_OPS)


def step_profile(lib: str, model, cache, repeats: int) -> dict:
    """One decode step (forward + argmax, synced), median: host graph-building time, total, op count."""
    y = mx.array([[1]])
    build, total = [], []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        logits = model(y, cache=cache)
        nxt = mx.argmax(logits[:, -1], axis=-1)
        t1 = time.perf_counter()
        if i == 0:
            ops, kernels = count_ops(nxt)
        mx.eval(nxt)
        t2 = time.perf_counter()
        if i >= 2:  # two warm-ups
            build.append(t1 - t0)
            total.append(t2 - t0)
        y = nxt[None]
    return {"step_ms": 1e3 * statistics.median(total), "host_build_ms": 1e3 * statistics.median(build),
            "graph_nodes": ops, "kernel_nodes": kernels}


@contextmanager
def per_op_timer(model):
    """Time every op of our decode step on its own: each timed call is evaluated before returning.

    Wraps the class __call__ of the modules and the functions the layers call; a timed call inside
    another is subtracted from it (self time). Rows are keyed by layer kind and the op's path
    below the layer, so the 20 KDA layers add into one row per op."""
    from mlx_lm.models.switch_layers import SwitchGLU

    from kimi_mlx import kda_layer, mla_layer, moe

    kinds = {}
    for i, layer in enumerate(model.layers):
        kind = "kda" if layer.is_kda else "mla"
        kind += "+moe" if isinstance(layer.mlp, moe.SparseMoE) else "+dense"
        for path, m in layer.named_modules():
            kinds[id(m)] = f"{kind}:{path or 'layer'}"
    kinds[id(model.model.norm)] = "final norm"
    kinds[id(model.lm_head)] = "lm_head"
    kinds[id(model.model.embed_tokens)] = "embed"
    rows: dict[str, list[float]] = {}
    stack: list[float] = []  # child time accumulated per open timed call
    current = ["?"]  # the layer kind of the module being run (for plain functions)

    def timed(fn, label_of):
        def wrapper(*a, **k):
            label = label_of(a)
            stack.append(0.0)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            mx.eval(out)
            dt = time.perf_counter() - t0
            child = stack.pop()
            if stack:
                stack[-1] += dt
            rows.setdefault(label, [0.0, 0])
            rows[label][0] += dt - child
            rows[label][1] += 1
            return out

        return wrapper

    def module_label(a):
        label = kinds.get(id(a[0]), type(a[0]).__name__)
        current[0] = label.split(":")[0]
        return label

    patches = []
    for cls in {type(m) for _, m in model.named_modules()} | {SwitchGLU}:
        if "__call__" in cls.__dict__ and cls.__name__ not in ("Model", "KimiLinearModel", "DecoderLayer"):
            patches.append((cls, "__call__", cls.__call__, timed(cls.__call__, module_label)))
    for mod, name in ((kda_layer, "kda_update"), (kda_layer, "l2_normalize"), (moe, "route"),
                      (moe, "run_experts")):
        fn = getattr(mod, name)
        patches.append((mod, name, fn, timed(fn, lambda a, n=name: f"{current[0]}:{n}()")))
    for cls, name in ((kda_layer.KimiDeltaAttention, "forget_gate"),):
        fn = getattr(cls, name)
        patches.append((cls, name, fn, timed(fn, lambda a, n=name: f"{current[0]}:self_attn.{n}()")))
    if hasattr(mla_layer, "_Attention"):
        fn = mla_layer._Attention.attend
        patches.append((mla_layer._Attention, "attend", fn, timed(fn, lambda a: f"{current[0]}:attend()")))
    for owner, name, _, new in patches:
        setattr(owner, name, new)
    try:
        yield rows
    finally:
        for owner, name, old, _ in patches:
            setattr(owner, name, old)


def per_op(model, inputs, cache_fn, repeats: int = 3) -> tuple[list, float]:
    """Per-op self times of model(inputs) on the eager path, the last of `repeats` calls, each on
    a fresh cache_fn(). Returns (rows sorted by time, their sum in ms)."""
    with decode_path("eager"), per_op_timer(model) as rows:
        for _ in range(repeats):
            for r in rows.values():
                r[0], r[1] = 0.0, 0
            cache = cache_fn()
            mx.eval(mx.argmax(model(inputs, cache=cache)[:, -1], axis=-1))
    total = sum(r[0] for r in rows.values())
    out = sorted(({"op": k, "ms": 1e3 * v[0], "calls": v[1], "share": v[0] / total} for k, v in rows.items()),
                 key=lambda r: -r["ms"])
    return out, 1e3 * total


def steps(ours, theirs, config, context: int, repeats: int) -> dict:
    """One synced decode step of each (and ours eager): time, host time, op counts."""
    c_ours, c_theirs = planted_caches(config, context, seed=1)
    res = {"context": context, "kimi-mlx": step_profile("ours", ours, c_ours, repeats),
           "mlx-lm": step_profile("theirs", theirs, c_theirs, repeats)}
    with decode_path("eager"):
        res["kimi-mlx eager"] = step_profile("ours", ours, c_ours, repeats)
    return res


def breakdown(ours, config, context: int, repeats: int) -> dict:
    """Where our decode step (and a prefill step) goes: per-op and per-layer-kind tables (eager)."""
    c_ours, _ = planted_caches(config, context, seed=1)
    res = {"context": context}
    res["per_op"], res["per_op_sum_ms"] = per_op(ours, mx.array([[1]]), lambda: planted_caches(config, context, 1)[0])
    T = DEFAULT_PREFILL_STEP
    prompt = mx.random.randint(0, config["vocab_size"], (1, T), key=mx.random.key(3))
    res["prefill_step_tokens"] = T
    res["prefill_per_op"], res["prefill_per_op_sum_ms"] = per_op(ours, prompt, ours.make_cache)
    # Per layer kind: one layer's synced forward at T=1 (median), ops of its graph.
    kinds = {}
    h = mx.random.normal((1, 1, config["hidden_size"])).astype(mx.bfloat16)
    for i, layer in enumerate(ours.layers):
        kind = ("kda" if layer.is_kda else "mla") + ("+moe" if i >= config["first_k_dense_replace"] else "+dense")
        if kind in kinds:
            kinds[kind]["count"] += 1
            continue
        times = []
        with decode_path("eager"):
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                out = layer(h, None, c_ours[i])
                t1 = time.perf_counter()
                mx.eval(out)
                times.append((t1 - t0, time.perf_counter() - t0))
            nodes, kern = count_ops(layer(h, None, c_ours[i]))
        kinds[kind] = {"count": 1, "host_build_ms": 1e3 * statistics.median(t[0] for t in times[1:]),
                       "synced_ms": 1e3 * statistics.median(t[1] for t in times[1:]), "graph_nodes": nodes,
                       "kernel_nodes": kern}
    res["per_layer_kind"] = kinds
    return res


@contextmanager
def mx_fast_in_mlx_lm():
    """mlx-lm's kimi_linear with its KDA recurrence on mx.fast.gated_delta_update."""
    from mlx_lm.models import gated_delta, kimi_linear

    original = kimi_linear.gated_delta_update

    def fast(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, **kw):
        if mask is not None:
            return original(q, k, v, a, b, A_log, dt_bias, state, mask, **kw)
        f32 = mx.float32
        g = gated_delta.compute_g(A_log, a, dt_bias)
        beta = mx.sigmoid(b)
        if state is None:
            B, _, H, Dk = q.shape
            state = mx.zeros((B, H, v.shape[-1], Dk), f32)
        y, state = mx.fast.gated_delta_update(q.astype(f32), k.astype(f32), v.astype(f32), g.astype(f32),
                                              beta.astype(f32), state)
        return y.astype(q.dtype), state

    kimi_linear.gated_delta_update = fast
    try:
        yield
    finally:
        kimi_linear.gated_delta_update = original


def agreement(ours, theirs, config, n_tokens: int = 16) -> dict:
    """Logits of both models with float32 activations (float parameters cast; the quantized words
    are the same), relative difference per position, and top-1 agreement."""
    tokens = mx.random.randint(0, config["vocab_size"], (1, n_tokens), key=mx.random.key(7))
    res = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        saved = dict(tree_flatten(model.parameters()))
        model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
        res[name] = model(tokens, cache=model.make_cache()).astype(mx.float32)[0]
        mx.eval(res[name])
        model.load_weights(list(saved.items()))
        del saved
    a, b = res["ours"], res["theirs"]
    rel = mx.linalg.norm(a - b, axis=-1) / mx.linalg.norm(b, axis=-1)
    rel = sorted(rel.tolist())
    top1 = (mx.argmax(a, -1) == mx.argmax(b, -1)).mean().item()
    return {"tokens": n_tokens, "median_rel_diff": rel[len(rel) // 2], "max_rel_diff": rel[-1], "top1_agree": top1,
            "tf32": os.environ.get("MLX_ENABLE_TF32", "(unset)")}


# --------------------------------------------------------------------------------------------

def prefill_section(ours, theirs, config: dict, sizes, a, deadline: Deadline) -> dict:
    """TTFT and prompt tok/s per size, ours to the largest size the time allows, mlx-lm while one
    run is predicted under --theirs-cap; then our variants (prefill step, expert path) at 4k.
    Memory per run: the active memory before it (what stays resident) and the peak during it."""
    rows, rate = {}, {"ours": None, "theirs": None}
    warm = mx.random.randint(0, config["vocab_size"], (256,))
    for lib, model in (("ours", ours), ("theirs", theirs)):
        ttft_run(lib, model, config, warm)
    caps = {"ours": a.prefill_cap, "theirs": a.theirs_cap}
    for T in sizes:
        prompt = mx.random.randint(0, config["vocab_size"], (T,), key=mx.random.key(T))
        row = {}
        for lib, model in (("ours", ours), ("theirs", theirs)):
            predicted = T / rate[lib] if rate[lib] else 10.0
            if predicted > caps[lib] or not deadline.allows(predicted + 20):
                row[lib] = {"skipped": f"predicted {predicted:.0f} s"}
                continue
            reps = 2 if T <= 4096 else 1
            times, peaks, resident = [], [], []
            for _ in range(reps):
                gc.collect()
                mx.clear_cache()
                resident.append(mx.get_active_memory())
                mx.reset_peak_memory()
                times.append(ttft_run(lib, model, config, prompt))
                peaks.append(mx.get_peak_memory())
            t = min(times)
            rate[lib] = T / t
            row[lib] = {"ttft_s": t, "tok_s": T / t, "peak_gib": max(peaks) / 2**30,
                        "resident_gib": max(resident) / 2**30, "runs_s": times}
        if "tok_s" in row.get("ours", {}) and "tok_s" in row.get("theirs", {}):
            row["ratio"] = row["ours"]["tok_s"] / row["theirs"]["tok_s"]
        rows[T] = row
        print(f"prefill {T}: {row}", flush=True)
    variants = [(f"step_{s}", {"prefill_step": int(s)}, None) for s in a.prefill_steps.split(",") if s]
    variants += [(f"experts_{e}", {}, e) for e in a.prefill_experts.split(",") if e]
    variants += [(f"step_{c.split(':')[0]}+experts_{c.split(':')[1]}", {"prefill_step": int(c.split(":")[0])},
                  c.split(":")[1]) for c in a.prefill_combos.split(",") if c]
    T = sizes[1]
    prompt = mx.random.randint(0, config["vocab_size"], (T,), key=mx.random.key(T))
    for name, kw, experts in variants:
        if not deadline.allows(3 * T / (rate["ours"] or 100)):
            continue
        with forced(experts=experts):
            ttft_run("ours", ours, config, prompt[:kw.get("prefill_step", DEFAULT_PREFILL_STEP) + 1], **kw)
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            t = ttft_run("ours", ours, config, prompt, **kw)
        rows[T][f"ours_{name}"] = {"ttft_s": t, "tok_s": T / t, "peak_gib": mx.get_peak_memory() / 2**30}
        print(f"prefill {T}, ours with {name}: {T / t:.0f} tok/s", flush=True)
    return rows


def fused_duplicate_bytes(model) -> int:
    """Bytes of our decode-fused weight buffers (kimi_mlx.fused). In normal use the
    layers' weights become views of them (no extra memory); here mlx-lm's model still holds the
    original arrays, so in this bench they are a second copy resident beside the shared weights."""
    n = 0
    for layer in model.layers:
        for key in ("_decode_fusions", "_mla_fusion", "_mlp_fusion"):
            f = layer.__dict__.get(key)
            for fp in (f if isinstance(f, list) else [f]) if f is not None else []:
                parts = [fp.gate_up, fp.down] if hasattr(fp, "gate_up") else [fp]  # FusedMoE: two buffers
                n += sum(x.nbytes for part in parts for x in part._arrays)
    return n


def memory_rows(ours, config: dict, prefill: dict) -> dict:
    """Our peak per prefill size against `kimi-mlx plan` for that context (same prefill step).
    over_plan: the peak less this bench's own extras (mlx-lm's model is loaded beside ours and
    holds the pre-fusion weights: fused_duplicate_bytes) over the plan's total."""
    dup = fused_duplicate_bytes(ours)
    out = {}
    for T, row in prefill.items():
        r = row.get("ours", {})
        if "peak_gib" not in r:
            continue
        plan = plan_memory(config, T + 1, prefill_step=DEFAULT_PREFILL_STEP, memory_bytes=1 << 40)
        peak = r["peak_gib"] - dup / 2**30
        out[T] = {"peak_gib": r["peak_gib"], "resident_gib": r["resident_gib"], "bench_duplicates_gib": dup / 2**30,
                  "plan_gib": plan.total / 2**30, "plan_weights_gib": plan.weights / 2**30,
                  "plan_activations_gib": plan.activations / 2**30,
                  "plan_caches_gib": (plan.kda_states + plan.latent_cache) / 2**30, "over_plan": peak / (plan.total / 2**30)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model (checks this script on the CPU)")
    ap.add_argument("--only", default="decode,breakdown,prefill,memory,agreement,mx_fast")
    ap.add_argument("--budget", type=float, default=500.0, help="seconds this call may take in all")
    ap.add_argument("--prefill-cap", type=float, default=90.0, help="seconds one prefill of ours may take")
    ap.add_argument("--theirs-cap", type=float, default=60.0, help="seconds one prefill of mlx-lm's may take")
    ap.add_argument("--runs", type=int, default=5, help="decode runs per library and context")
    ap.add_argument("--out", default=None)
    ap.add_argument("--prefill-steps", default="", help="also time our prefill of 4k at these steps (e.g. 1024,2048)")
    ap.add_argument("--prefill-combos", default="", help="also time our prefill of 4k at STEP:EXPERT_PATH pairs "
                    "(e.g. 2048:grouped)")
    ap.add_argument("--prefill-experts", default="", help="also time our prefill of 4k with these expert paths")
    a = ap.parse_args()
    deadline = Deadline(a.budget)
    sections = set(a.only.split(","))
    t_start = time.perf_counter()

    base = TINY_CONFIG if a.tiny else json.loads(FULL_CONFIG.read_text())
    config = quantized_config(base)
    contexts = (64, 1024) if a.tiny else (1024, 65536)
    prefill_sizes = (64, 256, 1024) if a.tiny else (1024, 4096, 16384, 65536, 131072)
    decode_tokens = 8 if a.tiny else 32
    out_path = Path(a.out or os.path.join(os.environ.get("OUT", str(ROOT / "bench" / "gpu")), "bench_gpu.json"))
    result = {"device": str(mx.default_device()), "mlx": mx.__version__, "tiny": a.tiny,
              "env": {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "KIMI_MLX_"))}}
    try:
        from importlib.metadata import version

        result["mlx_lm"] = version("mlx-lm")
        result["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (int, float, str))}
    except Exception as e:  # informational only
        result["device_info_error"] = str(e)

    def save():
        """Write the JSON so far, with the seconds since start at each save (section timings)."""
        result.setdefault("elapsed_s", []).append(round(time.perf_counter() - t_start, 1))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str))
        print(f"[{result['elapsed_s'][-1]:.0f} s]", flush=True)

    t0 = time.perf_counter()
    theirs, ours, weights = build_models(config)
    result["build_s"] = time.perf_counter() - t0
    result["weights_gib"] = sum(w.nbytes for w in weights.values()) / 2**30
    print(f"built both models in {result['build_s']:.1f} s: {result['weights_gib']:.2f} GiB of shared weights, "
          f"active memory {mx.get_active_memory() / 2**30:.2f} GiB", flush=True)
    del weights

    if "decode" in sections:
        rows = {}
        for ctx in contexts:
            libs = ("ours", "theirs", *DECODE_VARIANTS)
            runs = {lib: [] for lib in libs}
            for r in range(a.runs + 1):  # run 0 warms up (kernel compiles)
                for lib in libs if r % 2 == 0 else libs[::-1]:
                    c_ours, c_theirs = planted_caches(config, ctx, seed=r)
                    model = theirs if lib == "theirs" else ours
                    tps = decode_run(lib, model, c_theirs if lib == "theirs" else c_ours, decode_tokens)
                    if r:
                        runs[lib].append(tps)
                    del c_ours, c_theirs
            rows[ctx] = {lib: {"median": statistics.median(v), "runs": v} for lib, v in runs.items()}
            rows[ctx]["ratio"] = rows[ctx]["ours"]["median"] / rows[ctx]["theirs"]["median"]
            print(f"decode at {ctx} context: " + ", ".join(f"{lib} {rows[ctx][lib]['median']:.1f} tok/s" for lib in libs)
                  + f" (ours/mlx-lm {rows[ctx]['ratio']:.2f}x)", flush=True)
        result["decode"] = rows
        save()

    if "decode" in sections:
        result["steps"] = b = steps(ours, theirs, config, contexts[0], repeats=5)
        print(f"decode step at {contexts[0]}: ours {b['kimi-mlx']}, mlx-lm {b['mlx-lm']}", flush=True)
        print(f"ours eager: {b['kimi-mlx eager']}", flush=True)
        save()

    def print_breakdown(b):
        for what in ("per_op", "prefill_per_op"):
            print(f"{what} (eager, each op synced; sum {b[what + '_sum_ms']:.1f} ms):", flush=True)
            for r in b[what][:30]:
                print(f"  {r['op']:42s} {r['ms']:7.2f} ms  {r['share']:5.1%}  x{r['calls']}", flush=True)
        for kind, r in b["per_layer_kind"].items():
            print(f"  layer {kind:10s} x{r['count']:2d}: {r['synced_ms']:.2f} ms synced, host {r['host_build_ms']:.2f} ms, "
                  f"{r['graph_nodes']} nodes ({r['kernel_nodes']} kernels)", flush=True)

    if "prefill" in sections or "memory" in sections:
        result["prefill"] = prefill_section(ours, theirs, config, prefill_sizes, a, deadline)
        result["memory"] = memory_rows(ours, config, result["prefill"])
        for T, m in result["memory"].items():
            print(f"memory, prefill {T}: {m}", flush=True)
        save()

    if "agreement" in sections and deadline.allows(15):
        result["agreement"] = agreement(ours, theirs, config)
        print(f"fp32 agreement: {result['agreement']}", flush=True)
        save()

    if "mx_fast" in sections and deadline.allows(40):
        row = {}
        with mx_fast_in_mlx_lm():
            runs = []
            for r in range(3):
                _, c_theirs = planted_caches(config, contexts[0], seed=r)
                tps = decode_run("theirs", theirs, c_theirs, decode_tokens)
                if r:
                    runs.append(tps)
            row["decode_tok_s"] = statistics.median(runs)
            for T in prefill_sizes[:1]:
                prompt = mx.random.randint(0, config["vocab_size"], (T,), key=mx.random.key(T))
                ttft_run("theirs", theirs, config, prompt[:64])
                row[f"prefill_{T}_tok_s"] = T / ttft_run("theirs", theirs, config, prompt)
        result["mlx_lm_mx_fast"] = row
        print(f"mlx-lm with mx.fast.gated_delta_update: {row}", flush=True)
        save()

    if "breakdown" in sections and deadline.allows(60):
        result["breakdown"] = breakdown(ours, config, contexts[0], repeats=5)
        print_breakdown(result["breakdown"])
        save()

    result["total_s"] = time.perf_counter() - t_start
    save()
    print_table(result, contexts)
    print(f"wrote {out_path}")


def print_table(r: dict, contexts) -> None:
    print(f"\n## bench_gpu: kimi-mlx vs mlx-lm {r.get('mlx_lm', '?')}, mlx {r['mlx']}, {r['device']}"
          f"{' (TINY model)' if r['tiny'] else ''}; env {r['env'] or '{}'}")
    print("| | kimi-mlx | mlx-lm | ratio |")
    print("| --- | --- | --- | --- |")
    for ctx, row in r.get("decode", {}).items():
        print(f"| decode tok/s, {ctx} context (median of {len(row['ours']['runs'])}) | {row['ours']['median']:.1f} | "
              f"{row['theirs']['median']:.1f} | {row['ratio']:.2f}x |")
        for lib in DECODE_VARIANTS:
            if row.get(lib, {}).get("runs"):
                print(f"| ({lib}) | {row[lib]['median']:.1f} | | {row[lib]['median'] / row['theirs']['median']:.2f}x |")
    b = r.get("steps")
    if b:
        o, t = b["kimi-mlx"], b["mlx-lm"]
        print(f"| one decode step, synced, {b['context']} context (ms) | {o['step_ms']:.1f} | {t['step_ms']:.1f} | "
              f"{t['step_ms'] / o['step_ms']:.2f}x |")
        print(f"| of which host graph building (ms) | {o['host_build_ms']:.1f} | {t['host_build_ms']:.1f} | |")
        e = b.get("kimi-mlx eager")
        if e:
            print(f"| (ours, eager decode path: step / host / nodes) | {e['step_ms']:.1f} ms / {e['host_build_ms']:.1f} ms"
                  f" / {e['graph_nodes']} ({e['kernel_nodes']}) | | {t['step_ms'] / e['step_ms']:.2f}x |")
        print(f"| graph nodes per token (kernels) | {o['graph_nodes']} ({o['kernel_nodes']}) | "
              f"{t['graph_nodes']} ({t['kernel_nodes']}) | |")
    for T, row in r.get("prefill", {}).items():
        cell = lambda x: f"{x['tok_s']:.0f} tok/s, TTFT {x['ttft_s']:.2f} s" if "tok_s" in x else x.get("skipped", "-")  # noqa: E731
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ""
        print(f"| prefill {T} | {cell(row.get('ours', {}))} | {cell(row.get('theirs', {}))} | {ratio} |")
        for k, v in row.items():
            if k.startswith("ours_"):
                print(f"| (ours, {k[5:]}) | {cell(v)} | | |")
    for T, m in (r.get("memory") or {}).items():
        print(f"| peak memory, prefill {T} (GiB) | {m['peak_gib']:.1f} (resident before {m['resident_gib']:.1f}, bench "
              f"duplicates {m['bench_duplicates_gib']:.2f}); plan {m['plan_gib']:.1f} (activations "
              f"{m['plan_activations_gib']:.2f}): {m['over_plan']:.0%} | | |")
    g = r.get("agreement")
    if g:
        print(f"| fp32 logits vs mlx-lm, {g['tokens']} tokens | median rel. diff {g['median_rel_diff']:.1e} "
              f"(max {g['max_rel_diff']:.1e}), top-1 {g['top1_agree']:.0%}, MLX_ENABLE_TF32={g['tf32']} | | |")
    f = r.get("mlx_lm_mx_fast")
    if f:
        print(f"| mlx-lm with mx.fast.gated_delta_update | | {', '.join(f'{k} {v:.1f}' for k, v in f.items())} | |")


if __name__ == "__main__":
    main()
