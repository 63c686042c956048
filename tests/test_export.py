"""A delta for diffusers users, on an SD1.5-layout UNet: apply_to_pipeline (in place, = base + strength x delta,
refused on another base) and export_diffusers (a file diffusers' own kohya converter maps to the same weights)."""


from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_diffusers import sd15_pipeline, sd15_unet, sdxl_unet

from trust_engine.__main__ import main
from trust_engine.delta import BaseMismatchError, Delta, RowDelta, fingerprint
from trust_engine.export import apply_to_pipeline, export_diffusers
from trust_engine.sketch import SKETCH_KEY, sketch
from trust_engine.unet_view import UnknownArchitectureError, find_sites, site_weights

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


def _random_delta(unet, seed: int = 1) -> Delta:
    """Every other site of the UNet (Q, K, V and out) changed in a random number of rows, one site in all of its rows
    (the delta file stores that one as a dense `.diff`); fingerprint and sketch of the UNet's Q/K/V weights."""
    g = torch.Generator().manual_seed(seed)
    sites = find_sites(unet, include_out=True)
    rows = {}
    for i, s in enumerate(sites[::2]):
        r = s.out_features if i == 0 else 1 + int(torch.randint(s.out_features - 1, (1,), generator=g))
        picked = torch.randperm(s.out_features, generator=g)[:r]
        rows[s.name] = RowDelta(picked, torch.randn(r, s.in_features, generator=g) * 0.1, s.out_features)
    base = site_weights(unet, find_sites(unet))
    return Delta(rows, {"concepts": '["a cat"]', SKETCH_KEY: sketch(base)}, fingerprint(base))


def _expected(base: dict, delta: Delta, strength: float) -> dict:
    """base + strength x delta at the delta's sites, computed here from the dense differences."""
    return {n: base[n] + strength * delta.dense(n) for n in delta.sites}


def _weights_by_site(unet) -> dict:
    """Copies of every site's weight (Q, K, V and out), by canonical name."""
    return {n: w.clone() for n, w in site_weights(unet, find_sites(unet, include_out=True)).items()}


def _check_applied(unet, before_state: dict, expected: dict) -> None:
    """Changed sites equal `expected` exactly; every other tensor of the UNet is untouched."""
    sites = {s.name: s for s in find_sites(unet, include_out=True)}
    changed = {sites[n].diffusers_name + ".weight" for n in expected}
    after = unet.state_dict()
    for name, w in expected.items():
        got = after[sites[name].diffusers_name + ".weight"]
        assert got.dtype == before_state[sites[name].diffusers_name + ".weight"].dtype
        assert torch.equal(got, w.to(got.dtype)), name
    for key, w in before_state.items():
        if key not in changed:
            assert torch.equal(after[key], w), key


def test_apply_to_pipeline_adds_the_delta_in_place(tmp_path):
    pipe = sd15_pipeline()
    unet = pipe.unet
    assert len({s.name.rsplit(".attn2.", 1)[0] for s in find_sites(unet)}) == 16  # SD1.5's 16 transformer blocks
    delta = _random_delta(unet)
    path = delta.save(tmp_path / "d.safetensors")
    assert any(k.endswith(".diff") for k in load_file(path))  # the dense site goes through the `.diff` path
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = _weights_by_site(unet)
    site = find_sites(unet)[0]
    live = unet.get_submodule(site.diffusers_name).weight
    returned = apply_to_pipeline(pipe, path)
    assert pipe.unet is unet and unet.get_submodule(site.diffusers_name).weight is live  # in place, same tensors
    assert set(returned.sites) == set(delta.sites)
    _check_applied(unet, before, _expected(base, delta, 1.0))


def test_strength_and_dtype(tmp_path):
    unet = sd15_unet()
    delta = _random_delta(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = _weights_by_site(unet)
    apply_to_pipeline(unet, delta, strength=0.5)  # a bare UNet and a Delta object work too
    _check_applied(unet, before, _expected(base, delta, 0.5))
    # half precision: the UNet stays float16; the sum is formed in float32 and rounded once
    half = sd15_unet().half()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    base = {n: w.float() for n, w in _weights_by_site(half).items()}
    apply_to_pipeline(half, delta, strength=0.5)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    _check_applied(half, before, {n: w.half() for n, w in _expected(base, delta, 0.5).items()})


def test_another_base_is_refused_unless_told(tmp_path):
    delta = _random_delta(sd15_unet(seed=0))
    other = sd15_unet(seed=7)  # same layout, other weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(BaseMismatchError, match="another base model.*check_base=False"):
        apply_to_pipeline(other, delta)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())  # refused: nothing written
    base = _weights_by_site(other)
    apply_to_pipeline(other, delta, check_base=False)
    _check_applied(other, before, _expected(base, delta, 1.0))


def test_the_same_base_lightly_modified_is_applied_with_a_warning():
    unet = sd15_unet()
    delta = _random_delta(unet)
    site = find_sites(unet)[0]
    with torch.no_grad():
        unet.get_submodule(site.diffusers_name).weight[0] *= -1  # a few signs flip: not bit-identical any more
    assert fingerprint(site_weights(unet, find_sites(unet))) != delta.base_fingerprint
    with pytest.warns(UserWarning, match="not bit-identical"):
        apply_to_pipeline(unet, delta)


def test_another_architecture_is_refused_and_nothing_written():
    unet = sd15_unet()
    delta = _random_delta(sdxl_unet())  # SDXL sites (2 transformer blocks deep) on an SD1.5 UNet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(BaseMismatchError, match="another architecture"):
        apply_to_pipeline(unet, delta, check_base=False)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())


def _diffusers_reading(pipeline_class, path, unet, **kwargs) -> dict:
    """What diffusers' load_lora_weights would add to each UNet module, short of peft: its lora_state_dict (kohya
    converter), its UNet-to-peft key renaming and its get_peft_kwargs (per-module rank and alpha) give
    module name -> lora_B @ lora_A x alpha / rank."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state_dict, alphas = pipeline_class.lora_state_dict(str(path), **kwargs)
    assert all(k.startswith("unet.") for k in state_dict)
    peft_sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()})
    rank = {f"^{k}": v.shape[1] for k, v in peft_sd.items() if "lora_B" in k}  # as diffusers' load_lora_adapter
    config = get_peft_kwargs(rank, {k.removeprefix("unet."): v for k, v in (alphas or {}).items()}, peft_sd)
    out = {}
    for module in config["target_modules"]:
        r = config["rank_pattern"].get(f"^{module}", config["r"])
        alpha = config["alpha_pattern"].get(f"^{module}", config["lora_alpha"])
        up, down = peft_sd[f"{module}.lora_B.weight"], peft_sd[f"{module}.lora_A.weight"]
        assert up.shape[1] == r
        unet.get_submodule(module)  # the name resolves to a module of this UNet
        out[module] = up @ down * (alpha / r)
    return out


def test_export_is_read_by_diffusers_as_the_same_weights(tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = sd15_unet()
    delta = _random_delta(unet)
    original = delta.save(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="not been correctly renamed"):  # the reported failure, on the delta file
        StableDiffusionPipeline.lora_state_dict(str(original))
    path = export_diffusers(original, tmp_path / "diffusers.safetensors")
    keys = list(load_file(path))
    assert keys and not [k for k in keys if k.endswith((".diff", ".alpha"))]
    with_config = load_file(export_diffusers(delta, tmp_path / "c.safetensors", unet.config))
    assert all(torch.equal(with_config[k], v) for k, v in load_file(path).items()) and len(with_config) == len(keys)
    base = _weights_by_site(unet)
    reading = _diffusers_reading(StableDiffusionPipeline, path, unet)
    sites = {s.name: s for s in find_sites(unet, include_out=True)}
    assert set(reading) == {sites[n].diffusers_name for n in delta.sites}
    fused = {n: base[n] + reading[sites[n].diffusers_name] for n in delta.sites}  # what fuse_lora would give
    applied = sd15_unet()
    apply_to_pipeline(applied, delta)
    for name, expected in _expected(base, delta, 1.0).items():
        assert torch.equal(fused[name], expected), name
        assert torch.equal(site_weights(applied, [sites[name]])[name], expected), name


def test_export_for_sdxl_needs_its_config(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = sdxl_unet()
    delta = _random_delta(unet)
    with pytest.raises(UnknownArchitectureError, match="pass the config"):
        export_diffusers(delta, tmp_path / "x.safetensors")  # the default is the SD1.x/SD2.x layout
    mid = Delta({n: d for n, d in delta.sites.items() if n.startswith("middle_block.1.transformer_blocks.0.")})
    assert mid.sites and any(n.endswith("to_k") or n.endswith("to_v") for n in mid.sites)
    with pytest.raises(UnknownArchitectureError, match="text width is \\[48\\]"):  # names SD1.5 has too: width refuses
        export_diffusers(mid, tmp_path / "x.safetensors")
    path = export_diffusers(delta, tmp_path / "x.safetensors", unet.config)
    reading = _diffusers_reading(StableDiffusionXLPipeline, path, unet, unet_config=unet.config)
    base = _weights_by_site(unet)
    sites = {s.name: s for s in find_sites(unet, include_out=True)}
    for name, expected in _expected(base, delta, 1.0).items():
        assert torch.equal(base[name] + reading[sites[name].diffusers_name], expected), name


def test_cli_export(tmp_path, capsys):
    unet = sdxl_unet()
    delta = _random_delta(unet)
    path = delta.save(tmp_path / "d.safetensors")
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    unet.save_config(model / "unet")
    out = tmp_path / "x.safetensors"
    assert main(["export", "--delta", str(path), "--out", str(out)]) == 2  # SDXL without --model
    assert "pass the config" in capsys.readouterr().err and not out.exists()
    assert main(["export", "--delta", str(path), "--out", str(out), "--model", str(model)]) == 0
    expected = load_file(export_diffusers(path, tmp_path / "y.safetensors", unet.config))
    got = load_file(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    # early errors: a missing delta, a missing --out folder, a folder as --out, the delta itself as --out
    for argv, message in (
        (["--delta", str(tmp_path / "none.safetensors"), "--out", str(out)], "no such file"),
        (["--delta", str(path), "--out", str(tmp_path / "no" / "x.safetensors")], "does not exist"),
        (["--delta", str(path), "--out", str(tmp_path)], "is a folder"),
        (["--delta", str(path), "--out", str(path)], "the delta itself"),
    ):
        assert main(["export", *argv]) == 2
        assert message in capsys.readouterr().err


def test_a_testbed_delta_through_the_cli(tmp_path):
    """A delta from a real erasure (the fixture, with dense `.diff` sites) on the testbed's own diffusers folder."""
    from diffusers import StableDiffusionPipeline

    from trust_engine.testbed import bundle

    fixture = ROOT / "tests" / "fixtures" / "deltas" / "erase_triangle.safetensors"
    assert any(k.endswith(".diff") for k in load_file(fixture))
    folder = ROOT / "trust_engine" / "testbed" / "weights" / "pipeline"
    out = tmp_path / "triangle-diffusers.safetensors"
    assert main(["export", "--delta", str(fixture), "--out", str(out)]) == 2  # text width 128: not SD1.x/SD2.x
    assert main(["export", "--delta", str(fixture), "--out", str(out), "--model", str(folder)]) == 0
    pipe = bundle.load_pipeline()  # a fresh copy: it is changed in place
    base = _weights_by_site(pipe.unet)
    delta = apply_to_pipeline(pipe, fixture)  # the fixture was made on the bundled testbed: the base check passes
    reading = _diffusers_reading(StableDiffusionPipeline, out, pipe.unet)
    sites = {s.name: s for s in find_sites(pipe.unet, include_out=True)}
    assert set(reading) == {sites[n].diffusers_name for n in delta.sites}
    for name in delta.sites:
        fused = base[name] + reading[sites[name].diffusers_name]
        assert torch.equal(fused, site_weights(pipe.unet, [sites[name]])[name]), name


def test_load_lora_weights_with_peft(tmp_path):
    """Where peft is installed (TRuST does not require it; skipped otherwise): diffusers' own load_lora_weights and
    fuse_lora give, at every site, bit for bit the weights apply_to_pipeline gives."""
    pytest.importorskip("peft")
    pipe, reference = sd15_pipeline(), sd15_pipeline()
    delta = _random_delta(pipe.unet)
    pipe.load_lora_weights(str(export_diffusers(delta, tmp_path / "x.safetensors")))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    apply_to_pipeline(reference, delta)
    sites = find_sites(pipe.unet, include_out=True)
    got, want = site_weights(pipe.unet, sites), site_weights(reference.unet, sites)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert not all(torch.equal(got[n], w) for n, w in site_weights(sd15_pipeline().unet, sites).items())


def test_dense_parameter_differences_are_applied_and_refused_by_the_export(tmp_path):
    """Deltas of methods that change ff.net.2 or biases (dense .diff / .diff_b) apply through apply_to_pipeline; the
    diffusers LoRA export cannot carry them and says so instead of dropping them."""
    from trust_engine.unet_params import parameters

    unet = sd15_unet()
    base = _random_delta(unet)
    ff = "input_blocks.1.1.transformer_blocks.0.ff.net.2"
    live = parameters(unet, [f"{ff}.weight", f"{ff}.bias"])
    before = {n: p.clone() for n, p in live.items()}
    g = torch.Generator().manual_seed(3)
    params = {n: torch.randn(p.shape, generator=g) * 1e-2 for n, p in live.items()}
    delta = Delta(base.sites, {}, base.base_fingerprint, params)
    apply_to_pipeline(unet, delta, strength=0.5, check_base=False)
    for name, diff in params.items():
        torch.testing.assert_close(live[name], before[name] + 0.5 * diff)
    with pytest.raises(ValueError, match="apply_to_pipeline instead"):
        export_diffusers(delta, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
