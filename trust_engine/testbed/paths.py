"""Where the bundled testbed weights live inside the package (committed, so nobody has to train them).
TRUST_TESTBED_WEIGHTS points elsewhere (e.g. a freshly trained folder) without touching the bundled copy.
"""

import os
from pathlib import Path

WEIGHTS = Path(os.environ.get("TRUST_TESTBED_WEIGHTS") or Path(__file__).resolve().parent / "weights")
PIPELINE = WEIGHTS / "pipeline"
ALIGNER = WEIGHTS / "aligner"
JUDGE = WEIGHTS / "judge" / "model.safetensors"
