"""Composition with core ComfyUI features: ControlNet on the conditioning during inversion and editing."""

from __future__ import annotations

import torch

from zsve.nodes._attn_patch import add_processor
from zsve_harness import CAPTURED, OBJECTS, encode_text, make_tiny_controlnet, run_prompt


class CountingRecorder:
    def __init__(self):
        self.n = 0

    def __deepcopy__(self, memo):
        return self

    def active(self, call):
        return call.kind == "self"

    def __call__(self, call, probs):
        self.n += 1
        return None


def _graph(hint_key):
    return {
        "m": {"class_type": "ZSVETestProvide", "inputs": {"key": "cn_model"}},
        "p0": {"class_type": "ZSVETestProvide", "inputs": {"key": "cn_pos"}},
        "n0": {"class_type": "ZSVETestProvide", "inputs": {"key": "cn_neg"}},
        "cn": {"class_type": "ZSVETestProvide", "inputs": {"key": "cn"}},
        "hint": {"class_type": "ZSVETestProvide", "inputs": {"key": hint_key}},
        "l": {"class_type": "ZSVETestProvide", "inputs": {"key": "cn_lat"}},
        "apply": {"class_type": "ControlNetApplyAdvanced",
                  "inputs": {"positive": ["p0", 0], "negative": ["n0", 0], "control_net": ["cn", 0],
                             "image": ["hint", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "inv": {"class_type": "VideoDDIMInvert",
                "inputs": {"model": ["m", 0], "latent": ["l", 0], "positive": ["apply", 0], "steps": 6, "cfg": 1.0}},
        "edit": {"class_type": "KSamplerAdvanced",
                 "inputs": {"model": ["m", 0], "add_noise": "disable", "noise_seed": 0, "steps": 6, "cfg": 5.0,
                            "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": ["apply", 0],
                            "negative": ["apply", 1], "latent_image": ["inv", 0], "start_at_step": 0,
                            "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "cap": {"class_type": "ZSVETestCapture", "inputs": {"value": ["edit", 0], "key": f"cn_out_{hint_key}"}},
        "cap2": {"class_type": "ZSVETestCapture", "inputs": {"value": ["inv", 0], "key": f"cn_zt_{hint_key}"}},
    }


def test_controlnet_hint_changes_inversion_and_edit_while_our_patches_run(tiny_model, tiny_clip):
    frames = 2
    m = tiny_model.clone()
    rec = CountingRecorder()
    add_processor(m, rec)
    g = torch.Generator().manual_seed(0)
    OBJECTS.update({
        "cn_model": m, "cn_pos": encode_text(tiny_clip, "a red circle"), "cn_neg": encode_text(tiny_clip, ""),
        "cn": make_tiny_controlnet(tiny_model), "cn_lat": {"samples": torch.randn(frames, 4, 8, 8, generator=g)},
        "hint_a": torch.rand(frames, 64, 64, 3, generator=g), "hint_b": torch.rand(frames, 64, 64, 3, generator=g),
    })
    run_prompt(_graph("hint_a"))
    n_a = rec.n
    assert n_a > 0, "our attention processor ran during inversion and editing with a ControlNet applied"
    run_prompt(_graph("hint_b"))
    assert rec.n > n_a
    za, zb = CAPTURED["cn_zt_hint_a"]["samples"], CAPTURED["cn_zt_hint_b"]["samples"]
    oa, ob = CAPTURED["cn_out_hint_a"]["samples"], CAPTURED["cn_out_hint_b"]["samples"]
    assert (za - zb).abs().mean() > 1e-4, "the hint acts during inversion"
    assert (oa - ob).abs().mean() > 1e-4, "the hint acts during editing"


def test_inversion_and_reconstruction_under_core_context_windows(tiny_model, tiny_clip):
    """ComfyUI's core context-window handler (frames = batch dim 0, via VideoContextWindows) splits the UNet
    calls; the inversion runs through the same handler and the round trip still returns the input frames."""
    import comfy.sample
    import nodes

    import zsve.nodes._comfy as glue

    frames = 6
    win = nodes.NODE_CLASS_MAPPINGS["VideoContextWindows"]
    m = win.execute(tiny_model, context_length=4, context_overlap=2, context_schedule="standard_static",
                    context_stride=1, closed_loop=False, fuse_method="pyramid", key_frames="none").args[0]
    rec = CountingRecorder()
    add_processor(m, rec)
    seen_windows = []

    class WindowSpy(CountingRecorder):
        def __call__(self, call, probs):
            if call.frame_index is not None:
                seen_windows.append(tuple(call.frame_index))
            return None

    add_processor(m, WindowSpy())
    pos, neg = encode_text(tiny_clip, "a red circle"), encode_text(tiny_clip, "")
    lat = {"samples": torch.randn(frames, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    z_T, inv = glue.run_inversion(m, lat, pos, None, 10, 1.0, disable_pbar=True)
    assert inv.frames == frames and len(inv.latents) == 11
    out = comfy.sample.sample(m, torch.zeros_like(z_T["samples"]), 10, 1.0, "ddim", "ddim_uniform", pos, neg,
                              z_T["samples"], disable_noise=True, seed=0, disable_pbar=True)
    x = lat["samples"]
    assert (out - x).abs().mean() < 0.1 * x.abs().mean()
    assert seen_windows and all(len(w) == 4 for w in seen_windows), "processors see absolute frame indices"
    assert {w[0] for w in seen_windows} >= {0}


def test_key_frames_join_every_window_and_are_fused_only_from_their_own(tiny_model):
    """Video Context Windows adds the clip's first and middle frames to every window (so temporal attention
    reaches the same key frames everywhere) and fuses each window's own frames only: 9 frames, windows of 3
    without overlap; a fake model marks each result with its window's length."""
    from zsve.attention.temporal import key_frames
    from zsve.nodes.context import VideoContextWindows

    m = VideoContextWindows.execute(tiny_model, context_length=3, context_overlap=0,
                                    context_schedule="standard_static", context_stride=1, closed_loop=False,
                                    fuse_method="pyramid", key_frames="first and middle").result[0]
    h = m.model_options["context_handler"]
    x = torch.arange(9.0).view(9, 1, 1, 1).expand(9, 4, 2, 2).clone()
    mo = {"transformer_options": {"sample_sigmas": torch.tensor([5.0, 0.0])}}
    wins = h.get_context_windows(None, x, mo)
    assert [w.index_list for w in wins] == [[0, 1, 2, 4], [0, 3, 4, 5], [0, 4, 6, 7, 8]]
    assert [w.zsve_anchors for w in wins] == [[4], [0], [0, 4]] and wins[0].zsve_total_frames == 9

    def calc(model, conds, sub_x, sub_t, model_options):
        return [sub_x + 100.0 * sub_x.shape[0]]

    out = h.execute(calc, None, [[{}]], x, torch.full((9,), 5.0), mo)[0]
    expect = torch.tensor([400.0, 401, 402, 403, 404, 405, 506, 507, 508])
    assert torch.allclose(out[:, 0, 0, 0], expect), out[:, 0, 0, 0]
    # temporal attention in a window holding the clip's middle frame uses it (not the window's middle)
    assert key_frames("middle", 5, frame_ids=[0, 4, 6, 7, 8], total_frames=9) == [[1]] * 5
    assert key_frames("middle", 5, frame_ids=[0, 4, 6, 7, 8]) == [[2]] * 5
    assert key_frames("first", 4, frame_ids=[0, 3, 4, 5], total_frames=9) == [[0]] * 4
