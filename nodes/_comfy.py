"""Shared ComfyUI glue: socket types, schedules, inversion runner, validation with actionable errors.

The algorithms live in ../attention; this module only translates between them and ComfyUI objects.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..attention.ddim import Inversion, sample_ddim_inversion
from ..attention.store import format_bytes  # noqa: F401  (re-exported for the nodes)

CATEGORY = "Zero-Shot Video Edit"

# Custom socket types, prefixed with the pack's prefix.
InversionType = io.Custom("ZSVE_INVERSION")

RECORD_SPECS_KEY = "zsve_record_specs"
RECORDERS_KEY = "zsve_recorders"


class ZSVEInputError(ValueError):
    """Bad input, with a message that says what to change."""


def nonfinite_frames(t: torch.Tensor) -> list[int]:
    """Indices along dim 0 that hold NaN or infinity."""
    if t.numel() == 0 or bool(torch.isfinite(t).all()):
        return []
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    return [int(i) for i in bad.nonzero().flatten()]


def check_finite(t: torch.Tensor, node: str, what: str, fix: str) -> None:
    """Refuse NaN / infinity in a frame batch (`t` [frames, ...]), naming the frames (0-based)."""
    bad = nonfinite_frames(t)
    if bad:
        shown = ", ".join(str(i) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise ZSVEInputError(f"{node}: {what} has NaN or infinite values in frame(s) {shown} (0-based, of "
                             f"{t.shape[0]}). {fix}")


def check_choice(node: str, name: str, value, options) -> None:
    """Refuse a string input that is not one of its options (the Python API bypasses the frontend's combo)."""
    opts = list(options)
    if value not in opts:
        raise ZSVEInputError(f"{node}: '{name}' must be one of {opts}, got {value!r}.")


def unet_config(model) -> dict:
    """The UNet config of a MODEL (comfy.supported_models_base.BASE.unet_config): what attention/arch.py reads
    the layout and the architecture-dependent defaults from. {} when the model has none."""
    cfg = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None)
    return dict(cfg) if isinstance(cfg, dict) else {}


SUPPORTED_MODELS = ("SD1.x, SD2.x or SDXL-family checkpoints (their fine-tunes and LoRAs) with the standard "
                    "1000-step DDPM schedule, eps- or v-prediction")


def check_diffusion_model(model, node: str):
    """The model's ModelSampling, after refusing what DDIM inversion cannot invert (before any UNet call)."""
    if not isinstance(model, comfy.model_patcher.ModelPatcher) or not hasattr(model.model, "model_sampling"):
        raise ZSVEInputError(
            f"{node}: the 'model' input is not a diffusion MODEL (got {type(model).__name__}). Connect the MODEL "
            "output of a checkpoint loader (e.g. Load Checkpoint) for an SD1.5, SD2.x or SDXL-family model."
        )
    ms = model.get_model_object("model_sampling")
    cfg = unet_config(model)
    if "model_channels" not in cfg or "channel_mult" not in cfg:
        raise ZSVEInputError(
            f"{node}: this model is not a UNet of the Stable Diffusion family (its config has no UNet levels: "
            f"{type(model.model).__name__}); the pack's methods act on the UNet's attention and decoder blocks. "
            f"Use {SUPPORTED_MODELS}."
        )
    msl = comfy.model_sampling
    if isinstance(ms, (msl.ModelSamplingContinuousEDM, msl.ModelSamplingDiscreteEDM, msl.EDM)):
        raise ZSVEInputError(
            f"{node}: this is an EDM model (e.g. Playground v2.5, an EDM v-prediction checkpoint, or a Model Sampling "
            "Continuous EDM / Discrete EDM node on the model): it is conditioned on continuous noise levels, not on "
            "the 1000 discrete training timesteps of the DDPM schedule. DDIM inversion walks those timesteps backwards "
            "and the edit recalls each step's inversion by its timestep, so an EDM model cannot be inverted and "
            "edited exactly. Use " + SUPPORTED_MODELS + ", and remove any Model Sampling node that switches the model "
            "to EDM."
        )
    if isinstance(ms, (msl.ModelSamplingDiscreteFlow, msl.ModelSamplingFlux, msl.CONST)):
        raise ZSVEInputError(
            f"{node}: this model samples by flow matching (e.g. a Model Sampling SD3/Flux/AuraFlow node on it): "
            "DDIM inversion needs the discrete DDPM schedule the model was trained with. Remove that node; use "
            + SUPPORTED_MODELS + "."
        )
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(ms, comfy.model_sampling.EPS):
        raise ZSVEInputError(
            f"{node}: DDIM inversion needs a discrete-timestep eps- or v-prediction model; this model's noise "
            f"schedule ({type(ms).__name__}) is another kind. Use {SUPPORTED_MODELS}."
        )
    return ms


def check_latent(latent, node: str) -> torch.Tensor:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ZSVEInputError(f"{node}: 'latent' must be a LATENT (e.g. from VAE Encode of the video frames).")
    samples = latent["samples"]
    if not torch.is_tensor(samples) or samples.numel() == 0 or (samples.ndim >= 1 and samples.shape[0] == 0):
        raise ZSVEInputError(
            f"{node}: the LATENT has no frames (an empty video: 0 frames reached VAE Encode). Check the video "
            "loader: the file may be missing, empty or unreadable, or frame_load_cap / skip_first_frames leave "
            "no frame."
        )
    if samples.ndim != 4:
        raise ZSVEInputError(
            f"{node}: expected image latents [frames, channels, height, width] with the frames as the batch, got "
            f"shape {list(samples.shape)}. Encode the frames with VAE Encode (one image per frame)."
        )
    if samples.shape[0] == 0:
        raise ZSVEInputError(
            f"{node}: the LATENT has no frames (batch size 0). Check the video loader: it produced no frames."
        )
    check_finite(samples, node, "the LATENT", "Check the video frames and the VAE (a frame of NaN/inf pixels, or "
                 "an fp16 VAE overflowing: try VAE Decode/Encode in fp32).")
    return samples


def inversion_sigmas(model_sampling, steps: int, node: str = "VideoDDIMInvert") -> torch.Tensor:
    """Ascending sigmas [0, s(t=1), ..., s(t_max)]: the reverse of the `ddim_uniform` schedule."""
    n_train = len(model_sampling.sigmas)
    if steps < 1:
        raise ZSVEInputError(f"{node}: steps must be at least 1 (got {steps}).")
    if steps > n_train:
        raise ZSVEInputError(
            f"{node}: steps={steps} is more than the model's {n_train} training timesteps; use at most {n_train} "
            "(50 is the papers' default)."
        )
    sig = comfy.samplers.calculate_sigmas(model_sampling, "ddim_uniform", steps)
    return sig.flip(0).to(torch.float32).cpu().clone()


def timestep_of(model_sampling, sigma) -> int:
    return int(model_sampling.timestep(torch.as_tensor(sigma, dtype=torch.float32).reshape(1)).item())


def _pooled(conditioning):
    """The pooled text embedding of a one-entry CONDITIONING (SDXL), CPU float32, or None."""
    p = conditioning[0][1].get("pooled_output") if len(conditioning) == 1 else None
    return p.detach().float().cpu() if torch.is_tensor(p) else None


def attention_setup(model) -> dict:
    """What makes a model's attention calls what they are, besides its weights and processors: the pack's
    Temporal Self-Attention patches (mode, own frame, min_channels) and the frame context windows (Video Context
    Windows' handler: schedule, length, overlap, stride, loop, key frames; not the fuse method, which only
    combines window results). The edit must use the inversion's (Attention Blend compares them)."""
    to = model.model_options.get("transformer_options", {})
    temporal = tuple((p.mode, bool(p.include_self), int(p.min_channels))
                     for p in (to.get("patches") or {}).get("attn1_patch", []) if getattr(p, "is_zsve_temporal", False))
    h = model.model_options.get("context_handler")
    windows = None
    if h is not None:
        sched = getattr(h, "context_schedule", None)
        windows = (type(h).__name__, getattr(sched, "name", str(sched)), getattr(h, "context_length", None),
                   getattr(h, "context_overlap", None), getattr(h, "context_stride", None),
                   getattr(h, "closed_loop", None), tuple(getattr(h, "key_frames", ()) or ()))
    return {"temporal": temporal, "windows": windows}


def describe_setup(setup: dict) -> str:
    t = ", ".join(f"{m}{' + own frame' if own else ''} (min_channels {c})" for m, own, c in setup["temporal"]) \
        or "none (per-frame)"
    w = setup["windows"]
    ws = "none" if w is None else f"length {w[2]}, overlap {w[3]}, schedule {w[1]}, stride {w[4]}, key frames " \
        f"{', '.join(w[6]) or 'none'}"
    return f"Temporal Self-Attention: {t}; Video Context Windows: {ws}"


def run_inversion(model, latent: dict, positive, negative, steps: int, cfg: float, node: str = "VideoDDIMInvert",
                  disable_pbar: bool = False) -> tuple[dict, Inversion]:
    """Invert the frames of `latent` with DDIM through ComfyUI's CFGGuider, so that every model patch,
    wrapper and ControlNet on the conditioning applies during inversion exactly as during sampling."""
    ms = check_diffusion_model(model, node)
    samples = check_latent(latent, node)
    if positive is None or len(positive) == 0:
        raise ZSVEInputError(f"{node}: connect the source prompt's CONDITIONING to 'positive'.")
    if cfg != 1.0 and negative is None:
        raise ZSVEInputError(
            f"{node}: inversion guidance {cfg:g} needs a 'negative' CONDITIONING (the papers invert with guidance 1, "
            "which needs none)."
        )
    for what, conds in (("positive", positive), ("negative", negative or [])):
        for c in conds:
            if torch.is_tensor(c[0]) and not bool(torch.isfinite(c[0]).all()):
                raise ZSVEInputError(f"{node}: the '{what}' CONDITIONING has NaN or infinite values; re-encode the "
                                     "prompt with CLIP Text Encode.")
    sigmas = inversion_sigmas(ms, steps, node)
    samples = comfy.sample.fix_empty_latent_channels(model, samples)

    m = model.clone()
    specs = dict(m.model_options.get("transformer_options", {}).get(RECORD_SPECS_KEY, {}))
    recorders = {name: spec.new_recorder() for name, spec in specs.items()}
    if recorders:
        m.model_options.setdefault("transformer_options", {})[RECORDERS_KEY] = recorders

    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(positive, negative if negative is not None else positive)
    guider.set_cfg(cfg)

    trajectory: list = []
    sampler = comfy.samplers.KSAMPLER(
        sample_ddim_inversion,
        extra_options={
            "trajectory": trajectory,
            "interrupt": comfy.model_management.throw_exception_if_processing_interrupted,
        },
    )
    n_steps = len(sigmas) - 1
    callback = latent_preview.prepare_callback(m, n_steps)
    noise = torch.zeros_like(samples)
    z_T = guider.sample(noise, samples, sampler, sigmas, denoise_mask=None, callback=callback,
                        disable_pbar=disable_pbar or not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)

    inv = Inversion(
        sigmas=torch.tensor([s for s, _ in trajectory], dtype=torch.float32),
        timesteps=[timestep_of(ms, s) if s > 0 else -1 for s, _ in trajectory],
        latents=[x for _, x in trajectory],
        cfg=float(cfg),
        records={name: r.finalize() for name, r in recorders.items()},
        info={"steps_requested": int(steps), "scheduler": "ddim_uniform",
              # the source prompt's text embedding (Edit Prompts' pair is checked against it)
              "positive_embedding": positive[0][0].detach().float().cpu() if len(positive) == 1 else None,
              "positive_pooled": _pooled(positive),
              # the CONDITIONING itself (a reference): Attention Blend's recompute mode evaluates the inversion's
              # steps again with it (nodes/_source_pass.py)
              "positive": positive,
              # the unconditional CONDITIONING when the inversion evaluated it in the same batch (guidance != 1, or
              # ComfyUI's cfg-1 optimisation disabled): the source pass evaluates the same rows
              "negative": ((negative if negative is not None else positive)
                           if not math.isclose(float(cfg), 1.0)
                           or m.model_options.get("disable_cfg1_optimization", False) else None),
              # the attention processors on the inversion's model (the source pass keeps only these)
              "processors": tuple(m.model_options.get("transformer_options", {}).get("zsve_processors", ())),
              "attention_setup": attention_setup(m),
              # which weights the inversion ran with (ModelPatcher.patches_uuid changes when weight patches such as a
              # LoRA are added; clones keep it): the recompute mode tells when the edit model's differ
              "weights": (id(model.model), getattr(model, "patches_uuid", None))},
    )
    out = {k: v for k, v in latent.items() if k != "noise_mask"}
    out["samples"] = z_T.to(comfy.model_management.intermediate_device())
    return out, inv
