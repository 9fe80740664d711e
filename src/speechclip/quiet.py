"""Quiet third-party chatter so our own progress lines stay readable (the CLI, and each process the demo
starts: a spawned process begins with the libraries' defaults)."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """No HF weight-loading bars, no Lightning tips, no notes about frozen modules in eval mode (intended)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*module\\(s\\) in eval mode.*", ".*LeafSpec.*", ".*smaller than the logging interval.*",
                    ".*does not have many workers.*", ".*exists and is not empty.*", ".*requires torchvision.*"):
        warnings.filterwarnings("ignore", message=message)
