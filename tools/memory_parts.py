"""Where the memory of one TRuST step goes, part by part, on bench-scale's random-init models (one process per part):
python tools/memory_parts.py ARCH PART CHECKPOINT, PART one of
  decode  the saliency's differentiable x0 -> VAE decode -> CLIP score -> gradient to x0 (one image)
  clip    the aligner alone: CLIP score of a decoded-size image -> gradient to the image
  unet    one UNet forward + backward to the saliency probes (batch 1), as in the saliency's per-pass backward
CHECKPOINT 1: through the engine's checkpointed copies (decoder / UNet blocks), 0: plain.
Prints JSON: the process's RSS before the part (weights built) and its peak during the part (Linux VmHWM, reset
before the part through /proc/self/clear_refs), in bytes, and the part's CPU seconds."""

import json
import sys
import time

import torch


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(arch: str, part: str, ckpt: bool) -> dict:
    from trust_engine import bench
    from trust_engine.functional import SiteDeltas, checkpointed_copy
    from trust_engine.unet_view import find_sites

    torch.manual_seed(0)
    dev, dtype = torch.device("cpu"), torch.float32
    unet, vae, clip, size = bench._models(arch, dev, dtype)
    unet.requires_grad_(False)
    latent = bench.ARCHS[arch]["latent"]
    parts, aligner = bench._engine_parts(arch, unet, vae, clip, size, dev, dtype, latent)
    x = torch.randn(1, 4, latent, latent)
    if part == "unet":
        deltas = SiteDeltas(unet, find_sites(unet), checkpoint=ckpt)
        cond = parts.encode_text(["a cat"])
    elif part == "decode":
        decoder = checkpointed_copy(vae) if ckpt else vae
    image = torch.rand(1, 3, 8 * latent, 8 * latent)
    base = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    cpu = time.process_time()
    if part == "decode":
        z = x.requires_grad_(True)
        img = ((decoder.decode(z / 0.18215).sample + 1) / 2).clamp(0, 1)
        (g,) = torch.autograd.grad(aligner.score(img, ["a cat"]).sum(), z)
    elif part == "clip":
        img = image.requires_grad_(True)
        (g,) = torch.autograd.grad(aligner.score(img, ["a cat"]).sum(), img)
    else:
        t = torch.full((1,), 500)
        with deltas.probing() as probes:
            out = parts.denoise(deltas.call, x, t, cond)
            torch.autograd.backward(out, torch.randn_like(out), inputs=list(probes.values()))
    return {"arch": arch, "part": part, "checkpoint": ckpt, "rss_before": base, "peak": rss("VmHWM"),
            "above_bytes": rss("VmHWM") - base, "cpu_s": time.process_time() - cpu,
            "weights_bytes": sum(p.numel() * p.element_size() for m in (unet, vae, clip) for p in m.parameters())}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")))
