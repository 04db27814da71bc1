"""The shipped FateZero workflows run headless through ComfyUI's executor (tiny model)."""

from __future__ import annotations

import torch

from zsve_harness import CAPTURED, run_prompt
from zsve_workflows import shipped_prompt

STEPS = 4


def _run(name, io_dirs, tiny_model, tiny_clip, tiny_vae, blend=None, capture=(), overrides=None):
    prompt, by_type = shipped_prompt(name, (tiny_model, tiny_clip, tiny_vae), io_dirs / "in", frames=3)
    prompt[by_type["VideoDDIMInvert"]]["inputs"]["steps"] = STEPS
    prompt[by_type["KSamplerAdvanced"]]["inputs"]["steps"] = STEPS
    # the tiny UNet has 32/64 channels (SD1.5's 640 would keep it per-frame) and an 8x8 latent here
    prompt[by_type["TemporalSelfAttentionPatch"]]["inputs"]["min_channels"] = 0
    prompt[by_type["AttentionBlend"]]["inputs"].update(blend or {})
    for node, inputs in (overrides or {}).items():
        prompt[by_type[node]]["inputs"].update(inputs)
    for key, (node, slot) in {"inv": ("VideoDDIMInvert", 1), "mask": ("AttentionBlend", 1), **dict(capture)}.items():
        prompt[f"cap_{key}"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [by_type[node], slot], "key": key}}
    res = run_prompt(prompt)
    saved = list((io_dirs / "out").rglob("*.mp4"))
    assert len(saved) == 1 and saved[0].name.startswith(name.split("_")[0] + "_" + name.split("_")[1])
    return res, CAPTURED["inv"], CAPTURED["mask"]


def test_style_workflow_runs_headless(io_dirs, tiny_model, tiny_clip, tiny_vae):
    _, inv, mask = _run("fatezero_style_edit", io_dirs, tiny_model, tiny_clip, tiny_vae)
    st = inv.records["attention"]
    assert st.frames == 3 and st.nbytes > 0
    assert mask.shape == (3, 64, 64) and torch.all(mask == 1)


def test_local_attribute_workflow_runs_headless(io_dirs, tiny_model, tiny_clip, tiny_vae):
    # the random tiny model's cross-attention is nearly flat: a high threshold keeps the mask partial
    _, inv, mask = _run("fatezero_attribute_edit", io_dirs, tiny_model, tiny_clip, tiny_vae,
                        {"blend_threshold": 0.95})
    assert mask.shape == (3, 64, 64) and 0 < float(mask.mean()) < 1


def test_local_latent_blend_workflow_runs_headless(io_dirs, tiny_model, tiny_clip, tiny_vae):
    """The local edit plus Latent Blend With Inversion under the union of Attention Blend's mask (wired into its
    `mask`) and the edited words' edit-time mask runs, and the latent blending changes the result."""
    cap = [("out", ("KSamplerAdvanced", 0))]
    # the random tiny model's flat cross-attention: high thresholds keep both masks partial
    _, _, mask = _run("fatezero_latent_blend_edit", io_dirs, tiny_model, tiny_clip, tiny_vae,
                      {"blend_threshold": 0.95}, capture=cap,
                      overrides={"LatentBlendWithInversion": {"threshold": 0.95, "dilation": 1}})
    blended = CAPTURED["out"]["samples"]
    for f in (io_dirs / "out").rglob("*.mp4"):
        f.unlink()
    _run("fatezero_attribute_edit", io_dirs, tiny_model, tiny_clip, tiny_vae, {"blend_threshold": 0.95},
         capture=cap)
    plain = CAPTURED["out"]["samples"]
    assert mask.shape == (3, 64, 64) and 0 < float(mask.mean()) < 1
    assert blended.shape == plain.shape and (blended - plain).abs().max() > 1e-3
