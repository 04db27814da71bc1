"""The edit contract (nodes/contract.py, issue 16), through ComfyUI's executor: every edit path (FateZero's
Attention Blend, InFusion Inject, Latent Blend With Inversion, the Video-P2P guider) refuses a run it cannot do
right before the first UNet evaluation, with a message naming the node, the input to change and the value to use;
usable-but-suspicious runs are warned in the UI text (ComfyUI's progress-text channel) and the log."""

from __future__ import annotations

import pytest
import torch

import zsve.nodes._comfy as glue
from zsve.nodes import blend as blend_nodes
from zsve_harness import CAPTURED, OBJECTS, GraphError, run_prompt

SRC = "a red circle on blue stripes"
EDIT = "a red square on blue stripes"
STEPS = 4
METHODS = ["fatezero", "infusion", "blend", "videop2p"]
NODE_OF = {"fatezero": "AttentionBlend", "infusion": "InFusionInject", "blend": "LatentBlendWithInversion",
           "videop2p": "VideoP2PGuider"}
TINY_INFUSION = dict(feature_blocks="1", attention_blocks="0-3", feature_end=0.4, kv_end=0.8)


def _latent(frames=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(1, 4, h, w, generator=g) + 0.3 * torch.randn(frames, 4, h, w, generator=g)}


@pytest.fixture(autouse=True)
def _objects(tiny_model, tiny_clip):
    OBJECTS.update({"ct_model": tiny_model, "ct_clip": tiny_clip, "ct_lat": _latent()})


def _graph(method, inv_steps=STEPS, sampler="ksa", latent=("inv", 0), **s):
    """A graph: inversion recording what `method` needs, its edit node, and a sampler (`ksa` KSamplerAdvanced,
    `ksampler` the core KSampler, `custom` SamplerCustomAdvanced) whose inputs `s` overrides."""
    g = {
        "model": {"class_type": "ZSVETestProvide", "inputs": {"key": "ct_model"}},
        "clip": {"class_type": "ZSVETestProvide", "inputs": {"key": "ct_clip"}},
        "lat": {"class_type": "ZSVETestProvide", "inputs": {"key": "ct_lat"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": SRC, "clip": ["clip", 0]}},
        "epos": {"class_type": "CLIPTextEncode", "inputs": {"text": EDIT, "clip": ["clip", 0]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": s.pop("negative_text", ""), "clip": ["clip", 0]}},
        "pp": {"class_type": "EditPrompts", "inputs": {"clip": ["clip", 0], "source_text": SRC, "edit_text": EDIT}},
    }
    rec = ["model", 0]
    if method == "fatezero":
        g["rec"] = {"class_type": "AttentionStore", "inputs": {"model": ["model", 0], "record_window": 1.0,
                                                               "skip_full_res": False, "memory_budget_gb": 0.0}}
        rec = ["rec", 0]
    elif method == "infusion":
        g["rec"] = {"class_type": "InFusionSource", "inputs": dict(TINY_INFUSION, model=["model", 0],
                                                                   skip_full_res=True, memory_budget_gb=0.0)}
        rec = ["rec", 0]
    g["inv"] = {"class_type": "VideoDDIMInvert", "inputs": {"model": rec, "latent": ["lat", 0], "positive": ["pos", 0],
                                                            "steps": inv_steps, "cfg": 1.0}}
    if method == "fatezero":
        g["edit_model"] = {"class_type": "AttentionBlend", "inputs": {
            "model": ["model", 0], "inversion": ["inv", 1], "prompts": ["pp", 3], "mode": "refine", "cross_replace": 0.8, "cross_replace_words": "",
            "self_replace_start": 0.0, "self_replace_end": 0.8, "reweight": "", "blend_words": "",
            "blend_threshold": 0.3, "only_cond": True}}
    elif method == "infusion":
        g["edit_model"] = {"class_type": "InFusionInject", "inputs": dict(
            TINY_INFUSION, model=["model", 0], inversion=["inv", 1], prompts=["pp", 3], concepts="circle->square", strength=1.0, alpha=0.5, mask_threshold=0.3,
            inject_uncond=True)}
    elif method == "blend":
        g["edit_model"] = {"class_type": "LatentBlendWithInversion", "inputs": {
            "model": ["model", 0], "inversion": ["inv", 1], "mask_source": "cross-attention", "start": 0.0,
            "end": 1.0, "threshold": 0.3, "dilation": 1, "temporal_smoothing": 0, "prompts": ["pp", 3],
            "words": "square"}}
    if method == "videop2p":
        g["guider"] = {"class_type": "VideoP2PGuider", "inputs": {
            "model": ["model", 0], "inversion": ["inv", 1], "prompts": ["pp", 3], "cfg": 7.5,
            "mode": "refine", "cross_replace": 0.2, "cross_replace_words": "", "self_replace": 0.5, "reweight": "",
            "blend_words": "", "blend_words_edit": "", "blend_start": 0.2, "blend_threshold": 0.3,
            "target_uncond": "empty prompt (Video-P2P)"}}
        sampler = "custom"
    elif sampler == "custom":
        g["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["edit_model", 0], "positive": ["epos", 0],
                                                             "negative": ["neg", 0], "cfg": 7.5}}
    if sampler == "ksa":
        inputs = {"model": ["edit_model", 0], "add_noise": "disable", "noise_seed": 0, "steps": STEPS, "cfg": 7.5,
                  "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": ["epos", 0],
                  "negative": ["neg", 0], "latent_image": list(latent), "start_at_step": 0, "end_at_step": 10000,
                  "return_with_leftover_noise": "disable"}
        inputs.update(s)
        g["sample"] = {"class_type": "KSamplerAdvanced", "inputs": inputs}
    elif sampler == "ksampler":
        inputs = {"model": ["edit_model", 0], "seed": 0, "steps": STEPS, "cfg": 7.5, "sampler_name": "ddim",
                  "scheduler": "ddim_uniform", "positive": ["epos", 0], "negative": ["neg", 0],
                  "latent_image": list(latent), "denoise": 1.0}
        inputs.update(s)
        g["sample"] = {"class_type": "KSampler", "inputs": inputs}
    else:
        g["noise"] = ({"class_type": "RandomNoise", "inputs": {"noise_seed": 1}} if s.pop("random_noise", False)
                      else {"class_type": "DisableNoise", "inputs": {}})
        g["ksel"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": s.pop("sampler_name", "ddim")}}
        g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {
            "model": ["model", 0], "scheduler": s.pop("scheduler", "ddim_uniform"), "steps": s.pop("steps", STEPS),
            "denoise": s.pop("denoise", 1.0)}}
        g["sample"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["ksel", 0], "sigmas": ["sigmas", 0],
            "latent_image": list(latent)}}
    g["cap"] = {"class_type": "ZSVETestCapture", "inputs": {"value": ["sample", 0], "key": "ct_out"}}
    g["cap_z"] = {"class_type": "ZSVETestCapture", "inputs": {"value": ["inv", 0], "key": "ct_z"}}
    return g


def _refused(graph, *patterns):
    with pytest.raises(GraphError) as e:
        run_prompt(graph)
    msg = str(e.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("method", METHODS)
def test_a_correct_run_passes_and_every_method_installs_the_contract(method):
    run_prompt(_graph(method))
    out = CAPTURED["ct_out"]["samples"]
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["fatezero", "infusion", "blend"])
@pytest.mark.parametrize("how", ["core KSampler", "add_noise enable", "RandomNoise"])
def test_noise_added_on_top_of_z_T_is_refused(method, how):
    if how == "core KSampler":
        g = _graph(method, sampler="ksampler")
    elif how == "add_noise enable":
        g = _graph(method, add_noise="enable")
    else:
        g = _graph(method, sampler="custom", random_noise=True)
    _refused(g, NODE_OF[method], "adds noise on top of z_T", "add_noise to 'disable'", "Disable Noise")


def test_noise_added_with_the_video_p2p_guider_is_refused():
    _refused(_graph("videop2p", random_noise=True), "VideoP2PGuider", "adds noise on top of z_T")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("inv_steps,steps", [(10, 5), (4, 2)])
def test_fewer_steps_than_the_inversion_are_refused(method, inv_steps, steps):
    """The 5 (2) step timesteps are a subset of the 10 (4) step ones: still refused (z_T would start at the wrong
    sigma and steps would be skipped); the message asks for the inversion's step count."""
    _refused(_graph(method, inv_steps=inv_steps, steps=steps), NODE_OF[method],
             f"set the sampler's steps to {inv_steps}")


@pytest.mark.parametrize("method", METHODS)
def test_another_scheduler_is_refused(method):
    _refused(_graph(method, scheduler="karras"), NODE_OF[method], "scheduler to ddim_uniform")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_samplers_other_than_ddim_or_euler_are_refused_by_every_method(method, sampler):
    _refused(_graph(method, sampler_name=sampler), NODE_OF[method], f"the sampler is '{sampler}'",
             "Set the sampler to 'ddim' or 'euler'")


def test_euler_and_ddim_give_the_same_edit():
    run_prompt(_graph("fatezero", sampler_name="euler"))
    a = CAPTURED["ct_out"]["samples"].clone()
    run_prompt(_graph("fatezero", sampler_name="ddim"))
    assert torch.allclose(a, CAPTURED["ct_out"]["samples"], atol=1e-6)


@pytest.mark.parametrize("method", ["fatezero", "infusion"])
def test_start_at_step_from_z_T_denoise_below_1_and_early_end_are_refused(method):
    _refused(_graph(method, start_at_step=1), NODE_OF[method], "starts at step 1 of 4", "start_at_step 0")
    _refused(_graph(method, sampler="custom", denoise=0.5), NODE_OF[method], "not on the inversion's schedule")
    _refused(_graph(method, end_at_step=2), NODE_OF[method], "jumps from step 1 of 4 to the end",
             "end_at_step 10000")


def test_two_stages_that_continue_each_other_equal_one_run():
    """KSamplerAdvanced 0..2 with its leftover noise, then 2..end from that output: exactly one edit run (the
    first stage is warned: its output still holds noise)."""
    run_prompt(_graph("fatezero"))
    one = CAPTURED["ct_out"]["samples"].clone()
    g = _graph("fatezero", end_at_step=2, return_with_leftover_noise="enable")
    g["sample2"] = {"class_type": "KSamplerAdvanced", "inputs": dict(g["sample"]["inputs"], latent_image=["sample", 0],
                                                                    start_at_step=2, end_at_step=10000,
                                                                    return_with_leftover_noise="disable")}
    g["cap"]["inputs"]["value"] = ["sample2", 0]
    run_prompt(g)
    assert torch.allclose(CAPTURED["ct_out"]["samples"], one, atol=1e-5)


def test_a_noise_mask_on_the_latent_is_refused_with_the_user_mask_pointed_to():
    g = _graph("fatezero", latent=("nm", 0))
    g["solid"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    g["nm"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["inv", 0], "mask": ["solid", 0]}}
    _refused(g, "AttentionBlend", "noise mask", "Latent Blend With Inversion", "'user mask'")


class _UIRecorder:
    """Stands in for PromptServer.instance: records the progress texts ComfyUI shows under a node."""

    def __init__(self):
        self.texts = []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((str(node_id), text))

    def __getattr__(self, name):  # anything else the executor may call on the server
        return lambda *a, **k: None


def test_a_latent_that_is_not_the_inversions_z_T_is_warned_in_the_ui_text(monkeypatch, caplog):
    import logging

    from server import PromptServer

    ui = _UIRecorder()
    monkeypatch.setattr(PromptServer, "instance", ui, raising=False)
    OBJECTS["ct_other"] = {"samples": torch.randn(2, 4, 8, 8)}
    g = _graph("blend", latent=("other", 0))
    g["other"] = {"class_type": "ZSVETestProvide", "inputs": {"key": "ct_other"}}
    with caplog.at_level(logging.WARNING):
        run_prompt(g)
    texts = [t for node, t in ui.texts if node == "sample"]
    assert any("is not this inversion's z_T" in t for t in texts), ui.texts
    assert "is not this inversion's z_T" in caplog.text
    # the inversion's own z_T: no warning
    ui.texts.clear()
    run_prompt(_graph("blend"))
    assert not any("z_T" in t for _, t in ui.texts)


def test_nan_in_a_frame_is_refused_naming_the_frame():
    lat = _latent(frames=3)
    lat["samples"][1, 0, 2, 2] = float("nan")
    OBJECTS["ct_lat"] = lat
    _refused(_graph("blend"), "VideoDDIMInvert", "NaN or infinite values in frame(s) 1 (0-based, of 3)")


def test_an_empty_video_is_refused_with_a_message():
    for samples in (None, torch.zeros(0, 4, 8, 8)):
        with pytest.raises(glue.ZSVEInputError, match="no frames.*empty video"):
            glue.check_latent({"samples": samples}, "VideoDDIMInvert")


def test_area_and_masked_conditionings_are_refused():
    g = _graph("fatezero")
    g["area"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["epos", 0], "width": 64,
                                                                 "height": 64, "x": 0, "y": 0, "strength": 1.0}}
    g["sample"]["inputs"]["positive"] = ["area", 0]
    _refused(g, "AttentionBlend", "area conditioning", "Latent Blend With Inversion")


def test_a_negative_prompt_longer_than_75_tokens_is_named_as_the_cause():
    long_negative = ", ".join(["blurry low quality"] * 30)
    _refused(_graph("fatezero", negative_text=long_negative), "AttentionBlend", "the negative prompt encodes to 154 "
             "tokens", "Shorten the negative prompt to 75 tokens")


def test_string_choices_are_validated_on_the_python_api(tiny_model):
    from zsve.nodes.context import VideoContextWindows

    with pytest.raises(glue.ZSVEInputError, match="'key_frames' must be one of"):
        VideoContextWindows.execute(tiny_model, 2, 1, "standard_static", 1, False, "pyramid", key_frames="middle frame")
    inv = glue.run_inversion(tiny_model, _latent(), _cond(), None, 2, 1.0, disable_pbar=True)[1]
    with pytest.raises(glue.ZSVEInputError, match="'mask_source' must be one of"):
        blend_nodes.apply_latent_blend(tiny_model, inv, mask_source="attention")


def _cond():
    return [[torch.zeros(1, 77, 64), {}]]


def test_memory_figures_below_one_gib_are_given_in_mib():
    from zsve.attention.store import AttentionRecorder, StoreConfig, format_bytes

    assert format_bytes(3 * 2**20) == "3.0 MiB" and format_bytes(3 * 2**30) == "3.00 GiB"
    err = AttentionRecorder(StoreConfig(budget_bytes=2 * 2**20))._budget_error(5 * 2**20)
    assert "needs 5.0 MiB, more than its memory budget of 2.0 MiB" in str(err)


def test_a_word_that_is_only_part_of_a_longer_word_is_named():
    msg = _refused(_graph("blend", sampler="ksa") | {"edit_model": {"class_type": "LatentBlendWithInversion", "inputs": {
        "model": ["model", 0], "inversion": ["inv", 1], "mask_source": "cross-attention", "start": 0.0, "end": 1.0,
        "threshold": 0.3, "dilation": 1, "temporal_smoothing": 0, "prompts": ["pp", 3], "words": "squ"}}}, "'squ' is only part of the word 'square'")
    assert "give 'square'" in msg


def test_ddim_uniform_step_counts_follow_comfyuis_scheduler(tiny_model):
    """exact_ddim_uniform_steps says for which step counts ComfyUI's ddim_uniform schedule has exactly that many steps
    (checked against comfy.samplers.ddim_scheduler on the model's own 1000-step schedule)."""
    import comfy.samplers

    from zsve.nodes.contract import exact_ddim_uniform_steps

    ms = tiny_model.get_model_object("model_sampling")
    for n in range(1, 61):
        assert exact_ddim_uniform_steps(n) == (len(comfy.samplers.ddim_scheduler(ms, n)) - 1 == n), n
    assert not exact_ddim_uniform_steps(12) and exact_ddim_uniform_steps(10) and exact_ddim_uniform_steps(20)


def test_a_step_count_that_ddim_uniform_lengthens_is_explained():
    """ddim_uniform has 13 steps for steps=12: Video DDIM Invert inverts all 13, BasicScheduler keeps the last 12. The
    run is refused with the step counts that work (and, where the sampler may be KSamplerAdvanced, that one: its
    ddim_uniform has the same 13 steps, and it runs)."""
    msg = _refused(_graph("videop2p", inv_steps=12, steps=12), "VideoP2PGuider", "has 13 steps for steps=12",
                   "set 'steps' to 10 or 20 (a count ddim_uniform keeps exact) in both Video DDIM Invert and "
                   "BasicScheduler")
    assert "KSamplerAdvanced" not in msg  # the guider samples with SamplerCustomAdvanced only
    _refused(_graph("blend", inv_steps=12, sampler="custom", steps=12), NODE_OF["blend"],
             "or sample with KSamplerAdvanced (steps 12: its ddim_uniform has the same 13 steps)")
    run_prompt(_graph("blend", inv_steps=12, steps=12))
