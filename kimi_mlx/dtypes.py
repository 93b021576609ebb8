"""Which dtype the runtime holds each parameter in: one rule for the loader (loading.cast_weights)
and the memory plan (plan.weight_bytes), so the plan counts what a loaded model holds.

- FP32_PARAMS (A_log, dt_bias, the router's correction bias): float32 always (they set decay
  rates and expert choices);
- the router gate's float tensors (`.mlp.gate.`: its weight, or the scales and biases of a
  quantized gate): float32 always. The router runs in float32 (moe.SparseMoE.router_logits);
  held in bf16 they were cast at every call, 1-2 kernels per MoE layer and token, for
  37 KB (8-bit gate) to 1.2 MB (bf16 gate) more per layer;
- on the CPU backend the float tensors of the routed experts (`.switch_mlp.`: the weights of
  unquantized experts, the scales and biases of quantized ones) are float32: MLX's CPU gather_mm
  takes float32 only, and they are cast once at load rather than at every call;
- every other float tensor: the dtype asked for at load (`load_model(dtype=...)`), else the
  checkpoint's own. Integer tensors (packed quantized weights, mxfp scales) are kept as stored.
Light on purpose (mlx.core only): `kimi-mlx plan` imports it without the model's modules.
"""

from __future__ import annotations

import mlx.core as mx

# Parameters kept in float32 whatever the weights' dtype: gates and router bias set decisions.
FP32_PARAMS = ("A_log", "dt_bias", "e_score_correction_bias")

FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def experts_fp32(cpu: bool | None = None) -> bool:
    """Whether float routed-expert tensors are held in float32: on the CPU backend (the default
    device's, unless `cpu` says which backend to plan for)."""
    return mx.default_device() == mx.cpu if cpu is None else cpu


def held_float_dtype(name: str, stored: str, override: str | None = None, cpu: bool | None = None) -> str:
    """The dtype name ('float32', 'bfloat16', 'float16') a float tensor is held in, by its MLX-layout
    name (e.g. `model.layers.3.mlp.switch_mlp.up_proj.scales`), its stored dtype name and the
    dtype asked for at load (None: keep). See the module docstring for the rule."""
    if name.endswith(FP32_PARAMS) or ".mlp.gate." in name or (".switch_mlp." in name and experts_fp32(cpu)):
        return "float32"
    return override or stored


def dtype_name(dtype: mx.Dtype) -> str:
    """mx.bfloat16 -> 'bfloat16' (the names config.json uses)."""
    return str(dtype).rsplit(".", 1)[-1]


def check_load_dtype(dtype) -> str | None:
    """The float dtype asked for at load (an mx.Dtype or its name), as a name, or None (keep the
    checkpoint's). Anything but float16/bfloat16/float32 is a KimiError: an integer dtype would
    truncate every weight, and the model's kernels (rms_norm, the KDA scan) take these three."""
    from .errors import KimiError

    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else dtype_name(dtype) if isinstance(dtype, mx.Dtype) else None
    if name not in FLOAT_BYTES:
        raise KimiError(f"dtype {dtype!r}: a model is loaded in float16, bfloat16 or float32 (or None: as stored)")
    return name
