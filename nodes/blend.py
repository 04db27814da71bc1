"""Blended Latent Diffusion under attention control (issue 7): LatentBlendWithInversion, LatentBlendMaskPreview.

The node is a model patch, not a sampler, so KSamplerAdvanced (add_noise disabled, ddim/euler,
ddim_uniform, the inversion's steps) and SamplerCustomAdvanced drive the edit:
- a PREDICT_NOISE wrapper (keyed, composes with other wrappers) replaces the guided denoised prediction
  of each step in the blend window by the one that makes the Euler/DDIM step land on
  M * edit + (1 - M) * inversion latent (math in attention/latent_blend.py);
- for masks from cross-attention, a read-only attention processor (nodes/_attn_patch.py) collects the
  word maps of the conditional rows during that same model call;
- an OUTER_SAMPLE wrapper checks the sampler's sigmas and frames against the inversion before the first
  step and starts a new record of the masks in the ZSVE_BLEND_STATE, which LatentBlendMaskPreview reads.

FreshNoiseStart (Blended Latent Diffusion's start, for any edit model): a PREDICT_NOISE wrapper evaluates the
first step at the source latent plus fresh noise inside a mask (z_T elsewhere) and returns the denoised
prediction that makes the sampler's step from z_T land where the step from that start lands
(attention/latent_blend.py `fresh_noise_start`, `background_denoised`); the sampler's latent stays z_T, so the
edit contract holds.
"""

from __future__ import annotations

import uuid

import comfy.patcher_extension
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
from comfy_api.latest import io

from ..attention import align
from ..attention.ddim import Inversion
from ..attention.latent_blend import (
    COLLECTORS_KEY,
    MASK_SOURCES,
    BlendMapProcessor,
    MapCollector,
    attention_blend_mask,
    background_denoised,
    blended_denoised,
    euler_step,
    fresh_noise_start,
    in_window,
    parse_words,
    prepare_user_mask,
    second_lowest_resolution_layers,
)
from ._attn_patch import add_processor, layer_name
from ._comfy import CATEGORY, InversionType, ZSVEInputError, check_diffusion_model
from .contract import check_choice, check_finite, edit_rows, install_contract, requested_steps, ui_warning
from .prompts import PromptPair, PromptPairType, check_inversion_prompt, check_pair

NODE = "LatentBlendWithInversion"
BlendStateType = io.Custom("ZSVE_BLEND_STATE")


# --- glue ----------------------------------------------------------------------------------------------


def transformer_downsampling(model) -> dict[str, int]:
    """{layer name: downsampling factor of its feature map} for every transformer block of the UNet."""
    unet = model.get_model_object("diffusion_model")
    out: dict[str, int] = {}
    ds = 1

    def visit(name, number, block):
        nonlocal ds
        for layer in block:
            if isinstance(layer, Downsample):
                ds *= 2
            elif isinstance(layer, SpatialTransformer):
                for depth in range(len(layer.transformer_blocks)):
                    out[layer_name((name, number, depth))] = ds
            elif isinstance(layer, Upsample):
                ds //= 2

    for number, block in enumerate(unet.input_blocks):
        visit("input", number, block)
    visit("middle", 0, unet.middle_block)
    for number, block in enumerate(unet.output_blocks):
        visit("output", number, block)
    return out


def word_token_positions(prompts: PromptPair, words: str) -> tuple[list[int], dict[str, list[int]]]:
    """Token positions (in the conditioning's token axis, BOS at 0) of the chosen words of the pair's edit prompt
    (its plain text: weight syntax removed, which keeps the positions), and the positions of each comma-separated
    entry. An entry may be several words ('red hat'): where they stand together in the prompt, that run
    (`attention/align.py` `phrase_positions`, the pack's one reading of a words input).
    Raises ZSVEInputError (empty input; a word not in the edit prompt, named with the prompt's words)."""
    word_list = parse_words(words)
    if not word_list:
        raise ZSVEInputError(f"{NODE}: 'words' is empty: give the edited words of the edit prompt, comma-separated "
                             "(e.g. 'cat' or 'cat, red hat'), or use mask_source 'user mask'.")
    plain = prompts.edit.plain
    per_word: dict[str, list[int]] = {}
    for w in word_list:  # entry by entry, so that each keeps its own label (a punctuation-only entry names nothing)
        try:
            found = align.phrase_positions(plain, [w], prompts.tokenizer, "edit")
        except align.AlignmentError as e:
            raise ZSVEInputError(f"{NODE}: words: {e}. Use words of the edit prompt (Edit Prompts' edit_text), "
                                 "spelled as there.") from None
        if found:
            per_word[w] = found[0]
    if not per_word:
        raise ZSVEInputError(f"{NODE}: 'words' names no word: give the edited words of the edit prompt, "
                             "comma-separated (e.g. 'cat' or 'cat, red hat'), or use mask_source 'user mask'.")
    positions = sorted({p for pos in per_word.values() for p in pos})
    return positions, per_word


def phrase_columns(positions: list[int], per_word: dict[str, list[int]]) -> list[list[int]] | None:
    """The columns of `positions` (the collected token positions) that each chosen phrase covers, for a mask made
    phrase by phrase and united (attention/masks.py); None for a single phrase."""
    if len(per_word) < 2:
        return None
    col = {p: i for i, p in enumerate(positions)}
    return [[col[p] for p in pos] for pos in per_word.values()]


def next_sigma(sample_sigmas: torch.Tensor, sigma: float, node: str) -> float:
    """The sigma after `sigma` in the sampler's schedule (transformer_options['sample_sigmas']).
    Raises ZSVEInputError when sigma is not one of its steps (a sampler that evaluates between the steps)."""
    hits = torch.isclose(sample_sigmas.float().cpu(), torch.tensor(sigma), rtol=1e-4, atol=1e-6).nonzero()
    if len(hits) == 0 or int(hits[0]) + 1 >= len(sample_sigmas):
        raise ZSVEInputError(f"{node}: sigma {sigma:.4f} is not a step of the sampler's schedule; use euler or ddim.")
    return float(sample_sigmas[int(hits[0]) + 1])


class BlendState:
    """What the last sampling run with the patched model blended: the mask of every blended step."""

    def __init__(self, mask_source: str, frames: int, latent_hw: tuple[int, int]):
        self.mask_source = mask_source
        self.frames = frames
        self.latent_hw = latent_hw
        self.runs = 0
        self.masks: dict[int, torch.Tensor] = {}  # edit step -> [F, h, w] on the CPU
        self.sigmas: dict[int, float] = {}
        self.total_steps = 0

    def __deepcopy__(self, memo):
        return self

    def begin_run(self, total_steps: int, first_step: int) -> None:
        """A new sampling run starts at edit step `first_step`. A run that continues the recorded one (a
        second KSamplerAdvanced starting where the first stopped) adds to its record; any other replaces it."""
        if self.masks and first_step > max(self.masks) and total_steps == self.total_steps:
            return
        self.runs += 1
        self.masks = {}
        self.sigmas = {}
        self.total_steps = total_steps

    def record(self, step: int, sigma: float, mask: torch.Tensor) -> None:
        self.masks[step] = mask.detach().to("cpu", torch.float32)
        self.sigmas[step] = sigma


class LatentBlendPatch:
    """The wrappers installed on the model clone (shared by its clones; immutable except for `state`)."""

    def __init__(self, key, inversion: Inversion, state: BlendState, mask_source: str, start: float, end: float,
                 threshold: float, dilation: int, temporal_radius: int, user_mask: torch.Tensor | None,
                 positions: list[int], phrases: list[list[int]] | None = None):
        self.key = key
        self.inv = inversion
        self.state = state
        self.mask_source = mask_source
        self.start, self.end = float(start), float(end)
        self.threshold, self.dilation, self.temporal_radius = float(threshold), int(dilation), int(temporal_radius)
        self.user_mask = user_mask
        self.positions = positions
        self.phrases = phrases  # columns of `positions` per comma-separated phrase (one mask each, united)

    def __deepcopy__(self, memo):
        return self

    @property
    def uses_attention(self) -> bool:
        return self.mask_source in ("cross-attention", "union")

    # OUTER_SAMPLE: (noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed[, latent_shapes])
    # The run itself (noise, sigmas, sampler, latent, the edit prompt) is checked by the edit contract
    # (nodes/contract.py), whose wrapper this node installs too; this wrapper only starts the mask record.
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        if len(sigmas) > 1 and float(sigmas[0]) > float(sigmas[-1]):
            k0 = self.inv.index_of_sigma(float(sigmas[0]))
            if k0 is not None:
                self.state.begin_run(self.inv.steps, self.inv.steps - k0)
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)

    # PREDICT_NOISE: (x, timestep, model_options, seed), class_obj = the guider
    def predict_noise(self, executor, x, timestep, model_options, seed, *args, **kwargs):
        to = model_options.get("transformer_options", {})
        ss = to.get("sample_sigmas")
        if ss is None or len(ss) < 2 or float(ss[0]) < float(ss[-1]):
            return executor(x, timestep, model_options, seed, *args, **kwargs)  # not a denoising run
        sigma = float(timestep.reshape(-1)[0])
        inv = self.inv
        k = inv.index_of_sigma(sigma)
        if k is None:
            raise ZSVEInputError(
                f"{NODE}: the sampler evaluated the model at sigma {sigma:.4f}, which is not on the inversion's "
                f"ddim_uniform schedule (steps={requested_steps(inv)}). Use sampler euler or ddim with scheduler "
                f"ddim_uniform and {requested_steps(inv)} steps (samplers such as heun or dpm evaluate between the steps)."
            )
        step = inv.steps - k
        if not in_window(step, inv.steps, self.start, self.end):
            return executor(x, timestep, model_options, seed, *args, **kwargs)
        if x.shape[0] != inv.frames:
            raise ZSVEInputError(f"{NODE}: the sampler's latent has {x.shape[0]} frame(s), the inversion {inv.frames}.")
        sigma_next = next_sigma(ss, sigma, NODE)
        k_next = inv.index_of_sigma(sigma_next)
        if k_next is None:
            raise ZSVEInputError(
                f"{NODE}: the sampler's next sigma {sigma_next:.4f} is not on the inversion's schedule; sample with "
                f"{requested_steps(inv)} steps and the ddim_uniform scheduler."
            )

        collector = None
        if self.uses_attention:
            collector = MapCollector(self.positions, inv.frames)
            model_options = dict(model_options)
            to = dict(to)
            to[COLLECTORS_KEY] = {**to.get(COLLECTORS_KEY, {}), self.key: collector}
            model_options["transformer_options"] = to
        denoised = executor(x, timestep, model_options, seed, *args, **kwargs)

        h, w = x.shape[-2:]
        mask = None
        if collector is not None:
            maps, hws = collector.maps()
            if not maps:
                raise ZSVEInputError(
                    f"{NODE}: no cross-attention of the positive prompt was seen in this step, so no mask could be "
                    "made. Use a guider with a positive prompt (CFGGuider/BasicGuider/KSampler), or mask_source "
                    "'user mask'."
                )
            mask = attention_blend_mask(maps, hws, (h, w), self.threshold, self.dilation, self.temporal_radius,
                                        self.phrases)
        if self.user_mask is not None:
            um = self.user_mask.to(x.device, torch.float32)
            mask = um if mask is None else torch.maximum(mask, um)
        self.state.record(step, sigma, mask)
        m = mask.to(x.device, x.dtype).unsqueeze(1)
        src_next = inv.latents[k_next].to(x.device, x.dtype)
        return blended_denoised(denoised, x, src_next, m, sigma, sigma_next)


def apply_latent_blend(model, inversion, mask_source="cross-attention", start=0.0, end=1.0, threshold=0.3,
                       dilation=3, temporal_radius=0, prompts=None, words="", mask=None):
    """The node's work, callable from Python: returns (patched clone, BlendState, summary)."""
    check_diffusion_model(model, NODE)
    if not isinstance(inversion, Inversion):
        raise ZSVEInputError(f"{NODE}: 'inversion' must be the inversion output of VideoDDIMInvert.")
    check_choice(NODE, "mask_source", mask_source, MASK_SOURCES)
    if not (0.0 <= start <= end <= 1.0):
        raise ZSVEInputError(f"{NODE}: need 0 <= start <= end <= 1 (fractions of the steps), got {start}..{end}.")
    if dilation < 1 or dilation % 2 == 0:
        raise ZSVEInputError(f"{NODE}: dilation must be an odd kernel size (1 = none, 3, 5, ...), got {dilation}.")
    frames, _, h, w = inversion.latent_shape

    positions: list[int] = []
    per_word: dict = {}
    pair = None
    if mask_source in ("cross-attention", "union"):
        if prompts is None:
            raise ZSVEInputError(f"{NODE}: mask_source '{mask_source}' needs the prompt pair: connect Edit Prompts' "
                                 "'prompts' output to 'prompts' and name the edited words in 'words'.")
    if prompts is not None:
        pair = check_pair(prompts, NODE)
        check_inversion_prompt(pair, inversion, NODE)
    if mask_source in ("cross-attention", "union"):
        positions, per_word = word_token_positions(pair, words)
    user_mask = None
    if mask_source in ("user mask", "union"):
        if mask is None:
            raise ZSVEInputError(f"{NODE}: mask_source '{mask_source}' needs a MASK: connect one to 'mask' (one per "
                                 "frame or a single mask), or use mask_source 'cross-attention'.")
        if torch.is_tensor(mask):
            check_finite(mask if mask.ndim > 2 else mask[None], NODE, "the 'mask' input",
                         "Check the node that made the mask.")
        try:
            user_mask = prepare_user_mask(mask, frames, h, w)
        except ValueError as e:
            raise ZSVEInputError(f"{NODE}: {e}.") from None

    m = model.clone()
    key = f"zsve_latent_blend_{uuid.uuid4().hex[:12]}"
    state = BlendState(mask_source, frames, (h, w))
    patch = LatentBlendPatch(key, inversion, state, mask_source, start, end, threshold, dilation, temporal_radius,
                             user_mask, positions, phrase_columns(positions, per_word))
    layers: list[str] = []
    if patch.uses_attention:
        layers = second_lowest_resolution_layers(transformer_downsampling(m))
        add_processor(m, BlendMapProcessor(key, layers))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, patch.outer_sample)
    install_contract(m, NODE, inversion, None if pair is None else pair.edit.embedding,
                     "" if pair is None else pair.edit.text, None if pair is None else pair.edit.pooled)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, key, patch.predict_noise)

    first = sum(1 for i in range(inversion.steps) if not in_window(i, inversion.steps, start, 1.0))
    n_blend = sum(1 for i in range(inversion.steps) if in_window(i, inversion.steps, start, end))
    summary = f"blend {n_blend} of {inversion.steps} steps (from step {first}), mask: {mask_source}"
    if per_word:
        summary += f", words at tokens {per_word}, layers {layers}"
    return m, state, summary


# --- nodes ---------------------------------------------------------------------------------------------


class LatentBlendWithInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Latent Blend With Inversion (Blended Latent, FateZero)",
            category=CATEGORY + "/Blended Latent",
            description=(
                "Blended Latent Diffusion under attention control: at each edit step in [start, end) the latent "
                "becomes M * edit + (1 - M) * the DDIM inversion latent of the source at the same sigma, so "
                "everything outside the mask M comes from the input video. M per frame comes from the edit "
                "prompt's cross-attention of the chosen words (computed online in each step), from a MASK, or "
                "both. Patches the model: sample with KSamplerAdvanced (add_noise disable, sampler euler or "
                "ddim, scheduler ddim_uniform, the inversion's steps) or SamplerCustomAdvanced, starting from "
                "z_T. Composes with the other attention patches of the pack."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x/2.x or SDXL family), possibly already patched by "
                               "other attention nodes (temporal attention, attention blend)."),
                InversionType.Input("inversion", tooltip="The inversion output of Video DDIM Invert of the source "
                                    "video: its per-step latents are the background."),
                io.Combo.Input("mask_source", options=list(MASK_SOURCES), default="cross-attention",
                               tooltip="Where the mask comes from: the cross-attention of 'words' in the edit "
                               "prompt (automatic, recomputed each step), the 'mask' input, or the union of both."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First blended step, as a fraction of the steps (0 = from the first step)."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Blending stops before this fraction of the steps. Keep 1 to keep the "
                               "background exactly; smaller values let the last steps harmonise the seams."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Cross-attention masks: a latent pixel is edited where the words' attention, "
                               "normalised by each frame's maximum, exceeds this (FateZero uses 0.3)."),
                io.Int.Input("dilation", default=3, min=1, max=31, step=2,
                             tooltip="Cross-attention masks: odd kernel size (in latent pixels) to grow the mask "
                             "by; 1 = no dilation."),
                io.Int.Input("temporal_smoothing", default=0, min=0, max=16,
                             tooltip="Cross-attention masks: average the attention over this many neighbouring "
                             "frames on each side before thresholding (0 = per frame)."),
                PromptPairType.Input("prompts", optional=True,
                                     tooltip="For cross-attention masks: the prompt pair of Edit Prompts (its edit "
                                     "prompt is the sampler's positive; 'words' are its words). Connected, the "
                                     "sampler's positive is also checked to be that edit prompt."),
                io.String.Input("words", default="", optional=True,
                                tooltip="For cross-attention masks: the edited word(s) of the edit prompt, comma-separated "
                                "(a word may span several tokens); their attention makes the mask. Each comma-"
                                "separated phrase is masked on its own and the masks are united ('red hat, "
                                "green dots': the hat and the whole dotted background)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="For 'user mask' / 'union': where to edit (1) and keep the source (0), one "
                              "mask per frame or one for all, at the frames' size (resized to the latent)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The patched model: sample the edit with it."),
                BlendStateType.Output(display_name="blend_state",
                                      tooltip="Records the masks of the last sampling run with this model; "
                                      "connect to Latent Blend Mask Preview."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, mask_source, start, end, threshold, dilation, temporal_smoothing,
                prompts=None, words="", mask=None) -> io.NodeOutput:
        m, state, summary = apply_latent_blend(model, inversion, mask_source, start, end, threshold, dilation,
                                               temporal_smoothing, prompts, words or "", mask)
        return io.NodeOutput(m, state, ui={"text": [summary]})


FRESH_NODE = "FreshNoiseStart"


class FreshNoisePatch:
    """The PREDICT_NOISE wrapper of Fresh Noise Start (immutable; shared by the clone's clones)."""

    def __init__(self, inversion: Inversion, mask: torch.Tensor):
        self.inv = inversion
        self.mask = mask  # [F, h, w] 0/1 at the latent's size

    def __deepcopy__(self, memo):
        return self

    # PREDICT_NOISE: (x, timestep, model_options, seed), class_obj = the guider
    def __call__(self, executor, x, timestep, model_options, seed, *args, **kwargs):
        to = model_options.get("transformer_options", {})
        ss = to.get("sample_sigmas")
        inv = self.inv
        sigma = float(timestep.reshape(-1)[0])
        first = ss is not None and len(ss) > 1 and float(ss[0]) > float(ss[-1]) and inv.index_of_sigma(sigma) == inv.steps
        if not first:  # not the edit's first step (later steps, or not a denoising run): nothing to do
            return executor(x, timestep, model_options, seed, *args, **kwargs)
        f = inv.frames
        guider = getattr(executor, "class_obj", None)
        # the Video-P2P Guider's batch is [source branch; target branch]: the fresh start is the target's; the
        # source branch keeps reconstructing from z_T
        t = edit_rows(guider, x.shape[0])
        if t.stop - t.start != f:
            raise ZSVEInputError(
                f"{FRESH_NODE}: the guider evaluates {x.shape[0]} latent frames at once but the inversion has {f}: "
                "sample with KSamplerAdvanced / SamplerCustomAdvanced from this inversion's z_T (or the Video-P2P "
                "Guider, whose two branches it knows)."
            )
        sigma_next = next_sigma(ss, sigma, FRESH_NODE)
        x_in = x.clone()
        x_in[t] = fresh_noise_start(x[t], inv.latents[0].to(x.device, x.dtype),
                                    self.mask.to(x.device, x.dtype).unsqueeze(1), sigma, seed)
        denoised = executor(x_in, timestep, model_options, seed, *args, **kwargs)
        out = denoised.clone()  # a Video-P2P source branch's rows as the guider gave them, bit for bit
        out[t] = background_denoised(x[t], euler_step(x_in[t], denoised[t], sigma, sigma_next), sigma, sigma_next)
        return out


def apply_fresh_noise_start(model, inversion, mask) -> tuple[object, str]:
    """Fresh Noise Start's work, callable from Python: (patched clone, summary).
    mask: a MASK ([H, W] or [F, H, W], 0..1, the frames' or the latent's size); a latent pixel starts from fresh
    noise where the mask's area average over it is > 0.5 (no dilation: toy/RESULTS.md, "Colour swaps against a
    faithful z_T"). Raises ZSVEInputError naming the input and the value to use."""
    check_diffusion_model(model, FRESH_NODE)
    if not isinstance(inversion, Inversion):
        raise ZSVEInputError(f"{FRESH_NODE}: 'inversion' must be the inversion output of VideoDDIMInvert.")
    if not torch.is_tensor(mask):
        raise ZSVEInputError(f"{FRESH_NODE}: 'mask' must be a MASK (e.g. Source Attention Mask of the edited object).")
    check_finite(mask if mask.ndim > 2 else mask[None], FRESH_NODE, "the 'mask' input",
                 "Check the node that made the mask.")
    frames, _, h, w = inversion.latent_shape
    try:
        latent_mask = (prepare_user_mask(mask, frames, h, w) > 0.5).float()
    except ValueError as e:
        raise ZSVEInputError(f"{FRESH_NODE}: mask: {e}.") from None
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, f"zsve_fresh_noise_{uuid.uuid4().hex[:12]}",
                           FreshNoisePatch(inversion, latent_mask))
    install_contract(m, FRESH_NODE, inversion)
    cover = float(latent_mask.mean())
    summary = f"the first step starts from fresh noise in {cover:.0%} of the latent (the sampler's noise_seed)"
    if cover == 0.0:
        summary += (". Warning: the mask covers no latent pixel (a pixel needs more than half of its 8x8 block in "
                    "the mask), so the edit starts from z_T everywhere")
        ui_warning(FRESH_NODE, "the mask covers no latent pixel: the edit starts from z_T everywhere")
    return m, summary


class FreshNoiseStart(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=FRESH_NODE,
            display_name="Fresh Noise Start (object edits)",
            category=CATEGORY,
            description=(
                "Starts the edit inside a mask from fresh noise on the source latent instead of the inverted z_T "
                "(Blended Latent Diffusion's own start), for object edits that a faithful inversion holds back (a "
                "new colour on the old object). The noise is one map for all frames, from the sampler's "
                "noise_seed; outside the mask the edit starts from z_T. Put it on the edit model of any method "
                "sampled with KSamplerAdvanced (FateZero's Attention Blend, InFusion Inject, Latent Blend With "
                "Inversion; with the Video-P2P Guider, on its model: the target branch starts afresh) and connect "
                "Source Attention Mask of the edited object; leave it out for background edits."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The edit model (after or before the method's node)."),
                InversionType.Input("inversion", tooltip="The inversion output of Video DDIM Invert of the source "
                                    "video: its clean latent is what the fresh noise is added to."),
                io.Mask.Input("mask", tooltip="Where to start from fresh noise: the edited object in the source video "
                              "(Source Attention Mask of e.g. 'red circle'), one mask per frame or one for all, "
                              "at the frames' size (a latent pixel counts when more than half of it is covered)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The edit model; sample it from z_T as usual.")],
        )

    @classmethod
    def execute(cls, model, inversion, mask) -> io.NodeOutput:
        m, summary = apply_fresh_noise_start(model, inversion, mask)
        return io.NodeOutput(m, ui={"text": [summary]})


def state_masks(state: BlendState, step: int) -> tuple[torch.Tensor, int]:
    if not state.masks:
        raise ZSVEInputError(
            "LatentBlendMaskPreview: no blended step has been recorded yet. Sample with the MODEL of this "
            "LatentBlendWithInversion node and connect that sampler's LATENT output to 'samples'."
        )
    steps = sorted(state.masks)
    if step < 0:
        chosen = steps[-1]
    elif step in state.masks:
        chosen = step
    else:
        raise ZSVEInputError(f"LatentBlendMaskPreview: step {step} was not blended; blended steps: {steps} "
                             "(-1 = the last).")
    return state.masks[chosen], chosen


class LatentBlendMaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LatentBlendMaskPreview",
            display_name="Latent Blend Mask Preview (Blended Latent)",
            category=CATEGORY + "/Blended Latent",
            description=(
                "The per-frame masks Latent Blend With Inversion used in the last sampling run, as a MASK and as "
                "an overlay on the frames. Connect the sampler's LATENT so this runs after the sampler."
            ),
            inputs=[
                BlendStateType.Input("blend_state", tooltip="The blend_state output of Latent Blend With Inversion."),
                io.Latent.Input("samples", tooltip="The LATENT the sampler produced with the patched model (only "
                                "orders this node after the sampler; its frame count is checked)."),
                io.Int.Input("step", default=-1, min=-1, max=10000,
                             tooltip="Which edit step's mask to show: -1 = the last blended step, else the step "
                             "index (0 = the first, noisiest step)."),
                io.Image.Input("images", optional=True,
                               tooltip="The source frames to draw the overlay on (e.g. the decoded input video); "
                               "without them the overlay is drawn on grey."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="The blend mask per frame (1 = edited), at the frames' "
                               "size (or 8x the latent size without images)."),
                io.Image.Output(display_name="overlay", tooltip="The frames with the edited region tinted red."),
            ],
        )

    @classmethod
    def execute(cls, blend_state, samples, step, images=None) -> io.NodeOutput:
        mask, chosen = state_masks(blend_state, step)
        frames = samples["samples"].shape[0] if isinstance(samples, dict) and "samples" in samples else None
        if frames is not None and frames != mask.shape[0]:
            raise ZSVEInputError(f"LatentBlendMaskPreview: 'samples' has {frames} frames but the recorded masks "
                                 f"{mask.shape[0]}: connect the LATENT of the sampler that used this blend.")
        if images is not None:
            H, W = images.shape[1], images.shape[2]
            if images.shape[0] not in (1, mask.shape[0]):
                raise ZSVEInputError(f"LatentBlendMaskPreview: 'images' has {images.shape[0]} frames, the masks "
                                     f"{mask.shape[0]}: connect the frames of the same video.")
        else:
            H, W = mask.shape[-2] * 8, mask.shape[-1] * 8
        big = F.interpolate(mask.unsqueeze(1), size=(H, W), mode="nearest")[:, 0].clamp(0, 1)
        base = images.float() if images is not None else torch.full((mask.shape[0], H, W, 3), 0.5)
        red = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3)
        a = 0.5 * big.unsqueeze(-1)
        overlay = (base * (1 - a) + red * a).clamp(0, 1)
        text = f"mask of step {chosen} ({blend_state.mask_source}); mean coverage {float(mask.mean()):.1%}"
        return io.NodeOutput(big, overlay, ui={"text": [text]})


def source_attention_mask(inversion, prompts, words: str, threshold: float = 0.3, window: float = 0.5,
                          node: str = "SourceAttentionMask") -> tuple[torch.Tensor, str]:
    """Where the source prompt's `words` are in the source video: [F, H, W] float 0/1 at the frames' size (8x the
    latent), 1 where the words' mask (the pack's mask recipe on the cross-attention the inversion recorded; each
    comma-separated phrase on its own, united) holds in at least half of the recorded steps in the first `window`
    of the edit's steps (0 = the noisiest). The same mask as FateZero's blend mask (attention/fatezero.py
    `preview_mask`, a per-pixel fraction of the steps), made binary by the majority of the steps.

    Why: Latent Blend's cross-attention mask follows the edit's new object; where the edit draws it elsewhere
    than the old one, the old object stays outside the mask and is kept from the source (toy dev split:
    Blended latent colour swaps 75% of the frames; with this mask of the old object united, 100%). Prompt-to-
    Prompt's Local Blend unites the source words' and the target words' masks for the same reason.
    Raises ZSVEInputError (no attention recorded, words not in the source prompt)."""
    from ..attention.fatezero import FusionConfigError, make_plan, preview_mask
    from .fatezero import RECORD_NAME

    pair = check_pair(prompts, node)
    if not isinstance(inversion, Inversion):
        raise ZSVEInputError(f"{node}: 'inversion' must be the inversion output of VideoDDIMInvert.")
    check_inversion_prompt(pair, inversion, node)
    store = inversion.records.get(RECORD_NAME)
    if store is None:
        raise ZSVEInputError(f"{node}: this inversion recorded no attention. Put Attention Store between the model "
                             "and Video DDIM Invert (record_window > 0) and run the inversion again.")
    st = store.masks if getattr(store, "recompute", False) else store
    if st is None or not st.layer_names("cross"):
        raise ZSVEInputError(f"{node}: the inversion kept no cross-attention to make the mask from: turn Attention "
                             "Store's skip_full_res off.")
    if not align.split_phrases(words or ""):
        raise ZSVEInputError(f"{node}: 'words' is empty: name what to mask with words of the source prompt "
                             f"{pair.source.plain!r} (e.g. the edited object 'red circle').")
    if not (0.0 < window <= 1.0):
        raise ZSVEInputError(f"{node}: window must be in (0, 1] (a fraction of the steps), got {window}.")
    try:
        plan = make_plan(pair.tokenizer, pair.source.plain, pair.source.plain, inversion.timesteps,
                         self_window=(0.0, float(window)), cross_window=0.0, blend_words=words,
                         blend_threshold=float(threshold))
    except FusionConfigError as e:
        msg = str(e).replace("; blend words name the object in the source video", "")
        raise ZSVEInputError(f"{node}: {msg}".replace("blend_words", "words") + ": words name what to mask in the "
                             "source video, with words of the source prompt") from None
    h, w = inversion.latent_shape[-2:]
    a, b = plan.self_steps
    in_window = [t for t, i in plan.timestep_to_step.items() if a <= i < b]
    recorded = [t for t in in_window if st.has_step(t)]
    note = None
    if len(recorded) < len(in_window):
        note = (f"the window holds {len(in_window)} steps but Attention Store recorded {len(recorded)} of them "
                f"({'the mask uses every recorded step' if not recorded else 'the mask uses those'}); to use the "
                f"whole window set Attention Store's record_window to at least {window:g} and run the inversion again")
        ui_warning(node, note)
    frac = preview_mask(st, plan, (h, w))
    mask = (frac >= 0.5).float()
    mask = F.interpolate(mask.unsqueeze(1), scale_factor=8, mode="nearest")[:, 0]
    covered = float(mask.mean())
    text = f"{words}: {covered:.0%} of the frames' area (mean over {mask.shape[0]} frames)"
    return mask, text + (f". Warning: {note}" if note else "")


class SourceAttentionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SourceAttentionMask",
            display_name="Source Attention Mask (Blended Latent)",
            category=CATEGORY + "/Blended Latent",
            description=(
                "Where words of the SOURCE prompt are in the source video, from the cross-attention Attention Store "
                "recorded at the inversion: a MASK per frame (1 where the words' mask holds in most of the first "
                "steps). Connect it to Latent Blend With Inversion's 'mask' with mask_source 'union', so that the "
                "blend covers the old object as well as the new one (Prompt-to-Prompt's Local Blend unites both)."
            ),
            inputs=[
                InversionType.Input("inversion", tooltip="The inversion output of Video DDIM Invert, run on a model "
                                    "with Attention Store (its recorded cross-attention makes the mask)."),
                PromptPairType.Input("prompts", tooltip="The prompt pair of Edit Prompts; 'words' are words of its "
                                     "source prompt (the inversion's prompt)."),
                io.String.Input("words", default="",
                                tooltip="Words of the SOURCE prompt naming what the edit replaces (e.g. 'red circle'); "
                                "several things as comma-separated phrases, each masked on its own and united."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Mask threshold on the normalised cross-attention (FateZero / Prompt-to-Prompt: "
                               "0.3)."),
                io.Float.Input("window", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="The first fraction of the steps (noisiest first) whose recorded attention "
                               "votes: a pixel is in the mask when it is in at least half of them. Attention "
                               "Store's record_window must cover it."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="1 where the words are, per frame, at the frames' "
                                    "size (8x the latent).")],
        )

    @classmethod
    def execute(cls, inversion, prompts, words, threshold, window) -> io.NodeOutput:
        mask, text = source_attention_mask(inversion, prompts, words, threshold, window)
        return io.NodeOutput(mask, ui={"text": [text]})


NODES = [LatentBlendWithInversion, LatentBlendMaskPreview, SourceAttentionMask, FreshNoiseStart]
