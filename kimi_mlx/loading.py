"""Load a Kimi-Linear checkpoint folder (original Moonshot layout or MLX layout, quantized or not).

Every failure is a ModelFormatError of one line naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .dtypes import check_load_dtype, dtype_name, held_float_dtype
from .errors import KimiError, ModelFormatError
from .files import expand_user
from .weights import to_mlx_layout

if TYPE_CHECKING:
    from .model import Model


def safetensors_files(folder: Path) -> list[Path]:
    """The shards of a checkpoint: from model.safetensors.index.json, or every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = [folder / f for f in sorted(set(read_weight_map(index).values()))]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise ModelFormatError(f"{missing[0]}: listed in {index.name} but missing; download it again")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors weights found")
    return files


def read_weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map: tensor name -> shard file name. The shard names
    must be plain relative paths inside the folder (no '..', not absolute): an index must not send
    the loader, or the converter's overlap check, to files elsewhere. One ModelFormatError line."""
    from .files import read_json_object

    fix = "download the model again"
    weight_map = read_json_object(index, fix).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelFormatError(f"{index}: not a safetensors index (no weight_map object of tensor -> file); {fix}")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
            raise ModelFormatError(f"{index}: tensor {name!r} maps to {file!r}, not a shard file name "
                                   f"in the folder; {fix}")
    return weight_map


# Bytes per element of each safetensors dtype (the format's full list).
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                      "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header against the format and the file's size; return the
    header. Catches truncation, garbage, and headers whose entries are not what they claim (wrong
    JSON types, unknown dtypes, byte ranges that disagree with dtype x shape, overlap or run past
    the end), so nothing malformed reaches mx.load. One ModelFormatError line naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = _check_header(header)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        reason = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the header held
        raise ModelFormatError(f"{path}: not a valid safetensors file ({reason[:200]}); download it again") from None
    except OSError as e:  # a folder of that name, permissions, an I/O error
        reason = "is a folder, not a file" if path.is_dir() else f"cannot read ({e.strerror or e})"
        raise ModelFormatError(f"{path}: {reason}; download it again") from None
    if 8 + n + end > size:
        raise ModelFormatError(
            f"{path}: truncated ({size} bytes, header says {8 + n + end}); download or convert it again"
        )
    return header


def _check_header(header) -> int:
    """The header's structure, entry by entry (ValueError naming the first bad one) -> data length."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    ranges = []
    for name, meta in header.items():
        if name == "__metadata__":  # MLX writes null when there is none
            if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
                raise ValueError("__metadata__ is not an object of strings")
            continue
        if not isinstance(meta, dict):
            raise ValueError(f"entry {name!r} is not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} is not [start, end]")
        if offsets[1] - offsets[0] != prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for {dtype} {shape}")
        ranges.append(offsets)
    ranges.sort()
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        if start < end:
            raise ValueError("two tensors share bytes")
    return max((end for _, end in ranges), default=0)


def read_weights(folder: Path) -> tuple[dict, dict]:
    """-> (name -> array (lazy), name -> file it came from)."""
    weights, origin = {}, {}
    for path in safetensors_files(folder):
        check_safetensors(path)
        try:
            arrays = mx.load(str(path))
        except Exception as e:  # mlx raises RuntimeError/ValueError with a terse message
            raise ModelFormatError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
        for name, w in arrays.items():
            weights[name] = w
            origin[name] = path.name
    return weights, origin


def _quantize_like_checkpoint(model: Model, args: ModelArgs, weights: dict, folder: Path | None = None) -> None:
    """Turn modules into their quantized form where the checkpoint has `.scales` (mlx-lm's rule)."""
    q = args.quantization or {}

    def predicate(path: str, module) -> bool | dict:
        if path in q:  # per-module override, e.g. the 8-bit router gate
            return q[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    try:
        nn.quantize(
            model,
            group_size=q.get("group_size", 64),
            bits=q.get("bits", 4),
            mode=q.get("mode", "affine"),
            class_predicate=predicate,
        )
    except (ValueError, RuntimeError) as e:  # MLX's checks: bits, mode, group size (and that it divides the rows)
        reason = " ".join(str(e).split())[:300]
        where = folder / "config.json" if folder is not None else "config.json"
        raise ModelFormatError(f"{where}: its quantization block does not fit this model "
                               f"({reason}); fix config.json or convert the model again") from None


def _check_names_and_shapes(model: Model, weights: dict, origin: dict, folder: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for name in expected:
        if name not in weights:
            raise ModelFormatError(f"{folder}: tensor {name} is missing from the checkpoint")
    for name, w in weights.items():
        # Renamed tensors (stacked experts, split kv_b) have no single source file: name the folder.
        where = folder / origin[name] if name in origin else folder
        if name not in expected:
            raise ModelFormatError(f"{where}: unexpected tensor {name} (not a Kimi-Linear weight)")
        if tuple(w.shape) != tuple(expected[name].shape):
            raise ModelFormatError(
                f"{where}: tensor {name} has shape {tuple(w.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )


def cast_weights(weights: dict, dtype: mx.Dtype | None) -> dict:
    """Float weights -> the dtype the runtime holds them in (kimi_mlx.dtypes.held_float_dtype:
    `dtype` if given, else as stored; the gate/router parameters always fp32; on the CPU backend
    the routed experts' float tensors fp32, as MLX's CPU gather_mm supports only fp32)."""
    override = check_load_dtype(dtype)
    out = {}
    for name, w in weights.items():
        if mx.issubdtype(w.dtype, mx.floating):
            held = held_float_dtype(name, dtype_name(w.dtype), override)
            if held != dtype_name(w.dtype):
                w = w.astype(getattr(mx, held))
        out[name] = w
    return out


def load_model(path: str | Path, dtype: mx.Dtype | None = None, prepare=None) -> Model:
    """Read a model folder (config.json + safetensors) into a ready Model (weights evaluated).

    prepare(model): runs on the model with its weights loaded but not yet read from disk (lazy),
    e.g. kimi_mlx.parallel splitting it across ranks, so only what it keeps is ever read."""
    from .model import Model  # here: the model's modules import mlx-lm (seconds), which plan/info do not need
    from .switch import check_environment  # the model modules declared their path variables

    check_environment()  # a bad KIMI_MLX_* value is one line now, not a failure mid-generation
    dtype = check_load_dtype(dtype)
    folder = resolve_model_path(path)
    args = ModelArgs.from_file(folder / "config.json")
    weights, origin = read_weights(folder)
    weights = to_mlx_layout(weights, args)
    model = Model(args)
    if args.quantization or any(n.endswith(".scales") for n in weights):
        _quantize_like_checkpoint(model, args, weights, folder)
    _check_names_and_shapes(model, weights, origin, folder)
    model.load_weights(list(cast_weights(weights, dtype).items()), strict=True)
    del weights  # the model holds what it needs: a prepare step must be able to drop tensors
    if prepare is not None:
        prepare(model)
    mx.eval(model.parameters())
    model.eval()
    return model


def resolve_model_path(path: str | Path) -> Path:
    """A local folder as is; `org/name` through huggingface-hub (weights, config and tokenizer only)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():  # '' would be the current folder
        raise KimiError(f"model path {path!r}: give a folder, a hub repo id (org/name) or 'demo'")
    if str(path) == "demo":
        return demo_model_path()
    local = expand_user(path, "give a model folder, a hub repo id (org/name) or 'demo'")
    if local.is_dir():
        return local
    if local.exists():
        raise KimiError(f"{local}: is a file; pass the model folder that holds config.json")
    text = str(path)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise KimiError(f"{text}: no such model folder")
    return download_repo(text)


def invalid_repo_id(repo_id: str) -> KimiError:
    """The error for a name that is no folder and that the hub's validator refuses (loading, convert)."""
    return KimiError(f"{repo_id}: no such folder, and not a hub repo id (org/name: letters, digits, '-', '_', '.')")


def demo_model_path() -> Path:
    """The tiny Kimi-Linear-architecture model trained here and shipped in the package."""
    folder = Path(__file__).parent / "demo" / "model"
    if not (folder / "config.json").exists():
        raise KimiError(f"{folder}: the demo model is missing from this install; reinstall kimi-mlx")
    return folder


def download_repo(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tiktoken.model", "*.jinja", "*.md"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except HFValidationError:  # 'a b/c d': was the hub's ValueError traceback
        raise invalid_repo_id(repo_id) from None
    except RepositoryNotFoundError:
        raise KimiError(f"{repo_id}: no such repository on the Hugging Face hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise KimiError(
            f"{repo_id}: not in the local cache and the hub cannot be reached; "
            "download it on a connected machine or pass a local folder"
        ) from None
    except OSError as e:
        raise KimiError(f"{repo_id}: download failed ({e})") from None
