"""kimi-mlx: Moonshot AI's Kimi-Linear-48B-A3B on Apple Silicon with MLX."""

from .config import ModelArgs
from .errors import KimiError, ModelFormatError
from .generate import GenerationResponse, generate, stream_generate
from .loading import load_model, resolve_model_path
from .model import Model
from .tokenizer import KimiTokenizer, load_tokenizer


def load(path_or_repo: str, dtype=None) -> tuple[Model, KimiTokenizer]:
    """A model folder or hub repo id -> (model, tokenizer)."""
    folder = resolve_model_path(path_or_repo)
    return load_model(folder, dtype=dtype), load_tokenizer(folder)


__all__ = [
    "GenerationResponse", "KimiError", "KimiTokenizer", "Model", "ModelArgs", "ModelFormatError",
    "generate", "load", "load_model", "load_tokenizer", "stream_generate",
]
__version__ = "0.1.0"
