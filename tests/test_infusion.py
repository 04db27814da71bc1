"""InFusion through the real ComfyUI on the tiny model: source record at inversion, scoped ResBlock hooks,
key/value injection, multi-concept masked fusion, LoRA before/after our patches, the node graph."""

from __future__ import annotations

from pathlib import Path

import comfy.lora
import comfy.sample
import comfy.sd
import comfy.utils
import folder_paths
import pytest
import torch

import zsve.nodes._comfy as glue
from zsve.attention.infusion import InFusionController, InFusionRecord
from zsve.nodes._attn_patch import PROCESSORS_KEY
from zsve.nodes.infusion import InFusionInject, InFusionSource
from zsve_harness import CAPTURED, OBJECTS, encode_text, moving_square_frames, prompt_pair, run_prompt, write_video
from zsve_workflows import load_ui, ui_to_api

SRC = "a red circle and a green square"
EDIT = "a blue circle and a yellow square"
CONCEPTS = "red->blue, green->yellow"
STEPS = 5  # ddim_uniform: exactly 5 steps
# Tiny UNet: output blocks 0-3 (0, 1 at 8x8, 2, 3 at 16x16 for a 16x16 latent), each a ResBlock + transformer.
TINY = dict(feature_blocks="1", attention_blocks="0-3", feature_end=0.4, kv_end=0.8)  # phases: 0-1 | 2-3 | 4


def _latent(frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, 16, 16, generator=g)
    return {"samples": base + 0.3 * torch.randn(frames, 4, 16, 16, generator=g)}


@pytest.fixture(scope="module")
def conds(tiny_clip):
    return encode_text(tiny_clip, SRC), encode_text(tiny_clip, EDIT), encode_text(tiny_clip, "")


def _source(model, **kw):
    args = dict(TINY, skip_full_res=True, memory_budget_gb=0.0)
    args.update(kw)
    return InFusionSource.execute(model, **args).result[0]


def _inject(model, inv, clip, source=SRC, edit=EDIT, **kw):
    args = dict(TINY, concepts=CONCEPTS, strength=1.0, alpha=0.5,
                mask_threshold=0.3, inject_uncond=True)
    args.update(kw)
    return InFusionInject.execute(model, inv, prompt_pair(clip, source, edit), **args).result


def _sample(model, z_T, positive, negative, cfg=5.0):
    noise = torch.zeros_like(z_T["samples"])
    return comfy.sample.sample(model, noise, STEPS, cfg, "ddim", "ddim_uniform", positive, negative, z_T["samples"],
                               start_step=0, last_step=10000, force_full_denoise=True, disable_noise=True, seed=0,
                               disable_pbar=True)


def _controller(model) -> InFusionController:
    procs = [p for p in model.model_options["transformer_options"].get(PROCESSORS_KEY, [])
             if isinstance(p, InFusionController)]
    assert len(procs) == 1
    return procs[0]


def _invert(model, conds, frames=2):
    return glue.run_inversion(_source(model), _latent(frames), conds[0], None, STEPS, 1.0, disable_pbar=True)


def _no_hooks(model):
    bad = [name for name, mod in model.model.diffusion_model.named_modules()
           if mod._forward_hooks or mod._forward_pre_hooks]
    return bad


def test_source_record_is_bounded_exact_in_bytes_and_changes_nothing(tiny_model, conds):
    ref, _ = glue.run_inversion(tiny_model, _latent(), conds[0], None, STEPS, 1.0, disable_pbar=True)
    out, inv = _invert(tiny_model, conds)
    # recording reads only: the inversion is the plain one (explicit vs fast attention: float tolerance)
    assert torch.allclose(out["samples"], ref["samples"], atol=1e-5, rtol=1e-5)
    rec = inv.records["infusion"]
    assert isinstance(rec, InFusionRecord) and rec.frames == 2 and rec.num_steps == STEPS
    t_of = {STEPS - k: inv.timesteps[k] for k in range(1, STEPS + 1)}  # edit step -> timestep
    assert set(rec.features) == {(t_of[0], 1, None), (t_of[1], 1, None)}  # feature phase only, chosen block only
    assert rec.kv_timesteps() == {t_of[2], t_of[3]}  # key/value phase only
    assert rec.kv_layers() == {"output_0_0", "output_1_0", "output_2_0", "output_3_0"}
    assert rec.attention.timesteps == [t_of[4]]  # fusion phase only
    assert set(rec.attention.layer_names("self")) == {"output_0_0", "output_1_0"}  # skip_full_res: 8x8 only
    tensors = list(rec.features.values()) + [t for e in rec.kv.values() for t in e.values()]
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in tensors)
    assert rec.feature(t_of[0], 1).shape == (2, 64, 8, 8)
    own = sum(t.numel() * 2 for t in tensors)
    assert rec.nbytes == own + rec.attention.nbytes and rec.attention.nbytes > 0
    assert inv.nbytes >= rec.nbytes + sum(x.numel() * 4 for x in inv.latents)
    assert f"{rec.nbytes} bytes" in rec.summary()


def test_edit_runs_every_phase_and_injects_the_source_feature(tiny_model, tiny_clip, conds):
    z_T, inv = _invert(tiny_model, conds)
    rec = inv.records["infusion"]
    m, masks = _inject(tiny_model, inv, tiny_clip)
    ctl = _half_region(_controller(m))
    seen = {}
    unet = tiny_model.model.diffusion_model

    def pre(module, args):  # the input of the transformer after ResBlock 1 = the (injected) ResBlock output
        t = int(round(float(module._zsve_t)))
        seen[t] = args[0].detach().clone()

    def time_hook(module, args, kwargs):
        for sub in (unet.output_blocks[1][1],):
            sub._zsve_t = args[1][0] if len(args) > 1 else kwargs["timesteps"][0]

    h1 = unet.output_blocks[1][1].register_forward_pre_hook(pre)
    h2 = unet.register_forward_pre_hook(time_hook, with_kwargs=True)
    try:
        out = _sample(m, z_T, conds[1], conds[2])
    finally:
        h1.remove()
        h2.remove()
    plain = _sample(tiny_model, z_T, conds[1], conds[2])
    assert not torch.allclose(out, plain, atol=1e-4)
    assert ctl.counts["feature"] == 2  # one hook call per feature step (cond + uncond in one batch)
    assert ctl.counts["kv"] == 2 * 4  # two steps x four decoder self-attention layers
    assert ctl.counts["fusion_self"] == 2 and ctl.counts["fusion_cross"] == 2  # one step x two 8x8 layers
    t_of = {STEPS - k: inv.timesteps[k] for k in range(1, STEPS + 1)}
    out_of_concepts = _HALF.expand(2, -1, -1) == 0  # [F, h, w]
    for i in (0, 1):  # strength 1: outside the concepts both guidance halves carry the recorded source feature (fp16)
        got = seen[t_of[i]].permute(0, 2, 3, 1)  # [2F, h, w, C]
        src = rec.feature(t_of[i], 1).float().permute(0, 2, 3, 1)
        for half in (got[:2], got[2:]):
            assert torch.allclose(half[out_of_concepts], src[out_of_concepts], atol=2e-3)
            assert not torch.allclose(half[~out_of_concepts], src[~out_of_concepts], atol=2e-3)
    got = seen[t_of[2]]
    assert not torch.allclose(got[:2], got[2:], atol=1e-3)  # kv phase: the features are the edit's own again
    assert masks.shape == (2 * 2, 128, 128)


# The tiny random model's concept masks cover its whole 8x8 feature map, which would leave the default injection
# region (outside the concepts) empty: the tests give the controller a region covering the left half instead.
_HALF = torch.zeros(1, 8, 8)
_HALF[..., :4] = 1.0


def _half_region(ctl):
    def region(hw):  # the left half at every resolution (the key/value phase asks at 16x16 too)
        m = torch.zeros(2, *hw)
        m[..., : hw[1] // 2] = 1.0
        return m
    ctl.concept_region = region
    return ctl


def _first_steps(model, z_T, positive, negative, last_step, cfg=5.0):
    noise = torch.zeros_like(z_T["samples"])
    return comfy.sample.sample(model, noise, STEPS, cfg, "ddim", "ddim_uniform", positive, negative, z_T["samples"],
                               start_step=0, last_step=last_step, force_full_denoise=False, disable_noise=True, seed=0,
                               disable_pbar=True)


def test_strength_scales_the_feature_phase(tiny_model, tiny_clip, conds):
    z_T, inv = _invert(tiny_model, conds)
    plain = _first_steps(tiny_model, z_T, conds[1], conds[2], last_step=2)  # the two feature-phase steps
    m0, _ = _inject(tiny_model, inv, tiny_clip, strength=0.0)
    out0 = _first_steps(m0, z_T, conds[1], conds[2], last_step=2)
    assert _controller(m0).counts["feature"] == 0
    assert torch.allclose(out0, plain, atol=1e-6)  # nothing else acts in the feature phase
    m1, _ = _inject(tiny_model, inv, tiny_clip, strength=1.0)
    _half_region(_controller(m1))
    out1 = _first_steps(m1, z_T, conds[1], conds[2], last_step=2)
    m5, _ = _inject(tiny_model, inv, tiny_clip, strength=0.5)
    _half_region(_controller(m5))
    out5 = _first_steps(m5, z_T, conds[1], conds[2], last_step=2)
    d1, d5 = (out1 - plain).abs().mean(), (out5 - plain).abs().mean()
    assert d1 > 1e-4 and 0.0 < d5 < d1
    assert _controller(m1).counts["feature"] == 2


def test_hooks_leave_nothing_behind_and_plain_sampling_is_bit_identical(tiny_model, tiny_clip, conds):
    z = {"samples": _latent()["samples"] * 3}
    before = _sample(tiny_model, z, conds[1], conds[2])
    z_T, inv = _invert(tiny_model, conds)
    m, _ = _inject(tiny_model, inv, tiny_clip)
    _sample(m, z_T, conds[1], conds[2])
    assert _no_hooks(tiny_model) == []
    assert not tiny_model.model.diffusion_model._forward_hooks
    after = _sample(tiny_model, z, conds[1], conds[2])
    assert torch.equal(before, after)


def test_multi_concept_masks_differ_and_fuse_as_their_union(tiny_model, tiny_clip, conds):
    z_T, inv = _invert(tiny_model, conds, frames=3)
    # the random tiny model's cross-attention is nearly uniform: a high threshold keeps each word's peak region
    m, masks = _inject(tiny_model, inv, tiny_clip, mask_threshold=0.9)
    ctl = _controller(m)
    assert [c.label for c in ctl.plan.concepts] == ["red->blue", "green->yellow"]
    a, b = masks[:3], masks[3:]  # concept 1's frames, then concept 2's
    assert a.sum() > 0 and b.sum() > 0 and not torch.equal(a, b)
    out = _sample(m, z_T, conds[1], conds[2])
    assert torch.isfinite(out).all() and ctl.counts["fusion_self"] > 0
    t4 = inv.timesteps[1]  # edit step 4, the fusion step
    ms_j = ctl.source_masks(t4, (8, 8))
    assert ms_j.shape == (2, 3, 8, 8) and not torch.equal(ms_j[0], ms_j[1])
    me, ms = ctl.masks(4, t4, (8, 8))
    assert torch.equal(ms, torch.maximum(ms_j[0], ms_j[1]).reshape(3, -1))
    me_j = ctl._edit_masks(4, (8, 8))  # from the edit's own cross-attention of the previous step
    assert me_j is not None and torch.equal(me, torch.maximum(me_j[0], me_j[1]).reshape(3, -1))


def _tiny_lora(model, rank=2, scale=0.5, seed=0):
    """A LoRA state dict in the kohya 'lora_unet_' format for every linear layer of the tiny UNet."""
    keys = comfy.lora.model_lora_keys_unet(model.model, {})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    done = set()
    weights = model.model.state_dict()
    for lora_key, w_key in sorted(keys.items()):
        if not lora_key.startswith("lora_unet_") or w_key not in weights or weights[w_key].ndim != 2 or w_key in done:
            continue
        done.add(w_key)  # ComfyUI maps both the ldm and the diffusers spelling onto a weight: use one
        out_f, in_f = weights[w_key].shape
        sd[f"{lora_key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * scale
        sd[f"{lora_key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * scale / in_f**0.5
        sd[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    return sd


def test_lora_before_and_after_our_patches_both_apply(tiny_model, tiny_clip, conds):
    lora = _tiny_lora(tiny_model)
    assert any("output_blocks_1_0_emb_layers" in k for k in lora)  # the hooked ResBlock itself is adapted
    loaded = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(tiny_model.model, {}))
    assert len(loaded) == sum(1 for k in lora if k.endswith(".lora_up.weight"))

    def with_lora(m):
        return comfy.sd.load_lora_for_models(m, None, lora, 1.0, 0.0)[0]

    z_none, inv_none = _invert(tiny_model, conds)
    m_none, _ = _inject(tiny_model, inv_none, tiny_clip)
    out_none = _sample(m_none, z_none, conds[1], conds[2])
    # LoRA before our patches: the LoRA model is inverted and edited
    lora_model = with_lora(tiny_model)
    z_b, inv_b = _invert(lora_model, conds)
    m_b, _ = _inject(lora_model, inv_b, tiny_clip)
    out_b = _sample(m_b, z_b, conds[1], conds[2])
    # LoRA after our patches: applied to the patched edit model
    m_a = with_lora(_inject(tiny_model, inv_none, tiny_clip)[0])
    out_a = _sample(m_a, z_none, conds[1], conds[2])
    for out, m in ((out_b, m_b), (out_a, m_a)):
        assert (out - out_none).abs().mean() > 1e-3 * out_none.abs().mean()
        ctl = _controller(m)
        assert ctl.counts["feature"] == 2 and ctl.counts["kv"] == 8 and ctl.counts["fusion_self"] == 2
    # the recorded source features differ with the LoRA (the weights of the hooked block are patched)
    t0 = inv_b.timesteps[-1]
    fb, fn = inv_b.records["infusion"].feature(t0, 1), inv_none.records["infusion"].feature(t0, 1)
    assert not torch.allclose(fb.float(), fn.float(), atol=1e-3)
    assert _no_hooks(tiny_model) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(feature_blocks="4"), r"feature_blocks 4 do not exist: this SD1.x/2.x-family UNet has 4 decoder blocks 0-3: "
                               r"feature_blocks may be 0-3 .* attention_blocks 0-3 .*'auto' takes feature_blocks 1 and "
                               r"attention_blocks 1-3"),
    (dict(attention_blocks="2-11"), r"attention_blocks 4-11 do not exist"),
    (dict(feature_blocks="x"), "range like 4-11"),
])
def test_source_rejects_blocks_the_model_lacks(tiny_model, kwargs, match):
    with pytest.raises(glue.ZSVEInputError, match=match):
        _source(tiny_model, **kwargs)


def test_inject_errors_say_what_to_change(tiny_model, tiny_clip, conds):
    _, plain_inv = glue.run_inversion(tiny_model, _latent(), conds[0], None, STEPS, 1.0, disable_pbar=True)
    with pytest.raises(glue.ZSVEInputError, match="Put InFusion Source Features"):
        _inject(tiny_model, plain_inv, tiny_clip)
    _, inv = _invert(tiny_model, conds)
    with pytest.raises(glue.ZSVEInputError, match="recorded no ResBlock features"):
        _inject(tiny_model, inv, tiny_clip, feature_end=0.6, kv_end=0.8)
    with pytest.raises(glue.ZSVEInputError, match="'cat' is not a word of the source prompt"):
        _inject(tiny_model, inv, tiny_clip, concepts="cat->dog")
    with pytest.raises(glue.ZSVEInputError, match=r"feature blocks \[2\] were not recorded"):
        _inject(tiny_model, inv, tiny_clip, feature_blocks="2")


def test_node_graph_with_core_lora_loader_through_the_executor(tiny_model, tiny_clip, tiny_vae, tmp_path):
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    comfy.utils.save_torch_file(_tiny_lora(tiny_model), str(lora_dir / "zsve_tiny_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(lora_dir))
    OBJECTS["if_ckpt"] = (tiny_model, tiny_clip, tiny_vae)
    OBJECTS["if_latent"] = _latent(frames=2, seed=3)

    def graph(strength):
        return {
            "ckpt": {"class_type": "ZSVETestCheckpoint", "inputs": {"key": "if_ckpt"}},
            "latent": {"class_type": "ZSVETestProvide", "inputs": {"key": "if_latent"}},
            "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                            "lora_name": "zsve_tiny_lora.safetensors",
                                                            "strength_model": strength, "strength_clip": 0.0}},
            "src": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": SRC}},
            "edit": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": EDIT}},
            "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
            "pp": {"class_type": "EditPrompts", "inputs": {"clip": ["ckpt", 1], "source_text": SRC, "edit_text": EDIT}},
            "source": {"class_type": "InFusionSource",
                       "inputs": dict(TINY, model=["lora", 0], skip_full_res=True, memory_budget_gb=0.0)},
            "invert": {"class_type": "VideoDDIMInvert", "inputs": {"model": ["source", 0], "latent": ["latent", 0],
                                                                   "positive": ["src", 0], "steps": STEPS, "cfg": 1.0}},
            "inject": {"class_type": "InFusionInject",
                       "inputs": dict(TINY, model=["lora", 0], inversion=["invert", 1], prompts=["pp", 3],
                                      concepts=CONCEPTS, strength=1.0,
                                      alpha=0.5, mask_threshold=0.3, inject_uncond=True)},
            "sample": {"class_type": "KSamplerAdvanced",
                       "inputs": {"model": ["inject", 0], "add_noise": "disable", "noise_seed": 0, "steps": STEPS,
                                  "cfg": 5.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
                                  "positive": ["edit", 0], "negative": ["neg", 0], "latent_image": ["invert", 0],
                                  "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
            "cap": {"class_type": "ZSVETestCapture", "inputs": {"value": ["sample", 0], "key": f"if_out_{strength}"}},
            "capm": {"class_type": "ZSVETestCapture", "inputs": {"value": ["inject", 1], "key": "if_masks"}},
            "capmodel": {"class_type": "ZSVETestCapture", "inputs": {"value": ["inject", 0], "key": "if_model"}},
        }

    res = run_prompt(graph(1.0))
    assert {"source", "invert", "inject", "sample"} <= res["executed"]
    ui_text = res["ui"].get("inject", {}).get("text") or res["ui"].get("inject", {}).get("ui", {}).get("text")
    out_lora = CAPTURED["if_out_1.0"]["samples"]
    ctl = _controller(CAPTURED["if_model"])
    assert ctl.counts["feature"] == 2 and ctl.counts["kv"] == 8 and ctl.counts["fusion_self"] == 2
    assert CAPTURED["if_masks"].shape == (4, 128, 128)
    run_prompt(graph(0.0))
    out_plain = CAPTURED["if_out_0.0"]["samples"]
    assert (out_lora - out_plain).abs().mean() > 1e-3 * out_plain.abs().mean()
    assert _no_hooks(tiny_model) == []
    assert ui_text is None or any("InFusion source record" in s for s in ui_text)


WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "infusion_two_concepts_lora.json"
# The shipped workflow is for SD1.5 (Plug-and-Play's blocks 4 / 4-11, 20 steps); the tiny UNet has output
# blocks 0-3 and the test runs 5 steps.
TINY_WIDGETS = {"InFusionSource": dict(feature_blocks="1", attention_blocks="0-3"),
                "InFusionInject": dict(feature_blocks="1", attention_blocks="0-3"),
                "VideoDDIMInvert": dict(steps=STEPS), "KSamplerAdvanced": dict(steps=STEPS)}


def run_infusion_workflow(model, clip, vae, frames, work: Path, lora_sd: dict | None = None) -> dict:
    """Run workflows/infusion_two_concepts_lora.json headless on (model, clip, vae) with `frames` as input.mp4;
    returns the captured edit latent, masks, patched model and the saved files."""
    (work / "in").mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    (work / "loras").mkdir(exist_ok=True)
    comfy.utils.save_torch_file(lora_sd if lora_sd is not None else _tiny_lora(model),
                                str(work / "loras" / "infusion_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(work / "loras"))
    old_in, old_out = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(work / "in"))
    folder_paths.set_output_directory(str(work / "out"))
    try:
        write_video(frames, work / "in" / "input.mp4")
        OBJECTS["if_wf_ckpt"] = (model, clip, vae)
        prompt = ui_to_api(load_ui(WORKFLOW), replace={"CheckpointLoaderSimple": {
            "class_type": "ZSVETestCheckpoint", "inputs": {"key": "if_wf_ckpt"}}})
        by_type = {v["class_type"]: k for k, v in prompt.items()}
        for ct, widgets in TINY_WIDGETS.items():
            prompt[by_type[ct]]["inputs"].update(widgets)
        for key, (ct, slot) in {"wf_sample": ("KSamplerAdvanced", 0), "wf_masks": ("InFusionInject", 1),
                                "wf_model": ("InFusionInject", 0), "wf_frames": ("GetVideoComponents", 0),
                                "wf_edit": ("VAEDecode", 0)}.items():
            prompt[f"cap_{key}"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [by_type[ct], slot],
                                                                                 "key": key}}
        run_prompt(prompt)
        out = {k: CAPTURED[k] for k in ("wf_sample", "wf_masks", "wf_model", "wf_frames", "wf_edit")}
        out["saved"] = list((work / "out").rglob("*.mp4"))
        return out
    finally:
        folder_paths.set_input_directory(old_in)
        folder_paths.set_output_directory(old_out)


def test_shipped_workflow_multi_concept_with_lora_runs_headless(tiny_model, tiny_clip, tiny_vae, tmp_path):
    ui = load_ui(WORKFLOW)
    types = [n["type"] for n in ui["nodes"]]
    assert {"LoraLoader", "InFusionSource", "InFusionInject", "VideoDDIMInvert", "KSamplerAdvanced"} <= set(types)
    inject = next(n for n in ui["nodes"] if n["type"] == "InFusionInject")
    assert "red->yellow, blue->green" in inject["widgets_values"]  # two concepts
    res = run_infusion_workflow(tiny_model, tiny_clip, tiny_vae, moving_square_frames(frames=3, size=64), tmp_path)
    assert len(res["saved"]) == 1 and res["saved"][0].name.startswith("infusion_edit")
    ctl = _controller(res["wf_model"])
    assert [c.label for c in ctl.plan.concepts] == ["red->yellow", "blue->green"]
    assert ctl.counts["feature"] == 2 and ctl.counts["kv"] > 0 and ctl.counts["fusion_self"] > 0
    assert res["wf_masks"].shape == (2 * 3, 64, 64)
    assert res["wf_sample"]["samples"].shape == (3, 4, 8, 8)
    assert _no_hooks(tiny_model) == []


def test_a_second_self_attention_control_is_refused_before_the_first_unet_call(tiny_model, tiny_clip, conds):
    """InFusion's key/value phase outside the concepts is answered at the output level, which the dispatcher uses
    only when no other processor needs the call's probabilities: another self-attention control on the same edit
    model (Attention Blend's or the Video-P2P Guider's controller; a second InFusion Inject replaces the first) is
    refused when the run starts, not at the key/value phase's first step."""
    from zsve.attention.fatezero import FateZeroController
    from zsve.attention.videop2p import VideoP2PController
    from zsve.nodes._attn_patch import add_processor

    class OtherSelfControl:  # stands for another node's self-attention controller on the same model
        SELF_ATTENTION_CONTROL = True

        def active(self, call):
            return False

        def __call__(self, call, probs):
            return None

    assert FateZeroController.SELF_ATTENTION_CONTROL and VideoP2PController.SELF_ATTENTION_CONTROL
    z_T, inv = _invert(tiny_model, conds)
    m, _ = _inject(tiny_model, inv, tiny_clip)
    stacked = m.clone()
    add_processor(stacked, OtherSelfControl())
    calls = []
    h = tiny_model.model.diffusion_model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        with pytest.raises(Exception, match="another self-attention control is on the same edit model"):
            _sample(stacked, z_T, conds[1], conds[2])
    finally:
        h.remove()
    assert calls == []
    assert torch.isfinite(_sample(m, z_T, conds[1], conds[2])).all()  # InFusion Inject alone runs
    plug_and_play = m.clone()  # the key/value phase everywhere (process_kv) shares its calls: no refusal
    _controller(plug_and_play).plan.kv_region = "all"
    add_processor(plug_and_play, OtherSelfControl())
    assert torch.isfinite(_sample(plug_and_play, z_T, conds[1], conds[2])).all()


def test_a_region_covering_the_frame_is_named_in_the_nodes_text(tiny_model, tiny_clip, conds):
    """The random tiny model's attention is nearly flat: at threshold 0.3 the concept's mask covers the whole frame,
    where neither injection acts, and the node's text says so (with what to change); at 0.95 it covers a part."""
    _, inv = _invert(tiny_model, conds)
    args = dict(TINY, concepts=CONCEPTS, strength=1.0, alpha=0.5, inject_uncond=True)
    pair = prompt_pair(tiny_clip, SRC, EDIT)
    flat = InFusionInject.execute(tiny_model, inv, pair, mask_threshold=0.3, **args)
    note = [t for t in flat.ui["text"] if "region covers" in t]
    assert len(note) == 1 and "name only the words the edit changes" in note[0], flat.ui["text"]
    peaked = InFusionInject.execute(tiny_model, inv, pair, mask_threshold=0.95, **args)
    assert not [t for t in peaked.ui["text"] if "region covers" in t], peaked.ui["text"]
    no_concepts = InFusionInject.execute(tiny_model, inv, pair, mask_threshold=0.3, **{**args, "concepts": ""})
    assert not [t for t in no_concepts.ui["text"] if "region covers" in t]
