"""Model configuration: the released `config.json` parsed into one dataclass.

Layer numbering in `linear_attn_config` is 1-based in the checkpoint; everything here
is 0-based. Unknown keys are ignored (the released config carries many we do not need).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFormatError

SUPPORTED_MODEL_TYPES = ("kimi_linear",)


@dataclass
class ModelArgs:
    model_type: str = "kimi_linear"
    vocab_size: int = 163840
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 27
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    model_max_length: int = 1048576
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163586
    pad_token_id: int | None = 163839
    # MLA
    num_attention_heads: int = 32
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    # MoE
    num_experts: int = 256
    num_experts_per_token: int = 8
    moe_intermediate_size: int = 1024
    num_shared_experts: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 2.446
    moe_renormalize: bool = True
    moe_router_activation_func: str = "sigmoid"
    num_expert_group: int = 1
    topk_group: int = 1
    # KDA (from linear_attn_config)
    linear_attn_config: dict = field(default_factory=dict)
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        if not isinstance(config, dict):
            raise ModelFormatError(f"{source}: holds a JSON {type(config).__name__}, expected an object {{...}}")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFormatError(
                f"{source}: model_type is {model_type!r}, expected 'kimi_linear'; "
                "point --model at a Kimi-Linear checkpoint"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        _check_types(config, source)
        args = cls(**{k: v for k, v in config.items() if k in names})
        if args.quantization is None and "quantization_config" in config:
            args.quantization = config["quantization_config"]
        args._validate(source)
        return args

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        return cls.from_dict(read_config(path), source=str(path))

    def _validate(self, source: str) -> None:
        """Values the model cannot be built from: sizes < 1, more experts per token than experts,
        layer indices outside the stack, a KDA config without its sizes. One line naming the file."""

        def fail(problem: str) -> ModelFormatError:
            return ModelFormatError(f"{source}: {problem}; fix config.json or download the model again")

        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise fail(f"{name} is {getattr(self, name)}, must be >= 1")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise fail(f"{name} is {getattr(self, name)}, must be >= 0")
        for name in _POSITIVE + _NON_NEGATIVE:  # MLX's shapes and positions are int32
            if getattr(self, name) > MAX_SIZE:
                raise fail(f"{name} is {getattr(self, name)}, past the largest size MLX takes ({MAX_SIZE})")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise fail(f"rms_norm_eps is {self.rms_norm_eps}, must be > 0")
        if not math.isfinite(self.routed_scaling_factor):
            raise fail(f"routed_scaling_factor is {self.routed_scaling_factor}")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_token <= self.num_experts:
            raise fail(f"num_experts_per_token is {self.num_experts_per_token}, must be in 1..num_experts "
                       f"({self.num_experts})")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise fail(f"{name} {value} is outside the vocabulary 0..{self.vocab_size - 1}")
        _check_quantization(self.quantization, fail)
        lac = self.linear_attn_config
        for key in ("num_heads", "head_dim", "kda_layers"):
            if key not in lac:
                raise ModelFormatError(f"{source}: linear_attn_config lacks {key!r}")
        for key in ("num_heads", "head_dim", "short_conv_kernel_size"):
            value = lac.get(key, 4)
            if not _is_int(value) or value < 1 or (key == "short_conv_kernel_size" and value < 2):
                raise fail(f"linear_attn_config.{key} is {value!r}, must be a whole number >= "
                           f"{2 if key == 'short_conv_kernel_size' else 1}")
        layers = {}
        for key in ("kda_layers", "full_attn_layers"):
            value = lac.get(key, [])
            if not isinstance(value, list) or not all(_is_int(i) for i in value):
                raise fail(f"linear_attn_config.{key} is {value!r}, must be a list of layer numbers")
            bad = [i for i in value if not 1 <= i <= self.num_hidden_layers]
            if bad:
                raise ModelFormatError(f"{source}: {key} {bad} outside 1..{self.num_hidden_layers}")
            if len(set(value)) != len(value):
                raise fail(f"linear_attn_config.{key} repeats a layer")
            layers[key] = set(value)
        if layers["kda_layers"] & layers["full_attn_layers"]:
            raise fail(f"layers {sorted(layers['kda_layers'] & layers['full_attn_layers'])} are in both "
                       "kda_layers and full_attn_layers")
        if self.moe_router_activation_func != "sigmoid":
            raise ModelFormatError(f"{source}: only the sigmoid router is supported")
        if self.num_expert_group != 1 or self.topk_group != 1:
            # The released model uses one group; grouped top-k is not implemented.
            raise ModelFormatError(f"{source}: num_expert_group/topk_group other than 1 is not supported")

    # ---- derived facts --------------------------------------------------------------
    @property
    def kda_heads(self) -> int:
        return self.linear_attn_config["num_heads"]

    @property
    def kda_head_dim(self) -> int:
        return self.linear_attn_config["head_dim"]

    @property
    def conv_kernel(self) -> int:
        return self.linear_attn_config.get("short_conv_kernel_size", 4)

    def is_kda_layer(self, i: int) -> bool:
        """0-based layer index -> True for KDA, False for MLA."""
        return (i + 1) in self.linear_attn_config["kda_layers"]

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.num_experts > 0
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MAX_SIZE = 2**31 - 1
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "model_max_length",
             "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "moe_intermediate_size",
             "moe_layer_freq")
_NON_NEGATIVE = ("qk_rope_head_dim", "num_experts", "num_experts_per_token", "num_shared_experts",
                 "first_k_dense_replace")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(config: dict, source: str) -> None:
    """Each known key's JSON type against the field's (a string hidden_size, a float layer count)."""
    for f in dataclasses.fields(ModelArgs):
        if f.name not in config or config[f.name] is None and "None" in str(f.type):
            continue
        value, kind = config[f.name], str(f.type).split(" | ")[0]
        ok = {"int": _is_int(value) or (kind == "int" and f.name == "eos_token_id" and isinstance(value, list)
                                        and all(map(_is_int, value))),
              "float": _is_int(value) or isinstance(value, float),
              "bool": isinstance(value, bool), "str": isinstance(value, str),
              "dict": isinstance(value, dict)}.get(kind, True)
        if not ok:
            raise ModelFormatError(f"{source}: {f.name} is {value!r} ({type(value).__name__}), expected {kind}; "
                                   "fix config.json or download the model again")


def _check_quantization(q, fail) -> None:
    """The quantization block's own fields (group_size, bits: whole numbers >= 1; mode: text), at the
    top and in each per-module entry ("model.layers.0.mlp.gate": {...} or false). Other keys (a
    Hugging Face quantization_config's quant_method, ...) are not ours to judge."""
    if q is None:
        return
    if not isinstance(q, dict):
        raise fail(f"quantization is {q!r}, expected an object")
    entries = [("quantization", q)] + [(f"quantization[{k!r}]", v) for k, v in q.items() if "." in k]
    for where, entry in entries:
        if isinstance(entry, bool):
            continue
        if not isinstance(entry, dict):
            raise fail(f"{where} is {entry!r}, expected an object or false")
        for key in ("group_size", "bits"):
            if key in entry and not (_is_int(entry[key]) and entry[key] >= 1):
                raise fail(f"{where}.{key} is {entry[key]!r}, must be a whole number >= 1")
        if "mode" in entry and not isinstance(entry["mode"], str):
            raise fail(f"{where}.mode is {entry['mode']!r}, expected text")


def read_config(path: str | Path) -> dict:
    """config.json as a dict; a missing or malformed file is one ModelFormatError line."""
    from .files import read_json_object

    return read_json_object(path, "a model folder needs a config.json object; download the model again",
                            missing="not found")
