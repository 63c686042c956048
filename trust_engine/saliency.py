"""Concept saliency (TRuST Algorithm 1): which output rows ("neurons") of the cross-attention Q/K/V projections
carry a concept, from the gradient of a CLIP score of the model's own generation; z-score outliers per type.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import torch

from .functional import SiteDeltas
from .parts import Aligner, DiffusionParts
from .progress import ProgressEvent


@dataclasses.dataclass
class SaliencyConfig:
    xi: float = dataclasses.field(default=2.0, metadata={"help": "z-score threshold: a row is a concept neuron when its saliency z > xi (paper: 2.0)"})
    steps: int = dataclasses.field(default=10, metadata={"help": "DDIM steps of the generation the saliency is measured on"})
    images: int = dataclasses.field(default=2, metadata={"help": "images generated per estimate (their gradients are summed)"})
    cfg: float | None = dataclasses.field(default=None, metadata={"help": "guidance scale of that generation (None: the model's default)"})
    stop_range: tuple[float, float] = dataclasses.field(default=(0.3, 0.7), metadata={
        "help": "the differentiable x0-prediction is taken at a random point of the trajectory in this fraction range "
                "(earlier steps run without gradients): a choice, the paper does not say where"})
    mode: str = dataclasses.field(default="auto", metadata={
        "help": "clip: gradient of the aligner's CLIP score; noise: gradient of ||eps(x_t,c) - eps(x_t,anchor)||^2 "
                "(for hosts without an aligner); auto: clip when an aligner is given"})


@dataclasses.dataclass
class SaliencyResult:
    """Per site: row scores (mean |grad|), their z-scores within the projection type, and the mask z > xi."""

    scores: dict[str, torch.Tensor]
    z: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    kinds: dict[str, str]
    objective: float  # the CLIP score (or noise contrast) the gradient was taken of
    mode: str
    images: torch.Tensor | None = None  # the differentiable step's decoded x0 (detached), for previews

    def counts(self) -> dict[str, int]:
        return {name: int(m.sum()) for name, m in self.mask.items()}

    def total(self) -> int:
        return sum(self.counts().values())

    def table(self) -> list[tuple[str, dict[str, tuple[int, float]]]]:
        """Rows = transformer blocks in forward order; per kind: (concept neurons, max z) — the heatmap's data."""
        blocks: dict[str, dict[str, tuple[int, float]]] = {}
        for name, kind in self.kinds.items():
            block = name.rsplit(".attn2.", 1)[0]
            blocks.setdefault(block, {})[kind] = (int(self.mask[name].sum()), float(self.z[name].max()))
        return list(blocks.items())

    def summary(self) -> str:
        rows = sum(m.numel() for m in self.mask.values())
        by_kind: dict[str, int] = {}
        for name, kind in self.kinds.items():
            by_kind[kind] = by_kind.get(kind, 0) + int(self.mask[name].sum())
        kinds = ", ".join(f"{k.upper()} {v}" for k, v in sorted(by_kind.items()))
        return (f"{self.total()} concept neurons of {rows} rows ({kinds}); "
                f"{'CLIP score' if self.mode == 'clip' else 'noise contrast'} {self.objective:.2f}")


def guided_eps(parts: DiffusionParts, unet_call, latents, t, cond, uncond, cfg: float) -> torch.Tensor:
    """Classifier-free-guided noise prediction, conditional and unconditional in one batch."""
    n = latents.shape[0]
    x = torch.cat([latents, latents])
    tt = torch.full((2 * n,), int(t), device=latents.device, dtype=torch.long)
    out = parts.denoise(unet_call, x.to(parts.dtype), tt, torch.cat([cond, uncond]))
    eps = parts.eps_from_output(out.float(), x.float(), tt)
    e_c, e_u = eps.chunk(2)
    return e_u + cfg * (e_c - e_u)


def estimate(parts: DiffusionParts, deltas: SiteDeltas, prompts: list[str], config: SaliencyConfig,
             aligner: Aligner | None = None, anchor: str = "", generator: torch.Generator | None = None,
             cfg: float = 7.5, progress: Callable[[ProgressEvent], None] | None = None) -> SaliencyResult:
    """One saliency estimate at the current weights (base + delta): Algorithm 1. `progress` gets a "saliency" event
    per sampling step and one at the end (a host stops the estimate by raising from it)."""
    mode = config.mode if config.mode != "auto" else ("clip" if aligner is not None else "noise")
    if mode == "clip" and aligner is None:
        raise ValueError("CLIP-score saliency needs an aligner (a CLIP with both towers); use mode 'noise' without one")
    cfg = config.cfg if config.cfg is not None else cfg
    gen = generator or torch.Generator().manual_seed(0)
    rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    chosen = [prompts[rng.randrange(len(prompts))] for _ in range(config.images)]
    n = len(chosen)
    cond = parts.encode_text(chosen)
    uncond = parts.encode_text([""] * n)
    sched = parts.ddim(config.steps)
    lo, hi = config.stop_range
    k_stop = rng.randint(int(lo * (config.steps - 1)), max(int(lo * (config.steps - 1)), int(hi * (config.steps - 1))))
    latents = torch.randn((n, *parts.latent_shape), generator=gen).to(parts.device)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps[:k_stop]):
            eps = guided_eps(parts, deltas.call, latents, t, cond, uncond, cfg)
            latents = sched.step(eps, t, latents).prev_sample
            if progress:
                progress(ProgressEvent("saliency", i + 1, config.steps, {}, "sampling"))
    t = sched.timesteps[k_stop]
    a = parts.alphas_cumprod[int(t)].to(latents.device)
    images = None
    if mode == "clip":
        eps = guided_eps(parts, deltas.call, latents, t, cond, uncond, cfg)
        x0 = (latents - (1 - a).sqrt() * eps) / a.sqrt()
        images = parts.decode(x0)
        objective = aligner.score(images, chosen).mean()
    else:
        anchor_cond = parts.encode_text([anchor] * n)
        tt = torch.full((n,), int(t), device=latents.device, dtype=torch.long)
        x = latents.to(parts.dtype)
        e_c = parts.eps_from_output(parts.denoise(deltas.call, x, tt, cond).float(), latents, tt)
        e_a = parts.eps_from_output(parts.denoise(deltas.call, x, tt, anchor_cond).float(), latents, tt)
        objective = (e_c - e_a).pow(2).mean()
    grads = torch.autograd.grad(objective, deltas.parameters(), allow_unused=True)
    scores = {}
    for site, g in zip(deltas.sites, grads):
        scores[site.name] = g.abs().mean(1) if g is not None else torch.zeros(site.out_features, device=parts.device)
    z, mask = zscore_mask(scores, {s.name: s.kind for s in deltas.sites}, config.xi)
    if progress:
        progress(ProgressEvent("saliency", config.steps, config.steps, {}, "gradient taken"))
    return SaliencyResult(scores, z, mask, {s.name: s.kind for s in deltas.sites}, float(objective.detach()), mode,
                          images.detach() if images is not None else None)


def zscore_mask(scores: dict[str, torch.Tensor], kinds: dict[str, str], xi: float):
    """z-score of every row within its projection type (Q, K or V) across all layers; mask = z > xi."""
    z: dict[str, torch.Tensor] = {}
    for kind in sorted(set(kinds.values())):
        names = [n for n in scores if kinds[n] == kind]
        flat = torch.cat([scores[n].float() for n in names])
        mean, std = flat.mean(), flat.std().clamp_min(1e-12)
        for n in names:
            z[n] = (scores[n].float() - mean) / std
    return z, {n: v > xi for n, v in z.items()}
