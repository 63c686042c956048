"""The engine and the CLI on a user's own diffusers folders: small random-init SD2-v and SDXL pipelines built here
(no download), conditioning exactly as the diffusers pipelines build it, and clear errors for unusable folders.
"""

import json

import pytest
import torch
from conftest import ROOT
from tiny_diffusers import build_sd2_v, build_sdxl

from trust_engine import loading
from trust_engine.__main__ import main
from trust_engine.delta import Delta, fingerprint
from trust_engine.parts import pack_extra, unpack_extra
from trust_engine.unet_view import find_sites, site_weights

ALIGNER = ROOT / "trust_engine" / "testbed" / "weights" / "aligner"
RES = "16"  # 8x8 latents: a few seconds per run on one thread


@pytest.fixture(scope="module")
def sd2v(tmp_path_factory):
    return build_sd2_v(tmp_path_factory.mktemp("sd2v") / "tiny-sd2-v")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def _cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*args, "--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def test_packed_cond_round_trips_through_batch_indexing():
    text = torch.randn(3, 5, 8)
    for size in (6, 8, 22):  # less than a row, exactly a row, several rows
        extra = torch.randn(3, size)
        packed = torch.cat([text, pack_extra(extra, 8)], dim=1)
        assert packed.shape == (3, 5 + -(-size // 8), 8)
        # the engine indexes and concatenates conds by batch; each sample must keep its own extra vector
        shuffled = torch.cat([packed[[2, 0]], packed[[1]]])
        cond, back = unpack_extra(shuffled, size)
        assert torch.equal(cond, text[[2, 0, 1]]) and torch.equal(back, extra[[2, 0, 1]])


def _unet_inputs(pipe, run):
    """The kwargs of every UNet forward during `run()` (a forward pre-hook on the pipeline's own UNet)."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def _parts_unet_inputs(parts, prompt):
    """What parts.denoise hands the UNet for a guided batch [unconditional, prompt], as the pipeline orders it."""
    seen = []

    def call(*args, **kwargs):
        seen.append(kwargs)
        return parts.unet(*args, **kwargs)

    cond = torch.cat([parts.encode_text([""]), parts.encode_text([prompt])])
    latents = torch.randn(2, *parts.latent_shape)
    parts.denoise(call, latents, torch.full((2,), 999, dtype=torch.long), cond)
    return seen[0]


def test_sdxl_denoise_passes_the_pipelines_own_embeddings_and_time_ids(sdxl):
    loaded = loading.load_model(sdxl, torch.device("cpu"), torch.float32, clip_skip=1, resolution=16)
    pipe, parts = loaded.pipe, loaded.parts
    assert parts.latent_shape == (4, 8, 8) and loaded.cfg == 5.0
    prompt = "a red circle on a blue square"
    theirs = _unet_inputs(pipe, lambda: pipe(prompt, height=16, width=16, num_inference_steps=1, guidance_scale=5.0,
                                             clip_skip=1, output_type="latent"))[0]
    ours = _parts_unet_inputs(parts, prompt)
    assert torch.equal(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    for key in ("text_embeds", "time_ids"):
        assert torch.equal(ours["added_cond_kwargs"][key], theirs["added_cond_kwargs"][key]), key
    assert ours["added_cond_kwargs"]["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]
    # SDXL base's unconditional branch is zeros (force_zeros_for_empty_prompt), the prompt's is not
    assert not ours["encoder_hidden_states"][0].any() and ours["encoder_hidden_states"][1].any()


def test_sd2_v_encodes_like_the_pipeline_with_clip_skip(sd2v):
    loaded = loading.load_model(sd2v, torch.device("cpu"), torch.float32, clip_skip=1, resolution=16)
    pipe, parts = loaded.pipe, loaded.parts
    assert parts.prediction_type == "v_prediction" and parts.latent_shape == (4, 8, 8)
    prompt = "a green triangle"
    ours = _parts_unet_inputs(parts, prompt)
    if not hasattr(pipe.text_encoder, "text_model"):
        # transformers >= 5.6 flattened CLIPTextModel and the pipeline's clip_skip branch raises (diffusers #14124);
        # give the reference pipeline the attribute its code reads (what the pending fix does), bypassing
        # nn.Module registration so the module tree is unchanged
        pipe.text_encoder.__dict__["text_model"] = pipe.text_encoder
    theirs = _unet_inputs(pipe, lambda: pipe(prompt, height=16, width=16, num_inference_steps=1, guidance_scale=7.5,
                                             clip_skip=1, output_type="latent"))[0]
    # the prompt is clip-skipped, the pipeline's unconditional embedding is not: both must match it exactly
    assert torch.equal(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])


def _text_encoders(pipe):
    return [pipe.text_encoder, pipe.text_encoder_2]


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_sdxl_token_input_gives_the_pipelines_cond_and_a_gradient_without_touching_the_pipeline(sdxl, clip_skip):
    """Soft-prompt attacks on SDXL: a soft token is one row of the two encoders' tables side by side; with the rows of
    a prompt's first words it gives exactly what encode_text gives for the whole prompt (both encoders' hidden states,
    the pooled embeds and time ids packed), also when the prompt is truncated; the gradient reaches both halves; the
    pipeline's encoders are unchanged and get no gradient."""
    from conftest import digest

    loaded = loading.load_model(sdxl, torch.device("cpu"), torch.float32, clip_skip=clip_skip, resolution=16)
    pipe, parts = loaded.pipe, loaded.parts
    before = [digest(e) for e in _text_encoders(pipe)]
    tokens = parts.token_input
    widths = [e.get_input_embeddings().weight.shape[1] for e in _text_encoders(pipe)]
    assert tokens.table.shape == (len(pipe.tokenizer), sum(widths))
    ids = tokens.tokenize("a red")
    assert len(ids) == 2 and tokens.decode(ids) == "a red"
    long = "a red circle on a blue square next to a green triangle under a yellow star beside a purple disc"
    assert len(pipe.tokenizer(long).input_ids) > pipe.tokenizer.model_max_length  # the host truncates it
    with torch.no_grad():
        for prompt in ("a red circle on a blue square", long):
            rest = prompt[len("a red "):]
            assert torch.equal(tokens.encode(rest, tokens.table[ids]), parts.encode_text([prompt])), prompt
        assert torch.equal(tokens.encode("a red circle", tokens.table[:0]), parts.encode_text(["a red circle"]))
    soft = tokens.table[ids].clone().requires_grad_(True)
    tokens.encode("circle", soft).square().sum().backward()
    assert float(soft.grad[:, :widths[0]].abs().sum()) > 0 and float(soft.grad[:, widths[0]:].abs().sum()) > 0
    assert [digest(e) for e in _text_encoders(pipe)] == before
    assert all(p.grad is None for e in _text_encoders(pipe) for p in e.parameters())


def test_soft_prompt_and_ring_a_bell_run_on_sdxl(sdxl, monkeypatch):
    """The two token-input attacks run on an SDXL pipeline instead of being skipped (a tiny budget; the judge says
    every image shows the concept: this checks that they run, not what they find)."""
    from trust_engine import attacks

    tiny = {**attacks.BUDGETS["quick"],
            "soft_prompt": {"restarts": 1, "iterations": 2, "timesteps": 1, "concept_images": 1, "images": 1,
                            "tokens": 2, "steps": 2},
            "ring_a_bell": {"population": 4, "generations": 1, "tokens": 2, "prompts": 1, "images": 1, "steps": 2}}
    monkeypatch.setitem(attacks.BUDGETS, "quick", tiny)
    parts = loading.load_model(sdxl, torch.device("cpu"), torch.float32, resolution=16).parts
    results = attacks.run(parts, "red circle", ["soft_prompt", "ring_a_bell"], base=parts,
                          judge=lambda images, concept: [True] * images.shape[0])
    for result in results.values():
        assert result.runs > 0 and not result.note and result.asr == 1.0, result.line()
    assert results["soft_prompt"].extra["discrete_prompts"] and results["ring_a_bell"].extra["prompts"]


def test_dtype_and_sdxl_vae_upcast(sdxl, sd2v):
    loaded = loading.load_model(sdxl, torch.device("cpu"), torch.float16, resolution=16)
    assert loaded.parts.dtype == torch.float16 and loaded.pipe.vae.dtype == torch.float32  # as the pipeline decodes
    assert loaded.parts.encode_text(["a red circle"]).dtype == torch.float16
    loaded = loading.load_model(sd2v, torch.device("cpu"), torch.bfloat16, resolution=16)
    assert loaded.parts.dtype == torch.bfloat16 and loaded.pipe.vae.dtype == torch.bfloat16
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loading.resolve_dtype("auto", torch.device("cuda")) == torch.float16


def _check_delta(path, folder):
    delta = Delta.load(path)
    unet = loading.load_model(folder, torch.device("cpu"), torch.float32).pipe.unet
    delta.check_base(fingerprint(site_weights(unet, find_sites(unet))))  # made on this model
    assert delta.sites and all(n in {s.name for s in find_sites(unet)} for n in delta.sites)
    return delta


def test_cli_unlearn_then_evaluate_on_sd2_v(sd2v, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    code, text, err = _cli(capsys, "unlearn", "--concept", "red circle", "--mode", "combination", "--model", str(sd2v),
                           "--resolution", RES, "--steps", "2", "--out", str(out))
    assert code == 0, err[-2000:]
    assert "delta written" in text
    delta = _check_delta(out, sd2v)
    assert "v_prediction" in delta.metadata["model"]
    code, text, err = _cli(capsys, "evaluate", "--delta", str(out), "--model", str(sd2v), "--resolution", RES,
                           "--seeds", "1", "--steps", "2")
    assert code == 2 and "needs --aligner" in err
    code, text, err = _cli(capsys, "evaluate", "--delta", str(out), "--model", str(sd2v), "--resolution", RES,
                           "--aligner", str(ALIGNER), "--seeds", "1", "--steps", "2", "--json")
    assert code == 0, err[-2000:]
    report = json.loads(text.strip().splitlines()[-1])
    assert report["forget_images"] == len(json.loads(delta.metadata["forget"]))
    for key in ("forget_clip_before", "forget_clip", "preserve_clip_before", "preserve_clip"):
        assert -100 <= report[key] <= 100, key


def test_cli_unlearn_on_sdxl_with_an_aligner(sdxl, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    code, text, err = _cli(capsys, "unlearn", "--concept", "red circle", "--mode", "combination", "--model", str(sdxl),
                           "--resolution", RES, "--steps", "2", "--clip-skip", "1", "--aligner", str(ALIGNER),
                           "--out", str(out))
    assert code == 0, err[-2000:]
    assert "aligner score of the forget prompts" in text  # the aligner was used (early-stop scoring)
    delta = _check_delta(out, sdxl)
    assert delta.metadata["saliency_mode"] == "clip"


@pytest.mark.parametrize("family", ["sdxl", "sd2v"])
def test_cli_saliency(family, request, tmp_path, capsys):
    folder = str(request.getfixturevalue(family))
    code, text, err = _cli(capsys, "saliency", "--concept", "red circle", "--model", folder, "--resolution", RES,
                           "--steps", "2", "--images", "1")
    assert code == 0, err[-2000:]
    assert "concept neurons of" in text and "noise contrast" in text
    heat = tmp_path / "heat.png"
    code, text, err = _cli(capsys, "saliency", "--concept", "red circle", "--model", folder, "--resolution", RES,
                           "--steps", "2", "--images", "1", "--aligner", str(ALIGNER), "--heatmap", str(heat))
    assert code == 0, err[-2000:]
    assert "saliency: CLIP score" in text and "input_blocks." in text
    from PIL import Image

    assert Image.open(heat).size[0] > 100


def test_unusable_model_or_aligner_is_refused_before_any_work(sd2v, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("loaded a model although the inputs were bad")

    real_load_model = loading.load_model
    monkeypatch.setattr(loading, "load_model", no_work)
    monkeypatch.setattr("trust_engine.testbed.bundle.load_parts", no_work)
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    cases = [
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(empty)], "no model_index.json"),
        (["--model", str(other)], "holds a FluxPipeline"),
        (["--model", str(file)], "is a file, not a folder"),
        (["--model", str(sd2v), "--aligner", str(sd2v / "text_encoder")], "must be a CLIPModel"),
        (["--model", str(sd2v), "--aligner", str(tmp_path / "missing")], "is not a folder"),
        (["--model", str(sd2v), "--clip-skip", "-1"], "--clip-skip must be 0 or more"),
    ]

    for command in (["unlearn", "--concept", "a cat"], ["saliency", "--concept", "a cat"]):
        for extra, message in cases:
            code, _, err = _cli(capsys, *command, *extra)
            assert code == 2 and message in err and "Traceback" not in err, (command, extra, err)
    # a resolution the VAE cannot take is refused from the folder's config, before diffusers loads anything
    monkeypatch.setattr(loading, "load_model", real_load_model)
    monkeypatch.setattr("diffusers.DiffusionPipeline.from_pretrained", no_work)
    code, _, err = _cli(capsys, "saliency", "--concept", "a cat", "--model", str(sd2v), "--resolution", "15")
    assert code == 2 and "positive multiple of 2" in err, err
