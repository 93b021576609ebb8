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

from .cache import KDACache
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


def _trace_key(kind: str, x: mx.array) -> tuple:
    """What a trace depends on besides the layer: shapes, dtypes and every path switch."""
    from .experts import get_expert_path
    from .kda import get_kda_path
    from .kda.metal import get_kernel_mode

    # str(device): Device objects hash by identity, and a key that never matches re-traces every call.
    return (kind, x.shape, x.dtype, get_kda_path(), get_kernel_mode(), get_expert_path(), str(mx.default_device()))


def _compiled(layer, kind: str, x: mx.array, build):
    """The layer's compiled function for this trace key (built on first use), or None when a
    trace of it failed before (then the eager path runs)."""
    reduced_fp32_matmul()  # its one-time probe evaluates arrays: not inside a trace
    cache = layer.__dict__.setdefault("_decode_fns", {})  # instance attribute, not a parameter
    key = _trace_key(kind, x)
    if key not in cache:
        cache[key] = mx.compile(build(), inputs=layer)
    return cache[key]


def _run(layer, kind: str, x: mx.array, build, *args):
    """Call the compiled function; if tracing it fails, warn once and remember to stay eager."""
    fn = _compiled(layer, kind, x, build)
    if fn is None:
        return None
    try:
        return fn(x, *args)
    except Exception as e:  # a trace that reads the host or an op compile refuses
        layer.__dict__["_decode_fns"][_trace_key(kind, x)] = None
        what = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if what not in _warned:
            _warned.add(what)
            warnings.warn(f"compiled decode step failed ({what}); this layer decodes eagerly", RuntimeWarning,
                          stacklevel=3)
        return None


def _kda_step(layer):
    def step(x, wq, wk, wv, state):
        c = KDACache()
        c.conv, c.recurrent = [wq, wk, wv], state
        h = x + layer.self_attn(layer.input_layernorm(x), None, c)
        return (h + layer.mlp(layer.post_attention_layernorm(h)), *c.conv, c.recurrent)

    return step


def _mla_project(layer):
    def project(x):
        return layer.self_attn.project(layer.input_layernorm(x))

    return project


def _mla_finish(layer):
    def finish(x, o):
        h = x + layer.self_attn.output(o, x.dtype, absorbed=True)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    return finish


def decode_layer(layer, x: mx.array, cache) -> mx.array | None:
    """One decode step of `layer` (a model.DecoderLayer) on x [B, 1, hidden], advancing `cache`;
    None when this step should run eagerly instead (the caller then runs the layer as usual)."""
    if get_decode_path() != "compiled":
        return None
    if layer.is_kda:
        if cache.conv is None:  # a fresh cache: zero windows and state, as the layer would start
            attn = layer.self_attn
            B, C = x.shape[0], attn.num_heads * attn.head_dim
            window = mx.zeros((B, attn.q_conv.kernel_size - 1, C), dtype=x.dtype)
            conv, state = [window] * 3, mx.zeros((B, attn.num_heads, attn.head_dim, attn.head_dim), mx.float32)
        else:
            conv, state = cache.conv, cache.recurrent
        out = _run(layer, "kda", x, lambda: _kda_step(layer), *conv, state)
        if out is None:
            return None
        h, *cache.conv, cache.recurrent = out
        cache.offset += x.shape[1]
        return h
    if not layer.self_attn.absorbs(x.shape[1]):
        return None
    qa = _run(layer, "mla_project", x, lambda: _mla_project(layer))
    if qa is None:
        return None
    q, latent = qa
    o = layer.self_attn.attend(q, latent, cache)  # the cache has advanced: no way back to eager
    h = _run(layer, "mla_finish", x, lambda: _mla_finish(layer), o)
    return h if h is not None else _mla_finish(layer)(x, o)
