"""Model configuration: the released `config.json` parsed into one dataclass.

Layer numbering in `linear_attn_config` is 1-based in the checkpoint; everything here
is 0-based. Unknown keys are ignored (the released config carries many we do not need).
"""

from __future__ import annotations

import dataclasses
import json
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
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFormatError(
                f"{source}: model_type is {model_type!r}, expected 'kimi_linear'; "
                "point --model at a Kimi-Linear checkpoint"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        args = cls(**{k: v for k, v in config.items() if k in names})
        if args.quantization is None and "quantization_config" in config:
            args.quantization = config["quantization_config"]
        args._validate(source)
        return args

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        return cls.from_dict(read_config(path), source=str(path))

    def _validate(self, source: str) -> None:
        lac = self.linear_attn_config
        for key in ("num_heads", "head_dim", "kda_layers"):
            if key not in lac:
                raise ModelFormatError(f"{source}: linear_attn_config lacks {key!r}")
        bad = [i for i in lac["kda_layers"] if not 1 <= i <= self.num_hidden_layers]
        if bad:
            raise ModelFormatError(f"{source}: kda_layers {bad} outside 1..{self.num_hidden_layers}")
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


def read_config(path: str | Path) -> dict:
    """config.json as a dict; a missing or malformed file is one ModelFormatError line."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: not found; a model folder needs config.json") from None
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
