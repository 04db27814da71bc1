"""Attention Store's recompute mode (issue 21, store size): the inversion records nothing and Attention Blend
evaluates each fused inversion step again (nodes/_source_pass.py). The fused edit must equal the stored mode's
exactly, with nothing stored and one source pass per fused step."""

from __future__ import annotations

import pytest
import torch

import zsve.nodes._comfy as glue
from zsve.attention.store import RecomputedAttention
from zsve.nodes import _source_pass
from zsve.nodes.fatezero import AttentionBlend, AttentionStore, TemporalSelfAttentionPatch
from zsve_harness import encode_text, prompt_pair

SRC = "a red circle on blue stripes"
EDIT = "a green square on blue stripes"
STEPS = 5


def _latent(frames=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, h, w, generator=g)
    return {"samples": base + 0.3 * torch.randn(frames, 4, h, w, generator=g)}


def _store_model(model, mode):
    return AttentionStore.execute(model, record_window=1.0, skip_full_res=False, memory_budget_gb=0.0,
                                  source_attention=mode).result[0]


def _edit(model, inv, clip, positive, negative, **kw):
    import comfy.sample

    args = dict(mode="refine", cross_replace=0.8, cross_replace_words="", self_replace_start=0.0,
                self_replace_end=0.6, reweight="", blend_words="", blend_threshold=0.3, only_cond=True)
    args.update(kw)
    out = AttentionBlend.execute(model, inv, prompt_pair(clip, SRC, EDIT), **args)
    m = out.result[0]
    z = inv.z_T
    res = comfy.sample.sample(m, torch.zeros_like(z), STEPS, 7.5, "ddim", "ddim_uniform", positive, negative, z,
                              start_step=0, last_step=10000, force_full_denoise=True, disable_noise=True, seed=0,
                              disable_pbar=True)
    return res, out


def _source_pass_of(model):
    from comfy.patcher_extension import WrappersMP

    ws = [w for key, lst in model.wrappers.get(WrappersMP.PREDICT_NOISE, {}).items()
          if key.startswith(_source_pass.SOURCE_PASS_KEY) for w in lst]
    return ws[0].__self__ if ws else None


@pytest.fixture(scope="module")
def temporal_model(tiny_model):
    return TemporalSelfAttentionPatch.execute(tiny_model, mode="previous+first", include_own_frame=False,
                                              min_channels=0).result[0]


@pytest.mark.parametrize("blend_words", ["", "circle"])
def test_recompute_gives_the_stored_modes_edit_and_mask_exactly_and_keeps_only_the_mask_level(temporal_model, tiny_clip, blend_words):
    model = temporal_model
    positive, negative = encode_text(tiny_clip, SRC), encode_text(tiny_clip, "")
    edit_pos = encode_text(tiny_clip, EDIT)
    latent = _latent()
    _, inv_s = glue.run_inversion(_store_model(model, "store"), latent, positive, None, STEPS, 1.0, disable_pbar=True)
    _, inv_r = glue.run_inversion(_store_model(model, "recompute at edit"), latent, positive, None, STEPS, 1.0,
                                  disable_pbar=True)
    assert torch.equal(inv_s.z_T, inv_r.z_T)
    rec, st = inv_r.records["attention"], inv_s.records["attention"]
    assert isinstance(rec, RecomputedAttention)
    # kept: only the blend-mask level's head-mean cross-attention
    assert {key[2] for key in rec.masks.entries} == {"cross"}
    assert all(e["p"].shape[1] == 1 for e in rec.masks.entries.values())
    assert 0 < rec.nbytes < st.nbytes / 4

    # (the random tiny model's cross-attention is nearly flat: a high threshold gives a partial mask)
    ref, out_s = _edit(model, inv_s, tiny_clip, edit_pos, negative, blend_words=blend_words, blend_threshold=0.95)
    got, out = _edit(model, inv_r, tiny_clip, edit_pos, negative, blend_words=blend_words, blend_threshold=0.95)
    # Attention Blend's mask output (Latent Blend With Inversion's input) is the stored mode's, exactly
    assert torch.equal(out.result[1], out_s.result[1])
    if blend_words:
        assert 0 < float(out.result[1].mean()) < 1
    plain, _ = _edit(model, inv_s, tiny_clip, edit_pos, negative, cross_replace=0.0, self_replace_end=0.0)
    assert (ref - plain).abs().max() > 1e-2  # the fusion acts
    assert torch.equal(got, ref), float((got - ref).abs().max())
    sp = _source_pass_of(out.result[0])
    # cross window 0.8 of 5 steps: rows 0..3 (int(0.8 * 6) = 4), self [0, 0.6): steps 0..2 -> 4 fused steps
    assert sp is not None and sp.passes == 4
    text = " ".join(out.ui["text"])
    assert "recomputed at the edit: 4 of 5 steps" in text and "head-mean cross-attention" in text


def test_recompute_under_context_windows_matches_the_stored_mode(temporal_model, tiny_clip):
    from zsve.nodes.context import VideoContextWindows

    model = VideoContextWindows.execute(temporal_model, context_length=2, context_overlap=1,
                                        context_schedule="standard_static", context_stride=1, closed_loop=False,
                                        fuse_method="pyramid", key_frames="none").result[0]
    positive, negative = encode_text(tiny_clip, SRC), encode_text(tiny_clip, "")
    edit_pos = encode_text(tiny_clip, EDIT)
    latent = _latent(frames=4)
    _, inv_s = glue.run_inversion(_store_model(model, "store"), latent, positive, None, STEPS, 1.0, disable_pbar=True)
    _, inv_r = glue.run_inversion(_store_model(model, "recompute at edit"), latent, positive, None, STEPS, 1.0,
                                  disable_pbar=True)
    ref, _ = _edit(model, inv_s, tiny_clip, edit_pos, negative, blend_words="circle")
    got, _ = _edit(model, inv_r, tiny_clip, edit_pos, negative, blend_words="circle")
    assert torch.equal(got, ref), float((got - ref).abs().max())


def test_recompute_refuses_an_inversion_without_its_conditioning(temporal_model, tiny_clip):
    positive = encode_text(tiny_clip, SRC)
    _, inv = glue.run_inversion(_store_model(temporal_model, "recompute at edit"), _latent(frames=2), positive, None,
                                2, 1.0, disable_pbar=True)
    inv.info.pop("positive")
    with pytest.raises(glue.ZSVEInputError, match="kept no source conditioning"):
        AttentionBlend.execute(temporal_model, inv, prompt_pair(tiny_clip, SRC, EDIT), "refine", 0.8, "", 0.0, 0.6,
                               "", "", 0.3, True)


def test_recompute_tells_when_the_edit_models_weights_are_not_the_inversions(temporal_model, tiny_clip):
    positive = encode_text(tiny_clip, SRC)
    _, inv = glue.run_inversion(_store_model(temporal_model, "recompute at edit"), _latent(frames=2), positive, None,
                                2, 1.0, disable_pbar=True)
    args = ("refine", 0.8, "", 0.0, 0.6, "", "", 0.3, True)
    same = AttentionBlend.execute(temporal_model, inv, prompt_pair(tiny_clip, SRC, EDIT), *args)
    assert not any("weights are not" in t for t in same.ui["text"])
    lora = temporal_model.clone()  # a weight patch on the edit side only, as a LoRA loader makes
    key, weight = next((k, w) for k, w in lora.model.state_dict().items() if k.endswith("attn2.to_k.weight"))
    lora.add_patches({key: (torch.zeros_like(weight),)}, 1.0)
    other = AttentionBlend.execute(lora, inv, prompt_pair(tiny_clip, SRC, EDIT), *args)
    assert any("weights are not the inversion model's" in t for t in other.ui["text"])


def test_graph_with_the_recompute_widget_gives_the_stored_modes_edit(tiny_model, tiny_clip):
    """Through ComfyUI's executor (KSamplerAdvanced on Attention Blend's model), as a workflow runs it."""
    from test_fatezero import _graph

    from zsve_harness import CAPTURED, OBJECTS, run_prompt

    OBJECTS.update({"model": tiny_model, "clip": tiny_clip, "lat": _latent(frames=2, seed=3)})
    edits = {}
    for mode in ("store", "recompute at edit"):
        g = _graph(edit="a red square on blue stripes", blend_words="circle", blend_threshold=0.95)
        g["store"]["inputs"]["source_attention"] = mode
        run_prompt(g)
        edits[mode] = CAPTURED["edit"]["samples"].clone()
    assert CAPTURED["inv"].records["attention"].recompute
    assert torch.equal(edits["store"], edits["recompute at edit"])


def test_recompute_with_a_controlnet_on_the_inversions_conditioning(temporal_model, tiny_clip, tiny_model):
    """A ControlNet on the source conditioning acts at the inversion: the source pass gets it again (ComfyUI's
    guider loads and prepares it like any conditioning's), so the edit equals the stored mode's."""
    import nodes

    from zsve_harness import make_tiny_controlnet

    frames = 2
    g = torch.Generator().manual_seed(5)
    cn = make_tiny_controlnet(tiny_model)
    hint = torch.rand(frames, 128, 128, 3, generator=g)
    apply = nodes.ControlNetApplyAdvanced().apply_controlnet
    positive, negative = encode_text(tiny_clip, SRC), encode_text(tiny_clip, "")
    src_cn, _ = apply(positive, negative, cn, hint, 1.0, 0.0, 1.0)
    edit_cn, neg_cn = apply(encode_text(tiny_clip, EDIT), negative, cn, hint, 1.0, 0.0, 1.0)
    latent = _latent(frames=frames)
    plain, _ = glue.run_inversion(_store_model(temporal_model, "store"), latent, positive, None, STEPS, 1.0,
                                  disable_pbar=True)
    _, inv_s = glue.run_inversion(_store_model(temporal_model, "store"), latent, src_cn, None, STEPS, 1.0,
                                  disable_pbar=True)
    _, inv_r = glue.run_inversion(_store_model(temporal_model, "recompute at edit"), latent, src_cn, None, STEPS,
                                  1.0, disable_pbar=True)
    assert (plain["samples"] - inv_s.z_T).abs().max() > 1e-3  # the ControlNet acts at the inversion
    ref, _ = _edit(temporal_model, inv_s, tiny_clip, edit_cn, neg_cn)
    got, _ = _edit(temporal_model, inv_r, tiny_clip, edit_cn, neg_cn)
    assert torch.equal(got, ref), float((got - ref).abs().max())


def _edit_model(model, inv, clip, **kw):
    args = dict(mode="refine", cross_replace=0.8, cross_replace_words="", self_replace_start=0.0,
                self_replace_end=0.6, reweight="", blend_words="", blend_threshold=0.3, only_cond=True)
    args.update(kw)
    return AttentionBlend.execute(model, inv, prompt_pair(clip, SRC, EDIT), **args).result[0]


def _sample(m, inv, positive, negative):
    import comfy.sample

    z = inv.z_T
    return comfy.sample.sample(m, torch.zeros_like(z), STEPS, 7.5, "ddim", "ddim_uniform", positive, negative, z,
                               start_step=0, last_step=10000, force_full_denoise=True, disable_noise=True, seed=0,
                               disable_pbar=True)


def test_chained_attention_blends_share_one_source_pass(temporal_model, tiny_clip):
    """Two Attention Blend nodes on one model (the second on the first's MODEL) fuse as in the stored mode, with
    one source pass per step for both."""
    positive, negative = encode_text(tiny_clip, SRC), encode_text(tiny_clip, "")
    edit_pos = encode_text(tiny_clip, EDIT)
    latent = _latent(frames=2)
    outs = {}
    for mode in ("store", "recompute at edit"):
        _, inv = glue.run_inversion(_store_model(temporal_model, mode), latent, positive, None, STEPS, 1.0,
                                    disable_pbar=True)
        m = _edit_model(_edit_model(temporal_model, inv, tiny_clip), inv, tiny_clip, reweight="square:2",
                        self_replace_end=0.4)
        outs[mode] = _sample(m, inv, edit_pos, negative)
        if mode != "store":
            sp = _source_pass_of(m)
            assert len(sp.controllers) == 2 and sp.passes == 4
    assert torch.equal(outs["store"], outs["recompute at edit"])


def test_recompute_after_an_inversion_with_guidance_evaluates_the_same_rows(temporal_model, tiny_clip):
    """An inversion with guidance != 1 evaluated cond and uncond rows in one batch: the source pass does the same,
    so the edit equals the stored mode's (with only_cond on and off)."""
    positive, negative = encode_text(tiny_clip, SRC), encode_text(tiny_clip, "")
    edit_pos = encode_text(tiny_clip, EDIT)
    latent = _latent(frames=2)
    invs = {mode: glue.run_inversion(_store_model(temporal_model, mode), latent, positive, negative, STEPS, 3.0,
                                     disable_pbar=True)[1] for mode in ("store", "recompute at edit")}
    assert invs["recompute at edit"].info["negative"] is negative
    for only_cond in (True, False):
        outs = {mode: _sample(_edit_model(temporal_model, inv, tiny_clip, only_cond=only_cond), inv, edit_pos,
                              negative) for mode, inv in invs.items()}
        assert torch.equal(outs["store"], outs["recompute at edit"]), only_cond


@pytest.mark.parametrize("side", ["temporal", "windows"])
def test_an_edit_model_whose_attention_differs_from_the_inversions_is_refused(temporal_model, tiny_model, tiny_clip,
                                                                           side):
    """Temporal Self-Attention or Video Context Windows on one side only: refused by Attention Blend before any
    UNet call, in both modes (the recompute mode would otherwise evaluate the source with the edit's setup, the
    stored mode failed mid-sampling or fused misaligned maps)."""
    from zsve.nodes.context import VideoContextWindows

    positive = encode_text(tiny_clip, SRC)
    if side == "temporal":
        inv_model, edit_model = temporal_model, tiny_model
    else:
        inv_model = VideoContextWindows.execute(temporal_model, context_length=2, context_overlap=1,
                                                context_schedule="standard_static", context_stride=1,
                                                closed_loop=False, fuse_method="pyramid",
                                                key_frames="none").result[0]
        edit_model = temporal_model
    for mode in ("store", "recompute at edit"):
        _, inv = glue.run_inversion(_store_model(inv_model, mode), _latent(frames=3), positive, None, 2, 1.0,
                                    disable_pbar=True)
        with pytest.raises(glue.ZSVEInputError, match="not set up as the inversion model's was"):
            AttentionBlend.execute(edit_model, inv, prompt_pair(tiny_clip, SRC, EDIT), "refine", 0.8, "", 0.0, 0.6,
                                   "", "", 0.3, True)
