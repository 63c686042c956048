"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024): a closed-form edit of every cross-attention to_k and
to_v so that the concept's text embedding maps where its guide's does, while preserved concepts keep their outputs.

Reference: shared/reference/method-fia-conceptprune-baselines.md §3.3 and `rohitgandikota/unified-concept-editing`
`trainscripts/uce_sd_erase.py`. For each attn2.to_k and attn2.to_v weight W_old (no sampling, text embeddings only):

    W_new = ( λ W_old + Σ_e s_e v*_e c_eᵀ + Σ_p s_p (W_old c_p) c_pᵀ ) ( λ I + Σ_e s_e c_e c_eᵀ + Σ_p s_p c_p c_pᵀ )⁻¹
    c = the text embedding of the prompt's last content token (index attention_mask.sum() - 2; for "" the BOS token),
    v*_e = W_old c_guide,   s_e = erase_scale, s_p = preserve_scale, λ = lamb; computed in float32.

Erase concepts are the expanded forget prompts (each prompt form: the script's optional `--expand_prompts` does the
same with its own frames); the guide is the concept's anchor ("" for an individual concept: the script's guide for
objects and unsafe concepts); preserve concepts are the expanded preserve prompts (none unless the concept has parts or
the user names some: the script's default is none too).

Where this differs from the code, and why:
- The paper's Eq. 7 and the older `train-scripts/train_erase.py` edit with the last content token *and every token
  after it* (end-of-text and padding, aligned with the guide's): `tokens="last_to_end"` does that. The default follows
  the current script (`tokens="last"`).
- DiffusionParts exposes no tokenizer, so the last content token is found from the text encoder itself: CLIP's text
  transformer is causal, so the embeddings of P and of P + " a" agree up to P's last token and part at P's
  end-of-text token. The result equals attention_mask.sum() - 2 for CLIP tokenizers (checked in the tests).
- Multi-concept: every concept's prompts enter one closed form (the script takes a list of concepts the same way).
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from ..concepts import ExpandedConcept, MergedConcepts
from ..delta import Delta
from ..parts import DiffusionParts
from ..progress import ProgressCallback, ProgressEvent, null_progress
from . import _common as c


@dataclasses.dataclass
class UCEConfig:
    """UCE's settings; defaults are `uce_sd_erase.py`'s."""

    erase_scale: float = c.field(1.0, "s_e: weight of the erase terms, > 0; script default 1")
    preserve_scale: float = c.field(1.0, "s_p: weight of the preserve terms, >= 0; script default 1")
    lamb: float = c.field(0.5, "λ: pull towards the old weights (regulariser of the inverse), > 0; script default 0.5")
    projections: str = c.field("kv", "which cross-attention projections are edited: letters of k, v; the script "
                                     "edits to_k and to_v")
    tokens: str = c.field("last", "which token embeddings of each prompt enter: 'last' (the last content token, "
                                  "the current script) or 'last_to_end' (it and every token after it, aligned with "
                                  "the guide's: the paper's Eq. 7 and the older train_erase.py)")

    def validate(self) -> None:
        c.check_range("erase_scale", self.erase_scale, 0.0, 1e6, low_open=True)
        c.check_range("preserve_scale", self.preserve_scale, 0.0, 1e6)
        c.check_range("lamb", self.lamb, 0.0, 1e6, low_open=True)
        if not self.projections or set(self.projections) - set("kv"):
            raise ValueError(f"projections must be letters of 'kv' (to_k, to_v), got {self.projections!r}")
        if self.tokens not in ("last", "last_to_end"):
            raise ValueError(f"tokens must be 'last' or 'last_to_end', got {self.tokens!r}")


def closed_form(w_old: torch.Tensor, erase: list[tuple[torch.Tensor, torch.Tensor]],
                preserve: list[torch.Tensor], erase_scale: float, preserve_scale: float, lamb: float) -> torch.Tensor:
    """UCE's W_new for one projection. `erase` holds (c_e, v*_e) pairs, `preserve` the c_p; every c is a
    (tokens x in) block of embeddings whose rows enter as separate columns (one row = one token)."""
    w = w_old.float()
    mat1 = lamb * w
    mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float32, device=w.device)
    for c_e, v_star in erase:
        mat1 = mat1 + erase_scale * v_star.float().T @ c_e.float()
        mat2 = mat2 + erase_scale * c_e.float().T @ c_e.float()
    for c_p in preserve:
        mat1 = mat1 + preserve_scale * (c_p.float() @ w.T).T @ c_p.float()
        mat2 = mat2 + preserve_scale * c_p.float().T @ c_p.float()
    return mat1 @ torch.linalg.inv(mat2)


def last_token_index(parts: DiffusionParts, prompts: list[str]) -> list[int]:
    """Index of each prompt's last content token (BOS = 0 for ""), from the causal text encoder (see the docstring)."""
    with torch.no_grad():
        plain = parts.encode_text(prompts).float()
        longer = parts.encode_text([(p + " a").strip() for p in prompts]).float()
    out = []
    for a, b in zip(plain, longer):
        scale = a.abs().max().clamp_min(1e-6)
        differs = ((a - b).abs().amax(dim=-1) > 1e-4 * scale).nonzero()
        # no difference: the prompt fills the context (truncated); its last kept token sits before the final EOS
        out.append(int(differs[0]) - 1 if differs.numel() else a.shape[0] - 2)
    return out


def token_embeddings(parts: DiffusionParts, prompts: list[str], guides: list[str] | None, tokens: str):
    """Per prompt, the (tokens x dim) embeddings that enter the closed form, and its guide's, aligned row by row."""
    with torch.no_grad():
        emb = parts.encode_text(prompts).float()
        idx = last_token_index(parts, prompts)
        g_emb = parts.encode_text(guides).float() if guides is not None else None
        g_idx = last_token_index(parts, guides) if guides is not None else None
    out = []
    for i in range(len(prompts)):
        if tokens == "last":
            own = emb[i, idx[i]:idx[i] + 1]
            guide = g_emb[i, g_idx[i]:g_idx[i] + 1] if g_emb is not None else None
        else:  # as train_erase.py: from the last content token to the end, both cut to the same length
            length = emb.shape[1] - max(idx[i], g_idx[i] if g_idx is not None else idx[i])
            own = emb[i, idx[i]:idx[i] + length]
            guide = g_emb[i, g_idx[i]:g_idx[i] + length] if g_emb is not None else None
        out.append((own, guide))
    return out


def run(parts: DiffusionParts, concepts: list[ExpandedConcept] | MergedConcepts, config: UCEConfig,
        progress: ProgressCallback = null_progress) -> Delta:
    """Edit every attn2 to_k / to_v in closed form; the delta holds the dense differences (float16 `.diff`)."""
    config.validate()
    merged = c.as_merged(concepts)
    anchor_of = dict(merged.pairs)
    erase_prompts = list(merged.forget)
    guides = [anchor_of[p] for p in erase_prompts]
    preserve_prompts = list(merged.preserve)
    c.check_prompts(parts, [*erase_prompts, *guides, *preserve_prompts])
    start = time.time()
    erase = token_embeddings(parts, erase_prompts, guides, config.tokens)
    preserve = [own for own, _ in token_embeddings(parts, preserve_prompts, None, config.tokens)] \
        if preserve_prompts else []
    kinds = {"k": "attn2.to_k", "v": "attn2.to_v"}
    layers = {n: w for letter in config.projections for n, w in c.ff_weights(parts, kinds[letter]).items()}
    params = {}
    for i, (name, w) in enumerate(sorted(layers.items())):
        w = w.float().cpu()
        pairs = [(own, guide @ w.T) for own, guide in erase]  # v*_e = W_old c_guide, token by token
        new = closed_form(w, pairs, preserve, config.erase_scale, config.preserve_scale, config.lamb)
        if not bool(torch.isfinite(new).all()):
            raise ValueError(f"UCE's closed form is not finite at {name}: raise lamb (now {config.lamb})")
        params[f"{name}.weight"] = new - w
        progress(ProgressEvent("edit", i + 1, len(layers), {}, "closed-form edit of the cross-attention"))
    meta = c.metadata("uce", config, merged, erase=json.dumps(erase_prompts), guides=json.dumps(sorted(set(guides))),
                      preserve=json.dumps(preserve_prompts), seconds=f"{time.time() - start:.2f}")
    return Delta({}, meta, c.base_fingerprint(parts), params)
