"""Conversion options and quantization recipes: which module gets which (bits, group size, mode).

The choices are recorded in config.json's `quantization` block, in the form mlx-lm reads (and
`kimi_mlx.loading` too):
    {"group_size": G, "bits": B, "mode": M, "<module path>": {"group_size": g, "bits": b}, ...}
The top level applies to every module stored with `.scales`; a module path maps to its own
parameters where they differ (a per-module dict without "mode" is affine, as in mlx-lm).
- router gates (`model.layers.N.mlp.gate`): always 8-bit, group 64 (mlx-lm's convention);
- uniform: every other quantizable module at --bits;
- mixed: routed experts (`switch_mlp`) at --bits, everything else (attention, shared expert,
  dense MLP, embeddings, lm_head) at 8 bits.
A module is quantized only when its input dim is a multiple of its group size. Norms, A_log,
dt_bias, conv weights and the router bias are never quantized (they are not quantizable modules).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from kimi_mlx.errors import KimiError

# mode -> (default bits, default group size); the non-affine modes allow only these.
MODES = {"affine": (4, 64), "mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
RECIPES = ("uniform", "mixed")
ROUTER_SPEC = {"group_size": 64, "bits": 8}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True)
class ConvertOptions:
    quantize: bool = True
    bits: int | None = None  # None: the mode's default
    group_size: int | None = None
    mode: str = "affine"
    recipe: str = "uniform"
    dtype: str | None = None  # unquantized float tensors; None keeps each tensor's source dtype
    max_shard_gb: float = 5.0

    def resolved(self) -> "ConvertOptions":
        """Fill the mode's defaults and check every choice; a KimiError names the bad option."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise KimiError(f"--dtype {self.dtype}: expected one of {', '.join(DTYPES)}")
        if not (isinstance(self.max_shard_gb, (int, float)) and 0 < self.max_shard_gb < float("inf")):
            raise KimiError(f"--max-shard-gb {self.max_shard_gb}: must be a positive number of GB")
        if not self.quantize:
            return replace(self, bits=None, group_size=None, mode="affine", recipe="uniform")
        if self.mode not in MODES:
            raise KimiError(f"--q-mode {self.mode}: expected one of {', '.join(MODES)}")
        if self.recipe not in RECIPES:
            raise KimiError(f"--recipe {self.recipe}: expected one of {', '.join(RECIPES)}")
        bits, group = MODES[self.mode]
        bits = bits if self.bits is None else self.bits
        group = group if self.group_size is None else self.group_size
        if self.mode == "affine":
            if bits not in AFFINE_BITS:
                raise KimiError(f"--bits {bits}: affine quantization takes {AFFINE_BITS}")
            if group not in AFFINE_GROUPS:
                raise KimiError(f"--group-size {group}: affine quantization takes {AFFINE_GROUPS}")
        elif (bits, group) != MODES[self.mode]:
            raise KimiError(f"--q-mode {self.mode} is {MODES[self.mode][0]}-bit with group size "
                            f"{MODES[self.mode][1]} only (got --bits {bits} --group-size {group})")
        try:  # modes arrive with MLX versions: ask this one
            mx.eval(mx.quantize(mx.zeros((1, group)), group_size=group, bits=bits, mode=self.mode))
        except (ValueError, RuntimeError, TypeError) as e:
            raise KimiError(f"--q-mode {self.mode}: not supported by MLX {mx.__version__} ({e})") from None
        return replace(self, bits=bits, group_size=group)

    @property
    def default_spec(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def module_spec(self, path: str, in_dim: int) -> dict | None:
        """Quantization parameters of one quantizable module (path without `.weight`), or None."""
        if not self.quantize:
            return None
        if path.endswith("mlp.gate"):
            spec = ROUTER_SPEC
        elif self.recipe == "mixed" and ".switch_mlp." not in path:
            spec = {"group_size": self.group_size if self.mode == "affine" else 64, "bits": 8}
        else:
            spec = self.default_spec
        return spec if in_dim % spec["group_size"] == 0 else None

    def config_entry(self, path: str, spec: dict) -> dict | None:
        """What config.json records for a quantized module: None where the top level applies."""
        full = {"mode": "affine", **spec}
        if path.endswith("mlp.gate") or full != self.default_spec:
            return dict(spec)
        return None

    def describe(self) -> str:
        """One line for the summary, README and report, e.g. '4-bit affine g64, uniform'."""
        dtype = self.dtype or "source dtype"
        if not self.quantize:
            return f"not quantized ({dtype})"
        rest = "router gates 8-bit" if self.recipe == "uniform" else "routed experts only; the rest 8-bit"
        return f"{self.bits}-bit {self.mode} g{self.group_size}, {self.recipe} recipe ({rest})"
