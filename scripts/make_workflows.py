"""Generate the drag-and-drop (UI-format) workflows in workflows/ from compact specs.

Run: `bash scripts/run.sh scripts/make_workflows.py` (boots ComfyUI to read the node schemas).
Each spec lists nodes in execution order; widgets not given take the node's defaults.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import zsve_boot  # noqa: E402,F401  (boots ComfyUI)
from zsve_workflows import build_ui  # noqa: E402

SOURCE = "a red circle on blue stripes"

INVERT_AND_RECONSTRUCT = [
    {"id": "ckpt", "type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    {"id": "video", "type": "LoadVideo", "widgets": {"file": "input.mp4"}},
    {"id": "frames", "type": "GetVideoComponents", "links": {"video": ("video", 0)}},
    {"id": "encode", "type": "VAEEncode", "links": {"pixels": ("frames", 0), "vae": ("ckpt", 2)}},
    {"id": "pos", "type": "CLIPTextEncode", "widgets": {"text": SOURCE}, "links": {"clip": ("ckpt", 1)},
     "title": "Source prompt"},
    {"id": "neg", "type": "CLIPTextEncode", "widgets": {"text": ""}, "links": {"clip": ("ckpt", 1)},
     "title": "Empty prompt"},
    {"id": "invert", "type": "VideoDDIMInvert", "widgets": {"steps": 20, "cfg": 1.0},
     "links": {"model": ("ckpt", 0), "latent": ("encode", 0), "positive": ("pos", 0)}},
    {"id": "sample", "type": "KSamplerAdvanced",
     "widgets": {"add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 1.0, "sampler_name": "ddim",
                 "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000,
                 "return_with_leftover_noise": "disable"},
     "links": {"model": ("ckpt", 0), "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("invert", 0)}},
    {"id": "decode", "type": "VAEDecode", "links": {"samples": ("sample", 0), "vae": ("ckpt", 2)}},
    {"id": "create", "type": "CreateVideo", "widgets": {"fps": 8.0}, "links": {"images": ("decode", 0)}},
    {"id": "save", "type": "SaveVideo", "widgets": {"filename_prefix": "zsve/reconstruction"},
     "links": {"video": ("create", 0)}},
]

# Blended Latent Diffusion under attention control (issue 7): a local edit whose background comes from the
# inversion trajectory; the mask is made online from the edit prompt's cross-attention of the edited words,
# or painted by the user (a red-on-black mask.png in ComfyUI's input folder, one mask for all frames).
BLD_EDIT = "a yellow circle on blue stripes"


def _bld_local_edit(mask_source: str) -> list[dict]:
    user = mask_source == "user mask"
    blend_links = {"model": ("temporal", 0), "inversion": ("invert", 1), "clip": ("ckpt", 1)}
    if user:
        blend_links["mask"] = ("mask", 0)
    return [
        {"id": "ckpt", "type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        {"id": "video", "type": "LoadVideo", "widgets": {"file": "input.mp4"}},
        {"id": "frames", "type": "GetVideoComponents", "links": {"video": ("video", 0)}},
        {"id": "encode", "type": "VAEEncode", "links": {"pixels": ("frames", 0), "vae": ("ckpt", 2)}},
        {"id": "src", "type": "CLIPTextEncode", "widgets": {"text": SOURCE}, "links": {"clip": ("ckpt", 1)},
         "title": "Source prompt"},
        {"id": "edit", "type": "CLIPTextEncode", "widgets": {"text": BLD_EDIT}, "links": {"clip": ("ckpt", 1)},
         "title": "Edit prompt"},
        {"id": "neg", "type": "CLIPTextEncode", "widgets": {"text": ""}, "links": {"clip": ("ckpt", 1)},
         "title": "Empty prompt"},
        {"id": "temporal", "type": "TemporalSelfAttentionPatch", "links": {"model": ("ckpt", 0)}},
        {"id": "invert", "type": "VideoDDIMInvert", "widgets": {"steps": 20, "cfg": 1.0},
         "links": {"model": ("temporal", 0), "latent": ("encode", 0), "positive": ("src", 0)}},
        *([{"id": "mask", "type": "LoadImageMask", "widgets": {"image": "mask.png", "channel": "red"},
            "title": "Edit region (white = edit)"}] if user else []),
        {"id": "blend", "type": "LatentBlendWithInversion",
         "widgets": {"mask_source": mask_source, "start": 0.0, "end": 1.0, "threshold": 0.3, "dilation": 3,
                     "temporal_smoothing": 1, "prompt": "" if user else BLD_EDIT,
                     "words": "" if user else "yellow circle"},
         "links": blend_links},
        {"id": "sample", "type": "KSamplerAdvanced",
         "widgets": {"add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 7.5, "sampler_name": "ddim",
                     "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000,
                     "return_with_leftover_noise": "disable"},
         "links": {"model": ("blend", 0), "positive": ("edit", 0), "negative": ("neg", 0),
                   "latent_image": ("invert", 0)}},
        {"id": "decode", "type": "VAEDecode", "links": {"samples": ("sample", 0), "vae": ("ckpt", 2)}},
        {"id": "create", "type": "CreateVideo", "widgets": {"fps": 8.0}, "links": {"images": ("decode", 0)}},
        {"id": "save", "type": "SaveVideo", "widgets": {"filename_prefix": "zsve/bld_edit"},
         "links": {"video": ("create", 0)}},
        {"id": "preview", "type": "LatentBlendMaskPreview", "widgets": {"step": -1},
         "links": {"blend_state": ("blend", 1), "samples": ("sample", 0), "images": ("frames", 0)}},
        {"id": "show", "type": "PreviewImage", "links": {"images": ("preview", 1)}, "title": "Blend mask overlay"},
    ]


WORKFLOWS = {
    "invert_and_reconstruct": ("Invert and reconstruct a video", INVERT_AND_RECONSTRUCT),
    "bld_local_edit_attention_mask": ("Blended latent local edit, mask from cross-attention",
                                      _bld_local_edit("cross-attention")),
    "bld_local_edit_user_mask": ("Blended latent local edit, user mask", _bld_local_edit("user mask")),
}


def main():
    out_dir = ROOT / "workflows"
    out_dir.mkdir(exist_ok=True)
    for name, (title, spec) in WORKFLOWS.items():
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(build_ui(spec, title), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
