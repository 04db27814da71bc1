"""The pack's attention dispatcher composes with other packs' attention replace patches."""

from __future__ import annotations

import comfy.sample
import torch
from comfy.ldm.modules.attention import optimized_attention

from zsve.nodes._attn_patch import add_processor, transformer_block_keys
from zsve_harness import encode_text


class Recorder:
    def __init__(self):
        self.calls = []

    def active(self, call):
        return call.kind == "cross"

    def __call__(self, call, probs):
        self.calls.append((call.layer, call.timestep, tuple(probs.shape)))
        return None


class Doubler:
    """Changes attention: sharpens the probabilities (a controller)."""

    def active(self, call):
        return call.kind == "cross"

    def __call__(self, call, probs):
        p = probs**2
        return p / p.sum(-1, keepdim=True)


def _sample(model, clip, steps=3):
    pos, neg = encode_text(clip, "a red circle"), encode_text(clip, "")
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(1))
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", pos, neg, lat, seed=0, disable_pbar=True)


def _foreign(counter):
    def patch(q, k, v, extra_options):
        counter.append(extra_options["block"])
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5
    return patch


def test_dispatcher_chains_to_a_foreign_replace_patch(tiny_model, tiny_clip):
    keys = transformer_block_keys(tiny_model)
    assert keys, "the tiny UNet has transformer blocks"
    counter: list = []
    foreign = tiny_model.clone()
    for name, number, depth in keys:
        foreign.set_model_attn2_replace(_foreign(counter), name, number, depth)
    base = _sample(foreign, tiny_clip)
    n_foreign = len(counter)
    assert n_foreign > 0

    counter.clear()
    ours = foreign.clone()
    rec = Recorder()
    add_processor(ours, rec)
    out = _sample(ours, tiny_clip)
    assert len(counter) == n_foreign, "the foreign patch still ran on every call"
    assert rec.calls, "our processor ran too"
    assert torch.allclose(out, base, atol=1e-5), "a read-only processor leaves the foreign patch's output"

    # A processor that changes attention takes over that call's output (documented behaviour).
    counter.clear()
    ctl = foreign.clone()
    add_processor(ctl, Doubler())
    changed = _sample(ctl, tiny_clip)
    assert not torch.allclose(changed, base, atol=1e-4)


def test_recording_processor_changes_nothing_and_input_model_untouched(tiny_model, tiny_clip):
    before = repr(tiny_model.model_options)
    plain = _sample(tiny_model, tiny_clip)
    m = tiny_model.clone()
    rec = Recorder()
    add_processor(m, rec)
    add_processor(m, Recorder())  # installing twice does not stack dispatchers
    out = _sample(m, tiny_clip)
    assert rec.calls and torch.allclose(out, plain, atol=1e-5)
    assert repr(tiny_model.model_options) == before
    replace = m.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(not getattr(p.previous, "is_zsve_dispatcher", False) for p in replace.values())
    # a plain run afterwards is bit-identical to the one before: nothing stays patched
    assert torch.equal(_sample(tiny_model, tiny_clip), plain)
