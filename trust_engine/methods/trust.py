"""TRuST (arXiv 2602.07919), the pack's own method: re-find the concept neurons (Q/K/V rows whose saliency is a
z-score outlier) every step and fine-tune only those rows under a forget/retain loss plus CIP or CSR.

The algorithm lives in trust_engine.unlearn (`TrustRun`); this module gives it the methods' interface. Its config is
`TrustConfig` (= unlearn.UnlearnConfig; `loss` picks CIP or CSR, whose default beta differ: use `config(loss=...)`).
The run's record (loss curve, steps, early stop, notes, saliency mode) goes into the delta's metadata, so a host needs
nothing but the delta to report on it.
"""

from __future__ import annotations

import json

import torch

from ..concepts import ExpandedConcept, MergedConcepts
from ..delta import Delta
from ..parts import Aligner, DiffusionParts
from ..progress import ProgressCallback, null_progress
from ..ranges import check_config
from ..unlearn import UnlearnConfig, config_for, unlearn

TrustConfig = UnlearnConfig
"""TRuST's settings (trust_engine.unlearn.UnlearnConfig): fields with help text, checked against trust_engine.ranges."""


def config(**overrides) -> UnlearnConfig:
    """A TRuST config: CIP's or CSR's defaults (by `loss`, default "cip") with the overrides."""
    return config_for(overrides.pop("loss", "cip"), **overrides)


def validate(config: UnlearnConfig) -> None:
    check_config(config)


def run(parts: DiffusionParts, concepts: list[ExpandedConcept] | MergedConcepts | ExpandedConcept,
        config: UnlearnConfig, progress: ProgressCallback = null_progress, *, aligner: Aligner | None = None,
        default_cfg: float = 7.5, initial_mask: dict[str, torch.Tensor] | None = None,
        metadata: dict[str, str] | None = None) -> Delta:
    """Erase the concepts with TRuST; the delta's metadata holds the run's record (see the module docstring)."""
    result = unlearn(parts, concepts, config, aligner, progress, metadata, default_cfg=default_cfg,
                     initial_mask=initial_mask)
    saliency = result.last_saliency.mode if result.last_saliency else "initial mask only"
    record = {
        "history": json.dumps(result.history), "seconds": f"{result.seconds:.1f}",
        "stopped_early": "1" if result.stopped_early else "0", "notes": json.dumps(result.notes),
        "saliency_mode": saliency,
    }
    if result.history:
        record["summary"] = (f"last loss {result.history[-1]['loss']:.4f}, concept neurons "
                             f"{result.history[-1]['neurons']}")
    delta = result.delta
    return Delta(delta.sites, {**delta.metadata, **record}, delta.base_fingerprint, delta.params)
