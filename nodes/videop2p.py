"""Video-P2P nodes: NullTextOptimize, the two-branch decoupled-guidance GUIDER and its outputs node.
The algorithms are in ../attention/videop2p.py (and p2p.py / align.py / masks.py / fatezero.py, reused).

Recommended graph (see docs in the node descriptions):

    Load Checkpoint -> Temporal Self-Attention (mode "first": Video-P2P's frame attention) -> MODEL
    MODEL + VAE Encode(frames) + source prompt -> Video DDIM Invert -> z_T, inversion
    MODEL + inversion + source prompt + empty prompt -> Null-Text Optimize -> null_text
    MODEL + source/edit/empty prompts + CLIP + null_text -> Video-P2P Guider -> GUIDER
    SamplerCustomAdvanced(DisableNoise, GUIDER, KSamplerSelect(ddim or euler),
                          BasicScheduler(ddim_uniform, the inversion's steps), z_T) -> edited frames
    Video-P2P Branch Outputs(GUIDER, edited latent) -> source-branch latent, blend mask

Design: the sampler carries both branches as a [2F] latent (source frames, then target frames); the
guider duplicates the input latent before sampling and returns (and previews) only the target half, so
SamplerCustomAdvanced's outputs are the edited frames. Both branches and both guidance halves go through
one calc_cond_batch call with per-row conditioning (each branch's rows carry its own prompt's text embedding
and, on SDXL, its own pooled-text/size vector `y`), so a single attention call sees the source and
target rows (`transformer_options["zsve_branches"] = 2` tells the attention patches that each chunk holds
two videos). The guider computes each step's next latent itself (DDIM = Euler in sigma space, plus Local
Blend) and returns the denoised prediction that makes the sampler's Euler step land on it; it checks
that the sampler did so, so the sampler must be `euler` or `ddim` on the ddim_uniform schedule.

Long clips: with Video Context Windows on the model, the guider lays the windows over the frames itself and
evaluates each window with both branches' rows of its frames (a frame window over the [2F] batch would mix
the branches); the window results are fused per branch with the handler's fuse method, and Local Blend's
running attention is kept per absolute frame (mean over the windows that saw the frame).
"""

from __future__ import annotations

import contextlib
import logging
import math

import comfy.conds
import comfy.context_windows as cw
import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io
from tqdm.auto import tqdm

from ..attention import align, arch
from ..attention.ddim import Inversion
from ..attention.fatezero import FusionConfigError, make_plan
from ..attention.p2p import END_OF_TEXT_MAPS
from ..attention.videop2p import (
    BRANCHES_KEY,
    BranchPlan,
    InferenceTensorsAsConstants,
    NullText,
    VideoP2PController,
    blend_start_step,
    cfg,
    denoised_for_next,
    euler_step,
    local_blend,
    optimize_null_text,
)
from ._attn_patch import PROCESSORS_KEY, begin_guidance_phase, ensure_dispatchers
from ._comfy import (
    CATEGORY,
    InversionType,
    ZSVEInputError,
    check_choice,
    check_diffusion_model,
    timestep_of,
    unet_config,
)
from .contract import ContractEntry, check_conditioning, check_edit_run, conditioning_matches, ui_warning
from .prompts import PromptPairType, check_inversion_prompt, check_pair, end_of_text_maps_input, end_of_text_note

VP_CATEGORY = CATEGORY + "/Video-P2P"
NullTextType = io.Custom("ZSVE_NULL_TEXT")
log = logging.getLogger(__name__)
TARGET_UNCOND = ["empty prompt (Video-P2P)", "null text (Prompt-to-Prompt)"]


def _single(conds, what: str, node: str) -> dict:
    if not conds or len(conds) != 1:
        raise ZSVEInputError(
            f"{node}: '{what}' must be one plain text CONDITIONING (CLIP Text Encode); combined/area conditioning "
            f"is not supported here (got {0 if not conds else len(conds)} entries)."
        )
    return conds[0]


def _crossattn(entry: dict) -> torch.Tensor:
    return entry["model_conds"]["c_crossattn"].cond


def _with_crossattn(entry: dict, emb: torch.Tensor) -> dict:
    """A copy of a processed cond entry with another text embedding (per-step / per-row swap)."""
    e = dict(entry)
    e["model_conds"] = dict(entry["model_conds"])
    e["model_conds"]["c_crossattn"] = comfy.conds.CONDCrossAttn(emb)
    return e


def _per_row(cond) -> bool:
    """A model cond that holds one vector per batch row (the text embedding; SDXL's pooled text + size vector
    `y`), as opposed to per-latent ones (c_concat of inpainting models) and constants."""
    return (isinstance(cond, comfy.conds.CONDRegular) and not isinstance(cond, comfy.conds.CONDNoiseShape)
            and torch.is_tensor(getattr(cond, "cond", None)) and cond.cond.ndim >= 2)


def _rows(a: dict, b: dict, n: int, emb_a: torch.Tensor | None = None, emb_b: torch.Tensor | None = None) -> dict:
    """One processed cond entry for a [2n] batch of two branches: rows 0..n-1 carry entry `a`'s per-row model
    conds (its text embedding, or `emb_a`, and on SDXL its pooled/size vector `y`), rows n..2n-1 entry `b`'s.
    Everything else (ControlNet, area, other model conds) is entry `b`'s. Raises ZSVEInputError when the two
    entries' per-row conds cannot share a batch (different shapes)."""
    e = dict(b)
    mc = dict(b["model_conds"])
    over = {"c_crossattn": (emb_a, emb_b)}
    for key, cb in b["model_conds"].items():
        if not _per_row(cb):
            continue
        ca = a["model_conds"].get(key)
        ta, tb = over.get(key, (None, None))
        ta = ta if ta is not None else (ca.cond if _per_row(ca) else None)
        tb = tb if tb is not None else cb.cond
        if ta is None:
            raise ZSVEInputError(f"VideoP2PGuider: the source and the edit CONDITIONING differ in kind (the edit's "
                                 f"carries '{key}', the source's not): encode both with the same node (Edit Prompts, "
                                 "or CLIP Text Encode (SDXL) with the same sizes).")
        if ta.shape[1:] != tb.shape[1:]:
            raise ZSVEInputError(f"VideoP2PGuider: the prompts' '{key}' conditionings have different shapes "
                                 f"({list(ta.shape[1:])} and {list(tb.shape[1:])}); keep each prompt within 75 "
                                 "tokens and encode all of them with the same CLIP.")
        rows = torch.cat([ta[:1].expand(n, *ta.shape[1:]), tb[:1].to(ta).expand(n, *tb.shape[1:])])
        mc[key] = cb._copy_with(rows)
    e["model_conds"] = mc
    return e


# --- NullTextOptimize ---------------------------------------------------------------------------------

class _NullTextSampler(comfy.samplers.Sampler):
    """Runs the optimisation inside CFGGuider.sample, so model loading, conditioning processing, patches,
    wrappers and ControlNets are set up exactly as for sampling."""

    zsve_internal = True  # the edit contract does not check this run (it samples no edit)

    def __init__(self, inversion: Inversion, guidance: float, inner_steps: int, epsilon: float, disable: bool):
        self.inversion = inversion
        self.guidance = float(guidance)
        self.inner_steps = int(inner_steps)
        self.epsilon = float(epsilon)
        self.disable = disable
        self.result: NullText | None = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False, *args, **kwargs):
        guider = model_wrap
        inner = guider.inner_model
        mo = extra_args["model_options"]
        pos = guider.conds.get("positive")
        neg_entry = _single(guider.conds.get("negative"), "empty", "NullTextOptimize")
        inv = self.inversion
        n = inv.steps
        pbar = comfy.utils.ProgressBar(n)
        bar = tqdm(total=n, desc="Null-text optimisation", disable=self.disable)

        def den_cond(x, s):
            return comfy.samplers.calc_cond_batch(inner, [pos, None], x, x.new_full((x.shape[0],), s), mo)[0]

        # ComfyUI adds ControlNet residuals to UNet activations in place (`h += ctrl`), which autograd refuses
        # when those activations were saved for backward. With a ControlNet on the conditioning, saved tensors
        # are cloned when saved (extra memory: one copy of the activations backward keeps), so the in-place
        # add no longer touches what backward reads.
        has_control = any(c.get("control") is not None for c in list(pos or []) + [neg_entry])

        def den_uncond(x, s, emb):
            e = _with_crossattn(neg_entry, emb.to(_crossattn(neg_entry).dtype))
            saved = (torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t) if has_control
                     else contextlib.nullcontext())
            with saved:
                return comfy.samplers.calc_cond_batch(inner, [None, [e]], x, x.new_full((x.shape[0],), s), mo)[1]

        def on_step(i, loss, iters):
            pbar.update_absolute(i + 1, n)
            bar.set_postfix(loss=f"{loss:.3g}", iters=iters)
            bar.update(1)

        device = noise.device
        try:
            with torch.inference_mode(False), torch.enable_grad(), InferenceTensorsAsConstants():
                self.result = optimize_null_text(
                    den_cond, den_uncond, inv.latents, [float(s) for s in inv.sigmas], _crossattn(neg_entry),
                    guidance=self.guidance, inner_steps=self.inner_steps, epsilon=self.epsilon,
                    timesteps=inv.timesteps, device=device, on_step=on_step,
                    interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                )
        finally:
            bar.close()
        return inv.latents[0].to(device)


def run_null_text(model, inversion, source, empty, guidance: float, inner_steps: int, epsilon: float,
                  node: str = "NullTextOptimize", disable_pbar: bool = False) -> NullText:
    check_diffusion_model(model, node)
    if not isinstance(inversion, Inversion):
        raise ZSVEInputError(f"{node}: 'inversion' must be the inversion output of Video DDIM Invert.")
    if not source:
        raise ZSVEInputError(f"{node}: connect the source prompt's CONDITIONING (the inversion's prompt) to 'source'.")
    if not empty:
        raise ZSVEInputError(f"{node}: connect the CONDITIONING of an empty prompt (CLIP Text Encode of '') to 'empty'.")
    guider = comfy.samplers.CFGGuider(model.clone())
    guider.inner_set_conds({"positive": source, "negative": empty})
    check_conditioning(node, guider)
    sampler = _NullTextSampler(inversion, guidance, inner_steps, epsilon,
                               disable=disable_pbar or not comfy.utils.PROGRESS_BAR_ENABLED)
    shape = inversion.latent_shape
    zeros = torch.zeros(shape)
    guider.sample(zeros, zeros, sampler, inversion.sigmas.flip(0).clone(), disable_pbar=True, seed=0)
    return sampler.result


class NullTextOptimize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NullTextOptimize",
            display_name="Null-Text Optimize (Video-P2P)",
            category=VP_CATEGORY,
            description=(
                "Video-P2P's shared null-text optimisation: for every step of the inversion, optimises the "
                "unconditional text embedding (one for all frames) so that classifier-free guided sampling from "
                "z_T with the source prompt walks back along the inversion trajectory, i.e. reconstructs the "
                "video at high guidance. Adam, lr 1e-2*(1-i/100), up to 'inner_steps' iterations, early stop at "
                "epsilon + i*2e-5, as in the reference. Runs the model through ComfyUI (patches apply) with "
                "gradients only w.r.t. the embedding: the weights are neither copied nor trained. Costs roughly "
                "inner_steps forward+backward passes per step; the progress bar shows the loss."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model used for the inversion (same Temporal Self-Attention)."),
                InversionType.Input("inversion", tooltip="The inversion of Video DDIM Invert (its trajectory is the "
                                    "target the source branch must follow)."),
                io.Conditioning.Input("source", tooltip="The source prompt's CONDITIONING (the inversion's prompt)."),
                io.Conditioning.Input("empty", tooltip="CONDITIONING of the empty prompt '': the starting point of "
                                      "the optimisation."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance the null text is optimised for; use the same in the "
                               "Video-P2P Guider (7.5 in the paper)."),
                io.Int.Input("inner_steps", default=10, min=0, max=100,
                             tooltip="Maximum Adam iterations per step (10 in the reference). 0 keeps the empty "
                             "embedding (for comparisons)."),
                io.Float.Input("early_stop_epsilon", default=1e-5, min=0.0, max=1.0, step=1e-6, round=1e-7,
                               tooltip="Stop a step's iterations when the loss is below epsilon + step*2e-5 (1e-5 in "
                               "the reference)."),
            ],
            outputs=[
                NullTextType.Output(display_name="null_text", tooltip="One optimised unconditional embedding per "
                                    "step, shared by all frames (CPU, float32). Connect to the Video-P2P Guider."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, source, empty, guidance, inner_steps, early_stop_epsilon) -> io.NodeOutput:
        nt = run_null_text(model, inversion, source, empty, guidance, inner_steps, early_stop_epsilon)
        return io.NodeOutput(nt, ui={"text": [nt.summary()]})


# --- the two-branch guider ------------------------------------------------------------------------------

class _Run:
    """Per-sampling-run state of the guider."""

    def __init__(self, frames: int, hw):
        self.frames = frames
        self.hw = hw
        self.plan = None
        self.controller: VideoP2PController | None = None
        self.expect: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.step = -1


class VideoP2PGuider(comfy.samplers.CFGGuider):
    """Source and target branch in lockstep (latent [2F] inside the sampler, [F] target outside)."""

    zsve_branches = 2  # the edit contract (nodes/contract.py) checks the target half of the sampler's latent

    def __init__(self, model_patcher, settings: dict):
        super().__init__(model_patcher)
        self.settings = settings
        self.null_text: NullText | None = settings.get("null_text")
        self.last_source: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None
        self.last_steps: int = 0
        self._run: _Run | None = None

    def set_conds(self, source, edit, negative):
        self.inner_set_conds({"src_positive": source, "positive": edit, "negative": negative})

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None, *args, **kwargs):
        inv = self.settings.get("inversion")
        if inv is not None and sigmas.numel() > 1:
            entry = ContractEntry("VideoP2PGuider", inv)
            for node, text in check_edit_run([entry], self, noise, latent_image, sampler, sigmas, denoise_mask,
                                             None, positive_keys=("src_positive", "positive"), allow_partial=False):
                ui_warning(node, text)
        f = latent_image.shape[0]
        self._run = _Run(f, tuple(latent_image.shape[-2:]))
        dm = None if denoise_mask is None else torch.cat([denoise_mask, denoise_mask]) if denoise_mask.shape[0] == f \
            else denoise_mask
        cb = None
        if callback is not None:
            def cb(step, x0, x, total):
                return callback(step, x0[f:], x[f:], total)
        out = super().sample(torch.cat([noise, noise]), torch.cat([latent_image, latent_image]), sampler, sigmas,
                             dm, cb, disable_pbar, seed, *args, **kwargs)
        run = self._run
        self.last_source = out[:f]
        self.last_mask = None if run.mask is None else run.mask.detach().to("cpu", copy=True)
        self.last_steps = run.step + 1
        self._run = None
        return out[f:]

    def _build(self, run: _Run, sample_sigmas: torch.Tensor):
        s = self.settings
        ms = self.inner_model.model_sampling
        ss = [float(v) for v in sample_sigmas]
        ts = [-1] + [timestep_of(ms, v) for v in reversed(ss[:-1])]
        try:
            run.plan = make_plan(s["tokenizer"], s["source_prompt"], s["edit_prompt"], ts, mode=s["mode"],
                                 cross_window=s["cross_replace"], word_windows=s["cross_replace_words"],
                                 self_window=(0.0, s["self_replace"]), reweight=s["reweight"],
                                 blend_words=s["blend_words"],
                                 end_of_text_maps=s.get("end_of_text_maps", END_OF_TEXT_MAPS[0]))
        except FusionConfigError as e:
            raise ZSVEInputError(f"VideoP2PGuider: {e}") from None
        branch = BranchPlan(blend_source=run.plan.blend_phrases or run.plan.blend_indices,
                            blend_target=s["blend_target"],
                            blend_threshold=s["blend_threshold"], blend_start=s["blend_start"],
                            record_min_factor=s["min_factor"])
        run.controller = VideoP2PController(run.plan, branch, run.frames, run.hw)

    def predict_noise(self, x, timestep, model_options=None, seed=None, *args, **kwargs):
        model_options = {} if model_options is None else model_options
        run = self._run
        if run is None or x.shape[0] != 2 * run.frames:
            raise ZSVEInputError("VideoP2PGuider: use it with SamplerCustomAdvanced (it samples two branches).")
        to = model_options.get("transformer_options", {})
        ss = to.get("sample_sigmas")
        if run.plan is None:
            self._build(run, ss)
        f = run.frames
        sigma = float(timestep[0])
        hits = torch.isclose(ss.float().cpu(), torch.tensor(sigma), rtol=1e-4, atol=1e-6).nonzero()
        i = int(hits[0]) if len(hits) else -1
        n = len(ss) - 1
        if i < 0 or i >= n or i != run.step + 1:
            raise ZSVEInputError(
                f"VideoP2PGuider: the sampler evaluated the model at sigma {sigma:.4f}, not the next step of its "
                "schedule. Use the sampler 'euler' or 'ddim' (one model evaluation per step)."
            )
        if run.expect is not None:
            tol = 1e-3 * max(1.0, float(run.expect.abs().max()))
            if not torch.allclose(x.float(), run.expect, atol=tol, rtol=1e-3):
                raise ZSVEInputError(
                    "VideoP2PGuider: the sampler did not take the DDIM step the guider prescribed; use the sampler "
                    "'euler' or 'ddim' with the ddim_uniform scheduler and DisableNoise."
                )
        run.step = i
        t = timestep_of(self.inner_model.model_sampling, sigma)
        s = self.settings

        src = _single(self.conds.get("src_positive"), "source", "VideoP2PGuider")
        tgt = _single(self.conds.get("positive"), "edit", "VideoP2PGuider")
        neg = _single(self.conds.get("negative"), "negative", "VideoP2PGuider")
        c_src, c_tgt, c_neg = _crossattn(src), _crossattn(tgt), _crossattn(neg)
        if not (c_src.shape[1:] == c_tgt.shape[1:] == c_neg.shape[1:]):
            raise ZSVEInputError("VideoP2PGuider: the prompts encode to different lengths; keep each within 75 "
                                 "tokens.")
        u_src = c_neg
        if self.null_text is not None:
            try:
                u_src = self.null_text.embedding_for(t).to(c_neg.device, c_neg.dtype)
            except KeyError as e:
                raise ZSVEInputError(f"VideoP2PGuider: {e}") from None
        u_tgt = u_src if s["target_uncond"] == TARGET_UNCOND[1] else c_neg

        # Each branch's rows carry their own prompt's conditioning: the source rows the source CONDITIONING
        # (text embedding and, on SDXL, its pooled/size vector y), the target rows the edit's.
        def conds(n=f):
            return [[_rows(src, tgt, n)], [_rows(neg, neg, n, u_src, u_tgt)]]

        mo = dict(model_options)
        # A frame context handler must not see this batch (its rows are two videos): the windows are laid over
        # the frames here, each window evaluated with both branches (_windowed).
        handler = mo.pop("context_handler", None)
        to = dict(to)
        to[BRANCHES_KEY] = 2
        to[PROCESSORS_KEY] = list(to.get(PROCESSORS_KEY, [])) + [run.controller]
        mo["transformer_options"] = to
        if handler is not None and handler.should_use_context(self.inner_model, [], x[:f], timestep[:f], mo):
            dc, du = _windowed_eval(self.inner_model, handler, conds, x, timestep, mo, f)
        else:
            dc, du = comfy.samplers.calc_cond_batch(self.inner_model, conds(), x, timestep, mo)
        src_guidance = None if self.null_text is None else self.null_text.guidance
        den_src = dc[:f] if src_guidance is None else cfg(du[:f], dc[:f], src_guidance)
        # The target's guidance; other nodes' post-CFG passes (PAG, SAG) evaluate the target branch again:
        # _GuidancePasses gives them the source rows too, so the Prompt-to-Prompt control acts there as well.
        begin_guidance_phase()
        cond_list, uncond_list = [tgt], [neg]
        mo_cfg = dict(mo)
        to_cfg = dict(to)
        to_cfg["wrappers"] = {t: {k: list(v) for k, v in d.items()} for t, d in (to.get("wrappers") or {}).items()}
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "zsve_videop2p_guidance",
            _GuidancePasses(x, timestep, f, handler, {id(cond_list): (src, None, None),
                                                      id(uncond_list): (neg, u_src, u_tgt)}, cond_list), to_cfg)
        mo_cfg["transformer_options"] = to_cfg
        den_tgt = comfy.samplers.cfg_function(self.inner_model, dc[f:], du[f:], self.cfg, x[f:], timestep[f:],
                                              model_options=mo_cfg, cond=cond_list, uncond=uncond_list)
        den = torch.cat([den_src, den_tgt])
        s_next = float(ss[i + 1])
        if run.controller.branch.blends and i >= blend_start_step(n, s["blend_start"]):
            mask = run.controller.mask(run.hw)
            if mask is not None:
                x_src = euler_step(x[:f].float(), den_src.float(), sigma, s_next)
                x_tgt = local_blend(x_src, euler_step(x[f:].float(), den_tgt.float(), sigma, s_next), mask)
                den = denoised_for_next(x.float(), torch.cat([x_src, x_tgt]), sigma, s_next).to(den.dtype)
                run.mask = mask
        run.expect = euler_step(x.float(), den.float(), sigma, s_next)
        return den


def _windowed_eval(inner_model, handler, conds, x, timestep, mo, f):
    """Both branches under the frame context windows of `handler` (ComfyUI's IndexListContextHandler): the
    windows are laid over the F frames, each window is evaluated for the source and the target rows of its
    frames together (so P2P control and Local Blend see matching frames), and the results are fused per
    branch with the handler's own fuse method and weights, identical for both branches. `conds(n)` gives the
    cond lists for a window of n frames; returns one [2F] result per list."""
    handler.set_step(timestep[:1], mo)
    windows = handler.get_context_windows(inner_model, x[:f], mo)
    relative = handler.fuse_method.name == cw.ContextFuseMethods.RELATIVE
    lists = len(conds(1))
    finals = [torch.zeros_like(x[:f]) for _ in range(2 * lists)]  # per list: source, target
    shape = cw.get_shape_for_dim(x[:f], handler.dim)
    counts = [torch.ones(shape, device=x.device) if relative else torch.zeros(shape, device=x.device)
              for _ in range(2 * lists)]
    biases = [[0.0] * f for _ in range(2 * lists)]
    to = mo["transformer_options"]
    for wi, window in enumerate(windows):
        comfy.model_management.throw_exception_if_processing_interrupted()
        idx = [int(i) for i in window.index_list]
        n = len(idx)
        sel = torch.as_tensor(idx + [f + i for i in idx], device=x.device)
        mo_w = dict(mo)
        mo_w["transformer_options"] = dict(to, context_window=window)
        outs = comfy.samplers.calc_cond_batch(inner_model, conds(n), x[sel], timestep[sel], mo_w)
        parts = [part for o in outs for part in (o[:n], o[n:])]
        handler.combine_context_window_results(x[:f], parts, None, window, wi, len(windows), timestep[:f], finals,
                                               counts, biases)
    if not relative:
        finals = [v / counts[k].to(v) for k, v in enumerate(finals)]
    return [torch.cat(finals[2 * j:2 * j + 2]) for j in range(lists)]


class _GuidancePasses:
    """CALC_COND_BATCH wrapper on the model options the guider hands to cfg_function for the target branch:
    a post-CFG node's pass (PAG's perturbed pass, SAG's blurred one) evaluates the F target rows only. A pass
    of the edit prompt is evaluated with the source rows of the step added in front (source latent, source
    prompt), so the Prompt-to-Prompt control acts in it as in the main pass; its target half is returned. A
    pass of other conditioning (SAG's of the negative prompt, never controlled) runs as a plain F-frame batch
    under the model's context windows."""

    def __init__(self, x, timestep, f, handler, texts: dict, cond_list):
        self.x, self.timestep, self.f, self.handler = x, timestep, f, handler
        self.texts = texts  # id(cond list) -> (source entry, source / target text embedding or None: the entries')
        self.cond_list = cond_list
        self.busy = False

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        f = self.f
        if self.busy or x_in.shape[0] != f:
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        to = model_options.get("transformer_options", {})
        if not any(c is self.cond_list for c in conds):
            mo = dict(model_options)
            mo["transformer_options"] = {k: v for k, v in to.items() if k != BRANCHES_KEY}
            if self.handler is not None:
                mo["context_handler"] = self.handler
            self.busy = True
            try:
                return comfy.samplers.calc_cond_batch(model, conds, x_in, timestep, mo)
            finally:
                self.busy = False
        x2 = torch.cat([self.x[:f].to(x_in), x_in])
        t2 = torch.cat([self.timestep[:f].to(timestep), timestep])

        def expand(n=f):
            out = []
            for c in conds:
                texts = self.texts.get(id(c))
                if texts is None:
                    raise ZSVEInputError("VideoP2PGuider: another node's guidance pass evaluated the edit prompt together "
                                         "with conditioning the guider does not know; it cannot add the source branch "
                                         "to that pass.")
                src, emb_src, emb_tgt = texts
                out.append([_rows(src, c[0], n, emb_src, emb_tgt)])
            return out

        self.busy = True
        try:
            if self.handler is not None and self.handler.should_use_context(model, [], x_in, timestep, model_options):
                outs = _windowed_eval(model, self.handler, expand, x2, t2, model_options, f)
            else:
                outs = executor(model, expand(), x2, t2, model_options, *args, **kwargs)
        finally:
            self.busy = False
        return [o[f:] for o in outs]


def _check_unit(v: float, name: str):
    if not (0.0 <= v <= 1.0):
        raise ZSVEInputError(f"VideoP2PGuider: {name} must be a fraction of the steps in [0, 1] (got {v:g}).")


class VideoP2PGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoP2PGuider",
            display_name="Video-P2P Guider",
            category=VP_CATEGORY,
            description=(
                "Video-P2P's edit as a GUIDER for SamplerCustomAdvanced: the source branch (source prompt, the "
                "optimised null text of each step, its guidance; without null text the 'fast' mode: conditional "
                "prediction only) and the target branch (edit prompt, the empty prompt, cfg) are denoised together "
                "from z_T, frames as the batch. In every step the target's cross-attention follows the source's "
                "(Prompt-to-Prompt word swap / refinement / reweighting inside the cross window), the "
                "self-attention of the layers with at most 32x32 positions is copied inside the self window, and with blend words Local Blend keeps "
                "everything outside the words' running attention mask equal to the source branch. Sample with "
                "DisableNoise, sampler ddim or euler, BasicScheduler ddim_uniform with the inversion's steps, latent "
                "= z_T. The sampler's output is the edited video; 'Video-P2P Branch Outputs' gives the source "
                "branch and the blend mask. For Video-P2P's frame attention put Temporal Self-Attention (mode "
                "first) on the model of the inversion, the null text and this guider. Under Video Context "
                "Windows the guider evaluates each window with both branches' rows of its frames."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model (with the same Temporal Self-Attention as the inversion)."),
                InversionType.Input("inversion", tooltip="The inversion of Video DDIM Invert whose z_T the sampler "
                                    "starts from: the run is checked against its schedule and z_T (the edit "
                                    "contract), and the null text must come from it."),
                PromptPairType.Input("prompts", tooltip="The prompt pair of Edit Prompts: the source branch uses "
                                     "its source prompt (the inversion's positive), the target branch its edit prompt, "
                                     "and both its negative (the empty prompt in Video-P2P) as the unconditional."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Guidance of the target branch (7.5 in the paper). The source branch uses the "
                               "null text's guidance."),
                io.Combo.Input("mode", options=["replace", "refine"], default="replace",
                               tooltip="Cross-attention control: replace (word swap; equal word counts, otherwise "
                               "refine is used) or refine (words added/changed)."),
                io.Float.Input("cross_replace", default=0.2, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps (from the noisiest) in which the target's "
                               "cross-attention follows the source's (Video-P2P default 0.2)."),
                io.String.Input("cross_replace_words", default="",
                                tooltip="Optional per-word windows for words of the edit prompt: 'word:0.5' or "
                                "'word:0.2-0.6', comma separated."),
                io.Float.Input("self_replace", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps in which the target's self-attention is replaced by the "
                               "source's (Video-P2P default 0.5), in the layers Video-P2P replaces: those whose map has "
                               "at most 32x32 positions at this video's size (SD1.5 at 512 px: all but the finest "
                               "level; at 256 px every level)."),
                io.String.Input("reweight", default="",
                                tooltip="Reweight words of the edit prompt: 'origami:2' (Video-P2P's eq_params)."),
                io.String.Input("blend_words", default="",
                                tooltip="Local Blend: words of the SOURCE prompt naming the object to change (e.g. "
                                "'man'); several things as comma-separated phrases, each masked on its own and "
                                "the masks united. Empty (with empty blend_words_edit): no Local Blend."),
                io.String.Input("blend_words_edit", default="",
                                tooltip="Local Blend: words of the EDIT prompt naming the new object (e.g. "
                                "'Spider-Man'); the mask is the union of both words' masks."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.05,
                               tooltip="Local Blend applies after every step from this fraction of the steps on "
                               "(0.2 in the reference)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Mask threshold on the per-frame normalised attention (0.3 in the reference)."),
                io.Combo.Input("target_uncond", options=TARGET_UNCOND, default=TARGET_UNCOND[0],
                               tooltip="Unconditional embedding of the target branch: the empty prompt (Video-P2P's "
                               "decoupled guidance) or the source's null text (image Prompt-to-Prompt with null-text "
                               "inversion; with identical prompts the target then equals the source)."),
                io.Conditioning.Input("source", optional=True,
                                      tooltip="Optional: the source prompt's CONDITIONING after other nodes processed "
                                      "it (e.g. ControlNet Apply on Edit Prompts' 'source'); it must carry the pair's "
                                      "source prompt. Not connected: the pair's own."),
                io.Conditioning.Input("edit", optional=True,
                                      tooltip="Optional: the edit prompt's CONDITIONING after other nodes processed it "
                                      "(e.g. ControlNet Apply); it must carry the pair's edit prompt."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Optional: the negative CONDITIONING after other nodes processed it; it "
                                      "must carry the pair's negative prompt."),
                NullTextType.Input("null_text", optional=True,
                                   tooltip="From Null-Text Optimize. Not connected: fast mode (the source branch uses "
                                   "its conditional prediction without guidance)."),
                end_of_text_maps_input(),
            ],
            outputs=[
                io.Guider.Output(tooltip="The two-branch guider for SamplerCustomAdvanced (its output latent is the "
                                 "edited video)."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, prompts, cfg, mode, cross_replace,
                cross_replace_words, self_replace, reweight, blend_words, blend_words_edit, blend_start,
                blend_threshold, target_uncond, null_text=None, source=None, edit=None,
                negative=None, end_of_text_maps=END_OF_TEXT_MAPS[0]) -> io.NodeOutput:
        node = "VideoP2PGuider"
        check_diffusion_model(model, node)
        handler = model.model_options.get("context_handler")
        if handler is not None and not (isinstance(handler, cw.IndexListContextHandler) and handler.dim == 0):
            raise ZSVEInputError(
                f"{node}: the model carries a context handler the two-branch guider cannot split by frames "
                f"({type(handler).__name__}); use Video Context Windows (frames) from this pack.")
        if not isinstance(inversion, Inversion):
            raise ZSVEInputError(f"{node}: 'inversion' must be the inversion output of Video DDIM Invert (the run "
                                 "whose z_T the sampler starts from).")
        if null_text is not None and not isinstance(null_text, NullText):
            raise ZSVEInputError(f"{node}: 'null_text' must come from Null-Text Optimize.")
        if null_text is not None and sorted(null_text.timesteps) != sorted(t for t in inversion.timesteps if t >= 0):
            raise ZSVEInputError(
                f"{node}: the null text was optimised for another inversion ({null_text.steps} steps at timesteps "
                f"{min(null_text.timesteps)}..{max(null_text.timesteps)}; this inversion has {inversion.steps}). "
                "Connect the inversion that Null-Text Optimize used.")
        check_choice(node, "mode", mode, ("replace", "refine"))
        check_choice(node, "target_uncond", target_uncond, TARGET_UNCOND)
        check_choice(node, "end_of_text_maps", end_of_text_maps, END_OF_TEXT_MAPS)
        if null_text is None and target_uncond == TARGET_UNCOND[1]:
            raise ZSVEInputError(f"{node}: target_uncond '{target_uncond}' needs a null_text input.")
        for v, name in ((cross_replace, "cross_replace"), (self_replace, "self_replace"), (blend_start, "blend_start")):
            _check_unit(v, name)
        pair = check_pair(prompts, node)
        check_inversion_prompt(pair, inversion, node)
        tok, source_prompt, edit_prompt = pair.tokenizer, pair.source.plain, pair.edit.plain
        # Validate the prompt settings now (the real plan is built for the sampler's schedule).
        try:
            plan = make_plan(tok, source_prompt, edit_prompt, [-1] + list(range(1, 1000, 20)), mode=mode,
                             cross_window=float(cross_replace), word_windows=cross_replace_words,
                             self_window=(0.0, float(self_replace)), reweight=reweight, blend_words=blend_words,
                             end_of_text_maps=end_of_text_maps)
        except FusionConfigError as e:
            raise ZSVEInputError(f"{node}: {e}") from None
        try:  # one list of edit-prompt positions per comma-separated phrase
            blend_target = align.phrase_positions(edit_prompt.strip(), blend_words_edit, tok, "edit")
        except align.AlignmentError as e:
            raise ZSVEInputError(f"{node}: blend_words_edit: {e}; blend_words_edit names the new object with words of "
                                 "the edit prompt (or leave it empty).") from None
        for note in plan.notes:
            log.warning("%s: %s", node, note)
        if null_text is not None and not math.isclose(null_text.guidance, cfg):
            log.warning("%s: the null text was optimised for guidance %g, the target branch uses cfg %g; the source "
                        "branch keeps %g.", node, null_text.guidance, cfg, null_text.guidance)
        m = model.clone()
        ensure_dispatchers(m)
        settings = {
            "tokenizer": tok, "source_prompt": source_prompt, "edit_prompt": edit_prompt, "mode": mode,
            "cross_replace": float(cross_replace), "cross_replace_words": cross_replace_words,
            "self_replace": float(self_replace), "reweight": reweight, "blend_words": blend_words,
            "blend_target": blend_target or None, "blend_start": float(blend_start),
            "blend_threshold": float(blend_threshold), "target_uncond": target_uncond, "null_text": null_text,
            "inversion": inversion, "end_of_text_maps": end_of_text_maps,
            # Local Blend records the blend words' attention on all but the finest attention level (the mask uses
            # the level nearest 1/4 of the latent); self-attention replacement follows the reference's query-length
            # rule on the map at hand (attention/videop2p.py, BranchPlan.self_max_queries)
            "min_factor": arch.store_min_factor(unet_config(model)),
        }
        guider = VideoP2PGuider(m, settings)
        conds = []
        for given, side, name in ((source, pair.source, "source"), (edit, pair.edit, "edit"),
                                  (negative, pair.negative, "negative")):
            if given is None:
                conds.append(side.conditioning)
                continue
            if not given or not conditioning_matches(
                    [{"cross_attn": c[0], "pooled_output": c[1].get("pooled_output")} for c in given], side.embedding,
                    side.pooled):
                raise ZSVEInputError(
                    f"{node}: the '{name}' CONDITIONING does not carry the prompt pair's {name} prompt "
                    f"({side.text!r}): connect Edit Prompts' '{name}' output (through ControlNet Apply or the like), "
                    "or leave the input empty.")
            conds.append(given)
        guider.set_conds(*conds)
        guider.set_cfg(float(cfg))
        text = [f"Video-P2P: {'null-text' if null_text is not None else 'fast'} mode, cross mode {plan.cross_mode}"]
        if plan.cross_mode in ("replace", "refine"):
            text.append(end_of_text_note(end_of_text_maps))
        return io.NodeOutput(guider, ui={"text": text + plan.notes})


class VideoP2PBranchOutputs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoP2PBranchOutputs",
            display_name="Video-P2P Branch Outputs",
            category=VP_CATEGORY,
            description=(
                "After SamplerCustomAdvanced ran the Video-P2P Guider: the source branch's final latent (the "
                "reconstruction, to compare with the edit) and the Local Blend mask of the last step at pixel "
                "resolution (all ones without Local Blend). Connect the sampler's output latent so this runs after it."
            ),
            inputs=[
                io.Guider.Input("guider", tooltip="The Video-P2P Guider that the sampler used."),
                io.Latent.Input("edited", tooltip="The sampler's output (the edited frames); orders the execution."),
            ],
            outputs=[
                io.Latent.Output(display_name="source", tooltip="The source branch's final latent (same format as the "
                                 "edited latent): decode it to see the reconstruction."),
                io.Mask.Output(display_name="mask", tooltip="Per-frame Local Blend mask of the last step (1 = the edit "
                               "may change the pixel), upsampled x8 to pixels."),
            ],
        )

    @classmethod
    def execute(cls, guider, edited) -> io.NodeOutput:
        if not isinstance(guider, VideoP2PGuider) or guider.last_source is None:
            raise ZSVEInputError("VideoP2PBranchOutputs: connect the Video-P2P Guider that SamplerCustomAdvanced used, "
                                 "and the sampler's output latent to 'edited'.")
        src = guider.last_source.to(comfy.model_management.intermediate_device())
        f, _, h, w = src.shape
        if guider.last_mask is None:
            mask = torch.ones(f, h * 8, w * 8)
        else:
            mask = torch.nn.functional.interpolate(guider.last_mask.float().unsqueeze(1), scale_factor=8,
                                                   mode="nearest")[:, 0]
        out = {k: v for k, v in edited.items() if k not in ("samples", "noise_mask")}
        out["samples"] = src
        return io.NodeOutput(out, mask)


NODES = [NullTextOptimize, VideoP2PGuiderNode, VideoP2PBranchOutputs]
