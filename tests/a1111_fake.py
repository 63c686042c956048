"""A small fake of the AUTOMATIC1111 modules the extension uses (same names and signatures as v1.8.0), around the
bundled testbed, for tier-1 tests; tier 2 (tests/a1111/) runs the real web UI.

What it imitates: `shared.sd_model` as an ldm LatentDiffusion (model.diffusion_model called as (x, timesteps,
context, y), get_learned_conditioning(SdConditioning), first_stage_model.decode, scale_factor, alphas_cumprod[_original],
parameterization, is_sd1/is_sd2/is_sdxl), `shared.state` / `opts` / `cmd_opts`, `devices.autocast`,
`sd_hijack.undo_optimizations/apply_optimizations` (recorded, to check they come in pairs), `sd_unet.current_unet`,
`sd_models` (checkpoint folder, read_state_dict, list_models) with the model's checkpoint file in LDM layout, the live
preview (`state.assign_current_image`), and the built-in Lora extension's in-place patching with its per-layer
backups (`networks`). The fake's diffusion_model
keeps diffusers module names (the real one has LDM names); the engine maps both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

import torch
from diffusers import UNet2DConditionModel


class A1111StyleUNet(UNet2DConditionModel):
    """The testbed UNet behind ldm's UNetModel call signature."""

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        return super().forward(x, timesteps, encoder_hidden_states=context, return_dict=False)[0]


def disabled_train(self, mode=True):
    """ldm.models.diffusion.ddpm.disabled_train (set as an instance attribute, so `self` is the mode)."""
    return self


class FirstStage(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def decode(self, z):
        return self.vae.decode(z).sample


class TextEncoder(torch.nn.Module):
    def __init__(self, pipe):
        super().__init__()
        self.tokenizer, self.transformer = pipe.tokenizer, pipe.text_encoder

    def forward(self, prompts):
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.transformer(ids)[0]


class DiffusionWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(torch.nn.Module):
    """What shared.sd_model is for an SD1.x checkpoint (the parts the extension reads)."""

    def __init__(self, pipe, unet):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.cond_stage_model = TextEncoder(pipe)
        self.first_stage_model = FirstStage(pipe.vae)
        # as ldm's LatentDiffusion.instantiate_first_stage does: a plain function as the instance's train, so
        # .train(mode) / .eval() on the first stage return `mode` (False for eval), not the module
        self.first_stage_model.train = disabled_train
        self.scale_factor = float(pipe.vae.config.scaling_factor)
        alphas = pipe.scheduler.alphas_cumprod.clone().float()
        self.alphas_cumprod = alphas.half()  # the web UI may downcast the sampling copy; training uses the original
        self.alphas_cumprod_original = alphas
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl = True, False, False
        self.lowvram = False
        self.calls: list[SdConditioning] = []

    def get_learned_conditioning(self, batch):
        self.calls.append(batch)
        return self.cond_stage_model(batch)


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


class State:
    def __init__(self):
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = self.job_count = self.sampling_step = self.sampling_steps = 0
        self.textinfo = None
        self.interrupt_after: int | None = None  # interrupt when sampling_step reaches this (set by tests)
        self.seen: list[tuple[int, int, str]] = []
        self.current_image = None
        self.images: list = []

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "sampling_step" and hasattr(self, "seen"):
            self.seen.append((value, self.sampling_steps, self.textinfo or ""))
            if self.interrupt_after is not None and value >= self.interrupt_after:
                super().__setattr__("interrupted", True)

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        """The live preview (/internal/progress, /sdapi/v1/progress current_image); recorded for tests."""
        self.current_image = image
        self.images.append(image)


class SdHijack:
    def __init__(self):
        self.calls: list[str] = []

    def undo_optimizations(self):
        self.calls.append("undo")

    def apply_optimizations(self, option=None):
        self.calls.append("apply")


class Networks:
    """The built-in Lora extension's in-place patching, reduced to what it leaves on a layer."""

    def __init__(self):
        self.listed = 0

    @staticmethod
    def network_restore_weights_from_backup(self_module):
        with torch.no_grad():
            if getattr(self_module, "network_weights_backup", None) is not None:
                self_module.weight.copy_(self_module.network_weights_backup)
            if getattr(self_module, "network_bias_backup", None) is not None:
                self_module.bias.copy_(self_module.network_bias_backup)

    def list_available_networks(self):
        self.listed += 1

    @staticmethod
    def patch_in_place(module: torch.nn.Module, layer_name: str, update: torch.Tensor, name: str = "some_lora"):
        """What network_apply_weights does when a <lora:...> is active: back up, then write weight + update."""
        module.network_layer_name = layer_name
        module.network_weights_backup = module.weight.detach().to("cpu", copy=True)
        module.network_bias_backup = None
        with torch.no_grad():
            module.weight += update
        module.network_current_names = ((name, 1.0, 1.0, None),)


class CheckpointInfo:
    def __init__(self, filename: str):
        self.filename = filename
        self.title = self.name = os.path.basename(filename)


class SdModels:
    """sd_models: the checkpoint folder, its reader (read_state_dict) and list refresh (list_models)."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.listed = 0
        self.read: list[str] = []

    def read_state_dict(self, checkpoint_file, print_global_state=False, map_location=None):
        from safetensors.torch import load_file

        self.read.append(checkpoint_file)
        return load_file(checkpoint_file, device=map_location or "cpu")

    def list_models(self):
        self.listed += 1


def write_checkpoint(unet, path: str, extra: dict | None = None) -> dict:
    """A single-file checkpoint of the fake model in the LDM layout the web UI reads: the UNet's block skeleton (small
    tensors), its cross-attention weights under their LDM names, and a few VAE / text-encoder tensors (one pair
    sharing memory, as a .ckpt may hold). Returns the state dict written."""
    from safetensors.torch import save_file

    from trust_engine.unet_view import find_sites

    prefix = "model.diffusion_model."
    lpb, levels = unet.config.layers_per_block, len(unet.config.down_block_types)
    n = levels * (lpb + 1)
    g = torch.Generator().manual_seed(0)
    sd = {f"{prefix}input_blocks.{i}.0.weight": torch.randn(3, generator=g) for i in range(n)}
    sd |= {f"{prefix}output_blocks.{i}.0.in_layers.0.weight": torch.randn(3, generator=g) for i in range(n)}
    for level in range(levels - 1):
        sd[f"{prefix}input_blocks.{(level + 1) * (lpb + 1)}.0.op.weight"] = torch.randn(2, generator=g)
        sd[f"{prefix}output_blocks.{level * (lpb + 1) + lpb}.2.conv.weight"] = torch.randn(2, generator=g)
    for site in find_sites(unet, include_out=True):
        sd[f"{prefix}{site.name}.weight"] = unet.get_submodule(site.diffusers_name).weight.detach().clone()
    sd["first_stage_model.decoder.conv_out.weight"] = torch.randn(4, 4, generator=g)
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(8, generator=g)
    sd.update(extra or {})
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return sd


def make_modules(pipe, lora_dir: str, **cmd) -> types.SimpleNamespace:
    """The namespace of web UI modules the adapter takes (shared, devices, prompt_parser, sd_hijack, sd_unet)."""
    from trust_engine.testbed import paths

    unet = A1111StyleUNet.from_pretrained(paths.PIPELINE / "unet", local_files_only=True).eval().requires_grad_(False)
    sd_model = LatentDiffusion(pipe, unet).requires_grad_(False)
    checkpoints = os.path.join(os.path.dirname(lora_dir), "Stable-diffusion")
    os.makedirs(checkpoints, exist_ok=True)
    checkpoint = os.path.join(checkpoints, "tiny.safetensors")
    write_checkpoint(unet, checkpoint)
    sd_model.sd_checkpoint_info = CheckpointInfo(checkpoint)
    shared = types.SimpleNamespace(
        sd_model=sd_model, state=State(),
        opts=types.SimpleNamespace(training_xattention_optimizations=False, trust_lora_subfolder="TRuST"),
        cmd_opts=types.SimpleNamespace(lowvram=False, medvram=False, lora_dir=lora_dir, **cmd),
        models_path=lora_dir)
    devices = types.SimpleNamespace(autocast=contextlib.nullcontext, torch_gc=lambda: None, device=torch.device("cpu"),
                                    dtype=torch.float32)
    return types.SimpleNamespace(shared=shared, devices=devices,
                                 prompt_parser=types.SimpleNamespace(SdConditioning=SdConditioning),
                                 sd_hijack=SdHijack(), sd_unet=types.SimpleNamespace(current_unet=None),
                                 networks=Networks(), sd_models=SdModels(checkpoints))


@contextlib.contextmanager
def networks_installed(modules):
    """The fake Lora extension where the adapter looks for it (sys.modules['networks'], as in the web UI)."""
    previous = sys.modules.get("networks")
    sys.modules["networks"] = modules.networks
    try:
        yield modules.networks
    finally:
        if previous is None:
            sys.modules.pop("networks", None)
        else:
            sys.modules["networks"] = previous
