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
from tiny_diffusers import LdmCallUNet


class A1111StyleUNet(LdmCallUNet, UNet2DConditionModel):
    """The testbed UNet behind ldm's UNetModel call signature. For SDXL, `y` is sgm's ADM vector (pooled text + size
    embeddings, `GeneralConditioner`'s "vector"), which the UNet's label embedding (diffusers: add_embedding) takes as
    it is."""

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        return self.ldm_call(x, timesteps, context, y)


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


# --- SD2.x (OpenCLIP) and SDXL (sgm's conditioner with two text embedders), as the web UI's hijack leaves them ----
# Small random text towers at toy width over the testbed's vocabulary; 77 positions (the web UI's chunk length).

CONTEXT = 77


class OpenCLIPTokenizer:
    """open_clip.tokenizer.SimpleTokenizer's calls the web UI makes (encode: ids without start / end, decode, encoder,
    all_special_ids), over the testbed's vocabulary."""

    def __init__(self, tokenizer):
        self.hf = tokenizer
        self.encoder = {"<start_of_text>": tokenizer.bos_token_id, "<end_of_text>": tokenizer.eos_token_id}
        self.all_special_ids = [tokenizer.bos_token_id, tokenizer.eos_token_id]

    def encode(self, text):
        return self.hf(text, add_special_tokens=False).input_ids

    def decode(self, tokens):
        return self.hf.decode(tokens) + " "  # SimpleTokenizer ends each word with a space ('</w>' -> ' ')


@contextlib.contextmanager
def open_clip_installed(tokenizer):
    """A fake `open_clip` package whose `tokenizer._tokenizer` is `tokenizer`, where the web UI imports it."""
    package, module = types.ModuleType("open_clip"), types.ModuleType("open_clip.tokenizer")
    module._tokenizer = tokenizer
    package.tokenizer = module
    previous = {n: sys.modules.get(n) for n in ("open_clip", "open_clip.tokenizer")}
    sys.modules.update({"open_clip": package, "open_clip.tokenizer": module})
    try:
        yield tokenizer
    finally:
        for name, value in previous.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


class _ResidualAttentionBlock(torch.nn.Module):
    """open_clip's ResidualAttentionBlock (sequence-first: L x N x D)."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(torch.nn.Module):
    """The text side of an open_clip CLIP (its visual tower deleted, as the embedders do)."""

    def __init__(self, vocab, width, layers=2, heads=2, projection=24):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.positional_embedding = torch.nn.Parameter(0.01 * torch.randn(CONTEXT, width))
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList(_ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.transformer.grad_checkpointing = False
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(width ** -0.5 * torch.randn(width, projection))
        self.register_buffer("attn_mask", torch.full((CONTEXT, CONTEXT), float("-inf")).triu_(1), persistent=False)

    def embed(self, text):
        return (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)  # NLD -> LND


class FrozenOpenCLIPEmbedder(torch.nn.Module):
    """ldm's FrozenOpenCLIPEmbedder (SD2.x): the blocks up to `layer_idx` from the end, then ln_final."""

    def __init__(self, model, layer="penultimate"):
        super().__init__()
        self.model, self.layer = model, layer
        self.layer_idx = 0 if layer == "last" else 1

    def encode_with_transformer(self, text):
        x = self.model.embed(text)
        blocks = self.model.transformer.resblocks
        for block in list(blocks)[: len(blocks) - self.layer_idx]:
            x = block(x, attn_mask=self.model.attn_mask)
        return self.model.ln_final(x.permute(1, 0, 2))


class FrozenOpenCLIPEmbedder2(torch.nn.Module):
    """sgm's FrozenOpenCLIPEmbedder2 (SDXL's OpenCLIP-G, legacy=False, always_return_pooled): {"penultimate": the
    input of the last block, "last": its output, "pooled": ln_final(last) at the end token @ text_projection}. OpenCLIP
    finds the end token as the highest id of its vocabulary; the testbed vocabulary's end token is id 1, so the fake
    finds it by value."""

    def __init__(self, model, end_token):
        super().__init__()
        self.model, self.layer, self.layer_idx, self.end_token = model, "penultimate", 1, end_token
        self.return_pooled, self.legacy = True, False

    def encode_with_transformer(self, text):
        x = self.model.embed(text)
        out = {}
        for i, block in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - 1:
                out["penultimate"] = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        out["last"] = x.permute(1, 0, 2)
        last = self.model.ln_final(out["last"])
        end = (text == self.end_token).int().argmax(dim=-1)
        out["pooled"] = last[torch.arange(last.shape[0]), end] @ self.model.text_projection
        return out


class FrozenCLIPEmbedder(torch.nn.Module):
    """sgm's FrozenCLIPEmbedder as SDXL configures it (CLIP-L, layer "hidden" at index layers - 1: the penultimate)."""

    def __init__(self, tokenizer, transformer):
        super().__init__()
        self.tokenizer, self.transformer = tokenizer, transformer
        self.layer, self.layer_idx = "hidden", transformer.config.num_hidden_layers - 1
        self.return_pooled = False


class EmbeddingsWithFixes(torch.nn.Module):
    """The web UI's textual-inversion wrapper of a token-embedding layer (no embeddings used here)."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class _CustomWords(torch.nn.Module):
    """sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase for prompts of one chunk without emphasis or textual
    inversion: start, up to 75 tokens, end tokens to 77, those after the first end set to the pad id; encoded by
    encode_with_transformers; (z, pooled) when the wrapped embedder returns its pooled output. (The default
    "Original" emphasis with all multipliers 1 leaves z as it is.)"""

    chunk_length = 75

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.input_key = "txt"

    def forward(self, texts):
        rows = []
        for text in texts:
            tokens = list(self.tokenize([text])[0])[: self.chunk_length]
            ids = [self.id_start] + tokens + [self.id_end] * (self.chunk_length + 1 - len(tokens))
            end = ids.index(self.id_end)
            rows.append(ids[: end + 1] + [self.id_pad] * (len(ids) - end - 1))
        z = self.encode_with_transformers(torch.tensor(rows))
        return (z, z.pooled) if getattr(self.wrapped, "return_pooled", False) else z


class FrozenOpenCLIPEmbedderWithCustomWords(_CustomWords):
    def __init__(self, wrapped, tokenizer):
        super().__init__(wrapped)
        self.open_clip = tokenizer
        self.id_start, self.id_end = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [self.open_clip.encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        return self.wrapped.encode_with_transformer(tokens)


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenOpenCLIPEmbedderWithCustomWords):
    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        z.pooled = d["pooled"]
        return z


class FrozenCLIPEmbedderForSDXLWithCustomWords(_CustomWords):
    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.id_start, self.id_end = wrapped.tokenizer.bos_token_id, wrapped.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        out = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
        return out.last_hidden_state if self.wrapped.layer == "last" else out.hidden_states[self.wrapped.layer_idx]


class ConcatTimestepEmbedderND(torch.nn.Module):
    """sgm's size embedder: the sinusoidal embedding (cos, sin) of each value, concatenated."""

    def __init__(self, outdim, input_key):
        super().__init__()
        self.outdim, self.input_key = outdim, input_key

    def forward(self, x):
        from diffusers.models.embeddings import get_timestep_embedding

        b, d = x.shape
        emb = get_timestep_embedding(x.flatten(), self.outdim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return emb.reshape(b, d * self.outdim)


class GeneralConditioner(torch.nn.Module):
    """sgm's GeneralConditioner: each embedder on its input key; 3-d outputs concatenated on the channels
    ("crossattn"), 2-d ones side by side ("vector"); embedders of `force_zero_embeddings` keys give zeros."""

    def __init__(self, embedders):
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)

    def forward(self, batch, force_zero_embeddings=()):
        out = {}
        for embedder in self.embedders:
            with torch.no_grad():
                emb_out = embedder(batch[embedder.input_key])
            for emb in emb_out if isinstance(emb_out, tuple | list) else [emb_out]:
                key = {2: "vector", 3: "crossattn"}[emb.dim()]
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                out[key] = torch.cat((out[key], emb), {"vector": 1, "crossattn": 2}[key]) if key in out else emb
        return out


def _hf_clip(tokenizer, width, layers=2):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                       num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=CONTEXT,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, hidden_act="gelu"))


class _Model(torch.nn.Module):
    """What shared.sd_model is (the parts the extension reads), around a UNet, a VAE and a schedule."""

    def __init__(self, unet, vae, scheduler, parameterization):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.first_stage_model = FirstStage(vae)
        self.scale_factor = float(vae.config.scaling_factor)
        self.alphas_cumprod = scheduler.alphas_cumprod.clone().float()
        self.parameterization = parameterization
        self.is_sd1 = self.is_sd2 = self.is_sdxl = False
        self.lowvram = False


class SD2Model(_Model):
    """An SD2.x LatentDiffusion after the hijack: cond_stage_model = FrozenOpenCLIPEmbedderWithCustomWords around
    ldm's FrozenOpenCLIPEmbedder (penultimate layer), v-prediction."""

    def __init__(self, unet, vae, scheduler, tokenizer):
        super().__init__(unet, vae, scheduler, "v")
        text = OpenCLIPText(len(tokenizer.hf), unet.config.cross_attention_dim)
        text.token_embedding = EmbeddingsWithFixes(text.token_embedding)
        self.cond_stage_model = FrozenOpenCLIPEmbedderWithCustomWords(FrozenOpenCLIPEmbedder(text), tokenizer)
        self.is_sd2 = True

    def get_learned_conditioning(self, batch):
        return self.cond_stage_model(batch)


class SDXLModel(_Model):
    """An sgm DiffusionEngine (SDXL base) after the hijack: conditioner.embedders = CLIP-L (hidden), OpenCLIP-G
    (penultimate, pooled) and the three size embedders; cond_stage_model = the conditioner;
    get_learned_conditioning as sd_models_xl builds its batch (sizes from the SdConditioning, crop 0, zeros for an
    empty negative prompt)."""

    def __init__(self, unet, vae, scheduler, tokenizer, width_l=16):
        super().__init__(unet, vae, scheduler, "eps")
        clip_l = _hf_clip(tokenizer.hf, width_l)
        clip_l.set_input_embeddings(EmbeddingsWithFixes(clip_l.get_input_embeddings()))
        width_g = unet.config.cross_attention_dim - width_l
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        text_g = OpenCLIPText(len(tokenizer.hf), width_g, projection=pooled)
        text_g.token_embedding = EmbeddingsWithFixes(text_g.token_embedding)
        outdim = unet.config.addition_time_embed_dim
        self.conditioner = GeneralConditioner([
            FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedder(tokenizer.hf, clip_l)),
            FrozenOpenCLIPEmbedder2WithCustomWords(FrozenOpenCLIPEmbedder2(text_g, tokenizer.hf.eos_token_id), tokenizer),
            ConcatTimestepEmbedderND(outdim, "original_size_as_tuple"),
            ConcatTimestepEmbedderND(outdim, "crop_coords_top_left"),
            ConcatTimestepEmbedderND(outdim, "target_size_as_tuple")])
        self.cond_stage_model = self.conditioner
        unet.adm_in_channels = unet.config.projection_class_embeddings_input_dim
        self.is_sdxl = True

    def get_learned_conditioning(self, batch):
        width, height = getattr(batch, "width", 1024), getattr(batch, "height", 1024)
        n = len(batch)
        conds = {"txt": batch, "original_size_as_tuple": torch.tensor([height, width]).repeat(n, 1),
                 "crop_coords_top_left": torch.tensor([0, 0]).repeat(n, 1),
                 "target_size_as_tuple": torch.tensor([height, width]).repeat(n, 1)}
        zero = getattr(batch, "is_negative_prompt", False) and all(x == "" for x in batch)
        return self.conditioner(conds, force_zero_embeddings=["txt"] if zero else [])


def family_modules(family: str, lora_dir: str, seed: int = 0) -> types.SimpleNamespace:
    """Fake web UI modules around a small random SD2.x or SDXL model (make_modules' namespace, no checkpoint file);
    `.open_clip` is the OpenCLIP tokenizer to install (open_clip_installed) while the model is used."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    from tiny_diffusers import SDXL_UNET, _tokenizer, _vae

    torch.manual_seed(seed)
    tokenizer = OpenCLIPTokenizer(_tokenizer())
    if family == "SD2.x":
        unet = A1111StyleUNet(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                              layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                              attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type="v_prediction")
        sd_model = SD2Model(unet, _vae(), scheduler, tokenizer)
    else:
        unet = A1111StyleUNet(**SDXL_UNET)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        sd_model = SDXLModel(unet, _vae(), scheduler, tokenizer)
    sd_model = sd_model.eval().requires_grad_(False)
    shared = types.SimpleNamespace(
        sd_model=sd_model, state=State(), opts=types.SimpleNamespace(training_xattention_optimizations=False),
        cmd_opts=types.SimpleNamespace(lowvram=False, medvram=False, lora_dir=lora_dir), models_path=lora_dir)
    devices = types.SimpleNamespace(autocast=contextlib.nullcontext, torch_gc=lambda: None, device=torch.device("cpu"),
                                    dtype=torch.float32)
    return types.SimpleNamespace(shared=shared, devices=devices,
                                 prompt_parser=types.SimpleNamespace(SdConditioning=SdConditioning),
                                 sd_hijack=SdHijack(), sd_unet=types.SimpleNamespace(current_unet=None),
                                 networks=Networks(), open_clip=tokenizer)


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
