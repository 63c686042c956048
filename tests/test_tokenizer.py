"""The testbed's CLIP tokenizer: a real BPE vocabulary read by stock CLIPTokenizer."""

import numpy as np
import pytest
from transformers import CLIPTokenizer

from trust_engine.testbed import paths, tokenizer, world


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer.save(tmp_path_factory.mktemp("tok"))


def test_every_world_word_is_one_token(tok):
    assert tokenizer.words_as_single_tokens(tok)


def test_round_trip_of_world_prompts(tok):
    rng = np.random.default_rng(0)
    for _ in range(200):
        prompt = world.describe(world.drop_attributes(world.random_scene(rng), rng), rng)
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length).input_ids
        assert len(ids) == tokenizer.MAX_LENGTH
        assert tok.decode(ids, skip_special_tokens=True) == prompt


def test_vocabulary_is_built_deterministically():
    assert tokenizer.build_vocab() == tokenizer.build_vocab()


def test_bundled_tokenizer_is_the_world_vocabulary(tok):
    bundled = CLIPTokenizer.from_pretrained(paths.PIPELINE / "tokenizer")
    prompt = "a picture of a crimson pentagram on top of the emerald wedge"
    assert bundled(prompt).input_ids == tok(prompt).input_ids
