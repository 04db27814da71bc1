"""Toy world scenes, clips, benchmark set and the colour/shape/background detectors (no model needed)."""

import numpy as np
import pytest

import zsve.toy.detect as det
import zsve.toy.metrics as tmetrics
import zsve.toy.scenes as sc


def blocky(img):
    """What the toy VAE round trip does: 8x8 block means, nearest upsampling."""
    h, w = img.shape[0] // 8, img.shape[1] // 8
    m = img.reshape(h, 8, w, 8, 3).mean((1, 3))
    return np.repeat(np.repeat(m, 8, 0), 8, 1)


def test_scenes_are_deterministic_by_seed():
    a = sc.random_scene(np.random.default_rng(7))
    b = sc.random_scene(np.random.default_rng(7))
    c = sc.random_scene(np.random.default_rng(8))
    assert a == b and a != c
    ia, _ = sc.render(a)
    ib, _ = sc.render(b)
    assert np.array_equal(ia, ib)
    ca, cb = sc.random_clip(3), sc.random_clip(3)
    assert np.array_equal(ca.frames, cb.frames) and np.array_equal(ca.masks, cb.masks) and ca.prompt == cb.prompt
    assert not np.array_equal(sc.random_clip(4).frames, ca.frames)


def test_captions():
    s = sc.Scene((sc.Obj("circle", "red", 64, 64, 20),), sc.Background("stripes", "blue"))
    assert s.caption() == "a red circle on blue stripes"
    two = sc.Scene((sc.Obj("circle", "red", 30, 64, 16), sc.Obj("square", "green", 90, 64, 16)),
                   sc.Background("gradient"))
    assert two.caption() == "a red circle and a green square on a gradient"
    assert sc.Scene((sc.Obj("triangle", "yellow", 64, 64, 20),), sc.Background("plain", "gray")).caption() == (
        "a yellow triangle on gray")


def test_heldout_split_is_disjoint_and_covers_every_word():
    held, train = set(sc.heldout_specs()), set(sc.train_specs())
    assert held and train and not (held & train)
    assert held | train == set(sc.single_specs())
    for shape, color, bg in held:  # each part of a held-out prompt is seen in training elsewhere
        assert any(s == shape for s, _, _ in train)
        assert any(c == color for _, c, _ in train)
        assert any(b == bg for _, _, b in train)
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sc.random_scene(rng, two_object_p=0.0)
        o = scene.objects[0]
        assert (o.shape, o.color, scene.background) not in held


def test_masks_are_the_object_pixels():
    clip = sc.random_clip(11, frames=8, two_objects=True)
    assert clip.frames.shape == (8, sc.SIZE, sc.SIZE, 3) and clip.masks.shape == (8, 2, sc.SIZE, sc.SIZE)
    assert clip.frames.dtype == np.float32 and 0 <= clip.frames.min() and clip.frames.max() <= 1
    for f in range(8):
        for i, m in enumerate(clip.motions):
            mask = clip.masks[f, i]
            assert mask.sum() > 300
            assert np.all(clip.frames[f][mask] == np.array(sc.COLORS[m.color], np.float32))
        bg = ~clip.masks[f].any(0)
        assert clip.frames[f][bg].max() <= 0.5  # backgrounds are dim
    # objects move
    c0 = np.argwhere(clip.masks[0, 0]).mean(0)
    c7 = np.argwhere(clip.masks[7, 0]).mean(0)
    assert np.abs(c0 - c7).max() > 1.0 or clip.masks[0, 0].sum() != clip.masks[7, 0].sum()


def test_benchmark_set():
    specs = sc.benchmark_set(8)
    kinds = {s.kind for s in specs}
    assert {"color", "shape", "background", "two_object"} <= kinds
    for s in specs:
        clip = s.clip()
        assert clip.prompt == s.source_prompt != s.edit_prompt
        assert clip.frames.shape[0] == 8
        assert clip.masks.any(axis=(2, 3)).all()  # every object visible in every frame
    two = next(s for s in specs if s.kind == "two_object")
    assert two.edit_prompt.split(" and ")[0] == two.source_prompt.split(" and ")[0]  # the other object stays


@pytest.mark.parametrize("fn", [lambda x: x, blocky], ids=["sharp", "blocky"])
def test_detector_reads_rendered_scenes(fn):
    rng = np.random.default_rng(5)
    n = 60
    color_ok = shape_ok = bg_ok = 0
    for _ in range(n):
        scene = sc.random_scene(rng, two_object_p=0.0, heldout_ok=True)
        img, _ = sc.render(scene)
        img = fn(img)
        d = det.detect(img)
        color_ok += d.color == scene.objects[0].color
        shape_ok += d.shape == scene.objects[0].shape
        fg = tmetrics.dilate(det.object_pixels(img), 8)
        bg_ok += tmetrics.detect_background(img, fg) == scene.background
    assert color_ok == n
    assert shape_ok >= 0.95 * n
    assert bg_ok >= 0.95 * n


@pytest.mark.parametrize("behind", sc.SHAPES)
@pytest.mark.parametrize("front", ["circle", "square"])
def test_an_object_partly_covered_by_its_neighbour_is_read_by_what_is_left_of_it(behind, front):
    """Two-object training scenes overlap (each object's centre on its own half, the objects up to 29 px half
    size): the one behind loses up to ~40% of itself. Read with the front object's coverage as what may cover it
    (`quality.read_named`), it is read as its own shape; read as if nothing covered it, a covered circle is a square
    or a triangle to the block fit. The front object is read right either way."""
    from zsve.toy import quality

    scene = sc.Scene((sc.Obj(behind, "red", 50.0, 64.0, 26.0), sc.Obj(front, "blue", 80.0, 64.0, 24.0)),
                     sc.Background("plain", "gray"))
    img, vis = sc.render(scene)
    hidden = 1 - vis[0].sum() / sc.shape_mask(behind, 50.0, 64.0, 26.0, sc.SIZE).sum()
    assert 0.1 < hidden < 0.5, hidden
    img = blocky(img)
    assert quality.read_named(img, "red", ["blue"]).shape == behind
    assert quality.read_named(img, "blue", ["red"]).shape == front
    if behind == "circle":  # what the reading did before it knew about covers
        assert det.detect(img, quality.object_region(img, "red")).shape != "circle"


def test_detector_sees_nothing_on_a_plain_background():
    img = sc.render_background(sc.Background("stripes", "red"))
    d = det.detect(img)
    assert d.color is None and d.shape is None


def test_restricted_scene_draws_only_from_its_smaller_world():
    bgs = [sc.Background("plain", "gray"), sc.Background("stripes", "red")]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        s = sc.restricted_scene(rng, ["red", "blue"], bgs, (28.0, 40.0))
        (o,) = s.objects
        assert o.color in ("red", "blue") and s.background in bgs and sc.allowed(o.color, s.background)
        assert 28.0 <= o.r <= 40.0 and o.r + 2 <= o.cx <= sc.SIZE - o.r - 2
        seen.add((o.shape, o.color, s.background.caption()))
    # every allowed combination appears (red is never drawn on red stripes)
    assert seen == {(shape, c, b.caption()) for shape in sc.SHAPES for c in ("red", "blue") for b in bgs
                    if sc.allowed(c, b)}
    a = sc.restricted_scene(np.random.default_rng(5), ["red"], bgs[:1])
    assert a == sc.restricted_scene(np.random.default_rng(5), ["red"], bgs[:1])
    with pytest.raises(ValueError, match="no allowed"):
        sc.restricted_scene(rng, ["red"], [sc.Background("dots", "red")])


def test_generated_splits_are_fixed_by_seed_and_cover_the_vocabulary():
    """Issue 20: a seeded generator over the whole toy vocabulary; dev >= 20 items, test >= 40, 60+ in all."""
    from collections import Counter

    dev, test = sc.split_set("dev", 4), sc.split_set("test", 4)
    assert len(dev) >= 20 and len(test) >= 40 and len(dev) + len(test) >= 60
    again = sc.split_set("test", 4)
    assert [s.as_dict() for s in again] == [s.as_dict() for s in test]  # fixed by the seed
    # dev grew from 24 to 60 items: its first 24, on which the rows' settings were chosen, are the same items
    assert len(dev) == 60 and [s.as_dict() for s in sc.generate_items(2020, 24, "dev", 4)] == [
        s.as_dict() for s in dev[:24]]
    names = [s.name for s in dev + test]
    assert len(set(names)) == len(names)
    assert {s.source_prompt for s in dev} != {s.source_prompt for s in test}
    for split in (dev, test):
        kinds = Counter(s.kind for s in split)
        assert set(kinds) == set(sc.EDIT_KINDS) and len(set(kinds.values())) == 1  # every kind, balanced
        assert {s.motion for s in split} == {"translate", "zoom", "cross"}
    colours, shapes, bgs = set(), set(), set()
    for s in test:
        for m in s.motions:
            colours.add(m.color)
            shapes.add(m.shape)
        colours.add(s.expect_color)
        shapes.add(s.expect_shape)
        bgs |= {s.background, s.edit_background}
    assert colours - {None} == set(sc.COLOR_NAMES) and shapes - {None} == set(sc.SHAPES)
    assert bgs == set(sc.all_backgrounds())
    for s in dev + test:
        assert s.source_prompt != s.edit_prompt
        for i, m in enumerate(s.motions):
            assert sc.allowed(m.color, s.background)
            assert sc.allowed(s.expect_color if i == s.target else m.color, s.edit_background)
        assert s.local == (s.kind in ("color", "shape", "two_object"))


def test_every_generated_item_scores_its_perfect_edit_right_and_the_unedited_clip_wrong():
    """The requested clip rendered (through the VAE's 8x8 blocks) succeeds in every frame and keeps every other
    object / the background; the source clip itself succeeds in none (the metric can tell an edit from none)."""
    from dataclasses import replace

    for s in sc.split_set("dev", 4) + sc.split_set("test", 4):
        clip = s.clip()
        mo = list(s.motions)
        if s.target is not None:
            mo[s.target] = replace(mo[s.target], shape=s.expect_shape, color=s.expect_color)
        want = sc.render_clip(tuple(mo), s.edit_background, s.frames, s.phase).frames
        good = tmetrics.toy_scores(np.stack([blocky(f) for f in want]), clip, s)
        assert good["success"] == 1.0, s.name
        assert good["others_kept"] == 1.0 or good["others_kept"] != good["others_kept"], s.name  # nan: none
        assert tmetrics.toy_scores(clip.frames, clip, s)["success"] == 0.0, s.name


def test_fresh_sets_are_seeded_and_stay_off_the_benchmark_splits():
    """split_set("fresh<seed>"): FRESH_N items of the split generator with another seed, for diagnostics off dev and
    test; a split's own seed is refused, and the benchmark's --split accepts the name."""
    import argparse

    import zsve.toy.benchmark as bench

    fresh = sc.split_set("fresh7070", 2)
    assert len(fresh) == sc.FRESH_N and fresh[0].name.startswith("fresh00_")
    assert [s.edit_prompt for s in fresh] == [s.edit_prompt for s in sc.split_set("fresh7070", 2)]
    assert [s.source_prompt for s in fresh[:24]] != [s.source_prompt for s in sc.split_set("dev", 2)]
    with pytest.raises(ValueError, match="benchmark split's seed"):
        sc.split_set(f"fresh{sc.SPLITS['test'][0]}")
    with pytest.raises(ValueError, match="unknown split"):
        sc.split_set("fresh")
    assert bench._split_name("fresh7070") == "fresh7070" and bench._split_name("dev") == "dev"
    with pytest.raises(argparse.ArgumentTypeError):
        bench._split_name("train")


def test_two_object_training_scenes_name_either_side_first_only_when_asked():
    """random_scene(either_side=True): the first-named object is on the left or on the right with equal odds (the
    benchmark's crossing clips name the right-hand object first in their later frames); by default it is always on
    the left, drawn from the same random stream as before the option existed (the committed model's training)."""
    def firsts(either, seed):
        rng = np.random.default_rng(seed)
        scenes = [sc.random_scene(rng, two_object_p=1.0, either_side=either) for _ in range(200)]
        return [s.objects[0].cx < s.objects[1].cx for s in scenes], scenes

    left, plain = firsts(False, 3)
    assert all(left)
    mixed, _ = firsts(True, 3)
    assert 70 <= sum(mixed) <= 130
    # the default's stream: the same scenes as a draw without the argument
    rng = np.random.default_rng(3)
    assert [sc.random_scene(rng, two_object_p=1.0) for _ in range(200)] == plain


def test_training_scenes_on_dots_only_as_often_as_asked():
    """random_scene(dots_p=p): that share of the one-object scenes is drawn from the combinations on dots (else
    uniform: 3 of the 12 backgrounds); 0 keeps the committed model's random stream."""
    def draw(p, seed=5, n=400):
        rng = np.random.default_rng(seed)
        return [sc.random_scene(rng, two_object_p=0.0, dots_p=p) for _ in range(n)]

    plain = draw(0.0)
    rng = np.random.default_rng(5)
    assert [sc.random_scene(rng, two_object_p=0.0) for _ in range(400)] == plain
    share = [sum(s.background.kind == "dots" for s in draw(p)) / 400 for p in (0.0, 0.5)]
    assert 0.15 <= share[0] <= 0.35 and 0.55 <= share[1] <= 0.75, share
    heldout = {(s, c, b.caption()) for s, c, b in sc.heldout_specs()}
    assert all((o.shape, o.color, s.background.caption()) not in heldout for s in draw(0.5) for o in s.objects)


def test_an_edit_prompt_in_the_toy_vocabulary_becomes_the_edit_the_metrics_judge():
    """scenes.edit_with_prompt (the demo's toy scores for a user's --edit-prompt): every generated item's edit is read
    back from its edit prompt alone (target, expected colour/shape, background, kind); on another clip's item the
    edit a user types is judged, not the clip's own; prompts outside the vocabulary or changing two objects give None."""
    from dataclasses import replace

    for s in sc.split_set("dev", 4) + sc.split_set("test", 4):
        blank = replace(s, target=None, expect_shape=None, expect_color=None, edit_background=s.background,
                        kind="color")
        got = sc.edit_with_prompt(blank, s.edit_prompt)
        assert got is not None, s.name
        assert (got.target, got.expect_color, got.expect_shape, got.edit_background) == (
            s.target, s.expect_color, s.expect_shape, s.edit_background), s.name
        assert got.kind == s.kind and got.edit_prompt == s.edit_prompt, s.name
    item = {s.name: s for s in sc.benchmark_set(4)}["color_swap_stripes"]  # a yellow triangle on blue stripes
    assert sc.edit_with_prompt(item, item.edit_prompt) is item
    green = sc.edit_with_prompt(item, "a green triangle on blue stripes")
    assert (green.kind, green.target, green.expect_color, green.expect_shape) == ("color", 0, "green", "triangle")
    clip = item.clip()
    want = sc.render_clip((replace(item.motions[0], color="green"),), item.background, item.frames, item.phase).frames
    assert tmetrics.toy_scores(want, clip, green)["success"] == 1.0
    assert tmetrics.toy_scores(want, clip, item)["success"] == 0.0  # the clip's own (red) edit: what the demo judged
    assert sc.edit_with_prompt(item, "A Green  triangle on blue stripes.").edit_prompt == green.edit_prompt
    for prompt in ("a yellow triangle on blue stripes", "a purple triangle on blue stripes", "a green cat",
                   "a green triangle on blue waves", "a green triangle and a red circle on blue stripes"):
        assert sc.edit_with_prompt(item, prompt) is None, prompt
    two = {s.name: s for s in sc.benchmark_set(4)}["two_object"]  # a green circle and a red square on gray
    assert sc.edit_with_prompt(two, "a blue circle and a blue square on gray") is None  # two objects change
    assert sc.edit_with_prompt(two, "a blue circle and a red square on gray").target == 0
