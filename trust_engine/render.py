"""Pictures a host shows next to a run: the saliency heatmap (transformer blocks x Q/K/V, with counts and z-scores)
and the training curves (loss, forget score). Plain PIL, so ComfyUI, AUTOMATIC1111 and the CLI draw the same thing.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .saliency import SaliencyResult

_FONT = ImageFont.load_default()
_BG, _INK, _GRID = (24, 24, 28), (230, 230, 230), (70, 70, 78)


def _short(block: str) -> str:
    """input_blocks.4.1.transformer_blocks.0 -> in4.0 (LDM) ; down_blocks.1.attentions.0.transformer_blocks.0 -> d1.0.0"""
    parts = block.replace("_blocks", "").replace("transformer.", "").split(".")
    abbrev = {"input": "in", "middle": "mid", "output": "out", "down": "d", "up": "u", "mid": "mid"}
    head = abbrev.get(parts[0], parts[0])
    nums = [p for p in parts[1:] if p.isdigit()]
    return head + ".".join(nums)


def _heat(value: float) -> tuple[int, int, int]:
    """0 -> dark blue, 1 -> yellow (a readable ramp on a dark background)."""
    v = min(max(value, 0.0), 1.0)
    return (int(40 + 215 * v), int(50 + 170 * v ** 0.7), int(120 * (1 - v) + 40))


def saliency_heatmap(result: SaliencyResult, title: str = "") -> np.ndarray:
    """An RGB uint8 image: one row per transformer block (forward order), one column per projection type; the
    cell colour is the share of the block's rows that are concept neurons, the text their count and max z."""
    table = result.table()
    kinds = [k for k in ("q", "k", "v", "out") if any(k in cells for _, cells in table)]
    rows_of = {name.rsplit(".attn2.", 1)[0] + "|" + kind: result.mask[name].numel() for name, kind in result.kinds.items()}
    cell_w, cell_h, label_w, top = 86, 18, 120, 44
    width = label_w + cell_w * len(kinds) + 10
    height = top + cell_h * max(1, len(table)) + 26
    image = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title or "concept neurons per block", fill=_INK, font=_FONT)
    draw.text((8, 20), result.summary()[:90], fill=(170, 170, 170), font=_FONT)
    for j, kind in enumerate(kinds):
        draw.text((label_w + j * cell_w + 30, top - 12), kind.upper(), fill=_INK, font=_FONT)
    for i, (block, cells) in enumerate(table):
        y = top + i * cell_h
        draw.text((8, y + 4), _short(block), fill=_INK, font=_FONT)
        for j, kind in enumerate(kinds):
            x = label_w + j * cell_w
            if kind not in cells:
                draw.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], outline=_GRID)
                continue
            count, zmax = cells[kind]
            share = count / max(1, rows_of.get(block + "|" + kind, 1))
            draw.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=_heat(math.sqrt(share * 4)))
            ink = (0, 0, 0) if share > 0.06 else _INK
            draw.text((x + 4, y + 4), f"{count}  z{zmax:.1f}", fill=ink, font=_FONT)
    draw.text((8, height - 18), "cell: neurons above xi, max z-score; colour: share of the block's rows",
              fill=(150, 150, 150), font=_FONT)
    return np.asarray(image)


def training_curves(history: list[dict], title: str = "") -> np.ndarray:
    """An RGB uint8 image of the loss per step (left axis) and the aligner's forget score where measured (dots)."""
    width, height, pad = 512, 256, 36
    image = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title or "TRUST Unlearn", fill=_INK, font=_FONT)
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history if math.isfinite(h.get("loss", math.nan))]
    if not steps or not losses:
        draw.text((pad, height // 2), "no steps were run", fill=_INK, font=_FONT)
        return np.asarray(image)
    x0, x1, y0, y1 = pad, width - pad, pad, height - pad
    draw.rectangle([x0, y0, x1, y1], outline=_GRID)
    last = max(steps[-1], 2)

    def x_of(step: float) -> float:
        return x0 + (x1 - x0) * (step - 1) / (last - 1)

    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    points = [(x_of(h["step"]), y1 - (y1 - y0) * (h["loss"] - lo) / span) for h in history
              if math.isfinite(h.get("loss", math.nan))]
    if len(points) > 1:
        draw.line(points, fill=(90, 170, 255), width=2)
    draw.text((x0, y1 + 6), f"step 1..{steps[-1]}", fill=_INK, font=_FONT)
    draw.text((x0 + 4, y0 + 4), f"loss {lo:.4f}..{hi:.4f}", fill=(90, 170, 255), font=_FONT)
    scores = [(h["step"], h["forget_score"]) for h in history if "forget_score" in h]
    if scores:
        values = [s for _, s in scores]
        s_lo, s_hi = min(values + [0.0]), max(values)
        s_span = (s_hi - s_lo) or 1.0
        for step, score in scores:
            cx, cy = x_of(step), y1 - (y1 - y0) * (score - s_lo) / s_span
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(255, 170, 60))
        draw.text((x1 - 150, y0 + 4), f"forget score {values[0]:.1f} -> {values[-1]:.1f}", fill=(255, 170, 60),
                  font=_FONT)
    return np.asarray(image)


def labelled_grid(rows: list[tuple[str, np.ndarray]], cell: int = 128) -> np.ndarray:
    """Rows of images (N x H x W x 3, floats in [0, 1] or uint8) side by side under a label each: a before/after sheet."""
    if not rows:
        raise ValueError("nothing to show: no image rows")
    label_w = 110
    columns = max(r.shape[0] for _, r in rows)
    sheet = Image.new("RGB", (label_w + columns * (cell + 4), len(rows) * (cell + 4)), _BG)
    draw = ImageDraw.Draw(sheet)
    for i, (label, images) in enumerate(rows):
        y = i * (cell + 4)
        draw.text((6, y + cell // 2 - 6), label[:18], fill=_INK, font=_FONT)
        for j, img in enumerate(images):
            arr = img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST if arr.shape[0] < cell else Image.BILINEAR)
            sheet.paste(tile, (label_w + j * (cell + 4), y))
    return np.asarray(sheet)
