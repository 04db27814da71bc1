"""Every method on an SDXL-family model (issue 19): a tiny SDXL built through ComfyUI's own classes
(comfy.supported_models.SDXL -> comfy.model_base.SDXL, comfy.sdxl_clip.SDXLClipModel with clip_l and clip_g), whose
conditionings carry the pooled text embedding and whose UNet gets SDXL's `y` (pooled text + size embeddings).

Same depth as the SD1.5 tests: the defaults chosen from the model, the fusion exact at the inversion's own inputs
(also under context windows), the Video-P2P branches equal to plain sampling with each branch's own prompt (text
and `y`), Local Blend and user masks, InFusion's phases on SDXL's decoder blocks, EDM models refused before any UNet
call, and SD2.x-style v-prediction / zero-terminal-SNR models next to SDXL v-prediction.
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import pytest
import torch

import zsve.nodes._comfy as glue
import zsve.nodes.videop2p as vp
from zsve.attention import arch
from zsve.attention import latent_blend as lb
from zsve.attention import store as S
from zsve.attention.ddim import Inversion
from zsve.nodes import _attn_patch
from zsve.nodes.fatezero import AttentionBlend, AttentionStore, TemporalSelfAttentionPatch
from zsve.nodes.infusion import InFusionInject, InFusionSource
from zsve.nodes.prompts import EditPrompts
from zsve_harness import encode_text, make_tiny_model, make_tiny_sdxl_clip, make_tiny_sdxl_model, prompt_pair

SRC = "a red circle on blue stripes"
EDIT = "a green circle on blue stripes"
STEPS = 4  # ddim_uniform: exactly 4 steps (a divisor of 1000)
H = W = 16  # latent; SDXL's attention levels are 8x8 (factor 2) and 4x4 (factor 4)


@pytest.fixture(scope="module")
def xl():
    return make_tiny_sdxl_model(seed=0)


@pytest.fixture(scope="module")
def xl_clip():
    return make_tiny_sdxl_clip(seed=0)


@pytest.fixture(scope="module")
def conds(xl_clip):
    return {"src": encode_text(xl_clip, SRC), "edit": encode_text(xl_clip, EDIT), "empty": encode_text(xl_clip, "")}


def _latent(frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, H, W, generator=g)
    return {"samples": base + 0.3 * torch.randn(frames, 4, H, W, generator=g)}


def _sample(model, z, positive, negative, cfg=1.0, steps=STEPS):
    x = z["samples"] if isinstance(z, dict) else z
    with torch.inference_mode():
        return comfy.sample.sample(model, torch.zeros_like(x), steps, cfg, "ddim", "ddim_uniform", positive, negative,
                                   x, start_step=0, last_step=10000, force_full_denoise=True, disable_noise=True,
                                   seed=0, disable_pbar=True)


# --- the architecture: defaults from the UNet config ----------------------------------------------------------


def test_layout_and_defaults_follow_the_unet(xl, tiny_model):
    """The layout read from the config is the UNet's (same transformer blocks as the dispatcher finds), and the
    defaults are the papers' SD1.5 values on SD1.5 and the same rules on SDXL."""
    for model in (xl, tiny_model):
        names = [lay.name for lay in arch.layout(glue.unet_config(model))[0]]
        assert names == [_attn_patch.layer_name(k) for k in _attn_patch.transformer_block_keys(model)]
    sd15, sdxl = arch.SD15_UNET, arch.SDXL_UNET
    assert (arch.store_min_factor(sd15), arch.temporal_min_channels(sd15)) == (2, 640)
    assert arch.infusion_blocks(sd15) == ((4,), tuple(range(4, 12)))
    assert (arch.store_min_factor(sdxl), arch.temporal_min_channels(sdxl)) == (4, 1280)
    assert arch.infusion_blocks(sdxl) == ((1,), (1, 2, 3, 4, 5))
    assert arch.store_min_factor(sdxl, skip_finest=False) == 1
    assert len(arch.layout(sdxl)[0]) == 70 and len(arch.layout(sdxl)[1]) == 9
    # the tiny SDXL has SDXL's layout at toy widths
    cfg = glue.unet_config(xl)
    assert arch.attention_factors(cfg) == [2, 4] and arch.store_min_factor(cfg) == 4
    assert arch.temporal_min_channels(cfg) == 128 and arch.infusion_blocks(cfg) == ((1,), (1, 2, 3, 4, 5))


def test_store_figures_for_sdxl_in_the_readme():
    """The README's SDXL store figures, from the store's own estimate with SDXL's layers (1024x1024: latent
    128x128, 8 frames, middle-frame temporal attention from 1280 channels on, as the auto default)."""
    layers = arch.layout(arch.SDXL_UNET)[0]
    mc = arch.temporal_min_channels(arch.SDXL_UNET)

    def gib(steps, window, min_factor):
        return S.estimate_store_bytes(8, (128, 128), steps, window, min_factor, "middle", min_channels=mc,
                                      layers=layers) / 2**30

    old = S.estimate_store_bytes(8, (128, 128), 50, 0.8, 2, "middle", min_channels=640, layers=layers) / 2**30
    assert round(old, 1) == 145.5  # the SD1.5 default (min_factor 2) on SDXL: records every attention level
    assert round(gib(50, 0.8, 4), 1) == 109.1 and round(gib(10, 0.8, 4), 1) == 21.8
    assert round(gib(50, 0.5, 4), 1) == 68.2 and round(gib(20, 0.8, 4), 1) == 43.7  # the SDXL workflow's 20 steps
    theirs = S.estimate_fatezero_bytes(8, (128, 128), 50, "middle", min_channels=mc, layers=layers) / 2**30
    assert round(theirs) == 1008


def test_edit_prompts_give_sdxl_conditioning(xl_clip, conds):
    """Edit Prompts' conditionings are CLIP Text Encode's on SDXL: text embedding and pooled output."""
    out = EditPrompts.execute(xl_clip, SRC, EDIT, "").result
    for cond, ref in ((out[0], conds["src"]), (out[1], conds["edit"]), (out[2], conds["empty"])):
        assert torch.equal(cond[0][0], ref[0][0])
        assert torch.equal(cond[0][1]["pooled_output"], ref[0][1]["pooled_output"])
    pair = out[3]
    assert pair.source.pooled is not None and not torch.allclose(pair.source.pooled, pair.edit.pooled)


@pytest.mark.parametrize("prediction", ["edm", "v_edm"])
def test_edm_models_are_refused_before_any_unet_call(prediction, conds):
    model = make_tiny_sdxl_model(seed=1, prediction=prediction)
    calls = []
    h = model.model.diffusion_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for run in (lambda: glue.run_inversion(model, _latent(), conds["src"], None, STEPS, 1.0, disable_pbar=True),
                    lambda: AttentionStore.execute(model, 1.0, True, 0.0),
                    lambda: TemporalSelfAttentionPatch.execute(model, "middle", False, -1)):
            with pytest.raises(glue.ZSVEInputError) as e:
                run()
            msg = str(e.value)
            assert "EDM model" in msg and "Playground" in msg and "SDXL-family" in msg and "ModelSampling" not in msg
    finally:
        h.remove()
    assert not calls


@pytest.mark.parametrize("make", ["sd2_v_zsnr", "sdxl_v_zsnr"])
def test_v_prediction_and_zero_terminal_snr_invert_and_reconstruct(make, conds, tiny_clip):
    """SD2.x-style v-prediction with the zero-terminal-SNR schedule (tiny SD1.5 layout) and SDXL v-prediction
    models pass the model check and reconstruct their input."""
    if make == "sd2_v_zsnr":
        model, c = make_tiny_model(seed=3, prediction="v", zsnr=True), encode_text(tiny_clip, SRC)
        neg = encode_text(tiny_clip, "")
    else:
        model, c, neg = make_tiny_sdxl_model(seed=3, prediction="v", zsnr=make.endswith("zsnr")), conds["src"], \
            conds["empty"]
    latent = _latent(seed=3)
    with torch.inference_mode():
        z_T, inv = glue.run_inversion(model, latent, c, None, 10, 1.0, disable_pbar=True)
    rec = _sample(model, z_T, c, neg, steps=10)
    err = (rec - latent["samples"]).abs().mean().item() / latent["samples"].abs().mean().item()
    print(f"\n[sdxl] {make}: relative reconstruction error {err:.3e}, sigma_max {float(inv.sigmas[-1]):.1f}")
    assert err < 0.05


# --- FateZero ------------------------------------------------------------------------------------------------


def _fz_model(model, **store):
    m = TemporalSelfAttentionPatch.execute(model, mode="previous+first", include_own_frame=False,
                                           min_channels=-1).result[0]
    args = dict(record_window=1.0, skip_full_res=True, memory_budget_gb=0.0)
    args.update(store)
    return m, AttentionStore.execute(m, **args).result[0]


def _blend(model, inv, clip, edit=SRC):
    return AttentionBlend.execute(model, inv, prompt_pair(clip, SRC, edit), mode="refine", cross_replace=1.0,
                                  cross_replace_words="", self_replace_start=0.0, self_replace_end=1.0, reweight="",
                                  blend_words="", blend_threshold=0.3, only_cond=True).result


def test_temporal_auto_keeps_sdxls_finest_attention_level_per_frame(xl, tiny_model):
    for model, want in ((xl, 128), (tiny_model, 64)):
        m = TemporalSelfAttentionPatch.execute(model, "middle", False, -1).result[0]
        (patch,) = m.model_options["transformer_options"]["patches"]["attn1_patch"]
        assert patch.min_channels == want
    assert not patch.applies(32) and patch.applies(64)


def test_fatezero_store_records_fatezeros_levels_and_fusion_is_exact(xl, xl_clip, conds):
    """skip_full_res on SDXL leaves out its finest attention level (factor 2), not a level it does not have; the
    full replacement at the inversion's own inputs gives the unfused output (steps, rows, layers, q/k line up)."""
    from test_fatezero import _assert_exact_at_inversion_inputs

    temporal, store_model = _fz_model(xl)
    with torch.inference_mode():
        _, inv = glue.run_inversion(store_model, _latent(frames=3), conds["src"], None, 3, 1.0, disable_pbar=True)
    st = inv.records["attention"]
    want = {lay.name for lay in arch.layout(glue.unet_config(xl))[0] if lay.factor >= 4}
    assert set(st.layer_names("self")) == want and set(st.layer_names("cross")) == want
    assert {st.layers[n].factor for n in want} == {4}
    fused = _blend(temporal, inv, xl_clip)[0]
    _assert_exact_at_inversion_inputs(temporal, fused, inv, conds["src"], conds["empty"])
    # the store's own size accounting matches the recording for SDXL's layers
    layers = [lay for lay in arch.layout(glue.unet_config(xl))[0]]
    est = S.estimate_store_bytes(3, (H, W), 3, 1.0, 4, "previous+first", min_channels=128, layers=layers)
    assert est == st.nbytes


def test_fatezero_under_context_windows_on_sdxl(xl, xl_clip, conds):
    from test_fatezero import _assert_exact_at_inversion_inputs

    from zsve.nodes.context import VideoContextWindows

    temporal, _ = _fz_model(xl)
    model = VideoContextWindows.execute(temporal, context_length=2, context_overlap=1,
                                        context_schedule="standard_static", context_stride=1, closed_loop=False,
                                        fuse_method="pyramid", key_frames="none").result[0]
    store_model = AttentionStore.execute(model, 1.0, True, 0.0).result[0]
    with torch.inference_mode():
        _, inv = glue.run_inversion(store_model, _latent(frames=3), conds["src"], None, 2, 1.0, disable_pbar=True)
    st = inv.records["attention"]
    assert st.frames == 3 and len({key[3] for key in st.entries if len(key) == 4}) >= 2
    fused, mask = _blend(model, inv, xl_clip)
    _assert_exact_at_inversion_inputs(model, fused, inv, conds["src"], conds["empty"])
    assert mask.shape == (3, 8 * H, 8 * W)


def test_fatezero_edit_runs_and_checks_the_pooled_prompt(xl, xl_clip, conds):
    """The edit through the core sampler with the edit prompt; the sampler's positive is checked (text and pooled)
    against the prompt pair's edit prompt."""
    temporal, store_model = _fz_model(xl)
    with torch.inference_mode():
        z_T, inv = glue.run_inversion(store_model, _latent(), conds["src"], None, STEPS, 1.0, disable_pbar=True)
    fused, _ = _blend(temporal, inv, xl_clip, edit=EDIT)
    out = _sample(fused, z_T, conds["edit"], conds["empty"], cfg=5.0)
    plain = _sample(temporal, z_T, conds["edit"], conds["empty"], cfg=5.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3
    wrong = [[conds["edit"][0][0], {"pooled_output": conds["src"][0][1]["pooled_output"]}]]
    with pytest.raises(Exception, match="not the edit prompt of the prompt pair"):
        _sample(fused, z_T, wrong, conds["empty"], cfg=5.0)


# --- Video-P2P -------------------------------------------------------------------------------------------------


def _inv_like(model, z, steps=STEPS):
    ms = model.get_model_object("model_sampling")
    sig = glue.inversion_sigmas(ms, steps)
    x = model.model.process_latent_in(z["samples"]).cpu()
    return Inversion(sigmas=sig, timesteps=[-1] + [glue.timestep_of(ms, s) for s in sig[1:]],
                     latents=[x] * len(sig), info={"steps_requested": steps})


def _guider(model, clip, edit=EDIT, inv=None, z=None, null_text=None, **kw):
    inv = inv if inv is not None else _inv_like(model, z)
    settings = dict(mode="replace", cross_replace=0.2, cross_replace_words="", self_replace=0.5, reweight="",
                    blend_words="", blend_words_edit="", blend_start=0.2, blend_threshold=0.3,
                    target_uncond=vp.TARGET_UNCOND[0])
    settings.update(kw)
    with torch.inference_mode():
        return vp.VideoP2PGuiderNode.execute(model, inv, prompt_pair(clip, SRC, edit), 7.5, null_text=null_text,
                                             **settings).result[0]


def _vp_sample(guider, z, steps=STEPS):
    ms = guider.model_patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps).cpu()
    with torch.inference_mode():
        x = z["samples"]
        return guider.sample(torch.zeros_like(x), x, comfy.samplers.sampler_object("ddim"), sigmas, disable_pbar=True,
                             seed=0)


def test_videop2p_each_branch_is_plain_sampling_with_its_own_prompt(xl, xl_clip, conds):
    """Without control, the target branch is CFG sampling of the edit prompt and (fast mode) the source branch
    conditional sampling of the source prompt: each with its own text embedding AND its own pooled/size vector y.
    The source branch does not depend on the edit prompt."""
    z = _latent(seed=7)
    g = _guider(xl, xl_clip, z=z, cross_replace=0.0, self_replace=0.0)
    out = _vp_sample(g, z)
    ref_t = _sample(xl, z, conds["edit"], conds["empty"], cfg=7.5)
    ref_s = _sample(xl, z, conds["src"], conds["empty"], cfg=1.0)
    d_t, d_s = float((out - ref_t).abs().max()), float((g.last_source - ref_s).abs().max())
    print(f"\n[sdxl videop2p] lockstep vs plain sampling: target {d_t:.2e}, source (fast) {d_s:.2e}")
    assert d_t < 1e-4 and d_s < 1e-4
    # only the edit prompt changes: the source branch stays (with the control on)
    a = _guider(xl, xl_clip, z=z, cross_replace=1.0, self_replace=1.0)
    b = _guider(xl, xl_clip, edit="a green square on blue stripes", z=z, cross_replace=1.0, self_replace=1.0,
                mode="refine")
    out_a, out_b = _vp_sample(a, z), _vp_sample(b, z)
    assert torch.equal(a.last_source, b.last_source) and float((out_a - out_b).abs().max()) > 1e-3
    assert float((out_a - ref_t).abs().max()) > 1e-3  # the control acts


def test_videop2p_null_text_source_branch_ignores_the_edit_prompt(xl, xl_clip, conds):
    """Null-text mode: the source branch is guided sampling with the optimised null text and the source prompt's
    conditioning (its y too), whatever the edit prompt."""
    z = _latent(seed=5)
    steps = 2
    with torch.inference_mode():
        z_T, inv = glue.run_inversion(xl, z, conds["src"], None, steps, 1.0, disable_pbar=True)
        nt = vp.run_null_text(xl, inv, conds["src"], conds["empty"], 7.5, 1, 1e-5, disable_pbar=True)
    outs = []
    for edit in (SRC, EDIT):
        g = _guider(xl, xl_clip, edit=edit, inv=inv, null_text=nt)
        _vp_sample(g, z_T, steps)
        outs.append(g.last_source)
    assert torch.equal(outs[0], outs[1])
    # with identical prompts and the shared null text the target is the source
    g = _guider(xl, xl_clip, edit=SRC, inv=inv, null_text=nt, target_uncond=vp.TARGET_UNCOND[1])
    assert float((_vp_sample(g, z_T, steps) - g.last_source).abs().max()) < 1e-4


def test_videop2p_local_blend_keeps_the_source_outside_the_mask(xl, xl_clip):
    z = _latent(seed=7)
    g = _guider(xl, xl_clip, z=z, blend_words="red", blend_words_edit="green", blend_start=0.2, blend_threshold=0.9)
    out = _vp_sample(g, z)
    m = g.last_mask
    assert m is not None and m.shape == (2, H, W)
    inside, outside = m.bool().unsqueeze(1).expand_as(out), ~m.bool().unsqueeze(1).expand_as(out)
    assert outside.any() and inside.any(), f"the test needs a mask that is neither empty nor full ({float(m.mean())})"
    assert float((out - g.last_source)[outside].abs().max()) < 1e-5
    assert float((out - g.last_source)[inside].abs().max()) > 1e-3


def test_videop2p_context_windows_give_the_unwindowed_edit(xl, xl_clip):
    from zsve.nodes.context import VideoContextWindows

    z = _latent(frames=3, seed=2)
    windowed = VideoContextWindows.execute(xl, context_length=2, context_overlap=1, context_schedule="standard_static",
                                           context_stride=1, closed_loop=False, fuse_method="pyramid",
                                           key_frames="none").result[0]
    a = _guider(xl, xl_clip, z=z, inv=_inv_like(xl, z, 2))
    b = _guider(windowed, xl_clip, z=z, inv=_inv_like(xl, z, 2))
    out_a, out_b = _vp_sample(a, z, 2), _vp_sample(b, z, 2)
    assert float((out_a - out_b).abs().max()) < 1e-4 and float((a.last_source - b.last_source).abs().max()) < 1e-4


# --- InFusion ---------------------------------------------------------------------------------------------------


def test_infusion_auto_blocks_on_sdxl_record_and_inject(xl, xl_clip, conds):
    """'auto' takes decoder block 1 for the features and blocks 1-5 (those with attention) for keys/values; the
    fusion layers are those coarser than SDXL's finest attention level. The edit runs every phase."""
    common = dict(feature_blocks="auto", attention_blocks="auto", feature_end=0.5, kv_end=0.75)  # 2 | 1 | 1 steps
    src_model = InFusionSource.execute(xl, skip_full_res=True, memory_budget_gb=0.0, **common).result[0]
    with torch.inference_mode():
        z_T, inv = glue.run_inversion(src_model, _latent(), conds["src"], None, STEPS, 1.0, disable_pbar=True)
    rec = inv.records["infusion"]
    assert {key[1] for key in rec.features} == {1}
    layers = arch.layout(glue.unet_config(xl))[0]
    want_kv = {lay.name for lay in layers if lay.name.startswith("output_") and 1 <= int(lay.name.split("_")[1]) <= 5}
    assert rec.kv_layers() == want_kv
    assert {rec.attention.layers[n].factor for n in rec.attention.layer_names("self")} == {4}
    m, masks = InFusionInject.execute(xl, inv, prompt_pair(xl_clip, SRC, EDIT), concepts="red->green", strength=1.0,
                                      alpha=0.5, mask_threshold=0.3, inject_uncond=True, **common).result
    ctl = next(p for p in m.model_options["transformer_options"][_attn_patch.PROCESSORS_KEY]
               if type(p).__name__ == "InFusionController")
    out = _sample(m, z_T, conds["edit"], conds["empty"], cfg=5.0)
    plain = _sample(xl, z_T, conds["edit"], conds["empty"], cfg=5.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3
    assert ctl.counts["feature"] == 2 and ctl.counts["kv"] == len(want_kv) and ctl.counts["fusion_self"] > 0
    assert masks.shape == (2, 8 * H, 8 * W)


def test_infusion_sd15_blocks_on_sdxl_name_the_values_for_it(xl):
    with pytest.raises(glue.ZSVEInputError) as e:
        InFusionSource.execute(xl, feature_blocks="4", attention_blocks="4-11", feature_end=0.5, kv_end=0.8,
                               skip_full_res=True, memory_budget_gb=0.0)
    msg = str(e.value)
    assert "attention_blocks 9-11 do not exist" in msg and "SDXL-family UNet has 9 decoder blocks 0-8" in msg
    assert "attention_blocks 0-5 (blocks with attention)" in msg
    assert "'auto' takes feature_blocks 1 and attention_blocks 1-5" in msg
    with pytest.raises(glue.ZSVEInputError, match="output blocks 6-8 have no attention layers; .*auto"):
        InFusionSource.execute(xl, feature_blocks="auto", attention_blocks="6-8", feature_end=0.5, kv_end=0.8,
                               skip_full_res=True, memory_budget_gb=0.0)


# --- Blended latent diffusion ---------------------------------------------------------------------------------


def test_latent_blend_keeps_the_source_outside_a_user_mask(xl, xl_clip, conds):
    import zsve.nodes.blend as blend_nodes

    latent = _latent(seed=4)
    with torch.inference_mode():
        z_T, inv = glue.run_inversion(xl, latent, conds["src"], None, STEPS, 1.0, disable_pbar=True)
    zero, _, _ = blend_nodes.apply_latent_blend(xl, inv, mask_source="user mask", mask=torch.zeros(1, 128, 128))
    assert torch.allclose(_sample(zero, z_T, conds["edit"], conds["empty"]), latent["samples"], atol=1e-5)
    mask = torch.zeros(2, 128, 128)
    mask[:, 16:72, 8:56] = 1.0
    m, _, _ = blend_nodes.apply_latent_blend(xl, inv, mask_source="user mask", mask=mask)
    out = _sample(m, z_T, conds["edit"], conds["empty"])
    lm = lb.prepare_user_mask(mask, 2, H, W).unsqueeze(1).expand_as(out)
    src = latent["samples"]
    assert torch.allclose(out[lm == 0], src[lm == 0], atol=1e-5)
    assert (out[lm == 1] - src[lm == 1]).abs().mean() > 0.02


def test_fatezero_recompute_mode_on_sdxl_equals_the_stored_mode(xl, xl_clip, conds):
    """Attention Store's 'recompute at edit' on SDXL (where the store is largest): the source pass's conditioning
    carries SDXL's pooled/size vector; the edit (cfg 7.5) and the mask output equal the stored mode's, and the
    recompute mode keeps only the mask level's head-mean cross-attention."""
    outs = {}
    for mode in ("store", "recompute at edit"):
        temporal, store_model = _fz_model(xl, source_attention=mode)
        with torch.inference_mode():
            z, inv = glue.run_inversion(store_model, _latent(frames=2), conds["src"], None, STEPS, 1.0,
                                        disable_pbar=True)
        res = AttentionBlend.execute(temporal, inv, prompt_pair(xl_clip, SRC, EDIT), mode="refine",
                                     cross_replace=0.8, cross_replace_words="", self_replace_start=0.0,
                                     self_replace_end=0.6, reweight="", blend_words="circle", blend_threshold=0.95,
                                     only_cond=True).result
        outs[mode] = (_sample(res[0], z, conds["edit"], conds["empty"], cfg=7.5), res[1], inv.records["attention"])
    (a, ma, st), (b, mb, rec) = outs["store"], outs["recompute at edit"]
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert rec.recompute and 0 < rec.nbytes < st.nbytes
