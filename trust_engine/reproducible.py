"""Bit-identical runs: every method runs under torch's deterministic algorithms (a kernel without a deterministic
implementation raises instead of silently varying), with all randomness drawn from seeded generators.

On the CPU the same seed, inputs and torch thread count give a bit-identical delta (tests/test_reproducible.py);
a different thread count changes how reductions are split, so the bits (not the figures) may differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """torch.use_deterministic_algorithms(enabled) inside the block (CUDA's cuBLAS also needs
    CUBLAS_WORKSPACE_CONFIG=:4096:8 set before the process starts); the previous setting is restored on exit."""
    before, warn_before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)
