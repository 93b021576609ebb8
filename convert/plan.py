"""The conversion plan: source tensors in groups, the output tensors each group makes, and shards.

Everything is decided before any tensor is read, by running the real transforms on lazy
placeholder arrays (never evaluated, so planning the 48B model costs no memory): names, shapes,
dtypes and byte sizes of every output tensor, hence the shard layout and the output size.

Groups, in output order: embed_tokens; then per layer its non-expert tensors (renamed by
`to_mlx_layout`) and one group per expert projection (w1, w3, w2: stacked by `stack_experts`);
then the final norm and lm_head. An expert group is read CHUNK_BYTES of experts at a time and a
large single tensor (embed_tokens, lm_head) is cast/quantized in row blocks of that size, so
memory does not grow with the model: quantization works row by row, so a chunk of stacked experts
(or a block of rows) gives exactly those rows of the whole output (tests check byte equality).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import mlx.core as mx

from kimi_mlx.dtypes import FP32_PARAMS
from kimi_mlx.errors import ModelFormatError
from kimi_mlx.loading import _check_names_and_shapes
from kimi_mlx.weights import to_mlx_layout

from .recipe import DTYPES, ConvertOptions
from .source import MX_TO_ST, Source

FORMAT_VERSION = 1  # bump when the output bytes for the same inputs change
CHUNK_BYTES = 256 << 20  # source bytes read at once within a group (expert chunks, row chunks)
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_ORDER = {"w1": 0, "w3": 1, "w2": 2}  # gate, up, down
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple
    nbytes: int


@dataclass
class Group:
    sort_key: tuple
    sources: list[str]  # source tensor names
    expert: tuple | None = None  # (layer prefix, "w1"|"w2"|"w3", number of experts)
    source_bytes: int = 0
    outputs: list[OutTensor] = field(default_factory=list)
    specs: dict = field(default_factory=dict)  # MLX module path -> quantization spec

    def read_order(self) -> list[str]:
        """Source tensor names in the order `pieces` reads them."""
        if self.expert is None:
            return self.sources
        prefix, which, n = self.expert
        return [f"{prefix}.block_sparse_moe.experts.{e}.{which}.weight" for e in range(n)]

    def pieces(self, source: Source, dtype: mx.Dtype | None, multiple: int = 1):
        """-> iterator of (output pieces [(name, lazy array)], source bytes they cover).

        Pieces of one output tensor are consecutive row blocks of it (axis 0), in order, of
        about equal size and at most CHUNK_BYTES; a split tensor's piece count is a multiple of
        `multiple` (the pipeline's stream count, so the streams get equal work).
        """
        if self.expert is None:
            laid_out = to_mlx_layout({n: source.take(n) for n in self.sources}, source.args)
            for name in sorted(laid_out):
                w, spec = laid_out.pop(name), self.specs.get(name[: -len(".weight")])
                if not _split_rows(w, multiple):
                    yield finish(name, w, spec, dtype), w.nbytes
                    continue
                mx.eval(w)  # e.g. embed_tokens: read once, then cast/quantize in row blocks
                step = _piece_rows(w.shape[0], w.nbytes, multiple)
                for i in range(0, w.shape[0], step):
                    yield finish(name, w[i : i + step], spec, dtype), w[i : i + step].nbytes
            return
        prefix, which, count = self.expert
        name = f"{prefix}.mlp.switch_mlp.{_EXPERT_NAMES[which]}.weight"
        spec = self.specs.get(name[: -len(".weight")])
        order = self.read_order()
        step = _piece_rows(count, self.source_bytes, multiple)
        for start in range(0, count, step):
            # Experts start.. are rows start.. of the stack the plan made (to_mlx_layout ->
            # stack_experts). finish works row by row, so finishing each expert and stacking the
            # results gives the same bytes, and stacks quantized outputs (4x smaller at 4 bits).
            experts = [finish(name, source.take(src), spec, dtype) for src in order[start : start + step]]
            outputs = [(out_name, mx.stack([e[j][1] for e in experts])) for j, (out_name, _) in enumerate(experts[0])]
            yield outputs, len(experts) * (self.source_bytes // count)


def _piece_rows(rows: int, nbytes: int, multiple: int) -> int:
    """Rows per piece of a tensor (or expert stack) split along axis 0: as few pieces as
    CHUNK_BYTES allows, their count rounded up to `multiple`, sizes as equal as rows allow."""
    pieces = -(-nbytes // CHUNK_BYTES)  # ceil
    pieces = -(-pieces // multiple) * multiple
    return -(-rows // min(rows, pieces))


def _split_rows(w: mx.array, multiple: int) -> bool:
    """Whether a single tensor is cast/quantized in row blocks: when over CHUNK_BYTES (memory),
    or, with several streams, when large enough that sharing it pays (1/8 of a chunk)."""
    return w.ndim >= 2 and (w.nbytes > CHUNK_BYTES or (multiple > 1 and w.nbytes > CHUNK_BYTES // 8))


@dataclass
class Plan:
    options: ConvertOptions
    groups: list[Group]
    shards: list[list[OutTensor]]
    shard_names: list[str]
    quantization: dict | None  # the config.json block, None when not quantized
    num_params: int
    fingerprint: str
    source_id: dict  # which checkpoint: source.Source.identity()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for shard in self.shards for t in shard)


def finish(name: str, w: mx.array, spec: dict | None, dtype: mx.Dtype | None) -> list[tuple[str, mx.array]]:
    """One MLX-layout tensor -> its output tensors: cast, then quantized when `spec` is given.

    A_log, dt_bias, the router bias and norm weights keep their dtype (or go up to float32),
    never down: they set decay rates, expert choices and scales.
    """
    if spec is not None:
        module = name[: -len(".weight")]
        w = w.astype(dtype) if dtype is not None else w
        q = mx.quantize(w, group_size=spec["group_size"], bits=spec["bits"], mode=spec.get("mode", "affine"))
        return list(zip([f"{module}.weight", f"{module}.scales", f"{module}.biases"], q))
    if dtype is None or not mx.issubdtype(w.dtype, mx.floating):
        return [(name, w)]
    if name.endswith(FP32_PARAMS) or name.endswith("norm.weight"):
        return [(name, w.astype(mx.float32) if dtype == mx.float32 else w)]
    return [(name, w.astype(dtype))]


def group_sources(source: Source) -> list[Group]:
    groups: dict[tuple, Group] = {}
    last = source.args.num_hidden_layers
    for name in sorted(source.tensors):
        if m := _EXPERT.match(name):
            layer, which = int(m.group(1)), m.group(3)
            key = (layer, 1 + _EXPERT_ORDER[which], "")
            expert = (f"model.layers.{layer}", which, source.args.num_experts)
        elif m := _LAYER.match(name):
            key, expert = (int(m.group(1)), 0, ""), None
        else:  # embed_tokens first, then the final norm and lm_head
            key, expert = ((-1 if "embed_tokens" in name else last), 0, name), None
        groups.setdefault(key, Group(key, [], expert)).sources.append(name)
    for g in groups.values():
        g.source_bytes = sum(source.tensors[n].nbytes for n in g.sources)
    return [groups[k] for k in sorted(groups)]


def make_plan(source: Source, options: ConvertOptions) -> Plan:
    """Check the source against the model the config describes and plan every output byte."""
    opts = options.resolved()
    args = source.args
    from kimi_mlx.model import Model  # here: the model's modules import mlx-lm (seconds); checks come first

    model = Model(args)  # lazy parameters: names, shapes and quantizable modules only
    quantizable = {p: m.weight.shape[-1] for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    where = source.folder / ("model.safetensors.index.json"
                             if (source.folder / "model.safetensors.index.json").exists() else "")
    groups = group_sources(source)
    laid_out, per_group = {}, []
    for g in groups:
        try:
            mlx = to_mlx_layout({n: source.placeholder(n) for n in g.sources}, args)
        except ModelFormatError as e:  # e.g. an expert missing: name the checkpoint too
            raise ModelFormatError(f"{where}: {e}") from None
        laid_out.update(mlx)
        per_group.append(mlx)
    origin = {n: source.tensors[n].file for n in laid_out if n in source.tensors}
    _check_names_and_shapes(model, laid_out, origin, source.folder)

    dtype = DTYPES[opts.dtype] if opts.dtype else None
    quantization = dict(opts.default_spec) if opts.quantize else None
    for g, mlx in zip(groups, per_group):
        for name in sorted(mlx):
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            spec = opts.module_spec(module, quantizable[module]) if module in quantizable else None
            if spec is not None:
                g.specs[module] = spec
                if (entry := opts.config_entry(module, spec)) is not None:
                    quantization[module] = entry
            for out_name, a in finish(name, mlx[name], spec, dtype):
                g.outputs.append(OutTensor(out_name, MX_TO_ST[a.dtype], tuple(a.shape), a.nbytes))

    shards = assign_shards([t for g in groups for t in g.outputs], int(opts.max_shard_gb * 1e9))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    num_params = sum(a.size for a in laid_out.values())
    source_id = source.identity()
    fingerprint = _fingerprint(source, source_id, opts, shards, names)
    return Plan(opts, groups, shards, names, quantization, num_params, fingerprint, source_id)


def assign_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Consecutive runs of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _fingerprint(source: Source, source_id: dict, opts: ConvertOptions, shards, names) -> str:
    """Identifies the inputs and the plan: a partial output is resumed only when it matches. The
    layout alone is not enough (a Base and an Instruct checkpoint have the same tensors and file
    sizes), so the source's identity is part of it."""
    blob = json.dumps({
        "version": FORMAT_VERSION,
        "source_id": source_id,
        "options": [opts.quantize, opts.bits, opts.group_size, opts.mode, opts.recipe, opts.dtype],
        "source": sorted((t.name, t.file, t.dtype, t.shape, t.nbytes) for t in source.tensors.values()),
        "files": sorted((f, (source.folder / f).stat().st_size) for f in {t.file for t in source.tensors.values()}),
        "shards": [[n, [(t.name, t.dtype, t.shape) for t in s]] for n, s in zip(names, shards)],
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
