"""Cross-Attention Reweight (nodes/reweight.py, attention/p2p.py CrossAttentionReweight): Prompt-to-Prompt's
reweighting of edit words for the methods without a cross-attention controller of their own there (InFusion before
its fusion phase, Blended Latent Diffusion): which calls and rows it touches, errors that say what to change, and a
real sampling on the tiny model where only the first steps change."""

from __future__ import annotations

import comfy.sample
import pytest
import torch

import zsve.nodes._comfy as glue
from zsve.attention.p2p import CrossAttentionReweight as Proc
from zsve.attention.p2p import equalizer
from zsve.attention.processor import AttnCall
from zsve.nodes._attn_patch import PROCESSORS_KEY
from zsve.nodes.reweight import CrossAttentionReweight
from zsve_harness import encode_text, prompt_pair

SRC = "a red circle and a green square"
EDIT = "a blue circle and a green square"
STEPS = 6


def _call(step, kind="cross", cou=(1, 0), total=10):
    return AttnCall(kind=kind, layer="input_1_1", hw=(2, 2), frames=2, cond_or_uncond=list(cou), sigma=1.0,
                    timestep=500, heads=2, step_index=step, total_steps=total)


def test_processor_weighs_the_conditional_rows_of_cross_attention_in_the_first_steps_only():
    p = Proc(equalizer([([2], 4.0), ([3, 4], 0.5)]), end=0.5)
    assert p.active(_call(0)) and p.active(_call(4)) and not p.active(_call(5))  # steps i < int(0.5 * 10)
    assert not p.active(_call(0, kind="self")) and not p.active(_call(0, cou=(1,)))  # the unconditional half alone
    probs = torch.rand(4, 2, 4, 77, generator=torch.Generator().manual_seed(0))  # [chunks * frames, heads, Nq, T]
    out = p(_call(0), probs)
    assert torch.equal(out[:2], probs[:2])  # chunk kind 1 (unconditional) untouched
    assert torch.allclose(out[2:, ..., 2], 4 * probs[2:, ..., 2])
    assert torch.allclose(out[2:, ..., 3:5], 0.5 * probs[2:, ..., 3:5])
    keep = [j for j in range(77) if j not in (2, 3, 4)]
    assert torch.equal(out[2:, ..., keep], probs[2:, ..., keep])  # no renormalising (P2P's AttentionReweight)
    assert p.calls == 1
    long = torch.rand(2, 2, 4, 154)  # a context longer than 77 tokens: the tokens past the factors keep weight 1
    assert torch.equal(p(_call(0, cou=(0,)), long)[..., 77:], long[..., 77:])
    # in the Video-P2P Guider's two-branch batch (rows [source frames, target frames] per chunk) only the target's
    two = AttnCall(kind="cross", layer="input_1_1", hw=(2, 2), frames=4, cond_or_uncond=[0], sigma=1.0, timestep=500,
                   heads=2, step_index=0, total_steps=10, extra={"zsve_branches": 2})
    p4 = probs[:4]
    got = p(two, p4)
    assert torch.equal(got[:2], p4[:2]) and torch.allclose(got[2:, ..., 2], 4 * p4[2:, ..., 2])
    with pytest.raises(ValueError, match="step is unknown"):
        p.active(_call(None))
    with pytest.raises(ValueError, match="end must be in"):
        Proc(equalizer([([2], 4.0)]), end=0.0)


def _sample(model, latent, positive, negative, last_step):
    noise = torch.zeros_like(latent)
    return comfy.sample.sample(model, noise, STEPS, 5.0, "ddim", "ddim_uniform", positive, negative, latent,
                               start_step=0, last_step=last_step, force_full_denoise=False, disable_noise=True,
                               seed=0, disable_pbar=True)


def test_node_reweights_the_first_steps_of_a_real_sampling_and_says_so(tiny_model, tiny_clip):
    latent = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pos, neg = encode_text(tiny_clip, EDIT), encode_text(tiny_clip, "")
    out = CrossAttentionReweight.execute(tiny_model, prompt_pair(tiny_clip, SRC, EDIT), "blue:4", 0.5)
    m = out.result[0]
    assert m is not tiny_model and not tiny_model.model_options.get("transformer_options", {}).get(PROCESSORS_KEY)
    assert "reweighting 'blue:4'" in out.ui["text"][0] and "0.5" in out.ui["text"][0]
    proc = [p for p in m.model_options["transformer_options"][PROCESSORS_KEY] if isinstance(p, Proc)]
    assert len(proc) == 1
    cross_layers = sum(1 for name, _ in tiny_model.model.diffusion_model.named_modules() if name.endswith("attn2"))
    plain, ours = (_sample(mm, latent, pos, neg, last_step=STEPS) for mm in (tiny_model, m))
    assert proc[0].calls == 3 * cross_layers  # steps 0-2 of the 6 the sampler runs, every cross layer, once per call
    assert (ours - plain).abs().mean() > 1e-4
    # the window is a share of the steps the sampler runs (its sigmas): a sampler run of the first 2 steps only
    # (KSamplerAdvanced's end_at_step) reweights its first int(0.5 * 2) = 1
    _sample(m, latent, pos, neg, last_step=2)
    assert proc[0].calls == 4 * cross_layers
    m1 = CrossAttentionReweight.execute(tiny_model, prompt_pair(tiny_clip, SRC, EDIT), "blue:1", 0.5).result[0]
    d1 = (_sample(m1, latent, pos, neg, last_step=STEPS) - plain).abs()  # x1: the explicit path's rounding only
    assert d1.max() < 1e-3 and d1.mean() < 0.01 * (ours - plain).abs().mean()


@pytest.mark.parametrize("reweight, end, match", [
    ("", 0.5, "'reweight' is empty"),
    ("red:4", 0.5, "CrossAttentionReweight: reweight: 'red' is not a word of the edit prompt"),
    ("blue:x", 0.5, "reweight: 'x' is not a number"),
    ("blue", 0.5, "is not 'word:value'"),
    ("blue:4", 0.0, "'end' must be in"),
])
def test_node_errors_say_what_to_change(tiny_model, tiny_clip, reweight, end, match):
    with pytest.raises(glue.ZSVEInputError, match=match):
        CrossAttentionReweight.execute(tiny_model, prompt_pair(tiny_clip, SRC, EDIT), reweight, end)
