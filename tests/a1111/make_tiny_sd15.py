"""Builds the tier-2 checkpoint: a tiny, randomly initialised SD1.5-shaped model (tiny_sd15.yaml) and its tiny CLIP
text encoder, saved whole (CLIP included) so nothing is fetched from a hub. Run with AUTOMATIC1111's Python:
    python make_tiny_sd15.py WEBUI_DIR DATA_DIR TOKENIZER_DIR
"""

import os
import shutil
import sys

webui, data, tokenizer_dir = sys.argv[1:4]
sys.path.insert(0, os.path.join(webui, "repositories", "stable-diffusion-stability-ai"))
here = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

clip_dir = os.path.join(data, "tiny_clip")
os.makedirs(clip_dir, exist_ok=True)
for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(tokenizer_dir, name), clip_dir)
special = '"bos_token":"<|startoftext|>","eos_token":"<|endoftext|>","unk_token":"<|endoftext|>","pad_token":"<|endoftext|>"'
with open(os.path.join(clip_dir, "tokenizer_config.json"), "w") as f:
    f.write('{"tokenizer_class":"CLIPTokenizer","model_max_length":77,"do_lower_case":true,' + special + "}")
with open(os.path.join(clip_dir, "special_tokens_map.json"), "w") as f:
    f.write("{" + special + "}")

torch.manual_seed(1234)
tok = CLIPTokenizer.from_pretrained(clip_dir)
hidden = 64
cfg = CLIPTextConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden, intermediate_size=2 * hidden,
                     num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=77, projection_dim=hidden,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     hidden_act="quick_gelu")
clip = CLIPTextModel(cfg)
# fresh LayerNorms (weight 1, bias 0) make every token zero-mean: the web UI's "Original" emphasis then divides 0 by 0
with torch.no_grad():
    for mod in clip.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.weight.normal_(1.0, 0.1)
            mod.bias.normal_(0.0, 0.1)
clip.save_pretrained(clip_dir, safe_serialization=True)

from ldm.util import instantiate_from_config  # noqa: E402

yaml_text = open(os.path.join(here, "tiny_sd15.yaml")).read().replace("TINY_CLIP_DIR", clip_dir)
conf = OmegaConf.create(yaml_text)
torch.manual_seed(1234)
model = instantiate_from_config(conf.model)
with torch.no_grad():  # zero-initialised output convs would make the UNet output nothing
    for _, p in model.model.diffusion_model.named_parameters():
        if p.abs().sum() == 0 and p.dim() > 1:
            p.normal_(0, 0.02)
dst = os.path.join(data, "models", "Stable-diffusion")
os.makedirs(dst, exist_ok=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(dst, "tiny_sd15.safetensors"))
with open(os.path.join(dst, "tiny_sd15.yaml"), "w") as f:
    f.write(yaml_text)
print("built", os.path.join(dst, "tiny_sd15.safetensors"))
