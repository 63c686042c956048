"""Edits as deltas: float32 row deltas for the sites, added to each site's output (y = W x + D x) in a private copy of
the UNet's module tree that shares the host's tensors read-only. Host modules and parameters are never written.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .delta import Delta
from .unet_view import Site, weight_path


def private_tree(module: nn.Module) -> nn.Module:
    """A copy of `module`'s tree of Python module objects whose parameters and buffers are the host's own tensors,
    detached and frozen: no weight is copied, autograd never reaches the host's tensors, and whatever is changed on
    the copy (wrapped layers, checkpointing flags) is invisible to the host and to other users of the module."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b
    return copy.deepcopy(module, memo)


_LIBC: list = []


def release_free_memory() -> bool:
    """On Linux with glibc: hand the C allocator's free heap pages back to the OS (malloc_trim). Tensors under
    32 MiB live on the heap, and after a pass the freed ones stay resident (0.2-0.3 GiB after an SD1.5 UNet forward
    at 64x64, batch 4); the saliency's decode then allocates its large tensors elsewhere (mmap), on top of that. A few
    milliseconds; changes no value. Returns whether it ran."""
    if not _LIBC:
        import ctypes
        import sys

        try:
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else None)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is None:
        return False
    _LIBC[0](0)
    return True


class _Checkpointed(nn.Module):
    """Runs its module under activation checkpointing while gradients are being recorded: its activations are
    recomputed in the backward pass instead of being kept."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.module, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(module: nn.Module, is_block) -> int:
    """Wrap every submodule for which `is_block(submodule)` holds (outermost first) in activation checkpointing,
    in place; use it on a private copy. Returns how many were wrapped."""
    count = 0
    for name, child in list(module.named_children()):
        if is_block(child):
            setattr(module, name, _Checkpointed(child))
            count += 1
        else:
            count += checkpoint_blocks(child, is_block)
    return count


# Blocks whose activations are recomputed in the backward pass instead of kept. VAE decoder: diffusers'
# ResnetBlock2D / Attention / Upsample2D and ComfyUI's (ldm) ResnetBlock / AttnBlock. UNet: the transformer blocks (both
# hosts name them BasicTransformerBlock; they are called directly, never type-checked by their parents) and diffusers'
# ResnetBlock2D (ComfyUI's ResBlock is not wrapped: its parent dispatches on isinstance).
DECODER_BLOCKS = frozenset({"ResnetBlock2D", "Attention", "Upsample2D", "ResnetBlock", "AttnBlock"})
DECODER_STAGES = frozenset({"UpDecoderBlock2D", "UNetMidBlock2D"})  # diffusers' decoder stages, around those blocks
UNET_BLOCKS = frozenset({"BasicTransformerBlock", "ResnetBlock2D"})


def fuse_norm_act(module: nn.Module) -> int:
    """Inside every diffusers ResnetBlock2D of `module` (a private copy) that has no time embedding (the VAE's), run
    each GroupNorm together with the SiLU that follows it under one checkpoint: the norm's output is then not kept
    for the backward pass, only recomputed (a GroupNorm and a SiLU, cheap next to the convolutions). At 512x512 that
    is one 128-256 MiB tensor per norm while a block's backward runs. Same outputs and gradients. Returns how many
    blocks were changed."""
    count = 0
    for block in module.modules():
        if (type(block).__name__ == "ResnetBlock2D" and getattr(block, "time_emb_proj", 1) is None
                and getattr(block, "time_embedding_norm", "") in ("default", "group") and getattr(block, "upsample", 1) is None
                and getattr(block, "downsample", 1) is None and isinstance(getattr(block, "nonlinearity", None), nn.Module)
                and isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm)):
            act = block.nonlinearity
            block.norm1 = _Checkpointed(nn.Sequential(block.norm1, act))
            block.norm2 = _Checkpointed(nn.Sequential(block.norm2, act))
            block.nonlinearity = nn.Identity()  # applied inside the fused norms (the block has no time embedding)
            count += 1
    return count


def checkpointed_copy(module: nn.Module, blocks=DECODER_BLOCKS, outer=DECODER_STAGES, fuse: bool = True) -> nn.Module:
    """A private copy of `module` (`private_tree`: the host's tensors, frozen, no weight copied) whose blocks of the
    given class names run under activation checkpointing while gradients are recorded, and (`fuse`) whose VAE resnet
    blocks keep no GroupNorm output (`fuse_norm_act`). The same outputs and gradients as `module`; the caller's
    module is not changed. Raises if no block was found (nothing would be saved)."""
    copy_ = private_tree(module)
    if fuse:  # before the blocks are wrapped: their own modules are changed, on the copy only
        fuse_norm_act(copy_)
    if not checkpoint_blocks(copy_, lambda m: type(m).__name__ in blocks):
        raise ValueError(f"no block of {sorted(blocks)} in {type(module).__name__} to checkpoint")
    if outer:  # nested: only each stage's input is kept; its blocks' inputs while that stage is recomputed
        checkpoint_blocks(copy_, lambda m: type(m).__name__ in outer)
    return copy_


class _SiteLayer(nn.Module):
    """A site's layer in the private tree: the host layer's output plus, in float32, the site's delta (while
    `owner.apply_delta`) and the saliency probe (while probing), cast once to the layer's output dtype. Adding D x to
    the output instead of D to the weight keeps a small delta from being rounded away in float16/bfloat16."""

    def __init__(self, layer: nn.Module, owner: SiteDeltas, name: str) -> None:
        super().__init__()
        self.layer = layer
        self.name = name
        self._owner = [owner]  # a list, so the owner is not registered as a submodule

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.layer(x, *args, **kwargs)
        owner = self._owner[0]
        extra = None
        delta = owner.delta.get(self.name) if owner.apply_delta else None
        if delta is not None and self.name in owner.offset:
            delta = delta + owner.offset[self.name]
        for w in (delta, owner.probes.get(self.name)):
            if w is not None:
                e = F.linear(x.to(w.dtype), w)
                extra = e if extra is None else extra + e
        return y if extra is None else y + extra.to(y.dtype)


class SiteDeltas:
    """One float32 delta (out x in, zero at start) per site whose projection may change; `call` runs the UNet with
    base + delta, `base_call` the untouched base. Sites of other projection types carry no delta and no optimizer
    state, but are still scored by saliency (through zero probes that exist only during an estimate)."""

    def __init__(self, unet: nn.Module, sites: list[Site], trainable: str = "qkvo", checkpoint: bool = False) -> None:
        self.unet = unet
        self.sites = sites
        self.model = private_tree(unet)
        self.param_name = {s.name: weight_path(unet, s) + ".weight" for s in sites}
        host = dict(unet.named_parameters())
        self.base = {s.name: host[self.param_name[s.name]].detach() for s in sites}
        letter = {"q": "q", "k": "k", "v": "v", "out": "o"}
        self.delta = {
            s.name: torch.zeros(self.base[s.name].shape, device=self.base[s.name].device, dtype=torch.float32,
                                requires_grad=True)
            for s in sites if letter.get(s.kind, s.kind) in trainable
        }
        self.probes: dict[str, torch.Tensor] = {}
        self.offset: dict[str, torch.Tensor] = {}  # a constant added to the deltas (finite differences)
        self.apply_delta = True
        for s in sites:
            path = weight_path(unet, s)
            owner_path, _, leaf = path.rpartition(".")
            parent = self.model.get_submodule(owner_path)
            setattr(parent, leaf, _SiteLayer(getattr(parent, leaf), self, s.name))
        # after the site layers (their paths are the host's): the private tree's transformer and resnet blocks
        # recompute their activations in the backward pass; the same gradients, one block's activations held
        self.checkpointed = checkpoint_blocks(self.model, lambda m: type(m).__name__ in UNET_BLOCKS) if checkpoint else 0

    def parameters(self) -> list[torch.Tensor]:
        return list(self.delta.values())

    def call(self, *args, **kwargs):
        """The UNet forward with base + delta at the sites (differentiable in the deltas)."""
        self.apply_delta = True
        return self.model(*args, **kwargs)

    def base_call(self, *args, **kwargs):
        """The untouched base model's forward (no graph to the deltas)."""
        self.apply_delta = False
        try:
            return self.model(*args, **kwargs)
        finally:
            self.apply_delta = True

    @contextmanager
    def probing(self) -> Iterator[dict[str, torch.Tensor]]:
        """Zero float32 probes on every site for the duration: their gradient is the gradient of an objective with
        respect to the site's weight at base + delta (the saliency). They change no output."""
        self.probes = {s.name: torch.zeros(self.base[s.name].shape, device=self.base[s.name].device,
                                           dtype=torch.float32, requires_grad=True) for s in self.sites}
        try:
            yield self.probes
        finally:
            self.probes = {}

    def to_delta(self, metadata: dict[str, str] | None = None, base_fingerprint: str = "") -> Delta:
        """The row-sparse Delta of what changed (rows whose difference is not all zero)."""
        return Delta.from_dense({n: d.detach() for n, d in self.delta.items()}, metadata, base_fingerprint)

    def changed_rows(self) -> dict[str, torch.Tensor]:
        return {n: (d.detach() != 0).any(dim=1) for n, d in self.delta.items()}
