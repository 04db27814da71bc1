"""FateZero nodes: AttentionStore (record at inversion), AttentionBlend (fuse at editing) and
TemporalSelfAttentionPatch (spatial-temporal self-attention). The algorithms are in ../attention."""

from __future__ import annotations

import logging
import os

import folder_paths
import torch
from comfy_api.latest import io

from ..attention import arch
from ..attention.fatezero import FateZeroController, FusionConfigError, make_plan, preview_mask
from ..attention.p2p import END_OF_TEXT_MAPS
from ..attention.store import AttentionStoreSpec, StoreConfig, full_res_hint, mask_factor
from ..attention.temporal import MODES, TemporalKV
from ._attn_patch import add_processor, add_record_spec
from ._comfy import (
    CATEGORY,
    InversionType,
    ZSVEInputError,
    attention_setup,
    check_diffusion_model,
    describe_setup,
    unet_config,
)
from ._source_pass import SourcePass, check_recompute, weights_note
from .contract import check_choice, install_contract, ui_warning
from .prompts import PromptPairType, check_inversion_prompt, check_pair, end_of_text_maps_input, end_of_text_note

FZ_CATEGORY = CATEGORY + "/FateZero"
RECORD_NAME = "attention"
SOURCE_ATTENTION = ("store", "recompute at edit")
OVER_BUDGET = ("refuse", "spill to disk")
SPILL_FOLDER = "zsve_attention_store"  # under ComfyUI's temp directory (emptied by ComfyUI at start and exit)
log = logging.getLogger(__name__)


class AttentionStore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttentionStore",
            display_name="Attention Store (FateZero)",
            category=FZ_CATEGORY,
            description=(
                "Makes Video DDIM Invert record the attention FateZero's edit re-uses: connect this node's MODEL to "
                "Video DDIM Invert. Each inversion run records into a fresh store that travels inside the "
                "inversion output (inversion.records['attention']): so the store belongs to that cached inversion, "
                "is never copied by model clones (LoRA loaders), and changing only the edit side of the graph "
                "re-uses it without re-running the inversion. Stored (fp16, CPU): per-head cross-attention maps, "
                "and self-attention as projected queries/keys (the exact per-head maps are recomputed at edit "
                "time from a fraction of the memory), only for the levels FateZero's rule records (all but the model's "
                "finest attention level: SD1.5's 32x32 and below at 512 px, SDXL's 32x32 level at 1024 px) and "
                "only for the steps of the replace windows. The inversion's text shows the store's size and where it lives: "
                "in RAM, or, over memory_budget_gb with over_budget 'spill to disk', in safetensors files (one per "
                "step) in ComfyUI's temp directory, read back one step at a time by the edit."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x/2.x or SDXL family) that Video DDIM Invert will use. "
                               "Apply Temporal Self-Attention before or after this node; it must also be on the "
                               "edit model."),
                io.Float.Input("record_window", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the edit's steps, counted from the noisiest, to record. Must "
                               "cover the largest cross/self replace window you will use in Attention Blend (0.8 "
                               "for FateZero's defaults); smaller saves memory."),
                io.Boolean.Input("skip_full_res", default=True,
                                 tooltip="Do not record the model's finest attention level, by far the largest maps: "
                                 "SD1.5's full-resolution level (FateZero stores 32x32 and below at 512x512), SDXL's "
                                 "half-resolution level (SDXL has no full-resolution attention; at 1024x1024 its "
                                 "32x32 level is what FateZero's rule keeps). Turn off to control every layer, e.g. "
                                 "for frames of half the model's native size or smaller, where FateZero's rule (query "
                                 "maps of at most 32x32) takes every level."),
                io.Float.Input("memory_budget_gb", default=0.0, min=0.0, max=4096.0, step=0.5,
                               tooltip="The most GiB of attention to keep in RAM (checked after the first step, "
                               "before the RAM fills up); over_budget says what happens above it. 0 = no limit (the "
                               "store stays in RAM)."),
                io.Combo.Input("source_attention", options=list(SOURCE_ATTENTION), default=SOURCE_ATTENTION[0],
                               optional=True, tooltip="store: record the inversion's attention (the size shown in the inversion's "
                               "text; the edit only reads it). recompute at edit: record only the blend-mask level's "
                               "head-mean cross-attention (1/20 to 1/50 of the store); Attention Blend evaluates each "
                               "fused step of the inversion again, at the inversion's own latent, timestep and "
                               "source prompt, and fuses from that step (same result, one more UNet pass over the "
                               "frames per fused step: about 1.4x the edit's time with FateZero's 0.8 windows). For "
                               "long clips or little RAM."),
                io.Combo.Input("over_budget", options=list(OVER_BUDGET), default=OVER_BUDGET[0], optional=True,
                               tooltip="What a recording over memory_budget_gb does. refuse: stop with a message "
                               "(nothing recorded). spill to disk: write the store to safetensors files in ComfyUI's "
                               "temp directory, one file per step (the first step's too), keeping only the step "
                               "being recorded in RAM; the edit reads one step at a time back from disk (same result "
                               "bit for bit, some disk reads per step). The files are deleted when the inversion is "
                               "dropped from ComfyUI's cache; refused if the disk has no room for the store. "
                               "With source_attention 'recompute at edit' this applies to the small mask record."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model, patched to record attention during Video DDIM Invert. Use it "
                                "for the inversion; the edit can use this or the original model."),
            ],
        )

    @classmethod
    def execute(cls, model, record_window, skip_full_res, memory_budget_gb, source_attention=SOURCE_ATTENTION[0],
                over_budget=OVER_BUDGET[0]) -> io.NodeOutput:
        check_diffusion_model(model, "AttentionStore")
        check_choice("AttentionStore", "source_attention", source_attention, SOURCE_ATTENTION)
        min_factor = arch.store_min_factor(unet_config(model), bool(skip_full_res))
        layers = arch.layout(unet_config(model))[0]
        kept = [lay for lay in layers if lay.factor >= min_factor]
        recompute = source_attention == SOURCE_ATTENTION[1]
        check_choice("AttentionStore", "over_budget", over_budget, OVER_BUDGET)
        budget = int(float(memory_budget_gb) * 2**30)
        spill = budget > 0 and over_budget == OVER_BUDGET[1]
        # recompute mode keeps only the blend-mask level's head-mean cross-attention (Attention Blend's mask output)
        factors = (mask_factor(sorted({lay.factor for lay in kept})),) if recompute and kept else None
        cfg = StoreConfig(record_window=float(record_window), min_factor=min_factor,
                          budget_bytes=budget, recompute=recompute, factors=factors, spill=spill,
                          spill_dir=os.path.join(folder_paths.get_temp_directory(), SPILL_FOLDER) if spill else "")
        m = model.clone()
        add_record_spec(m, RECORD_NAME, AttentionStoreSpec(cfg))
        text = (f"records {len(kept)} of the model's {len(layers)} attention layers: those at 1/{cfg.min_factor} of "
                "the latent size and coarser" if cfg.min_factor > 1 else f"records all {len(layers)} attention layers")
        if cfg.recompute:
            text = ("recompute at edit: the inversion records only the blend-mask level's head-mean cross-attention; "
                    "Attention Blend " + text.replace("records", "recomputes", 1) + " at each fused step")
        if spill:
            text += (f"; over {float(memory_budget_gb):g} GiB the store spills to disk under {cfg.spill_dir} (the "
                     "inversion's text says where it went)")
        elif budget:
            text += f"; refuses to record more than {float(memory_budget_gb):g} GiB"
        return io.NodeOutput(m, ui={"text": [text]})


class TemporalSelfAttentionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TemporalSelfAttentionPatch",
            display_name="Temporal Self-Attention (FateZero, Video-P2P)",
            category=FZ_CATEGORY,
            description=(
                "Spatial-temporal self-attention without new weights: every frame's self-attention also (or only) "
                "looks at other frames' keys/values. Apply the same setting to the model of the inversion and of "
                "the edit. Uses an attn1_patch (a list slot shared with other packs), so it composes with "
                "attention replace patches and with Attention Store / Attention Blend."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (a clone is patched)."),
                io.Combo.Input("mode", options=list(MODES), default="middle",
                               tooltip="Key/value frames for frame i: per-frame (off), first (Video-P2P), middle "
                               "(FateZero's zero-shot default), previous+first (Tune-A-Video sparse-causal, "
                               "FateZero's code default), all frames (memory grows with frames^2)."),
                io.Boolean.Input("include_own_frame", default=False,
                                 tooltip="Also attend to the frame's own keys/values (the references do not)."),
                io.Int.Input("min_channels", default=-1, min=-1, max=4096,
                             tooltip="Layers with fewer channels stay per-frame (FateZero's least_sc_channel). -1 = "
                             "auto from the model: the finest attention level stays per-frame (SD1.5/2.x: 640, "
                             "keeping the 64x64 layers at 512 px per-frame; SDXL: 1280). 0 = every layer."),
            ],
            outputs=[io.Model.Output(tooltip="The model with spatial-temporal self-attention.")],
        )

    @classmethod
    def execute(cls, model, mode, include_own_frame, min_channels=-1) -> io.NodeOutput:
        check_diffusion_model(model, "TemporalSelfAttentionPatch")
        if int(min_channels) < 0:
            min_channels = arch.temporal_min_channels(unet_config(model))
        m = model.clone()
        to = m.model_options.setdefault("transformer_options", {})
        patches = dict(to.get("patches", {}))
        # Replace a previous temporal patch of ours instead of stacking a second one.
        patches["attn1_patch"] = [p for p in patches.get("attn1_patch", []) if not getattr(p, "is_zsve_temporal", False)]
        to["patches"] = patches
        check_choice("TemporalSelfAttentionPatch", "mode", mode, MODES)
        if mode != "per-frame":
            m.set_model_attn1_patch(TemporalKV(mode, include_own_frame, min_channels))
        return io.NodeOutput(m, ui={"text": [f"min_channels {int(min_channels)}"]})


class AttentionBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttentionBlend",
            display_name="Attention Blend (FateZero)",
            category=FZ_CATEGORY,
            description=(
                "FateZero's edit: patches the model for the edit sampling so that, at every step, attention is "
                "fused with the attention recorded at the same timestep of the inversion (Attention Store -> Video "
                "DDIM Invert). Cross-attention: Prompt-to-Prompt word swap / refinement / reweighting of the source "
                "prompt's maps inside the cross window. Self-attention inside [start, end): full replacement by the "
                "inversion's maps, or with blend words FateZero's M*edit + (1-M)*inversion with M from the source "
                "cross-attention of the blend words. Sample with KSamplerAdvanced (add_noise disable, ddim or "
                "euler, ddim_uniform, the inversion's steps) from z_T, positive = the edit prompt, cfg 7.5. The "
                "inversion is only read, so trying many edits re-uses one inversion."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model for the edit sampling (with the same Temporal "
                               "Self-Attention as the inversion)."),
                InversionType.Input("inversion", tooltip="The inversion of Video DDIM Invert, run on a model "
                                    "patched by Attention Store."),
                PromptPairType.Input("prompts", tooltip="The prompt pair of Edit Prompts: its source prompt is the "
                                     "inversion's positive, its edit prompt the sampler's positive; words below "
                                     "refer to their words."),
                io.Combo.Input("mode", options=["refine", "replace"], default="refine",
                               tooltip="Cross-attention control: refine (words added/changed, token alignment) or "
                               "replace (word swap; needs equal word counts, otherwise refine is used and logged)."),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps (from the noisiest) in which cross-attention follows the "
                               "source maps (FateZero: 0.8 style, 0.5 shape)."),
                io.String.Input("cross_replace_words", default="",
                                tooltip="Optional per-word windows for words of the edit prompt: 'word:0.5' (steps "
                                "0..0.5) or 'word:0.2-0.6', comma separated."),
                io.Float.Input("self_replace_start", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Start of the self-attention fusion window, fraction of the steps."),
                io.Float.Input("self_replace_end", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="End (exclusive) of the self-attention fusion window (FateZero: 0.8 style, "
                               "0.5 shape, 0.4-0.7 attributes)."),
                io.String.Input("reweight", default="",
                                tooltip="Reweight words of the edit prompt: 'watercolor:10, red:2' (FateZero's "
                                "eq_params)."),
                io.String.Input("blend_words", default="",
                                tooltip="Words of the SOURCE prompt naming what may change shape (e.g. 'jeep'). "
                                "Several things: comma-separated phrases ('blue jeep, green dots'), each masked on "
                                "its own and the masks united. Empty: full self-attention replacement "
                                "(style/attribute edits)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Blend mask threshold on the normalised cross-attention (FateZero: 0.3)."),
                io.Boolean.Input("only_cond", default=True,
                                 tooltip="Control only the conditional half of classifier-free guidance (as FateZero). "
                                 "Off: the unconditional rows are fused too."),
                end_of_text_maps_input(),
            ],
            outputs=[
                io.Model.Output(tooltip="The model patched for the edit sampling."),
                io.Mask.Output(display_name="mask", tooltip="Per-frame preview of the blend region at pixel "
                               "resolution: the fraction of the self-fusion steps in which a pixel keeps its own "
                               "(edited) structure. All ones without blend words."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, prompts, mode, cross_replace, cross_replace_words,
                self_replace_start, self_replace_end, reweight, blend_words, blend_threshold,
                only_cond, end_of_text_maps=END_OF_TEXT_MAPS[0]) -> io.NodeOutput:
        check_diffusion_model(model, "AttentionBlend")
        pair = check_pair(prompts, "AttentionBlend")
        check_choice("AttentionBlend", "mode", mode, ("refine", "replace"))
        check_choice("AttentionBlend", "end_of_text_maps", end_of_text_maps, END_OF_TEXT_MAPS)
        store = getattr(inversion, "records", {}).get(RECORD_NAME) if inversion is not None else None
        if store is None:
            raise ZSVEInputError(
                "AttentionBlend: this inversion recorded no attention. Put Attention Store between the model and "
                "Video DDIM Invert (its record_window must be > 0) and run the inversion again."
            )
        if self_replace_end < self_replace_start:
            raise ZSVEInputError(
                f"AttentionBlend: self_replace_end ({self_replace_end:g}) is before self_replace_start "
                f"({self_replace_start:g})."
            )
        recompute = bool(getattr(store, "recompute", False))
        ran, now = inversion.info.get("attention_setup"), attention_setup(model)
        if ran is not None and ran != now:
            raise ZSVEInputError(
                "AttentionBlend: the edit model's attention is not set up as the inversion model's was (the fused "
                "attention would not line up). Inversion: " + describe_setup(ran) + ". Edit: " + describe_setup(now)
                + ". Apply the same Temporal Self-Attention and Video Context Windows nodes to both models (e.g. "
                "before the model goes to Attention Store and to Attention Blend)."
            )
        try:
            check_inversion_prompt(pair, inversion, "AttentionBlend")
            plan = make_plan(
                pair.tokenizer, pair.source.plain, pair.edit.plain, inversion.timesteps, mode=mode,
                cross_window=float(cross_replace), word_windows=cross_replace_words,
                self_window=(float(self_replace_start), float(self_replace_end)), reweight=reweight,
                blend_words=blend_words, blend_threshold=float(blend_threshold), only_cond=bool(only_cond),
                record_window=None if recompute else store.config.record_window, end_of_text_maps=end_of_text_maps,
            )
        except FusionConfigError as e:
            raise ZSVEInputError(f"AttentionBlend: {e}") from None
        for note in plan.notes:
            log.warning("AttentionBlend: %s", note)
        m = model.clone()
        h, w = inversion.latent_shape[-2:]
        if recompute:
            check_recompute(inversion, "AttentionBlend")
            controller = FateZeroController(None, plan)
            SourcePass.install(m, inversion, store.config, controller)
            fused = sum(controller.fuses_at(i) for i in range(plan.num_steps))
            text = [f"source attention recomputed at the edit: {fused} of {plan.num_steps} steps fuse, each with one "
                    f"more UNet pass over the {inversion.frames} frame(s)"]
            note = weights_note(inversion, model)
            if note:
                ui_warning("AttentionBlend", note)
                text.append(note)
            if store.masks is not None:
                mask = preview_mask(store.masks, plan, (h, w))
            elif plan.blend_indices:
                raise ZSVEInputError(
                    "AttentionBlend: this inversion kept no cross-attention for the blend mask (Attention Store "
                    "recorded no layer); turn Attention Store's skip_full_res off or clear blend_words."
                )
            else:
                mask = torch.ones(inversion.frames, h, w)
            text.append(store.summary())
        else:
            controller = FateZeroController(store, plan)
            mask = preview_mask(store, plan, (h, w))
            text = [store.summary()]
        add_processor(m, controller)
        install_contract(m, "AttentionBlend", inversion, pair.edit.embedding, pair.edit.text, pair.edit.pooled)
        mask = torch.nn.functional.interpolate(mask.unsqueeze(1), scale_factor=8, mode="nearest")[:, 0]
        hint = full_res_hint(store.config, (h, w))
        text = text + plan.notes + ([f"Attention Store: {hint}"] if hint else [])
        if plan.cross_mode in ("replace", "refine"):
            text.append(end_of_text_note(end_of_text_maps))
        return io.NodeOutput(m, mask, ui={"text": text})


NODES = [AttentionStore, AttentionBlend, TemporalSelfAttentionPatch]
