"""Edits as deltas: trainable difference tensors for the sites, applied in a functional forward
(`torch.func.functional_call`) as base + delta. The host's parameters are read, never made trainable or written.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .delta import Delta
from .unet_view import Site, weight_path


class SiteDeltas:
    """One float32 delta tensor per site (out x in), zero at start; `call` runs the UNet with base + delta."""

    def __init__(self, unet: nn.Module, sites: list[Site]) -> None:
        self.unet = unet
        self.sites = sites
        # Detached views of every host parameter: the forward sees the same values but autograd never reaches
        # (or writes .grad on) the host's tensors, whatever their requires_grad says.
        self.frozen = {name: p.detach() for name, p in unet.named_parameters()}
        self.param_name = {s.name: weight_path(unet, s) + ".weight" for s in sites}
        self.base = {s.name: self.frozen[self.param_name[s.name]] for s in sites}
        self.delta = {
            s.name: torch.zeros(w.shape, device=w.device, dtype=torch.float32, requires_grad=True)
            for s, w in zip(sites, self.base.values())
        }

    def parameters(self) -> list[torch.Tensor]:
        return list(self.delta.values())

    def weights(self, with_delta: bool = True) -> dict[str, torch.Tensor]:
        params = dict(self.frozen)
        if with_delta:
            for name, d in self.delta.items():
                base = self.base[name]
                params[self.param_name[name]] = base + d.to(base.dtype)
        return params

    def call(self, *args, **kwargs):
        """The UNet forward with base + delta at the sites (differentiable in the deltas)."""
        return functional_call(self.unet, self.weights(True), args, kwargs, strict=False)

    def base_call(self, *args, **kwargs):
        """The untouched base model's forward (no graph to the deltas)."""
        return functional_call(self.unet, self.frozen, args, kwargs, strict=False)

    def to_delta(self, metadata: dict[str, str] | None = None, base_fingerprint: str = "") -> Delta:
        """The row-sparse Delta of what changed (rows whose difference is not all zero)."""
        return Delta.from_dense({n: d.detach() for n, d in self.delta.items()}, metadata, base_fingerprint)

    def changed_rows(self) -> dict[str, torch.Tensor]:
        return {n: (d.detach() != 0).any(dim=1) for n, d in self.delta.items()}
