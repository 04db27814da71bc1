"""Generate the drag-and-drop (UI-format) workflows in workflows/ from compact specs.

Run: `bash scripts/run.sh scripts/make_workflows.py [name,...]` (boots ComfyUI to read the node schemas; with
names, only those workflows are written).
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
# the front every workflow shares: checkpoint, video in, latents, and the source / edit / empty prompts
CKPT = {"id": "ckpt", "type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}}
VIDEO_IN = [
    {"id": "video", "type": "LoadVideo", "widgets": {"file": "input.mp4"}},
    {"id": "frames", "type": "GetVideoComponents", "links": {"video": ("video", 0)}},
    {"id": "encode", "type": "VAEEncode", "links": {"pixels": ("frames", 0), "vae": ("ckpt", 2)}},
]


def _prompts(edit: str, clip: str = "ckpt") -> list[dict]:
    """The prompts typed once (Edit Prompts): outputs source 0, edit 1, negative 2, prompt pair 3."""
    return [
        {"id": "prompts", "type": "EditPrompts", "widgets": {"source_text": SOURCE, "edit_text": edit,
                                                             "negative_text": ""},
         "links": {"clip": (clip, 1)}, "title": "Prompts (source -> edit)"},
    ]


SRC, EDIT, NEG, PAIR = ("prompts", 0), ("prompts", 1), ("prompts", 2), ("prompts", 3)


INVERT_AND_RECONSTRUCT = [
    CKPT,
    *VIDEO_IN,
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
    blend_links = {"model": ("temporal", 0), "inversion": ("invert", 1)}
    if not user:
        blend_links["prompts"] = PAIR
    if user:
        blend_links["mask"] = ("mask", 0)
    return [
        CKPT,
        *VIDEO_IN,
        *_prompts(BLD_EDIT),
        {"id": "temporal", "type": "TemporalSelfAttentionPatch", "links": {"model": ("ckpt", 0)}},
        {"id": "invert", "type": "VideoDDIMInvert", "widgets": {"steps": 20, "cfg": 1.0},
         "links": {"model": ("temporal", 0), "latent": ("encode", 0), "positive": SRC}},
        *([{"id": "mask", "type": "LoadImageMask", "widgets": {"image": "mask.png", "channel": "red"},
            "title": "Edit region (white = edit)"}] if user else []),
        {"id": "blend", "type": "LatentBlendWithInversion",
         "widgets": {"mask_source": mask_source, "start": 0.0, "end": 1.0, "threshold": 0.3, "dilation": 3,
                     "temporal_smoothing": 1, "words": "" if user else "yellow circle"},
         "links": blend_links},
        {"id": "sample", "type": "KSamplerAdvanced",
         "widgets": {"add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 7.5, "sampler_name": "ddim",
                     "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000,
                     "return_with_leftover_noise": "disable"},
         "links": {"model": ("blend", 0), "positive": EDIT, "negative": NEG,
                   "latent_image": ("invert", 0)}},
        {"id": "decode", "type": "VAEDecode", "links": {"samples": ("sample", 0), "vae": ("ckpt", 2)}},
        {"id": "create", "type": "CreateVideo", "widgets": {"fps": 8.0}, "links": {"images": ("decode", 0)}},
        {"id": "save", "type": "SaveVideo", "widgets": {"filename_prefix": "zsve/bld_edit"},
         "links": {"video": ("create", 0)}},
        {"id": "preview", "type": "LatentBlendMaskPreview", "widgets": {"step": -1},
         "links": {"blend_state": ("blend", 1), "samples": ("sample", 0), "images": ("frames", 0)}},
        {"id": "show", "type": "PreviewImage", "links": {"images": ("preview", 1)}, "title": "Blend mask overlay"},
    ]


# Video-P2P (issue 5): word swap "circle" -> "square" with shared null-text optimisation and Local Blend; the
# two branches run in the Video-P2P Guider through SamplerCustomAdvanced, frame attention from the first frame.
VP2P_EDIT = "a red square on blue stripes"

VIDEOP2P_WORD_SWAP = [
    CKPT,
    *VIDEO_IN,
    *_prompts(VP2P_EDIT),
    {"id": "temporal", "type": "TemporalSelfAttentionPatch", "widgets": {"mode": "first"},
     "links": {"model": ("ckpt", 0)}, "title": "Frame attention (Video-P2P: first frame)"},
    {"id": "invert", "type": "VideoDDIMInvert", "widgets": {"steps": 20, "cfg": 1.0},
     "links": {"model": ("temporal", 0), "latent": ("encode", 0), "positive": SRC}},
    {"id": "nulltext", "type": "NullTextOptimize", "widgets": {"guidance": 7.5, "inner_steps": 10},
     "links": {"model": ("temporal", 0), "inversion": ("invert", 1), "source": SRC, "empty": NEG}},
    {"id": "guider", "type": "VideoP2PGuider",
     "widgets": {"cfg": 7.5, "mode": "replace",
                 "cross_replace": 0.2, "self_replace": 0.5, "reweight": "square:2", "blend_words": "circle",
                 "blend_words_edit": "square", "blend_start": 0.2, "blend_threshold": 0.3},
     "links": {"model": ("temporal", 0), "inversion": ("invert", 1), "prompts": PAIR, "null_text": ("nulltext", 0)}},
    {"id": "noise", "type": "DisableNoise"},
    {"id": "ksampler", "type": "KSamplerSelect", "widgets": {"sampler_name": "ddim"}},
    {"id": "sigmas", "type": "BasicScheduler", "widgets": {"scheduler": "ddim_uniform", "steps": 20, "denoise": 1.0},
     "links": {"model": ("temporal", 0)}},
    {"id": "sample", "type": "SamplerCustomAdvanced",
     "links": {"noise": ("noise", 0), "guider": ("guider", 0), "sampler": ("ksampler", 0), "sigmas": ("sigmas", 0),
               "latent_image": ("invert", 0)}},
    {"id": "decode", "type": "VAEDecode", "links": {"samples": ("sample", 0), "vae": ("ckpt", 2)}},
    {"id": "create", "type": "CreateVideo", "widgets": {"fps": 8.0}, "links": {"images": ("decode", 0)}},
    {"id": "save", "type": "SaveVideo", "widgets": {"filename_prefix": "zsve/videop2p_edit"},
     "links": {"video": ("create", 0)}},
    {"id": "branches", "type": "VideoP2PBranchOutputs", "links": {"guider": ("guider", 0), "edited": ("sample", 0)}},
    {"id": "decode_src", "type": "VAEDecode", "links": {"samples": ("branches", 0), "vae": ("ckpt", 2)},
     "title": "Decode source branch"},
    {"id": "show_src", "type": "PreviewImage", "links": {"images": ("decode_src", 0)},
     "title": "Source branch (reconstruction)"},
    {"id": "mask_img", "type": "MaskToImage", "links": {"mask": ("branches", 1)}},
    {"id": "show_mask", "type": "PreviewImage", "links": {"images": ("mask_img", 0)}, "title": "Local Blend mask"},
]


# InFusion (issue 6): a two-concept edit (object colour and background colour, each with its own mask) on a
# LoRA-adapted model, as in the paper (SD1.5 + LoRA). The LoRA file must be in ComfyUI's models/loras folder.
IF_EDIT = "a yellow circle on green stripes"
IF_CONCEPTS = "red->yellow, blue->green"

INFUSION_MULTI_CONCEPT_LORA = [
    CKPT,
    {"id": "lora", "type": "LoraLoader",
     "widgets": {"lora_name": "infusion_lora.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
     "links": {"model": ("ckpt", 0), "clip": ("ckpt", 1)}, "title": "LoRA (put your file in models/loras)"},
    *VIDEO_IN,
    *_prompts(IF_EDIT, clip="lora"),
    {"id": "temporal", "type": "TemporalSelfAttentionPatch", "links": {"model": ("lora", 0)}},
    {"id": "source", "type": "InFusionSource", "links": {"model": ("temporal", 0)}},
    {"id": "invert", "type": "VideoDDIMInvert", "widgets": {"steps": 20, "cfg": 1.0},
     "links": {"model": ("source", 0), "latent": ("encode", 0), "positive": SRC}},
    {"id": "inject", "type": "InFusionInject",
     "widgets": {"concepts": IF_CONCEPTS},
     "links": {"model": ("temporal", 0), "inversion": ("invert", 1), "prompts": PAIR}},
    {"id": "sample", "type": "KSamplerAdvanced",
     "widgets": {"add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 7.5, "sampler_name": "ddim",
                 "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000,
                 "return_with_leftover_noise": "disable"},
     "links": {"model": ("inject", 0), "positive": EDIT, "negative": NEG,
               "latent_image": ("invert", 0)}},
    {"id": "decode", "type": "VAEDecode", "links": {"samples": ("sample", 0), "vae": ("ckpt", 2)}},
    {"id": "create", "type": "CreateVideo", "widgets": {"fps": 8.0}, "links": {"images": ("decode", 0)}},
    {"id": "save", "type": "SaveVideo", "widgets": {"filename_prefix": "zsve/infusion_edit"},
     "links": {"video": ("create", 0)}},
    {"id": "mask_img", "type": "MaskToImage", "links": {"mask": ("inject", 1)}},
    {"id": "show_mask", "type": "PreviewImage", "links": {"images": ("mask_img", 0)},
     "title": "Concept masks (one concept after the other)"},
]


# FateZero (issue 4): attention recorded at inversion (Attention Store) and fused at editing (Attention Blend),
# spatial-temporal self-attention from the middle frame on both. Style: refinement + reweighting, full
# self-attention replacement; local attribute edit: word swap, self-attention blended inside the mask of the
# source words.
FZ_STYLE_EDIT = "a red circle on blue stripes watercolor painting"
FZ_LOCAL_EDIT = "a yellow circle on blue stripes"


def _fatezero_edit(edit: str, blend: dict, prefix: str, latent_blend_words: str = "") -> list[dict]:
    """The FateZero graph; with latent_blend_words, FateZero's latent blending (jeep_posche_local_latent_blend):
    Latent Blend With Inversion in [0.2, 0.8) under the union of Attention Blend's source-word mask and the
    edit-time mask of these edited words (FateZero's prompt_choose 'both')."""
    sampled = ("lblend", 0) if latent_blend_words else ("blend", 0)
    latent_blend = [{
        "id": "lblend", "type": "LatentBlendWithInversion",
        "widgets": {"mask_source": "union", "start": 0.2, "end": 0.8, "threshold": 0.3, "dilation": 3,
                    "temporal_smoothing": 0, "words": latent_blend_words},
        "links": {"model": ("blend", 0), "inversion": ("invert", 1), "prompts": PAIR, "mask": ("blend", 1)},
        "title": "Latent blend (FateZero blend_latents)"}] if latent_blend_words else []
    return [
        CKPT,
        *VIDEO_IN,
        *_prompts(edit),
        {"id": "temporal", "type": "TemporalSelfAttentionPatch",
         "widgets": {"mode": "middle", "include_own_frame": False, "min_channels": 640}, "links": {"model": ("ckpt", 0)}},
        {"id": "store", "type": "AttentionStore",
         "widgets": {"record_window": max(blend["cross_replace"], blend["self_replace_end"]), "skip_full_res": True,
                     "memory_budget_gb": 0.0},
         "links": {"model": ("temporal", 0)}},
        {"id": "invert", "type": "VideoDDIMInvert", "widgets": {"steps": 20, "cfg": 1.0},
         "links": {"model": ("store", 0), "latent": ("encode", 0), "positive": SRC}},
        {"id": "blend", "type": "AttentionBlend", "widgets": dict(blend),
         "links": {"model": ("temporal", 0), "inversion": ("invert", 1), "prompts": PAIR}},
        *latent_blend,
        {"id": "sample", "type": "KSamplerAdvanced",
         "widgets": {"add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 7.5, "sampler_name": "ddim",
                     "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000,
                     "return_with_leftover_noise": "disable"},
         "links": {"model": sampled, "positive": EDIT, "negative": NEG,
                   "latent_image": ("invert", 0)}},
        {"id": "decode", "type": "VAEDecode", "links": {"samples": ("sample", 0), "vae": ("ckpt", 2)}},
        {"id": "create", "type": "CreateVideo", "widgets": {"fps": 8.0}, "links": {"images": ("decode", 0)}},
        {"id": "save", "type": "SaveVideo", "widgets": {"filename_prefix": prefix}, "links": {"video": ("create", 0)}},
        {"id": "mask_img", "type": "MaskToImage", "links": {"mask": ("blend", 1)}},
        {"id": "show_mask", "type": "PreviewImage", "links": {"images": ("mask_img", 0)},
         "title": "Blend region (white = may change shape)"},
    ]


FATEZERO_STYLE = _fatezero_edit(FZ_STYLE_EDIT, dict(
    mode="refine", cross_replace=0.8, cross_replace_words="", self_replace_start=0.0, self_replace_end=0.8,
    reweight="watercolor:10", blend_words="", blend_threshold=0.3, only_cond=True), "zsve/fatezero_style")
FZ_LOCAL_BLEND = dict(mode="replace", cross_replace=0.5, cross_replace_words="", self_replace_start=0.0,
                      self_replace_end=0.5, reweight="", blend_words="red circle", blend_threshold=0.3, only_cond=True)
FATEZERO_LOCAL = _fatezero_edit(FZ_LOCAL_EDIT, FZ_LOCAL_BLEND, "zsve/fatezero_local")
FATEZERO_LOCAL_LATENT_BLEND = _fatezero_edit(FZ_LOCAL_EDIT, FZ_LOCAL_BLEND, "zsve/fatezero_local_latent_blend",
                                             latent_blend_words="yellow circle")


# Composition with core ControlNet and a LoRA (issue 17): FateZero's local attribute edit on a LoRA-adapted model,
# with the Canny edges of every source frame as per-frame ControlNet hints, on the inversion's prompt and on the
# edit's prompts alike (the store is recorded under the same control the edit samples with).
def _fatezero_controlnet_lora() -> list[dict]:
    spec = _fatezero_edit(FZ_LOCAL_EDIT, FZ_LOCAL_BLEND, "zsve/fatezero_controlnet_lora")
    lora = {"id": "lora", "type": "LoraLoader",
            "widgets": {"lora_name": "your_lora.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
            "links": {"model": ("ckpt", 0), "clip": ("ckpt", 1)}, "title": "LoRA (put your file in models/loras)"}
    control = [
        {"id": "canny", "type": "Canny", "widgets": {"low_threshold": 0.2, "high_threshold": 0.4},
         "links": {"image": ("frames", 0)}, "title": "Canny edges of every frame (per-frame hints)"},
        {"id": "show_edges", "type": "PreviewImage", "links": {"images": ("canny", 0)}, "title": "ControlNet hints"},
        {"id": "cnet", "type": "ControlNetLoader", "widgets": {"control_net_name": "control_v11p_sd15_canny.pth"},
         "title": "ControlNet (SD1.5 canny, in models/controlnet)"},
        {"id": "cn_src", "type": "ControlNetApplyAdvanced",
         "widgets": {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
         "links": {"positive": SRC, "negative": NEG, "control_net": ("cnet", 0), "image": ("canny", 0)},
         "title": "ControlNet on the inversion's prompt"},
        {"id": "cn_edit", "type": "ControlNetApplyAdvanced",
         "widgets": {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
         "links": {"positive": EDIT, "negative": NEG, "control_net": ("cnet", 0), "image": ("canny", 0)},
         "title": "ControlNet on the edit's prompts"},
    ]
    out = []
    for node in spec:
        node = {**node, "links": {k: (("lora", v[1]) if v[0] == "ckpt" and v[1] in (0, 1) else v)
                                  for k, v in node.get("links", {}).items()}}
        if node["id"] == "invert":
            node["links"]["positive"] = ("cn_src", 0)
        if node["id"] == "sample":
            node["links"].update(positive=("cn_edit", 0), negative=("cn_edit", 1))
        out.append(node)
        if node["id"] == "ckpt":
            out.append(lora)
        if node["id"] == "prompts":
            out.extend(control)
    assert all(c in out for c in control), "the ControlNet nodes go after the prompts of the shared front"
    return out


FATEZERO_CONTROLNET_LORA = _fatezero_controlnet_lora()


WORKFLOWS = {
    "invert_and_reconstruct": ("Invert and reconstruct a video", INVERT_AND_RECONSTRUCT),
    "bld_local_edit_attention_mask": ("Blended latent local edit, mask from cross-attention",
                                      _bld_local_edit("cross-attention")),
    "bld_local_edit_user_mask": ("Blended latent local edit, user mask", _bld_local_edit("user mask")),
    "videop2p_word_swap_null_text_local_blend": ("Video-P2P word swap with null-text optimisation and local blend",
                                                 VIDEOP2P_WORD_SWAP),
    "infusion_multi_concept_lora": ("InFusion multi-concept edit with a LoRA", INFUSION_MULTI_CONCEPT_LORA),
    "fatezero_style_edit": ("FateZero style edit (attention fusion, full self-attention replacement)", FATEZERO_STYLE),
    "fatezero_local_attribute_edit": ("FateZero local attribute edit (word swap, blended self-attention)",
                                      FATEZERO_LOCAL),
    "fatezero_local_latent_blend": ("FateZero local edit with latent blending (blended self-attention, latents "
                                    "outside the source/edit word masks kept on the inversion)",
                                    FATEZERO_LOCAL_LATENT_BLEND),
    "fatezero_controlnet_lora": ("FateZero local edit on a LoRA with core ControlNet (Canny edges of every frame)",
                                 FATEZERO_CONTROLNET_LORA),
}


# SDXL (issue 19): FateZero's style edit on an SDXL-family checkpoint. The same graph; what changes with the model is
# chosen from it: Temporal Self-Attention's min_channels -1 (auto: 1280 on SDXL), Attention Store's skip_full_res
# (SDXL's 64x64 level at 1024 px), and Edit Prompts' conditionings carry SDXL's pooled output for the inversion and
# the edit alike (the same conditioning on both sides).
def _sdxl_fatezero_style() -> list[dict]:
    spec = [dict(n) for n in _fatezero_edit(FZ_STYLE_EDIT, dict(
        mode="refine", cross_replace=0.8, cross_replace_words="", self_replace_start=0.0, self_replace_end=0.8,
        reweight="watercolor:10", blend_words="", blend_threshold=0.3, only_cond=True), "zsve/sdxl_fatezero_style")]
    for n in spec:
        if n["id"] == "ckpt":
            n.update(widgets={"ckpt_name": "sd_xl_base_1.0.safetensors"},
                     title="SDXL checkpoint (SDXL 1.0 or a fine-tune; EDM models such as Playground v2.5 are refused)")
        elif n["id"] == "temporal":
            n["widgets"] = {"mode": "middle", "include_own_frame": False, "min_channels": -1}
        elif n["id"] == "store":
            n["widgets"] = dict(n["widgets"], memory_budget_gb=64.0)
            n["title"] = "Attention Store (SDXL, 8 frames at 1024x1024, 20 steps: about 44 GiB of RAM)"
    return spec


SDXL_FATEZERO_STYLE = _sdxl_fatezero_style()
WORKFLOWS["sdxl_fatezero_style_edit"] = ("SDXL: FateZero style edit (defaults chosen from the model)",
                                         SDXL_FATEZERO_STYLE)


def main():
    out_dir = ROOT / "workflows"
    out_dir.mkdir(exist_ok=True)
    only = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else None  # e.g. fatezero_controlnet_lora
    for name, (title, spec) in WORKFLOWS.items():
        if only is not None and name not in only:
            continue
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(build_ui(spec, title), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
