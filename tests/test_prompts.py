"""Edit Prompts and the prompt pair (nodes/prompts.py, issue 16): prompts typed once, word positions from the
tokenization that made the conditionings, so ComfyUI's weight syntax, escapes and embeddings align."""

from __future__ import annotations

import pytest
import torch

from zsve.attention import align
from zsve.attention.fatezero import make_plan
from zsve.nodes import blend as blend_nodes
from zsve.nodes._comfy import ZSVEInputError
from zsve.nodes.prompts import make_prompt_pair
from zsve_harness import CAPTURED, OBJECTS, TINY_CLIP, GraphError, encode_text, run_prompt

SRC = "a red circle on blue stripes"
EDIT = "a yellow circle on blue stripes"
TIMESTEPS = [-1, 1, 251, 501, 751]


def _plan(pair, mode="refine", **kw):
    return make_plan(pair.tokenizer, pair.source.plain, pair.edit.plain, TIMESTEPS, mode=mode, **kw)


@pytest.mark.parametrize("weighted", ["a (yellow:1.3) circle on blue stripes", "a yellow (circle on:0.8) blue stripes",
                                      "(a yellow circle on blue stripes:1.1)", "a ((yellow)) circle on blue stripes"])
def test_weight_syntax_gives_the_control_positions_of_the_plain_prompt(tiny_clip, weighted):
    plain = make_prompt_pair(tiny_clip, SRC, EDIT)
    pair = make_prompt_pair(tiny_clip, SRC, weighted)
    assert pair.edit.plain == EDIT
    assert pair.tokenizer.encode(pair.edit.plain) == plain.tokenizer.encode(EDIT)
    for mode in ("replace", "refine"):
        a, b = _plan(plain, mode, reweight="yellow:2", blend_words="circle"), _plan(pair, mode, reweight="yellow:2",
                                                                                    blend_words="circle")
        assert a.cross_mode == b.cross_mode == mode
        assert torch.equal(a.mapper, b.mapper) and torch.equal(a.equalizer, b.equalizer)
        assert a.blend_indices == b.blend_indices
    assert blend_nodes.word_token_positions(pair, "yellow circle") == blend_nodes.word_token_positions(plain,
                                                                                                     "yellow circle")
    # the weight is in the conditioning, not in the positions: the conditionings differ
    assert not torch.allclose(pair.edit.embedding, plain.edit.embedding)


def test_escaped_parentheses_are_words_of_their_own(tiny_clip):
    pair = make_prompt_pair(tiny_clip, "a \\(red\\) circle", "a \\(yellow\\) circle")
    assert pair.source.plain == "a (red) circle" and pair.edit.plain == "a (yellow) circle"
    assert align.word_indices(pair.edit.plain, "yellow", pair.tokenizer) == [2, 3, 4]  # "(" "yellow" ")"
    assert _plan(pair, "replace").cross_mode == "replace"


def test_embeddings_are_one_word_whose_tokens_are_the_vectors(tmp_path):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import safetensors.torch

    from zsve_harness import init_module_

    safetensors.torch.save_file({"emb_params": torch.randn(2, TINY_CLIP["hidden_size"])},
                                str(tmp_path / "shiny.safetensors"))
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=[str(tmp_path)],
                         model_options={"clip_l_model_config": dict(TINY_CLIP)})
    init_module_(clip.cond_stage_model, 1)
    pair = make_prompt_pair(clip, "a embedding:shiny red circle", "a embedding:shiny yellow circle")
    assert pair.source.plain == "a embedding:shiny red circle"
    spans = dict(align.word_spans(pair.edit.plain, pair.tokenizer))
    assert spans["embedding:shiny"] == [2, 3] and spans["yellow"] == [4] and spans["circle"] == [5]
    # the same embedding in both prompts aligns (refinement keeps its maps), the swapped word does not
    plan = _plan(pair, "refine")
    assert plan.mapper.tolist()[:6] == [0, 1, 2, 3, -1, 5]
    # a missing embedding is refused (ComfyUI skips it, so the words would not match the tokens)
    with pytest.raises(ZSVEInputError, match="'embedding:nothere', which ComfyUI did not find"):
        make_prompt_pair(clip, "a embedding:nothere circle", EDIT)


def test_a_prompt_longer_than_one_chunk_is_refused(tiny_clip):
    with pytest.raises(ZSVEInputError, match="more than one CLIP chunk"):
        make_prompt_pair(tiny_clip, SRC, " ".join(["red circle"] * 40))


def test_the_conditionings_are_clip_text_encodes(tiny_clip):
    pair = make_prompt_pair(tiny_clip, SRC, "a (yellow:1.3) circle", "blurry")
    for side, text in ((pair.source, SRC), (pair.edit, "a (yellow:1.3) circle"), (pair.negative, "blurry")):
        ref = encode_text(tiny_clip, text)
        assert torch.equal(side.conditioning[0][0], ref[0][0])


def _graph(sample_positive=("pp", 1), invert_positive=("pp", 0)):
    return {
        "model": {"class_type": "ZSVETestProvide", "inputs": {"key": "pr_model"}},
        "clip": {"class_type": "ZSVETestProvide", "inputs": {"key": "pr_clip"}},
        "lat": {"class_type": "ZSVETestProvide", "inputs": {"key": "pr_lat"}},
        "pp": {"class_type": "EditPrompts", "inputs": {"clip": ["clip", 0], "source_text": SRC,
                                                       "edit_text": "a (yellow:1.2) circle on blue stripes",
                                                       "negative_text": ""}},
        "other": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a green square"}},
        "store": {"class_type": "AttentionStore", "inputs": {"model": ["model", 0], "record_window": 1.0,
                                                             "skip_full_res": False, "memory_budget_gb": 0.0}},
        "inv": {"class_type": "VideoDDIMInvert", "inputs": {"model": ["store", 0], "latent": ["lat", 0],
                                                            "positive": list(invert_positive), "steps": 3, "cfg": 1.0}},
        "blend": {"class_type": "AttentionBlend", "inputs": {
            "model": ["model", 0], "inversion": ["inv", 1], "prompts": ["pp", 3], "mode": "replace",
            "cross_replace": 0.8, "cross_replace_words": "", "self_replace_start": 0.0, "self_replace_end": 0.8,
            "reweight": "yellow:2", "blend_words": "circle", "blend_threshold": 0.3, "only_cond": True}},
        "sample": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["blend", 0], "add_noise": "disable", "noise_seed": 0, "steps": 3, "cfg": 7.5,
            "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": list(sample_positive),
            "negative": ["pp", 2], "latent_image": ["inv", 0], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "cap": {"class_type": "ZSVETestCapture", "inputs": {"value": ["sample", 0], "key": "pr_out"}},
        "cap_ui": {"class_type": "ZSVETestCapture", "inputs": {"value": ["pp", 3], "key": "pr_pair"}},
    }


def test_the_pair_drives_an_edit_and_a_mismatched_conditioning_is_refused(tiny_model, tiny_clip):
    OBJECTS.update({"pr_model": tiny_model, "pr_clip": tiny_clip, "pr_lat": {"samples": torch.randn(2, 4, 8, 8)}})
    run_prompt(_graph())
    assert torch.isfinite(CAPTURED["pr_out"]["samples"]).all()
    assert CAPTURED["pr_pair"].edit.plain == EDIT
    # the sampler's positive is not the pair's edit prompt
    with pytest.raises(GraphError, match="AttentionBlend.*positive CONDITIONING is not the edit prompt of the "
                       "prompt pair.*Connect the 'edit' CONDITIONING output of Edit Prompts"):
        run_prompt(_graph(sample_positive=("other", 0)))
    # the inversion was made with another prompt than the pair's source
    with pytest.raises(GraphError, match="AttentionBlend.*inversion was made with another positive prompt"):
        run_prompt(_graph(invert_positive=("other", 0)))


def test_video_p2p_takes_processed_conditionings_only_when_they_carry_the_pairs_prompts(tiny_model, tiny_clip):
    import zsve.nodes._comfy as glue
    import zsve.nodes.videop2p as vp

    pair = make_prompt_pair(tiny_clip, SRC, EDIT)
    _, inv = glue.run_inversion(tiny_model, {"samples": torch.randn(2, 4, 8, 8)}, pair.source.conditioning, None, 3,
                                1.0, disable_pbar=True)
    args = dict(cfg=7.5, mode="refine", cross_replace=0.2, cross_replace_words="", self_replace=0.5, reweight="",
                blend_words="", blend_words_edit="", blend_start=0.2, blend_threshold=0.3,
                target_uncond=vp.TARGET_UNCOND[0])
    g = vp.VideoP2PGuiderNode.execute(tiny_model, inv, pair, edit=encode_text(tiny_clip, EDIT), **args).result[0]
    assert torch.equal(g.original_conds["positive"][0]["cross_attn"], pair.edit.embedding)
    with pytest.raises(ZSVEInputError, match="'edit' CONDITIONING does not carry the prompt pair's edit prompt"):
        vp.VideoP2PGuiderNode.execute(tiny_model, inv, pair, edit=encode_text(tiny_clip, "a dog"), **args)
