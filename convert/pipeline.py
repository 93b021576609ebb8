"""kimi-mlx convert: a Hugging Face Kimi-Linear checkpoint -> an MLX model folder (quantized, sharded).

Streaming: the source is read group by group (a layer's non-expert tensors; then each expert
projection a chunk of experts at a time), transformed with kimi_mlx.weights' renaming steps,
cast/quantized, and appended to the output shard being written. On a CPU two pieces are computed
at once (one per stream, see compute_streams) while a writer thread empties the previous ones to
disk, so peak memory is about two chunks of source (plan.CHUNK_BYTES each), their outputs and the
write queue, whatever the model size.

Reliability: everything is checked and planned before the first read (source.py, plan.py); the
output is built in DST.partial/ and renamed to DST only when complete, so a DST never looks
complete when it is not. Shards are recorded as they complete (writer.py): running the same
command again after an interruption skips the shards already done.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from kimi_mlx.errors import KimiError

from .plan import Plan, make_plan
from .readahead import Readahead
from .recipe import DTYPES, ConvertOptions
from .source import Source, open_source
from .writer import Progress, Sink

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json")


@dataclass
class Summary:
    dst: Path
    source_folder: Path  # where the source was read (the hub cache for a repo id)
    description: str
    bytes: int
    shards: int
    params: int
    seconds: float
    peak_rss: int  # bytes, from the OS

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(1, self.params)

    def __str__(self) -> str:
        return (f"{self.dst}: {human_bytes(self.bytes)} in {self.shards} shard{'s' * (self.shards > 1)}, "
                f"{self.bits_per_weight:.2f} bits per weight ({human_count(self.params)} parameters), "
                f"{self.description}; {self.seconds:.1f} s, peak memory {human_bytes(self.peak_rss)}")


def convert_checkpoint(src: str | Path, dst: str | Path, options: ConvertOptions = ConvertOptions(), *,
                       force: bool = False, log=None) -> Summary:
    """Convert SRC (folder or hub repo id) into the folder DST; see the module docstring."""
    start = time.perf_counter()
    log = log or _log
    opts = options.resolved()
    dst = Path(dst).expanduser()
    partial = dst.with_name(dst.name + ".partial")
    if dst.exists() and not force:
        raise KimiError(f"{dst}: already exists; pass --force to overwrite it")
    source = open_source(src)
    if source.folder.resolve() in (dst.resolve(), *dst.resolve().parents):
        raise KimiError(f"{dst}: would overwrite the source checkpoint; pick another output folder")
    plan = make_plan(source, opts)

    dst.parent.mkdir(parents=True, exist_ok=True)
    if not partial.exists():
        _check_disk(dst.parent, plan.total_bytes)
        partial.mkdir()
    progress = Progress.resume(partial, plan, log)
    _check_disk(partial, plan.total_bytes - progress.bytes_done())
    try:
        _write_shards(source, plan, partial, progress)
    except KeyboardInterrupt:
        log(f"stopped: {len(progress.shards)} of {len(plan.shards)} shards kept in {partial}; "
            "run the same command again to resume")
        raise

    _write_metadata(source, plan, partial)
    progress.remove()
    _commit(partial, dst)
    return Summary(dst, source.folder, opts.describe(), plan.total_bytes, len(plan.shards), plan.num_params,
                   time.perf_counter() - start, peak_rss())


def _write_shards(source: Source, plan: Plan, folder: Path, progress: Progress) -> None:
    from tqdm import tqdm

    dtype = DTYPES[plan.options.dtype] if plan.options.dtype else None
    done = {t.name for name, shard in zip(plan.shard_names, plan.shards) if name in progress.shards for t in shard}
    todo = [g for g in plan.groups if any(t.name not in done for t in g.outputs)]
    n_tensors = sum(len(s) for s in plan.shards)
    bar = tqdm(total=sum(g.source_bytes for g in todo), unit="B", unit_scale=True, desc="convert",
               file=sys.stderr, disable=None, dynamic_ncols=True)
    count = [len(done)]

    def tensor_written():
        count[0] += 1
        bar.set_postfix_str(f"{count[0]}/{n_tensors} tensors", refresh=False)

    sink = Sink(folder, plan, progress, on_tensor=tensor_written)
    streams = compute_streams()
    ahead = Readahead([(source.folder / t.file, t.offset, t.nbytes)
                       for g in todo for t in map(source.tensors.get, g.read_order())])
    try:
        for group in todo:
            covered = 0
            for outputs, nbytes in evaluated(group.pieces(source, dtype, len(streams)), streams):
                for name, piece in outputs:
                    sink.put(name, piece)
                step = min(nbytes, group.source_bytes - covered)
                covered += step
                bar.update(step)
                ahead.advance(step)
            sink.check_group_done()
            mx.clear_cache()  # hand freed buffers back: the next group's sizes differ
            bar.update(group.source_bytes - covered)
            ahead.advance(group.source_bytes - covered)
    finally:
        ahead.close()
        sink.close()
        bar.close()


def compute_streams() -> list:
    """Where pieces are computed. On a CPU with several cores: two CPU streams, because MLX runs
    each stream's ops on its own thread and its CPU quantize is single-threaded (the converter's
    bound there: 2.5-3x faster on 2 cores, bench/bench_convert.py). Elsewhere (a Mac's GPU) the
    default stream."""
    if mx.default_device() == mx.cpu and (os.cpu_count() or 1) >= 2:
        return [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)]
    return [mx.default_stream(mx.default_device())]


def evaluated(pieces, streams: list):
    """Build consecutive pieces on the streams in turn (load, stack, quantize: each piece's whole
    graph on one stream) and evaluate them together, then hand them on in order. The same ops run
    whichever stream holds them, so the output bytes do not depend on the stream count."""
    pieces = iter(pieces)
    while True:
        batch = []
        for stream in streams:
            with mx.stream(stream):
                piece = next(pieces, None)  # the generator builds the piece's graph here
            if piece is None:
                break
            batch.append(piece)
        if not batch:
            return
        mx.eval([a for outputs, _ in batch for _, a in outputs])
        yield from batch


def _write_metadata(source: Source, plan: Plan, folder: Path) -> None:
    """Index, config.json (with the quantization block), tokenizer files and a short model card."""
    weight_map = {t.name: name for name, shard in zip(plan.shard_names, plan.shards) for t in shard}
    index = {"metadata": {"total_size": plan.total_bytes, "total_parameters": plan.num_params},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    config = {k: v for k, v in source.config.items() if k not in ("quantization", "quantization_config")}
    if plan.options.dtype:
        config["dtype"] = plan.options.dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = plan.options.dtype
    if plan.quantization:  # mlx-lm writes the block under both names
        config["quantization"] = plan.quantization
        config["quantization_config"] = plan.quantization
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    for path in tokenizer_files(source.folder):
        shutil.copyfile(path, folder / path.name)
    (folder / "README.md").write_text(model_card(source, plan))


def tokenizer_files(folder: Path) -> list[Path]:
    """Tokenizer, chat template and their code: every file but the weights, index and config."""
    skip = {"config.json", INDEX, "README.md"}
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip
            and (p.suffix in (".json", ".jinja", ".py", ".tiktoken") or p.name == "tiktoken.model")]


def model_card(source: Source, plan: Plan) -> str:
    """A short README naming the source, revision, recipe and size (no dates: reruns are byte-identical)."""
    revision = f" at revision `{source.revision}`" if source.revision else ""
    base = f"base_model: {source.repo_id}\n" if source.repo_id else ""
    bpw = 8 * plan.total_bytes / max(1, plan.num_params)
    tokenizer = "" if all((source.folder / f).exists() for f in TOKENIZER_FILES) else (
        "\nThe source had no tokenizer files (tiktoken.model, tokenizer_config.json); add them to chat.\n")
    return f"""---
library_name: mlx
{base}tags:
- mlx
- kimi-linear
---

# {source.label} (MLX)

Converted from `{source.label}`{revision} with `kimi-mlx convert`.

- recipe: {plan.options.describe()}
- size: {human_bytes(plan.total_bytes)} in {len(plan.shards)} safetensors shard{'s' * (len(plan.shards) > 1)}, \
{bpw:.2f} bits per weight ({human_count(plan.num_params)} parameters)
{tokenizer}
Load it with kimi-mlx (`kimi_mlx.load("<this folder>")`, `kimi-mlx chat -m <this folder>`) or with
mlx-lm (`mlx_lm.load`): tensor names and the `quantization` block in config.json follow mlx-lm.
"""


def _commit(partial: Path, dst: Path) -> None:
    """DST.partial -> DST in one rename (an existing DST, allowed by --force, is removed after)."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(partial, dst)
        return
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(dst, old)
    os.replace(partial, dst)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _check_disk(where: Path, need: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need * 1.01 + (64 << 20):
        raise KimiError(f"{where}: not enough free disk for the output: {human_bytes(need)} needed, "
                        f"{human_bytes(free)} free")


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def peak_rss() -> int:
    """This process's peak resident memory in bytes, from the OS.

    Linux: VmHWM (ru_maxrss there also counts the parent's memory at fork time); macOS: ru_maxrss (bytes).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
