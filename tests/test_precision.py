"""Right on real checkpoints: a v-prediction model trains on the same data as the eps model it is equivalent to, a
zero-terminal-SNR schedule stays finite, small deltas survive half precision, only masked rows move, and CSR's
finite-difference Hessian-vector product agrees with double backprop."""

import dataclasses

import pytest
import torch

from trust_engine import concepts, unlearn
from trust_engine.functional import SiteDeltas
from trust_engine.parts import DiffusionParts
from trust_engine.saliency import SaliencyConfig, estimate
from trust_engine.unet_view import find_sites

TINY = dict(steps=3, forget_images=4, preserve_images=4, gen_steps=4, batch=2, early_stop=None, lr=5e-3,
            saliency=SaliencyConfig(steps=4, images=1))


def as_v_model(parts: DiffusionParts) -> DiffusionParts:
    """The same network re-parametrised to predict v = (eps - sigma x) / alpha exactly: an SD2-768-v stand-in."""

    def denoise(call, x, t, cond):
        eps = parts.denoise(call, x, t, cond).double()
        alpha, sigma = parts._alpha_sigma(x, t)
        return ((eps - sigma.double() * x.double()) / alpha.double()).to(x.dtype)

    config = {**parts.scheduler_config, "prediction_type": "v_prediction"}
    return dataclasses.replace(parts, denoise=denoise, scheduler_config=config, prediction_type="v_prediction")


def test_v_prediction_model_generates_like_its_eps_twin(testbed):
    _, parts, _ = testbed
    v_parts = as_v_model(parts)
    deltas = SiteDeltas(parts.unet, find_sites(parts.unet))
    prompts = ["a red circle", "a blue square"]
    eps_lat, _ = unlearn.generate_latents(parts, deltas.base_call, prompts, 2, 8, 3.0, torch.Generator().manual_seed(3))
    v_lat, _ = unlearn.generate_latents(v_parts, deltas.base_call, prompts, 2, 8, 3.0, torch.Generator().manual_seed(3))
    assert torch.allclose(eps_lat, v_lat, atol=1e-4), (eps_lat - v_lat).abs().max()


def test_v_prediction_saliency_and_run_match_the_eps_twin(testbed):
    _, parts, aligner = testbed
    v_parts = as_v_model(parts)
    config = SaliencyConfig(steps=6, images=2)
    masks = []
    for p in (parts, v_parts):
        deltas = SiteDeltas(p.unet, find_sites(p.unet))
        result = estimate(p, deltas, ["a triangle"], config, aligner, generator=torch.Generator().manual_seed(1),
                          cfg=3.0)
        masks.append(torch.cat([result.mask[n] for n in sorted(result.mask)]))
    inter = (masks[0] & masks[1]).sum().item()
    union = (masks[0] | masks[1]).sum().item()
    assert union > 0 and inter / union >= 0.99, (inter, union)

    sites = find_sites(parts.unet)
    injected = {s.name: torch.arange(s.out_features) % 7 == 0 for s in sites}
    config = unlearn.config_for("cip", **{**TINY, "static_mask": True})
    results = [unlearn.unlearn(p, concepts.expand("triangle"), config, aligner, default_cfg=3.0, initial_mask=injected)
               for p in (parts, v_parts)]
    a, b = results[0].delta, results[1].delta
    assert sorted(a.sites) == sorted(b.sites) and a.sites
    for name in a.sites:
        assert torch.equal(a.sites[name].rows, b.sites[name].rows)
        # Adam steps by about lr * sign(gradient): an entry whose gradient is ~0 may step either way from float
        # noise, so compare the deltas as a whole
        diff = (a.sites[name].values - b.sites[name].values).norm() / a.sites[name].values.norm()
        assert diff < 0.02, (name, float(diff))


def test_zero_terminal_snr_v_model_samples_finite_and_exact():
    """At the first step of a zero-terminal-SNR schedule alpha_bar = 0: converting v to eps and back divides by 0.
    An oracle v-model of one clean latent must lead DDIM straight to it."""
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                prediction_type="v_prediction", clip_sample=False).config)
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    parts = DiffusionParts(unet=torch.nn.Identity(), denoise=None, encode_text=lambda p: torch.zeros(len(p), 1, 4),
                           decode=None, scheduler_config=config, latent_shape=(4, 8, 8), prediction_type="v_prediction")
    assert float(parts.alphas_cumprod[-1]) == 0.0

    def oracle(call, x, t, cond):
        alpha, sigma = parts._alpha_sigma(x, t)
        return (alpha * x - target) / sigma  # v for the clean latent `target`

    parts.denoise = oracle
    latents, _ = unlearn.generate_latents(parts, None, ["x"], 1, 10, 1.0, torch.Generator().manual_seed(1))
    assert torch.isfinite(latents).all()
    assert torch.allclose(latents, target, atol=1e-4)
    x0 = parts.x0_from_output(oracle(None, latents * 0 + 1, torch.tensor([999]), None), latents * 0 + 1, 999)
    assert torch.allclose(x0, target, atol=1e-5)


def test_small_delta_survives_bfloat16_and_training_gets_gradients(testbed):
    """A delta below bfloat16's spacing of the weights would round away if added to them; added to the output in
    float32 it still moves the output on average. And a bfloat16 run gets non-zero gradients."""
    from trust_engine.testbed import bundle

    pipe = bundle.load_pipeline()
    pipe.unet.to(torch.bfloat16)
    from trust_engine.parts import from_pipeline

    parts = from_pipeline(pipe)
    assert parts.dtype == torch.bfloat16
    sites = find_sites(pipe.unet)
    deltas = SiteDeltas(pipe.unet, sites, trainable="kv")
    name = next(n for n in deltas.delta)
    base = deltas.base[name].float()
    with torch.no_grad():  # far below half the bfloat16 spacing of every weight
        deltas.delta[name] += base.abs() * 2**-12
    layer = next(m for m in deltas.model.modules() if getattr(m, "name", None) == name)
    x = torch.randn(256, base.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        deltas.apply_delta = False
        y0 = layer(x).float()
        deltas.apply_delta = True
        y1 = layer(x).float()
    expected = torch.nn.functional.linear(x.float(), deltas.delta[name].detach())
    assert (base.to(torch.bfloat16) + deltas.delta[name].detach().to(torch.bfloat16)).float().equal(
        base.to(torch.bfloat16).float()), "the test delta must be below the weights' rounding"
    change = (y1 - y0).flatten()
    corr = torch.corrcoef(torch.stack([change, expected.flatten()]))[0, 1]
    assert corr > 0.2, corr  # exactly 0 (NaN) if the delta were rounded into the weights

    config = unlearn.config_for("cip", **{**TINY, "steps": 2})
    result = unlearn.unlearn(parts, concepts.expand("triangle"), config, None, default_cfg=3.0)
    assert result.delta.sites and all(d.values.abs().sum() > 0 for d in result.delta.sites.values())


def test_masked_adam_moves_only_the_current_rows_despite_momentum():
    d = {"site": torch.zeros(4, 3)}
    base = {"site": torch.ones(4, 3)}
    adam = unlearn.MaskedAdam(d, {"site": 0.1}, base)
    grads = {"site": torch.ones(4, 3)}
    adam.step(grads, {"site": torch.tensor([True, True, False, False])})
    after_first = d["site"].clone()
    assert (after_first[:2] != 0).all() and (after_first[2:] == 0).all()
    adam.step(grads, {"site": torch.tensor([False, False, True, False])})  # rows 0-1 still carry momentum
    assert torch.equal(d["site"][:2], after_first[:2])
    assert (d["site"][2] != 0).all() and (d["site"][3] == 0).all()
    reference = torch.zeros(1, 3, requires_grad=True)  # torch's AdamW for one row over the same gradients
    opt = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.0)
    reference.grad = torch.ones(1, 3)
    opt.step()
    assert torch.allclose(after_first[:1], reference.detach())


def test_csr_penalty_counts_only_masked_rows():
    g = torch.arange(12.0).view(4, 3)
    mask = {"site": torch.tensor([True, False, True, False])}
    expected = (g[0].pow(2).sum() + g[2].pow(2).sum()) / 6
    assert torch.allclose(unlearn._masked_square([g], mask), expected)


def test_csr_finite_difference_gradient_matches_double_backprop(testbed):
    _, parts, aligner = testbed
    merged = concepts.merge([concepts.expand("triangle")])
    grads = {}
    for how in ("exact", "finite_difference"):
        for beta in (0.0, 1.0):
            config = unlearn.config_for("csr", **{**TINY, "beta": beta, "csr_hvp": how, "csr_fd_step": 1e-3,
                                                  "retain_unconditional": False})
            run = unlearn.TrustRun(parts, merged, config, aligner, 3.0)
            g = torch.Generator().manual_seed(0)
            lat = torch.randn(4, *parts.latent_shape, generator=g)
            run.set_data(lat, ["a triangle"] * 4)
            run.gen.manual_seed(5)
            mask = {s.name: (torch.arange(s.out_features) % 3 == 0) & (s.name in run.deltas.delta) for s in run.sites}
            with torch.random.fork_rng():
                _, got, _ = unlearn._loss_and_grads(run, mask)
            grads[how, beta] = torch.cat([got[n].flatten() for n in sorted(got)])
    exact = grads["exact", 1.0] - grads["exact", 0.0]
    approx = grads["finite_difference", 1.0] - grads["finite_difference", 0.0]
    assert exact.abs().sum() > 0
    cosine = torch.nn.functional.cosine_similarity(exact, approx, dim=0)
    assert cosine > 0.99, cosine
    assert torch.allclose(approx.norm(), exact.norm(), rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn])
def test_fp8_weights_are_refused_before_any_work(testbed, dtype):
    _, parts, aligner = testbed
    unet = torch.nn.Linear(2, 2).to(dtype)
    fp8 = dataclasses.replace(parts, unet=unet)
    with pytest.raises(ValueError, match="fp8"):
        unlearn.unlearn(fp8, concepts.expand("triangle"), unlearn.config_for("cip", **TINY), aligner)


def test_bfloat16_saliency_decode_runs_in_bfloat16_and_keeps_the_mask(testbed):
    """decode_precision="bfloat16" on a float32 model: the differentiable decode and CLIP score run under bfloat16
    autocast (their activations take half the memory), the sampling and the UNet backward stay float32, and the
    concept neurons are (nearly) those of the float32 path."""
    _, parts, aligner = testbed
    seen = []
    original = aligner.score

    def score(images, prompts):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(images, prompts)

    masks = {}
    deltas = SiteDeltas(parts.unet, find_sites(parts.unet))
    try:
        aligner.score = score
        for precision in ("host", "bfloat16"):
            result = estimate(parts, deltas, ["a triangle"], SaliencyConfig(steps=6, images=2,
                              decode_precision=precision), aligner, generator=torch.Generator().manual_seed(0), cfg=3.0)
            masks[precision] = torch.cat([result.mask[n] for n in sorted(result.mask)])
    finally:
        del aligner.score
    assert seen == [False, False, True, True]
    inter = (masks["host"] & masks["bfloat16"]).sum().item()
    union = (masks["host"] | masks["bfloat16"]).sum().item()
    assert union > 0 and inter / union >= 0.9, (inter, union)
    with pytest.raises(ValueError, match="decode_precision must be one of"):
        estimate(parts, deltas, ["a triangle"], SaliencyConfig(decode_precision="float8"), aligner)


def test_csr_probes_gradient_is_the_derivative_of_their_mean_penalty(testbed):
    """The several-probe, per-sample-scaled CSR estimator (csr_probes, csr_scale 'sample'): with the probes fixed,
    the gradient it adds is the derivative of the penalty it reports (a central difference along a random
    direction of the masked rows)."""
    _, parts, aligner = testbed
    merged = concepts.merge([concepts.expand("triangle")])
    config = unlearn.config_for("csr", **{**TINY, "csr_probes": 2, "csr_scale": "sample", "csr_fd_step": 1e-3,
                                          "retain_unconditional": False})
    run = unlearn.TrustRun(parts, merged, config, aligner, 3.0)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(3, *parts.latent_shape, generator=g), torch.tensor([300, 500, 700])
    cond = parts.encode_text(["a triangle"] * 3)
    masked = {n: torch.arange(d.shape[0]) % 4 == 0 for n, d in run.deltas.delta.items()}
    direction = {n: torch.randn(d.shape, generator=g) * masked[n].view(-1, 1) for n, d in run.deltas.delta.items()}

    def penalty(shift: float, grads=None) -> float:
        with torch.no_grad():
            for n, d in run.deltas.delta.items():
                d.copy_(shift * direction[n])
        run.gen.manual_seed(11)  # the same probes every call
        grads = grads if grads is not None else {n: torch.zeros_like(d) for n, d in run.deltas.delta.items()}
        return unlearn._csr_probes(run, masked, x_t, t, cond, 3, grads, 1.0)

    grads = {n: torch.zeros_like(d) for n, d in run.deltas.delta.items()}
    penalty(0.0, grads)
    analytic = sum(float((grads[n] * direction[n]).sum()) for n in grads) / config.beta
    eps = 1e-3
    numeric = (penalty(eps) - penalty(-eps)) / (2 * eps)
    assert analytic != 0 and abs(analytic - numeric) <= 0.05 * abs(numeric), (analytic, numeric)
