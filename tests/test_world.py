"""The concept world: deterministic renders, prompt parsing and matching, vocabulary errors."""

import numpy as np
import pytest

from trust_engine.testbed import data, world


def test_render_is_deterministic_for_a_seed():
    a_images, a_labels = data.render_set(64, seed=5, empty_share=0.1)
    b_images, b_labels = data.render_set(64, seed=5, empty_share=0.1)
    c_images, _ = data.render_set(64, seed=6, empty_share=0.1)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)


def test_render_draws_the_objects_colour():
    rng = np.random.default_rng(0)
    image, _ = world.render(world.Scene((world.Obj("square", "blue"),)), rng)
    blue = (image[..., 2] > 0.7) & (image[..., 0] < 0.3)
    assert 40 < blue.sum() < 32 * 32 / 2


def test_next_to_is_labelled_left_object_first():
    rng = np.random.default_rng(1)
    scene = world.Scene((world.Obj("circle", "red"), world.Obj("square", "green")), "next to")
    for _ in range(20):
        image, seen = world.render(scene, rng)
        red_x = np.nonzero((image[..., 0] > 0.7) & (image[..., 1] < 0.3))[1].mean()
        green_x = np.nonzero((image[..., 1] > 0.5) & (image[..., 0] < 0.3))[1].mean()
        assert (seen.objects[0].colour == "red") == (red_x < green_x)


@pytest.mark.parametrize(
    "prompt, scene",
    [
        ("a red circle", world.Scene((world.Obj("circle", "red"),))),
        ("a picture of a crimson disc", world.Scene((world.Obj("circle", "red"),))),
        ("a circle", world.Scene((world.Obj("circle", None),))),
        ("an azure shape", world.Scene((world.Obj(None, "blue"),))),
        ("a wedge on top of the golden box", world.Scene((world.Obj("triangle", None), world.Obj("square", "yellow")), "on")),
        ("a star beside a box", world.Scene((world.Obj("star", None), world.Obj("square", None)), "next to")),
    ],
)
def test_parse_reads_what_a_prompt_asks_for(prompt, scene):
    assert world.parse(prompt) == scene


def test_matches_respects_order_of_on_but_not_of_next_to():
    seen_on = world.Scene((world.Obj("circle", "red"), world.Obj("square", "blue")), "on")
    assert world.matches(world.parse("a circle on a square"), seen_on)
    assert not world.matches(world.parse("a square on a circle"), seen_on)
    seen_next = world.Scene((world.Obj("circle", "red"), world.Obj("square", "blue")), "next to")
    assert world.matches(world.parse("a blue square next to a red circle"), seen_next)
    assert not world.matches(world.parse("a red circle"), seen_next)


def test_match_matrix_agrees_with_matches():
    _, labels = data.render_set(80, seed=3)
    prompts, asked = data.random_prompts(labels, np.random.default_rng(4))
    matrix = data.match_matrix(asked, labels)
    for i in range(0, 80, 3):
        for j in range(80):
            assert matrix[i, j] == world.matches(world.parse(prompts[j]), data.decode_scene(labels[i]))
    assert matrix.diagonal().all()


def test_words_outside_the_vocabulary_get_a_clear_error():
    with pytest.raises(world.UnknownWordError, match=r"'cat'.*'table'") as info:
        world.check_words("a cat on the table")
    assert "circle" in str(info.value)  # it says what the testbed does know
    world.check_words("A Picture of a RED circle")  # case does not matter
