"""Each method's delta file on a given UNet, from the UNet's shapes alone: what the README's "file on SD1.5" column
states. No method is run; the file's layout (which tensors, their shapes and dtypes) is written from the shapes:

- uce: a float16 `.diff` of every attn2 to_k and to_v weight (the closed form edits whole weights);
- esd: every attn2 to_q / to_k / to_v / to_out.0 site with all its rows (Adam moves every row), which the delta
  writes as a dense `.diff` in the training dtype (float32 here; full-rank LoRA factors would be larger);
- salun: a float16 `.diff` / `.diff_b` of every parameter inside the transformer slots: an upper bound, since a tensor
  the 50 % global saliency mask misses entirely is not written (4 of 182 tensors in a short testbed run);
- fia, conceptprune: a float16 `.diff` of every `locus` weight (ff.net.2 by default; the per-row top-k selects
  weights in every layer, and a pruned layer is written whole);
- trust: data-dependent (only the concept neurons' rows): the exact row-sparse LoRA with `row_share` of every Q/K/V
  site's rows, in float32 (the dtype it trains in on the CPU).

tests/test_method_sizes.py checks each layout against the file a real (short) run writes on the bundled testbed.
"""

from __future__ import annotations

import math

import torch
from safetensors.torch import save
from torch import nn

from ..delta import Delta, RowDelta
from ..unet_params import modules_named, parameter_map
from ..unet_view import find_sites

LAYOUT = {
    "trust": "row-sparse LoRA of the concept neurons' Q/K/V rows (float32); size at a given share of rows",
    "esd": "dense .diff of every attn2 to_q / to_k / to_v / to_out.0 weight (float32)",
    "uce": "dense .diff of every attn2 to_k / to_v weight (float16)",
    "salun": "dense .diff / .diff_b of every transformer-slot parameter the mask touches (float16; at most)",
    "fia": "dense .diff of every ff.net.2 weight (float16)",
    "conceptprune": "dense .diff of every ff.net.2 weight (float16)",
}


def layout(method: str, unet: nn.Module, row_share: float = 0.05, locus: str = "ff.net.2") -> Delta:
    """A delta with the tensors `method` writes for `unet` (zero differences; only the layout matters)."""
    shapes = {n: tuple(p.shape) for n, p in _ldm_parameters(unet).items()}
    if method == "uce":
        names = [f"{s.name}.weight" for s in find_sites(unet) if s.kind in ("k", "v")]
        return Delta({}, params={n: torch.zeros(shapes[n]) for n in names})
    if method == "esd":
        return Delta({s.name: _rows(s.out_features, s.in_features, s.out_features)
                      for s in find_sites(unet, include_out=True)})
    if method == "salun":
        return Delta({}, params={n: torch.zeros(shape) for n, shape in shapes.items()})
    if method in ("fia", "conceptprune"):
        return Delta({}, params={f"{n}.weight": torch.zeros(shapes[f"{n}.weight"])
                                 for n in modules_named(unet, locus)})
    if method == "trust":
        if not 0 < row_share <= 1:
            raise ValueError(f"row_share must lie in (0, 1], got {row_share}")
        return Delta({s.name: _rows(s.out_features, s.in_features, max(1, math.ceil(row_share * s.out_features)))
                      for s in find_sites(unet)})
    raise ValueError(f"unknown method {method!r}")


def file_bytes(delta: Delta) -> int:
    """The size of the safetensors file `delta.save` writes (serialised in memory by safetensors itself)."""
    return len(save(delta.to_lora(), metadata=delta.file_metadata()))


def sd15_unet() -> nn.Module:
    """An SD1.5-shaped diffusers UNet (the bench's config) on the meta device: only its shapes are read, so no
    weights are allocated."""
    from diffusers import UNet2DConditionModel

    from ..bench import ARCHS

    with torch.device("meta"):
        return UNet2DConditionModel(**ARCHS["sd15"]["unet"])


def table(unet: nn.Module, row_shares: tuple[float, ...] = (0.01, 0.05)) -> list[dict]:
    """One row per method (TRuST once per row share): method, layout, bytes."""
    rows = []
    for method in LAYOUT:
        for share in row_shares if method == "trust" else (None,):
            delta = layout(method, unet, **({"row_share": share} if share else {}))
            rows.append({"method": method, "row_share": share, "layout": LAYOUT[method],
                         "bytes": file_bytes(delta)})
    return rows


def _rows(out: int, inp: int, r: int) -> RowDelta:
    return RowDelta(torch.arange(r), torch.zeros(r, inp), out)


def _ldm_parameters(unet: nn.Module) -> dict[str, torch.Tensor]:
    live = dict(unet.named_parameters())
    return {ldm: live[real] for ldm, real in parameter_map(unet).items()}


if __name__ == "__main__":  # pragma: no cover - `python -m trust_engine.methods.sizes` prints the SD1.5 table
    for r in table(sd15_unet()):
        label = r["method"] + (f" ({100 * r['row_share']:g} % of rows)" if r["row_share"] else "")
        print(f"{label:<28}{r['bytes'] / 2**20:>9.1f} MiB  {r['layout']}")
