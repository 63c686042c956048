"""ConceptPrune (Chavhan et al., ICLR 2025): zero the `ff.net.2` weights that are "skilled" at the concept, by Wanda
scores |W|·||x|| of concept prompts against base prompts at each of the first steps, united over steps and concepts.

Reference: shared/reference/method-fia-conceptprune-baselines.md §2 (the paper body was not available; the method is
the released code's, `ruchikachavhan/concept-prune` @ 72927d9). What runs here, per `ff.net.2` layer and step t:

    a_tgt[t, j]  = sqrt( sum over concept samples and token rows of x~_j^2 )   (rows L2-normalised across channels,
    a_base[t, j] = the same over the base samples                             both CFG halves; pooled over prompts)
    M_tgt = |W| * a_tgt[t],  M_base = |W| * a_base[t]                          (activation norm broadcast over rows)
    skilled_t[i, j] = j in rowTopK(M_tgt[i, :], floor(skill_ratio * C_in))  AND  M_tgt[i, j] > M_base[i, j]
    mask = union of skilled_t over the first `timesteps` steps (select_ratio 0 in every released script), then the
           union over concepts (`multi_concept_union.py`);  W <- W * (1 - mask), bias untouched.

Where this differs from the code, and why:
- Base prompts. The code pairs `a {obj} in a {scene}` with `a {scene}` from fixed lists. Here the concept's prompts
  are its expanded forget prompts and the base prompts are its anchor (the prompt without the concept; "" for an
  individual concept) plus its preserve prompts. Both sets get the same number of samples, so the pooled norms are
  comparable (the code's sets are equal in size too).
- Sampler. The code runs the pipeline default (PNDM: 51 UNet calls for 50 steps) and reads the first τ calls; here
  the model's schedule drives a DDIM sampler of `steps` steps, stopped after the first `timesteps` of them.
- Seeds: the code seeds 0 before every prompt (every prompt the same noise); here sample k starts from seed + k in
  both sets, so the k-th concept and base samples share their noise and several samples of one prompt differ.
- The code's unused base row-top-k and its per-timestep mask pickles are not reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from ..concepts import ExpandedConcept, MergedConcepts
from ..delta import Delta
from ..parts import DiffusionParts
from ..progress import ProgressCallback, ProgressEvent, null_progress
from . import _common as c


@dataclasses.dataclass
class ConceptPruneConfig:
    """ConceptPrune's settings; defaults are the released code's config defaults (objects use skill_ratio 0.02)."""

    skill_ratio: float = c.field(0.01, "k: share of each output row's inputs that can be skilled (row top-k of the "
                                       "Wanda score), in (0, 1]; code default 0.01, Imagenette objects 0.02")
    timesteps: int = c.field(10, "τ: the first τ sampling steps whose skilled masks are united, 1..steps; code 10 "
                                 "(9 for nudity)")
    steps: int = c.field(50, "sampling steps of the schedule the first τ are taken from, >= 1; code 50")
    samples: int = c.field(10, "generations per prompt set (concept, base), prompts taken in turn, >= 1; code: 10 "
                               "prompt pairs for objects, one image each")
    cfg: float = c.field(7.5, "classifier-free guidance scale of those generations, >= 0; code 7.5")
    seed: int = c.field(0, "sample k of each set starts from the noise of seed + k; code seed 0")
    batch: int = c.field(16, "samples per UNet batch (memory only; no effect on the result), >= 1")
    locus: str = c.field("ff.net.2", "which linear layers are scored and pruned: ff.net.2 (the code's default "
                                     "`unet`), ff.net.0.proj (`unet-ffn-1`), attn2.to_k / attn2.to_v (`attn_key` / "
                                     "`attn_val`; X = the text states)")

    def validate(self) -> None:
        c.check_range("skill_ratio", self.skill_ratio, 0.0, 1.0, low_open=True)
        c.check_range("steps", self.steps, 1, 10_000)
        c.check_range("timesteps", self.timesteps, 1, self.steps)
        c.check_range("samples", self.samples, 1, 100_000)
        c.check_range("cfg", self.cfg, 0.0, 100.0)
        c.check_range("batch", self.batch, 1, 100_000)
        if self.locus not in c.LOCI:
            raise ValueError(f"locus must be one of {', '.join(c.LOCI)}, got {self.locus!r}")


def skilled_mask(weight: torch.Tensor, a_tgt: torch.Tensor, a_base: torch.Tensor, skill_ratio: float) -> torch.Tensor:
    """One layer, one step: row top-k of |W|·a_tgt that also beat |W|·a_base (the reference's skilled_t)."""
    w = weight.abs().float()
    m_tgt, m_base = w * a_tgt.view(1, -1), w * a_base.view(1, -1)
    k = int(skill_ratio * weight.shape[1])
    return c.row_top_k(m_tgt, k) & (m_tgt > m_base)


def concept_mask(weights: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                 config: ConceptPruneConfig) -> dict[str, torch.Tensor]:
    """One concept: the union over the first τ steps of the skilled masks. `tgt` / `base` hold the per-sample,
    per-step column sums of squares (samples x steps x C_in) that ff_input_norms returns."""
    masks = {}
    for name, w in weights.items():
        a_tgt = tgt[name].sum(0).sqrt()  # pooled over samples: (steps, C_in)
        a_base = base[name].sum(0).sqrt()
        mask = torch.zeros(w.shape, dtype=torch.bool)
        for t in range(min(config.timesteps, a_tgt.shape[0])):
            mask |= skilled_mask(w.cpu(), a_tgt[t], a_base[t], config.skill_ratio)
        masks[name] = mask
    return masks


def run(parts: DiffusionParts, concepts: list[ExpandedConcept] | MergedConcepts, config: ConceptPruneConfig,
        progress: ProgressCallback = null_progress) -> Delta:
    """Prune the concepts' skilled `ff.net.2` weights; the delta zeroes them (dense `.diff`, float16 in the file)."""
    config.validate()
    merged, bases = c.contrast_sets(parts, concepts)
    start = time.time()
    weights = c.ff_weights(parts, config.locus)
    union = {n: torch.zeros(w.shape, dtype=torch.bool) for n, w in weights.items()}
    total = 2 * config.samples * len(merged.concepts)
    for i, (concept, base) in enumerate(zip(merged.concepts, bases)):
        norms = []
        for j, prompts in enumerate((list(concept.forget), base)):
            report = c.stage_progress(progress, "saliency", (2 * i + j) * config.samples, total,
                                      f"activations of {concept.text!r} and of its base prompts")
            norms.append(c.ff_input_norms(parts, prompts, config.samples, config.steps, config.timesteps, config.cfg,
                                          config.seed, config.batch, report, config.locus))
        for name, mask in concept_mask(weights, norms[0], norms[1], config).items():
            union[name] |= mask
    pruned = {n: int(m.sum()) for n, m in union.items()}
    params = c.prune_params({n: w.cpu() for n, w in weights.items()}, union)
    meta = c.metadata("conceptprune", config, merged, pruned=json.dumps(pruned),
                      pruned_share=f"{sum(pruned.values()) / sum(w.numel() for w in weights.values()):.6f}",
                      base_prompts=json.dumps(bases), seconds=f"{time.time() - start:.1f}")
    progress(ProgressEvent("prune", 1, 1, {}, f"{sum(pruned.values())} {config.locus} weights zeroed"))
    return Delta({}, meta, c.base_fingerprint(parts), params)
