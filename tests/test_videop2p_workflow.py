"""The shipped Video-P2P workflow (word swap, null-text optimisation, local blend) runs headless through
ComfyUI's executor, with the tiny models standing in for the checkpoint and fewer steps."""

from __future__ import annotations

import torch

from zsve_harness import CAPTURED, run_prompt
from zsve_workflows import shipped_prompt

WORKFLOW = "videop2p_word_swap"


def test_videop2p_workflow_runs_headless(io_dirs, tiny_model, tiny_clip, tiny_vae):
    prompt, by_type = shipped_prompt(WORKFLOW, (tiny_model, tiny_clip, tiny_vae), io_dirs / "in", frames=2)
    # the shipped settings, with fewer steps for the CPU
    prompt[by_type["VideoDDIMInvert"]]["inputs"]["steps"] = 3
    prompt[by_type["BasicScheduler"]]["inputs"]["steps"] = 3
    prompt[by_type["NullTextOptimize"]]["inputs"]["inner_steps"] = 2
    g = prompt[by_type["VideoP2PGuider"]]["inputs"]
    assert g["mode"] == "replace" and g["blend_words"] == "circle" and g["blend_words_edit"] == "square"
    assert prompt[by_type["TemporalSelfAttentionPatch"]]["inputs"]["mode"] == "first"
    prompt["cap_edit"] = {"class_type": "ZSVETestCapture",
                          "inputs": {"value": [by_type["SamplerCustomAdvanced"], 0], "key": "wf_edit"}}
    prompt["cap_src"] = {"class_type": "ZSVETestCapture",
                         "inputs": {"value": [by_type["VideoP2PBranchOutputs"], 0], "key": "wf_src"}}
    prompt["cap_mask"] = {"class_type": "ZSVETestCapture",
                          "inputs": {"value": [by_type["VideoP2PBranchOutputs"], 1], "key": "wf_mask"}}
    run_prompt(prompt)
    saved = list((io_dirs / "out").rglob("*.mp4"))
    assert len(saved) == 1 and saved[0].name.startswith("videop2p_edit")
    edit, src, mask = CAPTURED["wf_edit"]["samples"], CAPTURED["wf_src"]["samples"], CAPTURED["wf_mask"]
    assert edit.shape == src.shape == (2, 4, 8, 8) and mask.shape == (2, 64, 64)
    assert torch.isfinite(edit).all() and float((edit - src).abs().max()) > 1e-4
    outside = mask[:, ::8, ::8] == 0
    if outside.any():  # the tiny model's attention is nearly uniform; the mask may cover every pixel
        keep = outside.unsqueeze(1).expand_as(edit)
        assert float((edit - src)[keep].abs().max()) < 1e-4
