"""LatentBlendWithInversion (issue 7): Blended Latent Diffusion with the inversion trajectory as background,
masks from edit-time cross-attention and/or a user MASK, through the real ComfyUI samplers."""

from __future__ import annotations

import comfy.patcher_extension
import comfy.sample
import pytest
import torch

import zsve.nodes._comfy as glue
import zsve.nodes.blend as blend_nodes
from zsve.attention import latent_blend as lb
from zsve_harness import CAPTURED, OBJECTS, GraphError, encode_text, prompt_pair, run_prompt

SOURCE = "a red circle on blue stripes"
EDIT = "a green square on blue stripes"
STEPS = 5  # a divisor of 1000: ComfyUI's ddim_uniform gives one more step otherwise
FRAMES = 4


# --- pure math ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma,sigma_next", [(14.6, 9.7), (3.0, 1.5), (0.4, 0.03), (0.3, 0.0)])
def test_background_denoised_lands_the_euler_step_on_the_target(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, target, den = (torch.randn(2, 4, 5, 5, generator=g) * 3 for _ in range(3))
    d_bg = lb.background_denoised(x, target, sigma, sigma_next)
    assert torch.allclose(lb.euler_step(x, d_bg, sigma, sigma_next), target, atol=1e-5)
    # the blended prediction gives the BLD blend of the edit step and the target
    m = (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    out = lb.euler_step(x, lb.blended_denoised(den, x, target, m, sigma, sigma_next), sigma, sigma_next)
    expected = m * lb.euler_step(x, den, sigma, sigma_next) + (1 - m) * target
    assert torch.allclose(out, expected, atol=1e-5)


def test_background_denoised_is_the_trajectory_formula_when_x_is_the_source():
    """With x = z_src(s): D = z_src(s) - s (z_src(s') - z_src(s)) / (s' - s)."""
    g = torch.Generator().manual_seed(1)
    src, src_next = torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    s, s2 = 2.0, 1.2
    assert torch.allclose(lb.background_denoised(src, src_next, s, s2), src - s * (src_next - src) / (s2 - s))
    assert torch.equal(lb.background_denoised(src, src_next, s, 0.0), src_next)


def test_blend_is_exact_at_zero_and_one():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    assert torch.equal(lb.blend(a, b, torch.ones(3, 4, 4)), a)
    assert torch.equal(lb.blend(a, b, torch.zeros(3, 4, 4)), b)


def test_window_fractions():
    assert [i for i in range(10) if lb.in_window(i, 10, 0.0, 1.0)] == list(range(10))
    assert [i for i in range(10) if lb.in_window(i, 10, 0.2, 0.8)] == [2, 3, 4, 5, 6, 7]
    assert [i for i in range(10) if lb.in_window(i, 10, 0.25, 1.0)] == list(range(3, 10))
    assert not any(lb.in_window(i, 10, 0.5, 0.5) for i in range(10))


def test_parse_words():
    assert lb.parse_words(" cat, red hat ,,") == ["cat", "red hat"]


def test_user_mask_broadcast_resize_and_errors():
    m = torch.zeros(1, 128, 128)
    m[:, :, 64:] = 1.0
    out = lb.prepare_user_mask(m, 4, 16, 16)
    assert out.shape == (4, 16, 16)
    assert torch.equal(out[:, :, :8], torch.zeros(4, 16, 8)) and torch.equal(out[:, :, 8:], torch.ones(4, 16, 8))
    per_frame = torch.rand(4, 16, 16)
    assert torch.allclose(lb.prepare_user_mask(per_frame, 4, 16, 16), per_frame)
    with pytest.raises(ValueError, match="3 frames but the video has 4"):
        lb.prepare_user_mask(torch.ones(3, 128, 128), 4, 16, 16)
    with pytest.raises(ValueError, match="aspect ratio"):
        lb.prepare_user_mask(torch.ones(1, 64, 128), 4, 16, 16)


def _word_maps(maps: torch.Tensor) -> list[torch.Tensor]:
    """[F, h, w] word maps as one layer's [F, Nq, 1] head-averaged map of a single token."""
    return [maps.flatten(1).unsqueeze(-1)]


def test_attention_blend_mask_threshold_dilation_and_temporal_smoothing():
    maps = torch.zeros(3, 8, 8)
    maps[0, 2, 2] = 1.0
    maps[1, 5, 5] = 4.0  # per-frame normalisation: the scale of a frame does not matter
    maps[2] = 0.1
    m = lb.attention_blend_mask(_word_maps(maps), [(8, 8)], (8, 8), threshold=0.5)
    # the recipe's 3x3 max-pool (FateZero) makes a single peak a 3x3 block
    assert m[0].sum() == 9 and m[0, 1:4, 1:4].all() and m[1].sum() == 9 and m[1, 4:7, 4:7].all()
    assert m[2].sum() == 64  # a flat map is everywhere at its maximum
    d = lb.attention_blend_mask(_word_maps(maps), [(8, 8)], (8, 8), threshold=0.5, dilation=3)
    assert d[0].sum() == 25 and d[0, 0:5, 0:5].all()
    # temporal smoothing: mean of the normalised maps of frames f-1..f+1 (ends replicated), then threshold
    s = lb.attention_blend_mask(_word_maps(maps), [(8, 8)], (8, 8), threshold=0.6, temporal_radius=1)
    assert s[0, 2, 2] == 1 and s[0, 5, 5] == 0  # (1 + 1 + 0) / 3 with frame 0 replicated vs (0 + 0 + 1) / 3
    assert s[1, 2, 2] == 1 and s[1, 5, 5] == 1 and s[1, 0, 0] == 0  # (1 + 0 + 1) / 3 vs (0 + 0 + 1) / 3
    assert s[2].all()  # (0 + 1 + 1) / 3 with frame 2 replicated
    # resized to the latent; odd kernels only
    assert lb.attention_blend_mask(_word_maps(maps), [(8, 8)], (16, 16), threshold=0.5).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="odd"):
        lb.attention_blend_mask(_word_maps(maps), [(8, 8)], (8, 8), threshold=0.5, dilation=2)


def test_second_lowest_resolution_layers():
    sd15 = {"input_1_0": 1, "input_2_0": 1, "input_4_0": 2, "input_5_0": 2, "input_7_0": 4, "input_8_0": 4,
            "middle_0_0": 8, "output_3_0": 4, "output_4_0": 4, "output_5_0": 4, "output_6_0": 2,
            "output_9_0": 1}
    assert sorted(lb.second_lowest_resolution_layers(sd15)) == ["input_7_0", "input_8_0", "output_3_0",
                                                                 "output_4_0", "output_5_0"]


def test_tiny_unet_layers(tiny_model):
    ds = blend_nodes.transformer_downsampling(tiny_model)
    assert ds == {"input_1_0": 1, "input_3_0": 2, "middle_0_0": 2, "output_0_0": 2, "output_1_0": 2,
                  "output_2_0": 1, "output_3_0": 1}
    assert sorted(lb.second_lowest_resolution_layers(ds)) == ["input_1_0", "output_2_0", "output_3_0"]


def test_word_positions_from_comfyui_tokenizer(tiny_clip):
    """ComfyUI's SD1 tokenizer wraps the HF CLIPTokenizer; positions are those of the conditioning's tokens."""
    from transformers import CLIPTokenizer

    assert isinstance(tiny_clip.tokenizer.clip_l.tokenizer, CLIPTokenizer)
    def pair(edit):
        return prompt_pair(tiny_clip, "a photo", edit)

    pos, per_word = blend_nodes.word_token_positions(pair("a photo of a tabby cat"), "tabby cat")
    assert pos == [5, 6]
    pos, per_word = blend_nodes.word_token_positions(pair("a (Red:1.3) hat, a red car"), "red, car")
    assert per_word == {"red": [2, 6], "car": [7]}
    # each comma-separated phrase is masked on its own: its columns among the collected positions
    assert pos == [2, 6, 7] and blend_nodes.phrase_columns(pos, per_word) == [[0, 1], [2]]
    assert blend_nodes.phrase_columns([5, 6], {"tabby cat": [5, 6]}) is None
    with pytest.raises(glue.ZSVEInputError, match="words: 'dog' is not a word of the edit prompt"):
        blend_nodes.word_token_positions(pair("a photo of a cat"), "dog")
    with pytest.raises(glue.ZSVEInputError, match="'cat' is not a word of the edit prompt.*only part of the word 'catwalk'"):
        blend_nodes.word_token_positions(pair("a photo of a catwalk"), "cat")
    with pytest.raises(glue.ZSVEInputError, match="'words' is empty"):
        blend_nodes.word_token_positions(pair("a photo of a cat"), " , ")
    # a punctuation-only entry names nothing and takes no other entry's label
    assert blend_nodes.word_token_positions(pair("a (Red:1.3) hat, a red car"), "red, -, car")[1] == per_word
    with pytest.raises(glue.ZSVEInputError, match="'words' names no word"):
        blend_nodes.word_token_positions(pair("a photo of a cat"), "-, ?")


# --- through ComfyUI's samplers ----------------------------------------------------------------------------


def _frames_latent(frames=FRAMES, h=16, w=16, seed=0):
    """Distinct frames: a moving blob on a random background, so per-frame masks can differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, 4, h, w, generator=g) * 0.5
    for f in range(frames):
        x[f, :, 3:8, 2 + 2 * f:7 + 2 * f] += 2.0
    return {"samples": x}


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_clip):
    latent = _frames_latent()
    src_pos = encode_text(tiny_clip, SOURCE)
    z_T, inv = glue.run_inversion(tiny_model, latent, src_pos, None, STEPS, 1.0, disable_pbar=True)
    return {
        "latent": latent, "z_T": z_T, "inv": inv, "src_pos": src_pos,
        "pos": encode_text(tiny_clip, EDIT), "neg": encode_text(tiny_clip, ""),
    }


def _sample(model, s, steps=STEPS, cfg=1.0, sampler="ddim", latent=None, xs=None):
    """KSamplerAdvanced(add_noise=disable, ddim_uniform) through ComfyUI's own code; xs collects the
    sampler state at the start of every step (internal latent space). cfg 1 (one UNet batch) keeps the
    tests cheap; the tests that need guidance rows pass cfg=2."""
    z = s["z_T"]["samples"] if latent is None else latent
    cb = None if xs is None else (lambda i, x0, x, total: xs.append(x.clone()))
    return comfy.sample.sample(model, torch.zeros_like(z), steps, cfg, sampler, "ddim_uniform", s["pos"], s["neg"], z,
                               start_step=0, last_step=10000, force_full_denoise=True, disable_noise=True,
                               callback=cb, seed=0, disable_pbar=True)


def _pair(clip):
    return prompt_pair(clip, SOURCE, EDIT)


def _patch(model, s, **kw):
    m, state, _ = blend_nodes.apply_latent_blend(model, s["inv"], **kw)
    return m, state


def test_zero_mask_follows_the_inversion_trajectory(tiny_model, setup):
    s = setup
    m, state = _patch(tiny_model, s, mask_source="user mask", mask=torch.zeros(1, 128, 128))
    xs: list = []
    out = _sample(m, s, xs=xs)
    inv = s["inv"]
    # state at the start of step i is the inversion latent at sigma_{N-i}; the result is the source itself
    for i, x in enumerate(xs):
        ref = inv.latents[inv.steps - i]
        assert (x - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), i
    assert torch.allclose(out, s["latent"]["samples"], atol=1e-5)
    assert sorted(state.masks) == list(range(STEPS)) and all(float(v.max()) == 0 for v in state.masks.values())
    # ... which is closer to the input than the plain DDIM reconstruction
    rec = _sample(tiny_model, dict(s, pos=s["src_pos"]), cfg=1.0)
    x = s["latent"]["samples"]
    assert (out - x).abs().max() < (rec - x).abs().max()


def test_all_ones_mask_is_the_unblended_edit_bitwise(tiny_model, setup):
    m, state = _patch(tiny_model, setup, mask_source="user mask", mask=torch.ones(1, 128, 128))
    assert torch.equal(_sample(m, setup, cfg=2.0), _sample(tiny_model, setup, cfg=2.0))
    assert len(state.masks) == STEPS


def test_outside_a_user_mask_the_result_is_the_source(tiny_model, setup):
    mask = torch.zeros(FRAMES, 128, 128)
    for f in range(FRAMES):
        mask[f, 16:72, 8 + 16 * f:56 + 16 * f] = 1.0  # a different box per frame, on latent-pixel boundaries
    m, _ = _patch(tiny_model, setup, mask_source="user mask", mask=mask)
    out = _sample(m, setup)
    src = setup["latent"]["samples"]
    edit = _sample(tiny_model, setup)
    lm = lb.prepare_user_mask(mask, FRAMES, 16, 16).unsqueeze(1).expand_as(out)
    outside, inside = lm == 0, lm == 1
    assert torch.allclose(out[outside], src[outside], atol=1e-5)
    assert (out[inside] - src[inside]).abs().mean() > 0.05  # the edit happened inside
    assert (edit[outside] - src[outside]).abs().mean() > 0.05  # ... and the plain edit changes the outside


def test_window_start_late_still_lands_on_the_source(tiny_model, setup):
    """Blending only from half of the steps: the state before the window is the free edit; from the first
    blended step on, the outside of the mask is exactly on the inversion trajectory."""
    mask = torch.zeros(1, 128, 128)
    mask[:, :, :64] = 1.0
    m, state = _patch(tiny_model, setup, mask_source="user mask", mask=mask, start=0.5, end=1.0)
    xs: list = []
    out = _sample(m, setup, xs=xs)
    inv = setup["inv"]
    assert sorted(state.masks) == [3, 4]  # steps 0..4, window from ceil(0.5 * 5) = 3
    right = (slice(None), slice(None), slice(None), slice(8, None))
    assert (xs[3][right] - inv.latents[inv.steps - 3][right]).abs().max() > 1e-2  # free before the window
    assert torch.allclose(xs[4][right], inv.latents[inv.steps - 4][right], atol=1e-5)
    assert torch.allclose(out[right], setup["latent"]["samples"][right], atol=1e-5)


def test_cross_attention_mask_is_per_frame_and_online(tiny_model, tiny_clip, setup):
    m, state = _patch(tiny_model, setup, mask_source="cross-attention", prompts=_pair(tiny_clip),
                      words="green square", threshold=0.5, dilation=1)
    out = _sample(m, setup)
    assert sorted(state.masks) == list(range(STEPS))
    last = state.masks[STEPS - 1]
    assert last.shape == (FRAMES, 16, 16)
    cover = last.flatten(1).mean(1)
    assert torch.all(cover > 0) and torch.all(cover < 1), cover
    assert any(not torch.equal(last[0], last[f]) for f in range(1, FRAMES))  # per frame
    assert any(not torch.equal(state.masks[0], state.masks[i]) for i in range(1, STEPS))  # recomputed per step
    # outside the last step's mask the result is the source
    lm = last.unsqueeze(1).expand_as(out)
    src = setup["latent"]["samples"]
    assert torch.allclose(out[lm == 0], src[lm == 0], atol=1e-5)
    # other words give another mask: the maps are those of the chosen tokens
    m2, state2 = _patch(tiny_model, setup, mask_source="cross-attention", prompts=_pair(tiny_clip),
                        words="stripes", threshold=0.5, dilation=1)
    _sample(m2, setup)
    assert not torch.equal(state2.masks[STEPS - 1], last)


def test_collected_maps_equal_an_independent_computation(tiny_model, tiny_clip, setup):
    """The collector's map = head-mean of softmax(q k^T / sqrt(d)) of the conditional rows at the words'
    tokens; checked against float64 math on q/k captured by a foreign attn2 replace patch (which the
    blend keeps calling: it only reads the attention)."""
    seen: dict = {}

    def foreign(q, k, v, extra):
        from comfy.ldm.modules.attention import optimized_attention

        if extra["block"] == ("input", 1) and float(extra["sigmas"][0]) > 0:
            seen.setdefault(float(extra["sigmas"][0]), (q.clone(), k.clone(), list(extra["cond_or_uncond"])))
        return optimized_attention(q, k, v, extra["n_heads"])

    base = tiny_model.clone()
    base.set_model_attn2_replace(foreign, "input", 1, 0)
    m, state = _patch(base, setup, mask_source="cross-attention", prompts=_pair(tiny_clip),
                      words="green", threshold=0.5, dilation=1)
    collected = []
    orig = lb.MapCollector.add

    def spy(self, call, probs):
        orig(self, call, probs)
        if call.layer == "input_1_0":
            total, count, _ = self.layers["input_1_0"]
            collected.append((call.sigma, total.clone() / count.view(-1, 1, 1)))

    lb.MapCollector.add = spy
    try:
        _sample(m, setup, cfg=2.0)  # cond and uncond rows in one batch: the collector must pick the cond rows
    finally:
        lb.MapCollector.add = orig
    assert len(seen) == STEPS and len(collected) == STEPS
    pos = blend_nodes.word_token_positions(_pair(tiny_clip), "green")[0]
    for sigma, got in collected:
        q, k, cou = seen[sigma]
        heads = 2
        b, n, inner = q.shape
        d = inner // heads
        qh = q.view(b, n, heads, d).transpose(1, 2).double()
        kh = k.view(b, -1, heads, d).transpose(1, 2).double()
        p = (qh @ kh.transpose(-1, -2) / d**0.5).softmax(-1)
        assert sorted(cou) == [0, 1]
        ci = cou.index(0)
        ref = p[ci * FRAMES:(ci + 1) * FRAMES].mean(1)[..., pos]  # [F, Nq, P]
        assert torch.allclose(got.double(), ref, atol=1e-5)


def test_union_contains_both_masks(tiny_model, tiny_clip, setup):
    user = torch.zeros(1, 128, 128)
    user[:, :16, :16] = 1.0
    m, state = _patch(tiny_model, setup, mask_source="union", prompts=_pair(tiny_clip), words="green",
                      threshold=0.5, dilation=1, mask=user)
    _sample(m, setup)
    m2, state2 = _patch(tiny_model, setup, mask_source="cross-attention", prompts=_pair(tiny_clip),
                        words="green", threshold=0.5, dilation=1)
    _sample(m2, setup)
    # the first step's input is z_T in both runs, so its attention mask is the same: union = max of both
    u, a = state.masks[0], state2.masks[0]
    um = lb.prepare_user_mask(user, FRAMES, 16, 16)
    assert torch.equal(u, torch.maximum(a, um))
    assert u.sum() > a.sum() and u.sum() > um.sum()
    assert torch.all(state.masks[STEPS - 1][:, :2, :2] == 1)


def test_euler_gives_the_same_result_as_ddim(tiny_model, setup):
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 32:96] = 1
    m, _ = _patch(tiny_model, setup, mask_source="user mask", mask=mask)
    assert torch.allclose(_sample(m, setup, sampler="euler"), _sample(m, setup, sampler="ddim"), atol=1e-6)


def test_inverting_with_the_patched_model_is_unchanged(tiny_model, tiny_clip, setup):
    m, _ = _patch(tiny_model, setup, mask_source="cross-attention", prompts=_pair(tiny_clip), words="green")
    z1, _ = glue.run_inversion(m, setup["latent"], setup["src_pos"], None, STEPS, 1.0, disable_pbar=True)
    assert torch.equal(z1["samples"], setup["z_T"]["samples"])


def test_composes_with_other_wrappers_and_patches(tiny_model, tiny_clip, setup):
    calls = {"wrapper": 0, "attn1": 0}

    def other_wrapper(executor, *args, **kwargs):
        calls["wrapper"] += 1
        return executor(*args, **kwargs)

    def other_attn1(n, context, value, extra):
        calls["attn1"] += 1
        return n, context, value

    base = tiny_model.clone()
    base.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "someone_else", other_wrapper)
    base.set_model_attn1_patch(other_attn1)
    m, _ = _patch(base, setup, mask_source="cross-attention", prompts=_pair(tiny_clip), words="green")
    m2, state2 = _patch(m, setup, mask_source="user mask", mask=torch.ones(1, 128, 128))  # two blends chain
    _sample(m2, setup)
    assert calls["wrapper"] == STEPS and calls["attn1"] > 0
    assert len(state2.masks) == STEPS
    assert "someone_else" in m2.wrappers[comfy.patcher_extension.WrappersMP.PREDICT_NOISE]
    blends = [k for k in m2.wrappers[comfy.patcher_extension.WrappersMP.PREDICT_NOISE] if k.startswith("zsve_latent")]
    assert len(blends) == 2  # plus someone_else's and the attention dispatcher's step scope (nodes/_attn_patch.py)
    assert "zsve_latent_blend" not in repr(tiny_model.wrappers)  # the input model is not modified


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask_source": "user mask"}, "needs a MASK"),
        ({"mask_source": "cross-attention"}, "needs the prompt pair"),
        ({"mask_source": "user mask", "mask": torch.ones(3, 128, 128)}, "3 frames but the video has 4"),
        ({"mask_source": "user mask", "mask": torch.ones(1, 128, 64)}, "aspect ratio"),
        ({"mask_source": "user mask", "mask": torch.ones(1, 16, 16), "start": 0.8, "end": 0.2}, "start <= end"),
        ({"mask_source": "user mask", "mask": torch.ones(1, 16, 16), "dilation": 4}, "odd"),
        ({"mask_source": "user mask", "mask": torch.ones(1, 16, 16), "inversion": "nope"}, "VideoDDIMInvert"),
    ],
)
def test_bad_node_inputs_say_what_to_change(tiny_model, setup, kwargs, match):
    args = {"inversion": setup["inv"]}
    args.update(kwargs)
    with pytest.raises(glue.ZSVEInputError, match=match):
        blend_nodes.apply_latent_blend(tiny_model, **args)


def test_sampler_steps_or_frames_that_do_not_match_the_inversion_are_refused(tiny_model, setup):
    m, _ = _patch(tiny_model, setup, mask_source="user mask", mask=torch.ones(1, 16, 16))
    for steps in (STEPS - 1, STEPS * 2, 6):
        with pytest.raises(glue.ZSVEInputError, match=f"set the sampler's steps to {STEPS}"):
            _sample(m, setup, steps=steps)
    # 5 sampler steps hit a subset of a 10-step inversion's sigmas: still refused (steps would be skipped)
    _, inv10 = glue.run_inversion(tiny_model, setup["latent"], setup["src_pos"], None, 10, 1.0, disable_pbar=True)
    m10, _, _ = blend_nodes.apply_latent_blend(tiny_model, inv10, mask_source="user mask", mask=torch.ones(1, 16, 16))
    with pytest.raises(glue.ZSVEInputError, match="not neighbours.*set the sampler's steps to 10"):
        _sample(m10, setup, steps=5)
    # 6 requested steps give 7 on ddim_uniform; the message asks for the requested number
    _, inv6 = glue.run_inversion(tiny_model, setup["latent"], setup["src_pos"], None, 6, 1.0, disable_pbar=True)
    assert inv6.steps == 7
    m6, _, _ = blend_nodes.apply_latent_blend(tiny_model, inv6, mask_source="user mask", mask=torch.ones(1, 16, 16))
    with pytest.raises(glue.ZSVEInputError, match="set the sampler's steps to 6"):
        _sample(m6, setup, steps=7)
    _sample(m6, setup, steps=6)
    with pytest.raises(glue.ZSVEInputError, match="scheduler to ddim_uniform"):
        comfy.sample.sample(m, torch.zeros_like(setup["z_T"]["samples"]), STEPS, 1.0, "ddim", "karras",
                            setup["pos"], setup["neg"], setup["z_T"]["samples"], disable_noise=True, seed=0,
                            disable_pbar=True)
    with pytest.raises(glue.ZSVEInputError, match="latent is \\[3, 4, 16, 16\\] but the inversion's z_T is "
                       "\\[4, 4, 16, 16\\] \\(4 frames of 16x16\\)"):
        _sample(m, setup, latent=setup["z_T"]["samples"][:3])
    with pytest.raises(glue.ZSVEInputError, match="latent is \\[4, 4, 8, 8\\]"):
        _sample(m, setup, latent=setup["z_T"]["samples"][:, :, :8, :8])


# --- graphs -----------------------------------------------------------------------------------------------


def _graph(mask_source="user mask", sampler="ksa"):
    g = {
        "m": {"class_type": "ZSVETestProvide", "inputs": {"key": "model"}},
        "c": {"class_type": "ZSVETestProvide", "inputs": {"key": "clip"}},
        "l": {"class_type": "ZSVETestProvide", "inputs": {"key": "lat"}},
        "mk": {"class_type": "ZSVETestProvide", "inputs": {"key": "mask"}},
        "img": {"class_type": "ZSVETestProvide", "inputs": {"key": "img"}},
        "sp": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["c", 0], "text": SOURCE}},
        "ep": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["c", 0], "text": EDIT}},
        "en": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["c", 0], "text": ""}},
        "pp": {"class_type": "EditPrompts", "inputs": {"clip": ["c", 0], "source_text": SOURCE, "edit_text": EDIT}},
        "inv": {"class_type": "VideoDDIMInvert",
                "inputs": {"model": ["m", 0], "latent": ["l", 0], "positive": ["sp", 0], "steps": STEPS, "cfg": 1.0}},
        "bl": {"class_type": "LatentBlendWithInversion",
               "inputs": {"model": ["m", 0], "inversion": ["inv", 1], "mask_source": mask_source, "start": 0.0,
                          "end": 1.0, "threshold": 0.5, "dilation": 1, "temporal_smoothing": 1,
                          "prompts": ["pp", 3], "words": "green", "mask": ["mk", 0]}},
        "pv": {"class_type": "LatentBlendMaskPreview",
               "inputs": {"blend_state": ["bl", 1], "samples": ["s", 0], "step": -1, "images": ["img", 0]}},
        "c1": {"class_type": "ZSVETestCapture", "inputs": {"value": ["s", 0], "key": "out"}},
        "c2": {"class_type": "ZSVETestCapture", "inputs": {"value": ["pv", 0], "key": "mask"}},
        "c3": {"class_type": "ZSVETestCapture", "inputs": {"value": ["pv", 1], "key": "overlay"}},
    }
    if sampler == "ksa":
        g["s"] = {"class_type": "KSamplerAdvanced",
                  "inputs": {"model": ["bl", 0], "add_noise": "disable", "noise_seed": 0, "steps": STEPS, "cfg": 2.0,
                             "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": ["ep", 0],
                             "negative": ["en", 0], "latent_image": ["inv", 0], "start_at_step": 0,
                             "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    else:
        g.update({
            "nz": {"class_type": "DisableNoise", "inputs": {}},
            "gd": {"class_type": "CFGGuider", "inputs": {"model": ["bl", 0], "positive": ["ep", 0],
                                                          "negative": ["en", 0], "cfg": 2.0}},
            "ks": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "sg": {"class_type": "BasicScheduler", "inputs": {"model": ["bl", 0], "scheduler": "ddim_uniform",
                                                              "steps": STEPS, "denoise": 1.0}},
            "s": {"class_type": "SamplerCustomAdvanced",
                  "inputs": {"noise": ["nz", 0], "guider": ["gd", 0], "sampler": ["ks", 0], "sigmas": ["sg", 0],
                             "latent_image": ["inv", 0]}},
        })
    return g


@pytest.fixture
def graph_objects(tiny_model, tiny_clip, setup):
    mask = torch.zeros(FRAMES, 128, 128)
    mask[:, 40:104, 24:88] = 1.0
    OBJECTS.update({"model": tiny_model, "clip": tiny_clip, "lat": setup["latent"], "mask": mask,
                    "img": torch.rand(FRAMES, 128, 128, 3)})
    return mask


@pytest.mark.parametrize("sampler", ["ksa", "sca"])
def test_graph_user_mask_through_core_samplers(graph_objects, setup, sampler):
    run_prompt(_graph("user mask", sampler))
    out = CAPTURED["out"]["samples"]
    src = setup["latent"]["samples"]
    lm = lb.prepare_user_mask(graph_objects, FRAMES, 16, 16).unsqueeze(1).expand_as(out)
    assert torch.allclose(out[lm == 0], src[lm == 0], atol=1e-5)
    assert (out[lm == 1] - src[lm == 1]).abs().mean() > 0.05
    assert torch.equal(CAPTURED["mask"], graph_objects)  # the preview shows the mask that was used
    assert CAPTURED["overlay"].shape == (FRAMES, 128, 128, 3)
    CAPTURED[f"user_{sampler}"] = out


def test_graph_both_samplers_agree(graph_objects):
    for sampler in ("ksa", "sca"):
        run_prompt(_graph("user mask", sampler))
        CAPTURED[f"agree_{sampler}"] = CAPTURED["out"]["samples"]
    assert torch.allclose(CAPTURED["agree_ksa"], CAPTURED["agree_sca"], atol=1e-6)


def test_graph_cross_attention_mask_preview(graph_objects, setup):
    run_prompt(_graph("cross-attention", "ksa"))
    mask = CAPTURED["mask"]
    assert mask.shape == (FRAMES, 128, 128)
    cover = mask.flatten(1).mean(1)
    assert torch.all(cover > 0) and torch.all(cover < 1)
    out, src = CAPTURED["out"]["samples"], setup["latent"]["samples"]
    lm = mask[:, ::8, ::8].unsqueeze(1).expand_as(out)
    assert torch.allclose(out[lm == 0], src[lm == 0], atol=1e-5)


def test_graph_errors_name_the_fix(graph_objects):
    g = _graph("user mask", "ksa")
    g["s"]["inputs"]["steps"] = STEPS + 2
    with pytest.raises(GraphError, match=f"set the sampler's steps to {STEPS}"):
        run_prompt(g)
    g = _graph("user mask", "ksa")
    OBJECTS["mask"] = torch.ones(1, 100, 50)
    with pytest.raises(GraphError, match="aspect ratio"):
        run_prompt(g)


def test_composes_with_fatezero_temporal_attention_and_attention_blend(tiny_model, tiny_clip, setup):
    """Temporal self-attention on inversion and edit, FateZero's attention fusion, then the latent blend
    (union of a user box and the words' cross-attention): outside the mask the result is still the source,
    and the attention fusion still acts inside it."""
    from zsve.nodes.fatezero import AttentionBlend, AttentionStore, TemporalSelfAttentionPatch

    def temporal(m):
        return TemporalSelfAttentionPatch.execute(m, mode="middle", include_own_frame=False, min_channels=0).result[0]

    store = AttentionStore.execute(tiny_model, record_window=1.0, skip_full_res=False, memory_budget_gb=0.0).result[0]
    z_T, inv = glue.run_inversion(temporal(store), setup["latent"], setup["src_pos"], None, STEPS, 1.0,
                                  disable_pbar=True)
    s = dict(setup, z_T=z_T)
    fused = AttentionBlend.execute(temporal(tiny_model), inv, _pair(tiny_clip),
                                   mode="refine", cross_replace=0.8, cross_replace_words="", self_replace_start=0.0,
                                   self_replace_end=0.6, reweight="", blend_words="", blend_threshold=0.3,
                                   only_cond=True).result[0]
    box = torch.zeros(1, 128, 128)
    box[:, 32:96, 32:96] = 1.0
    kw = dict(mask_source="union", prompts=_pair(tiny_clip), words="green square", threshold=0.5, dilation=1,
              mask=box)
    m, state = blend_nodes.apply_latent_blend(fused, inv, **kw)[:2]
    out = _sample(m, s)
    lm = state.masks[STEPS - 1].unsqueeze(1).expand_as(out)
    src = setup["latent"]["samples"]
    assert 0 < float(state.masks[STEPS - 1].mean()) < 1
    assert torch.allclose(out[lm == 0], src[lm == 0], atol=1e-5)
    # without the attention fusion the edited region differs: both patches act
    plain, _ = blend_nodes.apply_latent_blend(temporal(tiny_model), inv, **kw)[:2]
    out_plain = _sample(plain, s)
    assert (out[lm == 1] - out_plain[lm == 1]).abs().mean() > 1e-3
    # the other order (blend first, then FateZero's fusion on top) keeps the background too
    m2, _ = blend_nodes.apply_latent_blend(temporal(tiny_model), inv, **kw)[:2]
    m2 = AttentionBlend.execute(m2, inv, _pair(tiny_clip), mode="refine",
                                cross_replace=0.8, cross_replace_words="", self_replace_start=0.0,
                                self_replace_end=0.6, reweight="", blend_words="", blend_threshold=0.3,
                                only_cond=True).result[0]
    out2 = _sample(m2, s)
    assert torch.allclose(out2[lm == 0], src[lm == 0], atol=1e-5)


def _two_stages(m, setup, seed):
    """KSamplerAdvanced over steps 0..2 (return_with_leftover_noise), then a second one from step 2 to the end."""
    import nodes

    ksa = nodes.KSamplerAdvanced()
    first = ksa.sample(m, "disable", seed, STEPS, 1.0, "ddim", "ddim_uniform", setup["pos"], setup["neg"],
                       setup["z_T"], 0, 2, "enable")[0]
    return ksa.sample(m, "disable", seed, STEPS, 1.0, "ddim", "ddim_uniform", setup["pos"], setup["neg"], first,
                      2, 10000, "disable")[0]["samples"]


def test_two_kSamplerAdvanced_stages_equal_one_run(tiny_model, tiny_clip, setup):
    """KSamplerAdvanced 0..2 (return_with_leftover_noise) then 2..end equals one run, and the mask record
    of the second stage continues the first's."""
    m, state = _patch(tiny_model, setup, mask_source="cross-attention", prompts=_pair(tiny_clip), words="green",
                      threshold=0.5, dilation=1)
    one = _sample(m, setup)
    masks_one = {k: v.clone() for k, v in state.masks.items()}
    assert torch.allclose(_two_stages(m, setup, seed=0), one, atol=1e-5)
    assert sorted(state.masks) == list(range(STEPS))
    assert all(torch.equal(state.masks[k], masks_one[k]) for k in masks_one)


# --- shipped workflows, executed headless ----------------------------------------------------------------


def _run_bld_workflow(name, io_dirs, tiny_model, tiny_clip, tiny_vae, blend_inputs=None, source_mask_inputs=None):
    from zsve_workflows import shipped_prompt

    prompt, by_type = shipped_prompt(name, (tiny_model, tiny_clip, tiny_vae), io_dirs / "in", frames=4)
    prompt[by_type["VideoDDIMInvert"]]["inputs"]["steps"] = STEPS
    prompt[by_type["KSamplerAdvanced"]]["inputs"]["steps"] = STEPS
    prompt[by_type["LatentBlendWithInversion"]]["inputs"].update(blend_inputs or {})
    if "SourceAttentionMask" in by_type:  # the random tiny UNet's flat attention would cover every frame
        prompt[by_type["SourceAttentionMask"]]["inputs"].update(source_mask_inputs or {})
    for key, (node, slot) in {"enc": ("VAEEncode", 0), "out": ("KSamplerAdvanced", 0),
                              "mask": ("LatentBlendMaskPreview", 0)}.items():
        prompt[f"cap_{key}"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [by_type[node], slot], "key": key}}
    run_prompt(prompt)
    saved = list((io_dirs / "out").rglob("*.mp4"))
    assert len(saved) == 1 and saved[0].name.startswith("bld_edit")
    return CAPTURED["enc"]["samples"], CAPTURED["out"]["samples"], CAPTURED["mask"]


def test_user_mask_workflow_runs_headless(io_dirs, tiny_model, tiny_clip, tiny_vae):
    from PIL import Image

    band = torch.zeros(64, 64)
    band[16:48] = 1.0  # edit a horizontal band of every frame
    Image.fromarray((band.numpy() * 255).astype("uint8")).convert("RGB").save(io_dirs / "in" / "mask.png")
    enc, out, mask = _run_bld_workflow("blended_latent_your_mask", io_dirs, tiny_model, tiny_clip, tiny_vae)
    assert torch.equal(mask, band.expand(4, 64, 64))
    outside = band[::8, ::8].expand_as(out[:, 0]).unsqueeze(1).expand_as(out) == 0
    assert torch.allclose(out[outside], enc[outside], atol=1e-5)
    assert (out[~outside] - enc[~outside]).abs().mean() > 1e-2


def test_attention_mask_workflow_runs_headless(io_dirs, tiny_model, tiny_clip, tiny_vae):
    # 64x64 frames give an 8x8 latent: the shipped settings (for 512x512) would cover it all
    # the old object's mask (Source Attention Mask, united) left empty here (threshold 1): the union is tested in
    # test_source_attention_mask_is_the_majority_of_the_recorded_steps_masks
    enc, out, mask = _run_bld_workflow("blended_latent_auto_mask", io_dirs, tiny_model, tiny_clip, tiny_vae,
                                       {"threshold": 0.7, "dilation": 1, "temporal_smoothing": 0}, {"threshold": 1.0})
    assert mask.shape == (4, 64, 64)
    outside = (mask[:, ::8, ::8] == 0).unsqueeze(1).expand_as(out)
    assert 0 < outside.float().mean() < 1
    assert torch.allclose(out[outside], enc[outside], atol=1e-5)


def test_non_first_order_samplers_are_refused(tiny_model, setup):
    """The edit contract (nodes/contract.py): only ComfyUI's deterministic first-order step (euler; its ddim is
    the same function) lands on the inversion trajectory; every other sampler is refused before sampling."""
    m, _ = _patch(tiny_model, setup, mask_source="user mask", mask=torch.zeros(1, 16, 16))
    _sample(m, setup, sampler="ddim")
    for sampler in ("dpmpp_2m", "euler_ancestral", "heun"):
        with pytest.raises(glue.ZSVEInputError, match=f"the sampler is '{sampler}'.*Set the sampler to 'ddim' or "
                           "'euler'"):
            _sample(m, setup, sampler=sampler)
    # dpm_2 makes KSampler drop the penultimate sigma of a longer schedule: refused as well
    with pytest.raises(glue.ZSVEInputError, match="the sampler is 'dpm_2'"):
        _sample(m, setup, sampler="dpm_2")


def test_context_windows_give_every_frame_its_mask(tiny_model, tiny_clip, setup):
    """With the pack's frame context windows (4 frames in windows of 2, overlap 1), every frame's mask is
    made from the windows that contain it, and the background is still the source."""
    from zsve.nodes.context import VideoContextWindows

    win = VideoContextWindows.execute(tiny_model, context_length=2, context_overlap=1,
                                      context_schedule="standard_static", context_stride=1, closed_loop=False,
                                      fuse_method="pyramid", key_frames="none").result[0]
    z_T, inv = glue.run_inversion(win, setup["latent"], setup["src_pos"], None, STEPS, 1.0, disable_pbar=True)
    m, state, _ = blend_nodes.apply_latent_blend(win, inv, mask_source="cross-attention", prompts=_pair(tiny_clip),
                                                 words="green square", threshold=0.5, dilation=1)
    windows = set()
    orig = lb.MapCollector.add

    def spy(self, call, probs):
        windows.add(None if call.frame_index is None else tuple(call.frame_index))
        orig(self, call, probs)

    lb.MapCollector.add = spy
    try:
        out = _sample(m, dict(setup, z_T=z_T))
    finally:
        lb.MapCollector.add = orig
    assert windows == {(0, 1), (1, 2), (2, 3)}  # the maps came window by window
    last = state.masks[STEPS - 1]
    cover = last.flatten(1).mean(1)
    assert torch.all(cover > 0) and torch.all(cover < 1), cover
    lm = last.unsqueeze(1).expand_as(out)
    src = setup["latent"]["samples"]
    assert torch.allclose(out[lm == 0], src[lm == 0], atol=1e-5)


def test_a_positive_that_is_not_the_pairs_edit_prompt_is_refused(tiny_model, tiny_clip, setup):
    """The mask words are located in the pair's edit prompt: a sampler sampling another positive is refused by
    the edit contract (it was a log warning before the prompt pair)."""
    m, _ = _patch(tiny_model, setup, mask_source="cross-attention", prompts=_pair(tiny_clip), words="green")
    _sample(m, setup, steps=STEPS)
    with pytest.raises(glue.ZSVEInputError, match="positive CONDITIONING is not the edit prompt of the prompt"):
        _sample(m, dict(setup, pos=setup["src_pos"]), steps=STEPS)


def test_attention_blend_mask_unites_the_phrases():
    """The blend mask of 'object, background' columns: phrase by phrase, the spread background phrase stays in the
    mask; summed (phrases=None) only the object's peak does."""
    from zsve.attention.latent_blend import attention_blend_mask

    maps = torch.zeros(1, 16, 2)
    maps[0, 0, 0] = 1.0  # the object's column peaks on pixel 0
    maps[0, 8:, 1] = 0.05  # the background's column is spread over the lower half
    one = attention_blend_mask([maps], [(4, 4)], (4, 4), 0.3)
    united = attention_blend_mask([maps], [(4, 4)], (4, 4), 0.3, phrases=[[0], [1]])
    assert one.flatten()[8:].sum() < 8 and united.flatten()[8:].eq(1).all()


def test_source_attention_mask_is_the_majority_of_the_recorded_steps_masks(tiny_model, tiny_clip, setup):
    """Source Attention Mask: per frame, 1 where the source words' mask (the pack's recipe on the cross-attention
    Attention Store recorded at the inversion, FateZero's layers) holds in at least half of the recorded steps of
    the window; recomputed here from the store step by step. Connected to Latent Blend ('union') it joins the
    edit-time mask."""
    from zsve.attention import align
    from zsve.attention.fatezero import mask_layers
    from zsve.attention.masks import cross_attention_mask
    from zsve.nodes.fatezero import RECORD_NAME, AttentionStore

    store_model = AttentionStore.execute(tiny_model, record_window=1.0, skip_full_res=False,
                                         memory_budget_gb=0.0).result[0]
    _, inv = glue.run_inversion(store_model, setup["latent"], setup["src_pos"], None, STEPS, 1.0, disable_pbar=True)
    pair = _pair(tiny_clip)
    words = SOURCE.split()[-1]
    h, w = inv.latent_shape[-2:]
    store = inv.records[RECORD_NAME]
    idx = align.word_indices(pair.source.plain, words, pair.tokenizer)
    layers = mask_layers(store, 4)
    n = STEPS
    first_half = [inv.timesteps[n - i] for i in range(int(0.5 * n))]  # edit step i runs at timestep t_(n-i)
    partial = None
    for th in (0.3, 0.6, 0.8, 0.9, 0.95, 0.98):  # the random tiny UNet's attention is nearly flat
        mask = blend_nodes.SourceAttentionMask.execute(inv, pair, words, th, 0.5).result[0]
        assert mask.shape == (FRAMES, 8 * h, 8 * w) and set(mask.unique().tolist()) <= {0.0, 1.0}
        votes = torch.stack([cross_attention_mask([store.cross_mean(t, lay) for lay in layers],
                                                  [store.layers[lay].hw for lay in layers], idx, (h, w), th)
                             for t in first_half if store.has_step(t)])
        expect = (votes.mean(0) >= 0.5).float()
        assert torch.equal(mask[:, ::8, ::8], expect), th
        if 0 < float(expect.mean()) < 1:
            partial = (mask, expect)
            break
    assert partial is not None
    mask, expect = partial
    m, state = _patch(tiny_model, setup, mask_source="union", prompts=pair, words=EDIT.split()[-1], threshold=0.3,
                      dilation=1, mask=mask)
    _sample(m, setup)
    assert bool((state.masks[0] >= expect).all())  # the union holds the old object's mask


def test_source_attention_mask_errors_say_what_to_do(tiny_clip, setup):
    pair = _pair(tiny_clip)
    with pytest.raises(glue.ZSVEInputError, match="Put Attention Store between the model and Video DDIM Invert"):
        blend_nodes.SourceAttentionMask.execute(setup["inv"], pair, SOURCE.split()[-1], 0.3, 0.5)


def test_source_attention_mask_says_when_the_window_reaches_past_the_recorded_steps(tiny_model, tiny_clip, setup):
    """A window longer than Attention Store's record_window cannot vote with the steps that were not recorded: the
    node's text says so and what to set."""
    from zsve.nodes.fatezero import AttentionStore

    store_model = AttentionStore.execute(tiny_model, record_window=0.4, skip_full_res=False,
                                         memory_budget_gb=0.0).result[0]
    _, inv = glue.run_inversion(store_model, setup["latent"], setup["src_pos"], None, STEPS, 1.0, disable_pbar=True)
    pair = _pair(tiny_clip)
    ok = blend_nodes.SourceAttentionMask.execute(inv, pair, SOURCE.split()[-1], 0.3, 0.4)
    assert "Warning" not in ok.ui["text"][0]
    out = blend_nodes.SourceAttentionMask.execute(inv, pair, SOURCE.split()[-1], 0.3, 1.0)
    assert "record_window to at least 1" in out.ui["text"][0]
    # commas alone name nothing (the mask would be the whole frame); a missing word names what to give
    with pytest.raises(glue.ZSVEInputError, match="'words' is empty"):
        blend_nodes.SourceAttentionMask.execute(inv, pair, " , ,", 0.3, 0.4)
    with pytest.raises(glue.ZSVEInputError, match="SourceAttentionMask: words: 'dog' is not a word of the source "
                       r"prompt .*: words name what to mask in the source video"):
        blend_nodes.SourceAttentionMask.execute(inv, pair, "dog", 0.3, 0.4)


# --- Fresh Noise Start (Blended Latent Diffusion's start inside a mask) --------------------------------------


def test_fresh_noise_start_is_the_source_plus_one_shared_noise_map_inside_the_mask():
    g = torch.Generator().manual_seed(3)
    x, x0 = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    m = torch.zeros(3, 1, 6, 6)
    m[:, :, 1:4, 2:5] = 1.0
    out = lb.fresh_noise_start(x, x0, m, 14.6, seed=7)
    assert torch.equal(out[(m == 0).expand_as(x)], x[(m == 0).expand_as(x)])  # outside: z_T, bit for bit
    eps = (out - x0) / 14.6
    inside = m.expand_as(x) == 1
    assert torch.allclose(eps[0][inside[0]], eps[1][inside[1]], atol=1e-5)  # one noise map for all frames
    ref = torch.randn((1, 4, 6, 6), generator=torch.Generator().manual_seed(7))  # the seed's unit noise
    assert torch.allclose(eps[inside], ref.expand_as(x)[inside], atol=1e-4)
    assert not torch.allclose(out, lb.fresh_noise_start(x, x0, m, 14.6, seed=8))
    lb.fresh_noise_start(x, x0, m, 1.0, seed=2**64 - 1)  # ComfyUI's largest seed is accepted


def _sample_seed(model, s, seed, latent=None):
    z = s["z_T"]["samples"] if latent is None else latent
    return comfy.sample.sample(model, torch.zeros_like(z), STEPS, 1.0, "ddim", "ddim_uniform", s["pos"], s["neg"], z,
                               start_step=0, last_step=10000, force_full_denoise=True, disable_noise=True, seed=seed,
                               disable_pbar=True)


def _box_mask():
    mask = torch.zeros(FRAMES, 128, 128)
    for f in range(FRAMES):
        mask[f, 16:72, 8 + 16 * f:56 + 16 * f] = 1.0  # a different box per frame, on latent-pixel boundaries
    return mask


def _fresh(model, s, mask):
    m, _ = blend_nodes.apply_fresh_noise_start(model, s["inv"], mask)
    return m


def test_fresh_noise_start_equals_sampling_from_the_fresh_start(tiny_model, setup):
    """The patched run from z_T equals the unpatched sampler run from the fresh start M * (x0 + sigma_max * eps) +
    (1 - M) * z_T: the sampler's latent stays z_T (the contract holds), only the first model call and its step see
    the fresh start."""
    s, inv = setup, setup["inv"]
    fresh = _box_mask()
    m = _fresh(tiny_model, s, fresh)
    out = _sample_seed(m, s, seed=5)
    lm = lb.prepare_user_mask(fresh, FRAMES, 16, 16).unsqueeze(1)
    start = lb.fresh_noise_start(inv.z_T, inv.latents[0], lm, float(inv.sigmas[-1]), 5)
    ref = _sample_seed(tiny_model, s, seed=5, latent=tiny_model.model.process_latent_out(start))
    assert torch.allclose(out, ref, atol=1e-4)
    plain = _sample_seed(tiny_model, s, seed=5)
    assert (out - plain).abs().amax(dim=(0, 1)).max() > 0.05  # the fresh noise changed the edit
    assert not torch.allclose(out, _sample_seed(m, s, seed=6), atol=1e-3)  # ... by the sampler's seed
    assert "zsve_fresh_noise" not in repr(tiny_model.wrappers)  # the input model is not modified


@pytest.mark.parametrize("fresh_first", [True, False])
def test_fresh_noise_start_composes_with_latent_blend_in_either_order(tiny_model, setup, fresh_first):
    """Either order of the two wrappers gives the blend of the step from the fresh start; outside the blend mask
    the result is the source."""
    s = setup
    box = _box_mask()
    if fresh_first:
        m, state = _patch(_fresh(tiny_model, s, box), s, mask_source="user mask", mask=box)
    else:
        m0, state = _patch(tiny_model, s, mask_source="user mask", mask=box)
        m = _fresh(m0, s, box)
    out = _sample_seed(m, s, seed=0)
    blend_only, _ = _patch(tiny_model, s, mask_source="user mask", mask=box)
    without = _sample_seed(blend_only, s, seed=0)
    lm = lb.prepare_user_mask(box, FRAMES, 16, 16).unsqueeze(1).expand_as(out)
    src = s["latent"]["samples"]
    assert torch.allclose(out[lm == 0], src[lm == 0], atol=1e-5)
    assert (out[lm == 1] - without[lm == 1]).abs().mean() > 0.05
    assert sorted(state.masks) == list(range(STEPS))
    other, _ = _patch(tiny_model, s, mask_source="user mask", mask=box)
    other = _fresh(other, s, box) if fresh_first else _patch(_fresh(tiny_model, s, box), s, mask_source="user mask",
                                                               mask=box)[0]
    assert torch.allclose(out, _sample_seed(other, s, seed=0), atol=1e-4)  # the other order: the same edit


def test_fresh_noise_start_with_a_late_blend_window_still_lands_on_the_source(tiny_model, setup):
    s = setup
    box = _box_mask()
    m, state = _patch(_fresh(tiny_model, s, box), s, mask_source="user mask", mask=box, start=0.4)
    out = _sample_seed(m, s, seed=0)
    m0, _ = _patch(tiny_model, s, mask_source="user mask", mask=box, start=0.4)
    lm = lb.prepare_user_mask(box, FRAMES, 16, 16).unsqueeze(1).expand_as(out)
    src = s["latent"]["samples"]
    assert sorted(state.masks) == [2, 3, 4]
    assert torch.allclose(out[lm == 0], src[lm == 0], atol=1e-5)
    assert (out[lm == 1] - _sample_seed(m0, s, seed=0)[lm == 1]).abs().mean() > 0.05


def test_fresh_noise_start_empty_mask_is_the_run_from_z_T_and_says_so(tiny_model, setup):
    m, text = blend_nodes.apply_fresh_noise_start(tiny_model, setup["inv"], torch.zeros(1, 128, 128))
    assert "covers no latent pixel" in text
    assert torch.allclose(_sample_seed(m, setup, seed=0), _sample_seed(tiny_model, setup, seed=0), atol=1e-5)


def test_fresh_noise_start_two_kSamplerAdvanced_stages_equal_one_run(tiny_model, setup):
    m = _fresh(tiny_model, setup, _box_mask())
    one = _sample_seed(m, setup, seed=3)
    assert torch.allclose(_two_stages(m, setup, seed=3), one, atol=1e-5)


def test_fresh_noise_start_refuses_runs_off_the_contract(tiny_model, setup):
    m = _fresh(tiny_model, setup, _box_mask())
    with pytest.raises(glue.ZSVEInputError, match="FreshNoiseStart.*set the sampler's steps to 5"):
        _sample(m, setup, steps=4)
    with pytest.raises(glue.ZSVEInputError, match="FreshNoiseStart.*adds noise"):
        comfy.sample.sample(m, torch.randn_like(setup["z_T"]["samples"]), STEPS, 1.0, "ddim", "ddim_uniform",
                            setup["pos"], setup["neg"], setup["z_T"]["samples"], disable_noise=False, seed=0,
                            disable_pbar=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask": torch.ones(3, 128, 128)}, "FreshNoiseStart: mask: the mask has 3 frames but the video has 4"),
        ({"mask": torch.ones(1, 128, 64)}, "FreshNoiseStart: mask: .*aspect ratio"),
        ({"mask": torch.full((1, 128, 128), float("nan"))}, "FreshNoiseStart.*mask"),
        ({"mask": "red circle"}, "must be a MASK"),
        ({"inversion": "nope"}, "VideoDDIMInvert"),
    ],
)
def test_bad_fresh_noise_start_inputs_say_what_to_change(tiny_model, setup, kwargs, match):
    args = {"inversion": setup["inv"], "mask": torch.ones(1, 16, 16)}
    args.update(kwargs)
    with pytest.raises(glue.ZSVEInputError, match=match):
        blend_nodes.apply_fresh_noise_start(tiny_model, **args)
