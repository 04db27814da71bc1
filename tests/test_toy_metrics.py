"""Edit metrics on hand-made cases."""

import math

import numpy as np
import torch

import zsve.toy.metrics as tm
import zsve.toy.scenes as sc


def moving_square(frames=6, size=64, step=2):
    v = np.zeros((frames, size, size, 3), np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for f in range(frames):
        x0 = 10 + step * f
        v[f] = 0.2 + 0.1 * np.sin(xx / 5.0)[..., None]  # textured background so flow is defined
        v[f][(xx >= x0) & (xx < x0 + 16) & (yy >= 20) & (yy < 36)] = (1.0, 0.2, 0.2)
    return v


def test_psnr_ssim_identical_and_noisy():
    v = moving_square()
    assert tm.masked_psnr(v, v) == math.inf
    assert abs(tm.masked_ssim(v, v) - 1.0) < 1e-4
    rng = np.random.default_rng(0)
    noisy = np.clip(v + rng.normal(0, 0.05, v.shape).astype(np.float32), 0, 1)
    p = tm.masked_psnr(noisy, v)
    assert 24 < p < 28  # sigma 0.05 -> ~26 dB
    assert tm.masked_ssim(noisy, v) < 0.95
    # torch input works the same
    assert tm.masked_psnr(torch.from_numpy(noisy), torch.from_numpy(v)) == p


def test_psnr_ignores_the_edited_region():
    v = moving_square()
    e = v.copy()
    region = np.zeros(v.shape[:3], bool)
    region[:, 10:30, 10:30] = True
    e[region] = 0.9
    assert tm.masked_psnr(e, v) < 20
    assert tm.masked_psnr(e, v, region) == math.inf
    assert tm.masked_ssim(e, v, region) > tm.masked_ssim(e, v)
    assert tm.changed_fraction(e, v, ~region) == 0.0
    assert tm.changed_fraction(e, v, region) > 0.5


def test_warp_error_static_and_moving():
    static = np.repeat(moving_square(1), 5, 0)
    assert tm.warp_error(static, static) < 1e-8
    assert tm.relative_frame_change(static, static) == 0.0
    v = moving_square(step=2)
    good = tm.warp_error(v, v)
    flicker = v.copy()
    flicker[1::2] = np.clip(flicker[1::2] + 0.15, 0, 1)
    bad = tm.warp_error(flicker, v)
    assert good < 0.002
    assert bad > 5 * good and bad > 0.01
    assert abs(tm.relative_frame_change(v, v) - 1.0) < 1e-6
    assert tm.relative_frame_change(flicker, v) > 2.0


def test_toy_scores_of_the_source_and_of_a_perfect_colour_edit():
    spec = next(s for s in sc.benchmark_set(6) if s.name == "color_swap")
    clip = spec.clip()
    # "edit" = the source itself: everything kept, edit not done
    same = tm.toy_scores(clip.frames, clip, spec)
    assert same["psnr_bg"] == tm.PSNR_CAP and same["leak"] == 0.0 and same["others_kept"] == 1.0
    assert same["success"] == 0.0 and same["success_shape"] == 1.0 and same["success_color"] == 0.0
    # the perfect edit: render the same motion with the target colour
    m = spec.motions[0]
    target = sc.render_clip((sc.Motion(m.shape, spec.expect_color, m.start, m.end, m.r0, m.r1),),
                            spec.background, 6).frames
    ok = tm.toy_scores(target, clip, spec)
    assert ok["success"] == 1.0 and ok["psnr_bg"] == tm.PSNR_CAP and ok["leak"] == 0.0
    # flow on a flat object is imperfect: the perfect edit is as consistent as the source itself
    src_err = tm.warp_error(clip.frames, clip.frames)
    assert ok["warp_err"] < 1.5 * src_err + 1e-3


def test_toy_scores_background_and_two_object_edits():
    specs = {s.name: s for s in sc.benchmark_set(6)}
    bgspec = specs["background_change"]
    clip = bgspec.clip()
    edited = sc.render_clip(bgspec.motions, bgspec.edit_background, 6).frames
    s = tm.toy_scores(edited, clip, bgspec)
    assert s["success"] == 1.0 and s["others_kept"] == 1.0
    assert s["psnr_bg"] == tm.PSNR_CAP  # on a global edit "bg" is what must stay: the objects (inside their outline)
    assert tm.toy_scores(np.clip(edited * 0.8, 0, 1), clip, bgspec)["psnr_bg"] < 30  # dimmed objects are caught
    assert tm.toy_scores(clip.frames, clip, bgspec)["success"] == 0.0
    two = specs["two_object"]
    clip2 = two.clip()
    ms = list(two.motions)
    m = ms[two.target]
    ms[two.target] = sc.Motion(two.expect_shape, two.expect_color, m.start, m.end, m.r0, m.r1)
    good = tm.toy_scores(sc.render_clip(tuple(ms), two.background, 6).frames, clip2, two)
    assert good["success"] == 1.0 and good["others_kept"] == 1.0
    # leaking the edit into the other object too is caught
    o = ms[0]
    ms[0] = sc.Motion(o.shape, two.expect_color, o.start, o.end, o.r0, o.r1)
    leaky = tm.toy_scores(sc.render_clip(tuple(ms), two.background, 6).frames, clip2, two)
    assert leaky["success"] == 1.0 and leaky["others_kept"] < 1.0 and leaky["leak"] > 0.05


def test_preservation_against_the_vae_round_trip_on_a_striped_background():
    """The toy VAE is an 8x8 block mean: on a striped test item the frames' own round trip (what an edit that keeps
    every latent pixel decodes to) scores low against the frames and the cap against the round trip; an edit that
    changes the background outside the edited object is caught by both."""
    spec = next(s for s in sc.split_set("test", 2) if s.local and "stripes" in s.background.caption())
    clip = spec.clip()
    f = clip.frames
    rt = f.reshape(2, 16, 8, 16, 8, 3).mean((2, 4)).repeat(8, 1).repeat(8, 2)
    kept = tm.toy_scores(rt, clip, spec, latent_ref=rt)
    assert kept["psnr_bg"] < 30 and kept["psnr_vae"] == tm.PSNR_CAP
    assert "psnr_vae" not in tm.toy_scores(rt, clip, spec)  # only with a reference
    dimmed = tm.toy_scores(np.clip(rt * 0.8, 0, 1), clip, spec, latent_ref=rt)
    assert dimmed["psnr_vae"] < 30 and dimmed["psnr_bg"] < kept["psnr_bg"]
    # an object-and-background edit keeps only the other objects: nan without one, else measured on them
    ob = next(s for s in sc.split_set("test", 2) if s.target is not None and s.edit_background != s.background)
    c2 = ob.clip()
    r2 = c2.frames.reshape(2, 16, 8, 16, 8, 3).mean((2, 4)).repeat(8, 1).repeat(8, 2)
    v = tm.toy_scores(r2, c2, ob, latent_ref=r2)["psnr_vae"]
    assert (math.isnan(v) and len(ob.motions) == 1) or v == tm.PSNR_CAP


def test_warp_error_parts_find_a_flickering_object():
    """warp_error_parts: the shares of the warp error inside and outside the edited region add up to the whole, the
    source itself scores 0 on both, and an object that flickers is found inside."""
    spec = next(s for s in sc.benchmark_set(4) if s.name == "color_swap")
    clip = spec.clip()
    src = clip.frames
    reg = tm.edited_region(clip, spec)
    flows = tm.source_flows(src)
    flicker = src.copy()
    flicker[1::2][clip.masks[1::2, spec.target]] *= 0.5  # the object darkens every other frame
    whole = tm.warp_error(flicker, src, flows)
    assert abs(tm.warp_error(flicker, src, flows, reg) + tm.warp_error(flicker, src, flows, ~reg) - whole) < 1e-7
    same = tm.warp_error_parts(src, clip, spec)
    assert abs(same["inside"]) < 1e-9 and abs(same["outside"]) < 1e-9
    p = tm.warp_error_parts(flicker, clip, spec)
    assert p["inside"] > 0.005 and abs(p["outside"]) < 0.25 * p["inside"], p  # (flow errors at the outline move)


def test_warp_error_over_the_vae_round_trip():
    """warp_vae (toy_scores with a round trip): 0 for the round trip itself, the warp error minus the round trip's
    for any edit (so row-to-row differences are the warp error's), and a flickering object scores above 0 by what
    the flicker adds, however large the item's own flow error."""
    spec = next(s for s in sc.benchmark_set(4) if s.name == "color_swap")
    clip = spec.clip()
    src = clip.frames
    rt = src.reshape(4, 16, 8, 16, 8, 3).mean((2, 4)).repeat(8, 1).repeat(8, 2)
    assert tm.toy_scores(rt, clip, spec, latent_ref=rt)["warp_vae"] == 0.0
    assert "warp_vae" not in tm.toy_scores(rt, clip, spec)
    flicker = rt.copy()
    flicker[1::2][clip.masks[1::2, spec.target]] *= 0.5
    s = tm.toy_scores(flicker, clip, spec, latent_ref=rt)
    floor = tm.warp_error(rt, src)
    assert floor > 0 and abs(s["warp_vae"] - (s["warp_err"] - floor)) < 1e-12
    assert s["warp_vae"] > 0.005, s
    assert tm.warp_error_over(flicker, rt, src) == s["warp_vae"]
