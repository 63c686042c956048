"""Helpers of the tier-2 tests: the tiny SD1.5- and SDXL-detectable checkpoints and a small client of ComfyUI's HTTP
API."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHECKPOINT = "tiny_sd15.safetensors"
CHECKPOINT_SDXL = "tiny_sdxl_vega.safetensors"
KINDS = {CHECKPOINT: "sd15", CHECKPOINT_SDXL: "sdxl"}


def build_checkpoint(root: Path, path: Path) -> None:
    """A tiny checkpoint ComfyUI detects as SD1.5 or (for CHECKPOINT_SDXL) as an SDXL-family model, built in a child
    process: importing comfy initialises a device from its command line, which must say --cpu."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, str(root), str(path), KINDS[path.name]], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"building the tiny checkpoint {path.name} failed:\n{out.stderr[-3000:]}")


def _random(name: str, p):
    import torch

    if name.endswith("bias"):
        return torch.zeros_like(p)
    if ("norm" in name or "ln_" in name) and p.dim() == 1:
        return torch.ones_like(p)
    return torch.randn_like(p) * 0.02


def _unet(kind: str):
    """ComfyUI's own UNetModel class. sd15: 320 channels, one level, context 768. sdxl: the layout of ComfyUI's
    Segmind_Vega entry (transformer depths 0,0,1,1,2,2 / output 0,0,0,1,1,1,2,2,2, no middle transformer, linear
    proj_in, context 2048, ADM input 2816), with every level at 320 channels (channel_mult 1,1,1 instead of 1,2,4,
    which ComfyUI's detection does not look at) to keep it CPU-sized."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if kind == "sd15":
        return UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                         channel_mult=[1], num_head_channels=64, use_spatial_transformer=True, transformer_depth=[1],
                         transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768, legacy=False)
    return UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2],
                     channel_mult=[1, 1, 1], num_head_channels=64, use_spatial_transformer=True,
                     transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=-1,
                     transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], use_linear_in_transformer=True,
                     context_dim=2048, num_classes="sequential", adm_in_channels=2816, legacy=False)


def _open_clip_g() -> dict:
    """A random OpenCLIP ViT-bigG text tower in the layout SDXL checkpoints store (conditioner.embedders.1.model.*):
    ComfyUI builds CLIP-G from a fixed config, so its full size (32 layers, width 1280) is needed."""
    import torch

    width, layers, vocab, ctx = 1280, 32, 49408, 77
    shapes = {"token_embedding.weight": (vocab, width), "positional_embedding": (ctx, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, width)}
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        shapes.update({block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
                       block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
                       block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
                       block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
                       block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
                       block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,)})
    return {name: _random(name, torch.empty(shape)).half() for name, shape in shapes.items()}


def _build(root: Path, path: Path, kind: str) -> None:
    """UNet (see _unet), a random CLIP-L text encoder (plus a random CLIP-G for sdxl) and a random SD VAE (diffusers
    layout, which ComfyUI converts), fp16, seeded."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(root))
    torch.manual_seed(0)
    unet = _unet(kind)
    tensors = {"model.diffusion_model." + name: _random(name, p) for name, p in unet.state_dict().items()}
    del unet
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768))
    for name, p in text.state_dict().items():
        if kind == "sd15":  # ComfyUI's SD1.5 loader adds a missing text_model. itself
            tensors["cond_stage_model.transformer." + name] = p
        else:  # SDXL's loader does not: the transformers layout in full
            full = name if name.startswith("text_model.") else "text_model." + name
            tensors["conditioner.embedders.0.transformer." + full] = p
    if kind == "sdxl":
        for name, p in _open_clip_g().items():
            tensors["conditioner.embedders.1.model." + name] = p
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    for name, p in vae.state_dict().items():
        tensors["first_stage_model." + name] = p
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """The HTTP calls a test needs: queue a prompt, wait for its history, interrupt, object_info."""

    def __init__(self, base: str, log: Path, base_dir: Path):
        self.base, self.log, self.base_dir = base, log, base_dir

    def _call(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path}: HTTP {e.code}: {e.read().decode()[:3000]}") from None
        return json.loads(text) if text else None

    def object_info(self) -> dict:
        return self._call("/object_info")

    def queue(self, prompt: dict) -> str:
        return self._call("/prompt", {"prompt": prompt, "client_id": "tier2"})["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._call(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s; server log tail:\n{self.tail()}")

    def run(self, prompt: dict, timeout: float = 900) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        assert entry["status"]["status_str"] == "success", (
            f"prompt failed: {json.dumps(entry['status'].get('messages'))[-3000:]}\nserver log:\n{self.tail()}")
        return entry

    def interrupt(self) -> None:
        self._call("/interrupt", {})

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    root_arg, path_arg, kind_arg = sys.argv[1:4]
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, root_arg)
    import comfy.options

    comfy.options.enable_args_parsing()
    _build(Path(root_arg), Path(path_arg), kind_arg)
