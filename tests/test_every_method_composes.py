"""Every shipped workflow (every method of the pack) composes with a core LoraLoader and with core ControlNet
conditioning: the workflow runs headless with them, the pack's nodes still execute, and the LoRA / the
ControlNet hint changes the result.

The LoRA is inserted between the checkpoint and everything that uses its MODEL/CLIP (so it sits *before*
our patches), or as LoraLoaderModelOnly on the patched model that reaches the sampler (*after* them); the
ControlNet (ControlNetApply with the source frames as per-frame hints) is inserted after
every text encoder, so it acts during inversion and editing alike (a workflow with its own ControlNet runs with it
switched off instead).
"""

from __future__ import annotations

import copy
from pathlib import Path

import comfy.lora
import comfy.utils
import folder_paths
import numpy as np
import pytest
import torch
from PIL import Image

from zsve_harness import CAPTURED, OBJECTS, make_tiny_controlnet, moving_square_frames, run_prompt, write_video
from zsve_workflows import load_ui, ui_to_api

ROOT = Path(__file__).resolve().parents[1]
# The SDXL workflows are graphs of the SD1.5 ones with an SDXL checkpoint (run on a tiny SDXL in test_workflows.py
# and test_sdxl.py); on the tiny SD1.5 model here they would repeat those graphs.
WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*.json") if not p.stem.startswith("sdxl"))
PACK_TYPES = {"VideoDDIMInvert", "AttentionStore", "AttentionBlend", "TemporalSelfAttentionPatch",
              "LatentBlendWithInversion", "NullTextOptimize", "VideoP2PGuider", "InFusionSource", "InFusionInject"}
# the tiny UNet has 4 output blocks: InFusion's SD1.5 defaults (block 4, 4-11) are adapted as in its own tests
TINY = {"InFusionSource": dict(feature_blocks="1", attention_blocks="0-3"),
        "InFusionInject": dict(feature_blocks="1", attention_blocks="0-3"),
        "NullTextOptimize": dict(inner_steps=2)}
STEPS = 4


def tiny_lora(model, rank=2, scale=0.5, seed=0) -> dict:
    """A kohya-format LoRA for every 2-D weight of the tiny UNet that ComfyUI's LoRA key map knows."""
    keys = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    g = torch.Generator().manual_seed(seed)
    sd, done = {}, set()
    for lora_key, w_key in sorted(keys.items()):
        if not lora_key.startswith("lora_unet_") or w_key in done or weights.get(w_key) is None:
            continue
        if weights[w_key].ndim != 2:
            continue
        done.add(w_key)
        out_f, in_f = weights[w_key].shape
        sd[f"{lora_key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * scale
        sd[f"{lora_key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * scale / in_f**0.5
        sd[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    return sd


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, tiny_clip, tiny_vae):
    work = tmp_path_factory.mktemp("compose")
    for d in ("in", "out", "loras"):
        (work / d).mkdir()
    frames = moving_square_frames(frames=2, size=128)
    write_video(frames, work / "in" / "input.mp4")
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[32:96, 32:96] = 255
    comfy.utils.save_torch_file(tiny_lora(tiny_model), str(work / "loras" / "zsve_test_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(work / "loras"))
    old = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(work / "in"))
    folder_paths.set_output_directory(str(work / "out"))
    OBJECTS["compose_ckpt"] = (tiny_model, tiny_clip, tiny_vae)
    OBJECTS["compose_cn"] = make_tiny_controlnet(tiny_model)
    yield work, mask
    folder_paths.set_input_directory(old[0])
    folder_paths.set_output_directory(old[1])


def _base_prompt(path: Path, work: Path, mask: np.ndarray) -> dict:
    prompt = ui_to_api(load_ui(path), replace={
        "CheckpointLoaderSimple": {"class_type": "ZSVETestCheckpoint", "inputs": {"key": "compose_ckpt"}},
        "ControlNetLoader": {"class_type": "ZSVETestProvide", "inputs": {"key": "compose_cn"}}})
    for node in prompt.values():
        inputs, ct = node["inputs"], node["class_type"]
        if "steps" in inputs and isinstance(inputs["steps"], int):
            inputs["steps"] = STEPS
        inputs.update(TINY.get(ct, {}))
        if ct == "LoadImageMask":
            Image.fromarray(np.stack([mask] * 4, -1), "RGBA").save(work / "in" / inputs["image"])
        if ct == "LoraLoader":  # a workflow that ships with a LoRA: the base run has it at strength 0
            inputs.update(lora_name="zsve_test_lora.safetensors", strength_model=0.0, strength_clip=0.0)
    dec = next(k for k, v in prompt.items() if v["class_type"] == "VAEDecode")
    prompt["cap"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [dec, 0], "key": "compose_out"}}
    return prompt


def _with_lora(prompt: dict) -> dict:
    p = copy.deepcopy(prompt)
    existing = [k for k, v in p.items() if v["class_type"] == "LoraLoader"]
    if existing:
        for k in existing:
            p[k]["inputs"].update(strength_model=1.0, strength_clip=1.0)
        return p
    ckpt = next(k for k, v in p.items() if v["class_type"] == "ZSVETestCheckpoint")
    for node in p.values():
        for name, val in node["inputs"].items():
            if isinstance(val, list) and val[0] == ckpt and val[1] in (0, 1):
                node["inputs"][name] = ["lora", val[1]]
    p["lora"] = {"class_type": "LoraLoader", "inputs": {"model": [ckpt, 0], "clip": [ckpt, 1],
                                                         "lora_name": "zsve_test_lora.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0}}
    return p


def _with_lora_after(prompt: dict) -> dict:
    """LoraLoaderModelOnly on the (patched) model that reaches the sampler / guider: LoRA after our patches."""
    p = copy.deepcopy(prompt)
    for nid, node in list(p.items()):
        if node["class_type"] in ("KSamplerAdvanced", "VideoP2PGuider") and isinstance(node["inputs"].get("model"), list):
            p[f"lora_after_{nid}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": node["inputs"]["model"], "lora_name": "zsve_test_lora.safetensors", "strength_model": 1.0}}
            node["inputs"]["model"] = [f"lora_after_{nid}", 0]
    return p


def _with_controlnet(prompt: dict) -> dict:
    """ControlNetApply (the source frames as per-frame hints) after every text encoder; a workflow that ships
    with its own ControlNet (fatezero_controlnet_lora) instead runs with its ControlNet at strength 0, so the
    comparison with the base run shows what its ControlNet does."""
    p = copy.deepcopy(prompt)
    own = [v for v in p.values() if v["class_type"] == "ControlNetApplyAdvanced"]
    if own:
        for node in own:
            node["inputs"]["strength"] = 0.0
        return p
    frames = next(k for k, v in p.items() if v["class_type"] == "GetVideoComponents")
    p["cn"] = {"class_type": "ZSVETestProvide", "inputs": {"key": "compose_cn"}}
    # every CONDITIONING output (CLIP Text Encode's, Edit Prompts' source / edit / negative) goes through ControlNet
    # Apply; the Video-P2P guider takes the processed ones through its optional conditioning inputs
    outs = [(k, 0) for k, v in p.items() if v["class_type"] == "CLIPTextEncode"]
    outs += [(k, i) for k, v in p.items() if v["class_type"] == "EditPrompts" for i in range(3)]
    for enc, slot in outs:
        for node in p.values():
            for name, val in node["inputs"].items():
                if isinstance(val, list) and val[0] == enc and val[1] == slot:
                    node["inputs"][name] = [f"cn_{enc}_{slot}", 0]
        p[f"cn_{enc}_{slot}"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": [enc, slot],
                                                                             "control_net": ["cn", 0],
                                                                             "image": [frames, 0], "strength": 1.0}}
    pair = next((k for k, v in p.items() if v["class_type"] == "EditPrompts"), None)
    for node in p.values():
        if node["class_type"] == "VideoP2PGuider" and pair is not None:
            node["inputs"].update(source=[f"cn_{pair}_0", 0], edit=[f"cn_{pair}_1", 0], negative=[f"cn_{pair}_2", 0])
    return p


def _run(prompt: dict) -> tuple[torch.Tensor, set]:
    res = run_prompt(prompt)
    used = res["executed"] | {str(n) for n in res["cached"]}  # cached outputs (e.g. an unchanged patch node) count
    executed = {prompt[n]["class_type"] for n in used if n in prompt}
    return CAPTURED["compose_out"].clone(), executed


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_with_lora_and_controlnet(world, path):
    work, mask = world
    base = _base_prompt(path, work, mask)
    ours = {v["class_type"] for v in base.values()} & PACK_TYPES
    assert ours, f"{path.name} uses no node of the pack"
    out, executed = _run(base)
    assert ours <= executed
    variants = ((_with_lora(base), "LoRA before our patches"), (_with_lora_after(base), "LoRA after our patches"),
                (_with_controlnet(base), "ControlNet hint"))
    for variant, what in variants:
        out_v, executed_v = _run(variant)
        assert ours <= executed_v, f"{path.name} with {what}: the pack's nodes did not run"
        diff = (out_v - out).abs().mean().item()
        assert diff > 1e-4, f"{path.name}: the {what} did not change the result ({diff:.2e})"


def _with_windows(prompt: dict, length: int = 2, overlap: int = 1) -> dict:
    """Video Context Windows (frames) on the checkpoint's MODEL: every model use (inversion, stores, null text,
    edit) runs per window."""
    p = copy.deepcopy(prompt)
    ckpt = next(k for k, v in p.items() if v["class_type"] == "ZSVETestCheckpoint")
    for node in p.values():
        for name, val in node["inputs"].items():
            if isinstance(val, list) and val[0] == ckpt and val[1] == 0:
                node["inputs"][name] = ["windows", 0]
    p["windows"] = {"class_type": "VideoContextWindows", "inputs": {
        "model": [ckpt, 0], "context_length": length, "context_overlap": overlap,
        "context_schedule": "standard_static", "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid"}}
    return p


# fatezero_controlnet_lora is fatezero_attribute_edit's graph with a LoRA and a ControlNet: windowed there
WINDOWED = [p for p in WORKFLOWS if p.stem != "fatezero_controlnet_lora"]


@pytest.mark.parametrize("path", WINDOWED, ids=[p.stem for p in WINDOWED])
def test_workflow_under_context_windows(world, path):
    """Every shipped workflow runs with Video Context Windows on its model (3 frames, windows of 2 overlapping
    by 1). With temporal attention set to per-frame the frames are independent, so the windowed result must
    equal the unwindowed one: every stored attention map, trajectory latent, feature, mask and branch is then
    keyed by absolute frame correctly. With the workflow's own temporal mode it runs and stays finite."""
    work, mask = world
    if not (work / "in" / "input3.mp4").exists():
        write_video(moving_square_frames(frames=3, size=128, seed=1), work / "in" / "input3.mp4")
    base = _base_prompt(path, work, mask)
    own_temporal = False
    for node in base.values():
        if node["class_type"] == "LoadVideo":
            node["inputs"]["file"] = "input3.mp4"
    ours = {v["class_type"] for v in base.values()} & PACK_TYPES
    own = copy.deepcopy(base)
    for node in own.values():
        if node["class_type"] == "TemporalSelfAttentionPatch":
            node["inputs"]["min_channels"] = 0  # the tiny UNet's layers are narrower than SD1.5's 640 default
    windowed_own, executed_own = _run(_with_windows(own))
    assert (ours | {"VideoContextWindows"}) <= executed_own
    assert windowed_own.shape[0] == 3 and torch.isfinite(windowed_own).all()
    for node in base.values():
        if node["class_type"] == "TemporalSelfAttentionPatch":
            own_temporal = own_temporal or node["inputs"]["mode"] != "per-frame"
            node["inputs"]["mode"] = "per-frame"
    plain, _ = _run(base)
    windowed, executed = _run(_with_windows(base))
    assert (ours | {"VideoContextWindows"}) <= executed
    diff = float((windowed - plain).abs().max())
    print(f"\n[windows] {path.stem}: max |windowed - unwindowed| per-frame {diff:.2e}; with the workflow's temporal "
          f"attention the windowed edit differs by {float((windowed_own - plain).abs().max()):.2e}"
          f"{'' if own_temporal else ' (no temporal node)'}")
    assert diff < 1e-4, f"{path.name}: context windows changed a per-frame edit by {diff:.2e}"
