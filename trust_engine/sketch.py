"""A small sketch of a base model's Q/K/V weights, stored in a delta's metadata beside the exact fingerprint: the sign
bits at fixed sampled positions, so a host can tell "the same base, lightly modified" (a LoRA merged in) from another model.
"""

from __future__ import annotations

import base64
import dataclasses
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


def _bits(text: str) -> np.ndarray | None:
    if not text.startswith(VERSION):
        return None
    try:
        packed = np.frombuffer(base64.b64decode(text[len(VERSION):], validate=True), dtype=np.uint8)
    except ValueError:
        return None
    return np.unpackbits(packed) if packed.size == BITS // 8 else None


def agreement(stored: str, weights: Mapping[str, torch.Tensor] | str) -> float | None:
    """Share of the sketch's sampled signs that `weights` (site weights, or their sketch) has too (1.0: all; an
    unrelated model: about 0.5); None if `stored` is not a sketch this version reads."""
    bits = _bits(stored)
    if bits is None:
        return None
    own = _bits(weights) if isinstance(weights, str) else _signs(weights)
    return None if own is None else float((bits == own).mean())


@dataclasses.dataclass(frozen=True)
class BaseCheck:
    """How a model compares with the base a delta was made for (`compare_base`)."""

    exact: bool  # the exact fingerprint matches (or the delta records no base)
    share: float | None  # sampled sign agreement when not exact and the delta carries a sketch

    @property
    def close(self) -> bool:
        """The same base, lightly modified (e.g. a LoRA merged in)."""
        return not self.exact and self.share is not None and self.share >= CLOSE

    def close_note(self) -> str:
        """For `close`: the sentence every host shows."""
        return (f"not bit-identical to the delta's base model, but {100 * self.share:.1f}% of {BITS} sampled Q/K/V "
                f"weight signs agree (an unrelated model: about 50%): the same base, lightly modified (e.g. a LoRA "
                f"merged in)")

    def mismatch_detail(self) -> str:
        """For a mismatch: the measured agreement as a sentence (empty when the delta carries no sketch)."""
        if self.share is None:
            return ""
        return (f" Only {100 * self.share:.1f}% of {BITS} sampled Q/K/V weight signs agree (the same base lightly "
                f"modified: {100 * CLOSE:.0f}% or more).")


def compare_base(made_for: str, metadata: Mapping[str, str], model_fingerprint: str,
                 weights: Mapping[str, torch.Tensor] | str) -> BaseCheck:
    """Compare a model (its fingerprint, and its site weights or their sketch) with a delta's base (`made_for`, the
    delta's fingerprint; `metadata`, the delta's, which may carry the base's sketch)."""
    if not made_for or made_for == model_fingerprint:
        return BaseCheck(True, None)
    stored = metadata.get(SKETCH_KEY)
    return BaseCheck(False, agreement(stored, weights) if stored else None)
