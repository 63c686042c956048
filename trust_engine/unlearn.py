"""Selective fine-tuning (TRuST Algorithm 2): re-find the concept neurons every k steps and update only their rows
of a delta, under a SalUn-style forget/retain loss plus CIP (L1 on concept neurons) or CSR (their sensitivity).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from . import __version__
from .concepts import ExpandedConcept, MergedConcepts, merge
from .delta import Delta, fingerprint
from .functional import SiteDeltas, release_free_memory
from .parts import Aligner, DiffusionParts
from .progress import NanGuard, ProgressEvent, null_progress
from .ranges import check_config
from .saliency import SaliencyConfig, SaliencyResult, estimate, guided_output, zscore_mask
from .unet_view import find_sites


def _f(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class UnlearnConfig:
    """Shared settings of a TRuST run; use CIPConfig or CSRConfig, whose defaults differ in beta."""

    loss: str = _f("cip", "cip: L1 penalty on the concept neurons' weights; csr: penalty on the noise prediction's sensitivity to them")
    steps: int = _f(60, "fine-tuning steps (an early stop may end sooner)")
    lr: float | None = _f(None, "absolute Adam learning rate of the delta rows (each masked entry moves about this much "
                                "per step); None: relative_lr times each site's weight RMS, so the same setting moves "
                                "rows by the same fraction on every model")
    relative_lr: float = _f(0.1, "learning rate as a fraction of each site's weight RMS (used when lr is None). 0.1 is "
                                 "the testbed's tuned 5e-3 (its K/V weights' RMS is 0.05-0.06); the report prints the "
                                 "relative row change per step it gave")
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
    mask_rows: int = _f(0, "ablation control: the mask is the this-many rows of highest z among the rows that may "
                           "change, instead of z > xi (0 = z > xi)")
    mask_source: str = _f("saliency", "ablation control: 'saliency' (the concept neurons) or 'random' (each step, as "
                                      "many rows as the saliency mask flags, drawn at random among the rows that may "
                                      "change), to measure what saliency itself buys")
    row_budget: float = _f(0.0, "a choice: at most this fraction of the rows that may change are ever changed; a "
                                "step's new concept neurons join in order of z while the budget lasts, rows already "
                                "changed keep training when flagged again (0 = no budget: the changed rows are the "
                                "union of every step's mask)")
    preserve_projection: float = _f(0.0, "a choice: every to_k/to_v update is projected off the text-embedding "
                                         "directions that hold this share of the preserve prompts' token energy (as "
                                         "closed-form editors keep the preserved prompts' keys and values), so those "
                                         "prompts' cross-attention inputs stay exactly as they were (0 = off)")
    batch: int = _f(8, "forget and retain latents per step (each)")
    micro_batch: int = _f(0, "latents per forward/backward pass; gradients are accumulated over the batch, so memory "
                             "grows with this, not with batch (0 = auto: the whole batch for latents up to 32x32, "
                             "else 1)")
    checkpoint: bool | None = _f(None, "recompute the UNet's transformer and resnet blocks' activations in the "
                                       "backward passes instead of keeping them (activation checkpointing on the "
                                       "engine's private copy): the same gradients in less memory, for about one more "
                                       "UNet forward per backward (None = auto: for latents larger than 32x32)")
    csr_hvp: str = _f("finite_difference", "how CSR's Hessian-vector product is taken: 'finite_difference' (a choice: two "
                                           "first-order backward passes at W +- h*u; fits in memory and runs on fused "
                                           "attention kernels) or 'exact' (double backprop through PyTorch's math "
                                           "attention kernel; about twice the memory)")
    csr_probes: int = _f(1, "random probe vectors v per step of CSR's estimate of the sensitivity (the penalty is "
                            "their mean: more probes, lower variance, three UNet passes each). Any setting of "
                            "csr_probes, csr_scale or csr_data other than the first-built (1, batch, forget) takes the "
                            "finite-difference Hessian-vector product whatever csr_hvp says")
    csr_scale: str = _f("batch", "how CSR's probe is scaled: 'batch' (<v, eps> / batch before squaring, as first "
                                 "built: the penalty shrinks as 1/batch) or 'sample' (/ sqrt(batch): its expectation "
                                 "is the per-image sensitivity whatever the batch)")
    csr_data: str = _f("forget", "whose noise prediction CSR keeps insensitive to the concept neurons: 'forget' (the "
                                 "paper's reading) or 'retain' (a Fisher reading: the retain prompts' prediction, so "
                                 "the changed rows move what should be kept as little as possible)")
    csr_fd_step: float = _f(1e-2, "finite-difference step of CSR's Hessian-vector product, as a fraction of the norm "
                                  "of the concept neurons' weights")
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
    saliency: SaliencyConfig = dataclasses.field(default_factory=SaliencyConfig, metadata={
        "help": "how the concept neurons are found (trust_engine.saliency.SaliencyConfig: xi, images, steps, cfg)"})

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


# fields added after TRuST files were first saved, with the value that means what runs did before they existed: the
# cache key (trust_engine.job) leaves them out at that value, so a saved delta is still found for the same inputs
LATER_FIELDS = {"mask_rows": 0, "mask_source": "saliency", "row_budget": 0.0, "preserve_projection": 0.0,
                "csr_probes": 1, "csr_scale": "batch", "csr_data": "forget", "saliency.source": "generate"}


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
            output = guided_output(parts, unet_call, latents, t, cond, uncond, cfg)
            latents = sched.step(output, t, latents).prev_sample
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
    check_weights(parts)
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
        run = TrustRun(parts, merged, config, aligner, cfg, initial_mask)
        run.prepare(progress)
        return run.train(progress, meta)


def check_weights(parts: DiffusionParts) -> None:
    """Refuse weights the engine cannot train through, before any work."""
    odd = {str(p.dtype) for p in parts.unet.parameters() if p.dtype not in (torch.float32, torch.float16,
                                                                            torch.bfloat16, torch.float64)}
    if odd:
        raise ValueError(f"the UNet's weights are stored as {', '.join(sorted(odd))} (e.g. fp8): unlearning needs "
                         "float16, bfloat16 or float32 weights. Load the checkpoint with weight dtype 'default' (or "
                         "fp16/bf16) for the erasure; the delta it writes applies to the fp8 model too.")


class TrustRun:
    """One TRuST run, Algorithm 2: `prepare` generates the forget and retain sets; each `step` re-finds the concept
    neurons (every `mask_every` steps) and takes one masked update of the delta rows. The benchmark times `step`."""

    def __init__(self, parts: DiffusionParts, merged: MergedConcepts, config: UnlearnConfig,
                 aligner: Aligner | None, cfg: float, initial_mask: dict[str, torch.Tensor] | None = None) -> None:
        self.parts, self.merged, self.config, self.aligner, self.cfg = parts, merged, config, aligner, cfg
        self.forget = list(merged.forget)
        self.preserve = list(merged.preserve)
        if config.retain_unconditional and "" not in self.preserve:
            self.preserve.append("")
        self.anchor_of = dict(merged.pairs)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.sites = find_sites(parts.unet, include_out=config.include_out)
        self.kinds = {s.name: s.kind for s in self.sites}
        self.deltas = SiteDeltas(parts.unet, self.sites, trainable=config.projections, checkpoint=_checkpoint(config, parts))
        self.base_fp = fingerprint(self.deltas.base)
        self.alphas = parts.alphas_cumprod.to(parts.device)
        lrs = {n: config.lr if config.lr is not None
               else config.relative_lr * float(self.deltas.base[n].float().pow(2).mean().sqrt())
               for n in self.deltas.delta}
        self.optimizer = MaskedAdam(self.deltas.delta, lrs, self.deltas.base)
        self.scaler = _LossScale(parts.dtype)
        self.guard = NanGuard()
        self.history: list[dict] = []
        self.mask: dict[str, torch.Tensor] | None = None
        self.sal: SaliencyResult | None = None
        self.smooth: dict[str, torch.Tensor] | None = None
        self.initial_mask = initial_mask is not None
        if initial_mask is not None:
            unknown = set(initial_mask) - set(self.kinds)
            if unknown:
                raise ValueError(f"the given concept neurons are for another UNet (unknown sites such as {sorted(unknown)[0]})")
            self.mask = self._allowed({s.name: initial_mask.get(s.name, torch.zeros(s.out_features, dtype=torch.bool))
                                       .to(parts.device) for s in self.sites})
        self.stopper = None
        self.forget_lat = self.retain_lat = None
        self.ever = {n: torch.zeros(d.shape[0], dtype=torch.bool, device=d.device) for n, d in self.deltas.delta.items()}
        self.capacity = round(config.row_budget * sum(d.shape[0] for d in self.deltas.delta.values()))
        self.projector: dict[str, torch.Tensor] = {}  # site -> (in x in) projector off the preserve directions
        if self.mask is not None:
            self.mask = self._budgeted(self.mask, None)

    def _allowed(self, mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mask restricted to the sites that carry a delta (the projection types the config lets change)."""
        return {n: m if n in self.deltas.delta else torch.zeros_like(m) for n, m in mask.items()}

    def prepare(self, progress: Callable[[ProgressEvent], None] = null_progress) -> None:
        """Generate the forget and retain sets with the base model and encode their prompts."""
        config, parts, deltas = self.config, self.parts, self.deltas
        total = config.forget_images + (config.preserve_images if self.preserve else 0)

        def generated(offset: int, what: str):
            return lambda done, n: progress(ProgressEvent("prepare", offset + done, total, {}, f"generating the {what} set"))

        progress(ProgressEvent("prepare", 0, total, {}, "generating the forget set"))
        forget_lat, forget_prompts = generate_latents(parts, deltas.base_call, self.forget, config.forget_images,
                                                      config.gen_steps, self.cfg, self.gen, config.batch,
                                                      generated(0, "forget"))
        retain_lat, retain_prompts = (generate_latents(parts, deltas.base_call, self.preserve, config.preserve_images,
                                                       config.gen_steps, self.cfg, self.gen, config.batch,
                                                       generated(config.forget_images, "retain"))
                                      if self.preserve else (None, []))
        self.set_data(forget_lat, forget_prompts, retain_lat, retain_prompts)
        if self.aligner and config.early_stop is not None:
            self.stopper = _EarlyStop(parts, deltas, self.forget, [self.anchor_of[p] for p in self.forget],
                                      self.aligner, config, self.cfg)

    def set_data(self, forget_lat, forget_prompts, retain_lat=None, retain_prompts=()) -> None:
        """The training sets as clean latents and their prompts (prepare() generates them; the benchmark sets them)."""
        parts = self.parts
        self.forget_lat, self.retain_lat = forget_lat, retain_lat
        self.forget_prompts = list(forget_prompts)
        self.forget_cond = parts.encode_text(list(forget_prompts))
        self.anchor_cond = parts.encode_text([self.anchor_of.get(p, "") for p in forget_prompts])
        self.retain_cond = parts.encode_text(list(retain_prompts)) if retain_lat is not None else None
        if self.config.preserve_projection > 0 and self.preserve:
            self.projector = preserve_projectors(self.deltas, self.kinds, parts.encode_text(self.preserve),
                                                 self.config.preserve_projection)

    def train(self, progress: Callable[[ProgressEvent], None], metadata: dict[str, str]) -> UnlearnResult:
        start = time.time()
        config = self.config
        stopped, step = False, 0
        for step in range(1, config.steps + 1):
            record = self.step(step)
            if record.get("skipped"):
                progress(ProgressEvent("unlearn", step, config.steps, {"loss": float("nan")}, record["message"]))
                continue
            if self.stopper and (step % config.eval_every == 0 or step == config.steps):
                record["forget_score"] = self.stopper.score()
                stopped = record["forget_score"] <= self.stopper.threshold
            progress(ProgressEvent("unlearn", step, config.steps,
                                   {k: v for k, v in record.items() if isinstance(v, float)}, ""))
            if stopped:
                break
        notes = list(self.guard.messages)
        if self.stopper:
            final = next((h["forget_score"] for h in reversed(self.history) if "forget_score" in h), float("nan"))
            notes.append(f"aligner score of the forget prompts {self.stopper.initial:.1f} -> {final:.1f} "
                         f"(anchor {self.stopper.anchor_score:.1f}; early stop at {self.stopper.threshold:.1f})")
        moves = [h["row_change"] for h in self.history if h.get("row_change")]
        if moves:
            notes.append(f"relative row change per step: median {sorted(moves)[len(moves) // 2]:.2%} of a changed "
                         f"row's norm (learning rate {self.lr_text()})")
        sal = self.sal
        meta = {
            "method": "trust", "loss": config.loss, "forget": json.dumps(self.forget),
            "preserve": json.dumps(self.preserve), "anchors": json.dumps(sorted(set(self.anchor_of.values()))),
            "config": config.to_json(), "steps_run": str(step), "seed": str(config.seed),
            "engine_version": __version__, "saliency_mode": sal.mode if sal else "", **metadata,
        }
        return UnlearnResult(self.deltas.to_delta(meta, self.base_fp), self.history, step, stopped,
                             time.time() - start, sal, notes, self.stopper.initial if self.stopper else None)

    def lr_text(self) -> str:
        if self.config.lr is not None:
            return f"{self.config.lr:g}, absolute"
        return f"{self.config.relative_lr:g} x each site's weight RMS"

    def refresh_mask(self, step: int) -> None:
        config = self.config
        refresh = not config.static_mask and config.mask_every > 0 and (step - 1) % config.mask_every == 0
        if self.mask is None or (refresh and not (step == 1 and self.initial_mask)):
            sal = estimate(self.parts, self.deltas, self.forget, config.saliency, self.aligner,
                           self.merged.concepts[0].anchor, self.gen, self.cfg,
                           clean=(self.forget_lat, self.forget_prompts) if self.forget_lat is not None else None)
            if config.saliency_momentum > 0:
                m = config.saliency_momentum
                self.smooth = {n: v if self.smooth is None else m * self.smooth[n] + (1 - m) * v
                               for n, v in sal.scores.items()}
                z, smoothed_mask = zscore_mask(self.smooth, sal.kinds, config.saliency.xi)
                sal = dataclasses.replace(sal, z=z, mask=smoothed_mask)
            self.sal = sal
            self.mask = self._budgeted(self._chosen(sal), sal.z)

    def _chosen(self, sal: SaliencyResult) -> dict[str, torch.Tensor]:
        """This step's rows before the budget: the concept neurons that may change, or the ablation controls'
        top-K by z (mask_rows) or random rows of the same count (mask_source 'random')."""
        config = self.config
        mask = self._allowed(sal.mask)
        if config.mask_rows > 0:
            mask = self._allowed(_top_rows({n: sal.z[n] for n in self.deltas.delta}, config.mask_rows, mask))
        if config.mask_source == "random":
            names = list(self.deltas.delta)
            sizes = [mask[n].numel() for n in names]
            pick = torch.zeros(sum(sizes), dtype=torch.bool)
            pick[torch.randperm(sum(sizes), generator=self.gen)[:_count(mask)]] = True
            mask = {**mask, **{n: part.to(mask[n].device) for n, part in zip(names, pick.split(sizes))}}
        return mask

    def _budgeted(self, mask: dict[str, torch.Tensor], z: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The mask under the row budget: rows changed before stay when flagged; new rows join by z (site order
        without z) while fewer than the budget's rows were ever changed. Records the rows ever changed."""
        if self.capacity <= 0:
            for n in self.ever:
                self.ever[n] |= mask[n]
            return mask
        names = list(self.ever)
        new = torch.cat([mask[n] & ~self.ever[n] for n in names])
        room = self.capacity - int(sum(int(e.sum()) for e in self.ever.values()))
        if int(new.sum()) > room:
            order = (torch.cat([z[n].float() for n in names]) if z is not None
                     else -torch.arange(new.numel(), dtype=torch.float32, device=new.device))
            keep = torch.zeros_like(new)
            if room > 0:
                keep[torch.where(new, order, torch.full_like(order, -math.inf)).topk(room).indices] = True
            new = new & keep
        sizes = [self.ever[n].numel() for n in names]
        out = dict(mask)
        for n, admitted in zip(names, new.split(sizes)):
            out[n] = (mask[n] & self.ever[n]) | admitted
            self.ever[n] |= admitted
        return out

    def step(self, step: int) -> dict:
        """One step of Algorithm 2; returns its history record."""
        config, deltas = self.config, self.deltas
        self.refresh_mask(step)
        if torch.device(self.parts.device).type == "cpu":
            release_free_memory()  # the saliency's freed heap, before the loss's passes
        mask = self.mask
        loss, grads, log = _loss_and_grads(self, mask)
        if not self.scaler.finite(grads) and math.isfinite(loss):
            # float16 overflow of the scaled gradients: a smaller scale next step; not a divergence
            record = {"step": step, "loss": float("nan"), "neurons": _count(mask), "skipped": True,
                      "message": f"float16 gradient overflow: step skipped, loss scale now {self.scaler.scale:g}"}
            self.history.append(record)
            return record
        if not self.guard.check(torch.tensor(loss), list(grads.values())):
            self.guard.on_bad_step(self.optimizer, step)
            record = {"step": step, "loss": float("nan"), "neurons": _count(mask), "skipped": True,
                      "message": "non-finite loss: step skipped"}
            self.history.append(record)
            return record
        change = self.optimizer.step(grads, mask)
        if config.loss == "cip" and config.cip_update == "proximal" and config.beta > 0:
            _shrink(deltas, mask, {n: g["lr"] * config.beta for n, g in self.optimizer.groups.items()})
        if self.projector:
            _project(deltas, mask, self.projector)
        record = {"step": step, "loss": loss, "neurons": _count(mask), "row_change": change, **log}
        if self.sal is not None:
            record["saliency"] = self.sal.objective
        self.history.append(record)
        return record


class MaskedAdam:
    """Adam (torch.optim.AdamW's update with no weight decay) that moves only the masked rows of each delta. Written
    here because torch's optimizers have no row mask: with one, rows outside the current mask would be moved by their
    stale moments and had to be copied back every step. Moments of unmasked rows decay as if their gradient were 0."""

    def __init__(self, params: dict[str, torch.Tensor], lrs: dict[str, float], base: dict[str, torch.Tensor],
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.base = params, base
        self.groups = {n: {"lr": lrs[n]} for n in params}
        self.param_groups = list(self.groups.values())  # NanGuard scales these learning rates
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = {n: torch.zeros_like(p) for n, p in params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> float:
        """One update; returns the median over changed rows of |row change| / |row of base + delta| (0 if none)."""
        b1, b2 = self.betas
        self.t += 1
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        ratios = []
        for n, d in self.params.items():
            rows = mask[n]
            g = grads[n] * rows.view(-1, 1).to(grads[n].dtype)
            self.m[n].lerp_(g, 1 - b1)
            self.v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
            if not rows.any():
                continue
            denom = (self.v[n][rows].sqrt() / math.sqrt(bc2)).add_(self.eps)
            update = -(self.groups[n]["lr"] / bc1) * self.m[n][rows] / denom
            row = self.base[n][rows].float() + d[rows]
            ratios.append(update.norm(dim=1) / row.norm(dim=1).clamp_min(1e-12))
            d[rows] += update
        if not ratios:
            return 0.0
        return float(torch.cat(ratios).median())


class _LossScale:
    """Dynamic loss scaling for float16 models (the policy of torch.amp.GradScaler, which needs a torch optimizer and
    .grad fields): the loss is multiplied by `scale` before backward and the gradients divided by it; an overflow
    halves the scale and skips the step, ten good steps double it. bfloat16 and float32 need no scaling (scale 1)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.scale = 2.0**16 if dtype == torch.float16 else 1.0
        self.active = dtype == torch.float16
        self.good = 0

    def finite(self, grads: dict[str, torch.Tensor]) -> bool:
        ok = all(bool(torch.isfinite(g).all()) for g in grads.values())
        if not self.active:
            return True
        if not ok:
            self.scale /= 2
            self.good = 0
        else:
            self.good += 1
            if self.good % 10 == 0:
                self.scale = min(self.scale * 2, 2.0**24)
        return ok


def _count(mask: dict[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in mask.values()))


def _noised(latents: torch.Tensor, b: int, alphas: torch.Tensor, gen: torch.Generator, device):
    """A random batch of clean latents noised to random timesteps: (index, t, noise, x_t)."""
    idx = torch.randint(0, latents.shape[0], (b,), generator=gen)
    t = torch.randint(0, alphas.shape[0], (b,), generator=gen).to(device)
    noise = torch.randn(latents[idx].shape, generator=gen).to(device)
    a = alphas[t].view(-1, 1, 1, 1)
    return idx, t, noise, a.sqrt() * latents[idx] + (1 - a).sqrt() * noise


def _eps(parts: DiffusionParts, call, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Noise prediction (float32) of `call` (base or base + delta), whatever the model predicts. The loss is taken in
    eps space for every prediction type (a choice: a v-model's loss is then the eps-model's loss of the same network)."""
    return parts.eps_from_output(parts.denoise(call, x_t.to(parts.dtype), t, cond).float(), x_t, t)


def _micro(config: UnlearnConfig, parts: DiffusionParts, b: int) -> int:
    if config.micro_batch > 0:
        return min(config.micro_batch, b)
    area = parts.latent_shape[-1] * parts.latent_shape[-2]
    return b if area <= 32 * 32 else 1


def _checkpoint(config: UnlearnConfig, parts: DiffusionParts) -> bool:
    if config.checkpoint is not None:
        return config.checkpoint
    return parts.latent_shape[-1] * parts.latent_shape[-2] > 32 * 32


def _loss_and_grads(run: TrustRun, mask):
    """L_prev (forget: concept prediction -> the base model's anchor prediction, pushed further away from the
    concept by negative guidance; retain: noise MSE or the base prediction) + beta * R, and its gradient in the
    deltas (unscaled, float32). The batch is processed in micro-batches whose gradients are summed."""
    parts, deltas, config, gen, alphas = run.parts, run.deltas, run.config, run.gen, run.alphas
    scale = run.scaler.scale
    names = list(deltas.delta)
    grads = {n: torch.zeros_like(d) for n, d in deltas.delta.items()}

    def accumulate(value: torch.Tensor) -> None:
        got = torch.autograd.grad(value * scale, [deltas.delta[n] for n in names], allow_unused=True)
        for n, g in zip(names, got):
            if g is not None:
                grads[n] += g

    b = min(config.batch, run.forget_lat.shape[0])
    mb = _micro(config, parts, b)
    idx, t, _, x_t = _noised(run.forget_lat, b, alphas, gen, parts.device)
    with torch.no_grad():
        target = _eps(parts, deltas.base_call, x_t, t, run.anchor_cond[idx])
        if config.negative_guidance:
            concept = _eps(parts, deltas.base_call, x_t, t, run.forget_cond[idx])
            target = target - config.negative_guidance * (concept - target)
    retain = run.retain_lat is not None and config.alpha > 0
    if retain:
        r_idx, r_t, r_noise, r_x = _noised(run.retain_lat, b, alphas, gen, parts.device)
        with torch.no_grad():
            r_target = (_eps(parts, deltas.base_call, r_x, r_t, run.retain_cond[r_idx])
                        if config.retain_target == "base" else r_noise)
    masked = {n: mask[n] for n in names if mask[n].any()}
    csr = config.loss == "csr" and bool(masked) and config.beta > 0
    generic_csr = csr and _generic_csr(config)
    if generic_csr:  # several probes, another scale or the retain data: its own passes after the loss's
        csr = False
    v = torch.randn(target.shape, generator=gen).to(parts.device) if csr else None
    exact_csr = csr and config.csr_hvp == "exact"
    if exact_csr:
        mb = b  # the exact penalty squares a sum over the whole batch: one pass
    csr_grads = {n: torch.zeros_like(deltas.delta[n]) for n in masked} if csr and not exact_csr else None
    loss_forget = loss_retain = 0.0
    penalty = None
    for lo in range(0, b, mb):
        sl = slice(lo, lo + mb)
        with _math_attention() if exact_csr else nullcontext():
            pred = _eps(parts, deltas.call, x_t[sl], t[sl], run.forget_cond[idx[sl]])
            part = F.mse_loss(pred, target[sl], reduction="sum") / target.numel()
            loss_forget += float(part.detach())
            if exact_csr:
                got = torch.autograd.grad((pred * v[sl]).sum() / b, [deltas.delta[n] for n in masked],
                                          create_graph=True, allow_unused=True)
                penalty_t = _masked_square(got, masked)
                accumulate(part + config.beta * penalty_t)
                penalty = float(penalty_t.detach())
            else:
                if csr:  # the first-order gradient of <v, eps> / batch, for the Hessian-vector product
                    got = torch.autograd.grad((pred * v[sl]).sum() / b * scale, [deltas.delta[n] for n in masked],
                                              retain_graph=True, allow_unused=True)
                    for n, g in zip(masked, got):
                        if g is not None:
                            csr_grads[n] += g / scale
                accumulate(part)
        if retain:
            r_pred = _eps(parts, deltas.call, r_x[sl], r_t[sl], run.retain_cond[r_idx[sl]])
            r_part = F.mse_loss(r_pred, r_target[sl], reduction="sum") / r_target.numel()
            loss_retain += float(r_part.detach())
            accumulate(config.alpha * r_part)
    loss = loss_forget + (config.alpha * loss_retain if retain else 0.0)
    log = {"forget_loss": loss_forget}
    if retain:
        log["retain_loss"] = loss_retain
    if masked and config.beta > 0:
        if generic_csr:
            data = ((r_x, r_t, run.retain_cond[r_idx]) if config.csr_data == "retain" and retain
                    else (x_t, t, run.forget_cond[idx]))
            penalty = _csr_probes(run, masked, *data, mb, grads, scale)
            loss += config.beta * penalty
        elif csr:
            if not exact_csr:
                penalty = _csr_finite_difference(run, masked, csr_grads, x_t, t, idx, v, b, mb, grads, scale)
            loss += config.beta * penalty
        elif config.cip_update == "gradient":
            penalty_t = _cip_penalty(deltas, masked)
            accumulate(config.beta * penalty_t)
            penalty = float(penalty_t.detach())
            loss += config.beta * penalty
        else:  # proximal: applied after the optimizer step (_shrink); logged only
            with torch.no_grad():
                penalty = float(_cip_penalty(deltas, masked))
        log["penalty"] = penalty
    for n in grads:
        grads[n] /= scale
    return loss, grads, log


def _math_attention():
    """Scaled-dot-product attention restricted to the math kernel: the fused kernels have no double backward.
    torch >= 2.3 has torch.nn.attention.sdpa_kernel; older torch (AUTOMATIC1111 pins 2.1.2) the same switch as
    torch.backends.cuda.sdp_kernel, which also governs the CPU kernels."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel([SDPBackend.MATH])


def _masked_square(grads, masked: dict[str, torch.Tensor]) -> torch.Tensor:
    """||m * g||^2 / (masked entries): the CSR penalty of the first derivatives g."""
    total, count = 0.0, 0
    for g, n in zip(grads, masked):
        if g is None:
            continue
        m = masked[n]
        total = total + g[m].pow(2).sum()
        count += int(m.sum()) * g.shape[1]
    return total / max(1, count)


def _csr_finite_difference(run: TrustRun, masked, g, x_t, t, idx, v, b, mb, grads, scale) -> float:
    """CSR's gradient by a central finite-difference Hessian-vector product: with phi(W) = <v, eps(W)> / batch and
    u = m * dphi/dW, the penalty P = |u|^2 / count has dP/dW = 2 H_phi u / count ~ (dphi/dW(W + h u) -
    dphi/dW(W - h u)) / (h * count). Two first-order backward passes, no double backprop."""
    deltas, config, parts = run.deltas, run.config, run.parts
    count = sum(int(m.sum()) * deltas.delta[n].shape[1] for n, m in masked.items())
    u = {n: g[n] * masked[n].view(-1, 1) for n in masked}
    penalty = sum(float(u[n].pow(2).sum()) for n in u) / max(1, count)
    u_norm = math.sqrt(sum(float(x.pow(2).sum()) for x in u.values()))
    if u_norm == 0:
        return penalty
    with torch.no_grad():
        w_norm = math.sqrt(sum(float((deltas.base[n][m].float() + deltas.delta[n][m]).pow(2).sum())
                               for n, m in masked.items()))
    h = config.csr_fd_step * max(w_norm, 1e-12) / u_norm
    sides = []
    for sign in (1.0, -1.0):
        deltas.offset = {n: sign * h * u[n] for n in u}
        try:
            side = {n: torch.zeros_like(u[n]) for n in u}
            for lo in range(0, b, mb):
                sl = slice(lo, lo + mb)
                pred = _eps(parts, deltas.call, x_t[sl], t[sl], run.forget_cond[idx[sl]])
                got = torch.autograd.grad((pred * v[sl]).sum() / b * scale, [deltas.delta[n] for n in u],
                                          allow_unused=True)
                for n, gg in zip(u, got):
                    if gg is not None:
                        side[n] += gg
        finally:
            deltas.offset = {}
        sides.append(side)
    for n in u:
        grads[n] += config.beta * (sides[0][n] - sides[1][n]) / (h * max(1, count))
    return penalty


def _top_rows(z: dict[str, torch.Tensor], k: int, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The k rows of highest z across the given sites, as masks (sites not in z: no rows)."""
    names = list(z)
    flat = torch.cat([z[n].float() for n in names])
    pick = torch.zeros_like(flat, dtype=torch.bool)
    pick[flat.topk(min(k, flat.numel())).indices] = True
    out = {n: torch.zeros_like(m) for n, m in template.items()}
    for n, part in zip(names, pick.split([z[n].numel() for n in names])):
        out[n] = part
    return out


def preserve_projectors(deltas: SiteDeltas, kinds: dict[str, str], preserve_cond: torch.Tensor,
                        energy: float) -> dict[str, torch.Tensor]:
    """Per to_k/to_v site: I - U U^T, U = the fewest eigenvectors of the preserve prompts' token second-moment matrix
    (every token of every prompt, as the text encoder gives them to cross-attention) holding `energy` of its trace.
    A delta row d with d U = 0 leaves W c unchanged for any c in span(U): those prompts' keys and values stay."""
    # float64 on the CPU: MPS has no float64, and a (width x width) eigendecomposition is cheap anywhere
    tokens = preserve_cond.detach().reshape(-1, preserve_cond.shape[-1]).to("cpu", torch.float64)
    values, vectors = torch.linalg.eigh(tokens.T @ tokens)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    share = values.cumsum(0) / values.sum().clamp_min(1e-30)
    r = int((share < energy).sum()) + 1 if energy < 1 else int((values > 0).sum())
    u = vectors[:, :min(r, vectors.shape[1])]
    projector = (torch.eye(u.shape[0], dtype=torch.float64) - u @ u.T).float()
    return {n: projector.to(d.device) for n, d in deltas.delta.items()
            if kinds[n] in ("k", "v") and d.shape[1] == projector.shape[0]}


def _project(deltas: SiteDeltas, mask, projectors: dict[str, torch.Tensor]) -> None:
    """The changed rows of every projected site moved back into the preserve directions' null space."""
    with torch.no_grad():
        for name, projector in projectors.items():
            rows = mask[name]
            if rows.any():
                d = deltas.delta[name]
                d[rows] = d[rows] @ projector


def _generic_csr(config: UnlearnConfig) -> bool:
    """Whether CSR runs through `_csr_probes` (anything but the first-built single forget probe)."""
    return config.csr_probes > 1 or config.csr_scale != "batch" or config.csr_data != "forget"


def _csr_probes(run: TrustRun, masked, x_t, t, cond, mb: int, grads, scale: float) -> float:
    """CSR's penalty mean_p |m * d<v_p, eps>/dW|^2 / count over `csr_probes` probes on the given inputs, and its
    gradient (added to `grads`) by the same central finite-difference Hessian-vector product as
    `_csr_finite_difference`, per probe: three first-order passes per probe (the probe's gradient, then W +- h u)."""
    deltas, config, parts = run.deltas, run.config, run.parts
    b = x_t.shape[0]
    norm = math.sqrt(b) if config.csr_scale == "sample" else b
    count = sum(int(m.sum()) * deltas.delta[n].shape[1] for n, m in masked.items())
    with torch.no_grad():
        w_norm = math.sqrt(sum(float((deltas.base[n][m].float() + deltas.delta[n][m]).pow(2).sum())
                               for n, m in masked.items()))
    total = 0.0
    for _ in range(config.csr_probes):
        v = torch.randn((b, *parts.latent_shape), generator=run.gen).to(parts.device)

        def probe_grad(offset: dict[str, torch.Tensor], v: torch.Tensor = v) -> dict[str, torch.Tensor]:
            deltas.offset = offset
            try:
                out = {n: torch.zeros_like(deltas.delta[n]) for n in masked}
                for lo in range(0, b, mb):
                    sl = slice(lo, lo + mb)
                    pred = _eps(parts, deltas.call, x_t[sl], t[sl], cond[sl])
                    got = torch.autograd.grad((pred * v[sl]).sum() / norm * scale,
                                              [deltas.delta[n] for n in masked], allow_unused=True)
                    for n, g in zip(masked, got):
                        if g is not None:
                            out[n] += g / scale
                return out
            finally:
                deltas.offset = {}

        first = probe_grad({})
        u = {n: first[n] * masked[n].view(-1, 1) for n in masked}
        total += sum(float(u[n].pow(2).sum()) for n in u) / max(1, count)
        u_norm = math.sqrt(sum(float(x.pow(2).sum()) for x in u.values()))
        if u_norm == 0:
            continue
        h = config.csr_fd_step * max(w_norm, 1e-12) / u_norm
        plus = probe_grad({n: h * u[n] for n in u})
        minus = probe_grad({n: -h * u[n] for n in u})
        for n in u:
            grads[n] += scale * config.beta * (plus[n] - minus[n]) / (h * max(1, count) * config.csr_probes)
    return total / config.csr_probes


def _cip_penalty(deltas: SiteDeltas, masked: dict[str, torch.Tensor]) -> torch.Tensor:
    """CIP: mean |W| over the concept neurons' rows of the effective weights (an L1 surrogate of switching them off)."""
    total, count = 0.0, 0
    for name, m in masked.items():
        d = deltas.delta[name]
        w = deltas.base[name][m].float() + d[m]
        total = total + w.abs().sum()
        count += w.numel()
    return total / max(1, count)


def _shrink(deltas: SiteDeltas, mask, amounts: dict[str, float]) -> None:
    """Proximal step of the L1 (CIP) term on the concept neurons' rows of base + delta: every entry moves `amount`
    towards zero and stops there (soft thresholding), decoupled from Adam's scaling as AdamW decouples weight decay."""
    with torch.no_grad():
        for name, d in deltas.delta.items():
            rows = mask[name]
            if not rows.any():
                continue
            w = deltas.base[name][rows].float() + d[rows]
            shrunk = w.sign() * (w.abs() - amounts[name]).clamp_min(0)
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
