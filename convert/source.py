"""The checkpoint being converted: a local folder or a hub repo, read through safetensors headers only.

Opening a source checks everything that can be checked before any tensor is read: config.json
(model type), the index and every shard it lists, each shard's header against its size
(truncation), the index against the headers, and the tensor dtypes. Each failure is one
ModelFormatError line naming the file. Tensors are then read lazily, one at a time (`take`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from kimi_mlx.config import ModelArgs, read_config
from kimi_mlx.errors import KimiError, ModelFormatError
from kimi_mlx.loading import check_safetensors, read_weight_map, safetensors_files

# safetensors dtype names <-> MLX dtypes (sources are float; outputs add the packed/scale types).
ST_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "U8": mx.uint8}
MX_TO_ST = {v: k for k, v in ST_DTYPES.items()}
SOURCE_DTYPES = ("F32", "F16", "BF16")
# What a conversion needs from a hub repo: weights, config, tokenizer and its code, chat template.
HUB_PATTERNS = ["*.safetensors", "*.json", "tiktoken.model", "*.tiktoken", "*.jinja", "*.py"]


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: str  # file name inside the folder
    dtype: str  # safetensors dtype name
    shape: tuple
    nbytes: int
    offset: int  # where its bytes start in the file


@dataclass
class Source:
    folder: Path
    config: dict
    args: ModelArgs
    tensors: dict[str, SourceTensor]
    repo_id: str | None = None
    revision: str | None = None
    _open: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        """How the README and summary name the source: the repo id, or the folder's name."""
        return self.repo_id or self.folder.name

    def identity(self) -> dict:
        """What names these bytes, for resuming a conversion: the hub repo and its revision (a
        commit), else the folder (resolved) and each shard's size and modification time, so a
        folder whose files were replaced or copied in again counts as another source."""
        files = sorted({t.file for t in self.tensors.values()})
        if self.repo_id and self.revision:
            return {"repo": self.repo_id, "revision": self.revision,
                    "files": [[f, (self.folder / f).stat().st_size] for f in files]}
        stats = [(f, (self.folder / f).stat()) for f in files]
        return {"folder": str(self.folder.resolve()), "files": [[f, st.st_size, st.st_mtime_ns] for f, st in stats]}

    def placeholder(self, name: str) -> mx.array:
        """A lazy array of the tensor's shape and dtype that is never evaluated (planning only)."""
        t = self.tensors[name]
        return mx.zeros(t.shape, ST_DTYPES[t.dtype])

    def take(self, name: str) -> mx.array:
        """The tensor, lazily loaded; the source drops its own reference so memory is freed after use."""
        file = self.tensors[name].file
        if file not in self._open:
            path = self.folder / file
            try:
                self._open[file] = mx.load(str(path))
            except Exception as e:  # mlx raises RuntimeError/ValueError with a terse message
                raise ModelFormatError(f"{path}: cannot read ({e})") from None
        try:
            return self._open[file].pop(name)
        except KeyError:
            raise ModelFormatError(f"{self.folder / file}: tensor {name} cannot be read") from None


def open_source(src: str | Path) -> Source:
    """A local folder or `org/name` on the hub -> a validated Source (nothing read but headers)."""
    if not str(src).strip() or "\0" in str(src):  # '' would be the current folder
        raise KimiError(f"{str(src)!r}: not a checkpoint folder or hub repo id; pass the folder that holds config.json")
    from kimi_mlx.files import expand_user

    local = expand_user(src, "pass the checkpoint folder that holds config.json")
    repo_id = revision = None
    if str(src) == "demo" and not local.exists():  # the shipped demo model, as everywhere else
        from kimi_mlx.loading import demo_model_path

        local = demo_model_path()
    if local.is_dir():
        folder = local
    elif local.exists():
        raise KimiError(f"{local}: is a file; pass the checkpoint folder that holds config.json")
    elif str(src).count("/") == 1 and not str(src).startswith((".", "/", "~")):
        repo_id = str(src)
        folder = download(repo_id)
        revision = folder.name if folder.parent.name == "snapshots" else None
    else:
        raise KimiError(f"{src}: no such folder (and not a hub repo id like org/name)")
    args = ModelArgs.from_file(folder / "config.json")
    config = read_config(folder / "config.json")  # checked just above
    if args.quantization:
        raise ModelFormatError(f"{folder / 'config.json'}: already quantized; convert from the bf16 checkpoint instead")
    tensors = scan_tensors(folder)
    return Source(folder, config, args, tensors, repo_id, revision)


def scan_tensors(folder: Path) -> dict[str, SourceTensor]:
    """Every tensor of every shard, from the headers; checks the index against the files."""
    files = safetensors_files(folder)  # a shard listed in the index but absent is named here
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        header = check_safetensors(path)  # truncation / garbage header, named
        with open(path, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in SOURCE_DTYPES:
                raise ModelFormatError(f"{path}: tensor {name} has dtype {meta['dtype']}; "
                                       f"only {'/'.join(SOURCE_DTYPES)} checkpoints can be converted")
            if name in tensors:
                raise ModelFormatError(f"{path}: tensor {name} is also in {tensors[name].file}")
            start, end = meta["data_offsets"]
            tensors[name] = SourceTensor(name, path.name, meta["dtype"], tuple(meta["shape"]), end - start,
                                         data_start + start)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        for name, file in read_weight_map(index).items():
            if name not in tensors or tensors[name].file != file:
                raise ModelFormatError(f"{folder / file}: tensor {name} (listed in {index.name}) is not in this file")
    return tensors


def download(repo_id: str) -> Path:
    """Fetch only what conversion needs (with huggingface-hub's progress bars); one-line errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    from kimi_mlx.loading import invalid_repo_id

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise invalid_repo_id(repo_id) from None
    except RepositoryNotFoundError:
        raise KimiError(f"{repo_id}: no such repository on the Hugging Face hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise KimiError(f"{repo_id}: not in the local cache and the hub cannot be reached; "
                        "download it on a connected machine or pass a local folder") from None
    except OSError as e:
        raise KimiError(f"{repo_id}: download failed ({e})") from None
