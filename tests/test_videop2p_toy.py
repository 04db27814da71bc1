"""The Video-P2P rows of the toy benchmark are registered and run on the toy model (smoke test: 2 frames,
2 steps; only the fast row is run here to spare the CPU — the null-text path is covered by test_videop2p.py)."""

from __future__ import annotations

import math

import zsve.toy.benchmark as bench
import zsve.toy.methods_videop2p  # noqa: F401  (registers the rows)
import zsve.toy.model as toy_model

ROWS = ["Video-P2P (fast)", "Video-P2P (null-text)"]


def test_videop2p_rows_run_on_the_toy_model():
    assert all(r in bench.METHODS for r in ROWS)
    assert "toy.methods_videop2p" in bench.METHOD_MODULES
    model, clip, vae, _ = toy_model.load()
    res = bench.run(model, clip, vae, ROWS[:1], steps=2, cfg=5.0, frames=2, items=["color_swap"], verbose=False)
    r = res[ROWS[0]]
    assert r["items"]["color_swap"]["_frames"].shape == (2, 128, 128, 3)
    assert all(isinstance(v, float) and not math.isnan(v) for v in r["mean"].values())
    print("\n" + bench.table(res))


def test_videop2p_row_blends_on_both_prompts_words(monkeypatch):
    """Local Blend of the rows unites the source prompt's words of what the edit changes with the edit prompt's words
    for them, as Video-P2P's configs pair them (road/railway): a background change blends on both backgrounds."""
    from zsve.toy import scenes as sc
    from zsve_harness import node_calls

    calls = node_calls(monkeypatch, bench._pack().nodes.videop2p.VideoP2PGuiderNode)
    es = next(s for s in sc.split_set("dev", 2) if s.name == "dev03_background")
    assert (es.source_prompt, es.edit_prompt) == ("a blue triangle on gray", "a blue triangle on red stripes")
    model, clip, vae, _ = toy_model.load()
    bench.run(model, clip, vae, ROWS[:1], steps=2, cfg=5.0, frames=2, items=[es.name], split="dev", verbose=False)
    assert [(a[9], a[10]) for a, _ in calls] == [("gray", "red stripes")]  # blend_words, blend_words_edit
