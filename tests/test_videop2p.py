"""Video-P2P (issue 5): null-text optimisation through inference-mode weights, the two-branch guider with
decoupled guidance, P2P control between the branches, Local Blend, and an API graph through
SamplerCustomAdvanced. Real ComfyUI on CPU, tiny models."""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import pytest
import torch

import zsve.nodes._comfy as glue
import zsve.nodes.videop2p as vp
from zsve.attention.ddim import Inversion
from zsve.attention.temporal import TemporalKV
from zsve.attention.videop2p import (
    InferenceTensorsAsConstants,
    NullText,
    early_stop_threshold,
    euler_step,
    local_blend,
    null_text_lr,
)
from zsve_harness import CAPTURED, OBJECTS, encode_text, make_tiny_model, prompt_pair, run_prompt

SRC = "a red circle on blue stripes"
EDIT = "a green square on blue stripes"
STEPS = 4
FRAMES = 2


def _latent(frames=FRAMES, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(frames, 4, h, w, generator=g)}


@pytest.fixture(scope="module")
def inf_model():
    """A tiny model whose weights are inference tensors, as when a checkpoint loader runs in ComfyUI."""
    with torch.inference_mode():
        m = make_tiny_model(seed=3)
    assert next(m.model.diffusion_model.parameters()).is_inference()
    return m


@pytest.fixture(scope="module")
def conds(tiny_clip):
    with torch.inference_mode():
        return {"src": encode_text(tiny_clip, SRC), "edit": encode_text(tiny_clip, EDIT),
                "empty": encode_text(tiny_clip, "")}


@pytest.fixture(scope="module")
def inverted(inf_model, conds):
    with torch.inference_mode():
        lat = _latent()
        z_T, inv = glue.run_inversion(inf_model, lat, conds["src"], None, STEPS, 1.0, disable_pbar=True)
    return lat, z_T, inv


@pytest.fixture(scope="module")
def null_texts(inf_model, inverted, conds):
    _, _, inv = inverted
    with torch.inference_mode():
        opt = vp.run_null_text(inf_model, inv, conds["src"], conds["empty"], 7.5, 5, 1e-5, disable_pbar=True)
        plain = vp.run_null_text(inf_model, inv, conds["src"], conds["empty"], 7.5, 0, 1e-5, disable_pbar=True)
    return opt, plain


def _inv_like(model, z, steps=STEPS):
    """A schedule-only inversion whose z_T is `z` (a LATENT dict): for tests of the guider's mechanics that sample
    a latent of their own; the edit contract checks the run against it (schedule, shape, z_T)."""
    ms = model.get_model_object("model_sampling")
    sig = glue.inversion_sigmas(ms, steps)
    x = model.model.process_latent_in(z["samples"]).cpu()
    return Inversion(sigmas=sig, timesteps=[-1] + [glue.timestep_of(ms, s) for s in sig[1:]],
                     latents=[x] * len(sig), info={"steps_requested": steps})


def _guider(model, clip, conds, null_text=None, edit=EDIT, inv=None, z=None, **kw):
    inv = inv if inv is not None else _inv_like(model, z if z is not None else _latent())
    settings = dict(mode="replace", cross_replace=0.2, cross_replace_words="", self_replace=0.5, reweight="",
                    blend_words="", blend_words_edit="", blend_start=0.2, blend_threshold=0.3,
                    target_uncond=vp.TARGET_UNCOND[0])
    settings.update(kw)
    with torch.inference_mode():
        out = vp.VideoP2PGuiderNode.execute(model, inv, prompt_pair(clip, SRC, edit), 7.5,
                                            null_text=null_text, **settings)
    return out.result[0]


def _sample(guider, z_T, steps=STEPS, sampler="ddim"):
    ms = guider.model_patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps).cpu()
    x = z_T["samples"]
    with torch.inference_mode():
        noise = torch.zeros_like(x)  # what DisableNoise generates
        out = guider.sample(noise, x, comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True, seed=0)
    return out


# --- units -----------------------------------------------------------------------------------------------

def test_reference_schedules():
    assert null_text_lr(0) == pytest.approx(1e-2) and null_text_lr(49) == pytest.approx(1e-2 * 0.51)
    assert early_stop_threshold(0) == pytest.approx(1e-5) and early_stop_threshold(10) == pytest.approx(2.1e-4)


def test_euler_step_is_the_ddim_prev_step():
    """x_prev = x + eps*(sigma_prev - sigma) in VE space is DDIM's prev_step in VP space."""
    torch.manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    s, sp = 3.0, 1.5
    a, ap = 1 / (1 + s**2), 1 / (1 + sp**2)
    x_vp = x * a**0.5
    ref = ap**0.5 * (x_vp - (1 - a) ** 0.5 * eps) / a**0.5 + (1 - ap) ** 0.5 * eps
    got = euler_step(x, x - eps * s, s, sp) * ap**0.5
    assert torch.allclose(got, ref, atol=1e-12)


def test_local_blend_formula():
    xs, xt = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    m = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out = local_blend(xs, xt, m)
    assert torch.equal(out[0, :, 0, 0], torch.ones(4)) and torch.equal(out[0, :, 0, 1], torch.zeros(4))


def test_controller_row_layout_and_p2p_control():
    """Rows are chunk*2F + branch*F + frame: only the target rows of the cond chunk change; cross-attention
    becomes P2P's control of the source rows (word swap mapper), self-attention the source's map."""
    from zsve.attention import p2p
    from zsve.attention.fatezero import FusionPlan
    from zsve.attention.processor import AttnCall
    from zsve.attention.videop2p import BRANCHES_KEY, BranchPlan, VideoP2PController

    f, heads, nq, t = 2, 2, 16, 77
    mapper = torch.eye(t)
    mapper[3, 3], mapper[3, 4], mapper[4, 4] = 0.0, 1.0, 0.0  # token 3 of the source feeds token 4 of the target
    plan = FusionPlan(num_steps=4, timestep_to_step={900: 0, 100: 3}, cross_mode="replace",
                      cross_alphas=p2p.time_word_alphas(4, 0.5), mapper=mapper, self_steps=(0, 2))
    ctl = VideoP2PController(plan, BranchPlan(blend_source=[3], blend_target=[4]), f, (8, 8))
    probs = torch.rand(2 * 2 * f, heads, nq, t).softmax(-1)  # chunks [uncond, cond] as cond_or_uncond [1, 0]
    extra = {BRANCHES_KEY: 2}

    def call(kind, ts, hw=(4, 4)):
        return AttnCall(kind=kind, layer="input_4_0", hw=hw, frames=2 * f, cond_or_uncond=[1, 0], sigma=1.0,
                        timestep=ts, heads=heads, extra=extra)

    c = call("cross", 900)
    assert ctl.active(c)
    out = ctl(c, probs)
    src, tgt = probs[2 * f:3 * f], probs[3 * f:]
    assert torch.equal(out[:3 * f], probs[:3 * f])  # uncond chunk and source rows untouched
    assert torch.allclose(out[3 * f:], p2p.cross_control(src, tgt, plan.cross_alphas[0], "replace", mapper))
    assert torch.allclose(out[3 * f:, ..., 4], src[..., 3])
    # outside the cross window only the blend attention is recorded (factor 2 layer), nothing changes
    assert ctl(call("cross", 100), probs) is None and ctl.mask() is not None
    assert not ctl.active(call("self", 100))  # outside the self window
    # self-attention is replaced where the map has at most 32x32 queries (Video-P2P's rule on the map at hand): this
    # small latent's full-resolution level too, not SD1.5's 64x64 level at 512 px
    assert ctl.active(call("self", 900, hw=(8, 8))) and ctl.active(call("self", 900, hw=(32, 32)))
    assert not ctl.active(call("self", 900, hw=(64, 64))) and not ctl.active(call("self", 900, hw=(33, 32)))
    s_out = ctl(call("self", 900), probs[..., :nq])
    assert torch.equal(s_out[3 * f:], probs[2 * f:3 * f, ..., :nq])
    # calls of other runs (no branches key) are left alone
    assert not ctl.active(AttnCall(kind="cross", layer="x", hw=(4, 4), frames=f, cond_or_uncond=[0], sigma=1.0,
                                   timestep=900, heads=heads, extra={}))


def test_autograd_through_inference_weights_without_copies(inf_model, conds):
    """Weights loaded under inference_mode cannot be saved for backward; inside InferenceTensorsAsConstants the
    gradient w.r.t. the embedding flows through storage aliases and equals the gradient of a model with normal
    weights. Also measures what backward keeps alive besides the weights (the only extra memory of the
    optimisation over sampling)."""
    normal = make_tiny_model(seed=3)  # same weights, normal tensors
    x = _latent(frames=FRAMES, h=8, w=8, seed=5)["samples"]
    sig = torch.full((FRAMES,), 2.0)
    with torch.inference_mode():
        emb0 = conds["empty"][0][0]
        with torch.inference_mode(False), torch.enable_grad():
            e = emb0.clone().requires_grad_(True)
            with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
                inf_model.model.apply_model(x, sig, c_crossattn=e.expand(FRAMES, -1, -1)).square().mean().backward()
            saved = {}
            weights = {p.untyped_storage().data_ptr() for p in inf_model.model.parameters()}

            def pack(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in weights:
                    saved[ptr] = t.untyped_storage().nbytes()
                return t

            e = emb0.clone().requires_grad_(True)
            with InferenceTensorsAsConstants() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = inf_model.model.apply_model(x, sig, c_crossattn=e.expand(FRAMES, -1, -1)).square().mean()
            loss.backward()
            g_inf = e.grad.clone()
            assert mode.storages() <= weights | {x.untyped_storage().data_ptr()} | mode.storages()
            e2 = emb0.clone().requires_grad_(True)
            normal.model.apply_model(x, sig, c_crossattn=e2.expand(FRAMES, -1, -1)).square().mean().backward()
    assert g_inf.abs().max() > 0
    assert torch.allclose(g_inf, e2.grad, rtol=1e-4, atol=1e-10)
    weight_bytes = sum(p.numel() * p.element_size() for p in inf_model.model.diffusion_model.parameters())
    print(f"\n[videop2p] autograd via storage aliases: {mode.aliased} inference tensors aliased, 0 bytes copied; "
          f"activations kept for backward {sum(saved.values()) / 2**20:.2f} MiB ({FRAMES} frames, latent 8x8) vs "
          f"UNet weights {weight_bytes / 2**20:.2f} MiB")


# --- null-text optimisation ---------------------------------------------------------------------------

def test_null_text_object(null_texts, inverted):
    opt, plain = null_texts
    _, _, inv = inverted
    assert isinstance(opt, NullText) and opt.steps == STEPS == inv.steps
    assert opt.timesteps == list(reversed(inv.timesteps[1:]))
    assert all(e.shape == (1, 77, 64) and e.device.type == "cpu" and e.dtype == torch.float32 for e in opt.embeddings)
    assert all(1 <= n <= 5 for n in opt.iterations) and plain.iterations == [0] * STEPS
    # inner_steps 0 keeps the empty embedding
    assert all(torch.equal(e, plain.embeddings[0]) for e in plain.embeddings)


def test_null_text_lowers_reconstruction_error_of_the_source_branch(inf_model, tiny_clip, conds, inverted,
                                                                    null_texts):
    """Source branch at guidance 7.5 from z_T: optimised null text vs the plain empty embedding (the same run
    with 0 inner steps), measured on the guider's source branch against the input latent."""
    lat, z_T, inv = inverted
    opt, plain = null_texts
    errs = {}
    for name, nt in (("optimised", opt), ("empty", plain)):
        g = _guider(inf_model, tiny_clip, conds, null_text=nt, edit=SRC, inv=inv)
        _sample(g, z_T)
        errs[name] = float(torch.mean((g.last_source - lat["samples"]) ** 2))
    print(f"\n[videop2p] source-branch reconstruction MSE at guidance 7.5 ({STEPS} steps, {FRAMES} frames): "
          f"null text {errs['optimised']:.3e} vs empty {errs['empty']:.3e} ({errs['empty'] / errs['optimised']:.1f}x); "
          f"in-loop final error {opt.info['final_latent_error']:.3e} vs {plain.info['final_latent_error']:.3e}")
    assert errs["optimised"] < 0.7 * errs["empty"]
    assert opt.info["final_latent_error"] < plain.info["final_latent_error"]



def test_null_text_honours_interrupt(inf_model, inverted, conds):
    import comfy.model_management as mm

    _, _, inv = inverted
    mm.interrupt_current_processing(True)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            vp.run_null_text(inf_model, inv, conds["src"], conds["empty"], 7.5, 10, 1e-5, disable_pbar=True)
    finally:
        mm.interrupt_current_processing(False)

# --- two branches ---------------------------------------------------------------------------------------

def test_identical_prompts_target_reproduces_source(inf_model, tiny_clip, conds, inverted, null_texts):
    _, z_T, inv = inverted
    g = _guider(inf_model, tiny_clip, conds, null_text=null_texts[0], edit=SRC, target_uncond=vp.TARGET_UNCOND[1],
                inv=inv,
                cross_replace=1.0, self_replace=1.0)
    out = _sample(g, z_T)
    diff = float((out - g.last_source).abs().max())
    print(f"\n[videop2p] identical prompts, shared null text: max |target - source| = {diff:.2e}")
    assert diff < 1e-4


def test_uncontrolled_branches_equal_ordinary_sampling_with_frame_attention(tiny_model, tiny_clip, conds):
    """No attention control: the target branch is plain CFG sampling of the edit prompt and (fast mode) the source
    branch conditional-only sampling of the source prompt — also with Video-P2P's frame attention (keys/values
    from the first frame), which must treat each branch as its own video."""
    m = tiny_model.clone()
    m.set_model_attn1_patch(TemporalKV("first", False, 0))
    z = _latent(seed=7)
    g = _guider(m, tiny_clip, conds, cross_replace=0.0, self_replace=0.0, z=z)
    out = _sample(g, z)
    with torch.inference_mode():
        zero = torch.zeros_like(z["samples"])
        ref_t = comfy.sample.sample(m, zero, STEPS, 7.5, "ddim", "ddim_uniform", conds["edit"], conds["empty"],
                                    z["samples"], disable_noise=True, seed=0, disable_pbar=True)
        ref_s = comfy.sample.sample(m, zero, STEPS, 1.0, "ddim", "ddim_uniform", conds["src"], conds["empty"],
                                    z["samples"], disable_noise=True, seed=0, disable_pbar=True)
    d_t, d_s = float((out - ref_t).abs().max()), float((g.last_source - ref_s).abs().max())
    print(f"\n[videop2p] lockstep vs ordinary sampling: target {d_t:.2e}, source (fast) {d_s:.2e}")
    assert d_t < 1e-4 and d_s < 1e-4
    # the control does act
    g2 = _guider(m, tiny_clip, conds, cross_replace=1.0, self_replace=1.0, z=z)
    assert float((_sample(g2, z) - ref_t).abs().max()) > 1e-3


def test_local_blend_keeps_the_source_outside_the_mask(tiny_model, tiny_clip, conds):
    # fast mode, latent 16x16; the tiny random model's attention is nearly uniform, hence the high threshold
    z = _latent(h=16, w=16, seed=7)
    g = _guider(tiny_model, tiny_clip, conds, blend_words="circle", blend_words_edit="square", blend_start=0.2,
                blend_threshold=0.85, z=z)
    out = _sample(g, z)
    m = g.last_mask
    assert m is not None and m.shape == (FRAMES, 16, 16)
    inside, outside = m.bool().unsqueeze(1).expand_as(out), ~m.bool().unsqueeze(1).expand_as(out)
    assert outside.any() and inside.any(), "the test needs a mask that is neither empty nor full"
    d_out = float((out - g.last_source)[outside].abs().max())
    d_in = float((out - g.last_source)[inside].abs().max())
    print(f"\n[videop2p] local blend: mask covers {float(m.mean()):.0%}; max |target - source| outside {d_out:.2e}, "
          f"inside {d_in:.2e}")
    assert d_out < 1e-5 and d_in > 1e-3


def test_wrong_sampler_is_refused(tiny_model, tiny_clip, conds):
    g = _guider(tiny_model, tiny_clip, conds, blend_words="circle")
    with pytest.raises(Exception, match="euler"):
        _sample(g, _latent(), sampler="dpmpp_2m")


def test_null_text_of_another_schedule_is_refused(inf_model, tiny_clip, conds, inverted, null_texts):
    _, z_T, inv = inverted
    g = _guider(inf_model, tiny_clip, conds, null_text=null_texts[0], inv=inv)
    with pytest.raises(Exception, match="not on the inversion's schedule.*set the sampler's steps to"):
        _sample(g, z_T, steps=STEPS + 1)


# --- API graph ------------------------------------------------------------------------------------------

def test_api_graph_null_text_and_guider_through_sampler_custom_advanced(inf_model, tiny_clip):
    OBJECTS["vp2p_model"] = inf_model
    OBJECTS["vp2p_clip"] = tiny_clip
    OBJECTS["vp2p_latent"] = _latent(seed=11)
    p = {
        "model": {"class_type": "ZSVETestProvide", "inputs": {"key": "vp2p_model"}},
        "clip": {"class_type": "ZSVETestProvide", "inputs": {"key": "vp2p_clip"}},
        "lat": {"class_type": "ZSVETestProvide", "inputs": {"key": "vp2p_latent"}},
        "tkv": {"class_type": "TemporalSelfAttentionPatch",
                "inputs": {"model": ["model", 0], "mode": "first", "include_own_frame": False, "min_channels": 0}},
        "src": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": SRC}},
        "edit": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": EDIT}},
        "empty": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
        "pp": {"class_type": "EditPrompts", "inputs": {"clip": ["clip", 0], "source_text": SRC, "edit_text": EDIT}},
        "inv": {"class_type": "VideoDDIMInvert", "inputs": {"model": ["tkv", 0], "latent": ["lat", 0],
                                                             "positive": ["src", 0], "steps": 3, "cfg": 1.0}},
        "nt": {"class_type": "NullTextOptimize", "inputs": {"model": ["tkv", 0], "inversion": ["inv", 1],
                                                             "source": ["src", 0], "empty": ["empty", 0],
                                                             "guidance": 7.5, "inner_steps": 2,
                                                             "early_stop_epsilon": 1e-5}},
        "guider": {"class_type": "VideoP2PGuider", "inputs": {
            "model": ["tkv", 0], "inversion": ["inv", 1], "prompts": ["pp", 3], "cfg": 7.5, "mode": "replace",
            "cross_replace": 0.2, "cross_replace_words": "", "self_replace": 0.5, "reweight": "square:2",
            "blend_words": "circle", "blend_words_edit": "square", "blend_start": 0.2, "blend_threshold": 0.3,
            "target_uncond": vp.TARGET_UNCOND[0], "null_text": ["nt", 0]}},
        "noise": {"class_type": "DisableNoise", "inputs": {}},
        "ksel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "ddim"}},
        "sched": {"class_type": "BasicScheduler", "inputs": {"model": ["tkv", 0], "scheduler": "ddim_uniform",
                                                              "steps": 3, "denoise": 1.0}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                                                                  "sampler": ["ksel", 0], "sigmas": ["sched", 0],
                                                                  "latent_image": ["inv", 0]}},
        "outs": {"class_type": "VideoP2PBranchOutputs", "inputs": {"guider": ["guider", 0], "edited": ["sca", 0]}},
        "c_edit": {"class_type": "ZSVETestCapture", "inputs": {"value": ["sca", 0], "key": "vp2p_edit"}},
        "c_den": {"class_type": "ZSVETestCapture", "inputs": {"value": ["sca", 1], "key": "vp2p_denoised"}},
        "c_src": {"class_type": "ZSVETestCapture", "inputs": {"value": ["outs", 0], "key": "vp2p_src"}},
        "c_mask": {"class_type": "ZSVETestCapture", "inputs": {"value": ["outs", 1], "key": "vp2p_mask"}},
        "c_nt": {"class_type": "ZSVETestCapture", "inputs": {"value": ["nt", 0], "key": "vp2p_nt"}},
    }
    res = run_prompt(p)
    assert {"nt", "guider", "sca", "outs"} <= res["executed"]
    edit, src = CAPTURED["vp2p_edit"]["samples"], CAPTURED["vp2p_src"]["samples"]
    assert edit.shape == src.shape == (FRAMES, 4, 8, 8)
    assert CAPTURED["vp2p_denoised"]["samples"].shape == edit.shape
    assert CAPTURED["vp2p_mask"].shape == (FRAMES, 64, 64)
    assert isinstance(CAPTURED["vp2p_nt"], NullText) and CAPTURED["vp2p_nt"].steps == 3
    assert torch.isfinite(edit).all() and float((edit - src).abs().max()) > 1e-4
    # re-running only the edit side re-uses the cached inversion and null text
    p["guider"]["inputs"]["blend_threshold"] = 0.4
    res2 = run_prompt(p)
    assert "nt" not in res2["executed"] and "inv" not in res2["executed"] and "sca" in res2["executed"]


def _windowed(model, length=2, overlap=1, fuse="pyramid", key_frames="first and middle"):
    from zsve.nodes.context import VideoContextWindows

    return VideoContextWindows.execute(model, context_length=length, context_overlap=overlap,
                                       context_schedule="standard_static", context_stride=1, closed_loop=False,
                                       fuse_method=fuse, key_frames=key_frames).result[0]


@pytest.mark.parametrize("fuse", ["pyramid", "relative"])
def test_context_windows_give_the_unwindowed_edit_without_temporal_attention(tiny_model, tiny_clip, conds, fuse):
    """Frames are independent without temporal attention, so any fusion of per-window results must give the
    unwindowed edit exactly: P2P control, Local Blend's mask (mean over the windows that saw a frame) and the
    branch layout must all be per absolute frame. 5 frames in windows of 3 (overlap 1)."""
    z = _latent(frames=5, h=16, w=16, seed=7)
    kw = dict(blend_words="circle", blend_words_edit="square", blend_start=0.2, blend_threshold=0.85)
    ref_g = _guider(tiny_model, tiny_clip, conds, z=z, **kw)
    ref = _sample(ref_g, z)
    win_g = _guider(_windowed(tiny_model, 3, 1, fuse), tiny_clip, conds, z=z, **kw)
    out = _sample(win_g, z)
    assert ref_g.last_mask is not None and 0 < float(ref_g.last_mask.mean()) < 1
    assert torch.equal(win_g.last_mask, ref_g.last_mask)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(win_g.last_source, ref_g.last_source, atol=1e-5)


def test_context_windows_with_frame_attention_keep_the_branches_paired(tiny_model, tiny_clip, conds, null_texts,
                                                                       inf_model, inverted):
    """With Video-P2P's frame attention both branches are windowed and fused alike: identical prompts with the
    null text as the target's unconditional give identical branches. Windows of one frame without key frames
    change the edit (each window attends to its own frame); with the clip's first frame added to every window
    (key_frames) frame attention reaches the global first frame and the windowed edit is the unwindowed one."""
    _, z_T, inv = inverted
    opt, _ = null_texts
    kw_inv = dict(inv=inv)
    m = inf_model.clone()
    m.set_model_attn1_patch(TemporalKV("first"))
    kw = dict(target_uncond=vp.TARGET_UNCOND[1], **kw_inv)
    ref = _sample(_guider(m, tiny_clip, conds, null_text=opt, edit=SRC, **kw), z_T)
    g = _guider(_windowed(m, 1, 0, key_frames="none"), tiny_clip, conds, null_text=opt, edit=SRC, **kw)
    out = _sample(g, z_T)
    assert torch.allclose(out, g.last_source, atol=1e-6)
    assert float((out - ref).abs().max()) > 1e-4
    g = _guider(_windowed(m, 1, 0, key_frames="first"), tiny_clip, conds, null_text=opt, edit=EDIT,
                blend_words="circle", blend_words_edit="square", **kw_inv)
    out = _sample(g, z_T)
    ref = _sample(_guider(m, tiny_clip, conds, null_text=opt, edit=EDIT, blend_words="circle",
                          blend_words_edit="square", **kw_inv), z_T)
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())


def test_null_text_and_edit_under_context_windows_run_headless(tiny_model, tiny_clip, conds):
    """Inversion, null-text optimisation and the guider all under the same frame windows (4 frames, windows
    of 2), through ComfyUI's sampler: finite results, one null text per step."""
    m = _windowed(tiny_model, 2, 1)
    lat = _latent(frames=4, seed=5)
    with torch.inference_mode():
        z_T, inv = glue.run_inversion(m, lat, conds["src"], None, STEPS, 1.0, disable_pbar=True)
        nt = vp.run_null_text(m, inv, conds["src"], conds["empty"], 7.5, 2, 1e-5, disable_pbar=True)
    assert nt.steps == STEPS
    g = _guider(m, tiny_clip, conds, null_text=nt, blend_words="circle", blend_words_edit="square", inv=inv)
    out = _sample(g, z_T)
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all() and g.last_mask.shape[0] == 4


def test_foreign_context_handler_is_refused(tiny_model, tiny_clip, conds):
    m = tiny_model.clone()
    m.model_options["context_handler"] = object()
    with pytest.raises(vp.ZSVEInputError, match="Video Context Windows"):
        _guider(m, tiny_clip, conds)


def test_local_blend_masks_each_phrase_and_unites_them():
    """Local Blend with two source phrases ('blue circle, green dots'): each phrase's running attention is
    recorded in its own column and normalised on its own, so the thinly spread background phrase is not lost under
    the object's peak (the summed map of both phrases keeps only the peak)."""
    from zsve.attention import p2p
    from zsve.attention.fatezero import FusionPlan
    from zsve.attention.processor import AttnCall
    from zsve.attention.videop2p import BRANCHES_KEY, BranchPlan, VideoP2PController

    f, heads, nq, t = 1, 1, 16, 8
    plan = FusionPlan(num_steps=4, timestep_to_step={900: 0, 100: 3}, cross_mode="refine",
                      cross_alphas=p2p.time_word_alphas(4, 0.0), mapper=torch.arange(t), self_steps=(0, 0))
    probs = torch.zeros(2 * 2 * f, heads, nq, t)
    probs[..., 0, 2] = 1.0  # token 2 (the object) peaks on pixel 0
    probs[..., 8:, 5] = 0.05  # token 5 (the background) is spread over the lower half
    call = AttnCall(kind="cross", layer="input_4_0", hw=(4, 4), frames=2 * f, cond_or_uncond=[1, 0], sigma=1.0,
                    timestep=100, heads=heads, extra={BRANCHES_KEY: 2})

    def mask(source):
        ctl = VideoP2PController(plan, BranchPlan(blend_source=source, record_min_factor=1, mask_factor=2), f, (8, 8))
        ctl(call, probs)
        return ctl.mask((4, 4))[0]

    united = mask([[2], [5]])
    assert united.flatten()[8:].eq(1).all() and united.flatten()[0] == 1
    summed = mask([2, 5])
    assert summed.flatten()[8:].eq(0).all() and summed.flatten()[0] == 1


def test_end_of_text_maps_reach_the_sampling_plan_and_the_nodes_text(tiny_model, tiny_clip):
    """end_of_text_maps: the guider's text says which maps the edit prompt's end-of-text token and padding take, and
    the plan it builds for the sampler's schedule follows it (default 'edit': control weight 0 from the end-of-text
    position on; 'source': Prompt-to-Prompt's alignment)."""
    from zsve.attention import align

    z = _latent()
    inv = _inv_like(tiny_model, z)
    pair = prompt_pair(tiny_clip, SRC, EDIT)
    eot = align.end_of_text(pair.edit.plain, pair.tokenizer)
    settings = dict(mode="replace", cross_replace=0.2, cross_replace_words="", self_replace=0.5, reweight="",
                    blend_words="", blend_words_edit="", blend_start=0.2, blend_threshold=0.3,
                    target_uncond=vp.TARGET_UNCOND[0])
    for maps, tail in (("edit", 0.0), ("source", 1.0)):
        with torch.inference_mode():
            out = vp.VideoP2PGuiderNode.execute(tiny_model, inv, pair, 7.5, end_of_text_maps=maps, **settings)
        assert f"end_of_text_maps {maps}:" in " ".join(out.ui["text"])
        guider, plans = out.result[0], []
        build = guider._build

        def spy(run, sigmas, build=build, plans=plans):
            build(run, sigmas)
            plans.append(run.plan)

        guider._build = spy
        _sample(guider, z)
        (plan,) = plans
        assert plan.cross_mode == "replace" and plan.cross_alphas[0, 1] == 1.0
        assert plan.cross_alphas[0, eot:].eq(tail).all() and plan.cross_alphas[0, eot - 1] == 1.0


def test_cross_attention_reweight_acts_on_the_target_branch_only(tiny_model, tiny_clip, conds):
    """Cross-Attention Reweight on the model the Video-P2P Guider samples: the two-branch batch's source branch (the
    source prompt, which the factors do not name) is sampled as without it; the target branch changes."""
    from zsve.nodes.reweight import CrossAttentionReweight

    z = _latent(seed=7)
    g0 = _guider(tiny_model, tiny_clip, conds, cross_replace=0.0, self_replace=0.0, z=z)
    out0 = _sample(g0, z)
    rw = CrossAttentionReweight.execute(tiny_model, prompt_pair(tiny_clip, SRC, EDIT), "green:4, square:4", 0.5)
    g1 = _guider(rw.result[0], tiny_clip, conds, cross_replace=0.0, self_replace=0.0, z=z)
    out1 = _sample(g1, z)
    d_src = float((g1.last_source - g0.last_source).abs().max())
    d_tgt = float((out1 - out0).abs().max())
    print(f"\n[videop2p] reweight node in the guider: source branch {d_src:.2e}, target {d_tgt:.2e}")
    assert d_src < 1e-3 < d_tgt


def test_fresh_noise_start_on_the_guiders_model_starts_the_target_branch_only(tiny_model, tiny_clip, conds):
    """Fresh Noise Start on the guider's model: the target branch's first step starts from fresh noise inside the
    mask, the source branch still reconstructs from z_T (bit for bit), and the edit contract reads the guider's
    target half of the [2F] latent."""
    import zsve.nodes.blend as blend_nodes

    lat = _latent()
    z_T, inv = glue.run_inversion(tiny_model, lat, conds["src"], None, STEPS, 1.0, disable_pbar=True)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    runs = {}
    for name, m in {"plain": tiny_model,
                    "fresh": blend_nodes.apply_fresh_noise_start(tiny_model, inv, mask)[0],
                    "empty": blend_nodes.apply_fresh_noise_start(tiny_model, inv, torch.zeros(1, 64, 64))[0]}.items():
        g = _guider(m, tiny_clip, conds, inv=inv)
        runs[name] = (_sample(g, z_T), g.last_source)
    assert torch.equal(runs["fresh"][1], runs["plain"][1])  # the source branch is untouched
    assert torch.allclose(runs["empty"][0], runs["plain"][0], atol=1e-5)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True
    diff = (runs["fresh"][0] - runs["plain"][0]).abs()
    assert diff[..., inside].mean() > 0.05  # the target branch changed where it started afresh
