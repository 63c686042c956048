"""Quality report of the bundled testbed: sample a fixed, seeded prompt set with the stock pipeline (DDIM) and
let the judge say whether each image shows everything its prompt asked for.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import torch

from . import bundle, data, world
from .models import sample_scheduler

DEFAULT_STEPS = 25
DEFAULT_CFG = 3.0


@dataclasses.dataclass
class CheckConfig:
    steps: int = dataclasses.field(default=DEFAULT_STEPS, metadata={"help": "DDIM sampling steps"})
    cfg: float = dataclasses.field(default=DEFAULT_CFG, metadata={"help": "classifier-free guidance scale"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the prompt set and of the sampling noise"})
    per_combo: int = dataclasses.field(default=6, metadata={"help": "single-object prompts per shape x colour"})
    two_object: int = dataclasses.field(default=192, metadata={"help": "number of two-object prompts"})


def prompt_sets(seed: int = 0, per_combo: int = 6, two_object: int = 192) -> dict[str, list[str]]:
    """The fixed prompt sets of the report. Single/two-object use canonical words; "synonym" only synonyms."""
    rng = np.random.default_rng([seed, 12345])
    combos = [world.Scene((world.Obj(s, c),)) for s, c in itertools.product(world.SHAPE_NAMES, world.COLOUR_NAMES)]
    sets = {
        "single_object": [world.describe(sc, rng, "canonical") for sc in combos for _ in range(per_combo)],
        "synonym": [world.describe(sc, rng, "synonym") for sc in combos for _ in range(per_combo)],
        "two_object": [
            world.describe(world.random_scene(rng, ("on", "next to")[i % 2]), rng, "canonical") for i in range(two_object)
        ],
        "partial": [
            world.describe(world.Scene((obj,)), rng)
            for obj in [world.Obj(s, None) for s in world.SHAPE_NAMES] + [world.Obj(None, c) for c in world.COLOUR_NAMES]
            for _ in range(per_combo)
        ],
    }
    return sets


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG,
             batch: int = 64, progress=None) -> torch.Tensor:
    """Images Nx3xHxW in [0, 1]; prompt i always gets noise seed `seed + i`, whatever the batch size.
    Raises `world.UnknownWordError` before sampling if a prompt uses a word the testbed does not know."""
    for prompt in prompts:
        if prompt:
            world.check_words(prompt)
    pipe.scheduler = sample_scheduler()
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="pt").images
        out.append(images.float().cpu())
        if progress:
            progress(start + len(chunk), len(prompts))
    return torch.cat(out)


def accuracy(judge, images: torch.Tensor, prompts: list[str]) -> float:
    seen = judge.read(images)
    return float(np.mean([world.matches(world.parse(p), s) for p, s in zip(prompts, seen)]))


def judge_accuracy(judge, n: int = 2000, seed: int = 99, vae=None) -> dict[str, float]:
    """Judge accuracy per attribute on freshly rendered held-out scenes, augmented like generations.
    With `vae`, the renders go through encode/decode instead: the ceiling any latent generation can reach."""
    images, labels = data.render_set(n, seed=10_000 + seed, empty_share=0.04)
    x = data.to_tensor(images)
    with torch.no_grad():
        if vae is None:
            x = data.augment(x, torch.Generator().manual_seed(seed))
        else:
            chunks = [c.to(vae.device, vae.dtype) * 2 - 1 for c in x.split(250)]
            x = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample.float().cpu() for c in chunks])
            x = ((x + 1) / 2).clamp(0, 1)
        pred = torch.stack([t.argmax(1) for t in judge(x)], 1).numpy()
    names = ["layout", "shape0", "colour0", "shape1", "colour1"]
    present = labels >= 0
    return {n: float((pred[present[:, k], k] == labels[present[:, k], k]).mean()) for k, n in enumerate(names)}


def run(config: CheckConfig, pipe=None, judge=None, progress=None) -> tuple[dict, dict[str, tuple[list[str], torch.Tensor]]]:
    """The report (JSON-ready dict) and, per prompt set, the prompts and their images."""
    pipe = pipe or bundle.load_pipeline()
    judge = judge or bundle.load_judge()
    sets = prompt_sets(config.seed, config.per_combo, config.two_object)
    report: dict = {}
    samples = {}
    for name, prompts in sets.items():
        images = generate(pipe, prompts, config.seed, config.steps, config.cfg, progress=progress)
        report[f"{name}_accuracy"] = accuracy(judge, images, prompts)
        samples[name] = (prompts, images)
    per_attribute = judge_accuracy(judge)
    report["judge_accuracy"] = min(per_attribute.values())
    report["judge_accuracy_per_attribute"] = per_attribute
    report["vae_roundtrip_accuracy_per_attribute"] = judge_accuracy(judge, n=1000, vae=pipe.vae)
    report["sampler"] = {"scheduler": "DDIMScheduler", "steps": config.steps, "cfg": config.cfg, "seed": config.seed}
    report["prompts"] = {name: len(p) for name, p in sets.items()}
    return report, samples


def save_grid(path: str | Path, prompts: list[str], images: torch.Tensor, columns: int = 8, scale: int = 3) -> Path:
    """A captioned PNG grid of samples (the prompt under each image)."""
    from PIL import Image, ImageDraw

    cell_w, cell_h = images.shape[-1] * scale, images.shape[-2] * scale
    caption_h = 24
    rows = (len(prompts) + columns - 1) // columns
    width = max(cell_w, 150)
    sheet = Image.new("RGB", (columns * width, rows * (cell_h + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        r, c = divmod(i, columns)
        x, y = c * width, r * (cell_h + caption_h)
        pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        sheet.paste(Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST), (x + (width - cell_w) // 2, y))
        lines, k = ["", ""], 0
        for word in prompt.split():  # two short caption lines, words in order
            if k == 0 and len(lines[0]) + len(word) >= 24:
                k = 1
            lines[k] = (lines[k] + " " + word).strip()
        draw.text((x + 2, y + cell_h), "\n".join(lines), fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
