"""The toy benchmark: method registry, the first rows' plumbing (VideoDDIMInvert + KSamplerAdvanced), the table."""

import numpy as np
import torch

import zsve.toy.benchmark as bench
import zsve.toy.metrics as tmetrics
import zsve.toy.model as toy_model
import zsve.toy.scenes as sc


def test_registry_and_table_with_a_registered_method():
    calls = []

    @bench.register("test: copy the source")
    def copy_source(model, clip, vae, frames, source_prompt, edit_prompt, spec):
        calls.append((source_prompt, edit_prompt, spec.edit.name, tuple(frames.shape)))
        return frames.clone()

    saved = []
    try:
        res = bench.run(None, None, None, ["test: copy the source"], steps=2, frames=3,
                        items=["color_swap", "two_object"], verbose=False,
                        on_row=lambda r: saved.append(bench.to_json(r)))
    finally:
        bench.METHODS.pop("test: copy the source")
    # each finished row is handed over at once, without its frames (what --json writes)
    assert len(saved) == 1 and "_frames" not in saved[0]["test: copy the source"]["items"]["color_swap"]
    assert saved[0]["test: copy the source"]["items"]["color_swap"]["psnr_bg"] == tmetrics.PSNR_CAP
    assert [c[2] for c in calls] == ["color_swap", "two_object"]
    assert calls[0][3] == (3, 128, 128, 3)
    assert calls[0][0] == "a red circle on gray" and calls[0][1] == "a blue circle on gray"
    mean = res["test: copy the source"]["mean"]
    assert mean["success"] == 0.0 and mean["others_kept"] == 1.0 and mean["leak"] == 0.0
    assert mean["psnr_bg"] == tmetrics.PSNR_CAP  # identical pixels: capped, so that a mean can count them
    t = bench.table(res)
    assert t.count("\n") == 2 and "test: copy the source" in t and "| 60.0 |" in t


def test_item_table_marks_reference_rows_and_ranks_methods_on_local_edits():
    def row(bg):
        return {"seconds": 1.0, "mean": {}, "items": {n: {"psnr_bg": v} for n, v in bg.items()}}

    names = ["color_swap", "shape_swap", "background_change"]
    res = {
        "A": row(dict(zip(names, [20.0, 30.0, 10.0]))),  # local mean 25
        "B": row(dict(zip(names, [22.0, 32.0, 0.0]))),  # local mean 27, worst on the global edit
        "Blended latent (ground-truth mask)": row(dict(zip(names, [60.0, 60.0, 60.0]))),
    }
    assert bench.local_items(res) == ["color_swap", "shape_swap"]
    assert bench.best_local(res) == "B"
    assert bench.best_local(res, methods_only=False) == "Blended latent (ground-truth mask)"
    t = bench.item_table(res).splitlines()
    assert t[0] == "| method | color_swap | shape_swap | mean (local) | background_change |"
    assert t[3] == "| B | 22.0 | 32.0 | 27.0 | 0.0 |"
    assert t[4].startswith("| Blended latent (ground-truth mask) *(ref)* |")


def test_first_rows_run_on_the_toy_model():
    model, clip, vae, _ = toy_model.load()
    names = ["per-frame edit without attention control", "inversion + edit prompt, no control",
             "reconstruction (source prompt)"]
    assert list(bench.METHODS)[:3] == names
    res = bench.run(model, clip, vae, names, steps=4, cfg=1.0, frames=2, items=["color_swap"], verbose=False)
    per_frame = res[names[0]]["items"]["color_swap"]["_frames"]
    whole = res[names[1]]["items"]["color_swap"]["_frames"]
    assert per_frame.shape == whole.shape == (2, 128, 128, 3)
    # without temporal attention the frames of a batch are independent: both rows agree closely
    assert abs(per_frame - whole).max() < 1e-3
    # inversion + source prompt at cfg 1 reconstructs the VAE round trip of the source
    spec = bench.BenchSpec(None, None, steps=10, cfg=1.0)
    frames = torch.from_numpy(sc.benchmark_set(2)[0].clip().frames)
    with torch.inference_mode():
        rec = bench.invert_and_sample(model, clip, vae, frames, "a red circle on gray", "a red circle on gray", spec)
        ref = bench.decode(vae, bench.encode_frames(vae, frames))
    # (28 dB measured on the committed checkpoint; a sample that ignored the source scores ~15 dB)
    assert tmetrics.masked_psnr(rec, ref) > 25
    # "PSNR vs VAE": the reference is the same round trip, the toy VAE's 8x8 block mean
    rt = bench.vae_round_trip(vae, frames)
    assert np.allclose(rt, ref.numpy()) and "psnr_vae" in res[names[1]]["items"]["color_swap"]
    f = frames.numpy()
    block = f.reshape(2, 16, 8, 16, 8, 3).mean((2, 4)).repeat(8, 1).repeat(8, 2)
    assert np.abs(rt - block).max() < 2e-3


def test_fatezero_latent_blend_row_composes_attention_blend_and_latent_blend():
    """"FateZero (local + latent blend)" = the local row + Latent Blend With Inversion in [0.2, 0.8): it runs on the
    toy model and the latent blending changes the result."""
    import zsve.toy.methods_fatezero  # noqa: F401  (registers the rows)

    model, clip, vae, _ = toy_model.load()
    names = ["FateZero (local blended)", "FateZero (local + latent blend)"]
    res = bench.run(model, clip, vae, names, steps=5, cfg=5.0, frames=2, items=["color_swap"], verbose=False)
    a, b = (res[n]["items"]["color_swap"]["_frames"] for n in names)
    assert a.shape == b.shape == (2, 128, 128, 3)
    assert abs(a - b).max() > 1e-2


def test_item_table_without_local_items():
    res = {"A": {"seconds": 1.0, "mean": {}, "items": {"background_change": {"psnr_bg": 40.0}}}}
    assert bench.item_table(res).splitlines() == ["| method | background_change |", "|---|---|", "| A | 40.0 |"]
    assert bench.best_local(res) is None


def test_methods_option_takes_labels_with_commas_and_names_the_rows_on_a_typo():
    for m in ("inversion + edit prompt, no control", "reconstruction (source prompt)"):
        assert m in bench.METHODS
    assert bench.parse_methods("inversion + edit prompt, no control,reconstruction (source prompt)") == [
        "inversion + edit prompt, no control", "reconstruction (source prompt)"]
    try:
        bench.parse_methods("reconstruction (source prompt),FateZero (styl)")
    except SystemExit as e:
        assert "'FateZero (styl)'" in str(e) and "reconstruction (source prompt)" in str(e)
    else:
        raise AssertionError("a misspelt row was accepted")


def test_merge_prints_the_union_of_rows_run_separately(tmp_path):
    import json

    def row(v):
        return {"seconds": 1.0, "mean": {k: v for k, _, _ in bench.COLUMNS},
                "items": {"color_swap": {"psnr_bg": v}, "background_change": {"psnr_bg": v}}}

    (tmp_path / "a.json").write_text(json.dumps({"A": row(20.0), "B": row(1.0)}))
    (tmp_path / "b.json").write_text(json.dumps({"B": row(30.0)}))  # a re-run of B replaces the earlier one
    res = bench.merge_json([tmp_path / "a.json", tmp_path / "b.json"])
    assert list(res) == ["A", "B"] and res["B"]["items"]["color_swap"]["psnr_bg"] == 30.0
    text = bench.report(res, "title")
    assert text.splitlines()[0] == "title" and "| B | 30.0 | 30.0 | 30.0 |" in text
    assert "reference rows excluded): B" in text
    # registered rows come in their registration order whatever the order of the runs; unknown rows last
    first, second = list(bench.METHODS)[:2]
    (tmp_path / "c.json").write_text(json.dumps({"B": row(1.0), second: row(2.0)}))
    (tmp_path / "d.json").write_text(json.dumps({first: row(3.0)}))
    assert list(bench.merge_json([tmp_path / "c.json", tmp_path / "d.json"])) == [first, second, "B"]


def test_fatezero_style_row_reweights_the_words_the_edit_adds():
    """The style row reweights what FateZero's eq_params would: the words of the edit prompt that are new."""
    from zsve.toy.methods_fatezero import added_words

    got = {s.name: added_words(bench.BenchSpec(s, None)) for s in sc.benchmark_set(2)}
    assert got == {"color_swap": ["blue"], "color_swap_stripes": ["red"], "shape_swap": ["circle"],
                   "background_change": ["green", "dots"], "two_object": ["yellow"], "background_recolor": ["blue"]}


# The CI subset of the held-out test split: its first item of each edit kind (a rule fixed before any row was run on
# it), 4 frames as the split's tables, 20 steps, guidance 5.
CI_ITEMS = ["test00_color", "test01_shape", "test02_two_object", "test03_background", "test04_background_recolor",
            "test05_object_background"]
# Issue 20's bar on the whole test split (toy/RESULTS.md): every editing row passes it there (FateZero (style), FateZero
# (local blended), FateZero (local + latent blend), Blended latent (attention mask), Video-P2P (fast), InFusion,
# Video-P2P (null-text), the last about 3 minutes of CPU on these items: edit ok >= 90%, preservation PSNR against the VAE round trip and warp error over the round trip's with their
# 95% intervals separated from the uncontrolled edit's); on this subset the means are asserted.
CI_ROWS = ["FateZero (style)", "FateZero (local blended)", "FateZero (local + latent blend)",
           "Blended latent (attention mask)", "Video-P2P (fast)", "InFusion", "Video-P2P (null-text)"]


def test_bar_rows_beat_no_control_on_the_ci_subset_of_the_test_split():
    """On a CI-sized fixed subset of the held-out test split (its first item of each edit kind), each of CI_ROWS edits
    >= 90% of the frames (measured on the committed 19500-step checkpoint: 100 / 100 / 96 / 96 / 100 / 100 / 100%, the
    uncontrolled edit 79%), keeps more of the frame on the local edits (mean preservation PSNR against the source's VAE
    round trip, the bar's: +8.1 / +7.3 / +16.3 / +32.3 / +13.5 / +10.5 / +18.6 dB measured; against the frames +4.9 /
    +4.5 / +10.3 / +17.1 / +9.2 / +8.1 / +9.5 dB) and flickers less (mean warp error 0.52x / 0.68x / 0.71x / 0.79x /
    0.69x / 0.62x / 0.69x of the uncontrolled edit's measured)
    than the uncontrolled edit. (The split's report compares 95% bootstrap intervals; with six items only the means
    are compared.)"""
    import zsve.toy.methods_bld  # noqa: F401  (registers the rows)
    import zsve.toy.methods_fatezero  # noqa: F401
    import zsve.toy.methods_infusion  # noqa: F401
    import zsve.toy.methods_videop2p  # noqa: F401

    assert [s.name for s in sc.split_set("test", 2)[:6]] == CI_ITEMS
    model, clip, vae, _ = toy_model.load()
    res = bench.run(model, clip, vae, [bench.BASELINE, *CI_ROWS], frames=4, items=CI_ITEMS, split="test",
                    verbose=False)
    loc = bench.local_items(res)
    assert loc == CI_ITEMS[:3]
    base = res[bench.BASELINE]

    def local_psnr(r, key="psnr_bg"):
        return sum(r["items"][n][key] for n in loc) / len(loc)

    assert bench.bar_psnr(res) == "PSNR vs VAE (local)"

    for m in CI_ROWS:
        r = res[m]
        assert r["mean"]["success"] >= bench.BAR_SUCCESS, (m, {n: s["success"] for n, s in r["items"].items()})
        assert local_psnr(r) > local_psnr(base) + 2.0, (m, local_psnr(r), local_psnr(base))
        assert local_psnr(r, "psnr_vae") > local_psnr(base, "psnr_vae") + 3.0, (m, local_psnr(r, "psnr_vae"))
        assert r["mean"]["warp_err"] < 0.85 * base["mean"]["warp_err"], (m, r["mean"]["warp_err"],
                                                                       base["mean"]["warp_err"])


def test_edit_end_of_text_maps_let_a_plain_background_turn_black():
    """Attention Blend's end_of_text_maps: with the source's maps on the edit prompt's end-of-text token and padding
    (Prompt-to-Prompt's and FateZero's alignment) FateZero (style) keeps the gray background of "a red square on
    gray" where black is asked for (measured: 0% of the frames; the uncontrolled edit 100%); with the edit's own maps
    (the default) it turns black in every frame. The item is off both splits (fresh seed 7070, found while looking
    for why the P2P-controlled rows missed background recolours; toy/RESULTS.md)."""
    from zsve.toy import methods_fatezero as mf

    name = "fresh10_background_recolor"
    spec = next(s for s in sc.split_set("fresh7070", 4) if s.name == name)
    assert (spec.source_prompt, spec.edit_prompt) == ("a red square on gray", "a red square on black")
    rows = {"FateZero (style), source end-of-text maps": dict(mf.STYLE, end_of_text_maps="source"),
            "FateZero (style), edit end-of-text maps": dict(mf.STYLE, end_of_text_maps="edit")}
    for label, cfg in rows.items():
        mf._row(label, **cfg)
    try:
        model, clip, vae, _ = toy_model.load()
        res = bench.run(model, clip, vae, list(rows), frames=4, items=[name], split="fresh7070", verbose=False)
    finally:
        for label in rows:
            bench.METHODS.pop(label, None)
    got = {label: r["items"][name]["success"] for label, r in res.items()}
    assert got == {"FateZero (style), source end-of-text maps": 0.0, "FateZero (style), edit end-of-text maps": 1.0}


def test_fatezero_rows_follow_the_reference_query_length_rule():
    """FateZero fuses the maps with at most 32x32 queries: SD at 512 px (64x64 latent) leaves its top level out,
    256-px frames (32x32 latent) and the toy's 128-px frames (16x16) fuse every level."""
    from zsve.attention.store import fatezero_skips_full_res

    assert fatezero_skips_full_res((64, 64)) and fatezero_skips_full_res((33, 32))
    assert not fatezero_skips_full_res((32, 32)) and not fatezero_skips_full_res((16, 16))


def test_bootstrap_intervals_are_seeded_and_cover_the_mean():
    vals = [0.0, 1.0] * 10 + [float("nan")]
    m, lo, hi = bench.bootstrap_ci(vals)
    assert m == 0.5 and lo < 0.5 < hi and 0.2 <= lo and hi <= 0.8
    assert bench.bootstrap_ci(vals) == (m, lo, hi)  # seeded
    assert bench.bootstrap_ci([3.0] * 5) == (3.0, 3.0, 3.0)
    assert all(v != v for v in bench.bootstrap_ci([]))
    # a row's intervals do not depend on the order its items were run or merged in
    items = {f"test{i:02d}_color": {"success": float(i % 3 == 0), "warp_err": 0.01 * (i % 5), "kind": "color",
                                    "local": True} for i in range(12)}
    shuffled = dict(reversed(list(items.items())))
    a = bench.summary({"r": {"items": items}})["r"]
    b = bench.summary({"r": {"items": shuffled}})["r"]
    assert a["edit ok"] == b["edit ok"] and a["warp err"] == b["warp err"]
    assert bench.paired_table({"r": {"items": items}}, {"r": {"items": items}}) == \
        bench.paired_table({"r": {"items": shuffled}}, {"r": {"items": shuffled}})


def test_paired_comparison_on_made_up_results(tmp_path):
    """--compare: rows matched by label (or a variant row by the longest label it starts with), items in both only,
    the paired difference after - before with its bootstrap interval, and edit ok per kind."""
    def item(kind, ok, psnr, local=True):
        return {"kind": kind, "local": local, "success": ok, "psnr_bg": psnr, "warp_err": 0.01}

    before = {"Row": {"items": {"a_color": item("color", 0.5, 20.0), "b_color": item("color", 1.0, 30.0),
                                "c_background": item("background", 0.0, 40.0, local=False),
                                "d_shape": item("shape", 1.0, 10.0)}, "mean": {}, "seconds": 1.0},
              "Other": {"items": {"a_color": item("color", 1.0, 20.0)}, "mean": {}, "seconds": 1.0}}
    after = {"Row, variant": {"items": {"a_color": item("color", 1.0, 18.0), "b_color": item("color", 1.0, 30.0),
                                        "c_background": item("background", 1.0, 40.0, local=False)},
                              "mean": {}, "seconds": 1.0},
             "Unmatched": {"items": {"a_color": item("color", 1.0, 20.0)}, "mean": {}, "seconds": 1.0}}
    assert bench.match_rows(before, after) == {"Row, variant": "Row"}
    text = bench.paired_table(before, after)
    row = next(line for line in text.splitlines() if line.startswith("| Row, variant vs Row |"))
    # three common items (d_shape is not in `after`): edit ok 50% -> 100%, every item up or equal
    assert "| 3 | 50.0, 100.0, +50.0 [+0.0, +100.0] |" in row
    # local PSNR over the two local common items: 25 -> 24 dB
    assert "25.00, 24.00, -1.00 [-2.00, +0.00]" in row
    assert "- Row, variant vs Row: color 75% -> 100% (2), background 0% -> 100% (1)" in text
    assert "Unmatched" not in text and "Other" not in text


def test_split_tables_and_the_bar_on_made_up_results():
    """The per-kind tables, the interval table and bar_check read the items' kinds and local flags."""
    def row(success, psnr, warp):
        items = {}
        for i in range(12):
            kind = ("color", "background")[i % 2]
            items[f"test{i:02d}_{kind}"] = {"success": success, "others_kept": 1.0, "psnr_bg": psnr + (i % 3),
                                            "ssim_bg": 0.9, "leak": 0.1, "warp_err": warp * (1 + 0.1 * (i % 3)),
                                            "rel_change": 1.0, "kind": kind, "local": kind == "color"}
        return {"seconds": 1.0, "mean": {}, "items": items}

    res = {bench.BASELINE: row(0.9, 20.0, 0.02), "FateZero (style)": row(1.0, 30.0, 0.01),
           "InFusion": row(0.5, 30.0, 0.01), "Video-P2P (fast)": row(1.0, 20.5, 0.01)}
    bar = bench.bar_check(res)
    assert bench.bar_psnr(res) == "PSNR bg (local)"  # results without the VAE measure: the bar reads the frames'
    assert bar["FateZero (style)"] == {"pass": True, "why": [], "note": ""}
    assert not bar["InFusion"]["pass"] and "edit ok 50%" in bar["InFusion"]["why"][0]
    assert not bar["Video-P2P (fast)"]["pass"] and "PSNR bg (local)" in bar["Video-P2P (fast)"]["why"][0]
    # just under the bar: not printed as "90% < 90%"
    near = bench.bar_check({**res, "InFusion": row(0.899, 30.0, 0.01)})["InFusion"]
    assert not near["pass"] and near["why"] == ["edit ok 89.9% < 90%"]
    # with "psnr_vae" in every row the bar reads it; the comparison against the frames is kept as a note
    def with_vae(r, v):
        return dict(r, items={n: dict(sc, psnr_vae=v + (n < "test06")) for n, sc in r["items"].items()})

    vres = {bench.BASELINE: with_vae(res[bench.BASELINE], 22.0), "Video-P2P (fast)": with_vae(res["Video-P2P (fast)"], 40.0),
            "FateZero (style)": with_vae(res["FateZero (style)"], 22.5)}
    assert bench.bar_psnr(vres) == "PSNR vs VAE (local)"
    # a reference row without it does not count; a bar row with it on part of its items does
    assert bench.bar_psnr({**vres, "reconstruction (source prompt)": res[bench.BASELINE]}) == "PSNR vs VAE (local)"
    part = dict(vres["FateZero (style)"], items=dict(vres["FateZero (style)"]["items"]))
    part["items"]["test00_color"] = res["FateZero (style)"]["items"]["test00_color"]
    assert bench.bar_psnr({**vres, "FateZero (style)": part}) == "PSNR bg (local)"
    vbar = bench.bar_check(vres)
    assert vbar["Video-P2P (fast)"]["pass"] and "PSNR bg (local) interval" in vbar["Video-P2P (fast)"]["note"]
    assert "not above" in vbar["Video-P2P (fast)"]["note"]  # against the frames it does not clear the baseline
    assert not vbar["FateZero (style)"]["pass"] and vbar["FateZero (style)"]["why"][0].startswith("PSNR vs VAE (local)")
    assert "PSNR vs VAE (local) and warp err intervals" in bench.split_report(vres, "t")
    assert "(for reference: PSNR bg (local) interval" in "\n".join(bench.bar_lines(vbar))
    assert bench.bar_warp(vres) == "warp err"  # results without the round trip's warp error

    # with "warp_vae" in every row the bar reads it: a flow error of the item common to every row (here 0 to 0.05)
    # widens the plain warp error's intervals until they overlap; the warp error over the round trip's separates them
    def with_floor(r, excess):
        items = {}
        for i, (n, sc_) in enumerate(r["items"].items()):
            w = excess * (1 + 0.1 * (i % 3))
            items[n] = dict(sc_, warp_err=0.05 * (i % 4) / 3 + w, warp_vae=w)
        return dict(r, items=items)

    wres = {bench.BASELINE: with_floor(vres[bench.BASELINE], 0.02),
            "Video-P2P (fast)": with_floor(vres["Video-P2P (fast)"], 0.01)}
    assert bench.bar_warp(wres) == "warp over VAE"
    wbar = bench.bar_check(wres)["Video-P2P (fast)"]
    assert wbar["pass"], wbar
    assert "warp err interval" in wbar["note"].split("; ")[-1] and "not below" in wbar["note"].split("; ")[-1]
    assert "PSNR vs VAE (local) and warp over VAE intervals" in bench.split_report(wres, "t")
    wres["Video-P2P (fast)"] = with_floor(vres["Video-P2P (fast)"], 0.02)  # as unsteady as the baseline: caught
    assert bench.bar_check(wres)["Video-P2P (fast)"]["why"][0].startswith("warp over VAE interval")
    kt = bench.kind_table(res).splitlines()
    assert kt[0] == "| method | color (6) | background (6) |" and kt[3] == "| FateZero (style) | 100% | 100% |"
    ci = bench.ci_table(res)
    assert "| FateZero (style) (12) | 100% [100, 100] |" in ci
    text = bench.split_report(res, "title")
    assert "- InFusion: FAIL: edit ok 50% < 90%" in text and "- FateZero (style): PASS" in text
    # the paired reading of the same comparison: each bar row minus the uncontrolled edit, item by item
    pairs = bench.baseline_pairs(res).splitlines()
    assert pairs[0].startswith("| row (row vs uncontrolled) | items | edit ok: before, after, difference [95%] |")
    assert pairs[2].startswith("| FateZero (style) | 12 | 90.0, 100.0, +10.0 [+10.0, +10.0] | 21.00, 31.00, +10.00")
    assert len(pairs) == 5 and "edit ok per edit kind" not in bench.baseline_pairs(res)
    assert "paired against 'inversion + edit prompt, no control'" in text


def test_object_and_background_edits_blend_and_fuse_every_changed_phrase():
    """Rule: the blend masks (FateZero, Video-P2P, Blended latent) cover every phrase the edit changes, and
    InFusion makes one concept of each changed phrase, compared phrase by phrase."""
    from zsve.toy.methods_bld import edit_words
    from zsve.toy.methods_fatezero import source_words
    from zsve.toy.methods_infusion import concepts_of

    s = next(x for x in sc.split_set("dev", 2) if x.name == "dev11_object_background")
    assert (s.source_prompt, s.edit_prompt) == ("a blue circle on black", "a red triangle on blue dots")
    spec = bench.BenchSpec(s, None)
    # comma-separated phrases: the Latent Blend node finds a phrase of several words as one run of tokens
    assert source_words(spec) == "blue circle, black" and edit_words(spec) == "red triangle, blue dots"
    assert concepts_of(s.source_prompt, s.edit_prompt) == "blue circle->red triangle, black->blue dots"
    assert concepts_of("a red circle on a gradient", "a red circle on gray") == "gradient->gray"
    assert concepts_of("a red circle and a green square on gray", "a red circle and a blue square on gray") == \
        "green->blue"


def test_object_and_background_blend_mask_covers_the_background_phrase_by_phrase():
    """FateZero's blend mask of an object + background edit (dev23: 'a blue triangle on gray' -> 'a green square on
    yellow stripes', blend words 'blue triangle, gray'), from the toy model's stored source cross-attention: masked
    phrase by phrase and united it covers far more of the background over the self-fusion steps than the reference's
    summed map, where the triangle's peak sets the maximum (measured 63% against 42% on the committed 19500-step
    checkpoint; 71% against 48% on the 16500-step one, 99% against 48% on the 9000-step one), so that the background
    can change there (issue 20, toy/RESULTS.md)."""
    import dataclasses

    import torch.nn.functional as F

    import zsve.toy.methods_fatezero as mf
    from zsve.attention import fatezero as afz

    fz = bench._pack().nodes.fatezero
    es = next(s for s in sc.split_set("dev", 4) if s.name == "dev23_object_background")
    clip_ = es.clip()
    spec = bench.BenchSpec(es, clip_, steps=20, cfg=5.0)
    model, clip, vae, _ = toy_model.load()
    with torch.inference_mode():
        m = fz.TemporalSelfAttentionPatch.execute(model, mode="middle", include_own_frame=False,
                                                  min_channels=0).result[0]
        sm = fz.AttentionStore.execute(m, record_window=0.5, skip_full_res=False, memory_budget_gb=0.0).result[0]
        _, inv = bench.invert(sm, bench.encode_frames(vae, torch.from_numpy(clip_.frames)),
                              bench.encode_text(clip, es.source_prompt), spec)
    pair = bench.prompt_pair(clip, es.source_prompt, es.edit_prompt, spec.negative_prompt)
    words = mf.source_words(spec)
    assert words == "blue triangle, gray"
    plan = afz.make_plan(pair.tokenizer, pair.source.plain, pair.edit.plain, inv.timesteps, blend_words=words,
                         self_window=(0.0, 0.5), cross_window=0.5)
    assert plan.blend_phrases is not None and len(plan.blend_phrases) == 2
    store = inv.records[fz.RECORD_NAME]
    hw = inv.latent_shape[-2:]
    background = F.interpolate(1 - torch.from_numpy(clip_.masks).float().amax(1)[:, None], size=tuple(hw),
                               mode="area")[:, 0] > 0.5

    def cover(p):
        return float(afz.preview_mask(store, p, hw)[background].mean())

    united, summed = cover(plan), cover(dataclasses.replace(plan, blend_phrases=None))
    assert united >= 0.6 and united >= summed + 0.15, (united, summed)
    assert summed <= 0.55, summed


def test_ground_truth_mask_row_covers_what_each_edit_kind_changes():
    """The ground-truth-mask Blended latent row (the ceiling of the automatic mask) blends under the region the edit
    changes: the edited object, the background for a background edit, the whole frame for object + background."""
    import zsve.toy.methods_bld as mb

    specs = {bench.item_kind(s): s for s in sc.split_set("dev", 2)}
    for kind in ("color", "background", "object_background"):
        es = specs[kind]
        c = es.clip()
        m = mb.ground_truth_mask(bench.BenchSpec(es, c))
        objects = torch.from_numpy(c.masks).float()
        assert m.shape == objects.shape[:1] + objects.shape[2:]
        if kind == "color":
            assert torch.equal(m, objects[:, es.target])
        elif kind == "background":
            assert torch.equal(m, 1 - objects.amax(1))
        else:
            assert bool((m == 1).all())


def test_edit_ok_on_the_items_the_model_draws(tmp_path):
    """--drawn: the items split by the model's own share of their edit prompt (toy.quality --split), each row's
    edit ok with its interval on both parts, the bar on the drawn part; an item without an entry is refused."""
    import json
    import subprocess
    import sys

    import pytest

    from zsve_boot import ROOT

    def row(ok_drawn, ok_other):
        items = {}
        for i in range(8):
            kind = ("color", "two_object")[i % 2]
            items[f"test{i:02d}_{kind}"] = {"success": ok_drawn if kind == "color" else ok_other, "others_kept": 1.0,
                                            "psnr_bg": 20.0 + i, "ssim_bg": 0.9, "leak": 0.1, "warp_err": 0.02,
                                            "rel_change": 1.0, "kind": kind, "local": True}
        return {"seconds": 1.0, "mean": {}, "items": items}

    res = {bench.BASELINE: row(0.75, 0.0), "InFusion": row(1.0, 0.5)}
    drawn = {n: {"drawn": 1.0 if "color" in n else 0.25, "kind": ""} for n in res["InFusion"]["items"]}
    drawn["test00_color"]["drawn"] = 0.875  # 7 of 8: drawn
    yes, no = bench.drawn_items(res, drawn)
    assert yes == ["test00_color", "test02_color", "test04_color", "test06_color"] and len(no) == 4
    t = bench.drawn_table(res, drawn).splitlines()
    assert t[0] == "| method | edit ok, edit prompt drawn (4) | edit ok, not drawn (4) |"
    assert t[3] == "| InFusion | 100% [100, 100] | 50% [50, 50] |"
    text = bench.split_report(res, "title", drawn)
    assert "- InFusion: FAIL: edit ok 75% < 90%" in text  # all 8 items
    on_drawn = text.split("the bar on those 4 items only:")[1]
    assert "- InFusion: FAIL: PSNR bg (local)" in on_drawn.split("paired")[0]
    assert "edit ok 75%" not in on_drawn and "| InFusion | 4 | 75.0, 100.0, +25.0" in on_drawn  # 100% there
    del drawn["test03_two_object"]
    with pytest.raises(ValueError, match="test03_two_object"):
        bench.drawn_items(res, drawn)
    # the command line: --merge of saved results with --drawn prints the table
    (tmp_path / "r.json").write_text(json.dumps(res))
    drawn["test03_two_object"] = {"drawn": 0.0, "kind": "two_object"}
    full = {t.name: {"drawn": 1.0, "kind": t.kind} for t in sc.split_set("test", 2)}
    (tmp_path / "full.json").write_text(json.dumps({"split": "test", "items": dict(full, **drawn)}))
    (tmp_path / "d.json").write_text(json.dumps({"split": "test", "items": drawn}))
    out = subprocess.run([sys.executable, "-m", "toy.benchmark", "--split", "test", "--merge", str(tmp_path / "r.json"),
                          "--drawn", str(tmp_path / "full.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| InFusion | 100% [100, 100] | 50% [50, 50] |" in out.stdout
    # checked before anything runs: a file of another split, a missing file, the public items
    with pytest.raises(SystemExit, match="for split 'test', not 'dev'"):
        bench.load_drawn(tmp_path / "d.json", "dev")
    with pytest.raises(SystemExit, match="no such file"):
        bench.load_drawn(tmp_path / "none.json", "test")
    with pytest.raises(SystemExit, match="generated split"):
        bench.load_drawn(tmp_path / "d.json", "public")
    with pytest.raises(SystemExit, match="no entry for"):  # the made-up file has 8 of the 42 test items
        bench.load_drawn(tmp_path / "d.json", "test")


def test_blended_latent_row_reweights_the_words_the_edit_adds(monkeypatch):
    """The Blended latent (attention mask) row (chosen on the dev split of issue 20) samples a model with Cross-Attention
    Reweight on the words the edit adds, x4, over the first half of the steps, next to its latent blend."""
    from zsve.attention.p2p import CrossAttentionReweight as Proc
    from zsve.toy import methods_bld
    from zsve_harness import processors_of_row

    spec = next(s for s in sc.benchmark_set(2) if s.name == "color_swap")
    clip_ = spec.clip()
    model, clip, vae, _ = toy_model.load()
    seen = processors_of_row(monkeypatch, methods_bld, lambda: bench.METHODS["Blended latent (attention mask)"](
        model, clip, vae, torch.from_numpy(clip_.frames), spec.source_prompt, spec.edit_prompt,
        bench.BenchSpec(spec, clip_, steps=4)))
    procs = [p for p in seen if isinstance(p, Proc)]
    assert len(procs) == 1 and procs[0].end == methods_bld.REWEIGHT_END == 0.5 and methods_bld.REWEIGHT == 4
    assert sorted(set(procs[0].equalizer.tolist())) == [1.0, 4.0] and int((procs[0].equalizer == 4).sum()) == 1
    assert len(seen) > 1  # the latent blend's own attention reader is there too


def test_saved_clips_score_again_with_the_vae_measure(tmp_path):
    """`--frames-dir` saves every edited clip and `--rescore` scores them again (with the toy VAE: "PSNR vs VAE"
    too) without running the row: the same scores up to the clips' 8-bit rounding."""
    _, _, vae, _ = toy_model.load()

    @bench.register("test: half the source")
    def half(model, clip, vae_, frames, source_prompt, edit_prompt, spec):
        return frames * 0.5 + 0.25

    item = next(s.name for s in sc.split_set("test", 2) if s.local and "stripes" in s.background.caption())
    try:
        res = bench.run(None, None, vae, ["test: half the source"], frames=2, items=[item], split="test",
                        verbose=False, frames_dir=tmp_path)
        again = bench.rescore(tmp_path, "test", 2, ["test: half the source"], vae=vae)
        plain = bench.rescore(tmp_path, "test", 2, ["test: half the source"])
    finally:
        bench.METHODS.pop("test: half the source")
    a, b = res["test: half the source"]["items"][item], again["test: half the source"]["items"][item]
    assert set(a) - {"_frames"} == set(b) and abs(a["psnr_vae"] - b["psnr_vae"]) < 0.1
    assert abs(a["warp_vae"] - b["warp_vae"]) < 2e-3 and "warp_vae" not in plain["test: half the source"]["items"][item]
    assert abs(a["psnr_bg"] - b["psnr_bg"]) < 0.1 and a["success"] == b["success"]
    assert a["psnr_vae"] != a["psnr_bg"]  # a striped or dotted background: the references differ
    assert "psnr_vae" not in plain["test: half the source"]["items"][item]
