"""What the erasers in this package share: config fields with help, concept merging and prompt checks, the base
fingerprint, metadata, and the `ff.net.2` input activations of short guided samplings (FIA and ConceptPrune).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import torch
from torch import nn

from .. import __version__
from ..concepts import ExpandedConcept, MergedConcepts, merge
from ..delta import fingerprint
from ..parts import DiffusionParts
from ..progress import ProgressEvent
from ..saliency import guided_eps
from ..unet_params import modules_named
from ..unet_view import find_sites, site_weights

FF_OUT = "ff.net.2"  # the second feed-forward linear of every transformer block: FIA's and ConceptPrune's locus
# the loci FIA's layer ablation compares (its Table 13) and ConceptPrune's code can hook: FFN2, FFN1, C-Attn k / v
LOCI = ("ff.net.2", "ff.net.0.proj", "attn2.to_k", "attn2.to_v")


def field(default, help_text: str):
    """A dataclass field carrying its help text (the CLI and the nodes show it)."""
    return dataclasses.field(default=default, metadata={"help": help_text})


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    """A clear error for a config value outside its documented range, before any work starts."""
    below = value <= low if low_open else value < low
    if below or value > high or value != value:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")


def as_merged(concepts: list[ExpandedConcept] | MergedConcepts | ExpandedConcept) -> MergedConcepts:
    if isinstance(concepts, ExpandedConcept):
        concepts = [concepts]
    merged = concepts if isinstance(concepts, MergedConcepts) else merge(concepts)
    if not merged.forget:
        raise ValueError("nothing to forget: the concept expanded to no prompts")
    return merged


def check_prompts(parts: DiffusionParts, prompts: list[str]) -> None:
    """Every prompt the model will read, checked up front (the testbed names unknown words)."""
    if parts.check_prompt:
        for prompt in prompts:
            if prompt:
                parts.check_prompt(prompt)


def base_fingerprint(parts: DiffusionParts) -> str:
    """The fingerprint every delta of this engine records: the base model's cross-attention Q/K/V weights."""
    return fingerprint(site_weights(parts.unet, find_sites(parts.unet)))


def metadata(method: str, config, merged: MergedConcepts, **extra: str) -> dict[str, str]:
    """The delta's metadata: which method ran, with which config, on which concepts."""
    return {
        "method": method,
        "config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        "concepts": json.dumps([c.text for c in merged.concepts]),
        "modes": json.dumps([c.mode for c in merged.concepts]),
        "engine_version": __version__,
        **extra,
    }


def base_prompts(concept: ExpandedConcept, erased: set[str]) -> list[str]:
    """The prompts a concept's prompts are contrasted with: its anchor (the concept's prompt without the concept, in
    the expander's terms; "" for an individual concept) and its preserve prompts, minus anything being erased."""
    return list(dict.fromkeys(p for p in (concept.anchor, *concept.preserve) if p not in erased))


def contrast_sets(parts: DiffusionParts, concepts: list[ExpandedConcept] | MergedConcepts
                  ) -> tuple[MergedConcepts, list[list[str]]]:
    """The merged concepts and, per concept, the prompts its forget prompts are contrasted with (base_prompts, or
    [""] when none is left), every prompt checked against the model's vocabulary first."""
    merged = as_merged(concepts)
    erased = set(merged.forget)
    bases = [base_prompts(concept, erased) or [""] for concept in merged.concepts]
    check_prompts(parts, [*merged.forget, *(p for b in bases for p in b)])
    return merged, bases


@torch.no_grad()
def ff_input_norms(parts: DiffusionParts, prompts: list[str], samples: int, steps: int, timesteps: int, cfg: float,
                   seed: int, batch: int = 16, on_batch: Callable[[int, int], None] | None = None,
                   locus: str = FF_OUT) -> dict[str, torch.Tensor]:
    """Per `locus` layer (LDM name; `ff.net.2` by default): a (samples x timesteps x C_in) tensor of column sums of
    squares of the layer's input X (for ff.net.2 the GEGLU output; for attn2.to_k/to_v the text states), each token
    row L2-normalised across channels first, rows from both halves of the classifier-free-guidance batch (as the
    diffusers pipeline batches them).

    Sample k takes prompt k mod len(prompts) and starts from the noise of seed + k, so the k-th samples of two prompt
    sets share their noise (FIA fixes one seed for all its pairs). A DDIM sampler of `steps` steps on the model's
    schedule runs only its first `timesteps` steps: the later ones are never recorded.

    The activations are read by a global module forward hook (torch.nn.modules.module) that matches the layers by
    identity and is removed on exit: the host's modules get no hook of their own, and nothing of theirs is written."""
    layers = modules_named(parts.unet, locus)
    if not layers:
        raise ValueError(f"this UNet has no {locus} layers in its transformer blocks")
    name_of = {id(m): n for n, m in layers.items()}
    sums = {n: torch.zeros(samples, timesteps, m.in_features) for n, m in layers.items()}
    current: dict[str, object] = {}

    def hook(module: nn.Module, args, output) -> None:
        name = name_of.get(id(module))
        if name is None or not args:
            return
        x = args[0].detach().float()
        n = current["n"]
        x = x.reshape(2, n, -1, x.shape[-1])  # (cond/uncond half, sample, tokens, channels)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        per_sample = x.pow(2).sum(dim=(0, 2))  # both halves' token rows of each sample
        start, t = current["start"], current["t"]
        sums[name][start:start + n, t] += per_sample.cpu()

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        chosen = [prompts[k % len(prompts)] for k in range(samples)]
        for start in range(0, samples, batch):
            chunk = chosen[start:start + batch]
            n = len(chunk)
            cond, uncond = parts.encode_text(chunk), parts.encode_text([""] * n)
            noise = [torch.randn(parts.latent_shape, generator=torch.Generator().manual_seed(seed + start + i))
                     for i in range(n)]
            latents = torch.stack(noise).to(parts.device, torch.float32)
            sched = parts.ddim(steps)
            latents = latents * sched.init_noise_sigma
            for t_index, t in enumerate(sched.timesteps[:timesteps]):
                current.update(n=n, start=start, t=t_index)
                eps = guided_eps(parts, parts.unet, latents, t, cond, uncond, cfg)
                latents = sched.step(eps, t, latents).prev_sample
            if on_batch:
                on_batch(start + n, samples)
    finally:
        handle.remove()
    return sums


def ff_weights(parts: DiffusionParts, locus: str = FF_OUT) -> dict[str, torch.Tensor]:
    """LDM name -> the weight of each `locus` layer (detached view of the host's tensor, never written)."""
    return {n: m.weight.detach() for n, m in modules_named(parts.unet, locus).items()}


def row_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of each row's k largest entries (ties broken by torch.topk)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, scores.topk(min(k, scores.shape[1]), dim=1).indices, True)
    return mask


def layer_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the layer's k largest entries."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[scores.flatten().topk(min(k, scores.numel())).indices] = True
    return mask.view_as(scores)


def prune_params(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense differences that zero the masked weights: -W where masked, 0 elsewhere (float32)."""
    return {f"{n}.weight": torch.where(masks[n], -weights[n].float(), torch.zeros((), dtype=torch.float32))
            for n in masks if bool(masks[n].any())}


def stage_progress(progress, stage: str, offset: int, total: int, message: str) -> Callable[[int, int], None]:
    """An on_batch(done, n) callback reporting `offset + done` of `total` in `stage` (a host may raise from it)."""
    return lambda done, _n: progress(ProgressEvent(stage, offset + done, total, {}, message))
