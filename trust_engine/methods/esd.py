"""ESD-x (Gandikota et al., ICCV 2023, "Erasing Concepts from Diffusion Models"): fine-tune the cross-attention
(`attn2`) so that the model's prediction for a concept prompt follows the base model's prediction pushed away from the
concept by negative guidance.

Reference: shared/reference/method-fia-conceptprune-baselines.md §3.2 (the CompVis script `train-esd.py`). Per
iteration:

    c  = a forget prompt (the concept's expanded prompts, one drawn at random), k ~ U{0 .. ddim_steps - 1}
    x_t = k DDIM steps (eta 0, guidance `start_guidance`) of the model being trained, from fresh noise, prompt c;
          t = the schedule's timestep the next DDIM step would take
    target = eps_base(x_t, t, "") - eta * (eps_base(x_t, t, c) - eps_base(x_t, t, ""))      (eta = negative_guidance)
    L = MSE(eps_theta(x_t, t, c), target),  one Adam step on the attn2 to_q / to_k / to_v / to_out.0 weights.

The weights change as float32 differences added on the output of each attn2 projection of a private copy of the
UNet (trust_engine.functional.SiteDeltas): the host's UNet is only read. The delta holds them as the pack's row-sparse
sites (Adam moves every row, so each site carries all of its rows; the file holds each as a dense `.diff`).

Defaults are the paper's / CompVis script's: eta 1, 1000 iterations, batch 1, Adam lr 1e-5, x_t from a 50-step DDIM
trajectory with guidance 3. Where this differs from the code, and why:
- Timestep. The script draws the UNet's timestep uniformly from [k, k+1) * 1000 / ddim_steps while x_t is the latent
  after k DDIM steps *from noise*, i.e. at timestep ~1000 - k * 1000 / ddim_steps; the two disagree except mid-way.
  Here the UNet is asked at the timestep x_t is actually at (the next DDIM step's), so every target is a prediction
  of the latent's real noise level.
- Parameters. ESD-x trains every parameter whose name contains `attn2`, to_out.0's bias included. The bias is left
  unchanged here: the pack stores attn2 weights as row-sparse LoRA sites, and a site cannot carry a dense bias (A1111
  applies one module type per layer). `projections` can narrow the set (e.g. "kv": the new code's esd-x-strict).
- The unconditional prompt is "", as in ESD, whatever anchor the concept expander gives (UCE/TRuST use the anchor).
- Several forget prompts (the expander's) instead of the script's single word: one is drawn per iteration.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch
import torch.nn.functional as F

from ..concepts import ExpandedConcept, MergedConcepts
from ..delta import Delta
from ..functional import SiteDeltas
from ..parts import DiffusionParts
from ..progress import NanGuard, ProgressCallback, ProgressEvent, null_progress
from ..saliency import guided_output
from ..unet_view import find_sites
from ..unlearn import _eps, _LossScale, check_weights
from . import _common as c


@dataclasses.dataclass
class ESDConfig:
    """ESD-x's settings; defaults are the paper's (CompVis `train-esd.py`)."""

    negative_guidance: float = c.field(1.0, "eta: how far the target is pushed from the concept, "
                                            "eps('') - eta (eps(c) - eps('')), >= 0; paper 1 (the newer diffusers "
                                            "script: 2)")
    iterations: int = c.field(1000, "Adam steps, >= 1; paper 1000")
    lr: float = c.field(1e-5, "Adam learning rate of the attn2 weights, > 0; paper 1e-5")
    batch: int = c.field(1, "latents per iteration (one prompt, one timestep, fresh noise each), >= 1; paper 1")
    ddim_steps: int = c.field(50, "DDIM steps of the trajectory x_t is taken from (a random number of them is run), "
                                  ">= 1; paper 50")
    start_guidance: float = c.field(3.0, "classifier-free guidance of that trajectory, >= 0; paper 3")
    projections: str = c.field("qkvo", "which attn2 projections train (letters of q, k, v, o = to_out.0); ESD-x: all "
                                       "four; 'kv' is the newer script's esd-x-strict")
    seed: int = c.field(0, "seed of the prompt, step and noise draws")

    def validate(self) -> None:
        c.check_range("negative_guidance", self.negative_guidance, 0.0, 100.0)
        c.check_range("iterations", self.iterations, 1, 1_000_000)
        c.check_range("lr", self.lr, 0.0, 1.0, low_open=True)
        c.check_range("batch", self.batch, 1, 10_000)
        c.check_range("ddim_steps", self.ddim_steps, 1, 10_000)
        c.check_range("start_guidance", self.start_guidance, 0.0, 100.0)
        if not self.projections or set(self.projections) - set("qkvo") or len(set(self.projections)) != len(
                self.projections):
            raise ValueError(f"projections must be distinct letters of q, k, v, o, got {self.projections!r}")


def esd_target(eps_uncond: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's target: the base model's unconditional prediction, moved eta times the concept's guidance away."""
    return eps_uncond - eta * (eps_concept - eps_uncond)


def esd_loss(pred: torch.Tensor, eps_uncond: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """MSE (mean over all elements) of the trained model's concept prediction against `esd_target`."""
    return F.mse_loss(pred, esd_target(eps_uncond, eps_concept, eta))


@torch.no_grad()
def partial_trajectory(parts: DiffusionParts, unet_call, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
                       steps: int, stop: int, guidance: float) -> tuple[torch.Tensor, int]:
    """The latent after the first `stop` of `steps` guided DDIM steps (eta 0) from `noise`, and the timestep the
    next step would take (the latent's noise level)."""
    sched = parts.ddim(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps[:stop]:
        x = sched.step(guided_output(parts, unet_call, x, t, cond, uncond, guidance), t, x).prev_sample
    return x, int(sched.timesteps[stop])


def run(parts: DiffusionParts, concepts: list[ExpandedConcept] | MergedConcepts, config: ESDConfig,
        progress: ProgressCallback = null_progress) -> Delta:
    """Fine-tune the attn2 projections with ESD's negative-guidance loss; the delta holds their differences as
    row-sparse sites. `progress` may raise to interrupt: the host's UNet is never written."""
    config.validate()
    merged = c.as_merged(concepts)
    prompts = list(merged.forget)
    c.check_prompts(parts, prompts)
    check_weights(parts)
    with torch.inference_mode(False), torch.enable_grad():
        return _train(parts, merged, prompts, config, progress)


def _train(parts, merged, prompts, config: ESDConfig, progress) -> Delta:
    start = time.time()
    sites = find_sites(parts.unet, include_out=True)
    deltas = SiteDeltas(parts.unet, sites, trainable=config.projections)
    optimizer = torch.optim.Adam(deltas.parameters(), lr=config.lr)
    scaler, guard = _LossScale(parts.dtype), NanGuard()
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        conds = parts.encode_text(prompts)
        uncond = parts.encode_text([""] * config.batch)
    b = config.batch
    losses = []
    for it in range(1, config.iterations + 1):
        k = int(torch.randint(len(prompts), (1,), generator=gen))
        stop = int(torch.randint(config.ddim_steps, (1,), generator=gen))
        noise = torch.randn((b, *parts.latent_shape), generator=gen).to(parts.device)
        cond = conds[k:k + 1].expand(b, *conds.shape[1:])
        x_t, t = partial_trajectory(parts, deltas.call, cond, uncond, noise, config.ddim_steps, stop,
                                    config.start_guidance)
        tt = torch.full((b,), t, device=parts.device, dtype=torch.long)
        with torch.no_grad():
            e_0 = _eps(parts, deltas.base_call, x_t, tt, uncond)
            e_p = _eps(parts, deltas.base_call, x_t, tt, cond)
        pred = _eps(parts, deltas.call, x_t, tt, cond)
        loss = esd_loss(pred, e_0, e_p, config.negative_guidance)
        optimizer.zero_grad(set_to_none=True)
        (loss * scaler.scale).backward()
        grads = [p.grad for p in deltas.parameters() if p.grad is not None]
        for g in grads:
            g.div_(scaler.scale)
        value = float(loss.detach())
        if not scaler.finite(dict(enumerate(grads))) and value == value:
            progress(ProgressEvent("unlearn", it, config.iterations, {"loss": float("nan")},
                                   "float16 gradient overflow: step skipped"))
            continue
        if not guard.check(loss, grads):
            guard.on_bad_step(optimizer, it)
            progress(ProgressEvent("unlearn", it, config.iterations, {"loss": float("nan")},
                                   "non-finite loss: step skipped"))
            continue
        optimizer.step()
        losses.append(value)
        progress(ProgressEvent("unlearn", it, config.iterations, {"loss": value}, "ESD-x fine-tuning"))
    meta = c.metadata("esd", config, merged, forget=json.dumps(prompts), losses=json.dumps(losses),
                      skipped=json.dumps(guard.messages), seconds=f"{time.time() - start:.2f}")
    return deltas.to_delta(meta, c.base_fingerprint(parts))
