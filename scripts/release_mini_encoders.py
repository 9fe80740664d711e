"""Make a finished demo build's mini encoders the ones the package ships (maintainers; see
src/speechclip/demo/released.py):
`python scripts/release_mini_encoders.py runs/demo <commit that built them> "<machine they were built on>"`."""

import sys
from pathlib import Path

from speechclip.demo.released import release

if __name__ == "__main__":
    build, commit, machine = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    release(build / "encoders", {"by": "speechclip demo --pretrain (seed 0)", "commit": commit, "machine": machine})
    print(f"released {build / 'encoders'} (built by {commit})")
