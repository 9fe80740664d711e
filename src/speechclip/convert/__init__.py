"""The authors' released SpeechCLIP / SpeechCLIP+ checkpoints -> self-contained speechclip folders.

Reading never executes the checkpoint's pickle (see `reader`); the frozen encoders inside it become ordinary
Hugging Face folders (`hubert`, `openai_clip`), the trained heads our `model.safetensors` (`heads`).
"""

from .errors import ConversionError

__all__ = ["ConversionError"]
