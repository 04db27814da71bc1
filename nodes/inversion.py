"""VideoDDIMInvert and its SAMPLER / SIGMAS forms for SamplerCustomAdvanced users."""

from __future__ import annotations

import comfy.model_management
import comfy.samplers
from comfy_api.latest import io

from ..attention.ddim import sample_ddim_inversion
from ._comfy import CATEGORY, InversionType, check_diffusion_model, inversion_sigmas, run_inversion

STEPS_TOOLTIP = (
    "DDIM steps. Sample the edit with the same number of steps and the ddim_uniform scheduler so every edit step "
    "meets its inversion step (50 in the papers; 10-20 is enough for style edits)."
)


class VideoDDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoDDIMInvert",
            display_name="Video DDIM Invert",
            category=CATEGORY,
            description=(
                "Deterministic DDIM (eta=0) inversion of video frames (the frames are the latent batch), as in "
                "Prompt-to-Prompt, FateZero and Video-P2P. Outputs z_T, which KSamplerAdvanced (add_noise disable, "
                "sampler ddim or euler, scheduler ddim_uniform, same steps) turns back into the input, and the "
                "inversion (schedule + per-step latent trajectory on the CPU) for the editing nodes. Attention "
                "recording nodes applied to the model record during this run."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x/2.x or SDXL family). Apply AttentionStore / "
                               "TemporalSelfAttention / ControlNet-conditioning before this node so they act during "
                               "inversion too."),
                io.Latent.Input("latent", tooltip="The encoded video frames, one latent per frame (VAE Encode of "
                                "the frames)."),
                io.Conditioning.Input("positive", tooltip="The source prompt: a text that describes the input video."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip=STEPS_TOOLTIP),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Guidance during inversion. The papers invert with 1 (no guidance); larger "
                               "values need 'negative' and make the inversion less exact."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Unconditional prompt, only used when cfg is not 1."),
            ],
            outputs=[
                io.Latent.Output(display_name="z_T", tooltip="The inverted noise latent z_T, in ComfyUI's latent "
                                 "format: feed it to a sampler with add_noise disabled."),
                InversionType.Output(display_name="inversion", tooltip="The inversion: sigma schedule and the latent "
                                     "at every step (CPU), plus whatever recorders captured. Read-only."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, positive, steps, cfg, negative=None) -> io.NodeOutput:
        out, inv = run_inversion(model, latent, positive, negative, steps, cfg)
        return io.NodeOutput(out, inv, ui={"text": [inv.summary()]})


class DDIMInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInversionSampler",
            display_name="DDIM Inversion Sampler",
            category=CATEGORY + "/Sampling",
            description=(
                "The DDIM inversion as a SAMPLER for SamplerCustomAdvanced: use it with DisableNoise and the SIGMAS of "
                "'DDIM Inversion Sigmas'. The output latent is z_T (no trajectory is kept; use Video DDIM Invert "
                "for editing nodes that need one)."
            ),
            inputs=[],
            outputs=[io.Sampler.Output(tooltip="A sampler that walks the ascending sigmas from clean to noisy.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        sampler = comfy.samplers.KSAMPLER(
            sample_ddim_inversion,
            extra_options={"interrupt": comfy.model_management.throw_exception_if_processing_interrupted},
        )
        return io.NodeOutput(sampler)


class DDIMInversionSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInversionSigmas",
            display_name="DDIM Inversion Sigmas",
            category=CATEGORY + "/Sampling",
            description=(
                "The ddim_uniform schedule reversed (0 -> sigma_max), for inverting with the DDIM Inversion Sampler "
                "in SamplerCustomAdvanced. Sample back with BasicScheduler(ddim_uniform) at the same steps."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model whose noise schedule is used."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip=STEPS_TOOLTIP),
            ],
            outputs=[io.Sigmas.Output(tooltip="Ascending sigmas, starting at 0.")],
        )

    @classmethod
    def execute(cls, model, steps) -> io.NodeOutput:
        ms = check_diffusion_model(model, "DDIMInversionSigmas")
        return io.NodeOutput(inversion_sigmas(ms, steps, "DDIMInversionSigmas"))


NODES = [VideoDDIMInvert, DDIMInversionSampler, DDIMInversionSigmas]
