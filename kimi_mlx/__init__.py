"""kimi-mlx: Moonshot AI's Kimi-Linear-48B-A3B on Apple Silicon with MLX."""

from .config import ModelArgs
from .errors import KimiError, ModelFormatError
from .loading import load_model
from .model import Model

__all__ = ["KimiError", "Model", "ModelArgs", "ModelFormatError", "load_model"]
__version__ = "0.1.0"
