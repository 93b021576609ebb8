"""Run the Metal kernels of metal/*.metal on the CPU: a drop-in for `mx.fast.metal_kernel`.

`metal_kernel(name, input_names, output_names, source, header)` takes exactly what
mx.fast.metal_kernel takes and returns a callable with the same call signature
(inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value). Each call
writes the kernel as C++ the way MLX writes it as Metal (mlx/backend/metal/custom_kernel.cpp,
`write_signature`): the header, the function with the template arguments as constants of the
same names (MLX: a template instantiated once), one parameter per input (`const T&` for a 0-d
input, else a bounds-checked `device` pointer; `<name>_shape`, `_strides`, `_ndim` when the
body names them), one per output, then the Metal attributes the body names, in MLX's order;
then the body, verbatim. metal_emu.h supplies the Metal built-ins.
g++ (-std=c++20 -O1 -pthread) builds it into a shared library cached by source hash under the
temp dir; ctypes runs it on the inputs. Outputs start as NaN (all bytes 0xFF) unless
`init_value` is given, so an element the kernel never writes shows.

Concurrency (see metal_emu.h): one OS thread per Metal thread of a threadgroup, threadgroups
one after another; schedule "free" runs them all at once, "forward" / "reverse" / "random"
run one at a time and switch only at barriers and SIMD ops, deterministically.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HEADER = HERE / "metal_emu.h"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++20", "-O1", "-pthread", "-shared", "-fPIC"]
CACHE = Path(tempfile.gettempdir()) / "kimi_mlx_metal_emu"
SCHEDULES = {"free": 0, "forward": 1, "reverse": 2, "random": 3}

# mx dtype -> (type name in the generated source, as MLX's get_type_string spells it;
#              numpy dtype the bytes travel in)
DTYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.int64: ("int64_t", np.int64),
    mx.int32: ("int32_t", np.int32),
    mx.int16: ("int16_t", np.int16),
    mx.int8: ("int8_t", np.int8),
    mx.uint64: ("uint64_t", np.uint64),
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint16: ("uint16_t", np.uint16),
    mx.uint8: ("uint8_t", np.uint8),
    mx.bool_: ("bool", np.bool_),
}

# MLX's list (custom_kernel.cpp), in its order: each one named in the body becomes a parameter.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
# The one use of `threadgroup` metal_emu.h supports: `threadgroup T name[N]...;` on its own line.
TG_DECLARATION = re.compile(r"^\s*threadgroup\s+[\w:]+\s+\w+\s*(\[[^\]]+\]\s*)*;\s*$")
# Attributes the emulator does not model (quad groups, dispatch sizes of non-uniform grids).
UNSUPPORTED = {"dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup",
               "dispatch_threads_per_threadgroup", "grid_origin", "grid_size",
               "quadgroup_index_in_threadgroup", "quadgroups_per_threadgroup",
               "thread_index_in_quadgroup"}


class EmulatorError(RuntimeError):
    """The kernel did not compile under the emulator, or its run went wrong (out-of-bounds
    access, deadlock, bad launch shape)."""


_libs: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


def _include_dir() -> Path:
    """A folder with metal_emu.h and, when g++ can build it, its precompiled form (halves the
    ~1.2 s each kernel takes to compile). Keyed by the header's hash; caller holds _lock."""
    text = HEADER.read_text()
    folder = CACHE / ("pch-" + hashlib.sha256("\0".join([text, CXX, *CXXFLAGS]).encode()).hexdigest()[:16])
    if not (folder / "metal_emu.h").exists():
        tmp = CACHE / f"pch-tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "metal_emu.h").write_text(text)
        flags = [f for f in CXXFLAGS if f != "-shared"]
        subprocess.run([CXX, *flags, "-x", "c++-header", "-o", str(tmp / "metal_emu.h.gch"), str(tmp / "metal_emu.h")],
                       capture_output=True)  # if this fails, plain header parsing still works
        try:
            os.replace(tmp, folder)
        except OSError:  # another process got there first
            subprocess.run(["rm", "-rf", str(tmp)])
    return folder


def _to_numpy(x) -> tuple[np.ndarray, object]:
    """An input as (contiguous numpy array, mx dtype)."""
    if isinstance(x, bool):
        x = mx.array(x)
    elif isinstance(x, int):
        x = mx.array(x, dtype=mx.int32)
    elif isinstance(x, float):
        x = mx.array(x, dtype=mx.float32)
    if not isinstance(x, mx.array):
        raise TypeError(f"kernel input of type {type(x).__name__}: pass an mx.array or a Python scalar")
    if x.dtype not in DTYPES:
        raise TypeError(f"kernel input of dtype {x.dtype}: not supported by the emulator")
    raw = x.view(mx.uint16) if x.dtype == mx.bfloat16 else x
    return np.asarray(np.array(raw), order="C"), x.dtype  # (ascontiguousarray makes 0-d 1-d)


def _locate(text: str) -> str:
    """A #line directive pointing at `text` inside metal/*.metal, so g++ errors name the file."""
    for path in sorted((REPO / "metal").glob("*.metal")) + sorted(HERE.glob("*.metal")):
        whole = path.read_text()
        at = whole.find(text)
        if at >= 0 and text.strip():
            return f'#line {whole.count(chr(10), 0, at) + 1} "{path}"'
    return ""


def _template_value(value) -> tuple[str, str]:
    """(parameter kind, argument text) of one template argument, as MLX writes them."""
    if isinstance(value, bool):
        return "bool", "true" if value else "false"
    if isinstance(value, int):
        return "int", str(value)
    if isinstance(value, mx.Dtype):
        return "typename", DTYPES[value][0]
    raise TypeError(f"template argument {value!r}: expected int, bool or mx.Dtype")


class EmuKernel:
    """The emulated counterpart of the callable mx.fast.metal_kernel returns."""

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None, *, schedule="free", seed=0, timeout_s=120.0):
        if atomic_outputs:
            raise EmulatorError("atomic_outputs is not supported by the emulator")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
        for attr in UNSUPPORTED:
            if attr in source:
                raise EmulatorError(f"kernel {name}: the emulator does not model `{attr}`")
        for text in (header, source):
            for line in text.splitlines():
                code = line.split("//")[0]
                if re.search(r"\bthreadgroup\b", code) and not TG_DECLARATION.match(code):
                    raise EmulatorError(f"kernel {name}: `threadgroup` is only supported on a variable "
                                        f"declaration of its own line, not in: {line.strip()}")
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.schedule, self.seed, self.timeout_s = schedule, seed, timeout_s

    def _cpp(self, inputs, template, output_dtypes) -> tuple[str, list[str]]:
        """The C++ translation unit, and for each buffer slot what it holds ("in:i", "shape:i", ...)."""
        func = f"custom_kernel_{self.name}"
        params, slots, call = [], [], []
        for i, (name, (arr, dtype)) in enumerate(zip(self.input_names, inputs)):
            t = DTYPES[dtype][0]
            if arr.ndim == 0:
                params.append(f"const {t}& {name}")
                call.append(f"*(const {t}*)bufs[{len(slots)}]")
            else:
                params.append(f"emu::dptr<const {t}> {name}")
                call.append(f'emu::dptr<const {t}>((const {t}*)bufs[{len(slots)}], sizes[{len(slots)}], "{name}")')
            slots.append(f"in:{i}")
            if arr.ndim == 0:
                continue
            for suffix, ctype, kind in (("_shape", "int", "shape"), ("_strides", "int64_t", "strides")):
                if name + suffix in self.source:
                    params.append(f"emu::dptr<const {ctype}> {name}{suffix}")
                    call.append(f'emu::dptr<const {ctype}>((const {ctype}*)bufs[{len(slots)}], '
                                f'sizes[{len(slots)}], "{name}{suffix}")')
                    slots.append(f"{kind}:{i}")
            if name + "_ndim" in self.source:
                params.append(f"const int& {name}_ndim")
                call.append(f"*(const int*)bufs[{len(slots)}]")
                slots.append(f"ndim:{i}")
        for j, (name, dtype) in enumerate(zip(self.output_names, output_dtypes)):
            t = DTYPES[dtype][0]
            params.append(f"emu::dptr<{t}> {name}")
            call.append(f'emu::dptr<{t}>(({t}*)bufs[{len(slots)}], sizes[{len(slots)}], "{name}")')
            slots.append(f"out:{j}")
        for attr, kind in METAL_ATTRIBUTES:
            if attr in self.source:
                params.append(f"{kind} {attr}")
                call.append(f"ids.{attr}")

        # MLX makes the kernel a template and instantiates it once. Here the one instantiation
        # is a plain function whose template arguments are constants declared first in its body
        # (same names, same scope as template parameters): GCC ignores section attributes on
        # the static locals of template instances, and `threadgroup` variables need one.
        constants = []
        for name, value in template:
            kind, text = _template_value(value)
            constants.append(f"using {name} = {text};" if kind == "typename" else f"constexpr {kind} {name} = {text};")
        sep = ",\n    "
        src = "\n".join([
            '#include "metal_emu.h"',
            _locate(self.header),
            self.header,
            "#line 1 \"<generated signature>\"",
            f"void {func}(\n    {sep.join(params)}) {{",
            "  " + " ".join(constants),
            _locate(self.source),
            self.source,
            "}",
            "#line 1 \"<generated launcher>\"",
            'extern "C" int emu_run(void** bufs, const long* sizes, const unsigned* grid,',
            "                       const unsigned* tg, int schedule, unsigned long long seed,",
            "                       double timeout_s, char* err, int errlen) {",
            "  return emu::launch(grid, tg, schedule, seed, timeout_s, [&](const emu::Ids& ids) {",
            f"    {func}(\n      {(',' + chr(10) + '      ').join(call)});",
            "  }, err, errlen);",
            "}",
            "",
        ])
        return src, slots

    def _library(self, src: str) -> ctypes.CDLL:
        key = hashlib.sha256("\0".join([src, HEADER.read_text(), CXX, *CXXFLAGS]).encode()).hexdigest()[:24]
        with _lock:
            if key in _libs:
                return _libs[key]
            CACHE.mkdir(parents=True, exist_ok=True)
            so = CACHE / f"{self.name}-{key}.so"
            if not so.exists():
                cpp = CACHE / f"{self.name}-{key}.cpp"
                cpp.write_text(src)
                tmp = CACHE / f"{self.name}-{key}.{os.getpid()}.tmp.so"
                proc = subprocess.run([CXX, *CXXFLAGS, f"-I{_include_dir()}", "-o", str(tmp), str(cpp)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    tmp.unlink(missing_ok=True)
                    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln][:8]
                    raise EmulatorError(f"kernel {self.name} does not compile under the emulator "
                                        f"({cpp}):\n" + "\n".join(errors or proc.stderr.splitlines()[:20]))
                os.replace(tmp, so)  # atomic: a concurrent run never loads a half-written library
            lib = ctypes.CDLL(str(so))
            lib.emu_run.restype = ctypes.c_int
            lib.emu_run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_long),
                                    ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_int,
                                    ctypes.c_ulonglong, ctypes.c_double, ctypes.c_char_p, ctypes.c_int]
            _libs[key] = lib
            return lib

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"kernel {self.name}: {len(self.input_names)} inputs named, {len(inputs)} given")
        if not (len(output_shapes) == len(output_dtypes) == len(self.output_names)):
            raise ValueError(f"kernel {self.name}: output names, shapes and dtypes differ in number")
        arrays = [_to_numpy(x) for x in inputs]
        src, slots = self._cpp(arrays, template or [], output_dtypes)
        if verbose:
            print(src)
        lib = self._library(src)

        outputs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            out = np.empty(tuple(shape), dtype=DTYPES[dtype][1])
            if init_value is None:
                out.view(np.uint8)[...] = 0xFF  # NaN: an element never written shows up
            else:
                out[...] = np.array(mx.full((), init_value, dtype=dtype).view(mx.uint16)
                                    if dtype == mx.bfloat16 else mx.full((), init_value, dtype=dtype))
            outputs.append(out)
        buffers = []
        for slot in slots:
            kind, idx = slot.split(":")
            arr = arrays[int(idx)][0] if kind != "out" else outputs[int(idx)]
            if kind == "shape":
                arr = np.array(arr.shape, dtype=np.int32)
            elif kind == "strides":
                arr = np.array([s // arr.itemsize for s in arr.strides], dtype=np.int64)
            elif kind == "ndim":
                arr = np.array(arr.ndim, dtype=np.int32)
            buffers.append(np.asarray(arr, order="C"))
        ptrs = (ctypes.c_void_p * len(buffers))(*[b.ctypes.data for b in buffers])
        sizes = (ctypes.c_long * len(buffers))(*[b.size for b in buffers])
        err = ctypes.create_string_buffer(1024)
        rc = lib.emu_run(ptrs, sizes, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*threadgroup),
                         SCHEDULES[self.schedule], self.seed, self.timeout_s, err, len(err))
        if rc != 0:
            raise EmulatorError(f"kernel {self.name}: {err.value.decode()}")
        result = []
        for out, dtype in zip(outputs, output_dtypes):
            arr = mx.array(out)
            result.append(arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr)
        return result


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None):
    """mx.fast.metal_kernel, emulated on the CPU with the free-running schedule."""
    return EmuKernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs,
                     compile_options)


def kernel_factory(schedule: str = "free", seed: int = 0, edit=None, timeout_s: float = 120.0):
    """A metal_kernel stand-in with a given schedule; `edit(name, source) -> source` plants changes."""

    def factory(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                atomic_outputs=False, compile_options=None):
        if edit is not None:
            source = edit(name, source)
        return EmuKernel(name, input_names, output_names, source, header, ensure_row_contiguous,
                         atomic_outputs, compile_options, schedule=schedule, seed=seed, timeout_s=timeout_s)

    return factory
