"""The testbed's CLIP tokenizer: a real byte-pair vocabulary (vocab.json + merges.txt) learned over the world's
words, so every world word is one token and the stock `CLIPTokenizer` of any transformers version reads it.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

from . import world

MAX_LENGTH = 20  # tokens incl. start/end; the longest world prompt needs 14
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def build_vocab() -> tuple[dict[str, int], list[str]]:
    """Learn byte-pair merges until every world word is a single token.

    Written out (a few lines) rather than with `tokenizers`' trainer because that breaks ties between equally
    frequent pairs differently from run to run, and the token ids must be the same on every rebuild.
    """
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in world.vocabulary()]
    merges: list[str] = []
    while any(len(w) > 1 for w in words):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, ties alphabetically
        merges.append(" ".join(best))
        for k, w in enumerate(words):
            merged, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    merged.append(w[i] + w[i + 1])
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[k] = merged
    letters = list(string.ascii_lowercase)
    tokens = list(SPECIALS) + letters + [c + "</w>" for c in letters] + ["".join(m.split()) for m in merges]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_vocab_files(folder: str | Path) -> None:
    """vocab.json + merges.txt: what every transformers version's CLIPTokenizer reads (4.x needs them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, sort_keys=True))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def save(folder: str | Path) -> CLIPTokenizer:
    """Write the tokenizer folder of the pipeline and return it loaded back through the stock class."""
    folder = Path(folder)
    write_vocab_files(folder)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1],
        "unk_token": SPECIALS[1],
        "pad_token": SPECIALS[1],
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return CLIPTokenizer.from_pretrained(folder)


def words_as_single_tokens(tokenizer: CLIPTokenizer) -> bool:
    """True when every world word is exactly one token (the property the text encoder relies on)."""
    return all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in world.vocabulary())
