"""kimi-mlx: Moonshot AI's Kimi-Linear-48B-A3B on Apple Silicon with MLX.

The names below are imported on first use (PEP 562), so `import kimi_mlx` and the CLI's light
commands (`plan`, `info`, `--help`) do not pay for the model's modules: they import mlx-lm, whose
package imports transformers (2-4 s).
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "ModelArgs": ".config",
    "KimiError": ".errors",
    "ModelFormatError": ".errors",
    "GenerationResponse": ".generate",
    "generate": ".generate",
    "stream_generate": ".generate",
    "load_model": ".loading",
    "resolve_model_path": ".loading",
    "Model": ".model",
    "KimiTokenizer": ".tokenizer",
    "load_tokenizer": ".tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(ModuleType):
    """When a submodule named like one of its public names is imported (kimi_mlx.generate), the
    import system sets the package's attribute to the module; keep the public name instead (the
    function kimi_mlx.generate), as the eager `from .generate import generate` used to."""

    def __setattr__(self, name, value):
        if isinstance(value, ModuleType) and value.__name__ == f"{__name__}.{name}" and name in _LAZY:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def load(path_or_repo: str, dtype=None):
    """A model folder or hub repo id -> (model, tokenizer). Started as one rank of several
    (mlx.launch), this rank's share of the model ($KIMI_MLX_PARALLEL: tensor or pipeline)."""
    from .loading import load_model, resolve_model_path
    from .parallel import launched, load_sharded
    from .tokenizer import load_tokenizer

    folder = resolve_model_path(path_or_repo)
    model = load_sharded(folder, dtype=dtype) if launched() else load_model(folder, dtype=dtype)
    return model, load_tokenizer(folder)


__all__ = [
    "GenerationResponse", "KimiError", "KimiTokenizer", "Model", "ModelArgs", "ModelFormatError",
    "generate", "load", "load_model", "load_tokenizer", "stream_generate",
]
