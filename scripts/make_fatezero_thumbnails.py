"""Thumbnails (workflows/<name>.jpg) for the FateZero workflows: the workflow itself, run headless on the
toy model (toy/weights) with a toy clip "a red circle on blue stripes"; rows: source frames, edited frames,
blend-region preview.

Run: `bash scripts/run.sh scripts/make_fatezero_thumbnails.py [--steps 20] [--frames 4]`
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

NAMES = ("fatezero_style_edit", "fatezero_local_attribute_edit")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=4)
    a = p.parse_args()
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
    src = torch.from_numpy(sc.render_clip((circle,), bg, a.frames).frames)
    (tmp / "in").mkdir()
    (tmp / "out").mkdir()
    folder_paths.set_input_directory(str(tmp / "in"))
    folder_paths.set_output_directory(str(tmp / "out"))
    write_video(src, tmp / "in" / "input.mp4")
    OBJECTS["ckpt"] = (model, clip, vae)
    for name in NAMES:
        prompt = ui_to_api(load_ui(ROOT / "workflows" / f"{name}.json"),
                           replace={"CheckpointLoaderSimple": {"class_type": "ZSVETestCheckpoint",
                                                              "inputs": {"key": "ckpt"}}})
        by_type = {v["class_type"]: k for k, v in prompt.items()}
        prompt[by_type["VideoDDIMInvert"]]["inputs"]["steps"] = a.steps
        prompt[by_type["KSamplerAdvanced"]]["inputs"]["steps"] = a.steps
        prompt[by_type["TemporalSelfAttentionPatch"]]["inputs"]["min_channels"] = 0  # the toy UNet is small
        prompt["cap_out"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [by_type["VAEDecode"], 0],
                                                                           "key": "out"}}
        prompt["cap_in"] = {"class_type": "ZSVETestCapture",
                            "inputs": {"value": [by_type["GetVideoComponents"], 0], "key": "in"}}
        prompt["cap_mask"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [by_type["AttentionBlend"], 1],
                                                                            "key": "mask"}}
        run_prompt(prompt)
        rows = [CAPTURED["in"], CAPTURED["out"], CAPTURED["mask"].unsqueeze(-1).expand(-1, -1, -1, 3)]
        grid = torch.cat([torch.cat(list(r.float().cpu()), dim=1) for r in rows], dim=0)
        img = Image.fromarray((grid.clamp(0, 1).numpy() * 255).astype(np.uint8))
        path = ROOT / "workflows" / f"{name}.jpg"
        img.save(path, quality=90)
        print(f"wrote {path} ({img.size[0]}x{img.size[1]})")


if __name__ == "__main__":
    main()
