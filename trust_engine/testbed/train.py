"""Seeded training of every testbed weight: data -> judge, aligner, VAE -> text-to-image UNet -> bundled folder.
Each stage checkpoints to --work (safetensors) and resumes where it stopped; `--stage` runs one stage alone.

    python -m trust_engine.testbed.train                 # all stages, resumable, ~1.5 h on 2 CPU cores
    python -m trust_engine.testbed.train --stage unet    # one stage (its inputs must exist)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import data, models, paths, tokenizer

STAGES = ("data", "judge", "aligner", "vae", "unet", "export")


def log(stage: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {message}", flush=True)


# ---------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """Model(s) and AdamW state in one safetensors file (no pickles), written atomically."""
    tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"step": str(step)})
    tmp.replace(path)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
    if not path.exists():
        return 0
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        step = int(f.metadata()["step"])
    tensors = load_file(path)
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    state = optimizer.state_dict()
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, field = key.split(".", 2)
            restored.setdefault(int(index), {})[field] = value
    state["state"] = restored
    optimizer.load_state_dict(state)
    return step


def cosine_lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_loop(stage: str, work: Path, total: int, modules: dict[str, torch.nn.Module], lr: float,
               loss_fn, every: int = 250, ema: torch.nn.Module | None = None) -> None:
    """The one plain loop every stage uses: AdamW, warm-up + cosine, optional EMA, checkpoints, resume."""
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    tracked = dict(modules, **({"ema": ema} if ema is not None else {}))
    ckpt = work / f"{stage}.ckpt.safetensors"
    step = load_checkpoint(ckpt, tracked, optimizer)
    if step:
        log(stage, f"resumed at step {step}/{total}")
    start, running = time.time(), None
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total, lr)
        loss, extra = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), modules["model"].parameters()):
                    e.lerp_(p, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == total:
            log(stage, f"step {step}/{total} loss {running:.4f} {extra} ({time.time() - start:.0f}s)")
        if step % every == 0 or step == total:
            save_checkpoint(ckpt, step, tracked, optimizer)


def batches(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Indices of batch `step`: a fresh seeded draw, so resuming needs no saved RNG state."""
    return np.random.default_rng([seed, step]).integers(0, n, batch)


# ---------------------------------------------------------------------------------------------- stages

def stage_data(work: Path, args) -> None:
    for name, n, seed, empty in (("train", args.train_images, args.seed, 0.0), ("judge", args.judge_images, args.seed + 1, 0.04)):
        out = work / f"data_{name}.npz"
        if out.exists():
            continue
        log("data", f"rendering {n} {name} images")
        images, labels = data.render_set(n, seed, empty)
        np.savez(out, images=images, labels=labels)
    tokenizer.save(work / "tokenizer")


def load_set(work: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(work / f"data_{name}.npz")
    return d["images"], d["labels"]


def stage_judge(work: Path, args) -> None:
    images, labels = load_set(work, "judge")
    judge = models.Judge()
    gen = torch.Generator()

    def loss_fn(step: int):
        idx = batches(len(images), 128, step, args.seed + 10)
        gen.manual_seed(args.seed * 1_000_003 + step)
        x = data.augment(data.to_tensor(images[idx]), gen)
        y = torch.from_numpy(labels[idx])
        logits = judge(x)
        loss = F.cross_entropy(logits[0], y[:, 0])
        for k in range(1, 5):  # object attributes count only where the object exists
            loss = loss + F.cross_entropy(logits[k], y[:, k].clamp(min=0), reduction="none").mul(y[:, k] >= 0).mean()
        return loss, ""

    judge.train()
    train_loop("judge", work, args.judge_steps, {"model": judge}, 2e-3, loss_fn)
    judge.eval()
    save_file(judge.state_dict(), work / "judge.safetensors")
    from .check import judge_accuracy

    log("judge", f"held-out accuracy per attribute {json.dumps(judge_accuracy(judge))}")


def stage_aligner(work: Path, args) -> None:
    images, labels = load_set(work, "train")
    tok = tokenizer.CLIPTokenizer.from_pretrained(work / "tokenizer")
    clip = models.aligner(len(tok))
    proc = models.image_processor()
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    gen = torch.Generator()

    def loss_fn(step: int):
        idx = batches(len(images), 256, step, args.seed + 20)
        rng = np.random.default_rng([args.seed + 21, step])
        prompts, asked = data.random_prompts(labels[idx], rng)
        gen.manual_seed(args.seed * 1_000_033 + step)
        x = (data.augment(data.to_tensor(images[idx]), gen) - mean) / std
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = clip(input_ids=ids, pixel_values=x)
        # Several prompts in a batch can describe the same image ("a circle"): soft targets over all matches.
        target = torch.from_numpy(data.match_matrix(asked, labels[idx])).float()
        li = -(F.log_softmax(out.logits_per_image, 1) * target / target.sum(1, keepdim=True)).sum(1).mean()
        tt = target.T
        lt = -(F.log_softmax(out.logits_per_text, 1) * tt / tt.sum(1, keepdim=True)).sum(1).mean()
        top1 = target[torch.arange(len(idx)), out.logits_per_text.argmax(1)].mean().item()
        return (li + lt) / 2, f"text->image top1 {top1:.3f}"

    clip.train()
    train_loop("aligner", work, args.aligner_steps, {"model": clip}, 1e-3, loss_fn)
    clip.eval()
    clip.save_pretrained(work / "aligner")
    proc.save_pretrained(work / "aligner")
    tok.save_pretrained(work / "aligner")


def stage_vae(work: Path, args) -> None:
    images, _ = load_set(work, "train")
    vae = models.vae()
    gen = torch.Generator()

    def loss_fn(step: int):
        idx = batches(len(images), 64, step, args.seed + 30)
        x = data.to_tensor(images[idx]) * 2 - 1
        gen.manual_seed(args.seed * 1_000_037 + step)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        return mse + 1e-4 * kl, f"mse {mse.item():.5f}"

    vae.train()
    train_loop("vae", work, args.vae_steps, {"model": vae}, 1e-3, loss_fn)
    vae.eval()
    with torch.no_grad():  # SD convention: scale latents to unit variance
        x = data.to_tensor(images[:2000]) * 2 - 1
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(work / "vae")
    log("vae", f"scaling_factor {1.0 / std:.4f}")


def stage_unet(work: Path, args) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    images, labels = load_set(work, "train")
    tok = tokenizer.CLIPTokenizer.from_pretrained(work / "aligner")
    text_encoder = CLIPModel.from_pretrained(work / "aligner").text_model.eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)
    latents_file = work / "latents_train.safetensors"
    if not latents_file.exists():
        log("unet", "encoding the training images with the VAE")
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(images), 1000):
                dist = vae.encode(data.to_tensor(images[i:i + 1000]) * 2 - 1).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}, latents_file)
    lat = load_file(latents_file)
    scale = vae.config.scaling_factor
    unet = models.unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = models.train_scheduler()
    gen = torch.Generator()

    def loss_fn(step: int):
        idx = batches(len(images), args.unet_batch, step, args.seed + 40)
        rng = np.random.default_rng([args.seed + 41, step])
        prompts, _ = data.random_prompts(labels[idx], rng)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]  # classifier-free guidance dropout
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            cond = text_encoder(ids).last_hidden_state
        gen.manual_seed(args.seed * 1_000_039 + step)
        t_idx = torch.from_numpy(idx)
        z0 = (lat["mean"][t_idx] + lat["std"][t_idx] * torch.randn(len(idx), 4, 8, 8, generator=gen)) * scale
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(sched.add_noise(z0, noise, t), t, cond).sample
        return F.mse_loss(pred, noise), ""

    unet.train()
    train_loop("unet", work, args.unet_steps, {"model": unet}, args.unet_lr, loss_fn, ema=ema)
    ema.save_pretrained(work / "unet")


def stage_export(work: Path, args) -> None:
    """Assemble the diffusers pipeline folder and the aligner/judge, ready to commit as the bundled weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel

    out = Path(args.out)
    clip = CLIPModel.from_pretrained(work / "aligner")
    tok = tokenizer.CLIPTokenizer.from_pretrained(work / "aligner")
    text_encoder = _text_encoder_of(clip)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"),
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=models.sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    clip.save_pretrained(out / "aligner")
    models.image_processor().save_pretrained(out / "aligner")
    tok.save_pretrained(out / "aligner")
    for folder in (out / "pipeline" / "tokenizer", out / "aligner"):  # the files the aligner was trained with
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(work / "tokenizer" / name, folder / name)
    (out / "judge").mkdir(parents=True, exist_ok=True)
    save_file(load_file(work / "judge.safetensors"), out / "judge" / "model.safetensors")
    (out / "testbed.json").write_text(json.dumps({"seed": args.seed, "args": vars(args)}, indent=2, default=str))
    log("export", f"wrote {out}")


def _text_encoder_of(clip):
    """The aligner's text tower as a standalone CLIPTextModel (the same weights, SD's text-encoder class)."""
    from transformers import CLIPTextModel

    text = CLIPTextModel(clip.config.text_config)
    getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict())  # nested before transformers 5
    return text.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trust_engine.testbed.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, help="run one stage only (default: all, in order)")
    parser.add_argument("--work", default="runs/testbed", help="checkpoints and intermediate files")
    parser.add_argument("--out", default=str(paths.WEIGHTS), help="where the finished weights go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--train-images", type=int, default=60_000)
    parser.add_argument("--judge-images", type=int, default=30_000)
    parser.add_argument("--judge-steps", type=int, default=1500)
    parser.add_argument("--aligner-steps", type=int, default=1500)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--unet-batch", type=int, default=128)
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage:
        log(args.stage, "start")
        globals()[f"stage_{args.stage}"](work, args)
    else:
        run_all(work, args, list(argv if argv is not None else sys.argv[1:]))
    log("train", "done")


def run_all(work: Path, args, argv: list[str]) -> None:
    """All stages on 2 cores: the aligner on one core while the VAE and then the judge use the other (small
    models use a core better one each than two together), then the UNet on both, then the export."""
    import os
    import subprocess

    start = time.time()
    stage_data(work, args)

    def launch(*stages: str) -> subprocess.Popen:
        chain = " && ".join(
            shlex.join([sys.executable, "-m", "trust_engine.testbed.train", *argv, "--stage", s, "--threads", "1"])
            for s in stages
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
        return subprocess.Popen(chain, shell=True, env=env)

    jobs = [launch("aligner"), launch("vae", "judge")]
    if any(job.wait() != 0 for job in jobs):
        raise SystemExit("a training stage failed; see its output above, then run the same command again to resume")
    for stage in ("unet", "export"):
        log(stage, "start")
        globals()[f"stage_{stage}"](work, args)
    log("train", f"all stages in {(time.time() - start) / 60:.0f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
