"""What the engine needs from a host's model, host-agnostic: the UNet (never written), a text encoder, a
differentiable VAE decode, the noise schedule, and optionally an aligner (a CLIP with both towers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn


@dataclasses.dataclass
class DiffusionParts:
    """A text-to-image latent diffusion model as the engine sees it. Hosts build one; nothing here is mutated.

    `denoise(unet_call, latents, t, cond)` runs the UNet through `unet_call` (the engine passes a functional
    call that swaps in base + delta weights); it returns the model output of `prediction_type`.
    """

    unet: nn.Module
    denoise: Callable[[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    encode_text: Callable[[list[str]], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]  # scaled latents -> images in [0, 1], differentiable
    scheduler_config: dict  # a diffusers scheduler config of the model's own noise schedule
    latent_shape: tuple[int, int, int]
    prediction_type: str = "epsilon"  # or "v_prediction" (SD2.x 768)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    name: str = "model"
    check_prompt: Callable[[str], None] | None = None  # raises a clear error for prompts the model cannot read
    # text conditioning from token embeddings, differentiable (soft-prompt attacks); None where a host cannot give it
    token_input: TokenInput | None = None

    def ddim(self, steps: int):
        """A fresh diffusers DDIMScheduler on the model's schedule, set to `steps` sampling steps. It is told the
        model's own prediction type, and callers hand it the model's native output (`guided_output`): converting v to
        eps first would divide by sqrt(alpha_bar), which is 0 at the last step of a zero-terminal-SNR schedule."""
        from diffusers import DDIMScheduler

        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        config["prediction_type"] = self.prediction_type
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        return scheduler

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        if not hasattr(self, "_alphas"):
            from diffusers import DDPMScheduler

            config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
            self._alphas = DDPMScheduler.from_config(config).alphas_cumprod.clone()
        return self._alphas

    def _alpha_sigma(self, latents: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast over a batch of latents (float32)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long().reshape(-1)
        a = self.alphas_cumprod[t].to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def eps_from_output(self, output: torch.Tensor, latents: torch.Tensor, t) -> torch.Tensor:
        """Noise prediction from the model output, whatever the model's prediction type (defined at every t)."""
        self._check_prediction_type()
        if self.prediction_type == "epsilon":
            return output
        alpha, sigma = self._alpha_sigma(latents, t)
        return alpha * output + sigma * latents.to(output.dtype)

    def x0_from_output(self, output: torch.Tensor, latents: torch.Tensor, t) -> torch.Tensor:
        """Clean-latent prediction from the model output. For v-prediction it never divides by sqrt(alpha_bar),
        so it stays finite on zero-terminal-SNR schedules."""
        self._check_prediction_type()
        alpha, sigma = self._alpha_sigma(latents, t)
        x = latents.to(output.dtype)
        if self.prediction_type == "epsilon":
            return (x - sigma * output) / alpha
        return alpha * x - sigma * output

    def _check_prediction_type(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r} (epsilon or v_prediction)")


@dataclasses.dataclass
class TokenInput:
    """The text encoder fed token embeddings instead of words: `encode(prompt, soft)` is the cond of `prompt` with the
    k rows of `soft` (k x width of `table`) inserted right after the start token, differentiable in `soft`. With
    `soft = table[ids]` it is the cond of the words of `ids` followed by the prompt (what `encode_text` gives).
    `table` is the encoder's token-embedding matrix (read only), `words` the ids a prompt may use (no special
    tokens) and `decode(ids)` their text."""

    table: torch.Tensor  # vocabulary x width
    encode: Callable[[str, torch.Tensor], torch.Tensor]
    decode: Callable[[list[int]], str]
    words: torch.Tensor  # ids of ordinary tokens
    tokenize: Callable[[str], list[int]]  # a text's token ids, without start / end / padding


class SoftTokens(nn.Module):
    """Stands in for a private text-encoder copy's token-embedding layer: the host layer's output with rows 1..k
    replaced by `soft` while one is set (the ids there are placeholders)."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.soft: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.embedding(ids, *args, **kwargs)
        if self.soft is None:
            return out
        k = self.soft.shape[0]
        soft = self.soft.to(out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
        return torch.cat([out[:, :1], soft, out[:, 1 + k:]], dim=1)


def _soft_copy(encoder: nn.Module, tree=None) -> tuple[nn.Module, SoftTokens]:
    """A private module tree of a transformers text encoder (the host's tensors, frozen; the host's modules are not
    changed) whose token-embedding layer is a `SoftTokens` over a private copy of the host's layer. `tree(module,
    memo)` makes the private tree (default `private_tree_with`; a host may strip its own per-layer state)."""
    from .functional import private_tree

    host_embedding = encoder.get_input_embeddings()
    # AUTOMATIC1111 wraps the layer (EmbeddingsWithFixes, textual inversion) and keeps the original as `.wrapped`
    base = getattr(host_embedding, "wrapped", host_embedding)
    soft_layer = SoftTokens(private_tree(base))
    return (tree or private_tree_with)(encoder, {id(host_embedding): soft_layer}), soft_layer


def _ids_with_room(tokenizer, prompt: str, k: int) -> torch.Tensor:
    """1 x model_max_length ids of `prompt` as the host tokenizes it (padded, truncated) with k placeholders (the
    start token) right after the start token: the prompt is truncated to leave them room, so the end token stays, as
    when the host tokenizes the k words followed by the prompt."""
    length = tokenizer.model_max_length
    if k > length - 2:
        raise ValueError(f"{k} soft tokens do not fit the text encoder's {length} positions (start and end included)")
    ids = tokenizer([prompt], padding="max_length", max_length=length - k, truncation=True,
                    return_tensors="pt").input_ids
    return torch.cat([ids[:, :1], ids[:, :1].expand(1, k), ids[:, 1:]], dim=1)


def _words_and_text(tokenizer, table: torch.Tensor, special: set[int]):
    """(ids of ordinary tokens, decode, tokenize) of a transformers tokenizer."""
    words = torch.tensor([i for i in range(table.shape[0]) if i not in special])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    def tokenize(text: str) -> list[int]:
        return [i for i in tokenizer(text).input_ids if i not in special]

    return words, decode, tokenize


def hf_token_input(encoder: nn.Module, tokenizer, device, hidden_layer: int | None = None, tree=None) -> TokenInput:
    """TokenInput of a transformers CLIP text encoder (diffusers' SD1.x/SD2.x pipelines, AUTOMATIC1111's SD1.x) over a
    private module tree (the host's tensors, frozen; the host's modules are not changed; `tree` as in `_soft_copy`).
    `hidden_layer` = -n takes the n-th hidden state from the end through the final layer norm (clip skip); None the
    last output."""
    private, soft_layer = _soft_copy(encoder, tree)
    table = soft_layer.embedding.weight.detach()
    special = set(getattr(tokenizer, "all_special_ids", []))

    def encode(prompt: str, soft: torch.Tensor) -> torch.Tensor:
        ids = _ids_with_room(tokenizer, prompt, soft.shape[0]).to(device)
        soft_layer.soft = soft
        try:
            if hidden_layer is None:
                return private(ids)[0]
            hidden = private(ids, output_hidden_states=True).hidden_states[hidden_layer]
            return getattr(private, "text_model", private).final_layer_norm(hidden)
        finally:
            soft_layer.soft = None

    words, decode, tokenize = _words_and_text(tokenizer, table, special)
    return TokenInput(table=table, encode=encode, decode=decode, words=words, tokenize=tokenize)


def sdxl_token_input(pipe, device, clip_skip: int | None, extra: Callable[[torch.Tensor], torch.Tensor]) -> \
        TokenInput | None:
    """TokenInput of a StableDiffusionXLPipeline's two text encoders, as its `encode_prompt` encodes a prompt: each
    encoder's penultimate hidden state (or the one `clip_skip` further back), side by side, and the second encoder's
    projected pooled output, which `extra(pooled)` turns into the vector `from_pipeline` packs onto the cond (pooled
    + time ids). `table` is the two token-embedding tables side by side (vocabulary x (D1 + D2)): a soft token is one
    row, split between the encoders. Private module trees over the pipeline's tensors; nothing of `pipe` is changed.
    None when the encoders do not share one vocabulary. The empty prompt with no soft tokens is encoded as text
    (`encode_text("")` is the pipeline's unconditional branch, zeros on SDXL base)."""
    pairs = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
             if e is not None and t is not None]
    if not pairs or pipe.text_encoder_2 is None:
        return None
    vocab = pairs[0][0].get_vocab()
    if any(t.get_vocab() != vocab or e.get_input_embeddings().weight.shape[0] !=
           pairs[0][1].get_input_embeddings().weight.shape[0] for t, e in pairs[1:]):
        return None
    copies = [(tokenizer, *_soft_copy(encoder)) for tokenizer, encoder in pairs]
    widths = [layer.embedding.weight.shape[1] for _, _, layer in copies]
    table = torch.cat([layer.embedding.weight.detach() for _, _, layer in copies], dim=1)
    layer = -(clip_skip + 2) if clip_skip else -2  # "2" because SDXL always indexes from the penultimate layer
    dtype = pipe.text_encoder_2.dtype

    def encode(prompt: str, soft: torch.Tensor) -> torch.Tensor:
        hidden, pooled, start = [], None, 0
        for (tokenizer, private, soft_layer), width in zip(copies, widths):
            ids = _ids_with_room(tokenizer, prompt, soft.shape[0]).to(device)
            soft_layer.soft = soft[:, start:start + width]
            start += width
            try:
                out = private(ids, output_hidden_states=True)
            finally:
                soft_layer.soft = None
            if pooled is None and out[0].ndim == 2:  # as the pipeline: the projected pooled output of the last encoder
                pooled = out[0]
            hidden.append(out.hidden_states[layer])
        embeds = torch.concat(hidden, dim=-1).to(device, dtype)
        vector = extra(pooled.to(device, embeds.dtype))
        return torch.cat([embeds, pack_extra(vector, embeds.shape[-1])], dim=1)

    tokenizer = pairs[0][0]
    special = {i for t, _ in pairs for i in getattr(t, "all_special_ids", [])}
    words, decode, tokenize = _words_and_text(tokenizer, table, special)
    return TokenInput(table=table, encode=encode, decode=decode, words=words, tokenize=tokenize)


def private_tree_with(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    """`functional.private_tree`, with some of the tree's objects replaced (deepcopy memo: id(old) -> new)."""
    import copy

    memo = dict(memo)
    for p in module.parameters():
        memo.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=False))
    for b in module.buffers():
        memo.setdefault(id(b), b)
    return copy.deepcopy(module, memo).requires_grad_(False).eval()


@dataclasses.dataclass
class Aligner:
    """A CLIP with both towers and its joint projection: scores how well images show a prompt."""

    model: nn.Module  # transformers CLIPModel
    tokenizer: object
    image_mean: list[float]
    image_std: list[float]
    image_size: int

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        # CLIP's text feature is the end-of-text token's: pooled here at the tokenizer's end token, as transformers
        # >= 4.31 does. transformers 4.30 (AUTOMATIC1111's pin) took the highest token id instead, which is the end
        # token only in vocabularies where it is the last one (the testbed aligner's is id 1).
        hidden = self.model.text_model(input_ids=ids)[0]
        end = (ids == self.tokenizer.eos_token_id).int().argmax(dim=-1)
        return self.model.text_projection(hidden[torch.arange(ids.shape[0], device=device), end])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: Bx3xHxW in [0, 1], differentiable."""
        p = next(self.model.parameters())
        x = images.to(p.device, p.dtype)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return features_of(self.model.get_image_features(pixel_values=(x - mean) / std))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """CLIP score per image: 100 * cosine(image, its prompt)."""
        image = nn.functional.normalize(self.image_features(images), dim=-1)
        text = nn.functional.normalize(self.text_features(prompts), dim=-1).to(image.dtype)
        return 100 * (image * text).sum(-1)


def features_of(out) -> torch.Tensor:
    """transformers 4.x returns a tensor, 5.x a model output whose pooler_output holds the projection."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def pack_extra(extra: torch.Tensor, width: int) -> torch.Tensor:
    """A per-sample conditioning vector (B x N) as zero-padded rows (B x ceil(N / width) x width) to append to a
    text cond (B x T x width). The engine passes one cond tensor around and indexes/concatenates it by batch, so
    SDXL's pooled text embeds and size ids travel as extra "tokens" and `denoise` takes them off again."""
    rows = math.ceil(extra.shape[1] / width)
    padded = extra.new_zeros(extra.shape[0], rows * width)
    padded[:, : extra.shape[1]] = extra
    return padded.view(extra.shape[0], rows, width)


def unpack_extra(cond: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_extra` on a packed cond: (text cond B x T x width, the B x size vector)."""
    rows = math.ceil(size / cond.shape[-1])
    return cond[:, :-rows], cond[:, -rows:].flatten(1)[:, :size]


def native_resolution(pipe) -> int:
    """The pipeline's own default image size: UNet sample size x VAE scale factor (SD1.x 512, SD2.x-768 768,
    SD2.x-base 512, SDXL 1024)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def _is_sdxl(pipe) -> bool:
    from diffusers import StableDiffusionXLPipeline

    return isinstance(pipe, StableDiffusionXLPipeline)


def _clip_skipped(pipe, prompt: str, clip_skip: int, device) -> torch.Tensor:
    """StableDiffusionPipeline.encode_prompt's clip_skip branch for transformers >= 5.6, whose flattened CLIPTextModel
    has no `.text_model` (diffusers issue #14124, fix pending in PR #14043): the same steps, with the fix's guard."""
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    inputs = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = inputs.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
    hidden = encoder(inputs.input_ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states
    embeds = getattr(encoder, "text_model", encoder).final_layer_norm(hidden[-(clip_skip + 1)])
    return embeds.to(dtype=encoder.dtype, device=device)


def from_pipeline(pipe, name: str = "diffusers pipeline", check_prompt=None, clip_skip: int | None = None,
                  resolution: int | None = None) -> DiffusionParts:
    """Parts of a diffusers StableDiffusionPipeline (SD1.x, SD2.x incl. v-prediction, the testbed) or
    StableDiffusionXLPipeline. Nothing of `pipe` is changed.

    Prompts are encoded by the pipeline's own `encode_prompt` (with `clip_skip`); the empty prompt "" is the engine's
    unconditional prompt, so it gets exactly what the pipeline feeds its unconditional branch when no negative prompt
    is given (for SDXL base: zeros, `force_zeros_for_empty_prompt`). For SDXL the pooled embeds and the pipeline's
    own time ids (`_get_add_time_ids`: original = target size = `resolution`, no crop) are packed onto the cond
    (`pack_extra`) and handed to the UNet as `added_cond_kwargs`. `resolution` defaults to `native_resolution`.
    """
    from diffusers import StableDiffusionPipeline

    from .functional import checkpointed_copy

    sdxl = _is_sdxl(pipe)
    if not (sdxl or isinstance(pipe, StableDiffusionPipeline)):
        raise ValueError(f"{type(pipe).__name__} is not supported: use a StableDiffusionPipeline (SD1.x, SD2.x) or a "
                         f"StableDiffusionXLPipeline (SDXL)")
    unet, vae = pipe.unet, pipe.vae
    if sdxl and unet.config.addition_embed_type != "text_time":
        raise ValueError(f"this SDXL pipeline's UNet has addition_embed_type {unet.config.addition_embed_type!r}; "
                         f"the engine supports SDXL's 'text_time' conditioning (pooled text embeds + size ids)")
    device, dtype = unet.device, unet.dtype
    size = resolution or native_resolution(pipe)
    factor = int(pipe.vae_scale_factor)
    if size % factor:
        raise ValueError(f"resolution must be a multiple of {factor} (the VAE's scale factor), got {size}")
    if clip_skip is not None and clip_skip < 0:
        raise ValueError(f"clip_skip must be 0 or more, got {clip_skip}")
    clip_skip = clip_skip or None  # 0 = no skip, as None
    cache: dict[str, torch.Tensor] = {}

    if sdxl:
        projection = int(pipe.text_encoder_2.config.projection_dim) if pipe.text_encoder_2 is not None else None

        def sdxl_extra(pooled: torch.Tensor) -> torch.Tensor:
            """The pooled embeds (B x P, on the device in the embeds' dtype) and the pipeline's time ids."""
            time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=pooled.dtype,
                                              text_encoder_projection_dim=projection or int(pooled.shape[-1]))
            return torch.cat([pooled, time_ids.to(device).expand(pooled.shape[0], -1)], dim=1)

        def encode_one(prompt: str) -> torch.Tensor:
            uncond = prompt == ""
            out = pipe.encode_prompt(prompt=[prompt], device=device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=uncond, negative_prompt=None, clip_skip=clip_skip)
            embeds, pooled = (out[1], out[3]) if uncond else (out[0], out[2])
            extra = sdxl_extra(pooled.to(device, embeds.dtype))
            return torch.cat([embeds, pack_extra(extra, embeds.shape[-1])], dim=1)
    else:
        def encode_one(prompt: str) -> torch.Tensor:
            if prompt == "":  # the pipeline's unconditional embedding (never clip-skipped by the pipeline)
                return pipe.encode_prompt([""], device, 1, True, negative_prompt=None)[1]
            try:
                return pipe.encode_prompt([prompt], device, 1, False, clip_skip=clip_skip)[0]
            except AttributeError:
                if clip_skip is None or hasattr(pipe.text_encoder, "text_model"):
                    raise
                return _clip_skipped(pipe, prompt, clip_skip, device)

    def encode_text(prompts: list[str]) -> torch.Tensor:
        for prompt in prompts:
            if prompt not in cache:
                with torch.no_grad():
                    cache[prompt] = encode_one(prompt).to(device, dtype)
        return torch.cat([cache[p] for p in prompts])

    scale = vae.config.scaling_factor
    # the saliency's decode is differentiable: a private copy whose blocks are checkpointed (pipe.vae is not touched)
    decoder = checkpointed_copy(vae)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        p = next(vae.parameters())
        z = latents.to(p.device, p.dtype)
        if sdxl and mean is not None and std is not None:  # as StableDiffusionXLPipeline un-normalises
            z = z * torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1) / scale \
                + torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        else:
            z = z / scale
        images = decoder.decode(z).sample
        return ((images + 1) / 2).clamp(0, 1)

    if sdxl:
        # text_embeds then the 6 time ids (original size, crop corner, target size), as encode_one packed them
        pooled_size = int(unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim)

        def denoise(unet_call, latents, t, cond):
            cond, extra = unpack_extra(cond, pooled_size + 6)
            added = {"text_embeds": extra[:, :pooled_size], "time_ids": extra[:, pooled_size:]}
            return unet_call(latents, t, encoder_hidden_states=cond, added_cond_kwargs=added, return_dict=False)[0]

    else:
        def denoise(unet_call, latents, t, cond):
            return unet_call(latents, t, encoder_hidden_states=cond, return_dict=False)[0]

    if sdxl:
        token_input = sdxl_token_input(pipe, device, clip_skip, sdxl_extra)
    else:
        token_input = hf_token_input(pipe.text_encoder, pipe.tokenizer, device,
                                     None if clip_skip is None else -(clip_skip + 1))
    return DiffusionParts(
        unet=unet, denoise=denoise, encode_text=encode_text, decode=decode,
        scheduler_config=dict(pipe.scheduler.config), latent_shape=(unet.config.in_channels, size // factor,
                                                                    size // factor),
        prediction_type=pipe.scheduler.config.prediction_type, device=device, dtype=dtype, name=name,
        check_prompt=check_prompt, token_input=token_input,
    )
