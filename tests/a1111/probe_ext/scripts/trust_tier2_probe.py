"""Test-only probe extension for tier 2: reports the cross-attention Q/K/V weights the loaded model holds right now
(the built-in Lora extension writes its patches into them in place during a generation)."""

from modules import script_callbacks, shared


def _weights():
    unet = shared.sd_model.model.diffusion_model
    out = {}
    for name, module in unet.named_modules():
        if ".attn2.to_" in name and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            out[name] = module.weight.detach().float().cpu().tolist()
    return {"weights": out}


def _mount(demo, app):
    app.add_api_route("/trust_probe/v1/weights", _weights, methods=["GET"])


script_callbacks.on_app_started(_mount)
