"""dsv3: DeepSeek-V3 in PyTorch: the model, training, an inference engine and an OpenAI-compatible server."""

from .config import ConfigError, ModelConfig
from .infer.generate import generate
from .model import DeepseekV3

__all__ = ["ConfigError", "DeepseekV3", "ModelConfig", "generate"]
__version__ = "0.1.0"
