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

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

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
# TRuST with its differentiable decode + CLIP score under bfloat16 autocast on a float32 host (saliency
# decode_precision="bfloat16"); not in the default set
# trust_cip_setsaliency: the saliency gradient at a noised forget-set latent (SaliencyConfig.source="forget_set")
VARIANTS = ("trust_cip_bf16decode", "trust_csr_bf16decode", "trust_cip_setsaliency")


def _models(arch: str, device, dtype, aligner: bool = True):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    spec = ARCHS[arch]
    with torch.device(device):  # built where it runs: on "meta" nothing is allocated (FLOPs only)
        unet = UNet2DConditionModel(**spec["unet"]).to(dtype)
    if not aligner:  # full fine-tuning and ESD need no VAE or CLIP: they are not in those processes
        _BUILT[:] = [unet]
        return unet, None, None, 0
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
    vae, clip = vae.to(device, dtype).requires_grad_(False), clip.to(device, dtype).requires_grad_(False)
    _BUILT[:] = [unet, vae, clip]
    return unet, vae, clip, image_size


def _inputs(arch: str, unet, device, dtype, batch: int = 1, latent: int | None = None):
    spec = ARCHS[arch]
    g = torch.Generator().manual_seed(0)
    latent = latent or spec["latent"]
    latents = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    cond = torch.randn(batch, *spec["text"], generator=g).to(device, dtype)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280).to(device, dtype),
                                       "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch).to(device, dtype)}
    return latents, cond, kwargs


def _engine_parts(arch: str, unet, vae, clip, image_size: int, device, dtype, latent: int):
    """DiffusionParts and an Aligner around the random-init models, so the benchmark runs the engine's own step."""
    from .functional import checkpointed_copy
    from .parts import Aligner, DiffusionParts

    spec = ARCHS[arch]
    g = torch.Generator().manual_seed(1)
    table: dict[str, torch.Tensor] = {}

    def encode_text(prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if p not in table:
                table[p] = torch.randn(1, *spec["text"], generator=g).to(device, dtype)
        return torch.cat([table[p] for p in prompts])

    def denoise(unet_call, latents, t, cond):
        n = latents.shape[0]
        extra = {}
        if unet.config.addition_embed_type == "text_time":
            extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(n, 1280, device=device, dtype=dtype),
                                          "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * n,
                                                                   device=device, dtype=dtype)}
        return unet_call(latents, t, encoder_hidden_states=cond, return_dict=False, **extra)[0]

    decoder = checkpointed_copy(vae)  # as from_pipeline: the saliency's decode keeps one block's activations

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return ((decoder.decode(latents.to(dtype) / 0.18215).sample + 1) / 2).clamp(0, 1)

    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    parts = DiffusionParts(unet=unet, denoise=denoise, encode_text=encode_text, decode=decode,
                           scheduler_config=schedule, latent_shape=(4, latent, latent), device=device, dtype=dtype,
                           name=f"random-init {arch}")
    tokenizer = _tokenizer()
    aligner = Aligner(clip, tokenizer, [0.481, 0.458, 0.408], [0.269, 0.261, 0.276], image_size)
    _PARTS[:], _ALIGNERS[:] = [parts], [aligner]
    return parts, aligner


def _tokenizer():
    """The testbed aligner's tokenizer: token ids are all a random-init CLIP needs."""
    from transformers import CLIPTokenizer

    from .testbed import paths

    return CLIPTokenizer.from_pretrained(paths.ALIGNER)


def make_step(arch: str, method: str, device, dtype, saliency_steps: int = 10, esd_steps: int = 25, batch: int = 1,
              latent: int | None = None):
    """A closure running one training step of `method` at `batch` forget (+ `batch` retain) latents, and its
    trainable-parameter count. TRuST's step is the engine's own (`TrustRun.step`: saliency, loss, masked update)."""
    from . import concepts
    from .saliency import SaliencyConfig
    from .unlearn import TrustRun, config_for

    unet, vae, clip, image_size = _models(arch, device, dtype, aligner=method.startswith("trust"))
    unet.requires_grad_(False)
    latent = latent or ARCHS[arch]["latent"]
    x, cond, kw = _inputs(arch, unet, device, dtype, batch, latent)
    t = torch.full((batch,), 500, device=device)

    def call(fn, latents, c):
        n = latents.shape[0]
        extra = {k: {kk: vv[:1].expand(n, *vv.shape[1:]) for kk, vv in v.items()} for k, v in kw.items()}
        return fn(latents, t[:1].expand(n), encoder_hidden_states=c[:1].expand(n, -1, -1), return_dict=False,
                  **extra)[0]

    if method == "full_ft":  # SalUn-style without a mask: forget + retain batch, AdamW over every UNet weight
        params = [p for p in unet.parameters()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        retain_x = torch.randn_like(x)

        def step():
            loss = F.mse_loss(call(unet, x, cond).float(), torch.randn_like(x).float())
            loss = loss + 0.5 * F.mse_loss(call(unet, retain_x, cond).float(), torch.randn_like(x).float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, sum(p.numel() for p in params)

    if method == "esd":  # ESD-x: cross-attention trainable; x_t comes from sampling, as in the official code
        params = [p for n, p in unet.named_parameters() if "attn2" in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=1e-5)

        def step():
            latents = x
            with torch.no_grad():
                for _ in range(esd_steps):  # DDIM steps to a random t (mean of U{0..50}); CFG = 2 passes
                    both = call(unet, torch.cat([latents, latents]), torch.cat([cond, torch.zeros_like(cond)]))
                    latents = latents - 0.01 * both[:batch]
                e_u = call(unet, latents, torch.zeros_like(cond))
                e_c = call(unet, latents, cond)
                target = e_u - 1.0 * (e_c - e_u)
            loss = F.mse_loss(call(unet, latents, cond).float(), target.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, sum(p.numel() for p in params)

    parts, aligner = _engine_parts(arch, unet, vae, clip, image_size, device, dtype, latent)
    loss = "csr" if method.startswith("trust_csr") else "cip"
    precision = "bfloat16" if method.endswith("_bf16decode") else "host"
    config = config_for(loss, batch=batch, early_stop=None,
                        saliency=SaliencyConfig(steps=saliency_steps, decode_precision=precision,
                                                source="forget_set" if method.endswith("_setsaliency") else "generate"))
    merged = concepts.merge([concepts.expand("a cat", "individual", preserve=["a dog"])])
    run = TrustRun(parts, merged, config, aligner, cfg=7.5)
    g = torch.Generator().manual_seed(2)
    run.set_data(torch.randn(batch, 4, latent, latent, generator=g).to(device),
                 ["a cat"] * batch, torch.randn(batch, 4, latent, latent, generator=g).to(device),
                 ["a dog"] * batch)

    def step():
        run.step(1)  # step 1: the concept neurons are found again, as at every step by default

    return step, sum(d.numel() for d in run.deltas.delta.values())


def measure_one(arch: str, method: str, steps: int, device: str, dtype: torch.dtype, batch: int = 1,
                latent: int | None = None, what: str = "memory") -> dict:
    """One process's measurement of one step of `method` (then `steps` - 1 more, timed).

    what="memory": peak memory and time, with no FLOP counter or other dispatch mode active. On the CPU the peak is
    the kernel's own peak resident set during the step (VmHWM, reset just before the step), `rss_before` what the
    process holds before it (weights, inputs, runtime), `state_bytes` the difference (activations, gradients,
    optimizer state, allocator slack: what the training step costs above the frozen model), and `phases` the
    highest sampled RSS while each part of the step ran. On CUDA: max_memory_allocated and memory_allocated.
    what="flops": the FLOPs of one step (torch.utils.flop_counter), in a process of its own, so the counter's
    dispatch mode and module hooks cannot touch the memory figures."""
    dev = torch.device(device)
    step, trainable = make_step(arch, method, dev, dtype, batch=batch, latent=latent)
    weights = sum(t.numel() * t.element_size() for t in _weights_seen())
    row = {"arch": arch, "method": method, "batch": batch, "latent": latent or ARCHS[arch]["latent"],
           "trainable": trainable, "weights_bytes": weights, "device": device, "dtype": str(dtype), "what": what}
    if what == "flops" or device == "meta":  # on meta: shapes only, no time or memory
        with FlopCounterMode(display=False) as counter:
            step()
        return {**row, "flops": counter.get_total_flops()}
    watch = RssWatch() if dev.type == "cpu" else None
    if watch:
        _instrument(watch, method)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = watch.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    phases = {}
    try:
        for _ in range(max(steps, 1)):  # the first step also creates the optimizer state
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        if watch:
            peak, phases = watch.stop()
    timed = max(steps, 1)
    return {**row, "peak_bytes": peak, "rss_before": before, "state_bytes": peak - before, "phases": phases,
            "cpu_s": cpu / timed, "wall_s": wall / timed, "steps": timed}


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class RssWatch:
    """The process's resident set while a step runs (Linux): the exact peak is the kernel's VmHWM, reset at
    `start` through /proc/self/clear_refs; a thread samples VmRSS every `interval` seconds and keeps the highest value
    seen under each phase label (`with watch.phase("saliency")`, the innermost label counts), so the peak can be
    attributed to a part of the step. tracemalloc does not see torch's allocations; the RSS does."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval = interval
        self.stack = ["step"]
        self.peaks: dict[str, int] = {}
        self._wrapped: list[tuple[object, str, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> int:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            pass
        before = self.before = _proc_status("VmRSS")
        self._thread.start()
        return before

    def _sample(self) -> None:
        while not self._stop.is_set():
            label, rss = self.stack[-1], _proc_status("VmRSS")
            if rss > self.peaks.get(label, 0):
                self.peaks[label] = rss
            self._stop.wait(self.interval)

    def stop(self) -> tuple[int, dict[str, int]]:
        """The peak since `start` and the per-phase peaks; undoes `wrap`."""
        self._stop.set()
        self._thread.join()
        for owner, name, original in reversed(self._wrapped):
            if isinstance(owner, type) or not hasattr(type(owner), name):
                setattr(owner, name, original)
            else:  # an instance attribute over a method: drop it
                delattr(owner, name)
        self._wrapped.clear()
        # the kernel updates VmHWM lazily: RSS handed back by madvise (malloc_trim) can leave it below a level the
        # process held, so the peak is at least the highest sampled RSS and the RSS at the start
        return max(_proc_status("VmHWM"), self.before, *self.peaks.values()), dict(self.peaks)

    def phase(self, label: str):
        watch = self

        class _Phase:
            def __enter__(self):
                watch.stack.append(label)

            def __exit__(self, *exc):
                watch.stack.pop()

        return _Phase()

    def wrap(self, owner, name: str, label: str) -> None:
        """Replace owner.name (a function or method) by one that runs under the phase `label`."""
        fn = getattr(owner, name)
        self._wrapped.append((owner, name, owner.__dict__.get(name, fn) if isinstance(owner, type) else fn))

        def wrapped(*args, **kwargs):
            with self.phase(label):
                return fn(*args, **kwargs)

        setattr(owner, name, wrapped)


def _instrument(watch: RssWatch, method: str) -> None:
    """Phase labels on the engine's step, for the memory process only (it runs nothing else)."""
    if not method.startswith("trust"):
        return
    from . import saliency, unlearn

    watch.wrap(unlearn, "estimate", "saliency: sampling (no grad)")
    watch.wrap(saliency, "_backward_per_image", "saliency: UNet backward to the probes")
    for part in _PARTS:
        watch.wrap(part, "decode", "saliency: decode (x0 -> image)")
    for aligner in _ALIGNERS:
        watch.wrap(aligner, "score", "saliency: aligner score")
    watch.wrap(unlearn, "_loss_and_grads", "loss: forward + backward")
    watch.wrap(unlearn, "_csr_finite_difference", "loss: CSR finite-difference HVP")
    watch.wrap(unlearn.MaskedAdam, "step", "masked Adam update")


_PARTS: list = []
_ALIGNERS: list = []


_BUILT: list[torch.nn.Module] = []


def _weights_seen() -> list[torch.Tensor]:
    return [p for m in _BUILT for p in m.parameters()]


def run(archs: list[str], steps: int, device: str, dtype: str, progress=print, batches=(1,),
        latent: int | None = None, methods=METHODS, flops: bool = True) -> list[dict]:
    """Every (arch, batch, method) in its own process for memory and time, and (`flops`) in another for the FLOP
    count; returns the rows with ratios to full_ft at the same arch and batch, and per method the per-sample slope of
    peak memory between the smallest and largest batch."""
    rows = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for arch in archs:
        for batch in batches:
            base = None
            for method in methods:
                progress(f"bench-scale: {arch} batch {batch} {method}: memory and time ...")
                cmd = [sys.executable, "-m", "trust_engine.bench", arch, method, str(steps), device, dtype, str(batch),
                       str(latent or 0)]
                out = subprocess.run(cmd + ["memory"], capture_output=True, text=True, env=env)
                note = ""
                if out.returncode != 0 and _out_of_memory(out):
                    note = f"does not fit in this machine's memory on {device}"
                    progress(f"bench-scale: {arch} {method}: {note}")
                    row = {"arch": arch, "method": method, "batch": batch, "peak_bytes": float("nan"),
                           "state_bytes": float("nan"), "rss_before": float("nan"), "trainable": float("nan"),
                           "weights_bytes": float("nan"), "cpu_s": float("nan"), "wall_s": float("nan"),
                           "device": device}
                elif out.returncode != 0:
                    raise RuntimeError(f"bench-scale {arch} {method} failed:\n{out.stderr[-2000:]}")
                else:
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                row["note"], row["flops"] = note, float("nan")
                if flops:
                    progress(f"bench-scale: {arch} batch {batch} {method}: FLOPs ...")
                    counted = subprocess.run(cmd + ["flops"], capture_output=True, text=True, env=env)
                    if counted.returncode == 0:
                        row["flops"] = json.loads(counted.stdout.strip().splitlines()[-1])["flops"]
                        row["trainable"] = json.loads(counted.stdout.strip().splitlines()[-1])["trainable"]
                if row["peak_bytes"] == row["peak_bytes"]:
                    base = base or row
                rows.append(_ratios(row, base))
    for row in rows:
        same = [r for r in rows if r["arch"] == row["arch"] and r["method"] == row["method"]
                and r["peak_bytes"] == r["peak_bytes"]]
        if len({r["batch"] for r in same}) > 1:
            lo, hi = min(same, key=lambda r: r["batch"]), max(same, key=lambda r: r["batch"])
            row["peak_bytes_per_sample"] = (hi["peak_bytes"] - lo["peak_bytes"]) / (hi["batch"] - lo["batch"])
    return rows


def _ratios(row: dict, base: dict | None) -> dict:
    for key in ("flops", "peak_bytes", "state_bytes", "trainable", "cpu_s", "wall_s"):
        value, ref = row.get(key, float("nan")), (base or {}).get(key, float("nan"))
        row[f"{key}_vs_full_ft"] = value / ref if ref and ref == ref else float("nan")
    return row


def erasure_check(arch: str, device: str, dtype: torch.dtype, steps: int = 3, images: int = 4,
                  latent: int | None = None, progress=print, lr: float | None = None) -> dict:
    """An SD-shaped erasure end to end through the engine (`unlearn`: data generation, saliency, masked steps) on a
    random-init model; seconds per step and peak device memory. For the day a GPU is at hand (gpu-check)."""
    from . import concepts
    from .unlearn import config_for, unlearn

    dev = torch.device(device)
    if arch == "testbed":  # the bundled model's own trained weights, in its own vocabulary
        from .testbed import bundle

        pipe, parts, aligner = bundle.load_parts()
        unet, latent, concept = pipe.unet, parts.latent_shape[-1], concepts.expand("triangle", preserve=["a square"])
    else:
        torch.manual_seed(0)  # the same random-init model for every call
        unet, vae, clip, image_size = _models(arch, dev, dtype)
        latent = latent or ARCHS[arch]["latent"]
        parts, aligner = _engine_parts(arch, unet, vae, clip, image_size, dev, dtype, latent)
        concept = concepts.expand("a cat", "individual", preserve=["a dog"])
    config = config_for("cip", steps=steps, forget_images=images, preserve_images=images, gen_steps=10,
                        batch=min(images, 8), early_stop=None, lr=lr)
    times: list[float] = []

    def on_event(event):
        if event.stage == "unlearn":
            times.append(time.perf_counter())
            progress(f"erasure check: step {event.step}/{event.total}")

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = unlearn(parts, concept, config, aligner, on_event)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return {"arch": arch, "device": device, "dtype": str(dtype), "latent": latent, "steps": result.steps_run,
            "seconds_per_step": per_step, "seconds_total": time.perf_counter() - start, "peak_bytes": peak,
            "rows_changed": sum(d.rank for d in result.delta.sites.values()), "notes": result.notes,
            "row_change": [h["row_change"] for h in result.history if "row_change" in h],
            "weight_rms": _site_rms(unet)}


def _site_rms(unet) -> float:
    """RMS of the trainable (K/V) cross-attention weights: the scale a relative learning rate follows."""
    from .unet_view import find_sites, site_weights

    sites = [s for s in find_sites(unet) if s.kind in ("k", "v")]
    weights = site_weights(unet, sites)
    return float(torch.cat([w.float().reshape(-1) for w in weights.values()]).pow(2).mean().sqrt())


def _out_of_memory(out: subprocess.CompletedProcess) -> bool:
    """Killed by the kernel's OOM killer (SIGKILL) or an allocator error."""
    text = out.stderr.lower()
    return out.returncode in (-9, 137) or "out of memory" in text or "can't allocate memory" in text


if __name__ == "__main__":
    arch, method, steps, device, dtype, batch, latent = sys.argv[1:8]
    what = sys.argv[8] if len(sys.argv) > 8 else "memory"
    torch.manual_seed(0)
    print(json.dumps(measure_one(arch, method, int(steps), device, getattr(torch, dtype), int(batch),
                                 int(latent) or None, what)))
