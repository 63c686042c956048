"""Where the bundled testbed weights live inside the package (committed, so nobody has to train them)."""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
PIPELINE = WEIGHTS / "pipeline"
ALIGNER = WEIGHTS / "aligner"
JUDGE = WEIGHTS / "judge" / "model.safetensors"
