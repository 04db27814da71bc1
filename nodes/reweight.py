"""Cross-Attention Reweight: Prompt-to-Prompt's reweighting of edit-prompt words for methods without a
cross-attention controller of their own there (InFusion before its fusion phase, Blended Latent Diffusion).
The processor is `attention/p2p.py` CrossAttentionReweight; the 'word:factor' text is parsed as Attention Blend's
and the Video-P2P Guider's `reweight` (`attention/fatezero.py` reweight_equalizer)."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.fatezero import FusionConfigError, reweight_equalizer
from ..attention.p2p import CrossAttentionReweight as ReweightProcessor
from ._attn_patch import add_processor
from ._comfy import CATEGORY, ZSVEInputError, check_diffusion_model
from .prompts import PromptPairType, check_pair

NODE = "CrossAttentionReweight"


class CrossAttentionReweight(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Cross-Attention Reweight",
            category=CATEGORY,
            description=(
                "Prompt-to-Prompt's reweighting for edits whose method leaves cross-attention to the edit prompt: "
                "multiplies the cross-attention of chosen words of the EDIT prompt by their factor (conditional half, "
                "every cross-attention layer, no renormalising) during the first 'end' of the sampling steps. On an "
                "inverted video the new words (a new colour, a new background) attend too weakly to override what "
                "the inverted latent holds; FateZero's and Video-P2P's configs reweight them, and Attention Blend and "
                "the Video-P2P Guider have the same 'reweight' input built in. Use this node with InFusion Inject "
                "(end = its feature_end) or Latent Blend With Inversion; place it anywhere on the edit model's "
                "chain. Two of these nodes multiply. On the model of the Video-P2P Guider it reweights the target "
                "branch only (the source branch runs the source prompt)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model for the edit sampling (after or before the method's node)."),
                PromptPairType.Input("prompts", tooltip="The prompt pair of Edit Prompts; the words are words of its "
                                     "edit prompt (the sampler's positive)."),
                io.String.Input("reweight", default="",
                                tooltip="Words of the edit prompt and their factors, 'word:factor' comma separated "
                                "(e.g. 'green:4, dots:4'); a phrase of several words weighs each of them. The toy "
                                "benchmark reweights the words the edit adds x4 (toy/RESULTS.md)."),
                io.Float.Input("end", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="The first fraction of the sampling steps (noisiest first) that are reweighted: "
                               "steps i < int(end * steps). 0.5 = InFusion's feature phase (its feature_end default), "
                               "where it has no cross-attention control of its own."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the reweighting for the edit sampling.")],
        )

    @classmethod
    def execute(cls, model, prompts, reweight, end) -> io.NodeOutput:
        check_diffusion_model(model, NODE)
        pair = check_pair(prompts, NODE)
        if not (reweight or "").strip():
            raise ZSVEInputError(f"{NODE}: 'reweight' is empty: give words of the edit prompt {pair.edit.plain!r} "
                                 "and their factors, e.g. 'word:4', or remove the node")
        try:
            eq = reweight_equalizer(pair.edit.plain, reweight, pair.tokenizer)
        except FusionConfigError as e:
            raise ZSVEInputError(f"{NODE}: {e}") from None
        if not (0.0 < float(end) <= 1.0):
            raise ZSVEInputError(f"{NODE}: 'end' must be in (0, 1] (got {end:g}); 0.5 reweights the first half")
        m = model.clone()
        add_processor(m, ReweightProcessor(eq, float(end)))
        text = (f"reweighting {reweight.strip()!r} in the edit's cross-attention (conditional half) over the first "
                f"{float(end):g} of the sampling steps: steps i < int({float(end):g} * steps)")
        return io.NodeOutput(m, ui={"text": [text]})


NODES = [CrossAttentionReweight]
