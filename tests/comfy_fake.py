"""A small fake of the ComfyUI calls the nodes use (same names and signatures as ComfyUI 0.3.x), around the bundled
testbed, for tier-1 tests. Installed into sys.modules by `install()`; tier 2 runs the real host.

What it imitates: ModelPatcher.clone/add_patches/get_model_object (patches are lazy: the shared module is only
read), comfy.sd.load_lora_for_models with kohya key mapping, ProgressBar, interruption, folder_paths and
PromptServer.send_sync. The fake's diffusion_model keeps diffusers module names (the real one has LDM names), so
its LoRA key map translates LDM names the way ComfyUI's model_lora_keys_unet does for the real layout.
"""

from __future__ import annotations

import os
import sys
import types

import torch
from diffusers import UNet2DConditionModel

PREFIX = "diffusion_model."


class InterruptProcessingException(Exception):
    pass


class ComfyStyleUNet(UNet2DConditionModel):
    """The testbed UNet behind ComfyUI's diffusion_model call signature (x, timesteps, context, y, ...)."""

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006  (ComfyUI's signature)
        return super().forward(x, timesteps, encoder_hidden_states=context, return_dict=False)[0]


class EPS:
    pass


class V_PREDICTION(EPS):
    pass


class ModelSampling(EPS):
    def __init__(self, alphas_cumprod: torch.Tensor):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


class LatentFormat:
    latent_channels = 4

    def __init__(self, scale_factor: float):
        self.scale_factor = scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class SD15:  # the name ComfyUI's supported_models gives SD1.x
    pass


class BaseModel(torch.nn.Module):
    def __init__(self, unet, scheduler, scale_factor, config=None):
        super().__init__()
        self.diffusion_model = unet
        self.model_config = config or SD15()
        self.latent_format = LatentFormat(scale_factor)
        self.model_sampling = ModelSampling(scheduler.alphas_cumprod)
        self.manual_cast_dtype = None
        self.adm_channels = 0


class ModelPatcher:
    """Shares `model` between clones; patches are recorded, never written into the shared module."""

    def __init__(self, model, patches=None):
        self.model = model
        self.patches = {k: list(v) for k, v in (patches or {}).items()}
        self.load_device = torch.device("cpu")

    def clone(self):
        return ModelPatcher(self.model, self.patches)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        keys = set(self.model.state_dict())
        accepted = []
        for key, value in patches.items():
            if key in keys:
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None))
                accepted.append(key)
        return accepted

    def get_model_object(self, name):
        return getattr(self.model, name)

    def patched_state_dict(self) -> dict[str, torch.Tensor]:
        """What sampling would use: every weight with its patches added (computed on copies)."""
        out = {}
        for key, weight in self.model.state_dict().items():
            w = weight.detach().clone().float()
            for strength, value, _, _, _ in self.patches.get(key, []):
                w = w + strength * value[1][0].float()
            out[key] = w.to(weight.dtype)
        return out


def _residual_in_place(module, args, out):
    hidden = args[0]
    if torch.is_tensor(hidden) and not hidden.is_leaf:
        hidden.add_(0)  # the values stay; the version counter moves, as after ComfyUI's `x +=`


class _ClipL(torch.nn.Module):
    """ComfyUI's SDClipModel as far as the pack uses it: `transformer` with its token-embedding layer."""

    def __init__(self, text_encoder):
        super().__init__()
        self.transformer = text_encoder


class ClipModel(torch.nn.Module):
    """ComfyUI's SD1ClipModel (`cond_stage_model`): `encode_token_weights({"l": [[(token, weight), ...]]})`, where a
    token may be an embedding tensor (rows inserted at its place, as `process_tokens` does for textual inversion)."""

    clip_name, clip = "l", "clip_l"

    def __init__(self, text_encoder):
        super().__init__()
        self.clip_l = _ClipL(text_encoder)
        # ComfyUI's CLIPLayer adds its residuals in place (`x += self.self_attn(self.layer_norm1(x), ...)`), which
        # overwrites the input its LayerNorm saved for the backward: each layer's input is written in place here too
        for block in text_encoder.modules():
            if type(block).__name__ == "CLIPEncoderLayer":
                block.register_forward_hook(_residual_in_place)

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_token_weights(self, tokens):
        chunk = tokens[self.clip_name][0]
        encoder = self.clip_l.transformer
        layer = encoder.get_input_embeddings()
        rows, placeholder = [], []
        for t, *_ in chunk:
            if torch.is_tensor(t):
                rows.append(t.view(-1, t.shape[-1]).float())
                placeholder += [0] * rows[-1].shape[0]
            else:
                rows.append(layer(torch.tensor([t])).float())
                placeholder.append(t)
        embeds = torch.cat(rows)[None]
        # the transformers encoder takes ids: feed the assembled embeddings through its token-embedding layer's output
        handle = layer.register_forward_hook(lambda module, args, out: embeds.to(out.dtype))
        try:
            out = encoder(torch.tensor([placeholder]))
        finally:
            handle.remove()
        return out[0], out[1]


class _Tokenizer:
    clip = "clip_l"

    def __init__(self, tokenizer):
        self.clip_l = types.SimpleNamespace(tokenizer=tokenizer)


class CLIP:
    def __init__(self, pipe):
        self.cond_stage_model = ClipModel(pipe.text_encoder)
        self.tokenizer = _Tokenizer(pipe.tokenizer)
        self.layer_idx = None

    def load_model(self):
        pass

    def tokenize(self, text, return_word_ids=False, **kwargs):
        tokenizer = self.tokenizer.clip_l.tokenizer
        ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        return {"l": [[(int(i), 1.0) for i in ids[0]]]}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond, pooled = self.cond_stage_model.encode_token_weights(tokens)
        return (cond, pooled) if return_pooled else cond


class FirstStage(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def decode(self, z):
        return self.vae.decode(z).sample


class VAE:
    def __init__(self, pipe):
        self.first_stage_model = FirstStage(pipe.vae)
        self.patcher = ModelPatcher(self.first_stage_model)
        self.vae_dtype = torch.float32
        self.device = torch.device("cpu")

    @staticmethod
    def process_output(image):
        return torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)


def _lora_key_map(model) -> dict[str, str]:
    """kohya `lora_unet_<LDM path with _>` -> the fake model's state-dict key (ComfyUI: model_lora_keys_unet)."""
    from trust_engine.unet_view import name_map

    unet = model.model.diffusion_model
    return {"lora_unet_" + ldm.replace(".", "_"): PREFIX + dif + ".weight"
            for ldm, dif in name_map(unet.config, include_out=True).items()}


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    """Dense diffs from kohya LoRA / .diff tensors, as comfy.lora.load_lora computes them, patched onto a clone."""
    key_map = _lora_key_map(model)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        base, _, part = key.partition(".")
        groups.setdefault(base, {})[part] = tensor
    patches = {}
    for base, parts in groups.items():
        if base not in key_map:
            continue
        if "diff" in parts:
            diff = parts["diff"]
        else:
            up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
            diff = (up @ down) * (float(parts["alpha"]) / down.shape[0])
        patches[key_map[base]] = ("diff", (diff,))
    patched = model.clone()
    patched.add_patches(patches, strength_model)
    return patched, None


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    """comfy.lora.calculate_weight for the patches this fake makes: weight + strength * diff (on the given copy)."""
    for strength, value, _, _, _ in patches:
        weight = weight + strength * value[1][0].to(weight.device, weight.dtype)
    return weight


class ProgressBar:
    updates: list[tuple[int, int]] = []

    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value, total=None, preview=None):
        self.total = total or self.total
        self.current = min(value, self.total)
        ProgressBar.updates.append((self.current, self.total))
        _state["ticks"] += 1
        if _state["interrupt_after"] is not None and _state["ticks"] >= _state["interrupt_after"]:
            _state["interrupted"] = True

    def update(self, value):
        self.update_absolute(self.current + value)


_state = {"interrupted": False, "interrupt_after": None, "ticks": 0, "events": [], "sids": [], "loaded": [], "freed": []}


def memory_requests() -> tuple[list, list]:
    """(load_models_gpu calls as (models, memory_required), free_memory requests) since install."""
    return _state["loaded"], _state["freed"]


def throw_exception_if_processing_interrupted():
    if _state["interrupted"]:
        _state["interrupted"] = False
        raise InterruptProcessingException()


def interrupt_after(ticks: int | None) -> None:
    """Press Cancel after this many progress updates (None: never)."""
    _state.update(interrupt_after=ticks, ticks=0, interrupted=False)


def events() -> list[tuple[str, dict]]:
    return _state["events"]


class _Server:
    client_id = "client-that-queued"

    def send_sync(self, event, data, sid=None):
        _state["events"].append((event, data))
        _state["sids"].append(sid)


def install(models_dir: str, temp_dir: str) -> None:
    """Put fake `comfy.*`, `folder_paths` and `server` modules into sys.modules."""
    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.load_models_gpu = lambda models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, \
        force_full_load=False: _state["loaded"].append((models, memory_required))
    mm.free_memory = lambda memory_required, device, keep_loaded=(): _state["freed"].append(memory_required)
    mm.module_size = lambda module: sum(t.numel() * t.element_size() for t in module.state_dict().values())
    mm.soft_empty_cache = lambda force=False: None
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.InterruptProcessingException = InterruptProcessingException
    mm.OOM_EXCEPTION = torch.OutOfMemoryError
    mm.unet_offload_device = lambda: torch.device("cpu")
    lora = types.ModuleType("comfy.lora")
    lora.calculate_weight = calculate_weight
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    sampling = types.ModuleType("comfy.model_sampling")
    sampling.EPS, sampling.V_PREDICTION = EPS, V_PREDICTION
    sd = types.ModuleType("comfy.sd")
    sd.load_lora_for_models = load_lora_for_models
    comfy.model_management, comfy.utils, comfy.model_sampling, comfy.sd, comfy.lora = mm, utils, sampling, sd, lora

    fp = types.ModuleType("folder_paths")
    fp.models_dir = models_dir
    fp.folder_names_and_paths = {"loras": ([os.path.join(models_dir, "loras")], {".safetensors"})}

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0]

    def add_model_folder_path(name, path, is_default=False):
        paths = fp.folder_names_and_paths.setdefault(name, ([], set()))[0]
        if path not in paths:
            paths.append(path)

    def get_filename_list(name):
        found = []
        for root in get_folder_paths(name):
            if os.path.isdir(root):
                found += sorted(f for f in os.listdir(root) if os.path.isfile(os.path.join(root, f)))
        return found

    def get_full_path(name, filename):
        for root in get_folder_paths(name):
            path = os.path.join(root, filename)
            if os.path.isfile(path):
                return path
        return None

    def get_save_image_path(prefix, output_dir, width=0, height=0):
        return output_dir, prefix, 1, "", prefix

    fp.get_folder_paths, fp.add_model_folder_path = get_folder_paths, add_model_folder_path
    fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path
    fp.get_temp_directory = lambda: temp_dir
    fp.get_save_image_path = get_save_image_path

    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {"instance": _Server()})
    sys.modules.update({"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                        "comfy.model_sampling": sampling, "comfy.sd": sd, "comfy.lora": lora, "folder_paths": fp,
                        "server": server})


def uninstall() -> None:
    for name in ("comfy", "comfy.model_management", "comfy.utils", "comfy.model_sampling", "comfy.sd", "comfy.lora",
                 "folder_paths", "server"):
        sys.modules.pop(name, None)


def host_objects():
    """(MODEL, CLIP, VAE) of the bundled testbed, as the fake host hands them to nodes."""
    from trust_engine.testbed import bundle, paths

    pipe = bundle.load_pipeline()
    unet = ComfyStyleUNet.from_pretrained(paths.PIPELINE / "unet", local_files_only=True).eval()
    with torch.inference_mode():  # ComfyUI loads checkpoints under inference mode: every weight is an inference tensor
        unet = _as_inference(unet)
    model = ModelPatcher(BaseModel(unet, pipe.scheduler, pipe.vae.config.scaling_factor))
    return model, CLIP(pipe), VAE(pipe)


def _as_inference(module: torch.nn.Module) -> torch.nn.Module:
    for name, p in list(module.named_parameters()):
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        setattr(owner, leaf, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    return module
