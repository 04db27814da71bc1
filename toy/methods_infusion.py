"""Benchmark row for InFusion (issue 6): "InFusion".

The clip is DDIM-inverted with the source prompt on a model with temporal self-attention ("middle", as the
other rows, the finest level per-frame: `methods_bld.TEMPORAL_MIN_CHANNELS`; InFusion initialises temporal attention
from spatial attention) patched by InFusionSource; the
edit samples from z_T with the edit prompt on the same temporal model patched by InFusionInject. The
concepts are the word pairs in which the two prompts differ ("red->blue", "stripes->dots", ...), so a
benchmark item with two changed objects becomes a two-concept edit.

Layers for the toy UNet (2 resolution levels, output blocks 0-3): Plug-and-Play's SD1.5 choices (ResBlock
of output block 4, self-attention of blocks 4-11) map to the lowest decoder level's last block (1) for the
features (and the first full-resolution block too, 1-2, for an edit that changes an object and keeps the background:
`OBJECT_EDIT_FEATURE_BLOCKS`) and blocks 1-3 for attention. Windows: S1 0.5 (the node default) and S2 0.7 instead of the node's 0.8
(Plug-and-Play's): chosen on the dev split of issue 20, where the source keys/values of steps 14-15 of 20 held
the old background in the background changes (25% of the frames edited with S2 0.8, 75% with 0.7) and the row
went from 61% to 75% edit success (S2 0.65: 74%; 0.5, no key/value phase at all: 75% with a higher warp error;
toy/RESULTS.md). The words the edit adds are reweighted x4 in the feature phase (the Cross-Attention Reweight node
with end = feature_end; not in the paper; Video-P2P's row uses x4 too): chosen on the dev split of issue 20 (71.7% -> 79.6% edit success, paired +7.9
[+2.5, +14.2]; x2 +6.7, x10 +2.1, x4 over every step +7.1; docs/infusion.md). Object edits start inside the edited
object's Source Attention Mask from fresh noise (Fresh Noise Start, as every row with a KSampler; Attention Store
on the inversion records the source's cross-attention for the mask). The source keys/values reach only the query rows
outside the concepts' region, which also takes in where a concept's words get most of the attention the prompt's words
get: InFusion Inject's defaults since the 15th session, chosen on the dev split of issue 20 (80.8% -> 90.0%, paired
+9.2 [+3.3, +15.8]; docs/infusion.md).
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
from .methods_bld import SOURCE_WINDOW, TEMPORAL_MIN_CHANNELS, with_fresh_noise
from .methods_fatezero import words_added

TEMPORAL_MODE = "middle"
REWEIGHT = 4  # the added words' cross-attention in the feature phase (Cross-Attention Reweight; chosen on dev)
TOY_LAYERS = dict(feature_blocks="1", attention_blocks="1-3", feature_end=0.5, kv_end=0.7)
# An edit that changes an object and keeps the background (colour or shape swap, one of two objects): the feature
# injection (outside the concepts' masks) also in the first decoder block of the full-resolution level, so the feature
# phase holds the background at the resolution its stripes and dots are drawn at. Chosen on the 60 dev items of issue
# 20 (paired, 2026-12-02): PSNR vs VAE (local) +3.2 dB [+1.2, +5.8], warp error -0.0008 [-0.0018, 0.0000], edit ok
# +0.8 [-2.1, +4.6]; for every edit (blocks "1-2" everywhere) the background changes lost 88% -> 72% of the frames and
# object + background edits 65% -> 42%: where the background's concept mask misses part of it, the source's
# full-resolution features keep the old background there (toy/RESULTS.md, docs/infusion.md).
OBJECT_EDIT_FEATURE_BLOCKS = "1-2"


def concepts_of(source_prompt: str, edit_prompt: str) -> str:
    """The runs of words in which the prompts differ, one concept each ('a red circle on gray' vs 'a blue square
    on green dots' -> 'red circle->blue square, gray->green dots'): the captions are compared phrase by phrase
    (split at "and" / "on"), words aligned by difflib inside a phrase; the article "a" is left out of a run (it
    is in every caption). Words only inserted or only deleted make no concept."""
    import difflib
    import re

    def phrases(text):  # "a red circle and a green square on gray" -> object phrases, then the background
        return [p.split() for p in re.split(r" (?:and|on) ", text)]

    sp, ep = phrases(source_prompt), phrases(edit_prompt)
    pairs = list(zip(sp, ep)) if len(sp) == len(ep) else [(source_prompt.split(), edit_prompt.split())]
    out = []
    for s, e in pairs:
        for op, i0, i1, j0, j1 in difflib.SequenceMatcher(a=s, b=e, autojunk=False).get_opcodes():
            if op != "replace":
                continue
            a = [w for w in s[i0:i1] if w != "a"]
            b = [w for w in e[j0:j1] if w != "a"]
            if a and b:
                out.append(f"{' '.join(a)}->{' '.join(b)}")
    return ", ".join(out)


def reweight_added(edit_model, pair, source_prompt: str, edit_prompt: str, factor: float, end: float):
    """The Cross-Attention Reweight node on `edit_model`: the words the edit prompt adds (`words_added`) times
    `factor` over the first `end` of the steps; the model as it is when the edit adds no word or factor is 1."""
    words = words_added(source_prompt, edit_prompt)
    if not words or factor == 1:
        return edit_model
    reweight = ", ".join(f"{w}:{factor:g}" for w in words)
    return _pack().nodes.reweight.CrossAttentionReweight.execute(edit_model, pair, reweight, end).result[0]


def set_reading(edit_model, **reading):
    """Measurement only: switch the InFusion controller on `edit_model` (InFusion Inject's output) to another
    reading of the feature injection (attention/infusion.py FEATURE_MODES / FEATURE_REGIONS)."""
    from dataclasses import replace

    pack = _pack()
    to = edit_model.model_options.get("transformer_options", {})
    ctrl = [p for p in to.get(pack.nodes._attn_patch.PROCESSORS_KEY, [])
            if isinstance(p, pack.attention.infusion.InFusionController)]
    assert len(ctrl) == 1, "no InFusion controller on the model"
    plan = ctrl[0].plan
    if plan.concepts or reading.get("feature_region", "all") == "all":
        ctrl[0].plan = replace(plan, **reading)


def infusion_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec: BenchSpec, **overrides):
    pack = _pack()
    temporal = pack.nodes.fatezero.TemporalSelfAttentionPatch
    nodes_inf = pack.nodes.infusion
    layers = dict(TOY_LAYERS)
    if spec.edit.local:  # the edit keeps the background: hold it at full resolution too
        layers["feature_blocks"] = OBJECT_EDIT_FEATURE_BLOCKS
    layers.update({k: v for k, v in overrides.items() if k in layers})
    m = temporal.execute(model, mode=TEMPORAL_MODE, include_own_frame=False,
                         min_channels=TEMPORAL_MIN_CHANNELS).result[0]
    src_model = nodes_inf.InFusionSource.execute(m, skip_full_res=True, memory_budget_gb=0.0, **layers).result[0]
    fresh = overrides.get("fresh_noise", True)
    if fresh:  # the source's cross-attention, for the edited object's mask (Fresh Noise Start)
        src_model = pack.nodes.fatezero.AttentionStore.execute(src_model, record_window=SOURCE_WINDOW, skip_full_res=False,
                                                                memory_budget_gb=0.0).result[0]
    z_T, inv = invert(src_model, encode_frames(vae, frames), encode_text(clip, source_prompt), spec)
    inject = dict(strength=1.0, alpha=0.5, mask_threshold=0.3, inject_uncond=True)
    inject.update({k: v for k, v in overrides.items() if k in inject})
    concepts = overrides.get("concepts", concepts_of(source_prompt, edit_prompt))
    pair = prompt_pair(clip, source_prompt, edit_prompt, spec.negative_prompt)
    edit_model, masks = nodes_inf.InFusionInject.execute(m, inv, pair, concepts,
                                                         **layers, **inject).result
    edit_model = reweight_added(edit_model, pair, source_prompt, edit_prompt, overrides.get("reweight", REWEIGHT),
                                layers["feature_end"])
    reading = {k: overrides[k] for k in ("feature_mode", "feature_region", "kv_region", "region_share") if k in overrides}
    if reading:  # a reading of the feature injection other than the node's (docs/infusion.md measures them)
        set_reading(edit_model, **reading)
    if fresh:  # object edits start from fresh noise in the edited object's mask (chosen on the dev split of issue 20)
        edit_model = with_fresh_noise(edit_model, inv, pair, spec)
    pos, neg = encode_text(clip, edit_prompt), encode_text(clip, spec.negative_prompt)
    out = decode(vae, sample_from(edit_model, z_T, pos, neg, spec))
    if overrides.get("return_masks"):
        return out, masks, inv
    return out


# Object edits start inside the edited object's Source Attention Mask from fresh noise (Fresh Noise Start; none for
# background edits), as the other rows: chosen on the dev split of issue 20, 79.6% -> 82.9% (+3.3 [-3.3, +10.4];
# object + background 48% -> 65%), local background -0.6 dB (toy/RESULTS.md).
@register("InFusion")
def infusion(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    return infusion_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec)
