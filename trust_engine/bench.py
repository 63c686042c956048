"""Scale figures: one TRuST step (saliency + CIP, saliency + CSR) against one full fine-tuning step (SalUn-style)
and one ESD-x step, on random-init SD1.5- and SDXL-shaped UNets at their real latent sizes, batch 1.
FLOPs (torch.utils.flop_counter), peak memory, trainable parameters and CPU/wall seconds, as ratios to full FT.

Each (architecture, method) runs in its own process so its peak memory is its own. Runs unchanged on CUDA.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .parts import features_of

ARCHS = {
    "sd15": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                  layers_per_block=2),
        latent=64, text=(77, 768),
    ),
    "sdxl": dict(
        unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                  attention_head_dim=(5, 10, 20), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        latent=128, text=(77, 2048),
    ),
    # a small stand-in, for tests of this harness
    "tiny": dict(
        unet=dict(sample_size=8, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4,
                  layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        latent=8, text=(8, 32), tiny=True,
    ),
}
METHODS = ("full_ft", "esd", "trust_cip", "trust_csr")


def _models(arch: str, device, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    spec = ARCHS[arch]
    with torch.device(device):  # built where it runs: on "meta" nothing is allocated (FLOPs only)
        unet = UNet2DConditionModel(**spec["unet"]).to(dtype)
    if spec.get("tiny"):
        vae = AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4)
        clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                                    vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2), projection_dim=32))
        image_size = 32
    else:  # SD's VAE and CLIP ViT-L/14 (the aligner of the paper), random init
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        clip = CLIPModel(CLIPConfig(
            text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            vision_config=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=24, num_attention_heads=16), projection_dim=768))
        image_size = 224
    if device.type == "meta":
        vae, clip = vae.to_empty(device=device), clip.to_empty(device=device)
    return unet, vae.to(device, dtype).requires_grad_(False), clip.to(device, dtype).requires_grad_(False), image_size


def _inputs(arch: str, unet, device, dtype, batch: int = 1):
    spec = ARCHS[arch]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, spec["latent"], spec["latent"], generator=g).to(device, dtype)
    cond = torch.randn(batch, *spec["text"], generator=g).to(device, dtype)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280).to(device, dtype),
                                       "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch).to(device, dtype)}
    return latents, cond, kwargs


def make_step(arch: str, method: str, device, dtype, saliency_steps: int = 5, esd_steps: int = 25):
    """A closure running one training step of `method`, and its trainable-parameter count."""
    from .functional import SiteDeltas
    from .unet_view import find_sites

    unet, vae, clip, image_size = _models(arch, device, dtype)
    unet.requires_grad_(False)
    x, cond, kw = _inputs(arch, unet, device, dtype)
    t = torch.tensor([500], device=device)

    def call(fn, latents, c):
        n = latents.shape[0]
        extra = {k: {kk: vv.expand(n, *vv.shape[1:]) for kk, vv in v.items()} for k, v in kw.items()}
        return fn(latents, t.expand(n), encoder_hidden_states=c.expand(n, -1, -1), return_dict=False, **extra)[0]

    if method == "full_ft":
        params = [p for p in unet.parameters()]
        for p in params:
            p.requires_grad_(True)

        def step():
            loss = F.mse_loss(call(unet, x, cond).float(), torch.randn_like(x).float())
            grads = torch.autograd.grad(loss, params)
            return grads

        return step, sum(p.numel() for p in params)

    if method == "esd":  # ESD-x: cross-attention trainable; x_t comes from sampling, as in the official code
        params = [p for n, p in unet.named_parameters() if "attn2" in n]
        for p in params:
            p.requires_grad_(True)

        def step():
            latents = x
            with torch.no_grad():
                for _ in range(esd_steps):  # DDIM steps to a random t (mean of U{0..50}); CFG = 2 passes
                    both = call(unet, torch.cat([latents, latents]), torch.cat([cond, torch.zeros_like(cond)]))
                    latents = latents - 0.01 * both[:1]
                e_u = call(unet, latents, torch.zeros_like(cond))
                e_c = call(unet, latents, cond)
                target = e_u - 1.0 * (e_c - e_u)
            loss = F.mse_loss(call(unet, latents, cond).float(), target.float())
            return torch.autograd.grad(loss, params)

        return step, sum(p.numel() for p in params)

    # TRuST: saliency through VAE decode + CLIP score, then the masked-row loss (+ CIP or CSR)
    sites = find_sites(unet)
    deltas = SiteDeltas(unet, sites)
    mean = torch.tensor([0.481, 0.458, 0.408], device=device, dtype=dtype).view(1, 3, 1, 1)
    ids = torch.zeros(1, 8, dtype=torch.long, device=device)
    csr = method == "trust_csr"

    def step():
        latents = x
        with torch.no_grad():
            for _ in range(saliency_steps):
                both = call(deltas.call, torch.cat([latents, latents]), torch.cat([cond, torch.zeros_like(cond)]))
                latents = latents - 0.01 * both[:1]
        eps = call(deltas.call, torch.cat([latents, latents]), torch.cat([cond, torch.zeros_like(cond)]))
        x0 = latents - 0.5 * (eps[:1] + 7.5 * (eps[:1] - eps[1:]))
        image = vae.decode(x0 / 0.18215).sample
        image = F.interpolate(image, size=(image_size, image_size), mode="bicubic", align_corners=False)
        score = F.cosine_similarity(features_of(clip.get_image_features(pixel_values=image - mean)),
                                    features_of(clip.get_text_features(input_ids=ids)), dim=-1).sum()
        sal = torch.autograd.grad(score, deltas.parameters(), allow_unused=True)
        mask = {s.name: (g.abs().mean(1) > g.abs().mean(1).mean() + 2 * g.abs().mean(1).std()) if g is not None
                else torch.zeros(s.out_features, dtype=torch.bool, device=device) for s, g in zip(sites, sal)}
        with sdpa_kernel([SDPBackend.MATH]) if csr else nullcontext():
            pred = call(deltas.call, x, cond).float()
            with torch.no_grad():
                target = call(deltas.base_call, x, torch.zeros_like(cond)).float()
            retain = call(deltas.call, x, cond).float()
            loss = F.mse_loss(pred, target) + 0.5 * F.mse_loss(retain, torch.randn_like(retain))
            masked = [(deltas.delta[s.name], mask[s.name]) for s in sites]
            if csr:
                v = torch.randn_like(pred)
                gs = torch.autograd.grad((pred * v).sum(), [d for d, _ in masked], create_graph=True, allow_unused=True)
                # masks multiply rather than index, so the step also runs on the meta device (FLOPs only)
                loss = loss + 0.02 * sum((g * m[:, None]).pow(2).sum() for g, (_, m) in zip(gs, masked) if g is not None)
            else:
                loss = loss + 0.1 * sum(((deltas.base[s.name].float() + deltas.delta[s.name]) * mask[s.name][:, None]).abs().sum()
                                        for s in sites)
        return torch.autograd.grad(loss, deltas.parameters(), allow_unused=True)

    return step, sum(s.out_features * s.in_features for s in sites)


def measure_one(arch: str, method: str, steps: int, device: str, dtype: torch.dtype) -> dict:
    """FLOPs of one step, then time and peak memory over `steps` more (0: time the counted step itself, which
    includes the FLOP counter's overhead; for machines where a step takes minutes)."""
    step, trainable = make_step(arch, method, torch.device(device), dtype)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up
    if device == "meta":  # shapes only: FLOPs and parameter counts, no time or memory
        return {"arch": arch, "method": method, "flops": counter.get_total_flops(), "peak_bytes": float("nan"),
                "trainable": trainable, "cpu_s": float("nan"), "wall_s": float("nan"), "device": device,
                "dtype": str(dtype), "steps": 0}
    if steps > 0:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; whole process, incl. weights
    timed = max(steps, 1)
    return {"arch": arch, "method": method, "flops": counter.get_total_flops(), "peak_bytes": peak,
            "trainable": trainable, "cpu_s": (time.process_time() - cpu0) / timed,
            "wall_s": (time.perf_counter() - wall0) / timed, "device": device, "dtype": str(dtype), "steps": steps}


def run(archs: list[str], steps: int, device: str, dtype: str, progress=print) -> list[dict]:
    """Every (arch, method) in its own process; returns the rows with ratios to full_ft added."""
    rows = []
    for arch in archs:
        base = None
        for method in METHODS:
            progress(f"bench-scale: {arch} {method} ...")
            cmd = [sys.executable, "-m", "trust_engine.bench", arch, method, str(steps), device, dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            note = ""
            if out.returncode != 0 and _out_of_memory(out):
                note = f"does not fit in this machine's memory on {device}: FLOPs counted on the meta device"
                progress(f"bench-scale: {arch} {method}: {note}")
                out = subprocess.run(cmd[:-2] + ["meta", dtype], capture_output=True, text=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode != 0:
                raise RuntimeError(f"bench-scale {arch} {method} failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["note"] = note
            base = base or row
            for key in ("flops", "peak_bytes", "trainable", "cpu_s", "wall_s"):
                row[f"{key}_vs_full_ft"] = row[key] / base[key] if base[key] else float("nan")
            rows.append(row)
    return rows


def _out_of_memory(out: subprocess.CompletedProcess) -> bool:
    """Killed by the kernel's OOM killer (SIGKILL) or an allocator error."""
    text = out.stderr.lower()
    return out.returncode in (-9, 137) or "out of memory" in text or "can't allocate memory" in text


if __name__ == "__main__":
    arch, method, steps, device, dtype = sys.argv[1:6]
    torch.manual_seed(0)
    print(json.dumps(measure_one(arch, method, int(steps), device, getattr(torch, dtype))))
