"""Seeded training and evaluation data of the concept world: rendered images with their labels, label arrays
that let a whole batch of prompts be matched against a whole batch of images at once, and the augmentations
that make clean renders look like generations.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import world

ANY = -1


def encode_scene(scene: world.Scene) -> np.ndarray:
    """[layout, shape0, colour0, shape1, colour1] as indices; ANY for absent or unspecified attributes."""
    row = [world.LAYOUTS.index(scene.layout), ANY, ANY, ANY, ANY]
    for k, obj in enumerate(scene.objects):
        row[1 + 2 * k] = world.SHAPE_NAMES.index(obj.shape) if obj.shape else ANY
        row[2 + 2 * k] = world.COLOUR_NAMES.index(obj.colour) if obj.colour else ANY
    return np.array(row, np.int64)


def decode_scene(row: np.ndarray) -> world.Scene:
    layout = world.LAYOUTS[int(row[0])]
    count = {"empty": 0, "single": 1}.get(layout, 2)
    objects = tuple(
        world.Obj(world.SHAPE_NAMES[int(row[1 + 2 * k])], world.COLOUR_NAMES[int(row[2 + 2 * k])]) for k in range(count)
    )
    return world.Scene(objects, layout if count == 2 else None)


def match_matrix(asked: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """M[i, j] = image i (concrete labels) shows everything prompt j asks for; vectorised `world.matches`."""
    s, a = seen[:, None, :], asked[None, :, :]

    def ok(cols_a: list[int], cols_s: list[int]) -> np.ndarray:
        return np.all((a[..., cols_a] == ANY) | (a[..., cols_a] == s[..., cols_s]), axis=-1)

    same_layout = a[..., 0] == s[..., 0]
    straight = ok([1, 2, 3, 4], [1, 2, 3, 4])
    swapped = ok([1, 2, 3, 4], [3, 4, 1, 2]) & (a[..., 0] == world.LAYOUTS.index("next to"))
    return same_layout & (straight | swapped)


def render_set(n: int, seed: int, empty_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8 NxHxWx3) and their labels (Nx5, the judge's reading order), reproducible from seed."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((n, 5), np.int64)
    for i in range(n):
        layout = "empty" if rng.random() < empty_share else None
        image, seen = world.render(world.random_scene(rng, layout), rng)
        images[i] = np.round(image * 255)
        labels[i] = encode_scene(seen)
    return images, labels


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NxHxWx3 -> float Nx3xHxW in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Make renders look like generations: blur, gain/offset jitter per channel, noise. x in [0, 1]."""
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    sigma = u(0.05, 1.1, 1, 1, 1)
    k = torch.arange(-2, 3, dtype=x.dtype).view(1, 5)
    kernel = torch.exp(-(k**2) / (2 * sigma.view(b, 1, 1) ** 2))
    kernel = kernel / kernel.sum(-1, keepdim=True)  # b x 1 x 5
    blurred = _separable_blur(x, kernel)
    x = torch.where(torch.rand(b, 1, 1, 1, generator=generator) < 0.7, blurred, x)
    x = x * u(0.92, 1.08, 3, 1, 1) + u(-0.04, 0.04, 3, 1, 1)
    x = x + u(0.0, 0.07, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def _separable_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    weight = kernel.repeat_interleave(c, 0)  # (b*c) x 1 x 5
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), weight.view(b * c, 1, 1, 5), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), weight.view(b * c, 1, 5, 1), groups=b * c)
    return y.view(b, c, h, w)


def random_prompts(labels: np.ndarray, rng: np.random.Generator, p_keep_both: float = 0.7) -> tuple[list[str], np.ndarray]:
    """One prompt per image (synonyms, frames, left-out attributes) and what each prompt asks for (Nx5)."""
    prompts, asked = [], np.empty_like(labels)
    for i, row in enumerate(labels):
        scene = world.drop_attributes(decode_scene(row), rng, p_keep_both)
        if not scene.objects:
            prompts.append("")
            asked[i] = row
            continue
        if scene.relation == "next to" and rng.random() < 0.5:
            scene = world.Scene(scene.objects[::-1], scene.relation)
        prompts.append(world.describe(scene, rng))
        asked[i] = encode_scene(scene)
    return prompts, asked
