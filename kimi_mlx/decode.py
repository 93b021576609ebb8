"""Decode steps (one token per sequence) with each layer's fixed-shape work compiled.

Why: at decode a layer is ~130 kernels of a few KB each (bench/bench_gpu.py counts them), so a
token's cost is ops and host work, not bytes. `mx.compile` traces a layer's step once per shape
and replays it: elementwise chains fuse into single kernels and no Python runs per op. What is
compiled (all of it backend-neutral MLX, so Metal and CUDA gain alike):
  * a KDA layer whole: norms, projections, conv with its window, gate, the recurrence with its
    fp32 state, output gate, o_proj, then the MLP / MoE. Its inputs are the hidden state and the
    cache arrays, its outputs the new ones: the cache object is updated outside the trace;
  * an MLA layer in two pieces around the attention over the latent cache (whose key count grows
    every token, so it stays eager): the projections to q and the latent; then W_v, o_proj, the
    residual and the MLP / MoE.
Inside the traces, matmuls that read the same input run as one (kimi_mlx/fused.py: q/k/v,
f_a/g_a/b, MLA q/kv_a, SwiGLU gate/up; a MoE's routed and shared experts as one gather for
gate/up and one for down), and a KDA layer's three convs as one over 3C channels
(`_kda_attention`, checked against the eager layer by tests/test_decode.py).
The compiled functions take the layer's parameters as inputs (`inputs=layer`), so loading new
weights into a model needs no re-trace; a change of path switch (KDA path, kernel mode, expert
path) selects another trace, so every switch keeps its meaning. Prefill (T > 1), padded batches
and anything a trace refuses (a host read inside, e.g. a forced grouped expert path) run eager.

Which path runs: set_decode_path() > $KIMI_MLX_DECODE > auto (compiled on a GPU, eager on the
CPU: MLX's CPU compile builds C++ at the first call of each new shape, seconds each, which the
test suite's many tiny models would pay for little). "eager" is the plain reference.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn

from .cache import KDACache
from .fused import FusedLinears, FusedMoE, FusedParams
from .kda import get_kda_path, kda_decode_layer, kda_update
from .kda.prologue import l2_normalize, output_gate
from .moe_route import route_ready
from .precision import reduced_fp32_matmul
from .switch import PathSwitch

ENV_VAR = "KIMI_MLX_DECODE"
DECODE_PATHS = ("compiled", "eager")
_switch = PathSwitch("decode path", ENV_VAR, DECODE_PATHS)
_warned: set[str] = set()


def set_decode_path(name: str | None) -> None:
    """Force "compiled" or "eager" decode steps; None goes back to the env var / auto."""
    _switch.force(name, "set_decode_path")


def get_decode_path() -> str:
    """The path decode steps take now (auto resolved by the default device)."""
    forced = _switch.forced()
    if forced is not None:
        return forced
    return "eager" if mx.default_device() == mx.cpu else "compiled"


class DecodeStep:
    """What one token's decode step reads from the path switches, read ONCE per model call (the
    Model makes one and hands it to every layer) instead of in each of the 27 layers: the env
    reads and kernel-readiness checks were about a third of the host's graph building per token
    on the H200 (bench/gpu/host_profile.py). Switches changed between two model calls are seen
    by the next call; a step made by its layer alone (no Model) reads them itself."""

    def __init__(self, x: mx.array):
        self.path = get_decode_path()
        self.key: tuple = ()
        self._once: dict = {}
        if self.path == "compiled":
            from .experts import get_expert_path
            from .kda.metal import get_kernel_mode

            # What a trace depends on besides the layer and its kind: shapes, dtypes, every path
            # switch. str(device): Device objects hash by identity (a key that never matches
            # would re-trace every call).
            self.key = (x.shape, x.dtype, get_kda_path(), get_kernel_mode(), get_expert_path(),
                        str(mx.default_device()))

    def once(self, key, fn):
        """fn() the first time `key` is asked for in this step (layers of one shape share it)."""
        if key not in self._once:
            self._once[key] = fn()
        return self._once[key]


def _compiled(layer, key: tuple, build):
    """The layer's compiled function for this trace key (built on first use), or None when a
    trace of it failed before (then the eager path runs)."""
    cache = layer.__dict__.setdefault("_decode_fns", {})  # instance attribute, not a parameter
    if key not in cache:
        # One-time probes and self-checks evaluate arrays: before the trace, not inside it.
        reduced_fp32_matmul()
        bias = getattr(layer.mlp, "e_score_correction_bias", None)
        if bias is not None:  # a routed MoE: whether its router is the kernel (a trace constant)
            route_ready(bias.shape[0], layer.mlp.top_k, layer.mlp.renormalize)
        cache[key] = mx.compile(build(), inputs=layer)
    return cache[key]


def _run(layer, step: DecodeStep, kind: str, x: mx.array, build, *args):
    """Call the compiled function; if tracing it fails, warn once and remember to stay eager."""
    key = (kind, *step.key)
    fn = _compiled(layer, key, build)
    if fn is None:
        return None
    traced = layer.__dict__.setdefault("_decode_traced", set())
    # A trace that raises leaves mx.compile's placeholders in the layer (inputs=layer swaps its
    # arrays for the trace and does not swap them back): keep the arrays to put back.
    params = None if key in traced else layer.parameters()
    try:
        out = fn(x, *args)
        traced.add(key)
        return out
    except Exception as e:  # a trace that reads the host or an op compile refuses
        if params is not None:
            layer.update(params)
        layer.__dict__["_decode_fns"][key] = None
        what = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if what not in _warned:
            _warned.add(what)
            warnings.warn(f"compiled decode step failed ({what}); this layer decodes eagerly", RuntimeWarning,
                          stacklevel=3)
        return None


def _kda_fusions(layer) -> list[FusedParams] | None:
    """The KDA layer's input projections as two fused matmuls (q, k, v; f_a, g_a, b) and its three
    short convs as one over 3C channels, or None."""
    if "_decode_fusions" not in layer.__dict__:
        a = layer.self_attn
        groups = [[a.q_proj, a.k_proj, a.v_proj], [a.f_a_proj, a.g_a_proj, a.b_proj]]
        convs = [a.q_conv.conv, a.k_conv.conv, a.v_conv.conv]
        ok = all(FusedLinears.supported(g) for g in groups) and len({c.weight.dtype for c in convs}) == 1
        layer.__dict__["_decode_fusions"] = [*map(FusedLinears, groups), FusedParams(convs, ["weight"])] if ok else None
    return layer.__dict__["_decode_fusions"]


def _kda_attention(attn, x: mx.array, windows, state, qkv: mx.array, fgb, conv_w: mx.array, kernel: bool = False):
    """KimiDeltaAttention's decode step (T = 1, no padding) on fused inputs: the eager layer's math
    (kda_layer.py, the reference), with the three convs as one over 3C channels and the q, k L2
    norms as one; with `kernel`, conv to output gate as ONE kernel (kda_decode_layer, through the
    layer's kernel_step). qkv: [B, 1, 3C] fused projection; fgb: (f_a, g_a, b) outputs;
    conv_w: [3C, K, 1]. Returns (output [B, 1, hidden], windows 3 x [B, K-1, C], state)."""
    B, T, _ = x.shape
    if kernel:
        c = KDACache()
        c.conv, c.recurrent = windows, state
        y = attn.kernel_step(x, (None, None, None, *fgb), c, qkv=qkv, conv_w=conv_w)
        return y, c.conv, c.recurrent
    H, D = attn.num_heads, attn.head_dim
    C, K = H * D, conv_w.shape[1]
    xs = mx.concatenate([mx.concatenate(windows, axis=-1), qkv], axis=1)  # [B, K, 3C]
    w = conv_w[:, :, 0]  # [3C, K]
    out = xs[:, 0:T] * w[:, 0]
    for j in range(1, K):
        out = out + xs[:, j:j + T] * w[:, j]
    out = nn.silu(out)  # [B, 1, 3C]
    qk = l2_normalize(out[..., : 2 * C].reshape(B, T, 2 * H, D))  # [B, 1, 2H, D] fp32
    q, k = qk[:, :, :H] * (D**-0.5), qk[:, :, H:]
    v = out[..., 2 * C:].reshape(B, T, H, D)
    fa, ga, bx = fgb
    g = attn.forget_gate(x, fa)
    beta = mx.sigmoid(bx.astype(mx.float32))
    o, state = kda_update(q, k, v, g, beta, state)
    gate = attn.g_b_proj(ga).reshape(B, T, H, D)
    o = output_gate(o, gate.astype(x.dtype), attn.o_norm.weight, attn.o_norm.eps)
    return attn.o_proj(o.reshape(B, T, C)), mx.split(xs[:, T:], 3, axis=-1), state


def _mlp_fusion(layer) -> FusedMoE | FusedLinears | None:
    """The feed-forward block's fusion: a MoE's routed and shared experts as one gather (FusedMoE),
    else the SwiGLU's gate and up projections (dense MLP, or the MoE's shared expert) as one matmul."""
    if "_mlp_fusion" not in layer.__dict__:
        if FusedMoE.supported(layer.mlp):
            layer.__dict__["_mlp_fusion"] = FusedMoE(layer.mlp)
        else:
            swiglu = getattr(layer.mlp, "shared_experts", layer.mlp)
            group = [swiglu.gate_proj, swiglu.up_proj] if swiglu is not None and hasattr(swiglu, "gate_proj") else None
            ok = group is not None and FusedLinears.supported(group)
            layer.__dict__["_mlp_fusion"] = FusedLinears(group) if ok else None
    return layer.__dict__["_mlp_fusion"]


def _fused_arrays(fusions: list) -> list[mx.array]:
    return [a for f in fusions if f is not None for a in f.arrays()]


def _mlp_half(layer, h: mx.array, fusion: FusedMoE | FusedLinears | None, arrays) -> mx.array:
    """h + MLP(post_attention_layernorm(h)), on the layer's fusion when it has one."""
    z = layer.post_attention_layernorm(h)
    return h + (fusion.run(layer.mlp, z, arrays) if fusion is not None else layer.mlp(z))


def _kda_step(layer, kernel: bool = False):
    fusions, mlp_fusion = _kda_fusions(layer), _mlp_fusion(layer)

    def step(x, wq, wk, wv, state, *fused):
        h_in = layer.input_layernorm(x)
        if fusions is None:  # the layer's own code
            c = KDACache()
            c.conv, c.recurrent = [wq, wk, wv], state
            h, i = x + layer.self_attn(h_in, None, c), 0
            windows, state = c.conv, c.recurrent
        else:
            n0, n1 = len(fusions[0].names), len(fusions[1].names)
            qkv = fusions[0].matmul(h_in, fused[:n0])
            fgb = fusions[1](h_in, fused[n0:n0 + n1])
            y, windows, state = _kda_attention(layer.self_attn, h_in, [wq, wk, wv], state, qkv, fgb,
                                               fused[n0 + n1], kernel)
            h, i = x + y, n0 + n1 + 1
        return (_mlp_half(layer, h, mlp_fusion, fused[i:]), *windows, state)

    return step


# Where the Layer kernel sits in a compiled KDA step: inside the one trace of the layer (True),
# or between two traces (the projections before it; o_proj, residual and MLP after it), the
# shape of the MLA step. Measured by bench/gpu/check_kernels_mlx.py (layer section).
KERNEL_IN_TRACE = True


def _kda_project(layer):
    """The KDA layer's decode step up to the Layer kernel's inputs (the split structure)."""
    fusions = _kda_fusions(layer)

    def project(x, *fused):
        attn = layer.self_attn
        B, T, _ = x.shape
        h_in = layer.input_layernorm(x)
        n0, n1 = len(fusions[0].names), len(fusions[1].names)
        qkv = fusions[0].matmul(h_in, fused[:n0])
        fa, ga, bx = fusions[1](h_in, fused[n0:n0 + n1])
        f = attn.f_b_proj(fa).reshape(B, T, attn.num_heads, attn.head_dim)
        gate = attn.g_b_proj(ga).reshape(B, T, attn.num_heads, attn.head_dim)
        return qkv, f, bx, gate

    return project


def _kda_finish(layer):
    """The KDA layer's decode step after the Layer kernel: o_proj, residual, MLP (split structure)."""
    mlp_fusion = _mlp_fusion(layer)

    def finish(x, y, *fused):
        B, T, _ = x.shape
        h = x + layer.self_attn.o_proj(y.reshape(B, T, -1))
        return _mlp_half(layer, h, mlp_fusion, fused)

    return finish


def _kda_split(layer, step: DecodeStep, x, conv, state):
    """The compiled KDA step as project trace -> Layer kernel -> finish trace; None to go eager.
    Returns (h, windows, state)."""
    fusions = _kda_fusions(layer)
    kda_arrays = _fused_arrays(fusions[:2])
    out = _run(layer, step, "kda_project", x, lambda: _kda_project(layer), *kda_arrays)
    if out is None:
        return None
    qkv, f, bx, gate = out
    attn = layer.self_attn
    y, windows, state = kda_decode_layer(qkv, conv, fusions[2].arrays()[0], f, bx, attn.A_log, attn.dt_bias, gate,
                                         attn.o_norm.weight, attn.o_norm.eps, state)
    fused = _fused_arrays([_mlp_fusion(layer)])
    h = _run(layer, step, "kda_finish", x, lambda: _kda_finish(layer), y, *fused)
    return (h if h is not None else _kda_finish(layer)(x, y, *fused)), windows, state


def _mla_fusion(layer) -> FusedLinears | None:
    """The MLA layer's q and latent projections as one matmul."""
    if "_mla_fusion" not in layer.__dict__:
        group = [layer.self_attn.q_proj, layer.self_attn.kv_a_proj_with_mqa]
        layer.__dict__["_mla_fusion"] = FusedLinears(group) if FusedLinears.supported(group) else None
    return layer.__dict__["_mla_fusion"]


def _mla_project(layer):
    fusion = _mla_fusion(layer)

    def project(x, *fused):
        """x -> (absorbed queries [B, H*T, R+Dr], latent [B, T, R+Dr]): the query absorption
        (fixed shapes) in the trace, not among the attention's eager ops."""
        h_in = layer.input_layernorm(x)
        q, latent = layer.self_attn.project(h_in, fusion(h_in, fused) if fusion is not None else None)
        return layer.self_attn.absorb(q), latent

    return project


def _mla_finish(layer):
    mlp_fusion = _mlp_fusion(layer)

    def finish(x, o, *fused):
        h = x + layer.self_attn.output(o, x.dtype, absorbed=True)
        return _mlp_half(layer, h, mlp_fusion, fused)

    return finish


def decode_layer(layer, x: mx.array, cache, step: DecodeStep | None = None) -> mx.array | None:
    """One decode step of `layer` (a model.DecoderLayer) on x [B, 1, hidden], advancing `cache`;
    None when this step should run eagerly instead (the caller then runs the layer as usual).
    step: the model call's DecodeStep (made here when None)."""
    step = step if step is not None else DecodeStep(x)
    if step.path != "compiled":
        return None
    if layer.is_kda:
        if cache.conv is None:  # a fresh cache: zero windows and state, as the layer would start
            attn = layer.self_attn
            B, C = x.shape[0], attn.num_heads * attn.head_dim
            window = mx.zeros((B, attn.q_conv.kernel_size - 1, C), dtype=x.dtype)
            conv, state = [window] * 3, mx.zeros((B, attn.num_heads, attn.head_dim, attn.head_dim), mx.float32)
        else:
            conv, state = cache.conv, cache.recurrent
        # The kernels' one-time self-checks (on a GPU) evaluate arrays: run them here, not inside
        # the trace (kernel_step_ready asks the KDA path for one token first, then the Layer
        # kernel). With the Layer kernel ready, conv to output gate is that one kernel.
        attn = layer.self_attn
        kernel = step.once(("kda", attn.num_heads, attn.head_dim, attn.q_conv.kernel_size, x.dtype),
                           lambda: attn.kernel_step_ready(x.dtype))
        split = kernel and _kda_fusions(layer) is not None  # the kernel can also sit between two traces
        if not (split and not KERNEL_IN_TRACE):
            fused = _fused_arrays([*(_kda_fusions(layer) or []), _mlp_fusion(layer)])
            out = _run(layer, step, "kda_kernel" if kernel else "kda", x, lambda: _kda_step(layer, kernel), *conv, state,
                       *fused)
            if out is not None:
                h, *cache.conv, cache.recurrent = out
                cache.offset += x.shape[1]
                return h
            if not split:
                return None
        # The kernel between a projection trace and a finish trace: by choice, or because a trace
        # holding the kernel failed (then _run has warned once).
        out = _kda_split(layer, step, x, conv, state)
        if out is None:
            return None
        h, cache.conv, cache.recurrent = out
        cache.offset += x.shape[1]
        return h
    if not layer.self_attn.absorbs(x.shape[1]):
        return None
    qa = _run(layer, step, "mla_project", x, lambda: _mla_project(layer), *_fused_arrays([_mla_fusion(layer)]))
    if qa is None:
        return None
    q, latent = qa
    o = layer.self_attn.attend(q, latent, cache)  # the cache has advanced: no way back to eager
    fused = _fused_arrays([_mlp_fusion(layer)])
    h = _run(layer, step, "mla_finish", x, lambda: _mla_finish(layer), o, *fused)
    return h if h is not None else _mla_finish(layer)(x, o, *fused)
