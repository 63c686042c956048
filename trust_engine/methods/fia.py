"""FIA, Forget-It-All (arXiv 2601.06163 v1): contrastive concept saliency on `ff.net.2` inputs, temporal and spatial
selection of concept-sensitive weights, multi-concept fusion that keeps concept-agnostic ones; zeroes single weights.

Reference: shared/reference/method-fia-conceptprune-baselines.md §1 and its checklist (§5); code
`kaiyuan02415/Forget-It-All` @ 4904518. Per `ff.net.2` layer (W: C_out x C_in) and recorded step t:

    n_p[t, j] = column norm of sample p's input rows, each row L2-normalised   (both CFG halves)
    S_t = |W| * relu(mu_c - mu_b - sigma_b)        mean over concept samples; mean and population std over base samples
    A   = 1/2 * mean_t S_t / max(mean_t S_t) + 1/2 * mean_t 1[S_t > tau_t],  tau_t = k-th largest S_t, k = max(1, r1*N)
    Q   = rowTopK(A, max(1, r2*C_in))  AND  layerTopK(A, r2*C_out*C_in)
    fusion over C concepts: s = sum_c Q_c; prune 0 < s < ceil(alpha*C); W <- W * (1 - prune), bias untouched.

Paper vs code, and what this follows:
- Eq. 1 has a cosine factor |<X_j, Y_i>| / (||X_j|| ||Y_i||); the code drops it (rows L2-normalised, Wanda-like
  |W|*||X||). Followed: the code.
- The code divides the mean-strength term by its per-layer max before mixing; the paper does not. Followed: the code.
- Fusion with C = 1: ceil(alpha) = 1 makes every selected weight "agnostic", so paper formula and code prune nothing
  (the README's single-concept example hits it). Followed: neither; a single concept prunes Q directly (checklist 7).
- A = 0 entries (no contrast at all) are never selected, also when a row has fewer positive entries than its top-k
  (the code's topk would take arbitrary zeros there).
- Prompts, sampler and seeds: as in conceptprune.py (expanded forget prompts vs anchor + preserve prompts; DDIM on the
  model's schedule stopped after the recorded steps; the k-th samples of both sets share their noise). The code runs
  50-step PNDM (51 UNet calls) and records the first 10 calls with one seed for all prompts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import torch

from ..concepts import ExpandedConcept, MergedConcepts
from ..delta import Delta
from ..parts import DiffusionParts
from ..progress import ProgressCallback, ProgressEvent, null_progress
from . import _common as c


@dataclasses.dataclass
class FIAConfig:
    """FIA's settings; defaults are the code's FIAConfig defaults (r1 0.05, r2 0.01, alpha 0.6, 10 of 50 steps)."""

    r1: float = c.field(0.05, "share of a layer's weights above the per-step threshold tau_t (activation frequency "
                              "term), in (0, 1]; code and paper 0.05")
    r2: float = c.field(0.01, "spatial sparsity: share kept by the row top-k and by the layer top-K, in (0, 1]; "
                              "default 0.01, objects 0.007, hard concepts 0.03, art 0.02")
    alpha: float = c.field(0.6, "fusion: a weight selected by at least ceil(alpha*C) of C concepts is concept-agnostic "
                                "and kept, in (0, 1]; 0.6 objects, 0.8 art (unused for one concept)")
    timesteps: int = c.field(10, "T: recorded (first) sampling steps, 1..steps; code 10")
    steps: int = c.field(50, "sampling steps of the schedule, >= 1; code 50")
    samples: int = c.field(30, "generations per prompt set (concept, base), >= 1; code 30 pairs for objects")
    cfg: float = c.field(7.5, "classifier-free guidance scale of those generations, >= 0; code 7.5")
    seed: int = c.field(1244, "sample k of each set starts from the noise of seed + k; code seed 1244")
    batch: int = c.field(16, "samples per UNet batch (memory only), >= 1")
    locus: str = c.field("ff.net.2", "scored and pruned layers: ff.net.2 (FIA), or the loci of its layer ablation "
                                     "(Table 13): ff.net.0.proj, attn2.to_k, attn2.to_v")

    def validate(self) -> None:
        for name in ("r1", "r2", "alpha"):
            c.check_range(name, getattr(self, name), 0.0, 1.0, low_open=True)
        c.check_range("steps", self.steps, 1, 10_000)
        c.check_range("timesteps", self.timesteps, 1, self.steps)
        c.check_range("samples", self.samples, 1, 100_000)
        c.check_range("cfg", self.cfg, 0.0, 100.0)
        c.check_range("batch", self.batch, 1, 100_000)
        if self.locus not in c.LOCI:
            raise ValueError(f"locus must be one of {', '.join(c.LOCI)}, got {self.locus!r}")


def contrast(concept_norms: torch.Tensor, base_norms: torch.Tensor) -> torch.Tensor:
    """relu(mu_c - mu_b - sigma_b) per step and input channel, from (samples x steps x C_in) column norms."""
    mu_c = concept_norms.mean(0)
    mu_b = base_norms.mean(0)
    sigma_b = (base_norms.pow(2).mean(0) - mu_b.pow(2)).clamp_min(0).sqrt()  # population std, as the code
    return (mu_c - mu_b - sigma_b).clamp_min(0)


def sensitive_weights(weight: torch.Tensor, contrasts: torch.Tensor, r1: float, r2: float) -> torch.Tensor:
    """Q of one layer: `contrasts` is (steps x C_in); returns the boolean (C_out x C_in) selection."""
    w = weight.abs().float()
    n = w.numel()
    k1 = max(1, math.floor(r1 * n))
    strength = torch.zeros_like(w)
    frequency = torch.zeros_like(w)
    for s_t in (w * row.view(1, -1) for row in contrasts):
        strength += s_t
        tau = s_t.flatten().kthvalue(n - k1 + 1).values  # the k1-th largest
        frequency += (s_t > tau).float()
    strength /= len(contrasts)
    frequency /= len(contrasts)
    top = strength.max()
    a = 0.5 * (strength / top if top > 0 else strength) + 0.5 * frequency
    q = c.row_top_k(a, max(1, math.floor(r2 * w.shape[1]))) & c.layer_top_k(a, math.floor(r2 * n))
    return q & (a > 0)


def fuse(selections: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Weights to prune from the concepts' Q masks: 0 < s < ceil(alpha*C); a single concept prunes its Q."""
    if len(selections) == 1:
        return selections[0].clone()
    s = torch.stack([q.int() for q in selections]).sum(0)
    return (s > 0) & (s < math.ceil(alpha * len(selections)))


def run(parts: DiffusionParts, concepts: list[ExpandedConcept] | MergedConcepts, config: FIAConfig,
        progress: ProgressCallback = null_progress) -> Delta:
    """Prune the concepts' sensitive `ff.net.2` weights; the delta zeroes them (dense `.diff`, float16 in the file)."""
    config.validate()
    merged, bases = c.contrast_sets(parts, concepts)
    start = time.time()
    weights = {n: w.cpu() for n, w in c.ff_weights(parts, config.locus).items()}
    selections: dict[str, list[torch.Tensor]] = {n: [] for n in weights}
    total = 2 * config.samples * len(merged.concepts)
    for i, (concept, base) in enumerate(zip(merged.concepts, bases)):
        norms = []
        for j, prompts in enumerate((list(concept.forget), base)):
            report = c.stage_progress(progress, "saliency", (2 * i + j) * config.samples, total,
                                      f"activations of {concept.text!r} and of its base prompts")
            sums = c.ff_input_norms(parts, prompts, config.samples, config.steps, config.timesteps, config.cfg,
                                    config.seed, config.batch, report, config.locus)
            norms.append({n: v.sqrt() for n, v in sums.items()})
        for name, w in weights.items():
            selections[name].append(sensitive_weights(w, contrast(norms[0][name], norms[1][name]), config.r1, config.r2))
    masks = {n: fuse(q, config.alpha) for n, q in selections.items()}
    pruned = {n: int(m.sum()) for n, m in masks.items()}
    params = c.prune_params(weights, masks)
    meta = c.metadata("fia", config, merged, pruned=json.dumps(pruned),
                      pruned_share=f"{sum(pruned.values()) / sum(w.numel() for w in weights.values()):.6f}",
                      base_prompts=json.dumps(bases), seconds=f"{time.time() - start:.1f}")
    progress(ProgressEvent("prune", 1, 1, {}, f"{sum(pruned.values())} {config.locus} weights zeroed"))
    return Delta({}, meta, c.base_fingerprint(parts), params)
