"""The training script end to end at toy sizes: every stage runs, checkpoints resume, the export is a stock
diffusers pipeline folder that loads offline."""

import json

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from trust_engine.testbed import train

TINY = ["--train-images", "64", "--judge-images", "64", "--judge-steps", "2",
        "--aligner-steps", "2", "--vae-steps", "2", "--unet-steps", "2", "--unet-batch", "4"]


def _step(ckpt):
    with safe_open(ckpt, "pt") as f:
        return int(f.metadata()["step"])


def test_all_stages_run_resume_and_export_a_loadable_pipeline(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    train.main(["--work", str(work), "--out", str(out), *TINY])
    assert _step(work / "unet.ckpt.safetensors") == 2
    # A longer run resumes from the checkpoint instead of starting again.
    train.main(["--work", str(work), "--out", str(out), "--stage", "unet", *TINY[:-4], "--unet-steps", "3", "--unet-batch", "4"])
    assert "resumed at step 2/3" in capsys.readouterr().out
    assert _step(work / "unet.ckpt.safetensors") == 3

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    images = pipe(["a red circle"], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)
    assert (out / "aligner" / "vocab.json").read_text() == (work / "tokenizer" / "vocab.json").read_text()
    assert json.loads((out / "testbed.json").read_text())["seed"] == 0


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    train.save_checkpoint(tmp_path / "c.safetensors", 7, {"model": model}, opt)
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert train.load_checkpoint(tmp_path / "c.safetensors", {"model": fresh}, fresh_opt) == 7
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
