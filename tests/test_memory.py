"""The engine's memory levers: the saliency's differentiable VAE decode (from_pipeline, bench-scale) and the UNet's
blocks run under activation checkpointing on private copies. They keep far fewer activations, give the same
gradients, and leave the host's modules untouched."""

import dataclasses

import torch

from trust_engine import bench, concepts, unlearn
from trust_engine.functional import SiteDeltas, _Checkpointed, checkpointed_copy
from trust_engine.saliency import SaliencyConfig
from trust_engine.unet_view import find_sites


def saved_bytes(fn):
    """fn()'s result and the bytes autograd saved for its backward outside checkpointed regions (those keep their
    own inputs only; what they recompute is not held)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def grad_of(fn, x):
    x = x.detach().requires_grad_(True)
    out, saved = saved_bytes(lambda: fn(x))
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (g,) = torch.autograd.grad((out * weights).sum(), x)
    return g, saved


def wrapped(module) -> int:
    return sum(isinstance(m, _Checkpointed) for m in module.modules())


def test_pipeline_decode_is_checkpointed_with_the_same_gradient(testbed):
    pipe, parts, _ = testbed
    z = torch.randn(1, *parts.latent_shape, generator=torch.Generator().manual_seed(0))
    scale = pipe.vae.config.scaling_factor

    def plain(x):
        return ((pipe.vae.decode(x / scale).sample + 1) / 2).clamp(0, 1)

    g_plain, saved_plain = grad_of(plain, z)
    g_ckpt, saved_ckpt = grad_of(parts.decode, z)
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)
    assert torch.allclose(g_ckpt, g_plain, rtol=1e-5, atol=1e-7), (g_ckpt - g_plain).abs().max()
    assert wrapped(pipe.vae) == 0, "the pipeline's own VAE is not changed"


def test_bench_decode_is_checkpointed_with_the_same_gradient():
    dev = torch.device("cpu")
    unet, vae, clip, size = bench._models("tiny", dev, torch.float32)
    parts, _ = bench._engine_parts("tiny", unet, vae, clip, size, dev, torch.float32, 8)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g_plain, saved_plain = grad_of(lambda x: ((vae.decode(x / 0.18215).sample + 1) / 2).clamp(0, 1), z)
    g_ckpt, saved_ckpt = grad_of(parts.decode, z)
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)
    assert torch.allclose(g_ckpt, g_plain, rtol=1e-5, atol=1e-7)
    assert wrapped(vae) == 0


def test_checkpointed_copy_shares_weights_and_refuses_a_module_without_blocks():
    vae = bench._models("tiny", torch.device("cpu"), torch.float32)[1]
    copy_ = checkpointed_copy(vae)
    assert wrapped(copy_) > 0 and wrapped(vae) == 0
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(vae.parameters(), copy_.parameters()))
    try:
        checkpointed_copy(torch.nn.Linear(2, 2))
    except ValueError as e:
        assert "no block" in str(e)
    else:
        raise AssertionError("a module without blocks must be refused")


def test_unet_blocks_are_checkpointed_with_the_same_saliency_gradient(testbed):
    _, parts, _ = testbed
    sites = find_sites(parts.unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *parts.latent_shape, generator=g)
    cond = parts.encode_text(["a red circle"])
    t = torch.full((1,), 500)
    grads, saved = {}, {}
    for ckpt in (False, True):
        deltas = SiteDeltas(parts.unet, sites, checkpoint=ckpt)
        assert (deltas.checkpointed > 0) == ckpt
        with deltas.probing() as probes:
            out, saved[ckpt] = saved_bytes(lambda d=deltas: parts.denoise(d.call, x, t, cond))
            weights = torch.linspace(-1, 1, out.numel()).view_as(out)
            got = torch.autograd.grad((out * weights).sum(), list(probes.values()))
        grads[ckpt] = torch.cat([v.flatten() for v in got])
    assert saved[True] < 0.5 * saved[False], saved
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-8), (grads[True] - grads[False]).abs().max()
    assert wrapped(parts.unet) == 0, "the host's UNet is not changed"


def test_the_engine_run_checkpoints_sd_sized_latents_by_default(testbed):
    _, parts, aligner = testbed
    merged = concepts.merge([concepts.expand("triangle")])
    config = unlearn.config_for("cip", batch=1, early_stop=None, saliency=SaliencyConfig(steps=2, images=1))
    sd = dataclasses.replace(parts, latent_shape=(4, 64, 64))  # SD1.5 at 512 px
    assert unlearn.TrustRun(sd, merged, config, aligner, 3.0).deltas.checkpointed > 0
    assert unlearn.TrustRun(parts, merged, config, aligner, 3.0).deltas.checkpointed == 0  # small: not worth it
    forced = dataclasses.replace(config, checkpoint=True)
    assert unlearn.TrustRun(parts, merged, forced, aligner, 3.0).deltas.checkpointed > 0


def test_vae_resnets_keep_no_norm_output_with_the_same_gradient():
    """Inside the decoder copy, each resnet's GroupNorm runs with its SiLU under one checkpoint: the norm outputs are
    not saved for the backward pass (checked on the resnets alone, without the block-level checkpointing), the
    gradient is the same, and checkpointed_copy applies it."""
    from torch import nn

    from trust_engine.functional import fuse_norm_act, private_tree

    vae = bench._models("tiny", torch.device("cpu"), torch.float32)[1]
    fused = private_tree(vae.decoder)
    assert fuse_norm_act(fused) > 0
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    plain_block = next(m for m in vae.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    fused_block = next(m for m in fused.modules() if type(m).__name__ == "ResnetBlock2D")
    g_plain, saved_plain = grad_of(lambda x: plain_block(x, None), z)
    g_fused, saved_fused = grad_of(lambda x: fused_block(x, None), z)
    norm_outputs = 2 * z.numel() * z.element_size()  # norm1's and norm2's outputs (16 channels in and out)
    assert saved_fused <= saved_plain - norm_outputs, (saved_fused, saved_plain)
    assert torch.allclose(g_fused, g_plain, rtol=1e-5, atol=1e-7)
    assert not any(isinstance(m.norm1, _Checkpointed) for m in vae.modules() if type(m).__name__ == "ResnetBlock2D")
    copy_ = checkpointed_copy(vae)
    resnets = [m for m in copy_.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert resnets and all(isinstance(m.norm1, _Checkpointed) and isinstance(m.nonlinearity, nn.Identity)
                           for m in resnets if m.time_emb_proj is None)


def test_the_cpu_step_hands_freed_heap_back_before_the_decode_and_the_loss(testbed, monkeypatch):
    """On the CPU the allocator's free heap is released (malloc_trim) after the saliency's sampling, after each
    image's decode, and before the loss: the decode's and the loss's large tensors are not stacked on top of it."""
    from trust_engine import functional, saliency

    assert functional.release_free_memory() is (functional._LIBC[0] is not None)
    calls = []
    monkeypatch.setattr(saliency, "release_free_memory", lambda: calls.append("saliency") or True)
    monkeypatch.setattr(unlearn, "release_free_memory", lambda: calls.append("step") or True)
    _, parts, aligner = testbed
    merged = concepts.merge([concepts.expand("triangle")])
    config = unlearn.config_for("cip", batch=1, early_stop=None, saliency=SaliencyConfig(steps=2, images=2))
    run = unlearn.TrustRun(parts, merged, config, aligner, 3.0)
    g = torch.Generator().manual_seed(0)
    run.set_data(torch.randn(2, *parts.latent_shape, generator=g), ["triangle"] * 2,
                 torch.randn(2, *parts.latent_shape, generator=g), ["a circle"] * 2)
    run.step(1)
    assert calls == ["saliency"] * 3 + ["step"], calls
