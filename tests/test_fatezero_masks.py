"""attention/masks.py against hand-computed cases."""

import pytest
import torch

from zsve.attention import masks


def _two_layer_maps():
    a = torch.zeros(1, 16, 3)
    a[0, 0, 1] = 1.0  # pixel (0, 0), token 1
    b = torch.zeros(1, 16, 3)
    b[0, 15, 1] = 0.5  # pixel (3, 3), token 1
    b[0, 5, 2] = 9.0  # another token: must be ignored
    return [a, b]


def test_word_map_sums_tokens_and_averages_layers():
    maps = _two_layer_maps()
    wm = masks.word_map(maps, [(4, 4), (4, 4)], [1])
    expect = torch.zeros(1, 4, 4)
    expect[0, 0, 0] = 0.5
    expect[0, 3, 3] = 0.25
    assert torch.allclose(wm, expect)
    # several tokens are summed
    wm2 = masks.word_map(maps, [(4, 4), (4, 4)], [1, 2])
    assert torch.isclose(wm2[0, 1, 1], torch.tensor(4.5))
    # per-head maps are averaged over heads first
    per_head = torch.stack([maps[0] * 2, maps[0] * 0], dim=1)  # mean over heads == maps[0]
    assert torch.allclose(masks.word_map([per_head], [(4, 4)], [1]), masks.word_map([maps[0]], [(4, 4)], [1]))


def test_mask_pool_normalise_threshold():
    maps = _two_layer_maps()
    soft = masks.cross_attention_mask(maps, [(4, 4), (4, 4)], [1], out_hw=(4, 4), threshold=None)
    expect = torch.zeros(1, 4, 4)
    expect[0, 0:2, 0:2] = 1.0  # 0.5 spread by the 3x3 max-pool, normalised by the max 0.5
    expect[0, 2:4, 2:4] = 0.5  # 0.25 / 0.5
    assert torch.allclose(soft, expect)
    hard = masks.cross_attention_mask(maps, [(4, 4), (4, 4)], [1], out_hw=(4, 4), threshold=0.6)
    assert torch.equal(hard, (expect > 0.6).float())
    low = masks.cross_attention_mask(maps, [(4, 4), (4, 4)], [1], out_hw=(4, 4), threshold=0.3)
    assert low.sum() == 8
    nopool = masks.cross_attention_mask(maps, [(4, 4), (4, 4)], [1], out_hw=(4, 4), threshold=0.3, pool=False)
    assert nopool.sum() == 2 and nopool[0, 0, 0] == 1 and nopool[0, 3, 3] == 1  # 1.0 and 0.5 > 0.3

def test_mask_resize_nearest_and_per_frame_normalisation():
    m = torch.zeros(2, 4, 3)
    m[0, 0, 0] = 0.2  # frame 0: pixel (0,0)
    m[1, 3, 0] = 0.8  # frame 1: pixel (1,1)
    out = masks.cross_attention_mask([m], [(2, 2)], [0], out_hw=(4, 4), threshold=0.5, pool=False)
    assert out.shape == (2, 4, 4)
    # each frame normalised by its own max: both frames have a full 2x2 block (nearest upsampling)
    assert out[0, :2, :2].sum() == 4 and out[0].sum() == 4
    assert out[1, 2:, 2:].sum() == 4 and out[1].sum() == 4
    # an all-zero frame stays zero (no division by zero)
    z = masks.cross_attention_mask([torch.zeros(1, 4, 3)], [(2, 2)], [0], out_hw=(2, 2), threshold=0.3)
    assert z.sum() == 0 and torch.isfinite(z).all()


def test_mixed_resolutions_are_resized_to_the_largest():
    a = torch.zeros(1, 16, 1)
    a[0, :, 0] = 1.0
    b = torch.full((1, 4, 1), 3.0)
    wm = masks.word_map([a, b], [(4, 4), (2, 2)], [0])
    assert wm.shape == (1, 4, 4) and torch.allclose(wm, torch.full((1, 4, 4), 2.0))


def test_dilate_temporal_smooth_union():
    m = torch.zeros(3, 5, 5)
    m[1, 2, 2] = 1
    d = masks.dilate(m, 1)
    assert d[1].sum() == 9 and d[0].sum() == 0
    t = masks.temporal_smooth(m, 1, "max")
    assert t[:, 2, 2].tolist() == [1, 1, 1] and t.sum() == 3
    tm = masks.temporal_smooth(m, 1, "mean")
    assert torch.allclose(tm[:, 2, 2], torch.tensor([1 / 3, 1 / 3, 1 / 3]))
    u = masks.union(m, d)
    assert torch.equal(u, d)


def _peaked_and_spread(f=2, h=8, w=8, t=8):
    """Maps [F, h*w, T]: token 2 peaks on one pixel (an object), token 5 is spread thinly over the left half
    (a background): summed, the peak sets the frame's maximum and the spread token falls under 0.3."""
    m = torch.zeros(f, h * w, t)
    m[:, 3 * w + 6, 2] = 1.0
    left = torch.zeros(h, w)
    left[:, : w // 2] = 0.1
    m[:, :, 5] = left.flatten()
    return m


def test_phrases_are_masked_one_by_one_and_united():
    """A list of phrases: each phrase normalised on its own, the union of the maps thresholded; the reference's
    summed mask loses the spread phrase (issue 20: an object + background edit blended the background away)."""
    m = _peaked_and_spread()
    summed = masks.cross_attention_mask([m], [(8, 8)], [2, 5], 8, threshold=0.3, pool=False)
    assert summed.sum() == 2  # only the peak survives the threshold, in each frame
    united = masks.cross_attention_mask([m], [(8, 8)], [[2], [5]], 8, threshold=0.3, pool=False)
    assert united[:, :, :4].eq(1).all() and united[0, 3, 6] == 1 and united[:, :, 4:].sum() == 2
    assert torch.equal(united, torch.maximum(
        masks.cross_attention_mask([m], [(8, 8)], [2], 8, threshold=0.3, pool=False),
        masks.cross_attention_mask([m], [(8, 8)], [5], 8, threshold=0.3, pool=False)))
    # one phrase given as a list of phrases is the flat recipe exactly
    assert torch.equal(masks.cross_attention_mask([m], [(8, 8)], [[2, 5]], 8, threshold=None),
                       masks.cross_attention_mask([m], [(8, 8)], [2, 5], 8, threshold=None))
    for bad in ([], [[2], 5], [[], []]):
        with pytest.raises(ValueError):
            masks.cross_attention_mask([m], [(8, 8)], bad, 8)


def test_fatezero_blend_words_keep_their_phrases():
    """FateZero's plan keeps the comma-separated blend phrases (one mask each); one phrase keeps the flat list."""
    from test_align import ToyTokenizer

    from zsve.attention import align, fatezero

    tok = ToyTokenizer()
    src, edit = "a blue circle on green dots", "a red square on a gradient"
    ts = [-1, 1, 500, 999]
    plan = fatezero.make_plan(tok, src, edit, ts, blend_words="blue circle, green dots")
    assert plan.blend_phrases == [[2, 3], [5, 6]] and plan.blend_indices == [2, 3, 5, 6]
    one = fatezero.make_plan(tok, src, edit, ts, blend_words="blue circle")
    assert one.blend_phrases is None and one.blend_indices == [2, 3]
    assert align.split_phrases(" red hat,, green  dots ,") == [["red", "hat"], ["green", "dots"]]


def test_word_share_mask_finds_a_word_that_is_weak_everywhere_but_at_a_peak():
    """A plain background word: the background attends mostly to the padding (token 4), and of what it gives the
    words (1-2) it gives the background word (2) the most; one peak sets the frame's maximum, so the FateZero mask
    finds the peak only and the share mask the whole background."""
    q = 4 * 4
    m = torch.zeros(1, q, 6)
    obj = torch.zeros(4, 4, dtype=torch.bool)
    obj[1:3, 1:3] = True
    m[0, :, 4] = 1.0  # the padding takes nearly everything
    m[0, obj.flatten(), 1] = 0.02  # the object's word
    m[0, ~obj.flatten(), 2] = 1e-4  # the background word, weak ...
    m[0, 0, 2] = 0.3  # ... but for one peak
    m[0, obj.flatten(), 2] = 1e-5
    fz = masks.cross_attention_mask([m], [(4, 4)], [2], (4, 4), pool=False)
    assert int(fz.sum()) == 1
    share = masks.word_share_mask([m], [(4, 4)], [2], [1, 2], (4, 4))
    assert torch.equal(share[0].bool(), ~obj)
    assert torch.equal(masks.word_share_mask([m], [(4, 4)], [1], [1, 2], (8, 8))[0, 2:6, 2:6].bool(),
                       torch.ones(4, 4, dtype=torch.bool))  # resized (nearest)
    assert masks.word_share_mask([torch.zeros(1, q, 6)], [(4, 4)], [2], [1, 2], (4, 4)).sum() == 0  # no attention
    with pytest.raises(ValueError, match="among the prompt's word positions"):
        masks.word_share_mask([m], [(4, 4)], [3], [1, 2], (4, 4))
    with pytest.raises(ValueError, match="share must be in"):
        masks.word_share_mask([m], [(4, 4)], [2], [1, 2], (4, 4), share=1.0)
