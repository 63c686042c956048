"""AUTOMATIC1111 adapter: turns `shared.sd_model` (SD1.x, SD2.x incl. v-prediction, SDXL) into the engine's
DiffusionParts and bridges progress, interruption and the Lora folder. Thin, like nodes/host.py for ComfyUI.

The web UI's model is never written by training: the UNet and VAE used are private module trees over the host's own
tensors (`functional.private_tree`), read only. Two things of the host are switched for the run and switched back:
the built-in Lora extension's in-place weight patches (restored to the checkpoint's weights first; the extension
re-applies its Loras at the next generation) and the cross-attention optimisations (undone for training, as the
web UI's own textual-inversion training does, and re-applied afterwards, also after an error or an interruption).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Iterator

import torch

from ..trust_engine.functional import DECODER_BLOCKS, checkpoint_blocks
from ..trust_engine.job import NATIVE_RESOLUTION
from ..trust_engine.parts import DiffusionParts, SoftTokens, TokenInput, hf_token_input, pack_extra, unpack_extra
from ..trust_engine.progress import ProgressEvent
from ..trust_engine.unet_view import UnknownArchitectureError, find_sites, site_weight, site_weights, weight_path

NETWORK_ATTRS = ("network_layer_name", "network_current_names", "network_weights_backup", "network_bias_backup")


class HostModelError(ValueError):
    """The loaded checkpoint or the web UI's mode cannot be used for training (with what to do instead)."""


class Interrupted(Exception):
    """The user pressed Interrupt (or /sdapi/v1/interrupt was called): nothing is saved."""


def model_family(sd_model, cmd_opts=None) -> str:
    """'SD1.x', 'SD2.x' or 'SDXL' for the web UI's loaded model; a clear refusal for anything the engine cannot
    train on here."""
    if sd_model is None:
        raise HostModelError("no checkpoint is loaded: choose one in the Stable Diffusion checkpoint list")
    if hasattr(sd_model, "forge_objects"):
        raise HostModelError("training on Forge is not supported in this version: train in AUTOMATIC1111 or "
                             "ComfyUI; the resulting <lora:...> file applies in Forge")
    if cmd_opts is not None and (getattr(cmd_opts, "lowvram", False) or getattr(cmd_opts, "medvram", False)):
        raise HostModelError("TRuST cannot train with --lowvram/--medvram (the UNet is moved piece by piece): "
                             "restart the web UI without them, lower 'resolution' instead")
    if getattr(sd_model, "lowvram", False):
        raise HostModelError("the model is loaded in low-VRAM mode; restart the web UI without --lowvram/--medvram")
    if getattr(sd_model, "is_sd3", False):
        raise HostModelError("this is a Stable Diffusion 3 checkpoint; TRuST unlearns SD1.x, SD2.x and SDXL "
                             "(cross-attention UNets)")
    if getattr(sd_model, "is_sdxl", False):
        family = "SDXL"
        if int(getattr(sd_model.model.diffusion_model, "adm_in_channels", 2816) or 0) == 2560:
            raise HostModelError("this is the SDXL refiner; TRuST unlearns SDXL base checkpoints")
    elif getattr(sd_model, "is_sd2", False):
        family = "SD2.x"
    elif getattr(sd_model, "is_sd1", False):
        family = "SD1.x"
    else:
        raise HostModelError(f"this checkpoint ({type(sd_model).__name__}) is not SD1.x, SD2.x or SDXL")
    unet = sd_model.model.diffusion_model
    channels = getattr(unet, "in_channels", 4)
    if channels != 4:
        raise HostModelError(f"this is an {family} {'inpainting ' if channels == 9 else ''}checkpoint ({channels} "
                             f"input channels); TRuST unlearns text-to-image checkpoints: load the non-inpainting one")
    return family


def check_unet_replacement(sd_unet_module) -> None:
    if sd_unet_module is not None and getattr(sd_unet_module, "current_unet", None) is not None:
        raise HostModelError("a UNet replacement (Settings: SD Unet, e.g. TensorRT) is active: set it to None or "
                             "Automatic for training")


def prediction_type(sd_model) -> str:
    return "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"


def scheduler_config(sd_model) -> dict:
    """A diffusers scheduler config of the model's own schedule: `alphas_cumprod_original` (the web UI may downcast
    or rescale `alphas_cumprod` for sampling; training uses the checkpoint's)."""
    alphas = getattr(sd_model, "alphas_cumprod_original", None)
    if alphas is None:
        alphas = sd_model.alphas_cumprod
    alphas = alphas.detach().double().cpu()
    previous = torch.cat([torch.ones(1, dtype=alphas.dtype), alphas[:-1]])
    betas = (1 - alphas / previous).clamp(0, 0.999)
    return {"num_train_timesteps": len(alphas), "trained_betas": betas.tolist(), "beta_schedule": "linear",
            "prediction_type": prediction_type(sd_model), "clip_sample": False, "set_alpha_to_one": False,
            "steps_offset": 1, "timestep_spacing": "leading"}


def restore_lora_patches(module: torch.nn.Module, networks=None) -> int:
    """Put the checkpoint's own weights back where the built-in Lora extension patched them in place, and mark those
    layers unpatched so the extension applies its Loras again at the next generation. Returns how many layers."""
    networks = networks if networks is not None else sys.modules.get("networks")
    restore = getattr(networks, "network_restore_weights_from_backup", None)
    count = 0
    for m in module.modules():
        if getattr(m, "network_weights_backup", None) is None and getattr(m, "network_bias_backup", None) is None:
            continue
        if getattr(m, "network_current_names", ()) == ():
            continue
        with torch.no_grad():
            if restore is not None:
                restore(m)
            else:
                if m.network_weights_backup is not None:
                    m.weight.copy_(m.network_weights_backup)
                if getattr(m, "network_bias_backup", None) is not None:
                    m.bias.copy_(m.network_bias_backup)
        m.network_current_names = ()
        count += 1
    return count


def private_tree(module: torch.nn.Module, replace: dict[int, object] | None = None) -> torch.nn.Module:
    """A copy of the module tree over the host's own tensors (frozen; no weight copied) without the Lora
    extension's per-layer state, so the extension never patches it. `replace`: objects of the tree to put in as
    they are given (deepcopy memo: id(old) -> new)."""
    memo: dict[int, object] = dict(replace or {})
    for p in module.parameters():
        memo.setdefault(id(p), torch.nn.Parameter(p.detach(), requires_grad=False))
    for b in module.buffers():
        memo.setdefault(id(b), b)
    for m in module.modules():
        for attr in ("network_weights_backup", "network_bias_backup"):
            value = getattr(m, attr, None)
            if value is not None:
                memo[id(value)] = None
    private = copy.deepcopy(module, memo)
    for m in private.modules():
        for attr in NETWORK_ATTRS:
            if attr in m.__dict__:
                delattr(m, attr)
    private.requires_grad_(False)
    for m in private.modules():  # not .eval(): ldm sets first_stage_model.train to a plain function that returns its
        m.training = False  # argument, so .eval() on it answers False instead of the module
    return private


@contextlib.contextmanager
def attention_for_training(sd_hijack, opts) -> Iterator[bool]:
    """Undo the web UI's cross-attention optimisations (xformers and friends have no double backward) unless the
    user asked to train with them (Settings: training_xattention_optimizations); re-apply them afterwards, always.
    Yields whether they were undone."""
    keep = bool(getattr(opts, "training_xattention_optimizations", False))
    if not keep:
        sd_hijack.undo_optimizations()
    try:
        yield not keep
    finally:
        if not keep:
            sd_hijack.apply_optimizations()


def effective_site_weights(sd_model) -> dict[str, torch.Tensor]:
    """Site name -> the checkpoint's Q/K/V weight (the Lora extension's patches taken off via its backups)."""
    unet = sd_model.model.diffusion_model
    out = {}
    for site in find_sites(unet):
        owner = unet.get_submodule(f"{_ldm_path(unet, site)}")
        backup = getattr(owner, "network_weights_backup", None)
        patched = getattr(owner, "network_current_names", ()) != ()
        weight = backup if (backup is not None and patched) else site_weight(unet, site)
        out[site.name] = weight.detach().to("cpu", copy=True)
    return out


def _ldm_path(unet, site) -> str:
    return weight_path(unet, site)


def put_delta(unet: torch.nn.Module, delta, strength: float = 1.0) -> int:
    """Make a private tree (`private_tree`, over the host's tensors) sample as base + strength x delta, by giving it
    new parameters where the delta changes something: the host's tensors are never written. Raises ValueError when
    the delta does not fit this UNet. Returns how many parameters were replaced."""
    from ..trust_engine.delta import BaseMismatchError
    from ..trust_engine.unet_params import parameter_map

    sites = {s.name: s for s in find_sites(unet, include_out=True)}
    try:
        new = delta.apply_to(site_weights(unet, list(sites.values())), strength)  # checks names and shapes first
    except (BaseMismatchError, KeyError) as e:
        raise HostModelError(f"this delta does not fit the loaded checkpoint's UNet: {e}") from None
    replace = {f"{weight_path(unet, sites[n])}.weight": w for n, w in new.items()}
    if delta.params:
        table, live = parameter_map(unet), dict(unet.named_parameters())
        for name, diff in delta.params.items():
            if name not in table or tuple(live[table[name]].shape) != tuple(diff.shape):
                raise HostModelError(f"this delta changes {name}, which the loaded checkpoint's UNet does not have "
                                     f"in that shape: it was made for another architecture")
            w = live[table[name]].detach()
            replace[table[name]] = (w.float() + strength * diff.to(w.device).float()).to(w.dtype)
    for path, tensor in replace.items():
        owner, _, attr = path.rpartition(".")
        setattr(unet.get_submodule(owner), attr, torch.nn.Parameter(tensor, requires_grad=False))
    return len(replace)


@contextlib.contextmanager
def a1111_parts(sd_model, modules, resolution: int = 0, need_decoder: bool = True) -> Iterator[DiffusionParts]:
    """DiffusionParts of the web UI's loaded model. `modules`: an object with the web UI modules used as attributes
    (shared, devices, prompt_parser, sd_hijack), so tests can hand in fakes."""
    shared, devices, prompt_parser = modules.shared, modules.devices, modules.prompt_parser
    family = model_family(sd_model, shared.cmd_opts)
    size = resolution or NATIVE_RESOLUTION[family]
    if size % 8:
        raise HostModelError(f"resolution must be a multiple of 8, got {size}")
    restore_lora_patches(sd_model)
    host_unet = sd_model.model.diffusion_model
    unet = private_tree(host_unet)
    try:
        find_sites(unet)
    except UnknownArchitectureError as e:
        raise HostModelError(str(e)) from None
    decoder = None
    if need_decoder:
        decoder = private_tree(sd_model.first_stage_model)
        checkpoint_blocks(decoder, lambda m: type(m).__name__ in DECODER_BLOCKS)
    p = next(unet.parameters())
    device, dtype = p.device, p.dtype
    sdxl = family == "SDXL"
    cache: dict[str, torch.Tensor] = {}
    adm_width = int(getattr(host_unet, "adm_in_channels", 0) or 0) if sdxl else 0

    def encode_one(prompt: str) -> torch.Tensor:
        if prompt not in cache:
            batch = prompt_parser.SdConditioning([prompt], is_negative_prompt=prompt == "", width=size, height=size)
            with torch.no_grad(), devices.autocast():
                c = sd_model.get_learned_conditioning(batch)
            if sdxl:
                cond = c["crossattn"][:, :77].float()
                cond = torch.cat([cond, pack_extra(c["vector"].float(), cond.shape[-1])], dim=1)
            else:
                cond = c[:, :77].float()
            cache[prompt] = cond.to(device).clone()
        return cache[prompt]

    def encode_text(prompts: list[str]) -> torch.Tensor:
        return torch.cat([encode_one(p) for p in prompts]).to(dtype)

    def denoise(unet_call, latents, t, cond):
        extra = {}
        if sdxl:
            cond, extra["y"] = unpack_extra(cond, adm_width)
            extra["y"] = extra["y"].to(dtype)
        return unet_call(latents.to(dtype), t, context=cond.to(dtype), **extra)

    scale = float(sd_model.scale_factor)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        q = next(decoder.parameters())
        images = decoder.decode(latents.to(q.device, q.dtype) / scale)
        return ((images.float() + 1) / 2).clamp(0, 1).to(device)

    try:
        yield DiffusionParts(
            unet=unet, denoise=denoise, encode_text=encode_text, decode=decode,
            scheduler_config=scheduler_config(sd_model), latent_shape=(4, size // 8, size // 8),
            prediction_type=prediction_type(sd_model), device=device, dtype=dtype, name=f"AUTOMATIC1111 {family}",
            token_input=token_input(sd_model, family, shared.opts, device,
                                    lambda: unpack_extra(encode_one(""), adm_width)[1] if sdxl else None),
        )
    finally:
        unet = decoder = None
        cache.clear()
        devices.torch_gc()


def token_input(sd_model, family: str, opts, device, host_vector=None) -> TokenInput | None:
    """Text conditioning from token embeddings (soft-prompt attacks), on private trees of the web UI's text encoders
    (the host's tensors, frozen, without the Lora extension's per-layer state and the textual-inversion wrapper):
    SD1.x: the transformers CLIPTextModel (`cond_stage_model.wrapped.transformer`) with the clip skip setting
    (CLIP_stop_at_last_layers) as the web UI applies it. SD2.x: the OpenCLIP FrozenOpenCLIPEmbedder
    (`cond_stage_model.wrapped`, its `model.token_embedding`), its own layer (the web UI applies no clip skip there).
    SDXL: the conditioner's two text embedders (CLIP-L at its hidden layer, OpenCLIP-G at its layer with its pooled
    output), conds side by side; `table` is the two token-embedding tables side by side (a soft token is one row,
    split between the encoders) and the pooled output is followed by the size embeddings of `host_vector()` (the
    host's ADM vector of a prompt), packed onto the cond as `a1111_parts` packs it. Prompts are put into one
    77-token chunk as the web UI's hijack does (start, up to 75 tokens, end, padding). None where the model's text
    encoders are not of these kinds."""
    cond = getattr(sd_model, "cond_stage_model", None)
    if family == "SD1.x":
        inner = getattr(cond, "wrapped", cond)
        encoder, tokenizer = getattr(inner, "transformer", None), getattr(inner, "tokenizer", None)
        if tokenizer is None or not hasattr(encoder, "get_input_embeddings"):
            return None
        skip = int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1)
        return hf_token_input(encoder, tokenizer, device, None if skip <= 1 else -skip, tree=private_tree)
    if family == "SD2.x":
        embedders = [cond]
    else:
        conditioner = getattr(sd_model, "conditioner", None)
        embedders = [e for e in getattr(conditioner, "embedders", []) if getattr(e, "input_key", None) == "txt"]
        if host_vector is None or len(embedders) != 2:
            return None
    texts = [_WebUIText(e, device) for e in embedders]
    if not all(t.ok for t in texts):
        return None
    if len({t.table.shape[0] for t in texts}) != 1 or len({(t.id_start, t.id_end) for t in texts}) != 1:
        return None  # a soft token must be one vocabulary row for every encoder
    table = torch.cat([t.table for t in texts], dim=1)
    widths = [t.table.shape[1] for t in texts]
    first = texts[0]
    tail: list[torch.Tensor] = []

    def encode(prompt: str, soft: torch.Tensor) -> torch.Tensor:
        zs, pooled, start = [], None, 0
        for text, width in zip(texts, widths):
            z, p = text.encode(prompt, soft[:, start:start + width])
            start += width
            zs.append(z)
            pooled = p if p is not None else pooled
        z = torch.cat(zs, dim=-1).float()
        if family == "SD2.x":
            return z
        if not tail:  # the size embeddings after the pooled output in the host's own ADM vector
            with torch.no_grad():
                tail.append(host_vector()[:, pooled.shape[-1]:].float().to(device))
        vector = torch.cat([pooled.float().to(device), tail[0]], dim=1)
        return torch.cat([z, pack_extra(vector, z.shape[-1])], dim=1)

    special = {first.id_start, first.id_end, *first.special}
    words = torch.tensor([i for i in range(table.shape[0]) if i not in special])
    return TokenInput(table=table, encode=encode, decode=first.decode, words=words,
                      tokenize=lambda text: [i for i in first.embedder.tokenize([text])[0] if i not in special])


class _WebUIText:
    """One of the web UI's hijacked text embedders (FrozenCLIPEmbedderForSDXLWithCustomWords,
    FrozenOpenCLIPEmbedder[2]WithCustomWords) on a private tree of what it wraps, fed soft rows after the start
    token: `encode(prompt, soft)` -> (z, pooled or None), as the embedder's encode_with_transformers gives them."""

    def __init__(self, embedder, device) -> None:
        self.embedder, self.device, self.ok = embedder, device, False
        wrapped = getattr(embedder, "wrapped", None)
        if hasattr(wrapped, "transformer") and hasattr(wrapped.transformer, "get_input_embeddings"):
            self.kind, host = "clip", wrapped.transformer.get_input_embeddings()
        elif hasattr(getattr(wrapped, "model", None), "token_embedding"):
            self.kind, host = "open_clip", wrapped.model.token_embedding
        else:
            return
        if not all(hasattr(embedder, a) for a in ("tokenize", "id_start", "id_end", "id_pad")):
            return
        base = getattr(host, "wrapped", host)  # the textual-inversion wrapper (EmbeddingsWithFixes) is left out
        self.soft_layer = SoftTokens(private_tree(base))
        tokenizer = getattr(wrapped, "tokenizer", None)
        keep = {id(tokenizer): tokenizer} if tokenizer is not None else {}  # shared, not copied
        self.private = private_tree(wrapped, {**keep, id(host): self.soft_layer})
        self.table = self.soft_layer.embedding.weight.detach()
        self.id_start, self.id_end, self.id_pad = embedder.id_start, embedder.id_end, embedder.id_pad
        self.length = int(getattr(embedder, "chunk_length", 75))
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.ok = True

    def ids(self, prompt: str, k: int) -> torch.Tensor:
        """The web UI's chunk of the prompt (tokenize_line, process_tokens) with k placeholders after the start
        token: start, up to 75 - k tokens, end, then end tokens to 77, those after the first end set to the pad id."""
        if k > self.length:
            raise ValueError(f"{k} soft tokens do not fit the web UI's {self.length}-token chunk")
        tokens = list(self.embedder.tokenize([prompt])[0])[: self.length - k]
        ids = [self.id_start] * (1 + k) + tokens + [self.id_end]
        ids += [self.id_pad if self.id_end != self.id_pad else self.id_end] * (self.length + 2 - len(ids))
        return torch.tensor([ids], device=self.device)

    def encode(self, prompt: str, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = self.ids(prompt, soft.shape[0])
        private = self.private
        self.soft_layer.soft = soft
        try:
            if self.kind == "clip":  # FrozenCLIPEmbedderForSDXLWithCustomWords.encode_with_transformers
                out = private.transformer(input_ids=ids, output_hidden_states=private.layer == "hidden")
                z = out.last_hidden_state if private.layer == "last" else out.hidden_states[private.layer_idx]
                return z, None
            out = private.encode_with_transformer(ids)
            if isinstance(out, dict):  # sgm's FrozenOpenCLIPEmbedder2 (SDXL): the layer and the pooled output
                return out[private.layer], out.get("pooled")
            return out, None
        finally:
            self.soft_layer.soft = None

    def decode(self, ids: list[int]) -> str:
        tokenizer = getattr(self.private, "tokenizer", None)
        if tokenizer is not None:
            return tokenizer.decode(ids, skip_special_tokens=True).strip()
        import open_clip.tokenizer  # the tokenizer the web UI's OpenCLIP hijack uses (modules/sd_hijack_open_clip.py)

        return open_clip.tokenizer._tokenizer.decode([i for i in ids if i not in (self.id_start, self.id_end)]).strip()


class HostProgress:
    """The engine's progress callback for the web UI: shared.state's job/step/textinfo (the UI's own progress bar
    and /sdapi/v1/progress), a record of the curves, and interruption (Interrupt / /sdapi/v1/interrupt)."""

    # the curves are redrawn at most this often (seconds) while training; the last step always draws
    CURVES_EVERY = 1.0

    def __init__(self, state, prepare: int, steps: int, title: str = "", by_stage: bool = False,
                 job: str = "TRuST unlearning", label: str = "TRuST") -> None:
        """TRuST: `prepare` generated images, then `steps` steps on one bar. `by_stage` (jobs whose stages each
        report their own totals: the other methods, the attacks): the bar shows the current stage's share done, out
        of 100. `label` starts the progress text (the method)."""
        self.state, self.prepare, self.title, self.by_stage, self.label = state, prepare, title, by_stage, label
        self.total = 100 if by_stage else prepare + steps
        self.history: list[dict] = []
        self.drawn_at = 0.0
        state.job = job
        state.job_count = 1
        state.job_no = 0
        state.sampling_steps = self.total
        state.sampling_step = 0

    def __call__(self, event: ProgressEvent) -> None:
        if self.state.interrupted or getattr(self.state, "stopping_generation", False):
            raise Interrupted("interrupted: nothing was saved and the model is unchanged")
        if self.by_stage:
            done = round(100 * min(event.step, event.total) / max(1, event.total))
        else:
            done = min(event.step, self.prepare) if event.stage == "prepare" else self.prepare + event.step
        self.state.sampling_step = done
        self.state.textinfo = f"{self.label} {event.stage} {event.step}/{event.total}: {event.message}".strip()
        # the curves are the training steps' (other stages' metrics, e.g. SalUn's mask loss, count other steps)
        if event.stage == "unlearn" and event.metrics:
            self.history.append({"step": event.step, **event.metrics})
            self.draw_curves(force=event.finished)

    def draw_curves(self, force: bool = False) -> None:
        """The loss / forget-score curves so far as the web UI's live preview (state.assign_current_image): the tab
        shows it over its curves image and /sdapi/v1/progress returns it as current_image."""
        now = time.monotonic()
        if not hasattr(self.state, "assign_current_image") or (not force and now - self.drawn_at < self.CURVES_EVERY):
            return
        from PIL import Image

        from ..trust_engine.render import training_curves

        self.drawn_at = now
        self.state.assign_current_image(Image.fromarray(training_curves(self.history, self.title)))
