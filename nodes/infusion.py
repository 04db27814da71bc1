"""InFusion nodes: InFusionSource (record the source features during Video DDIM Invert) and InFusionInject
(feature-difference injection, source key/value injection and masked attention fusion during the edit
sampling). The algorithm is in ../attention/infusion.py.

Decoder ResBlock outputs are read and changed through ComfyUI's keyed DIFFUSION_MODEL wrapper: for the
duration of one UNet call the wrapper registers torch forward hooks on `unet.output_blocks[k][0]` and
removes them in `finally`. No module is replaced, so LoRA weight patches (baked into the same modules'
weights) and ControlNet residuals (added outside the ResBlocks) still apply.
"""

from __future__ import annotations

import logging

import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy_api.latest import io

from ..attention import arch
from ..attention.infusion import (
    DEFAULT_ALPHA,
    DEFAULT_S1,
    DEFAULT_S2,
    DEFAULT_THRESHOLD,
    InFusionConfigError,
    InFusionController,
    InFusionRecordConfig,
    InFusionRecordSpec,
    check_record,
    edit_step,
    make_plan,
    parse_blocks,
)
from ..attention.p2p import END_OF_TEXT_MAPS
from ._attn_patch import (
    PROCESSORS_KEY,
    RECORDERS_KEY,
    add_processor,
    add_record_spec,
    chunk_kinds,
    in_guidance_pass,
)
from ._comfy import CATEGORY, InversionType, ZSVEInputError, check_choice, check_diffusion_model, unet_config
from .contract import install_contract
from .prompts import PromptPairType, check_inversion_prompt, check_pair, end_of_text_maps_input, end_of_text_note

IF_CATEGORY = CATEGORY + "/InFusion"
RECORD_NAME = "infusion"
RECORD_WRAPPER_KEY = "zsve_infusion_record"
INJECT_WRAPPER_KEY = "zsve_infusion_inject"
DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
log = logging.getLogger(__name__)

DEFAULTS_DOC = (
    "Defaults where the paper is silent are Plug-and-Play's: features of the ResBlock of decoder block 4, "
    "self-attention of decoder blocks 4-11 on SD1.5 ('auto' takes the same blocks by structure on other UNets: "
    "decoder block 1 and blocks 1-5 on SDXL), feature/key-value injection into both halves of the guidance; the "
    "windows S1=0.5, S2=0.8 are PnP's two thresholds placed in the paper's order. Our own choices: alpha 0.5, "
    "mask threshold 0.3 (FateZero), the fusion row-normalised where Me != Ms (see attention/infusion.py)."
)


def _hook(fns):
    def hook(module, inputs, output):
        out = output
        for fn in fns:
            new = fn(out)
            if new is not None:
                out = new
        return out if out is not output else None
    return hook


class ResBlockHooks:
    """A DIFFUSION_MODEL wrapper: scoped forward hooks on decoder ResBlocks for one UNet call.

    Without a controller it serves the inversion's InFusion recorder (found in the run's
    transformer_options["zsve_recorders"]); with one it injects the source features for the edit."""

    def __init__(self, controller: InFusionController | None = None):
        self.controller = controller

    def __deepcopy__(self, memo):
        return self

    def _targets(self, to: dict, timesteps, batch: int) -> dict:
        cou = chunk_kinds(to)  # in a guidance pass (SAG's), the kinds of the main pass
        t = int(torch.as_tensor(timesteps).reshape(-1)[0].round().item())
        window = to.get("context_window")
        frame_index = list(window.index_list) if window is not None and hasattr(window, "index_list") else None
        found: dict = {}
        if self.controller is None:
            rec = (to.get(RECORDERS_KEY) or {}).get(RECORD_NAME)
            if rec is None or to.get("sigmas") is None or in_guidance_pass(to):
                return {}
            step, total = edit_step(to.get("sample_sigmas"), to["sigmas"])
            found = rec.feature_targets(t, step, total, cou, batch, frame_index)
        else:
            found = self.controller.feature_targets(t, cou, batch, frame_index)
        return {b: [fn] for b, fn in found.items()}

    def __call__(self, executor, *args, **kwargs):
        unet = executor.class_obj
        to = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        timesteps = args[1] if len(args) > 1 else kwargs.get("timesteps")
        targets = self._targets(to or {}, timesteps, int(args[0].shape[0])) if timesteps is not None else {}
        if not targets:
            return executor(*args, **kwargs)
        handles = []
        try:
            for block, fns in targets.items():
                handles.append(unet.output_blocks[block][0].register_forward_hook(_hook(fns)))
            return executor(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()


def _blocks(text: str, node: str, what: str, model=None) -> tuple[int, ...]:
    """The blocks of a block input; 'auto' (or empty): the model's defaults (attention/arch.py infusion_blocks)."""
    if str(text or "").strip().lower() in ("", "auto"):
        try:
            feature, attention = arch.infusion_blocks(unet_config(model))
        except arch.ArchitectureError as e:
            raise ZSVEInputError(f"{node}: {what} 'auto': {e}; give the blocks explicitly.") from None
        return feature if what == "feature_blocks" else attention
    try:
        return parse_blocks(text, what)
    except InFusionConfigError as e:
        raise ZSVEInputError(f"{node}: {e}") from None


def _valid_blocks_hint(unet, cfg: dict) -> str:
    """The blocks of this model a user can give, and what 'auto' takes on it."""
    n = len(unet.output_blocks)
    attn = [b for b in range(n) if any(isinstance(layer, SpatialTransformer) for layer in unet.output_blocks[b])]
    res = [b for b in range(n) if type(unet.output_blocks[b][0]).__name__ == "ResBlock"]
    try:
        feature, attention = arch.infusion_blocks(cfg)
        auto = f"; 'auto' takes feature_blocks {arch.format_blocks(feature)} and attention_blocks " \
               f"{arch.format_blocks(attention)} on it (Plug-and-Play's 4 and 4-11 on SD1.5)"
    except arch.ArchitectureError:
        auto = ""
    fam = arch.family(cfg) if cfg else ""
    return (f"this {fam + ' ' if fam else ''}UNet has {n} decoder blocks 0-{n - 1}: feature_blocks may "
            f"be {arch.format_blocks(res) or 'none'} (blocks starting with a ResBlock), attention_blocks "
            f"{arch.format_blocks(attn) or 'none'} (blocks with attention){auto}")


def check_blocks(model, feature_blocks, attention_blocks, node: str) -> None:
    """Clear errors for blocks the model does not have, naming the blocks it has (SD1.5: 12, SDXL: 9)."""
    unet = model.get_model_object("diffusion_model")
    cfg = unet_config(model)
    n = len(unet.output_blocks)
    for what, blocks in (("feature_blocks", feature_blocks), ("attention_blocks", attention_blocks)):
        bad = [b for b in blocks if b >= n]
        if bad:
            raise ZSVEInputError(f"{node}: {what} {arch.format_blocks(bad)} do not exist: "
                                 f"{_valid_blocks_hint(unet, cfg)}.")
    for b in feature_blocks:
        first = unet.output_blocks[b][0]
        if type(first).__name__ != "ResBlock":
            raise ZSVEInputError(f"{node}: output block {b} does not start with a ResBlock ({type(first).__name__}); "
                                 f"{_valid_blocks_hint(unet, cfg)}.")
    if not any(isinstance(layer, SpatialTransformer) for b in attention_blocks for layer in unet.output_blocks[b]):
        raise ZSVEInputError(f"{node}: output blocks {arch.format_blocks(attention_blocks)} have no attention "
                             f"layers; {_valid_blocks_hint(unet, cfg)}.")


def _common_inputs():
    return [
        io.String.Input("feature_blocks", default="auto",
                        tooltip="Decoder (output) blocks whose ResBlock output is injected in the feature phase, "
                        "e.g. '4' or '3,4'. 'auto' = Plug-and-Play's layer for the model: 4 on SD1.x/2.x (output "
                        "blocks 0-11), 1 on SDXL (output blocks 0-8)."),
        io.String.Input("attention_blocks", default="auto",
                        tooltip="Decoder blocks whose self-attention gets the source keys/values (S1..S2) and whose "
                        "attention is fused (after S2), e.g. '4-11'. 'auto' = Plug-and-Play's self-attention layers "
                        "for the model: 4-11 on SD1.x/2.x, 1-5 on SDXL (its blocks 6-8 have no attention)."),
        io.Float.Input("feature_end", default=DEFAULT_S1, min=0.0, max=1.0, step=0.05,
                       tooltip="S1: fraction of the steps (from the noisiest) with feature-difference injection. "
                       "Default 0.5 (Plug-and-Play's attention threshold; the paper gives no value)."),
        io.Float.Input("kv_end", default=DEFAULT_S2, min=0.0, max=1.0, step=0.05,
                       tooltip="S2: steps from S1 up to this fraction get the source keys/values (outside the concepts' "
                       "source masks when there are concepts); later steps are "
                       "fused with masks. Default 0.8 (Plug-and-Play's feature threshold)."),
    ]


class InFusionSource(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InFusionSource",
            display_name="InFusion Source Features",
            category=IF_CATEGORY,
            description=(
                "Makes Video DDIM Invert record what InFusion's edit injects: connect this node's MODEL to Video DDIM "
                "Invert (with the source prompt). Recorded at every inversion step under the model timestep that the "
                "matching edit step evaluates, fp16 on the CPU, only for the steps that need it: decoder ResBlock "
                "outputs for steps before S1, self-attention keys/values for S1..S2, and the attention (self q/k, "
                "cross maps) for the fusion after S2. The record travels in the inversion output "
                "(inversion.records['infusion']); its size in bytes is shown by InFusion Inject. Use the same blocks "
                "and windows in InFusion Inject. " + DEFAULTS_DOC
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x/2.x or SDXL family, LoRA allowed) that Video DDIM "
                               "Invert will use."),
                *_common_inputs(),
                io.Boolean.Input("skip_full_res", default=True,
                                 tooltip="Fuse (and record for the fusion) only attention layers coarser than the "
                                 "model's finest attention level, as FateZero's store (SD1.5: the 64x64 maps at "
                                 "512x512; SDXL: its 64x64 maps at 1024x1024). Key/value injection uses every chosen "
                                 "layer regardless."),
                io.Float.Input("memory_budget_gb", default=0.0, min=0.0, max=4096.0, step=0.5,
                               tooltip="Refuse to record more than this many GiB (checked as the record grows). "
                               "0 = no limit."),
            ],
            outputs=[io.Model.Output(tooltip="The model, set to record InFusion's source features during Video DDIM "
                                     "Invert (nothing changes in its outputs).")],
        )

    @classmethod
    def execute(cls, model, feature_blocks, attention_blocks, feature_end, kv_end, skip_full_res,
                memory_budget_gb) -> io.NodeOutput:
        node = "InFusionSource"
        check_diffusion_model(model, node)
        fb = _blocks(feature_blocks, node, "feature_blocks", model)
        ab = _blocks(attention_blocks, node, "attention_blocks", model)
        check_blocks(model, fb, ab, node)
        if kv_end < feature_end:
            raise ZSVEInputError(f"{node}: kv_end ({kv_end:g}) must not be before feature_end ({feature_end:g}).")
        cfg = InFusionRecordConfig(feature_blocks=fb, attention_blocks=ab, s1=float(feature_end), s2=float(kv_end),
                                   fusion_min_factor=arch.store_min_factor(unet_config(model), bool(skip_full_res)),
                                   budget_bytes=int(float(memory_budget_gb) * 2**30))
        m = model.clone()
        add_record_spec(m, RECORD_NAME, InFusionRecordSpec(cfg))
        m.remove_wrappers_with_key(DIFFUSION_MODEL, RECORD_WRAPPER_KEY)
        m.add_wrapper_with_key(DIFFUSION_MODEL, RECORD_WRAPPER_KEY, ResBlockHooks(None))
        return io.NodeOutput(m)


class InFusionInject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InFusionInject",
            display_name="InFusion Inject",
            category=IF_CATEGORY,
            description=(
                "InFusion's multi-concept edit (Khandelwal 2023), following the paper's schedule: steps before S1 "
                "inject the difference of the decoder ResBlock features obtained with the source and the edit prompt "
                "(f_edit + strength * (f_source - f_edit)) outside the concepts' source masks, so that what is not "
                "edited keeps the source's features and the concepts keep the edit's (the reading that edits and "
                "keeps best on the toy benchmark's dev split, docs/infusion.md); steps S1..S2 let self-attention query the source's keys "
                "and values outside the concepts' source masks too (inside, the edit's own: the paper injects them to "
                "retain the unedited concepts); the concepts' region of both injections is their source masks plus, per "
                "concept, where its words get most of the attention the prompt's words get (plain backgrounds; fixed "
                "readings, docs/infusion.md); later steps fuse attention with masks: self-attention Me*edit + (1-Ms)*source, "
                "cross-attention alpha*edit + (1-alpha)*source, Ms/Me from the source/edit cross-attention of each "
                "concept's words. Source features come from the same timestep of the inversion (InFusion Source "
                "Features -> Video DDIM Invert). ResBlocks are read through scoped forward hooks in a DIFFUSION_MODEL "
                "wrapper, so LoRA and ControlNet still apply. Sample with KSamplerAdvanced (add_noise disable, ddim, "
                "ddim_uniform, the inversion's steps) from z_T, positive = the edit prompt. " + DEFAULTS_DOC
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model for the edit sampling (LoRA before or after this node both "
                               "work)."),
                InversionType.Input("inversion", tooltip="The inversion of Video DDIM Invert, run on a model patched "
                                    "by InFusion Source Features."),
                PromptPairType.Input("prompts", tooltip="The prompt pair of Edit Prompts (source = the inversion's "
                                     "positive, edit = the sampler's positive); the concepts name their words."),
                io.String.Input("concepts", default="",
                                tooltip="The edited concepts as 'source words->edit words' pairs, comma separated, "
                                "e.g. 'cat->dog, red->blue'. Each pair gets its own mask from cross-attention. Empty: "
                                "a global edit (no masks)."),
                *_common_inputs(),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Strength of the injected feature difference: 1 replaces the edit's ResBlock "
                               "output by the source's (Plug-and-Play) outside the concepts' source masks, 0 disables "
                               "the feature phase. Without concepts it acts everywhere."),
                io.Float.Input("alpha", default=DEFAULT_ALPHA, min=0.0, max=1.0, step=0.05,
                               tooltip="Cross-attention fusion weight of the edit's maps (1 - alpha for the source's); "
                               "the paper gives no value, 0.5 is our default."),
                io.Float.Input("mask_threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.05,
                               tooltip="Threshold of the per-frame-normalised cross-attention that makes the masks "
                               "(FateZero/P2P: 0.3)."),
                io.Boolean.Input("inject_uncond", default=True,
                                 tooltip="Inject features and keys/values into the unconditional half of guidance too "
                                 "(Plug-and-Play does). The fusion always acts on the conditional half."),
                end_of_text_maps_input(),
            ],
            outputs=[
                io.Model.Output(tooltip="The model patched for the edit sampling."),
                io.Mask.Output(display_name="masks",
                               tooltip="Per-concept source masks Ms at pixel resolution, averaged over the fusion "
                               "steps: concept 1's frames, then concept 2's, ... (zeros without concepts or fusion "
                               "steps). The region the feature and key/value injections leave alone also takes in "
                               "where a concept's words get most of the prompt's words' attention (not shown here)."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, prompts, concepts, feature_blocks,
                attention_blocks, feature_end, kv_end, strength, alpha, mask_threshold, inject_uncond,
                end_of_text_maps=END_OF_TEXT_MAPS[0]) -> io.NodeOutput:
        node = "InFusionInject"
        check_diffusion_model(model, node)
        check_choice(node, "end_of_text_maps", end_of_text_maps, END_OF_TEXT_MAPS)
        record = getattr(inversion, "records", {}).get(RECORD_NAME) if inversion is not None else None
        if record is None:
            raise ZSVEInputError(
                f"{node}: this inversion recorded no InFusion source features. Put InFusion Source Features between "
                "the model and Video DDIM Invert and run the inversion again."
            )
        pair = check_pair(prompts, node)
        fb = _blocks(feature_blocks, node, "feature_blocks", model)
        ab = _blocks(attention_blocks, node, "attention_blocks", model)
        check_blocks(model, fb, ab, node)
        try:
            check_inversion_prompt(pair, inversion, node)
            plan = make_plan(pair.tokenizer, pair.source.plain, pair.edit.plain, concepts, inversion.timesteps,
                             feature_blocks=fb, attention_blocks=ab, s1=float(feature_end), s2=float(kv_end),
                             strength=float(strength), alpha=float(alpha), threshold=float(mask_threshold),
                             inject_uncond=bool(inject_uncond), end_of_text_maps=end_of_text_maps)
            check_record(record, plan, hint="re-run Video DDIM Invert with InFusion Source Features set like this node")
        except InFusionConfigError as e:
            raise ZSVEInputError(f"{node}: {e}") from None
        for note in plan.notes:
            log.warning("%s: %s", node, note)
        controller = InFusionController(record, plan)
        m = model.clone()
        to = m.model_options.setdefault("transformer_options", {})
        to[PROCESSORS_KEY] = [p for p in to.get(PROCESSORS_KEY, []) if not isinstance(p, InFusionController)]
        add_processor(m, controller)
        m.remove_wrappers_with_key(DIFFUSION_MODEL, INJECT_WRAPPER_KEY)
        m.add_wrapper_with_key(DIFFUSION_MODEL, INJECT_WRAPPER_KEY, ResBlockHooks(controller))
        install_contract(m, node, inversion, pair.edit.embedding, pair.edit.text, pair.edit.pooled)
        masks = preview_masks(controller, record, plan)
        text = [record.summary()] + plan.notes
        cover = region_cover(controller, record, plan)
        if cover is not None and cover >= REGION_WARN:
            note = (f"the concepts' region covers {cover:.0%} of the frame: the feature and key/value injections, "
                    f"which act outside it, hold only the other {1 - cover:.0%} of the source. Right for an edit "
                    "of most of the frame (a background, or an object and the background); otherwise name only the "
                    "words the edit changes (e.g. 'red->blue', not the whole prompt), or raise mask_threshold.")
            log.warning("%s: %s", node, note)
            text.append(note)
        if plan.cross_mode in ("replace", "refine") and plan.steps_of("fusion"):
            text.append(end_of_text_note(end_of_text_maps))
        return io.NodeOutput(m, masks, ui={"text": text})


REGION_WARN = 0.9  # the concepts' region covers this share of the frame or more: the node's text warns


def region_cover(controller: InFusionController, record, plan) -> float | None:
    """The share of the frame (all frames, latent resolution) in the concepts' region, where neither injection acts
    (`InFusionController.concept_region`); None when nothing is injected outside a region."""
    att = record.attention
    acts = ((plan.steps_of("feature") and plan.strength != 0.0 and plan.feature_region == "outside")
            or (plan.steps_of("kv") and plan.kv_region == "outside"))
    if not plan.concepts or att is None or not att.timesteps or not acts:
        return None
    return float(controller.concept_region(tuple(att.latent_hw)).float().mean())


def preview_masks(controller: InFusionController, record, plan) -> torch.Tensor:
    att = record.attention
    frames = record.frames or 1
    hw = tuple(att.latent_hw) if att is not None else (8, 8)
    fusion = [plan.timestep_of_step(i) for i in plan.steps_of("fusion")]
    if not plan.concepts or not fusion or att is None:
        out = torch.zeros(max(1, len(plan.concepts)) * frames, *hw)
    else:
        acc = sum(controller.source_masks(t, hw) for t in fusion) / len(fusion)
        out = acc.reshape(-1, *hw)
    return torch.nn.functional.interpolate(out.unsqueeze(1).float(), scale_factor=8, mode="nearest")[:, 0]


NODES = [InFusionSource, InFusionInject]
