"""`speechclip demo`: the whole paper offline, from nothing, on a laptop (corpus, mini encoders, SpeechCLIP,
a table). Not part of the library: `speechclip` itself never imports this package (tests/test_layers.py)."""

from .run import run_demo

__all__ = ["run_demo"]
