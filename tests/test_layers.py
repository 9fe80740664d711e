"""The library stays importable without the training, serving and demo layers (open_clip's rule)."""

import subprocess
import sys

LIBRARY = ["speechclip", "speechclip.model", "speechclip.evaluate", "speechclip.index", "speechclip.embed",
           "speechclip.data", "speechclip.metrics", "speechclip.image_cache"]


def test_library_does_not_import_training_or_serving():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in LIBRARY) +
            "bad = [m for m in ('lightning', 'fastapi', 'uvicorn', 'speechclip.train', 'speechclip.serve', "
            "'speechclip.pretrain', 'speechclip.demo') if m in sys.modules]\nassert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
