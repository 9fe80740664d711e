"""SpeechCLIP: speech bridged to text through images (frozen speech SSL model + frozen CLIP)."""

from .audio import AudioError, load_audio
from .config import CascadedConfig, CIFConfig, ConfigError, ParallelConfig, SpeechCLIPConfig
from .images import ImageError, load_image
from .model import SpeechCLIP, SpeechOutput

__all__ = [
    "AudioError",
    "CascadedConfig",
    "CIFConfig",
    "ConfigError",
    "ImageError",
    "ParallelConfig",
    "SpeechCLIP",
    "SpeechCLIPConfig",
    "SpeechOutput",
    "load_audio",
    "load_image",
]
__version__ = "0.1.0"
