"""VideoDDIMInvert: exact DDIM inversion on ComfyUI's ddim_uniform sigmas, through the real ComfyUI."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import nodes
import pytest
import torch
from comfy.ldm.modules.diffusionmodules.util import make_beta_schedule

import zsve.nodes._comfy as glue
from zsve.attention.ddim import Inversion, ddim_inversion_step_closed_form
from zsve_harness import OBJECTS, encode_text, make_tiny_model, run_prompt

PROMPT = "a red circle on blue stripes"


def _latent(frames=4, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(frames, 4, h, w, generator=g)}


def _reconstruct(model, z_T, positive, negative, steps, cfg=1.0, sampler="ddim"):
    """What KSamplerAdvanced(add_noise=disable, ddim_uniform, same steps) does, via ComfyUI's own code."""
    noise = torch.zeros_like(z_T["samples"])
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "ddim_uniform", positive, negative,
                               z_T["samples"], start_step=0, last_step=10000, force_full_denoise=True,
                               disable_noise=True, seed=0, disable_pbar=True)


def _naive_unsample(model, latent, positive, negative, steps, sampler="euler"):
    """The in-tree idiom: FlipSigmas (leading 0 -> 1e-4) + euler + no noise, then sample back."""
    ms = model.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps).flip(0).clone()
    sig[0] = 1e-4
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(1.0)
    x = latent["samples"]
    z = guider.sample(torch.zeros_like(x), x, comfy.samplers.sampler_object(sampler), sig, disable_pbar=True, seed=0)
    return _reconstruct(model, {"samples": z}, positive, negative, steps)


@pytest.fixture(scope="module")
def conds(tiny_clip):
    return encode_text(tiny_clip, PROMPT), encode_text(tiny_clip, "")


def test_inversion_sigmas_are_reversed_ddim_uniform(tiny_model):
    ms = tiny_model.get_model_object("model_sampling")
    for steps in (1, 10, 50):
        inv = glue.inversion_sigmas(ms, steps)
        ref = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps)
        assert torch.equal(inv, ref.flip(0).float())
        assert inv[0] == 0 and torch.all(inv[1:] > inv[:-1])


def test_step_matches_closed_form_ddim_inversion(tiny_model, conds):
    """Each trajectory step equals the reference `next_step` in the VP parameterisation, with the UNet's
    eps evaluated on the current latent at the next timestep and alphas from the model's own beta schedule."""
    positive, negative = conds
    latent = _latent(frames=2, seed=1)
    steps = 10
    _, inv = glue.run_inversion(tiny_model, latent, positive, None, steps, 1.0, disable_pbar=True)
    settings = tiny_model.model.model_config.sampling_settings
    betas = make_beta_schedule(settings.get("beta_schedule", "linear"), 1000,
                               linear_start=settings.get("linear_start", 0.00085),
                               linear_end=settings.get("linear_end", 0.012))
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    unet = tiny_model.model.diffusion_model
    context = positive[0][0].expand(2, -1, -1)
    assert inv.timesteps[0] == -1 and inv.timesteps[1] == 1
    for k in range(steps):
        t_cur, t_next = inv.timesteps[k], inv.timesteps[k + 1]
        a_cur = 1.0 if t_cur < 0 else float(alphas_cumprod[t_cur])
        a_next = float(alphas_cumprod[t_next])
        x_vp = inv.latents[k].double() * a_cur**0.5
        with torch.no_grad():
            eps = unet(x_vp.float(), torch.full((2,), float(t_next)), context=context).double()
        expected_vp = ddim_inversion_step_closed_form(x_vp, eps, a_cur, a_next)
        got_vp = inv.latents[k + 1].double() * a_next**0.5
        err = (got_vp - expected_vp).abs().max().item()
        assert err < 2e-4 * max(1.0, expected_vp.abs().max().item()), (k, err)


def test_invert_then_reconstruct_returns_the_input(tiny_model, conds):
    """On a random-weight tiny UNet the DDIM round trip is limited by how much eps changes between
    neighbouring latents (not by the timestep labels, which random weights barely use), so here we
    bound the error and require it not to be worse than the naive unsampling; the label advantage is
    shown with an analytic denoiser below."""
    positive, negative = conds
    latent = _latent(frames=4, seed=2)
    steps = 20
    z_T, inv = glue.run_inversion(tiny_model, latent, positive, None, steps, 1.0, disable_pbar=True)
    rec = _reconstruct(tiny_model, z_T, positive, negative, steps)
    naive = _naive_unsample(tiny_model, latent, positive, negative, steps)
    x = latent["samples"]
    err = (rec - x).abs().mean().item()
    err_naive = (naive - x).abs().mean().item()
    print(f"\ntiny UNet reconstruction mean abs error: DDIM inversion {err:.3e}, FlipSigmas+euler {err_naive:.3e}")
    assert err <= 1.01 * err_naive
    assert err < 0.08 * x.abs().mean().item()
    # The trajectory starts at the input (in the model's internal latent space) and ends at z_T.
    fmt = tiny_model.get_model_object("latent_format")
    assert torch.allclose(inv.latents[0], fmt.process_in(x))
    assert torch.allclose(fmt.process_out(inv.z_T), z_T["samples"], atol=1e-6)


def test_inversion_is_the_mirror_of_comfy_ddim_sampling_analytic_denoiser(tiny_model):
    """With a denoiser whose eps depends on the noise level (the exact denoiser of Gaussian data), the
    inversion evaluated at the next sigma on ddim_uniform sigmas reconstructs through ComfyUI's own Euler
    (= DDIM) sampler far better than the FlipSigmas + euler unsampling idiom."""
    from comfy.k_diffusion.sampling import sample_euler

    from zsve.attention.ddim import sample_ddim_inversion

    s2 = 0.5**2

    def denoiser(x, sigma, **kw):
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x * s2 / (s2 + sig**2)

    ms = tiny_model.get_model_object("model_sampling")
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    for steps in (10, 50):
        sig_inv = glue.inversion_sigmas(ms, steps)
        sig_smp = sig_inv.flip(0)
        z = sample_ddim_inversion(denoiser, x0, sig_inv, disable=True)
        rec = sample_euler(denoiser, z, sig_smp, disable=True)
        naive_sig = sig_inv.clone()
        naive_sig[0] = 1e-4
        z_naive = sample_euler(denoiser, x0, naive_sig, disable=True)
        rec_naive = sample_euler(denoiser, z_naive, sig_smp, disable=True)
        err = (rec - x0).abs().mean().item()
        err_naive = (rec_naive - x0).abs().mean().item()
        print(f"\nanalytic denoiser, {steps} steps: DDIM inversion {err:.3e}, FlipSigmas+euler {err_naive:.3e}")
        assert err < 0.6 * err_naive


def test_v_prediction_model_inverts_too(conds):
    positive, negative = conds
    model = make_tiny_model(seed=3, prediction="v")
    latent = _latent(frames=2, seed=3)
    z_T, _ = glue.run_inversion(model, latent, positive, None, 20, 1.0, disable_pbar=True)
    rec = _reconstruct(model, z_T, positive, negative, 20)
    assert (rec - latent["samples"]).abs().mean().item() < 0.05 * latent["samples"].abs().mean().item()


@pytest.mark.parametrize("frames,h,w", [(1, 16, 16), (16, 8, 8), (3, 13, 11)])
def test_frame_counts_and_odd_sizes(tiny_model, conds, frames, h, w):
    positive, negative = conds
    latent = _latent(frames=frames, h=h, w=w, seed=4)
    z_T, inv = glue.run_inversion(tiny_model, latent, positive, None, 8, 1.0, disable_pbar=True)
    assert z_T["samples"].shape == latent["samples"].shape
    assert inv.frames == frames and len(inv.latents) == inv.steps + 1
    rec = _reconstruct(tiny_model, z_T, positive, negative, 8)
    assert (rec - latent["samples"]).abs().mean().item() < 0.08 * latent["samples"].abs().mean().item()


def test_trajectory_on_cpu_and_size_reported(tiny_model, conds):
    positive, _ = conds
    latent = _latent(frames=3, seed=5)
    _, inv = glue.run_inversion(tiny_model, latent, positive, None, 10, 1.0, disable_pbar=True)
    assert all(t.device.type == "cpu" for t in inv.latents)
    per = latent["samples"].numel() * 4
    assert inv.nbytes >= 11 * per and inv.nbytes < 11 * per + 1024
    assert "MiB" in inv.summary() and "10 steps" in inv.summary()
    # clone()/deepcopy of a model that carries it never copies the trajectory
    import copy

    assert copy.deepcopy(inv) is inv
    assert inv.latent_at_sigma(float(inv.sigmas[3])) is inv.latents[3]
    with pytest.raises(KeyError, match="same steps"):
        inv.latent_at_sigma(123.0)


def test_inputs_are_not_mutated(tiny_model, conds):
    positive, _ = conds
    latent = _latent(frames=2, seed=6)
    before = latent["samples"].clone()
    opts_before = repr(tiny_model.model_options)
    glue.run_inversion(tiny_model, latent, positive, None, 5, 1.0, disable_pbar=True)
    assert torch.equal(latent["samples"], before)
    assert repr(tiny_model.model_options) == opts_before


def test_interrupt_is_honoured(tiny_model, conds):
    positive, _ = conds
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            glue.run_inversion(tiny_model, _latent(frames=1), positive, None, 5, 1.0, disable_pbar=True)
    finally:
        comfy.model_management.interrupt_current_processing(False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"latent": {"samples": torch.zeros(0, 4, 8, 8)}}, "no frames"),
        ({"steps": 0}, "at least 1"),
        ({"steps": 1001}, "at most 1000"),
        ({"model": "not a model"}, "not a diffusion MODEL"),
        ({"latent": {"samples": torch.zeros(1, 4, 2, 8, 8)}}, "frames as the batch"),
        ({"cfg": 7.5}, "needs a 'negative'"),
    ],
)
def test_bad_input_says_what_to_change(tiny_model, conds, kwargs, match):
    positive, _ = conds
    args = {"model": tiny_model, "latent": _latent(frames=1), "positive": positive, "negative": None,
            "steps": 5, "cfg": 1.0}
    args.update(kwargs)
    with pytest.raises(glue.ZSVEInputError, match=match):
        glue.run_inversion(**args, disable_pbar=True)


def _graph_nodes(key_model, key_pos, key_neg, latent_key, steps):
    return {
        "m": {"class_type": "ZSVETestProvide", "inputs": {"key": key_model}},
        "p": {"class_type": "ZSVETestProvide", "inputs": {"key": key_pos}},
        "n": {"class_type": "ZSVETestProvide", "inputs": {"key": key_neg}},
        "l": {"class_type": "ZSVETestProvide", "inputs": {"key": latent_key}},
        "inv": {"class_type": "VideoDDIMInvert",
                "inputs": {"model": ["m", 0], "latent": ["l", 0], "positive": ["p", 0], "steps": steps, "cfg": 1.0}},
        "rec": {"class_type": "KSamplerAdvanced",
                "inputs": {"model": ["m", 0], "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": 1.0,
                           "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": ["p", 0],
                           "negative": ["n", 0], "latent_image": ["inv", 0], "start_at_step": 0,
                           "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
    }


def test_graph_invert_reconstruct_and_sampler_sigmas_nodes(tiny_model, conds):
    """Through ComfyUI's executor: VideoDDIMInvert -> KSamplerAdvanced reconstructs; the SAMPLER+SIGMAS
    pair in SamplerCustomAdvanced gives the same z_T; a second run is served from the cache."""
    from zsve_harness import CAPTURED

    positive, negative = conds
    latent = _latent(frames=2, seed=7)
    OBJECTS.update({"model": tiny_model, "pos": positive, "neg": negative, "lat": latent})
    g = _graph_nodes("model", "pos", "neg", "lat", 8)
    g.update({
        "c1": {"class_type": "ZSVETestCapture", "inputs": {"value": ["rec", 0], "key": "rec"}},
        "c2": {"class_type": "ZSVETestCapture", "inputs": {"value": ["inv", 0], "key": "zT"}},
        "c3": {"class_type": "ZSVETestCapture", "inputs": {"value": ["inv", 1], "key": "inversion"}},
        "smp": {"class_type": "DDIMInversionSampler", "inputs": {}},
        "sig": {"class_type": "DDIMInversionSigmas", "inputs": {"model": ["m", 0], "steps": 8}},
        "nz": {"class_type": "DisableNoise", "inputs": {}},
        "gd": {"class_type": "BasicGuider", "inputs": {"model": ["m", 0], "conditioning": ["p", 0]}},
        "sca": {"class_type": "SamplerCustomAdvanced",
                "inputs": {"noise": ["nz", 0], "guider": ["gd", 0], "sampler": ["smp", 0], "sigmas": ["sig", 0],
                           "latent_image": ["l", 0]}},
        "c4": {"class_type": "ZSVETestCapture", "inputs": {"value": ["sca", 0], "key": "zT_custom"}},
    })
    first = run_prompt(g)
    assert "inv" in first["executed"]
    assert isinstance(CAPTURED["inversion"], Inversion)
    x = latent["samples"]
    assert (CAPTURED["rec"]["samples"] - x).abs().mean() < 0.08 * x.abs().mean()
    assert torch.allclose(CAPTURED["zT_custom"]["samples"], CAPTURED["zT"]["samples"], atol=1e-5)
    # change only the reconstruction side: the inversion is served from ComfyUI's cache
    g["rec"]["inputs"]["sampler_name"] = "euler"
    second = run_prompt(g)
    assert "inv" not in second["executed"] and "rec" in second["executed"]


def test_node_rejects_steps_out_of_range_at_validation(tiny_model, conds):
    from zsve_harness import GraphError

    positive, negative = conds
    OBJECTS.update({"model": tiny_model, "pos": positive, "neg": negative, "lat": _latent(frames=1)})
    g = _graph_nodes("model", "pos", "neg", "lat", 0)
    g["c"] = {"class_type": "ZSVETestCapture", "inputs": {"value": ["rec", 0], "key": "x"}}
    with pytest.raises(GraphError, match="steps"):
        run_prompt(g)
    assert "VideoDDIMInvert" in nodes.NODE_CLASS_MAPPINGS
