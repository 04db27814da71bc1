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


CARD_W = 512


def card_image(title: str, rows: list, labels: list[str]):
    """The thumbnail as the template browser shows it (a card a few hundred pixels wide): a title band in large
    type, then one row of frames per row of `rows` ([frames, H, W, 3] in 0..1), each labelled at its left."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    frames = min(4, rows[0].shape[0])
    cell = CARD_W // frames
    band = 64
    img = Image.new("RGB", (CARD_W, band + cell * len(rows)), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=34)
    while draw.textlength(title, font=font) > CARD_W - 24 and font.size > 18:
        font = ImageFont.load_default(size=font.size - 2)
    draw.text((12, band // 2), title, fill=(240, 240, 240), font=font, anchor="lm")
    small = ImageFont.load_default(size=20)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for f in range(frames):
            x = torch.nn.functional.interpolate(row[f].float().cpu().permute(2, 0, 1)[None], size=(cell, cell),
                                                mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
            tile = Image.fromarray((x.clamp(0, 1).numpy() * 255).astype(np.uint8))
            img.paste(tile, (f * cell, band + r * cell))
        if label:
            y = band + r * cell + 6
            w = draw.textlength(label, font=small)
            draw.rectangle((4, y, 4 + w + 12, y + 28), fill=(0, 0, 0))
            draw.text((10, y + 14), label, fill=(255, 255, 255), font=small, anchor="lm")
    return img


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=4)  # frames of the toy clip; the card shows up to 4
    p.add_argument("--only", default=None, help="comma-separated workflow names")
    a = p.parse_args()
    import comfy.utils
    import folder_paths
    import numpy as np
    import torch
    from PIL import Image

    import zsve.toy.model as tm
    import zsve.toy.scenes as sc
    from zsve_harness import CAPTURED, OBJECTS, get_executor, run_prompt, write_video
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
        run_prompt(prompt, get_executor(fresh=True))  # a fresh cache: a capture node cached from the workflow before
        rows = [CAPTURED["in"], CAPTURED["out"]]
        if previews:
            m = CAPTURED["mask"].float().cpu()
            m = m if m.shape[-1] == 3 else m.unsqueeze(-1).expand(-1, -1, -1, 3)
            if m.shape[1:3] != rows[0].shape[1:3]:
                m = torch.nn.functional.interpolate(m.permute(0, 3, 1, 2), size=tuple(rows[0].shape[1:3]),
                                                    mode="nearest").permute(0, 2, 3, 1)
            rows.append(m[: rows[0].shape[0]])
        ui = load_ui(ROOT / "workflows" / f"{name}.json")
        preview_title = next((n.get("title", "preview") for n in ui["nodes"] if n["type"] == "PreviewImage"), "")
        labels = ["input", "reconstruction" if name.startswith("invert") else "edited", preview_title]
        img = card_image(ui["extra"].get("zsve_card", name), rows, labels)
        path = ROOT / "workflows" / f"{name}.jpg"
        img.save(path, quality=90)
        print(f"wrote {path} ({img.size[0]}x{img.size[1]})", flush=True)


if __name__ == "__main__":
    main()
