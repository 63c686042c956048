"""Test-only ComfyUI nodes for the tier-2 tests (never shipped): read a MODEL's effective weights and compare two
MODELs, save them for the test process, and inject a failure into the next TRuST run. Loaded beside the pack by the
tier-2 server."""

import hashlib
import sys

import torch


class AnyType(str):
    """Matches every socket type (ComfyUI compares types with !=)."""

    def __ne__(self, other):
        return False


ANY = AnyType("*")


def effective_weights(model) -> dict:
    """The UNet weights this MODEL samples with (its patches applied), copied to the CPU."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.model.diffusion_model.state_dict().items()}


class TrustProbeWeights:
    CATEGORY = "testing/trust"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "probe"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": ""})},
                "optional": {"reference": ("MODEL",), "after": (ANY,)}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # always measure

    def probe(self, model, label, reference=None, after=None):
        weights = effective_weights(model)
        digest = hashlib.sha256()
        for key in sorted(weights):
            digest.update(key.encode())
            digest.update(weights[key].contiguous().view(torch.uint8).numpy().tobytes())
        ui = {"label": [label], "digest": [digest.hexdigest()]}
        if reference is not None:
            other = effective_weights(reference)
            changed = [k for k in sorted(weights) if not torch.equal(weights[k], other[k])]
            ui["changed"] = changed
            ui["max_abs_diff"] = [max((float((weights[k].float() - other[k].float()).abs().max()) for k in changed),
                                      default=0.0)]
        return {"ui": ui}


class TrustProbeSaveWeights:
    """Writes the UNet weights a MODEL samples with (ComfyUI's patches applied, in the model's own dtype) to
    <output directory>/<file_name>.safetensors, for the test process to compare with the engine's reading of a
    delta file."""

    CATEGORY = "testing/trust"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "file_name": ("STRING", {"default": ""})},
                "optional": {"after": (ANY,)}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def save(self, model, file_name, after=None):
        import os

        import folder_paths
        from safetensors.torch import save_file

        path = os.path.join(folder_paths.get_output_directory(), file_name + ".safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.contiguous() for k, v in effective_weights(model).items()}, path)
        return {"ui": {"saved": [path]}}


class TrustProbeFailNextRun:
    """Makes the pack's next unlearning run raise at its second optimizer step (then restores the engine)."""

    CATEGORY = "testing/trust"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "arm"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"armed": ("BOOLEAN", {"default": True})}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def arm(self, armed):
        engine = next(m for name, m in sys.modules.items() if name.endswith(".trust_engine.unlearn"))
        original = engine.MaskedAdam.step
        calls = {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                engine.MaskedAdam.step = original
                raise RuntimeError("tier-2 injected failure in the middle of training")
            return original(*args, **kwargs)

        engine.MaskedAdam.step = failing
        return {"ui": {"armed": [True]}}


def _clip_digest(clip) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(clip.cond_stage_model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TrustProbeTokenInput:
    """The pack's token input (soft-prompt attacks) on this MODEL/CLIP/VAE: the largest difference between the cond of
    `words + prompt` and the token input's cond of `prompt` with the table rows of `words`, the gradient on each
    encoder's part of the soft rows, and whether the CLIP's weights stayed the same and got no gradient."""

    CATEGORY = "testing/trust"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "probe"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",),
                             "words": ("STRING", {"default": "a red"}),
                             "prompt": ("STRING", {"default": "circle on a blue square"})}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def probe(self, model, clip, vae, words, prompt):
        host = next(m for name, m in sys.modules.items() if name.endswith(".nodes.host") and hasattr(m, "comfy_parts"))
        before = _clip_digest(clip)
        with torch.inference_mode(False), host.comfy_parts(model, clip, vae, 64, need_decoder=False) as parts:
            tokens = parts.token_input
            if tokens is None:
                return {"ui": {"token_input": [False]}}
            ids = tokens.tokenize(words)
            with torch.no_grad():
                ours = tokens.encode(prompt, tokens.table[ids]).float()
                theirs = parts.encode_text([f"{words} {prompt}"]).float()
            soft = tokens.table[ids].clone().float().requires_grad_(True)
            tokens.encode(prompt, soft).float().square().sum().backward()
            grads, start = [], 0  # the gradient on each text encoder's part of the soft rows
            for _, attr, _ in host._text_encoders(clip.cond_stage_model, clip.tokenizer):
                width = getattr(clip.cond_stage_model, attr).transformer.get_input_embeddings().weight.shape[1]
                grads.append(float(soft.grad[:, start:start + width].abs().sum()))
                start += width
        no_grad = all(p.grad is None for p in clip.cond_stage_model.parameters())
        return {"ui": {"token_input": [True], "table": list(tokens.table.shape), "shape": list(ours.shape),
                       "max_abs_diff": [float((ours - theirs).abs().max())] if ours.shape == theirs.shape else [-1.0],
                       "equal": [bool(torch.equal(ours, theirs))], "grads": grads,
                       "clip_unchanged": [_clip_digest(clip) == before and no_grad]}}


NODE_CLASS_MAPPINGS = {"TrustProbeWeights": TrustProbeWeights, "TrustProbeSaveWeights": TrustProbeSaveWeights,
                       "TrustProbeFailNextRun": TrustProbeFailNextRun, "TrustProbeTokenInput": TrustProbeTokenInput}
