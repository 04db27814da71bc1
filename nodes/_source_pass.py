"""FateZero's source pass for the recompute mode of Attention Store (issue 21, store size): instead of keeping
the inversion's attention for every step, the edit evaluates the inversion's step again, at the inversion's own
inputs, right before the edit's own evaluation of the same timestep, and fuses from that one step.

The inversion step k (sigma s_{k-1} -> s_k, ascending) evaluated the UNet on
x_in = latents[k-1] * sqrt((1 + s_k^2) / (1 + s_{k-1}^2)) at sigma s_k with the source prompt (attention/ddim.py
`sample_ddim_inversion`); the edit step with the same timestep reads what that evaluation recorded. The source
pass repeats exactly that evaluation (same latent, same sigma, same arithmetic, the source CONDITIONING the
inversion was given, processed by the edit's own guider like any other conditioning: ControlNets and areas on it
apply as they did at the inversion) with an AttentionRecorder of the store's settings, and hands the one-step
store to the FateZero controller through the transformer options (attention/fatezero.py LIVE_STORE_KEY).
Identical model weights give identical recorded tensors, so the fused result equals the stored mode's
(tests/test_store_recompute.py); the store then holds nothing and each fused step costs one more UNet pass over
the frames' conditional rows (README "Cost of attention control").

Installed on the edit model's clone as two keyed wrappers (`zsve_fatezero_source_pass:<inversion>`, one pair per
inversion, serving every Attention Blend on the model that reads it):
- OUTER_SAMPLE: adds the source conditioning to the guider's conditionings for this run (so ComfyUI's own
  prepare_sampling / process_conds load and encode it) and takes it out afterwards;
- PREDICT_NOISE: for each step that fuses (cross window or self window), the source pass, then the sampler's
  own evaluation with the one-step store in its transformer options. Steps outside the windows cost nothing.
The source pass evaluates the model as the inversion did: the same rows (the unconditional one too where the
inversion's guidance was not 1) and only the attention processors that were on the inversion's model.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ..attention.ddim import Inversion
from ..attention.fatezero import LIVE_STORE_KEY, FateZeroController
from ..attention.store import AttentionRecorder, StoreConfig
from ._attn_patch import PROCESSORS_KEY, RECORDERS_KEY
from ._comfy import ZSVEInputError, timestep_of

SOURCE_PASS_KEY = "zsve_fatezero_source_pass"
SOURCE_COND_KEY = "zsve_fatezero_source"  # the guider's conditioning slot for the inversion's positive
OUTER_SAMPLE = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
PREDICT_NOISE = comfy.patcher_extension.WrappersMP.PREDICT_NOISE
log = logging.getLogger(__name__)


def weights_note(inversion: Inversion, model) -> str | None:
    """A note when the edit model's weights may differ from the inversion model's (a LoRA added on one side):
    the source pass then computes the source attention with the edit model's weights."""
    ran = inversion.info.get("weights")
    if ran is None or ran == (id(model.model), getattr(model, "patches_uuid", None)):
        return None
    return ("the edit model's weights are not the inversion model's (a LoRA or another weight patch on one of them "
            "only): recompute mode computes the source attention with the edit model's weights, the stored mode "
            "keeps the inversion model's. Apply the same LoRAs before the graph splits to get the stored mode's "
            "result, or set Attention Store's source_attention to 'store'.")


def check_recompute(inversion: Inversion, node: str) -> list:
    """The inversion's source CONDITIONING, after refusing what the source pass cannot reproduce."""
    pos = inversion.info.get("positive")
    if not pos:
        raise ZSVEInputError(
            f"{node}: this inversion kept no source conditioning to recompute its attention from; run Video DDIM "
            "Invert again (Attention Store with source_attention 'recompute at edit')."
        )
    if any("hooks" in c[1] for c in pos):
        raise ZSVEInputError(
            f"{node}: the inversion's positive CONDITIONING carries hooks (Set CLIP/Model Hooks), which the source "
            "pass cannot re-apply; set Attention Store's source_attention to 'store'."
        )
    return pos


class SourcePass:
    """The two keyed wrappers (see the module docstring) for one inversion: one key per inversion
    (`zsve_fatezero_source_pass:<id>`), serving every Attention Blend controller on the model that reads that
    inversion (chained Attention Blend nodes share one source pass per step). Shares nothing between runs but the
    (read-only) inversion; a new node output gets a new SourcePass (the old one may be on other clones)."""

    def __init__(self, inversion: Inversion, config: StoreConfig, controllers: tuple):
        self.inversion = inversion
        self.config = replace(config, record_window=1.0, budget_bytes=0, recompute=False, factors=None,
                              head_mean=False)
        self.controllers = tuple(controllers)
        self.positive = inversion.info.get("positive")
        self.negative = inversion.info.get("negative")  # evaluated in the inversion's batch (guidance != 1)
        self.processors = tuple(inversion.info.get("processors") or ())
        self.step_of_timestep = {int(t): k for k, t in enumerate(inversion.timesteps) if k >= 1}
        self.key = f"{SOURCE_PASS_KEY}:{id(inversion):x}"
        self.cond_key = f"{SOURCE_COND_KEY}:{id(inversion):x}"
        self.passes = 0  # source passes run (read by tests and benchmarks)

    def __deepcopy__(self, memo):
        return self

    @classmethod
    def install(cls, model, inversion: Inversion, config: StoreConfig, controller: FateZeroController) -> SourcePass:
        """Put the source pass for `inversion` on `model` (a clone the caller owns), adding `controller` to the one
        already there for the same inversion."""
        key = f"{SOURCE_PASS_KEY}:{id(inversion):x}"
        old = [getattr(w, "__self__", None) for w in model.get_wrappers(PREDICT_NOISE, key)]
        before = tuple(c for sp in old if isinstance(sp, SourcePass) and sp.inversion is inversion
                       for c in sp.controllers)
        sp = cls(inversion, config, before + (controller,))
        model.remove_wrappers_with_key(OUTER_SAMPLE, key)
        model.remove_wrappers_with_key(PREDICT_NOISE, key)
        model.add_wrapper_with_key(OUTER_SAMPLE, key, sp.outer_sample)
        model.add_wrapper_with_key(PREDICT_NOISE, key, sp.predict_noise)
        return sp

    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        conds = getattr(guider, "conds", None)
        if conds is None:
            return executor(*args, **kwargs)
        convert = comfy.sampler_helpers.convert_cond
        conds[self.cond_key] = [c.copy() for c in convert(self.positive)]
        if self.negative is not None:
            conds[self.cond_key + ":uncond"] = [c.copy() for c in convert(self.negative)]
        try:
            return executor(*args, **kwargs)
        finally:
            if isinstance(getattr(guider, "conds", None), dict):
                guider.conds.pop(self.cond_key, None)
                guider.conds.pop(self.cond_key + ":uncond", None)

    def _source_conds(self, guider, key: str, original) -> list:
        got = (getattr(guider, "conds", None) or {}).get(key)
        if got is None:
            raise ZSVEInputError(
                "AttentionBlend: the source pass found no source conditioning in the sampler's guider (recompute "
                "mode works with the samplers that run ComfyUI's guider: KSampler, KSamplerAdvanced, "
                "SamplerCustom(Advanced)); or set Attention Store's source_attention to 'store'."
            )
        out = []
        for c, o in zip(got, comfy.sampler_helpers.convert_cond(original)):
            c = dict(c)
            for name in ("control", "gligen"):  # ComfyUI copies the positive's onto equal areas of other slots
                if name not in o:
                    c.pop(name, None)
            out.append(c)
        return out

    def predict_noise(self, executor, x, timestep, model_options, seed, *args, **kwargs):
        guider = executor.class_obj
        inner = guider.inner_model
        t = timestep_of(inner.model_sampling, float(timestep[0]))
        k = self.step_of_timestep.get(t)
        fused = []
        for c in self.controllers:
            i = c.plan.timestep_to_step.get(t)
            if i is not None and c.fuses_at(i):
                fused.append(c)
        if k is None or not fused:
            return executor(x, timestep, model_options, seed, *args, **kwargs)
        inv = self.inversion
        s_cur = inv.sigmas[k - 1].to(x.device)
        s_next = inv.sigmas[k].to(x.device)
        latent = inv.latents[k - 1].to(x.device)
        if latent.shape != x.shape:
            raise ZSVEInputError(
                f"AttentionBlend: the edit samples a latent of shape {list(x.shape)}, the inversion's is "
                f"{list(latent.shape)}; sample the inversion's z_T."
            )
        # exactly the inversion's input (attention/ddim.py sample_ddim_inversion)
        x_in = latent * ((1.0 + s_next**2) / (1.0 + s_cur**2)) ** 0.5
        sigma_in = s_next * x_in.new_ones([x_in.shape[0]])
        recorder = AttentionRecorder(self.config)
        mo = dict(model_options)
        to = dict(mo.get("transformer_options") or {})
        # the model as the inversion evaluated it: only the processors that were on the inversion's model
        to[PROCESSORS_KEY] = [p for p in to.get(PROCESSORS_KEY, ()) if any(p is q for q in self.processors)]
        to[RECORDERS_KEY] = {"attention": recorder}
        to.pop(LIVE_STORE_KEY, None)
        mo["transformer_options"] = to
        conds = [self._source_conds(guider, self.cond_key, self.positive)]
        if self.negative is not None:  # the inversion's batch (cond + uncond rows), as sampling_function makes it
            conds.append(self._source_conds(guider, self.cond_key + ":uncond", self.negative))
        comfy.samplers.calc_cond_batch(inner, conds, x_in, sigma_in, mo)
        self.passes += 1
        store = recorder.finalize()
        mo2 = dict(model_options)
        to2 = dict(model_options.get("transformer_options") or {})
        live = dict(to2.get(LIVE_STORE_KEY) or {})
        for c in self.controllers:
            live[c] = store
        to2[LIVE_STORE_KEY] = live
        mo2["transformer_options"] = to2
        return executor(x, timestep, mo2, seed, *args, **kwargs)
