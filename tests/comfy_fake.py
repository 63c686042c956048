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
from tiny_diffusers import LdmCallUNet

PREFIX = "diffusion_model."


class InterruptProcessingException(Exception):
    pass


class ComfyStyleUNet(LdmCallUNet, UNet2DConditionModel):
    """The testbed UNet behind ComfyUI's diffusion_model call signature (x, timesteps, context, y, ...). For SDXL, `y`
    is ComfyUI's ADM vector (pooled text + size embeddings, `SDXLBaseModel.encode_adm`), which the UNet's label
    embedding (diffusers: add_embedding) takes as it is."""

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006  (ComfyUI's signature)
        return self.ldm_call(x, timesteps, context, y)


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


class SDXL:  # ... and SDXL
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


class SDXLBaseModel(BaseModel):
    """comfy.model_base.SDXL as far as the pack uses it: adm_channels and encode_adm (the pooled text, then the
    sinusoidal embedding of height, width, crop_h, crop_w, target height, target width). ComfyUI's embedder is a
    256-wide Timestep; here the UNet's own time-id projection (the same sinusoid) at its toy width."""

    def __init__(self, unet, scheduler, scale_factor):
        super().__init__(unet, scheduler, scale_factor, SDXL())
        self.adm_channels = int(unet.config.projection_class_embeddings_input_dim)

    def encode_adm(self, **kwargs):
        pooled = kwargs["pooled_output"]
        width, height = kwargs.get("width", 768), kwargs.get("height", 768)
        sizes = [height, width, kwargs.get("crop_h", 0), kwargs.get("crop_w", 0), kwargs.get("target_height", height),
                 kwargs.get("target_width", width)]
        flat = self.diffusion_model.add_time_proj(torch.tensor(sizes, dtype=torch.float32)).flatten()
        flat = flat.unsqueeze(0).repeat(pooled.shape[0], 1)
        return torch.cat((pooled.to(flat.device), flat), dim=1)


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


class _SDClip(torch.nn.Module):
    """ComfyUI's SDClipModel as far as the pack uses it: `transformer` with its token-embedding layer, the clip options
    (layer: "last", or a hidden layer index, with or without the final layer norm) and `encode_token_weights` of
    one chunk [(token, weight), ...], where a token may be an embedding tensor (rows inserted at its place, as
    `process_tokens` does for textual inversion). The pooled output is the final-normed state at the last counted
    token (the end token: ComfyUI counts tokens up to the first end token, inserted rows included), projected where
    the model returns its projected pooled output (SDXL's clip_g)."""

    def __init__(self, text_encoder, end_token, layer="last", layer_idx=None, layer_norm_hidden_state=True,
                 projected_pooled=False):
        super().__init__()
        self.transformer = text_encoder
        self.end_token = end_token
        self.layer_norm_hidden_state, self.projected_pooled = layer_norm_hidden_state, projected_pooled
        self.options_default = (layer, layer_idx)
        self.layer, self.layer_idx = layer, layer_idx
        # ComfyUI's CLIPLayer adds its residuals in place (`x += self.self_attn(self.layer_norm1(x), ...)`), which
        # overwrites the input its LayerNorm saved for the backward: each layer's input is written in place here too
        for block in text_encoder.modules():
            if type(block).__name__ == "CLIPEncoderLayer":
                block.register_forward_hook(_residual_in_place)

    def set_clip_options(self, options):
        layer_idx = options.get("layer", self.layer_idx)
        layers = self.transformer.config.num_hidden_layers
        if layer_idx is None or abs(layer_idx) > layers:
            self.layer = "last"
        else:
            self.layer, self.layer_idx = "hidden", layer_idx

    def reset_clip_options(self):
        self.layer, self.layer_idx = self.options_default

    def encode_token_weights(self, chunks):
        chunk = chunks[0]
        encoder = self.transformer
        layer = encoder.get_input_embeddings()
        rows, placeholder, counted, ended = [], [], 0, False
        for t, *_ in chunk:
            if torch.is_tensor(t):
                rows.append(t.view(-1, t.shape[-1]).float())
                placeholder += [0] * rows[-1].shape[0]
                counted += rows[-1].shape[0]
            else:
                rows.append(layer(torch.tensor([t])).float())
                placeholder.append(t)
                counted += 0 if ended else 1
                ended = ended or t == self.end_token
        embeds = torch.cat(rows)[None]
        # the transformers encoder takes ids: feed the assembled embeddings through its token-embedding layer's output
        handle = layer.register_forward_hook(lambda module, args, out: embeds.to(out.dtype))
        try:
            out = encoder(torch.tensor([placeholder]), output_hidden_states=True)
        finally:
            handle.remove()
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        if self.layer == "last":
            z = out.last_hidden_state
        else:
            z = out.hidden_states[self.layer_idx]
            if self.layer_norm_hidden_state:
                z = norm(z)
        pooled = out.last_hidden_state[:, counted - 1]
        if self.projected_pooled:
            pooled = encoder.text_projection(pooled)
        return z.float(), pooled.float()


class ClipModel(torch.nn.Module):
    """ComfyUI's SD1ClipModel (`cond_stage_model`): `encode_token_weights({"l": [[(token, weight), ...]]})`."""

    clip_name, clip = "l", "clip_l"

    def __init__(self, text_encoder, end_token):
        super().__init__()
        self.clip_l = _SDClip(text_encoder, end_token)

    def reset_clip_options(self):
        self.clip_l.reset_clip_options()

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)

    def encode_token_weights(self, tokens):
        return self.clip_l.encode_token_weights(tokens[self.clip_name])


class SDXLClipModel(torch.nn.Module):
    """ComfyUI's SDXLClipModel: clip_l and clip_g, each at its penultimate hidden state without the final layer norm;
    the cond is cat([l, g]) on the channels, the pooled output clip_g's projected one."""

    def __init__(self, text_encoder, text_encoder_2, end_token):
        super().__init__()
        self.clip_l = _SDClip(text_encoder, end_token, "hidden", -2, layer_norm_hidden_state=False)
        self.clip_g = _SDClip(text_encoder_2, end_token, "hidden", -2, layer_norm_hidden_state=False,
                              projected_pooled=True)

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)
        self.clip_g.set_clip_options(options)

    def reset_clip_options(self):
        self.clip_g.reset_clip_options()
        self.clip_l.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        g_out, g_pooled = self.clip_g.encode_token_weights(token_weight_pairs["g"])
        l_out, l_pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])
        cut_to = min(l_out.shape[1], g_out.shape[1])
        return torch.cat([l_out[:, :cut_to], g_out[:, :cut_to]], dim=-1), g_pooled


class _Tokenizer:
    clip = "clip_l"

    def __init__(self, tokenizer):
        self.clip_l = types.SimpleNamespace(tokenizer=tokenizer)


class _SDXLTokenizer:
    def __init__(self, tokenizer, tokenizer_2):
        self.clip_l = types.SimpleNamespace(tokenizer=tokenizer)
        self.clip_g = types.SimpleNamespace(tokenizer=tokenizer_2)


def _chunk(tokenizer, text, pad):
    """One chunk as SDTokenizer builds it: start, the words, end, padded to the length with `pad`."""
    ids = tokenizer([text], truncation=True).input_ids[0]
    return [(int(i), 1.0) for i in ids] + [(pad, 1.0)] * (tokenizer.model_max_length - len(ids))


class CLIP:
    """comfy.sd.CLIP: tokenize, encode_from_tokens (clip options reset, then `layer_idx` set: CLIPSetLastLayer)."""

    def __init__(self, pipe):
        self.cond_stage_model = ClipModel(pipe.text_encoder, pipe.tokenizer.eos_token_id)
        self.tokenizer = _Tokenizer(pipe.tokenizer)
        self.layer_idx = None

    def load_model(self):
        pass

    def tokenize(self, text, return_word_ids=False, **kwargs):
        tokenizer = self.tokenizer.clip_l.tokenizer
        return {"l": [_chunk(tokenizer, text, tokenizer.eos_token_id)]}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        if self.layer_idx is not None:
            self.cond_stage_model.set_clip_options({"layer": self.layer_idx})
        cond, pooled = self.cond_stage_model.encode_token_weights(tokens)
        return (cond, pooled) if return_pooled else cond


class SDXLCLIP(CLIP):
    """The CLIP of an SDXL checkpoint: SDXLTokenizer (clip_l pads with the end token, clip_g with 0) and
    SDXLClipModel."""

    def __init__(self, pipe):
        self.cond_stage_model = SDXLClipModel(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer.eos_token_id)
        self.tokenizer = _SDXLTokenizer(pipe.tokenizer, pipe.tokenizer_2)
        self.layer_idx = None

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"g": [_chunk(self.tokenizer.clip_g.tokenizer, text, 0)],
                "l": [_chunk(self.tokenizer.clip_l.tokenizer, text, self.tokenizer.clip_l.tokenizer.eos_token_id)]}


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


def sdxl_host_objects(pipe):
    """(MODEL, CLIP, VAE) of a diffusers StableDiffusionXLPipeline (tests/tiny_diffusers.py), as ComfyUI hands an SDXL
    checkpoint's to nodes."""
    unet = ComfyStyleUNet.from_config(pipe.unet.config)
    unet.load_state_dict(pipe.unet.state_dict())
    with torch.inference_mode():
        unet = _as_inference(unet.eval())
    model = ModelPatcher(SDXLBaseModel(unet, pipe.scheduler, pipe.vae.config.scaling_factor))
    return model, SDXLCLIP(pipe), VAE(pipe)


def _as_inference(module: torch.nn.Module) -> torch.nn.Module:
    for name, p in list(module.named_parameters()):
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        setattr(owner, leaf, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    return module
