"""ComfyUI adapter: turns a loaded MODEL / CLIP / VAE into the engine's DiffusionParts on the host's device, and
bridges progress, interruption and files. It trains on private copies; the host's shared modules are never written.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
from collections.abc import Iterator

import torch

from ..trust_engine.functional import DECODER_BLOCKS, checkpoint_blocks
from ..trust_engine.parts import DiffusionParts, TokenInput, unpack_extra
from ..trust_engine.parts import pack_extra as _pack
from ..trust_engine.progress import ProgressEvent
from ..trust_engine.unet_view import UnknownArchitectureError, find_sites, site_weight, weight_path

# model_config classes of comfy.supported_models the engine knows (SD1.x, SD2.x, SDXL and SDXL distillations)
SUPPORTED = {
    "SD15": "SD1.x", "SD20": "SD2.x", "SD21UnclipL": None, "SD21UnclipH": None,
    "SDXL": "SDXL", "SSD1B": "SDXL", "Segmind_Vega": "SDXL", "KOALA_700M": "SDXL", "KOALA_1B": "SDXL",
}
NATIVE_RESOLUTION = {"SD1.x": 512, "SD2.x": 768, "SDXL": 1024}
DELTA_FOLDER = "unlearned_deltas"  # our own models/ folder, also listed under loras so stock loaders see the files
EVENT = "trust.progress"  # custom websocket event the front-end extension listens to


class HostModelError(ValueError):
    """The MODEL/CLIP/VAE given to a node cannot be used (wrong family, missing input)."""


def model_family(model) -> str:
    """'SD1.x', 'SD2.x' or 'SDXL' for a ComfyUI MODEL; a clear error for anything else."""
    if model is None:
        raise HostModelError("no MODEL connected: connect the MODEL output of Load Checkpoint")
    config = getattr(getattr(model, "model", None), "model_config", None)
    name = type(config).__name__ if config is not None else type(model).__name__
    family = SUPPORTED.get(name)
    if family is None:
        raise HostModelError(
            f"this MODEL is {name}; TRuST unlearning supports Stable Diffusion 1.x, 2.x and SDXL checkpoints "
            f"(cross-attention UNets). Load one of those with Load Checkpoint."
        )
    channels = _in_channels(model)
    if channels not in (None, 4):  # inpainting (9: latent + mask + masked image) and other concat-conditioned UNets
        raise HostModelError(
            f"this MODEL is a {family} {'inpainting ' if channels == 9 else ''}checkpoint ({channels} input channels); "
            f"TRuST unlearns text-to-image checkpoints (4 input channels): load the matching non-inpainting "
            f"checkpoint with Load Checkpoint."
        )
    return family


def _in_channels(model) -> int | None:
    """Input channels of the MODEL's UNet, from its model config or the network itself (None: unknown)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    unet_config = getattr(config, "unet_config", None)
    if isinstance(unet_config, dict) and unet_config.get("in_channels") is not None:
        return int(unet_config["in_channels"])
    network = getattr(getattr(model, "model", None), "diffusion_model", None)
    channels = getattr(network, "in_channels", None)
    if channels is None:
        channels = getattr(getattr(network, "config", None), "in_channels", None)
    return int(channels) if channels is not None else None


def effective_site_weights(model) -> dict[str, torch.Tensor]:
    """Canonical site name -> the Q/K/V weight this MODEL samples with (its own patches applied, e.g. an upstream
    LoRA), on the CPU in the stored dtype. Read from wherever the weights are, one site at a time, without loading
    the model onto the GPU; where another clone's patches are currently written into the shared module, the
    original is taken from the patcher's backup (what ComfyUI restores on unpatching)."""
    import comfy.lora

    unet = model.model.diffusion_model
    backup = getattr(model, "backup", None) or {}
    patches = getattr(model, "patches", None) or {}
    out = {}
    for site in find_sites(unet):
        key = f"diffusion_model.{weight_path(unet, site)}.weight"
        stored = backup.get(key)
        weight = getattr(stored, "weight", stored) if stored is not None else site_weight(unet, site)
        w = weight.detach().to("cpu", torch.float32, copy=True)
        if patches.get(key):
            w = comfy.lora.calculate_weight(patches[key], w, key)
        out[site.name] = w.to(weight.dtype)  # rounded once to the stored dtype, as ComfyUI patches it for sampling
    return out


def prediction_type(model) -> str:
    import comfy.model_sampling

    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v_prediction"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "epsilon"
    raise HostModelError(f"unsupported sampling type {type(sampling).__name__}: only eps and v-prediction models")


def scheduler_config(model) -> dict:
    """A diffusers scheduler config of the host model's own discrete schedule (betas from its sigmas)."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().double().cpu()
    alphas_cumprod = 1.0 / (1.0 + sigmas**2)
    previous = torch.cat([torch.ones(1, dtype=alphas_cumprod.dtype), alphas_cumprod[:-1]])
    betas = (1 - alphas_cumprod / previous).clamp(0, 0.999)
    return {
        "num_train_timesteps": len(sigmas), "trained_betas": betas.tolist(), "beta_schedule": "linear",
        "prediction_type": prediction_type(model), "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "timestep_spacing": "leading",
    }


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


def _private_copy(module: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A private, frozen copy with ordinary (non-inference) tensors: ComfyUI loads weights under inference mode, and
    autograd may not save inference tensors; training on a copy also means the shared module is never touched.
    fp8-stored weights (ComfyUI's weight_dtype fp8 options) are up-cast to the compute dtype in the copy."""
    with torch.inference_mode(False), torch.no_grad():
        private = copy.deepcopy(module)
        for name, p in list(private.named_parameters()):
            if compute_dtype is not None and p.dtype in _FP8:
                _set(private, name, torch.nn.Parameter(p.to(compute_dtype), requires_grad=False))
            elif p.is_inference():
                _set(private, name, torch.nn.Parameter(p.clone(), requires_grad=False))
        for name, b in list(private.named_buffers()):
            if b.is_inference():
                _set(private, name, b.clone(), buffer=True)
    return private.requires_grad_(False).eval()


def _set(module: torch.nn.Module, path: str, value, buffer: bool = False) -> None:
    owner_path, _, leaf = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if buffer:
        owner.register_buffer(leaf, value)
    else:
        setattr(owner, leaf, value)


def _first_chunk(cond: torch.Tensor) -> torch.Tensor:
    return cond[:, :77]


@contextlib.contextmanager
def comfy_parts(model, clip, vae, resolution: int = 0, need_decoder: bool = True) -> Iterator[DiffusionParts]:
    """DiffusionParts of a ComfyUI MODEL/CLIP/VAE on the host's device. The UNet (with whatever patches the MODEL
    carries, e.g. an upstream LoRA) and the VAE are loaded through comfy.model_management and copied privately;
    the copies are dropped and memory is freed on exit."""
    import comfy.model_management as mm

    family = model_family(model)
    if clip is None:
        raise HostModelError("no CLIP connected: connect the CLIP output of Load Checkpoint")
    if need_decoder and vae is None:
        raise HostModelError("no VAE connected: connect the VAE output of Load Checkpoint")
    size = resolution or NATIVE_RESOLUTION[family]
    if size % 8:
        raise HostModelError(f"resolution must be a multiple of 8, got {size}")
    need = training_memory(model, size)
    try:
        # model management frees other models for the weights plus what training needs; after the private copy is
        # made, the host's own UNet may be offloaded too (it is not used while training)
        mm.load_models_gpu([model], memory_required=need, force_full_load=True)
        base_model = model.model
        compute_dtype = getattr(base_model, "manual_cast_dtype", None)
        unet = _private_copy(model.model.diffusion_model, compute_dtype)
        free = getattr(mm, "free_memory", None)
        if free is not None:
            free(need, next(unet.parameters()).device)
        try:
            find_sites(unet)
        except UnknownArchitectureError as e:
            raise HostModelError(str(e)) from None
        decoder = None
        if need_decoder:
            mm.load_models_gpu([vae.patcher], force_full_load=True)
            decoder = _private_copy(vae.first_stage_model)
            # the saliency's differentiable decode keeps one resnet block's activations at a time
            checkpoint_blocks(decoder, lambda m: type(m).__name__ in DECODER_BLOCKS)
        latent_format = base_model.latent_format
        device = next(unet.parameters()).device
        dtype = getattr(base_model, "manual_cast_dtype", None) or next(unet.parameters()).dtype
        sdxl = family == "SDXL"
        cache: dict[str, torch.Tensor] = {}

        def encode_one(prompt: str) -> torch.Tensor:
            if prompt not in cache:
                with torch.no_grad():
                    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
                    cond = _first_chunk(cond).clone().float()
                    if sdxl:  # pack the ADM vector (pooled text + size embedding) as extra "tokens" of the cond
                        y = adm(pooled.clone()).float().cpu()
                        cond = torch.cat([cond.cpu(), _pack(y, cond.shape[-1])], dim=1)
                cache[prompt] = cond.to(device)
            return cache[prompt]

        def encode_text(prompts: list[str]) -> torch.Tensor:
            return torch.cat([encode_one(p) for p in prompts]).to(dtype)

        adm_width = base_model.adm_channels if sdxl else 0

        def adm(pooled: torch.Tensor) -> torch.Tensor:
            return base_model.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0,
                                         target_width=size, target_height=size)

        def denoise(unet_call, latents, t, cond):
            extra = {}
            if sdxl:
                cond, extra["y"] = unpack_extra(cond, adm_width)
            return unet_call(latents.to(dtype), t.float(), context=cond.to(dtype), transformer_options={}, **extra)

        def decode(latents: torch.Tensor) -> torch.Tensor:
            z = latent_format.process_out(latents.float()).to(vae.vae_dtype).to(vae.device)
            return vae.process_output(decoder.decode(z).float()).to(device)

        channels = latent_format.latent_channels
        yield DiffusionParts(
            unet=unet, denoise=denoise, encode_text=encode_text, decode=decode,
            scheduler_config=scheduler_config(model), latent_shape=(channels, size // 8, size // 8),
            prediction_type=prediction_type(model), device=device, dtype=dtype, name=f"ComfyUI {family}",
            token_input=token_input(clip, device, adm if sdxl else None),
        )
    finally:
        unet = decoder = None
        mm.soft_empty_cache()


def _keep_norm_inputs(module: torch.nn.Module) -> None:
    """ComfyUI's CLIP layers add their residuals in place (`x += attn(norm(x))`), which overwrites the input a
    LayerNorm saved for its backward; on this private copy each LayerNorm gets a copy of its input, so a gradient can
    flow back to the token embeddings (the forward's values are unchanged)."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.LayerNorm):
            sub.register_forward_pre_hook(lambda _m, args: (args[0].clone(), *args[1:]))


def _text_encoders(model, tokenizers) -> list[tuple[str, str, object]]:
    """(token key, encoder attribute, transformers tokenizer) of each text encoder of a ComfyUI CLIP, in the order its
    conds are concatenated: one for SD1.x/SD2.x (SD1ClipModel: clip_name, clip), clip_l then clip_g for SDXL
    (SDXLClipModel, whose conds are cat([l, g]) and whose pooled output is clip_g's). Empty for other CLIPs."""
    if hasattr(model, "clip_name") and hasattr(model, "clip"):
        names = [(str(model.clip_name), str(model.clip))]
        tokenizer_attr = str(getattr(tokenizers, "clip", ""))
        tokenizer_attrs = [tokenizer_attr]
    elif any(c.__name__ == "SDXLClipModel" for c in type(model).__mro__):
        names, tokenizer_attrs = [("l", "clip_l"), ("g", "clip_g")], ["clip_l", "clip_g"]
    else:
        return []
    out = []
    for (key, attr), tokenizer_attr in zip(names, tokenizer_attrs):
        tokenizer = getattr(getattr(tokenizers, tokenizer_attr, None), "tokenizer", None)
        if tokenizer is None or not hasattr(getattr(model, attr, None), "transformer"):
            return []
        out.append((key, attr, tokenizer))
    return out


def token_input(clip, device, adm=None) -> TokenInput | None:
    """Text conditioning from token embeddings (soft-prompt attacks) for the CLIP of SD1.x, SD2.x (one text encoder)
    and SDXL (clip_l and clip_g): the soft rows go into each encoder's token list as an embedding, as ComfyUI inserts
    textual-inversion embeddings (`process_tokens`), and are encoded by a private copy of the CLIP model (ComfyUI's
    weights are inference tensors, which autograd cannot save; the shared CLIP is not touched). For SDXL `table` is
    the two token-embedding tables side by side (a soft token is one row, split between the encoders) and
    `adm(pooled)` gives the ADM vector packed onto the cond, as `comfy_parts` packs it. None for other CLIPs."""
    model, tokenizers = getattr(clip, "cond_stage_model", None), getattr(clip, "tokenizer", None)
    encoders = _text_encoders(model, tokenizers)
    if not encoders:
        return None
    clip.load_model()
    private = _private_copy(model)
    _keep_norm_inputs(private)
    tables = [getattr(private, attr).transformer.get_input_embeddings().weight.detach() for _, attr, _ in encoders]
    if len({t.shape[0] for t in tables}) != 1 or any(t.get_vocab() != encoders[0][2].get_vocab()
                                                     for _, _, t in encoders[1:]):
        return None  # a soft token must be one vocabulary row for every encoder
    widths = [t.shape[1] for t in tables]
    table = torch.cat(tables, dim=1)
    words_tokenizer = encoders[0][2]
    special = {i for _, _, t in encoders for i in getattr(t, "all_special_ids", [])}
    layer = getattr(clip, "layer_idx", None)

    def encode(prompt: str, soft: torch.Tensor) -> torch.Tensor:
        tokenized = clip.tokenize(prompt)
        k, start, tokens = soft.shape[0], 0, {}
        for (key, _, _), width in zip(encoders, widths):
            chunk = list(tokenized[key][0])
            first = chunk[0]
            part = soft[:, start:start + width].contiguous()
            tokens[key] = [[first, (part, 1.0, *first[2:])] + chunk[1:len(chunk) - k]]
            start += width
        private.reset_clip_options()
        if layer is not None:
            private.set_clip_options({"layer": layer})
        with torch.inference_mode(False):
            cond, pooled = private.encode_token_weights(tokens)[:2]
            cond = _first_chunk(cond).float()
            if adm is not None:  # SDXL: the ADM vector (pooled text + size embedding) as extra "tokens", as encode_one
                cond = torch.cat([cond.cpu(), _pack(adm(pooled).float().cpu(), cond.shape[-1])], dim=1)
        return cond.to(device)

    def decode(ids: list[int]) -> str:
        return words_tokenizer.decode(ids, skip_special_tokens=True).strip()

    def tokenize(text: str) -> list[int]:
        return [i for i in words_tokenizer(text).input_ids if i not in special]

    words = torch.tensor([i for i in range(table.shape[0]) if i not in special])
    return TokenInput(table=table, encode=encode, decode=decode, words=words, tokenize=tokenize)


# Training working set per element of one latent (batch 1), above the UNet's own weights: optimizer state and
# activations of the engine's step (saliency decode + CLIP, micro-batched loss). From bench-scale's SD1.5 figure on
# the CPU in float32 (README: 8.8 GiB above the weights at 64x64x4 latents), scaled by the element size of the
# host's dtype; an estimate for model management, not a measurement on a GPU.
TRAINING_BYTES_PER_LATENT_ELEMENT_FP32 = 577_000


def training_memory(model, size: int) -> int:
    """What a TRuST run needs on the device besides the loaded model: the private UNet copy and the working set."""
    import comfy.model_management as mm

    unet = model.model.diffusion_model
    weights = mm.module_size(unet) if hasattr(mm, "module_size") else sum(
        p.numel() * p.element_size() for p in unet.parameters())
    element = torch.finfo(getattr(model.model, "manual_cast_dtype", None) or next(unet.parameters()).dtype).bits // 8
    element = max(2, element)  # fp8 weights are up-cast to 16-bit compute in the copy
    return int(weights + TRAINING_BYTES_PER_LATENT_ELEMENT_FP32 * (element / 4) * 4 * (size // 8) ** 2)


def out_of_memory_message(what: str, resolution: int) -> str:
    return (f"out of GPU memory while {what} at {resolution}x{resolution}: lower 'resolution' (training at 512 works "
            f"for SDXL too), close other workflows, or start ComfyUI with --lowvram. Your MODEL is unchanged.")


def is_out_of_memory(error: BaseException) -> bool:
    import comfy.model_management as mm

    return isinstance(error, mm.OOM_EXCEPTION) or "out of memory" in str(error).lower()


class HostProgress:
    """The engine's progress callback for ComfyUI: one ProgressBar on the node (data generation, then the steps), a
    custom websocket event for the front-end chart, and an interruption check (Cancel stops at the next event)."""

    def __init__(self, unique_id: str | None, prepare: int, steps: int, by_stage: bool = False) -> None:
        """TRuST: `prepare` generated images, then `steps` steps on one bar. `by_stage` (the other methods, whose
        stages each report their own totals): the bar shows the current stage's share done, out of 100."""
        self.node, self.prepare, self.by_stage = unique_id, prepare, by_stage
        self.total = 100 if by_stage else prepare + steps
        self.bar = progress_bar(self.total, unique_id)

    def __call__(self, event: ProgressEvent) -> None:
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
        if self.by_stage:
            done = round(100 * min(event.step, event.total) / max(1, event.total))
        else:
            done = min(event.step, self.prepare) if event.stage == "prepare" else self.prepare + event.step
        self.bar.update_absolute(done, self.total)
        send_event({"node": self.node, "stage": event.stage, "step": event.step, "total": event.total,
                    "message": event.message, **{k: v for k, v in event.metrics.items() if math.isfinite(v)}})


def progress_bar(total: int, unique_id: str | None):
    """comfy.utils.ProgressBar for this node. Its node_id argument exists from ComfyUI 0.3.45 on; older versions
    attribute the bar to the executing node themselves, so it is left out there."""
    import comfy.utils

    try:
        takes_node = "node_id" in inspect.signature(comfy.utils.ProgressBar).parameters
    except (TypeError, ValueError):
        takes_node = False
    return comfy.utils.ProgressBar(total, node_id=unique_id) if takes_node else comfy.utils.ProgressBar(total)


def send_event(payload: dict) -> None:
    """Send the custom event, only to the client that queued the running prompt (PromptServer.client_id; None
    broadcasts, as for a prompt queued without a client id), if the server is running (not in tests or scripts)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(EVENT, payload, getattr(server, "client_id", None))


@contextlib.contextmanager
def aligner_on_device(aligner):
    """The aligner (a transformers CLIP, which ComfyUI's model management does not track) on the compute device for
    one run, and back on the offload device afterwards, also after an error or a Cancel, so it holds no VRAM between
    runs."""
    if aligner is None:
        yield None
        return
    import comfy.model_management as mm

    with torch.inference_mode(False):  # moved under inference mode, its weights would become inference tensors
        aligner.model.to(mm.get_torch_device())
    try:
        yield aligner
    finally:
        with torch.inference_mode(False):
            aligner.model.to(mm.unet_offload_device())
        mm.soft_empty_cache()


def register_folders() -> None:
    """models/unlearned_deltas, listed under its own name and under loras (so LoraLoader lists the deltas)."""
    import folder_paths

    path = os.path.join(folder_paths.models_dir, DELTA_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(DELTA_FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[DELTA_FOLDER] = ([path], {".safetensors"})
    elif path not in entry[0]:
        entry[0].append(path)
    folder_paths.add_model_folder_path("loras", path)
    aligners = os.path.join(folder_paths.models_dir, "concept_aligners")
    if "concept_aligners" not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths["concept_aligners"] = ([aligners], set())


def delta_dir() -> str:
    import folder_paths

    return folder_paths.get_folder_paths(DELTA_FOLDER)[0]
