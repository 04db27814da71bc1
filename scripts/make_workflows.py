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

from zsve_layout import hidden_links  # noqa: E402

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
    else:  # the edit-time mask united with the old object's (Source Attention Mask, from the recorded attention)
        blend_links["mask"] = ("srcmask", 0)
    return [
        CKPT,
        *VIDEO_IN,
        *_prompts(BLD_EDIT),
        {"id": "temporal", "type": "TemporalSelfAttentionPatch", "links": {"model": ("ckpt", 0)}},
        *([] if user else [{"id": "store", "type": "AttentionStore",
                            "widgets": {"record_window": 0.5, "skip_full_res": True, "memory_budget_gb": 0.0},
                            "links": {"model": ("temporal", 0)}}]),
        {"id": "invert", "type": "VideoDDIMInvert", "widgets": {"steps": 20, "cfg": 1.0},
         "links": {"model": ("temporal" if user else "store", 0), "latent": ("encode", 0), "positive": SRC}},
        *([{"id": "mask", "type": "LoadImageMask", "widgets": {"image": "mask.png", "channel": "red"},
            "title": "Edit region (white = edit)"}] if user else
          [{"id": "srcmask", "type": "SourceAttentionMask",
            "widgets": {"words": "red circle", "threshold": 0.3, "window": 0.5},
            "links": {"inversion": ("invert", 1), "prompts": PAIR}, "title": "Where the old object was",
            "col": 1}]),  # col 1: its link to Fresh Noise Start ran behind Video DDIM Invert
        {"id": "blend", "type": "LatentBlendWithInversion",
         "widgets": {"mask_source": "user mask" if user else "union", "start": 0.0, "end": 1.0, "threshold": 0.3,
                     "dilation": 3, "temporal_smoothing": 1, "words": "" if user else "yellow circle"},
         "links": blend_links},
        # the new word reweighted over the first half of the steps (Cross-Attention Reweight; the toy benchmark's row)
        *([] if user else [{"id": "reweight", "type": "CrossAttentionReweight",
                            "widgets": {"reweight": "yellow:4", "end": 0.5},
                            "links": {"model": ("blend", 0), "prompts": PAIR},
                            "title": "New word reweighted (x4, first half of the steps)"},
                           # an object edit starts inside the old object's mask from fresh noise, as the toy
                           # benchmark's Blended latent row (toy/methods_bld.py: chosen on the dev split of issue 20,
                           # colour swaps 88% -> 100%), and as the FateZero and Video-P2P workflows
                           {"id": "fresh", "type": "FreshNoiseStart",
                            "links": {"model": ("reweight", 0), "inversion": ("invert", 1), "mask": ("srcmask", 0)},
                            "title": "Old object starts from fresh noise (object edits)"}]),
        {"id": "sample", "type": "KSamplerAdvanced",
         "widgets": {"add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 7.5, "sampler_name": "ddim",
                     "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000,
                     "return_with_leftover_noise": "disable"},
         "links": {"model": ("blend" if user else "fresh", 0), "positive": EDIT, "negative": NEG,
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
    # Attention Store on the inversion only: the source's cross-attention, for the old object's mask (Fresh Noise Start)
    {"id": "store", "type": "AttentionStore",
     "widgets": {"record_window": 0.5, "skip_full_res": True, "memory_budget_gb": 0.0},
     "links": {"model": ("temporal", 0)}, "title": "Attention Store (for the old object's mask)"},
    {"id": "invert", "type": "VideoDDIMInvert", "widgets": {"steps": 20, "cfg": 1.0},
     "links": {"model": ("store", 0), "latent": ("encode", 0), "positive": SRC}},
    {"id": "nulltext", "type": "NullTextOptimize", "widgets": {"guidance": 7.5, "inner_steps": 10},
     "links": {"model": ("temporal", 0), "inversion": ("invert", 1), "source": SRC, "empty": NEG}},
    {"id": "srcmask", "type": "SourceAttentionMask",
     "widgets": {"words": "red circle", "threshold": 0.3, "window": 0.5},
     "links": {"inversion": ("invert", 1), "prompts": PAIR}, "title": "Where the old object was"},
    {"id": "fresh", "type": "FreshNoiseStart",
     "links": {"model": ("temporal", 0), "inversion": ("invert", 1), "mask": ("srcmask", 0)},
     "title": "Old object starts from fresh noise (edit branch)"},
    {"id": "guider", "type": "VideoP2PGuider",
     "widgets": {"cfg": 7.5, "mode": "replace",
                 "cross_replace": 0.2, "self_replace": 0.5, "reweight": "square:2", "blend_words": "circle",
                 "blend_words_edit": "square", "blend_start": 0.2, "blend_threshold": 0.3},
     "links": {"model": ("fresh", 0), "inversion": ("invert", 1), "prompts": PAIR, "null_text": ("nulltext", 0)}},
    {"id": "noise", "type": "DisableNoise", "col": 1},
    {"id": "ksampler", "type": "KSamplerSelect", "widgets": {"sampler_name": "ddim"}, "col": 1},
    {"id": "sigmas", "type": "BasicScheduler", "widgets": {"scheduler": "ddim_uniform", "steps": 20, "denoise": 1.0},
     "links": {"model": ("temporal", 0)}, "col": 1},
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
    # col 1: under the LoRA (in column 0 the LoRA's model link ran back behind Load Video's preview)
    {"id": "temporal", "type": "TemporalSelfAttentionPatch", "links": {"model": ("lora", 0)}, "col": 1},
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


def _fatezero_edit(edit: str, blend: dict, prefix: str, latent_blend_words: str = "", fresh_words: str = "") -> list[dict]:
    """The FateZero graph; with latent_blend_words, FateZero's latent blending (jeep_posche_local_latent_blend):
    Latent Blend With Inversion in [0.2, 0.8) under the union of Attention Blend's source-word mask and the
    edit-time mask of these edited words (FateZero's prompt_choose 'both'); with fresh_words (an object edit), Fresh
    Noise Start in the Source Attention Mask of these source words (the toy benchmark's rows)."""
    sampled = ("lblend", 0) if latent_blend_words else ("blend", 0)
    fresh = [
        {"id": "srcmask", "type": "SourceAttentionMask",
         "widgets": {"words": fresh_words, "threshold": 0.3, "window": 0.5},
         "links": {"inversion": ("invert", 1), "prompts": PAIR}, "title": "Where the old object was"},
        {"id": "fresh", "type": "FreshNoiseStart",
         "links": {"model": sampled, "inversion": ("invert", 1), "mask": ("srcmask", 0)},
         "title": "Old object starts from fresh noise (object edits)"}] if fresh_words else []
    if fresh_words:
        sampled = ("fresh", 0)
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
         "widgets": {"mode": "middle", "include_own_frame": False, "min_channels": -1}, "links": {"model": ("ckpt", 0)}},
        {"id": "store", "type": "AttentionStore",
         "widgets": {"record_window": max(blend["cross_replace"], blend["self_replace_end"]), "skip_full_res": True,
                     "memory_budget_gb": 0.0},
         "links": {"model": ("temporal", 0)}},
        {"id": "invert", "type": "VideoDDIMInvert", "widgets": {"steps": 20, "cfg": 1.0},
         "links": {"model": ("store", 0), "latent": ("encode", 0), "positive": SRC}},
        {"id": "blend", "type": "AttentionBlend", "widgets": dict(blend),
         "links": {"model": ("temporal", 0), "inversion": ("invert", 1), "prompts": PAIR}},
        *latent_blend,
        *fresh,
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
FATEZERO_LOCAL = _fatezero_edit(FZ_LOCAL_EDIT, FZ_LOCAL_BLEND, "zsve/fatezero_attribute_edit", fresh_words="red circle")
FATEZERO_LOCAL_LATENT_BLEND = _fatezero_edit(FZ_LOCAL_EDIT, FZ_LOCAL_BLEND, "zsve/fatezero_latent_blend_edit",
                                             latent_blend_words="yellow circle", fresh_words="red circle")


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


# --- stages, groups and notes ---------------------------------------------------------------------------
# Every workflow reads in up to four rows, one group each: inputs, inversion (with what it records), the edit, the
# outputs and previews. A node's stage is its spec's "stage", else the default of its id below.
STAGE_OF_ID = {
    "inputs": ("ckpt", "lora", "video", "frames", "encode", "prompts", "pos", "neg", "mask", "canny", "show_edges",
               "cnet", "cn_src", "cn_edit"),
    "invert": ("temporal", "store", "source", "invert", "nulltext"),
    "edit": ("srcmask", "blend", "reweight", "fresh", "lblend", "inject", "guider", "noise", "ksampler", "sigmas",
             "sample"),
    "outputs": ("decode", "create", "save", "preview", "show", "branches", "decode_src", "show_src", "mask_img",
                "show_mask"),
}
STAGE_TITLES = {"inputs": "1  Inputs: video, model, prompts", "invert": "2  Inversion (source video -> noise)",
                "edit": "3  Edit", "outputs": "4  Outputs and previews"}

VIDEO_LINE = ("- your video as `ComfyUI/input/input.mp4` (or pick another in *Load Video*); 8 frames at 512x512 is "
              "the papers' size")
SD15_LINE = ("- an SD1.5 checkpoint in `models/checkpoints` (`v1-5-pruned-emaonly.safetensors`: pick yours in "
             "*Load Checkpoint*)")


def _note(what: str, provide: str, change: str, settings: str = "", checkpoint: str = SD15_LINE) -> str:
    """The workflow's Read me: what it does (two lines), what to provide (the video, `checkpoint`, then `provide`:
    further files, each line starting with a newline), the widgets to change first, the papers' settings."""
    return (f"## What this does\n{what}\n\n**Provide**\n{VIDEO_LINE}\n{checkpoint}{provide}\n\n"
            f"**Change first**\n{change}" + (f"\n\n**The papers' settings**\n{settings}" if settings else ""))


FZ_SETTINGS = ("- style (jeep_watercolor): mode `refine`, cross 0.8, self 0.0-0.8, the style word reweighted "
               "x10 (`watercolor:10`), no blend words (full self-attention replacement)\n"
               "- attribute: `refine`, cross 0.5 and self 0.0-0.5 (squ_carrot, the new words x10-20), or 0.7 and "
               "0.0-0.7 (duck_rubber)\n"
               "- shape / local (jeep_posche): `replace`, cross 0.5, self 0.0-0.5, blend words = the source "
               "words of the object, threshold 0.3; add latent blending for the cleanest background")
PROMPTS_FIRST = ("- *Prompts*: the source text describes your video, the edit text the same with your change "
                 "(same word count for a word swap)")


def workflow(card: str, title: str, nodes: list[dict], note: str, **stage_titles: str) -> dict:
    """One shipped workflow: a short label for its thumbnail (`card`), its title, its nodes (execution order), its
    note; stage titles other than the defaults by stage key (e.g. invert="2  Inversion + attention recorded")."""
    stage = {i: k for k, ids in STAGE_OF_ID.items() for i in ids}
    nodes = [{**n, "stage": n.get("stage") or stage[n["id"]]} for n in nodes]
    return {"card": card, "title": title, "nodes": nodes, "note": note,
            "stages": [(k, stage_titles.get(k, t)) for k, t in STAGE_TITLES.items()]}


def fresh_note(where: str = "") -> str:
    """The note line on Fresh Noise Start and its Source Attention Mask; `where` says which model it patches."""
    return ("\n- *Old object starts from fresh noise* (Fresh Noise Start" + where + ") with *Where the old object was* "
            "(Source Attention Mask, `words` = the source words `red circle`): an object edit starts there from fresh "
            "noise instead of the inverted video, so the old colour cannot hold; bypass both for a style or "
            "background edit")


FZ_INVERT = "2  Inversion, attention recorded (Attention Store)"
FZ_EDIT = "3  Edit with the recorded attention fused (Attention Blend)"
WORKFLOWS = {
    "invert_reconstruct_video": workflow(
        "Invert + reconstruct",
        "Invert and reconstruct a video", INVERT_AND_RECONSTRUCT, _note(
            "DDIM-inverts your video to noise with the source prompt, then samples it back with the same prompt "
            "(cfg 1): the output should look like the input. Run it first to check the inversion on your clip.",
            "", "- *Source prompt*: describe your video\n- *steps* on Video DDIM Invert and the sampler: the same "
            "number (20; 50 in the papers)"),
        edit="3  Reconstruct (sample back, same prompt)"),
    "blended_latent_auto_mask": workflow(
        "Blended Latent: attention mask",
        "Blended latent local edit, mask from cross-attention", _bld_local_edit("cross-attention"), _note(
            "A local edit (Blended Latent Diffusion): inside the region where the edited words attend, the edit "
            "prompt; outside, the latents of the inversion, so the background stays as it was.",
            "", PROMPTS_FIRST + "\n- *Latent Blend With Inversion*: `words` = the edited words of the edit "
            "prompt (`yellow circle`); `threshold` (0.3) and `dilation` grow or shrink the region\n- *Where the old "
            "object was* (Source Attention Mask): `words` = the same thing in the source prompt (`red circle`); "
            "its mask joins the edit's (mask_source `union`), so the old object cannot stay beside the new one\n"
            "- *Old object starts from fresh noise* (Fresh Noise Start, with the same mask): an object edit starts "
            "there from fresh noise instead of the inverted video, so the old colour cannot hold; bypass it for a "
            "background edit\n- *New word reweighted* (Cross-Attention Reweight): the words your edit adds (`yellow:4`), so that "
            "the new colour wins over what the inverted video holds"),
        edit="3  Edit, blended with the inversion outside the mask"),
    "blended_latent_your_mask": workflow(
        "Blended Latent: painted mask",
        "Blended latent local edit, user mask", _bld_local_edit("user mask"), _note(
            "A local edit (Blended Latent Diffusion) inside a mask you paint: inside, the edit prompt; outside, "
            "the latents of the inversion.",
            "\n- the mask as `ComfyUI/input/mask.png`: white (red channel) = edit, black = keep, one for all "
            "frames", PROMPTS_FIRST + "\n- *Edit region*: your mask; *dilation* grows it"),
        edit="3  Edit, blended with the inversion outside your mask"),
    "videop2p_word_swap": workflow(
        "Video-P2P: word swap",
        "Video-P2P word swap with null-text optimisation and local blend", VIDEOP2P_WORD_SWAP, _note(
            "Video-P2P: the source and the edit run side by side, the edit's attention driven by the source's "
            "(word swap circle -> square); null-text optimisation makes the source branch reconstruct the video, "
            "Local Blend keeps everything outside the edited words.",
            "", PROMPTS_FIRST + "\n- *Video-P2P Guider*: `blend_words` (source) and `blend_words_edit` (edit) "
            "= the swapped words; `reweight` (e.g. `square:2`)" + fresh_note(
                ", on the guider's model: the edit branch only"),
            "- word swap: cross 0.2, self 0.5, Local Blend threshold 0.3, null text 10 inner steps, cfg 7.5\n"
            "- attribute / style (words added): mode `refine`, reweight the new words"),
        invert="2  Inversion + null-text optimisation", edit="3  Edit (source and edit branches together)"),
    "infusion_two_concepts_lora": workflow(
        "InFusion: two concepts + LoRA",
        "InFusion multi-concept edit with a LoRA", INFUSION_MULTI_CONCEPT_LORA, _note(
            "InFusion: features and attention of the source injected into the edit, each edited concept fused "
            "inside its own cross-attention mask (here two: the object's colour and the background's).",
            "\n- a LoRA for your checkpoint in `models/loras` (named `infusion_lora.safetensors` here: pick "
            "yours in the *LoRA* node; strength 0 to run without)",
            PROMPTS_FIRST + "\n- *InFusion Inject*: `concepts` = `source word->edit word` pairs, comma-separated",
            "- SD1.5 + LoRA; decoder block 4's features injected for the first half of the steps "
            "(`feature_end` 0.5), the source's keys/values in blocks 4-11 up to 0.8 (`kv_end`), then each concept "
            "fused in its mask (`alpha` 0.5, `mask_threshold` 0.3): Plug-and-Play's values where the paper gives "
            "none"),
        invert="2  Inversion, source features recorded", edit="3  Edit, concepts injected and fused"),
    "fatezero_style_edit": workflow(
        "FateZero: style edit",
        "FateZero style edit (attention fusion, full self-attention replacement)", FATEZERO_STYLE, _note(
            "FateZero style edit: the attention recorded while inverting is fused into the edit, the "
            "self-attention replaced everywhere, so the structure stays and the style changes.",
            "", PROMPTS_FIRST + "\n- *Attention Blend*: `reweight` = the style words x10 (`watercolor:10`); "
            "the windows (cross 0.8, self 0.0-0.8)", FZ_SETTINGS), invert=FZ_INVERT,
        edit=FZ_EDIT),
    "fatezero_attribute_edit": workflow(
        "FateZero: local attribute edit",
        "FateZero local attribute edit (word swap, blended self-attention)", FATEZERO_LOCAL, _note(
            "FateZero local edit: the recorded attention fused into the edit, the self-attention blended inside "
            "the mask of the source words, so only that object changes.",
            "", PROMPTS_FIRST + "\n- *Attention Blend*: `blend_words` = the source words of the object "
            "(`red circle`); `mode` replace (word swap) or refine" + fresh_note(), FZ_SETTINGS), invert=FZ_INVERT,
        edit=FZ_EDIT),
    "fatezero_latent_blend_edit": workflow(
        "FateZero: local + latent blend",
        "FateZero local edit with latent blending (blended self-attention, latents outside the source/edit word "
        "masks kept on the inversion)", FATEZERO_LOCAL_LATENT_BLEND, _note(
            "FateZero local edit plus latent blending: outside the union of the source words' and edited words' "
            "masks the latents come from the inversion (steps 0.2-0.8): the cleanest background.",
            "", PROMPTS_FIRST + "\n- *Attention Blend*: `blend_words` = source words (`red circle`)\n"
            "- *Latent blend*: `words` = edited words (`yellow circle`)" + fresh_note(), FZ_SETTINGS),
        invert=FZ_INVERT,
        edit="3  Edit: attention fused, latents blended with the inversion"),
    "fatezero_controlnet_lora": workflow(
        "FateZero: ControlNet + LoRA",
        "FateZero local edit on a LoRA with core ControlNet (Canny edges of every frame)", FATEZERO_CONTROLNET_LORA,
        _note(
            "FateZero's local edit on a LoRA-adapted model with a core ControlNet: the Canny edges of every frame "
            "guide the inversion and the edit alike (the attention is recorded under the same control).",
            "\n- a LoRA in `models/loras` (`your_lora.safetensors` here: pick yours)\n- the SD1.5 Canny "
            "ControlNet `control_v11p_sd15_canny.pth` in `models/controlnet`",
            PROMPTS_FIRST + "\n- *Canny*: the thresholds (check the hints preview)\n- *Attention Blend*: "
            "`blend_words`", FZ_SETTINGS),
        inputs="1  Inputs: video, model + LoRA, prompts, ControlNet hints", invert=FZ_INVERT,
        edit=FZ_EDIT),
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
            n.update(widgets={"ckpt_name": "sd_xl_base_1.0.safetensors"}, title="SDXL checkpoint")
        elif n["id"] == "store":
            n["widgets"] = dict(n["widgets"], memory_budget_gb=64.0)
            n["title"] = "Attention Store (SDXL: ~44 GiB)"
    return spec


SDXL_LINE = ("- an SDXL-family checkpoint in `models/checkpoints` (`sd_xl_base_1.0.safetensors` or a fine-tune: pick "
             "yours in *SDXL checkpoint*); EDM-sampled models (Playground v2.5) are refused\n- about 44 GiB of RAM "
             "for the Attention Store at 8 frames of 1024x1024 and 20 steps (fewer frames or steps: less)")
WORKFLOWS["sdxl_fatezero_style_edit"] = workflow(
    "SDXL: FateZero style edit",
    "SDXL: FateZero style edit (defaults chosen from the model)", _sdxl_fatezero_style(), _note(
        "FateZero's style edit on an SDXL-family model: the same graph as the SD1.5 one; the levels recorded, the "
        "temporal layers (`min_channels` -1) and the prompts' pooled output are chosen from the model.",
        "", PROMPTS_FIRST + "\n- *Attention Blend*: `reweight` = the style words x10 (`watercolor:10`); "
        "the windows (cross 0.8, self 0.0-0.8)\n- *Attention Store*: `memory_budget_gb` (refused above it, or spilled "
        "with `over_budget`); `source_attention` 'recompute at edit' keeps about 1/20 of the store for 1.4x "
        "the edit's time",
        FZ_SETTINGS, checkpoint=SDXL_LINE), invert=FZ_INVERT,
    edit=FZ_EDIT)


def main():
    out_dir = ROOT / "workflows"
    out_dir.mkdir(exist_ok=True)
    only = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else None  # e.g. fatezero_controlnet_lora
    for name, wf in WORKFLOWS.items():
        if only is not None and name not in only:
            continue
        path = out_dir / f"{name}.json"
        ui = build_ui(wf["nodes"], wf["title"], stages=wf["stages"], note=wf["note"])
        ui["extra"]["zsve_card"] = wf["card"]
        hidden = hidden_links(ui)
        if hidden:  # the layout search found no layout without them: say so (tests/test_workflows.py fails too)
            print(f"warning: {name}: links behind nodes {hidden}; change the stages or the search "
                  "(tests/zsve_layout.py)", file=sys.stderr)
        path.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
