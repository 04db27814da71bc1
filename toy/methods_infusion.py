"""Benchmark row for InFusion (issue 6): "InFusion".

The clip is DDIM-inverted with the source prompt on a model with temporal self-attention ("middle", as the
other rows; InFusion initialises temporal attention from spatial attention) patched by InFusionSource; the
edit samples from z_T with the edit prompt on the same temporal model patched by InFusionInject. The
concepts are the word pairs in which the two prompts differ ("red->blue", "stripes->dots", ...), so a
benchmark item with two changed objects becomes a two-concept edit.

Layers for the toy UNet (2 resolution levels, output blocks 0-3): Plug-and-Play's SD1.5 choices (ResBlock
of output block 4, self-attention of blocks 4-11) map to the lowest decoder level's last block (1) for the
features and blocks 1-3 for attention; the windows are the node defaults (S1 0.5, S2 0.8).
"""

from __future__ import annotations

from .benchmark import (
    BenchSpec,
    _pack,
    decode,
    encode_frames,
    encode_text,
    invert,
    prompt_pair,
    register,
    sample_from,
)

TEMPORAL_MODE = "middle"
TOY_LAYERS = dict(feature_blocks="1", attention_blocks="1-3", feature_end=0.5, kv_end=0.8)


def concepts_of(source_prompt: str, edit_prompt: str) -> str:
    """'a red circle on gray' vs 'a blue circle on gray' -> 'red->blue' (same word count, else '')."""
    s, e = source_prompt.split(), edit_prompt.split()
    if len(s) != len(e):
        return ""
    return ", ".join(f"{a}->{b}" for a, b in zip(s, e) if a != b)


def infusion_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec: BenchSpec, **overrides):
    pack = _pack()
    temporal = pack.nodes.fatezero.TemporalSelfAttentionPatch
    nodes_inf = pack.nodes.infusion
    layers = dict(TOY_LAYERS)
    layers.update({k: v for k, v in overrides.items() if k in layers})
    m = temporal.execute(model, mode=TEMPORAL_MODE, include_own_frame=False, min_channels=0).result[0]
    src_model = nodes_inf.InFusionSource.execute(m, skip_full_res=True, memory_budget_gb=0.0, **layers).result[0]
    z_T, inv = invert(src_model, encode_frames(vae, frames), encode_text(clip, source_prompt), spec)
    inject = dict(strength=1.0, alpha=0.5, mask_threshold=0.3, inject_uncond=True)
    inject.update({k: v for k, v in overrides.items() if k in inject})
    concepts = overrides.get("concepts", concepts_of(source_prompt, edit_prompt))
    pair = prompt_pair(clip, source_prompt, edit_prompt, spec.negative_prompt)
    edit_model, masks = nodes_inf.InFusionInject.execute(m, inv, pair, concepts,
                                                         **layers, **inject).result
    pos, neg = encode_text(clip, edit_prompt), encode_text(clip, spec.negative_prompt)
    out = decode(vae, sample_from(edit_model, z_T, pos, neg, spec))
    if overrides.get("return_masks"):
        return out, masks, inv
    return out


@register("InFusion")
def infusion(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    return infusion_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec)
