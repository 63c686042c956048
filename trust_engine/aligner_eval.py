"""Judging a delta on a user's own checkpoint, where the testbed judge cannot read the images: the aligner's CLIP
score of the forget and preserve prompts' generations before and after the delta, on the same noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from .delta import Delta
from .parts import Aligner, DiffusionParts
from .unet_view import find_sites, site_weights, weight_path
from .unlearn import generate_latents


def delta_call(unet: nn.Module, delta: Delta, strength: float = 1.0) -> Callable[..., torch.Tensor]:
    """The UNet's forward with base + strength * delta at the delta's sites; the UNet itself is not written."""
    sites = {s.name: s for s in find_sites(unet, include_out=True)}
    new = delta.apply_to(site_weights(unet, list(sites.values())), strength)  # raises for sites this UNet lacks
    weights = {name: p.detach() for name, p in unet.named_parameters()}
    for name, weight in new.items():
        weights[weight_path(unet, sites[name]) + ".weight"] = weight

    def call(*args, **kwargs):
        return functional_call(unet, weights, args, kwargs, strict=False)

    return call


@torch.no_grad()
def clip_scores(parts: DiffusionParts, aligner: Aligner, call, prompts: list[str], seeds: int, steps: int, cfg: float,
                seed: int, batch: int = 4) -> list[float]:
    """The aligner's CLIP score of `seeds` generations of each prompt (DDIM, `steps`, guidance `cfg`)."""
    gen = torch.Generator().manual_seed(seed)
    latents, chosen = generate_latents(parts, call, prompts, len(prompts) * seeds, steps, cfg, gen, batch)
    scores = [aligner.score(parts.decode(latents[i:i + batch]), chosen[i:i + batch]).float().cpu()
              for i in range(0, len(chosen), batch)]
    return torch.cat(scores).tolist()


def evaluate(parts: DiffusionParts, aligner: Aligner, delta: Delta, forget: list[str], preserve: list[str],
             seeds: int = 2, steps: int = 20, cfg: float = 7.5, seed: int = 1000) -> dict:
    """Mean CLIP score of the forget and the preserve prompts' generations, before (the base UNet) and after (base +
    delta); before and after share their noise, so a change is the delta's. The empty prompt is not scored."""
    preserve = [p for p in preserve if p.strip()]
    after_call = delta_call(parts.unet, delta)
    report: dict = {}
    for key, prompts, offset in (("forget", forget, 0), ("preserve", preserve, 100_000)):
        if not prompts:
            continue
        for suffix, call in (("_before", parts.unet), ("", after_call)):
            values = clip_scores(parts, aligner, call, prompts, seeds, steps, cfg, seed + offset)
            report[f"{key}_clip{suffix}"] = sum(values) / len(values)
        report[f"{key}_images"] = len(prompts) * seeds
    report.update(forget_prompts=len(forget), preserve_prompts=len(preserve), seeds=seeds, steps=steps, cfg=cfg)
    return report
