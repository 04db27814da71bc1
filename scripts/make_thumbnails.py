"""Thumbnails (workflows/<name>.jpg) for every shipped workflow: the workflow itself, run headless through
ComfyUI's executor on the toy model (toy/weights) and a toy clip ("a red circle on blue stripes", the
circle moving). Rows: source frames, the workflow's output frames, and its mask preview when it has one.

Run: `bash scripts/run.sh scripts/make_thumbnails.py [--steps 20] [--frames 4] [--only name,...]`

Substitutions for the toy world: the checkpoint loader gives the toy model; Temporal Self-Attention's
min_channels is 0 (the toy UNet is narrower than SD1.5); InFusion's blocks are the toy UNet's decoder
(feature block 1, attention blocks 0-3); a LoRA loader gets an empty LoRA (there is no LoRA for the toy
model); a user-mask input gets the union of the object's ground-truth masks over the clip; a ControlNet loader gets
a ControlNet of the toy model's shape whose zero convolutions are zero, as at the start of ControlNet training
(there is no trained ControlNet for the toy model: the graph runs with it, and it changes nothing).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import zsve_boot  # noqa: E402,F401  (boots ComfyUI, loads the pack as `zsve`; must come first)


def inert_controlnet(model):
    """A ControlNet shaped for `model` (built through ComfyUI's classes) with zero zero-convolutions: no effect."""
    from zsve_harness import make_tiny_controlnet

    cn = make_tiny_controlnet(model)
    for module in list(cn.control_model.zero_convs) + [cn.control_model.middle_block_out]:
        for param in module.parameters():
            param.data.zero_()
    return cn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--only", default=None, help="comma-separated workflow names")
    a = p.parse_args()
    import comfy.utils
    import folder_paths
    import numpy as np
    import torch
    from PIL import Image

    import zsve.toy.model as tm
    import zsve.toy.scenes as sc
    from zsve_harness import CAPTURED, OBJECTS, run_prompt, write_video
    from zsve_workflows import load_ui, ui_to_api

    tmp = Path(tempfile.mkdtemp(prefix="zsve-thumbs-"))
    model, clip, vae, info = tm.load(shutil.copy(tm.WEIGHTS, tmp))
    circle = sc.Motion("circle", "red", (40.0, 50.0), (86.0, 76.0), 24.0, 24.0)
    bg = next(b for b in sc.all_backgrounds() if b.caption() == "blue stripes")
    c = sc.render_clip((circle,), bg, a.frames)
    for d in ("in", "out", "loras"):
        (tmp / d).mkdir()
    folder_paths.set_input_directory(str(tmp / "in"))
    folder_paths.set_output_directory(str(tmp / "out"))
    folder_paths.add_model_folder_path("loras", str(tmp / "loras"))
    write_video(torch.from_numpy(c.frames), tmp / "in" / "input.mp4")
    union = c.masks[:, 0].any(0)
    Image.fromarray(np.stack([(union * 255).astype(np.uint8)] * 3, -1), "RGB").save(tmp / "in" / "mask.png")
    comfy.utils.save_torch_file({}, str(tmp / "loras" / "empty_lora.safetensors"))
    OBJECTS["ckpt"] = (model, clip, vae)
    OBJECTS["inert_controlnet"] = inert_controlnet(model)
    names = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    for name in names:
        prompt = ui_to_api(load_ui(ROOT / "workflows" / f"{name}.json"),
                           replace={"CheckpointLoaderSimple": {"class_type": "ZSVETestCheckpoint",
                                                              "inputs": {"key": "ckpt"}},
                                    "ControlNetLoader": {"class_type": "ZSVETestProvide",
                                                         "inputs": {"key": "inert_controlnet"}}})
        previews = []
        for node in list(prompt.values()):
            ct, inputs = node["class_type"], node["inputs"]
            if "steps" in inputs and isinstance(inputs["steps"], int):
                inputs["steps"] = a.steps
            if ct == "TemporalSelfAttentionPatch":
                inputs["min_channels"] = 0
            if ct in ("InFusionSource", "InFusionInject"):
                inputs.update(feature_blocks="1", attention_blocks="0-3")
            if ct == "LoraLoader":
                inputs["lora_name"] = "empty_lora.safetensors"
            if ct == "LoadImageMask":
                inputs.update(image="mask.png", channel="red")
            if ct == "PreviewImage":
                previews.append(inputs["images"])
        dec = next(k for k, v in prompt.items() if v["class_type"] == "VAEDecode")
        src = next(k for k, v in prompt.items() if v["class_type"] == "GetVideoComponents")
        prompt["cap_out"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [dec, 0], "key": "out"}}
        prompt["cap_in"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [src, 0], "key": "in"}}
        if previews:
            prompt["cap_mask"] = {"class_type": "ZSVETestCapture", "inputs": {"value": previews[0], "key": "mask"}}
        CAPTURED.pop("mask", None)
        run_prompt(prompt)
        rows = [CAPTURED["in"], CAPTURED["out"]]
        if previews:
            m = CAPTURED["mask"].float().cpu()
            m = m if m.shape[-1] == 3 else m.unsqueeze(-1).expand(-1, -1, -1, 3)
            if m.shape[1:3] != rows[0].shape[1:3]:
                m = torch.nn.functional.interpolate(m.permute(0, 3, 1, 2), size=tuple(rows[0].shape[1:3]),
                                                    mode="nearest").permute(0, 2, 3, 1)
            rows.append(m[: rows[0].shape[0]])
        grid = torch.cat([torch.cat(list(r.float().cpu()), dim=1) for r in rows], dim=0)
        img = Image.fromarray((grid.clamp(0, 1).numpy() * 255).astype(np.uint8))
        path = ROOT / "workflows" / f"{name}.jpg"
        img.save(path, quality=90)
        print(f"wrote {path} ({img.size[0]}x{img.size[1]})", flush=True)


if __name__ == "__main__":
    main()
