"""Benchmark rows for Video-P2P (issue 5), built from the pack's nodes as a graph wires them:

    TemporalSelfAttentionPatch(first) -> VideoDDIMInvert(source prompt) -> [NullTextOptimize] ->
    VideoP2PGuider(source, edit, empty; refinement, cross 0.2, self 0.5, Local Blend from 0.2, threshold 0.3, on
    the source prompt's words of what the edit changes and the edit prompt's words for them) -> SamplerCustomAdvanced
    (DisableNoise, ddim, ddim_uniform, same steps, from z_T)

Self-attention is replaced on every level of the toy's 128-px clips (the Guider's rule, maps of at most 32x32
queries: docs/videop2p.md).

Refinement rather than the word swap Video-P2P's code picks for prompts of equal word count: on the toy model a
word swap hands the new colour word the old colour word's maps, which keep the old colour (the fast row with a
word swap: two objects 0%, colour swap on gray 50%; with refinement 100% / 88%; the same holds for FateZero's
local row, docs/fatezero.md). Video-P2P's configs choose per edit too (refinement for "origami", "crochet",
"Lego"; word swap for "Spider-Man", "railway").

The words the edit adds are reweighted x4 (Video-P2P's configs reweight the new word in every edit, x2 to x5;
penguin "crochet" and man-motor "Spider-Man" use x4): chosen on the dev split of issue 20, where the fast row went
from 70% to 78% edit success (x10: 77%, with a higher warp error; toy/RESULTS.md). Object edits start the target
branch inside the edited object's Source Attention Mask from fresh noise (Fresh Noise Start on the guider's model; not
in Video-P2P): chosen on the dev split of issue 20, the fast row 78.8% -> 84.2% (+5.4 [-0.8, +12.5]; colour swaps
88% -> 100%), local background -0.2 dB; the null-text row follows the same rule.

Local Blend on both prompts' words, as Video-P2P's configs pair them (blend_word `road`/`railway`, `man`/`Spider-Man`;
the reference unites the two prompts' masks): `blend_words` = the source words of what the edit changes (the
edited object's phrase, the background's, or both), `blend_words_edit` = the edit prompt's words for the same
(`methods_bld.edit_words`). Until 2026-12-02 the row left `blend_words_edit` empty, and where the source words'
mask missed part of what changes (a plain gray background's word attends to part of it) the target branch was put
back on the source there (a gray block left in a new striped background): on the 60 dev items of issue 20 the fast
row with both words edits 87.5% -> 93.3% of the frames (+5.8 [0.0, +12.1], paired; toy/RESULTS.md).

- "Video-P2P (fast)": without null text (the source branch uses its conditional prediction), as `--fast`.
- "Video-P2P (null-text)": with the shared null-text optimisation (10 inner steps, epsilon 1e-5).
"""

from __future__ import annotations

import torch

from .benchmark import BenchSpec, _pack, decode, encode_frames, invert, prompt_pair, register
from .methods_bld import SOURCE_WINDOW, edit_words, source_words, with_fresh_noise
from .methods_fatezero import added_words

REWEIGHT = 4  # Video-P2P configs: x2-x5 on the new word


def videop2p_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec: BenchSpec, null_text: bool):
    import comfy.samplers

    pack = _pack()
    vp, fz = pack.nodes.videop2p, pack.nodes.fatezero
    m = fz.TemporalSelfAttentionPatch.execute(model, mode="first", include_own_frame=False,
                                              min_channels=0).result[0]
    pair = prompt_pair(clip, source_prompt, edit_prompt, spec.negative_prompt)
    src, neg = pair.source.conditioning, pair.negative.conditioning
    # Attention Store on the inversion: the source's cross-attention, for the edited object's mask (Fresh Noise Start)
    store = fz.AttentionStore.execute(m, record_window=SOURCE_WINDOW, skip_full_res=False, memory_budget_gb=0.0).result[0]
    z_T, inv = invert(store, encode_frames(vae, frames), src, spec)
    nt = vp.run_null_text(m, inv, src, neg, spec.cfg, 10, 1e-5, disable_pbar=True) if null_text else None
    reweight = ", ".join(f"{w}:{REWEIGHT}" for w in added_words(spec))
    guider = vp.VideoP2PGuiderNode.execute(
        with_fresh_noise(m, inv, pair, spec), inv, pair, spec.cfg, "refine", 0.2, "", 0.5, reweight,
        source_words(spec), edit_words(spec), 0.2, 0.3, vp.TARGET_UNCOND[0], null_text=nt).result[0]
    ms = m.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, spec.scheduler, spec.steps).cpu()
    x = z_T["samples"]
    out = guider.sample(torch.zeros_like(x), x, comfy.samplers.sampler_object(spec.sampler), sigmas,
                        disable_pbar=True, seed=0)
    return decode(vae, {"samples": out})


@register("Video-P2P (fast)")
def videop2p_fast(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    return videop2p_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec, null_text=False)


@register("Video-P2P (null-text)")
def videop2p_null_text(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    return videop2p_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec, null_text=True)
