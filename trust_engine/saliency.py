"""Concept saliency (TRuST Algorithm 1): which output rows ("neurons") of the cross-attention Q/K/V projections
carry a concept, from the gradient of a CLIP score of the model's own generation; z-score outliers per type.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import torch

from .functional import SiteDeltas, release_free_memory
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
    source: str = dataclasses.field(default="generate", metadata={
        "help": "where the noisy latent the gradient is taken at comes from: 'generate' (a fresh trajectory from "
                "noise, sampled without gradients up to the stop point: the paper's reading) or 'forget_set' (a "
                "choice, cheaper: a clean latent of the run's forget set, noised to the stop point's timestep; no "
                "sampling passes). Runs without a forget set (the saliency node) always generate"})
    decode_precision: str = dataclasses.field(default="host", metadata={
        "help": "precision of the differentiable decode and CLIP score (clip mode): host = the model's dtype; "
                "bfloat16 = under bfloat16 autocast on a float32 host, which halves that path's activations (the "
                "largest part of a step's memory above the frozen weights); the gradient only ranks rows"})


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


def guided_output(parts: DiffusionParts, unet_call, latents, t, cond, uncond, cfg: float) -> torch.Tensor:
    """Classifier-free-guided model output in the model's own parametrisation (eps or v; guidance is linear, so
    guiding v is guiding eps), conditional and unconditional in one batch. Float32."""
    n = latents.shape[0]
    x = torch.cat([latents, latents])
    tt = torch.full((2 * n,), int(t), device=latents.device, dtype=torch.long)
    out = parts.denoise(unet_call, x.to(parts.dtype), tt, torch.cat([cond, uncond])).float()
    o_c, o_u = out.chunk(2)
    return o_u + cfg * (o_c - o_u)


def guided_eps(parts: DiffusionParts, unet_call, latents, t, cond, uncond, cfg: float) -> torch.Tensor:
    """Classifier-free-guided noise prediction (float32)."""
    return parts.eps_from_output(guided_output(parts, unet_call, latents, t, cond, uncond, cfg), latents.float(), t)


# Saliency only feeds z-scores, which do not change when the objective is scaled: in float16 the objective is scaled
# up so that its gradients through the UNet stay in float16's normal range, and down again only if they overflow.
_HALF_SCALE = 2.0**16


def estimate(parts: DiffusionParts, deltas: SiteDeltas, prompts: list[str], config: SaliencyConfig,
             aligner: Aligner | None = None, anchor: str = "", generator: torch.Generator | None = None,
             cfg: float = 7.5, progress: Callable[[ProgressEvent], None] | None = None,
             clean: tuple[torch.Tensor, list[str]] | None = None) -> SaliencyResult:
    """One saliency estimate at the current weights (base + delta): Algorithm 1. `progress` gets a "saliency" event
    per sampling step and one at the end (a host stops the estimate by raising from it).

    Memory: the gradient is taken one image at a time, and for each image in three separate graphs (the aligner's
    score back to x0 through the decode, then the conditional and the unconditional UNet pass, each given its share
    of that gradient), so the UNet's, the VAE's and the aligner's activations are never held at once. The result is
    the same gradient as one joint backward; it costs one more UNet forward pair per image."""
    mode = config.mode if config.mode != "auto" else ("clip" if aligner is not None else "noise")
    if mode == "clip" and aligner is None:
        raise ValueError("CLIP-score saliency needs an aligner (a CLIP with both towers); use mode 'noise' without one")
    if config.decode_precision not in DECODE_PRECISIONS:
        raise ValueError(f"decode_precision must be one of {', '.join(DECODE_PRECISIONS)}, "
                         f"got {config.decode_precision!r}")
    cfg = config.cfg if config.cfg is not None else cfg
    gen = generator or torch.Generator().manual_seed(0)
    rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    from_set = config.source == "forget_set" and clean is not None
    if from_set:  # clean latents of the forget set and their prompts
        picked = [rng.randrange(clean[0].shape[0]) for _ in range(config.images)]
        chosen = [clean[1][i] for i in picked]
    else:
        chosen = [prompts[rng.randrange(len(prompts))] for _ in range(config.images)]
    n = len(chosen)
    cond = parts.encode_text(chosen)
    uncond = parts.encode_text([""] * n)
    sched = parts.ddim(config.steps)
    lo, hi = config.stop_range
    k_stop = rng.randint(int(lo * (config.steps - 1)), max(int(lo * (config.steps - 1)), int(hi * (config.steps - 1))))
    latents = torch.randn((n, *parts.latent_shape), generator=gen).to(parts.device)
    t = sched.timesteps[k_stop]
    if from_set:  # x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, as the scheduler noises training latents
        latents = sched.add_noise(clean[0][picked].to(parts.device).float(), latents, t.view(1).repeat(n))
    else:
        with torch.no_grad():
            for i, step_t in enumerate(sched.timesteps[:k_stop]):
                latents = sched.step(guided_output(parts, deltas.call, latents, step_t, cond, uncond, cfg), step_t,
                                     latents).prev_sample
                if progress:
                    progress(ProgressEvent("saliency", i + 1, config.steps, {}, "sampling"))
    if torch.device(parts.device).type == "cpu":
        release_free_memory()  # the sampling's freed activations, before the decode's backward allocates on top
    anchor_cond = parts.encode_text([anchor] * n) if mode == "noise" else None
    scale = _HALF_SCALE if parts.dtype == torch.float16 else 1.0
    for _ in range(40):
        with deltas.probing() as probes:
            objective, images = _backward_per_image(parts, deltas, latents, t, cond, uncond, anchor_cond, chosen,
                                                    aligner, cfg, mode, scale, list(probes.values()),
                                                    config.decode_precision)
            grads = {name: p.grad for name, p in probes.items()}
        if all(g is None or torch.isfinite(g).all() for g in grads.values()) or scale <= 1.0:
            break
        scale /= 2  # float16 overflow: take the same gradient again at a smaller scale
    scores = {}
    for site in deltas.sites:
        g = grads.get(site.name)
        scores[site.name] = (g.abs().mean(1) if g is not None
                             else torch.zeros(site.out_features, device=parts.device))
    z, mask = zscore_mask(scores, {s.name: s.kind for s in deltas.sites}, config.xi)
    if progress:
        progress(ProgressEvent("saliency", config.steps, config.steps, {}, "gradient taken"))
    return SaliencyResult(scores, z, mask, {s.name: s.kind for s in deltas.sites}, objective, mode, images)


DECODE_PRECISIONS = ("host", "bfloat16")


def _decode_autocast(parts: DiffusionParts, precision: str):
    """The autocast context of the differentiable decode + CLIP score: bfloat16 only on a float32 host (a half
    precision host already runs that path in its own dtype)."""
    import contextlib

    if precision == "bfloat16" and parts.dtype == torch.float32:
        return torch.autocast(torch.device(parts.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _backward_per_image(parts, deltas, latents, t, cond, uncond, anchor_cond, chosen, aligner, cfg, mode, scale, probes,
                        decode_precision: str = "host"):
    """Accumulate d(objective * scale)/d(probes) image by image; returns (objective, decoded x0 images or None)."""
    n = latents.shape[0]
    tt = torch.full((1,), int(t), device=latents.device, dtype=torch.long)
    total, images = 0.0, []
    for i in range(n):
        x = latents[i:i + 1]
        if mode == "clip":
            with torch.no_grad():
                out = guided_output(parts, deltas.call, x, t, cond[i:i + 1], uncond[i:i + 1], cfg)
            out = out.requires_grad_(True)
            x0 = parts.x0_from_output(out, x.float(), tt)
            with _decode_autocast(parts, decode_precision):
                image = parts.decode(x0)
                objective = aligner.score(image, [chosen[i]]).float().sum() / n
            (d_out,) = torch.autograd.grad(objective * scale, out)
            images.append(image.detach().float())
            del image, x0
            if latents.device.type == "cpu":
                release_free_memory()
            shares = ((cond, cfg), (uncond, 1.0 - cfg))
        else:
            with torch.no_grad():
                e_c = parts.eps_from_output(parts.denoise(deltas.call, x.to(parts.dtype), tt, cond[i:i + 1]).float(),
                                            x.float(), tt)
                e_a = parts.eps_from_output(parts.denoise(deltas.call, x.to(parts.dtype), tt,
                                                          anchor_cond[i:i + 1]).float(), x.float(), tt)
            diff = e_c - e_a
            objective = diff.pow(2).sum() / (diff.numel() * n)
            d_eps = 2 * diff / (diff.numel() * n) * scale
            shares = ((cond, 1.0), (anchor_cond, -1.0))
        for c, weight in shares:
            if weight == 0:
                continue
            out = parts.denoise(deltas.call, x.to(parts.dtype), tt, c[i:i + 1]).float()
            if mode == "clip":
                torch.autograd.backward(out, d_out * weight, inputs=probes)
            else:
                eps = parts.eps_from_output(out, x.float(), tt)
                torch.autograd.backward(eps, d_eps * weight, inputs=probes)
        total += float(objective.detach())
    return total, (torch.cat(images) if images else None)


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
