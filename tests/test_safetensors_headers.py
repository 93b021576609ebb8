"""Corrupted safetensors headers, generated (hypothesis): the loader and the converter answer each
with a one-line KimiError naming the file, or read it (a harmless change), and never anything else
(a traceback, a crash, a hang in mx.load).

Mutations of a real shard of the tiny checkpoint: random bytes inside the header, a random header
length, a header replaced by arbitrary JSON, one field of one entry replaced by arbitrary JSON or a
nearby integer, and the file cut short.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tiny import TINY_CONFIG, write_checkpoint  # noqa: E402

from kimi_mlx.convert.plan import make_plan  # noqa: E402
from kimi_mlx.convert.recipe import ConvertOptions  # noqa: E402
from kimi_mlx.convert.source import open_source  # noqa: E402
from kimi_mlx.errors import KimiError  # noqa: E402
from kimi_mlx.loading import load_model  # noqa: E402

SHARD = "model.safetensors"
_folder: list[Path] = []


def tiny_checkpoint() -> Path:
    """One float32 tiny checkpoint for the whole module (hypothesis reruns the test body)."""
    if not _folder:
        _folder.append(write_checkpoint(Path(tempfile.mkdtemp(prefix="kimi-st-")) / "ckpt", TINY_CONFIG))
    return _folder[0]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def corrupted(draw, original: bytes) -> bytes:
    (n,) = struct.unpack("<Q", original[:8])
    header, data = json.loads(original[8 : 8 + n]), original[8 + n :]
    kind = draw(st.sampled_from(["bytes", "length", "json", "field", "near", "cut"]))
    if kind == "bytes":  # random bytes anywhere in the length or the JSON
        out = bytearray(original)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, 8 + n - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + original[8:]
    if kind == "cut":
        return original[: draw(st.integers(0, len(original) - 1))]
    names = sorted(k for k in header if k != "__metadata__")
    if kind == "json":
        header = draw(json_values)
    else:
        name = draw(st.sampled_from(names + ["__metadata__"]))
        field = draw(st.sampled_from([None, "dtype", "shape", "data_offsets"]))
        if kind == "near" and name != "__metadata__":  # a plausible lie: one number off, another dtype
            entry = header[name]
            if field == "dtype" or field is None:
                entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "Q4"]))
            elif field == "shape":
                shape = entry["shape"] or [0]
                i = draw(st.integers(0, len(shape) - 1))
                entry["shape"] = shape[:i] + [max(0, shape[i] + draw(st.integers(-3, 3)))] + shape[i + 1:]
            else:
                entry["data_offsets"] = [o + draw(st.integers(-64, 64)) for o in entry["data_offsets"]]
        elif field is None or name == "__metadata__":
            header[name] = draw(json_values)
        else:
            header[name][field] = draw(json_values)
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def one_line_or_loads(fn, folder: Path) -> None:
    try:
        fn(folder)
    except KimiError as e:
        message = str(e)
        assert "\n" not in message and str(folder) in message, message
    # any other exception fails the test (with its traceback): that is the property


def with_shard(data: bytes, check) -> None:
    src = tiny_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        (folder / "config.json").write_text((src / "config.json").read_text())
        (folder / SHARD).write_bytes(data)
        one_line_or_loads(check, folder)


def original() -> bytes:
    return (tiny_checkpoint() / SHARD).read_bytes()


SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(st.data())
def test_loader_answers_a_corrupted_header_in_one_line(data):
    with_shard(data.draw(corrupted(original())), load_model)


@SETTINGS
@given(st.data())
def test_converter_answers_a_corrupted_header_in_one_line(data):
    """open_source + make_plan: everything the converter checks before it reads a tensor."""
    with_shard(data.draw(corrupted(original())), lambda folder: make_plan(open_source(folder), ConvertOptions()))


@pytest.mark.parametrize("header", [
    [], {"a": 1}, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}},
    {"__metadata__": {"format": 1}}, {"a": {"dtype": "X", "shape": [1], "data_offsets": [0, 4]}},
], ids=["list", "not-an-object", "bytes-vs-shape", "bool-dim", "overlap", "metadata", "dtype"])
def test_known_bad_headers_are_named(tmp_path, header):
    """Each structural lie hypothesis looks for, once by hand: named, one line."""
    blob = json.dumps(header).encode()
    (tmp_path / SHARD).write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    for check in (load_model, open_source):
        with pytest.raises(KimiError, match=rf"^{tmp_path / SHARD}: not a valid safetensors file \(.+\); download"):
            check(tmp_path)
