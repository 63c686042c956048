"""A small sketch of a base model's Q/K/V weights, stored in a delta's metadata beside the exact fingerprint: the sign
bits at fixed sampled positions, so a host can tell "the same base, lightly modified" (a LoRA merged in) from another model.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

import numpy as np
import torch

SKETCH_KEY = "base_sketch"  # delta metadata key
BITS = 8192  # sampled weight signs: 1 KiB, 1,368 base64 characters in the metadata (+ the 3-character version tag)
VERSION = "s1:"
CLOSE = 0.95  # agreement from which a model counts as the delta's base, lightly modified
_SEED = 20240611  # fixed: the positions depend only on the sites' names and sizes


def _positions(weights: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(site, flat indices) of BITS positions drawn uniformly over all site weights in sorted-name order."""
    names = sorted(weights)
    sizes = [weights[n].numel() for n in names]
    picks = torch.randint(sum(sizes), (BITS,), generator=torch.Generator().manual_seed(_SEED)).sort().values
    out, start = [], 0
    for name, size in zip(names, sizes):
        inside = picks[(picks >= start) & (picks < start + size)] - start
        out.append((name, inside))
        start += size
    return out


def _signs(weights: Mapping[str, torch.Tensor]) -> np.ndarray:
    bits = [torch.signbit(weights[name].detach().reshape(-1)[idx.to(weights[name].device)]).cpu()
            for name, idx in _positions(weights)]
    return torch.cat(bits).numpy()


def sketch(weights: Mapping[str, torch.Tensor]) -> str:
    """The sketch of base Q/K/V site weights (canonical name -> weight, as for delta.fingerprint), a short string."""
    return VERSION + base64.b64encode(np.packbits(_signs(weights)).tobytes()).decode()


def agreement(stored: str, weights: Mapping[str, torch.Tensor]) -> float | None:
    """Share of the sketch's sampled signs that `weights` has too (1.0: all; an unrelated model: about 0.5);
    None if `stored` is not a sketch this version reads."""
    if not stored.startswith(VERSION):
        return None
    try:
        packed = np.frombuffer(base64.b64decode(stored[len(VERSION):], validate=True), dtype=np.uint8)
    except ValueError:
        return None
    if packed.size != BITS // 8:
        return None
    return float((np.unpackbits(packed) == _signs(weights)).mean())
