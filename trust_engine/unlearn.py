"""Selective fine-tuning (TRuST Algorithm 2): re-find the concept neurons every k steps and update only their rows
of a delta, under a SalUn-style forget/retain loss plus CIP (L1 on concept neurons) or CSR (their sensitivity).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import __version__
from .concepts import ExpandedConcept, MergedConcepts, merge
from .delta import Delta, fingerprint
from .functional import SiteDeltas
from .parts import Aligner, DiffusionParts
from .progress import NanGuard, ProgressEvent, null_progress
from .ranges import check_config
from .saliency import SaliencyConfig, SaliencyResult, estimate, guided_eps, zscore_mask
from .unet_view import find_sites


def _f(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class UnlearnConfig:
    """Shared settings of a TRuST run; use CIPConfig or CSRConfig, whose defaults differ in beta."""

    loss: str = _f("cip", "cip: L1 penalty on the concept neurons' weights; csr: penalty on the noise prediction's sensitivity to them")
    steps: int = _f(60, "fine-tuning steps (an early stop may end sooner)")
    lr: float = _f(5e-3, "AdamW learning rate of the delta rows")
    beta: float = _f(0.1, "weight of the CIP/CSR term")
    alpha: float = _f(0.5, "weight of the retain (preserve) noise loss, as in SalUn")
    retain_target: str = _f("base", "retain loss target: 'base' (a choice: the base model's own prediction, zero at "
                                    "the start, so any drift on preserve prompts costs) or 'noise' (SalUn: the sampled "
                                    "noise; measured on the testbed: more damage to preserved prompts)")
    retain_unconditional: bool = _f(True, "add the empty prompt to the retain set: classifier-free guidance leans on the "
                                           "unconditional prediction, and the changed rows also act on it")
    negative_guidance: float = _f(1.0, "forget target = eps_anchor - eta * (eps_concept - eps_anchor) of the base model "
                                       "(ESD's negative guidance); 0 = pull plainly to the anchor (SalUn)")
    mask_every: int = _f(1, "re-estimate the concept neurons every k steps (paper: every step)")
    cip_update: str = _f("gradient", "how CIP's L1 term acts: 'gradient' (added to the loss, so Adam rescales it: every "
                                      "masked weight shrinks at about lr per step whatever beta is) or 'proximal' "
                                      "(soft-thresholding by lr * beta after each step, decoupled like AdamW's decay)")
    saliency_momentum: float = _f(0.0, "a choice: the mask is taken from an exponential moving average of the row "
                                       "saliencies with this momentum (0 = each estimate alone, as in the paper); "
                                       "steadier masks touch fewer rows over a run")
    static_mask: bool = _f(False, "ablation: estimate the mask once and keep it")
    batch: int = _f(8, "forget and retain latents per step (each)")
    forget_images: int = _f(32, "self-generated images of the forget prompts (the forget set)")
    preserve_images: int = _f(64, "self-generated images of the preserve prompts (the retain set)")
    gen_steps: int = _f(20, "DDIM steps used to generate those sets")
    cfg: float | None = _f(None, "guidance scale for generation (None: the model's default)")
    early_stop: float | None = _f(0.15, "stop when the aligner score of fresh forget generations has fallen to within this fraction of the gap above the anchor's (None: never)")
    eval_every: int = _f(10, "steps between early-stop checks")
    include_out: bool = _f(False, "also treat attn2.to_out.0 rows as sites (the paper: Q/K/V only)")
    projections: str = _f("kv", "which projection types may change (letters of q, k, v, o). A choice: the paper "
                                "trains Q/K/V; Q rows act on the image features of every prompt, and on the testbed "
                                "training K/V only kept more of the preserved prompts at equal forgetting. Saliency "
                                "and the z-scores still cover every type")
    seed: int = _f(0, "seed of data generation, saliency and timesteps")
    saliency: SaliencyConfig = dataclasses.field(default_factory=SaliencyConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass
class CIPConfig(UnlearnConfig):
    loss: str = "cip"
    beta: float = _f(0.1, "weight of the L1 penalty on concept-neuron weights (mean |W| over masked rows)")


@dataclasses.dataclass
class CSRConfig(UnlearnConfig):
    loss: str = "csr"
    beta: float = _f(0.02, "weight of ||m * d<v, eps>/dW||^2 (mean over masked entries), double backprop")


def config_for(loss: str, **overrides) -> UnlearnConfig:
    cls = {"cip": CIPConfig, "csr": CSRConfig}.get(loss.lower())
    if cls is None:
        raise ValueError(f"unknown loss {loss!r}: choose 'cip' (hard, sparsity) or 'csr' (soft, sensitivity)")
    return cls(**overrides)


@dataclasses.dataclass
class UnlearnResult:
    delta: Delta
    history: list[dict]
    steps_run: int
    stopped_early: bool
    seconds: float
    last_saliency: SaliencyResult | None
    notes: list[str]
    forget_score_before: float | None = None  # aligner score of the forget prompts' generations at the start

    def report(self) -> str:
        changed = sum(d.rank for d in self.delta.sites.values())
        lines = [f"{self.steps_run} steps in {self.seconds:.0f}s{' (early stop)' if self.stopped_early else ''}; "
                 f"{changed} rows changed in {len(self.delta.sites)} sites"]
        if self.history:
            h = self.history[-1]
            lines.append(f"last loss {h['loss']:.4f}, concept neurons {h['neurons']}")
        return "\n".join(lines + self.notes)


@torch.no_grad()
def generate_latents(parts: DiffusionParts, unet_call, prompts: list[str], n: int, steps: int, cfg: float,
                     generator: torch.Generator, batch: int = 32,
                     on_batch: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, list[str]]:
    """n clean latents generated with DDIM from prompts taken in turn, and the prompt of each.
    `on_batch(done, n)` is called after each batch (progress, and a chance to interrupt)."""
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    out = []
    for start in range(0, n, batch):
        chunk = chosen[start:start + batch]
        cond, uncond = parts.encode_text(chunk), parts.encode_text([""] * len(chunk))
        latents = torch.randn((len(chunk), *parts.latent_shape), generator=generator).to(parts.device)
        sched = parts.ddim(steps)
        for t in sched.timesteps:
            latents = sched.step(guided_eps(parts, unet_call, latents, t, cond, uncond, cfg), t, latents).prev_sample
        out.append(latents)
        if on_batch:
            on_batch(start + len(chunk), n)
    return torch.cat(out), chosen


def unlearn(parts: DiffusionParts, concepts: ExpandedConcept | MergedConcepts | list[ExpandedConcept],
            config: UnlearnConfig, aligner: Aligner | None = None,
            progress: Callable[[ProgressEvent], None] = null_progress, metadata: dict[str, str] | None = None,
            default_cfg: float = 7.5, initial_mask: dict[str, torch.Tensor] | None = None) -> UnlearnResult:
    """Erase the concepts' forget prompts while keeping their preserve prompts; returns a Delta.
    The host's UNet is only read: an exception or interruption (raised by `progress`) leaves it as it was.
    `initial_mask` (site -> bool rows, e.g. from a saliency run) replaces the first step's estimate."""
    check_config(config)  # every input in its allowed range before any work (trust_engine.ranges)
    if isinstance(concepts, ExpandedConcept):
        concepts = [concepts]
    merged = concepts if isinstance(concepts, MergedConcepts) else merge(concepts)
    if not merged.forget:
        raise ValueError("nothing to forget: the concept expanded to no prompts")
    if parts.check_prompt:
        for prompt in (*merged.forget, *merged.preserve, *(a for _, a in merged.pairs if a)):
            parts.check_prompt(prompt)
    cfg = config.cfg if config.cfg is not None else default_cfg
    meta = {
        "concepts": json.dumps([c.text for c in merged.concepts]),
        "modes": json.dumps([c.mode for c in merged.concepts]),
        **(metadata or {}),
    }
    with torch.inference_mode(False), torch.enable_grad():
        return _unlearn(parts, merged, config, aligner, progress, meta, cfg, initial_mask)


def _unlearn(parts, merged: MergedConcepts, config, aligner, progress, metadata, cfg, initial_mask) -> UnlearnResult:
    start = time.time()
    forget, preserve = list(merged.forget), list(merged.preserve)
    if config.retain_unconditional and "" not in preserve:
        preserve.append("")
    anchor_of = dict(merged.pairs)
    gen = torch.Generator().manual_seed(config.seed)
    sites = find_sites(parts.unet, include_out=config.include_out)
    deltas = SiteDeltas(parts.unet, sites)
    base_fp = fingerprint(deltas.base)

    total = config.forget_images + (config.preserve_images if preserve else 0)

    def generated(offset: int, what: str):
        return lambda done, n: progress(ProgressEvent("prepare", offset + done, total, {}, f"generating the {what} set"))

    progress(ProgressEvent("prepare", 0, total, {}, "generating the forget set"))
    forget_lat, forget_prompts = generate_latents(parts, deltas.base_call, forget, config.forget_images,
                                                  config.gen_steps, cfg, gen, config.batch, generated(0, "forget"))
    retain_lat, retain_prompts = (generate_latents(parts, deltas.base_call, preserve, config.preserve_images,
                                                   config.gen_steps, cfg, gen, config.batch,
                                                   generated(config.forget_images, "retain"))
                                  if preserve else (None, []))
    forget_cond = parts.encode_text(forget_prompts)
    anchor_cond = parts.encode_text([anchor_of[p] for p in forget_prompts])
    retain_cond = parts.encode_text(retain_prompts) if preserve else None
    first_anchor = merged.concepts[0].anchor

    stopper = _EarlyStop(parts, deltas, forget, [anchor_of[p] for p in forget], aligner, config, cfg) \
        if (aligner and config.early_stop is not None) else None
    optimizer = torch.optim.AdamW(deltas.parameters(), lr=config.lr, weight_decay=0.0)
    guard = NanGuard()
    history: list[dict] = []
    mask: dict[str, torch.Tensor] | None = None
    sal: SaliencyResult | None = None
    smooth: dict[str, torch.Tensor] | None = None
    stopped = False
    alphas = parts.alphas_cumprod.to(parts.device)
    step = 0
    if initial_mask is not None:
        unknown = set(initial_mask) - {s.name for s in sites}
        if unknown:
            raise ValueError(f"the given concept neurons are for another UNet (unknown sites such as {sorted(unknown)[0]})")
        mask = _allowed({s.name: initial_mask.get(s.name, torch.zeros(s.out_features, dtype=torch.bool))
                         .to(parts.device) for s in sites}, {s.name: s.kind for s in sites}, config.projections)
    for step in range(1, config.steps + 1):
        refresh = not config.static_mask and config.mask_every > 0 and (step - 1) % config.mask_every == 0
        if mask is None or (refresh and not (step == 1 and initial_mask is not None)):
            sal = estimate(parts, deltas, forget, config.saliency, aligner, first_anchor, gen, cfg)
            if config.saliency_momentum > 0:
                m = config.saliency_momentum
                smooth = {n: v if smooth is None else m * smooth[n] + (1 - m) * v for n, v in sal.scores.items()}
                z, smoothed_mask = zscore_mask(smooth, sal.kinds, config.saliency.xi)
                sal = dataclasses.replace(sal, z=z, mask=smoothed_mask)
            mask = _allowed(sal.mask, sal.kinds, config.projections)
        loss, parts_log = _loss(parts, deltas, mask, config, gen, alphas, forget_lat, forget_cond, anchor_cond,
                                retain_lat, retain_cond)
        grads = torch.autograd.grad(loss, deltas.parameters(), allow_unused=True)
        grads = [torch.zeros_like(d) if g is None else g for g, d in zip(grads, deltas.parameters())]
        if not guard.check(loss, grads):
            guard.on_bad_step(optimizer, step)
            history.append({"step": step, "loss": float("nan"), "neurons": _count(mask), "skipped": True})
            progress(ProgressEvent("unlearn", step, config.steps, {"loss": float("nan")}, "non-finite loss: step skipped"))
            continue
        _masked_step(optimizer, deltas, grads, mask)
        if config.loss == "cip" and config.cip_update == "proximal" and config.beta > 0:
            _shrink(deltas, mask, optimizer.param_groups[0]["lr"] * config.beta)
        record = {"step": step, "loss": float(loss.detach()), "neurons": _count(mask), **parts_log}
        if sal is not None:
            record["saliency"] = sal.objective
        if stopper and (step % config.eval_every == 0 or step == config.steps):
            record["forget_score"] = stopper.score()
            stopped = record["forget_score"] <= stopper.threshold
        history.append(record)
        progress(ProgressEvent("unlearn", step, config.steps,
                               {k: v for k, v in record.items() if isinstance(v, float)}, ""))
        if stopped:
            break
    notes = list(guard.messages)
    if stopper:
        final = next((h["forget_score"] for h in reversed(history) if "forget_score" in h), float("nan"))
        notes.append(f"aligner score of the forget prompts {stopper.initial:.1f} -> {final:.1f} "
                     f"(anchor {stopper.anchor_score:.1f}; early stop at {stopper.threshold:.1f})")
    meta = {
        "method": "trust", "loss": config.loss, "forget": json.dumps(forget), "preserve": json.dumps(preserve),
        "anchors": json.dumps(sorted(set(anchor_of.values()))), "config": config.to_json(), "steps_run": str(step),
        "seed": str(config.seed), "engine_version": __version__, "saliency_mode": sal.mode if sal else "",
        **metadata,
    }
    return UnlearnResult(deltas.to_delta(meta, base_fp), history, step, stopped, time.time() - start, sal, notes,
                         stopper.initial if stopper else None)


def _count(mask: dict[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in mask.values()))


def _allowed(mask: dict[str, torch.Tensor], kinds: dict[str, str], projections: str) -> dict[str, torch.Tensor]:
    """The mask restricted to the projection types the config lets change ('o' stands for to_out)."""
    letter = {"q": "q", "k": "k", "v": "v", "out": "o"}
    return {n: m if letter.get(kinds[n], kinds[n]) in projections else torch.zeros_like(m) for n, m in mask.items()}


def _noised(latents: torch.Tensor, b: int, alphas: torch.Tensor, gen: torch.Generator, device):
    """A random batch of clean latents noised to random timesteps: (index, t, noise, x_t)."""
    idx = torch.randint(0, latents.shape[0], (b,), generator=gen)
    t = torch.randint(0, alphas.shape[0], (b,), generator=gen).to(device)
    noise = torch.randn(latents[idx].shape, generator=gen).to(device)
    a = alphas[t].view(-1, 1, 1, 1)
    return idx, t, noise, a.sqrt() * latents[idx] + (1 - a).sqrt() * noise


def _eps(parts: DiffusionParts, call, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Noise prediction (float32) of `call` (base or base + delta), whatever the model predicts."""
    return parts.eps_from_output(parts.denoise(call, x_t.to(parts.dtype), t, cond).float(), x_t, t)


def _loss(parts, deltas, mask, config, gen, alphas, forget_lat, forget_cond, anchor_cond, retain_lat, retain_cond):
    """L_prev (forget: concept prediction -> the base model's anchor prediction, pushed further away from the
    concept by negative guidance; retain: noise MSE or the base prediction) + beta * R."""
    b = min(config.batch, forget_lat.shape[0])
    idx, t, _, x_t = _noised(forget_lat, b, alphas, gen, parts.device)
    with torch.no_grad():
        target = _eps(parts, deltas.base_call, x_t, t, anchor_cond[idx])
        if config.negative_guidance:
            concept = _eps(parts, deltas.base_call, x_t, t, forget_cond[idx])
            target = target - config.negative_guidance * (concept - target)
    csr = config.loss == "csr"
    with sdpa_kernel([SDPBackend.MATH]) if csr else nullcontext():  # fused kernels have no double backward
        pred = _eps(parts, deltas.call, x_t, t, forget_cond[idx])
        loss_forget = F.mse_loss(pred, target)
        loss = loss_forget
        log = {"forget_loss": float(loss_forget.detach())}
        if retain_lat is not None and config.alpha > 0:
            r_idx, r_t, r_target, r_x = _noised(retain_lat, b, alphas, gen, parts.device)
            r_pred = _eps(parts, deltas.call, r_x, r_t, retain_cond[r_idx])
            if config.retain_target == "base":
                with torch.no_grad():
                    r_target = _eps(parts, deltas.base_call, r_x, r_t, retain_cond[r_idx])
            loss_retain = F.mse_loss(r_pred, r_target)
            loss = loss + config.alpha * loss_retain
            log["retain_loss"] = float(loss_retain.detach())
        masked = [(d, mask[name]) for name, d in deltas.delta.items() if mask[name].any()]
        if masked and config.beta > 0:
            if csr:
                penalty = _csr_penalty(pred, deltas, masked, gen)
                loss = loss + config.beta * penalty
            elif config.cip_update == "gradient":
                penalty = _cip_penalty(deltas, masked)
                loss = loss + config.beta * penalty
            else:  # proximal: applied after the optimizer step (_shrink); logged only
                with torch.no_grad():
                    penalty = _cip_penalty(deltas, masked)
            log["penalty"] = float(penalty.detach())
    return loss, log


def _cip_penalty(deltas: SiteDeltas, masked) -> torch.Tensor:
    """CIP: mean |W| over the concept neurons' rows of the effective weights (an L1 surrogate of switching them off)."""
    total, count = 0.0, 0
    for name, d in deltas.delta.items():
        m = next((mm for dd, mm in masked if dd is d), None)
        if m is None:
            continue
        w = deltas.base[name][m].float() + d[m]
        total = total + w.abs().sum()
        count += w.numel()
    return total / max(1, count)


def _csr_penalty(pred: torch.Tensor, deltas: SiteDeltas, masked, gen) -> torch.Tensor:
    """CSR: ||m * d<v, eps>/dW||^2 with a fresh v ~ N(0, I): a random projection of the Jacobian's Frobenius norm,
    whose gradient is a Hessian-vector product (double backprop)."""
    v = torch.randn(pred.shape, generator=gen).to(pred.device)
    tensors = [d for d, _ in masked]
    grads = torch.autograd.grad((pred * v).sum() / pred.shape[0], tensors, create_graph=True, allow_unused=True)
    total, count = 0.0, 0
    for g, (_, m) in zip(grads, masked):
        if g is None:
            continue
        total = total + g[m].pow(2).sum()
        count += int(m.sum()) * g.shape[1]
    return total / max(1, count)


def _masked_step(optimizer: torch.optim.Optimizer, deltas: SiteDeltas, grads, mask) -> None:
    """Update only the concept neurons' rows: gradients of other rows are zeroed, and after the optimizer step
    those rows are restored, so Adam's moments from earlier steps cannot move a row outside the current mask."""
    with torch.no_grad():
        before = {}
        for (name, d), g in zip(deltas.delta.items(), grads):
            m = mask[name].view(-1, 1)
            d.grad = g * m
            before[name] = d.detach().clone()
        optimizer.step()
        for name, d in deltas.delta.items():
            keep = ~mask[name]
            d[keep] = before[name][keep]
            d.grad = None


def _shrink(deltas: SiteDeltas, mask, amount: float) -> None:
    """Proximal step of the L1 (CIP) term on the concept neurons' rows of base + delta: every entry moves `amount`
    towards zero and stops there (soft thresholding), decoupled from Adam's scaling as AdamW decouples weight decay."""
    with torch.no_grad():
        for name, d in deltas.delta.items():
            rows = mask[name]
            if not rows.any():
                continue
            w = deltas.base[name][rows].float() + d[rows]
            shrunk = w.sign() * (w.abs() - amount).clamp_min(0)
            d[rows] = shrunk - deltas.base[name][rows].float()


class _EarlyStop:
    """Aligner score of fresh generations of the forget prompts against them, vs. the anchors' generations."""

    def __init__(self, parts, deltas, forget, anchors, aligner, config, cfg):
        self.parts, self.deltas, self.forget, self.aligner, self.config, self.cfg = parts, deltas, forget, aligner, config, cfg
        self.n = 8
        self.initial = self._score(deltas.base_call, forget)
        self.anchor_score = self._score(deltas.base_call, anchors, against=forget)
        self.threshold = self.anchor_score + config.early_stop * (self.initial - self.anchor_score)

    @torch.no_grad()
    def _score(self, call, prompts, against=None) -> float:
        gen = torch.Generator().manual_seed(self.config.seed + 7)  # the same noise every time: comparable scores
        lat, _ = generate_latents(self.parts, call, prompts, self.n, self.config.gen_steps, self.cfg, gen)
        texts = [(against or prompts)[i % len(against or prompts)] for i in range(self.n)]
        return float(self.aligner.score(self.parts.decode(lat), texts).mean())

    def score(self) -> float:
        return self._score(self.deltas.call, self.forget)
