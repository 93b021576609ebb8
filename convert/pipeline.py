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
command again after an interruption skips the shards already done, when the record names the
same source (hub revision, or folder and each shard's size and mtime) and options. The source
and outputs never overlap, and one conversion at a time holds DST.partial (a lock).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from kimi_mlx.errors import KimiError
from kimi_mlx.files import expand_user

from .plan import Plan, make_plan
from .readahead import Readahead
from .recipe import DTYPES, ConvertOptions
from .source import Source, open_source
from .writer import PROGRESS, Progress, Sink, io_error

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json")
HEADROOM_SHARE, HEADROOM_BYTES = 0.01, 64 << 20  # free disk asked for beyond the output


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
    warnings: list[str] = field(default_factory=list)  # e.g. no tokenizer files in the source

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(1, self.params)

    def __str__(self) -> str:
        return (f"{self.dst}: {human_bytes(self.bytes)} in {self.shards} shard{'s' * (self.shards > 1)}, "
                f"{self.bits_per_weight:.2f} bits per weight ({human_count(self.params)} parameters), "
                f"{self.description}; {self.seconds:.1f} s, peak memory {human_bytes(self.peak_rss)}")


def convert_checkpoint(src: str | Path, dst: str | Path, options: ConvertOptions = ConvertOptions(), *,
                       force: bool = False, log=None) -> Summary:
    """Convert SRC (folder or hub repo id) into the folder DST; see the module docstring.

    Refused before anything is written (KimiError, one line): a DST that exists (without force) or
    that is not a model folder (even with force), a DST.partial that is not a conversion's folder,
    any overlap of SRC with DST or DST.partial (either inside the other, symlinks resolved), too
    little free disk, and a second conversion into the same DST while one runs (a lock on
    DST.partial). A full disk or another I/O error during the run is one KimiError line too; the
    complete shards are kept and the same command resumes.
    """
    start = time.perf_counter()
    log = log or _log
    opts = options.resolved()
    dst = _output_path(dst)
    partial = dst.with_name(dst.name + ".partial")
    _check_outputs(dst, partial, force)
    source = open_source(src)
    check_no_overlap(source, dst, partial)
    _check_replaceable(dst)
    plan = make_plan(source, opts)
    warnings = [w for w in [_tokenizer_warning(source, dst)] if w]
    for w in warnings:
        log(w)

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not partial.exists():
            _check_disk(dst.parent, plan.total_bytes)
        partial.mkdir(exist_ok=True)
        with locked(partial, dst):
            progress = None
            try:  # Ctrl-C, SIGTERM, SIGHUP (the CLI raises KeyboardInterrupt for all three)
                progress = Progress.resume(partial, plan, log)  # hashes the kept shards: can take minutes
                _check_disk(partial, plan.total_bytes - progress.bytes_done())
                _write_shards(source, plan, partial, progress)
                _write_metadata(source, plan, partial)
            except KeyboardInterrupt:
                kept = ("its complete shards" if progress is None
                        else f"{len(progress.shards)} of {len(plan.shards)} shards")
                log(f"stopped: {kept} kept in {partial}; run the same command again to resume")
                raise
            _commit(partial, dst)
            # After the rename, not before: DST.partial without its record would be refused as
            # someone else's folder by the next run, had it stopped in between.
            (dst / PROGRESS).unlink(missing_ok=True)
    except OSError as e:  # what writer._guard does not name (metadata, folders, the final rename)
        raise io_error(Path(e.filename) if e.filename else partial, e) from None
    return Summary(dst, source.folder, opts.describe(), plan.total_bytes, len(plan.shards), plan.num_params,
                   time.perf_counter() - start, peak_rss(), warnings)


def _output_path(dst: str | Path) -> Path:
    """DST made absolute (so '.' and '..' have a name to put '.partial' after); links kept as links."""
    if not str(dst).strip() or "\0" in str(dst):  # '' would be the current folder; NUL cannot name a file
        raise KimiError(f"{str(dst)!r}: not a folder name for the output; pass a new folder, e.g. kimi-4bit")
    path = Path(os.path.abspath(expand_user(dst, "pass another output folder")))
    if not path.name:
        raise KimiError(f"{dst}: not a folder name for the output; pass a new folder, e.g. {Path(dst) / 'kimi-4bit'}")
    parent = next(p for p in path.parents if p.exists() or p.is_symlink())  # the nearest one that exists
    if not parent.is_dir():  # mkdir said 'File exists', and the message promised a resume
        raise KimiError(f"{parent}: is not a folder, so {path} cannot be made inside it; "
                        "pick another output folder")
    return path


def _check_outputs(dst: Path, partial: Path, force: bool) -> None:
    """DST may be replaced only with force and only when it is a model folder (config.json) or an
    empty folder; DST.partial must be a folder this converter made (its progress record) or empty."""
    if dst.exists() or dst.is_symlink():
        if not force:
            raise KimiError(f"{dst}: already exists; pass --force to overwrite it")
        if not dst.is_dir():
            raise KimiError(f"{dst}: exists and is not a folder; --force replaces only a model folder, "
                            "so pick another output path")
        if not (dst / "config.json").exists() and any(dst.iterdir()):
            raise KimiError(f"{dst}: exists and is not a model folder (no config.json); --force replaces "
                            "only a model folder, so pick another output folder")

    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise KimiError(f"{partial}: exists and is not a folder (a conversion builds DST there); "
                        "remove or rename it, or pick another output folder")
    if partial.is_dir() and not (partial / PROGRESS).exists() and any(partial.iterdir()):
        raise KimiError(f"{partial}: exists and was not made by kimi-mlx convert (no {PROGRESS}); "
                        "remove or rename it, or pick another output folder")


def _check_replaceable(dst: Path) -> None:
    """An existing DST (allowed by --force) must hold model files only: see _is_model_entry."""
    if not dst.is_dir():
        return
    other = next((p for p in sorted(dst.iterdir()) if not _is_model_entry(p)), None)
    if other is not None:  # a project folder with a config.json, or a model folder plus someone's files
        raise KimiError(f"{dst}: holds {other.name}{'/' if other.is_dir() and not other.is_symlink() else ''}, "
                        "which is not a model file; --force replaces only a folder of model files (weights, "
                        "config, tokenizer, README), so move it out or pick another output folder")


MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".py", ".tiktoken", ".md")
MODEL_FOLDER_EXTRAS = {"tiktoken.model", ".gitattributes", ".DS_Store"}


def _is_model_entry(path: Path) -> bool:
    """What --force may delete with a model folder: the files a conversion (ours or mlx-lm's) or a
    hub download puts there, and the hub's `.cache` metadata folder; nothing else (no other
    folder, no file of another kind), so a user's own files are never deleted with it."""
    if path.is_symlink() or not path.is_dir():
        return path.name in MODEL_FOLDER_EXTRAS or path.suffix in MODEL_FILE_SUFFIXES
    return path.name == ".cache"


def check_no_overlap(source: Source, dst: Path, partial: Path) -> None:
    """Refuse when an output path and the source share anything: the same folder, either inside
    the other, or a source file reached through a link (a hub cache's snapshot links to its blobs).
    All paths resolved, so a link or '..' cannot hide an overlap."""
    inputs = {source.folder.resolve()}
    inputs |= {p.resolve() for p in source.folder.iterdir() if p.is_symlink()}
    for out in (dst, partial):
        target = out.resolve()
        for path in inputs:
            if target == path or target in path.parents or path in target.parents:
                raise KimiError(f"{out}: overlaps the source checkpoint {source.folder} (the same folder, "
                                "or one inside the other); pick an output folder outside it")


def _tokenizer_warning(source: Source, dst: Path) -> str | None:
    missing = [f for f in TOKENIZER_FILES if not (source.folder / f).exists()]
    if not missing:
        return None
    return (f"warning: {source.label} has no tokenizer files ({', '.join(missing)}): {dst} will hold the "
            "weights, but kimi-mlx generate/chat and kimi_mlx.load will fail on it until you copy "
            "tiktoken.model, tokenizer_config.json and the chat template from the original model into it")


@contextmanager
def locked(partial: Path, dst: Path):
    """Hold an exclusive lock on the DST.partial folder for the whole run, so a second conversion
    into the same DST stops at once instead of writing the same files. flock: the kernel drops the
    lock when its process ends however it ends (kill -9 too), so a lock is never stale."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): MLX does not run there; convert without the lock
        yield
        return
    fd = os.open(partial, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KimiError(f"{partial}: another conversion into {dst} is running (it holds this folder); "
                            "wait for it to finish or stop it, then run the command again") from None
        if not partial.is_dir() or os.stat(partial).st_ino != os.fstat(fd).st_ino:
            raise KimiError(f"{partial}: another conversion into {dst} just finished or moved it; "
                            "run the command again")
        yield
    finally:
        os.close(fd)


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
    except BaseException:
        _quietly(ahead.close, sink.close, bar.close)  # a cleanup error must not hide the real one
        raise
    ahead.close()
    sink.close()
    bar.close()


def _quietly(*closers) -> None:
    """Run each cleanup step, ignoring its errors: called while another error is on its way out
    (on a full disk, closing a file that still has buffered bytes fails again)."""
    for close in closers:
        try:
            close()
        except Exception:
            pass


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
    """DST.partial -> DST in one rename (an existing DST, allowed by --force, is removed after:
    moved aside to a fresh name first, so nothing else is ever deleted)."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(partial, dst)
        return
    old = next(p for i in range(1 << 20) if not (p := dst.with_name(f"{dst.name}.old{i or ''}")).exists()
               and not p.is_symlink())
    os.replace(dst, old)
    os.replace(partial, dst)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _check_disk(where: Path, need: int) -> None:
    """Refuse before writing when the output (or what is left of it) plus a headroom does not fit:
    HEADROOM_SHARE of it + HEADROOM_BYTES for metadata, temporary files and the file system."""
    free = shutil.disk_usage(where).free
    headroom = int(need * HEADROOM_SHARE) + HEADROOM_BYTES
    if free < need + headroom:
        raise KimiError(f"{where}: not enough free disk for the output: {human_bytes(need + headroom)} needed "
                        f"({human_bytes(need)} of weights + {human_bytes(headroom)} headroom: "
                        f"{HEADROOM_SHARE:.0%} + {human_bytes(HEADROOM_BYTES)}), {human_bytes(free)} free")


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
