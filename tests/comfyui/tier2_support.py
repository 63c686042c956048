"""Helpers of the tier-2 tests: the tiny SD1.5-detectable checkpoint and a small client of ComfyUI's HTTP API."""

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


def build_checkpoint(root: Path, path: Path) -> None:
    """A tiny checkpoint ComfyUI detects as SD1.5 (built in a child process: importing comfy initialises a device
    from its command line, which must say --cpu)."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, str(root), str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"building the tiny checkpoint failed:\n{out.stderr[-3000:]}")


def _build(root: Path, path: Path) -> None:
    """ComfyUI's own UNetModel class (320 channels, one level), a random CLIP-L text encoder and a random SD VAE
    (diffusers layout, which ComfyUI converts), fp16, seeded."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(root))
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=[1], num_head_channels=64, use_spatial_transformer=True, transformer_depth=[1],
                     transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768, legacy=False)
    tensors = {}
    for name, p in unet.state_dict().items():
        if name.endswith("bias"):
            value = torch.zeros_like(p)
        elif "norm" in name and p.dim() == 1:
            value = torch.ones_like(p)
        else:
            value = torch.randn_like(p) * 0.02
        tensors["model.diffusion_model." + name] = value
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768))
    for name, p in text.state_dict().items():
        tensors["cond_stage_model.transformer." + name] = p
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
    root_arg, path_arg = sys.argv[1:3]
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, root_arg)
    import comfy.options

    comfy.options.enable_args_parsing()
    _build(Path(root_arg), Path(path_arg))
