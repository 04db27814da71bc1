"""Benchmark rows for FateZero (issue 4), built from the pack's nodes exactly as a graph would wire them:

    TemporalSelfAttentionPatch(middle) -> AttentionStore -> VideoDDIMInvert(source prompt)
    TemporalSelfAttentionPatch(middle) -> AttentionBlend(inversion) -> KSamplerAdvanced(edit prompt, from z_T)

- "FateZero (style)": FateZero's style/attribute settings (jeep_watercolor.yaml): refinement, cross window
  0.8, self-attention fully replaced in [0, 0.8) (no blend mask), and the words the edit adds reweighted x10
  (its `eq_params: watercolor 10`; the attribute configs reweight their new nouns x10 the same way).
- "FateZero (local blended)": FateZero's shape/local settings (jeep_posche.yaml): word swap when the word
  counts match (else refinement), cross 0.5, self [0, 0.5) blended with the mask of the source words of the
  edited object (or of the background for a background edit), threshold 0.3.
- "FateZero (local + latent blend)": the same plus FateZero's latent blending (jeep_posche_local_latent_blend.yaml,
  `blend_latents: True`): between 20% and 80% of the steps the latent outside the mask is put back on the
  inversion trajectory (x_t = x_inv + M (x_t - x_inv)), here by the pack's Latent Blend With Inversion node
  with the mask from the edit-time cross-attention of the edited words (threshold 0.3, no extra dilation at
  the toy's 16x16 latent). FateZero's own mask is the union of the source words' stored maps and the edit
  words' maps; the edited words' map is the part the edit-time pass can see.
"""

from __future__ import annotations

from .benchmark import BenchSpec, _pack, decode, encode_frames, encode_text, invert, register, sample_from
from .methods_bld import edit_words

TEMPORAL_MODE = "middle"


def source_words(spec: BenchSpec) -> str:
    """Words of the source prompt naming what the edit changes."""
    e = spec.edit
    if e.target is None:
        return e.background.caption()
    m = e.motions[e.target]
    return f"{m.color} {m.shape}"


def added_words(spec: BenchSpec) -> list[str]:
    """Words of the edit prompt that the source prompt does not have at the same place (what FateZero's
    eq_params reweight: the style word, the new object)."""
    src, edit = spec.edit.source_prompt.split(), spec.edit.edit_prompt.split()
    if len(src) != len(edit):
        return [w for w in edit if w not in src]
    return [e for s, e in zip(src, edit) if s != e]


def fatezero_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec: BenchSpec, blend: dict):
    fz = _pack().nodes.fatezero
    m = fz.TemporalSelfAttentionPatch.execute(model, mode=TEMPORAL_MODE, include_own_frame=False,
                                              min_channels=0).result[0]
    store_model = fz.AttentionStore.execute(m, record_window=blend["record_window"], skip_full_res=True,
                                            memory_budget_gb=0.0).result[0]
    z_T, inv = invert(store_model, encode_frames(vae, frames), encode_text(clip, source_prompt), spec)
    reweight = ", ".join(f"{w}:{blend['eq']}" for w in added_words(spec)) if blend.get("eq") else ""
    args = dict(source_prompt=source_prompt, edit_prompt=edit_prompt, mode=blend["mode"],
                cross_replace=blend["cross"], cross_replace_words="", self_replace_start=0.0,
                self_replace_end=blend["self"], reweight=reweight, blend_words=blend.get("blend_words", ""),
                blend_threshold=0.3, only_cond=True)
    edit_model = fz.AttentionBlend.execute(m, inv, clip, **args).result[0]
    if blend.get("latent_blend"):
        edit_model, _, _ = _pack().nodes.blend.apply_latent_blend(
            edit_model, inv, mask_source="cross-attention", start=0.2, end=0.8, threshold=0.3, dilation=1,
            clip=clip, prompt=edit_prompt, words=edit_words(spec))
    pos, neg = encode_text(clip, edit_prompt), encode_text(clip, spec.negative_prompt)
    return decode(vae, sample_from(edit_model, z_T, pos, neg, spec))


@register("FateZero (style)")
def fatezero_style(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    cfg = dict(mode="refine", cross=0.8, self=0.8, record_window=0.8, eq=10)
    return fatezero_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec, cfg)


@register("FateZero (local blended)")
def fatezero_local(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    cfg = dict(mode="replace", cross=0.5, self=0.5, record_window=0.5, blend_words=source_words(spec))
    return fatezero_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec, cfg)


@register("FateZero (local + latent blend)")
def fatezero_local_latent_blend(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    cfg = dict(mode="replace", cross=0.5, self=0.5, record_window=0.5, blend_words=source_words(spec),
               latent_blend=True)
    return fatezero_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec, cfg)
