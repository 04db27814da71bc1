"""The pack's attention dispatcher composes with other packs' attention replace patches."""

from __future__ import annotations

import logging

import comfy.sample
import torch
from comfy.ldm.modules.attention import optimized_attention

from zsve.attention.attn import apply_probs, attention_probs
from zsve.nodes._attn_patch import PATCHES_KEY, PROCESSORS_KEY, _Dispatcher, add_processor, transformer_block_keys
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


def test_dispatcher_chains_to_a_foreign_replace_patch(tiny_model, tiny_clip, caplog):
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

    # A processor that changes attention: the foreign patch still runs on every call and both changes apply
    # (ours + (patch - attention)); this patch scales attention, which is not an added term: a warning says so.
    counter.clear()
    ctl = foreign.clone()
    add_processor(ctl, Doubler())
    with caplog.at_level(logging.WARNING):
        changed = _sample(ctl, tiny_clip)
    assert len(counter) == n_foreign
    assert not torch.allclose(changed, base, atol=1e-4)
    warned = [r.getMessage() for r in caplog.records if "_foreign.<locals>.patch" in r.getMessage()]
    assert len(warned) == 1, warned  # once per run


def _direct_call(dispatcher, procs, heads=2, rows=4, nq=16, nk=6, inner=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(rows, n, inner, generator=g) for n in (nq, nk, nk))
    extra = {"n_heads": heads, "activations_shape": [rows, inner, 4, 4], "cond_or_uncond": [1, 0],
             PROCESSORS_KEY: procs, PATCHES_KEY: {}}
    return q, k, v, extra, dispatcher(q, k, v, extra)


def test_composition_rule_on_one_call(tiny_model):
    """The dispatcher's output for one call with a processor that changes the probabilities (Doubler) and
    another pack's patch: an added term is added to the edited attention exactly; identity attention (PAG's
    perturbation) replaces it; a patch that chains to the dispatcher it replaced gets the edited attention
    from it (the processors run once)."""
    ms = tiny_model.get_model_object("model_sampling")

    def ours(q, k, v, heads=2):
        return apply_probs(Doubler()(None, attention_probs(q, k, heads)), v, heads)

    def added(q, k, v, extra):
        return optimized_attention(q, k, v, extra["n_heads"]) + 0.25 * q

    q, k, v, extra, out = _direct_call(_Dispatcher("cross", ("output", 1, 0), ms, previous=added), [Doubler()])
    assert torch.allclose(out, ours(q, k, v) + 0.25 * q, atol=1e-5)

    identity = _Dispatcher("cross", ("middle", 0, 0), ms, previous=lambda q, k, v, extra: v)
    q, k, v, extra, out = _direct_call(identity, [Doubler()])
    assert torch.equal(out, v)

    calls = []

    class Counting(Doubler):
        def __call__(self, call, probs):
            calls.append(1)
            return super().__call__(call, probs)

    inner = _Dispatcher("cross", ("output", 1, 0), ms)
    chaining = _Dispatcher("cross", ("output", 1, 0), ms, previous=lambda q, k, v, extra: inner(q, k, v, extra) + 1.0)
    q, k, v, extra, out = _direct_call(chaining, [Counting()])
    assert torch.allclose(out, ours(q, k, v) + 1.0, atol=1e-5) and len(calls) == 1

    # (block, number) patches are read from the call's patches_replace, the way ComfyUI looks them up
    d = _Dispatcher("cross", ("output", 1, 0), ms)
    q, k, v, extra, _ = _direct_call(d, [Doubler()])
    extra[PATCHES_KEY] = {"attn2": {("output", 1): added}}
    assert torch.allclose(d(q, k, v, extra), ours(q, k, v) + 0.25 * q, atol=1e-5)


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


def test_a_composition_warning_reaches_the_running_node(monkeypatch, caplog):
    """warn_once: in the log and as the UI text of the node that is running (how ComfyUI's own nodes send text
    while they run), once per key."""
    import server
    from comfy_execution.utils import CurrentNodeContext

    from zsve.nodes import _attn_patch

    sent = []

    class Server:
        def send_progress_text(self, text, node_id, sid=None):
            sent.append((node_id, text))

    monkeypatch.setattr(server.PromptServer, "instance", Server(), raising=False)
    with caplog.at_level(logging.WARNING), CurrentNodeContext("prompt", "42"):
        _attn_patch.warn_once(("test", id(sent)), "combined by the rule")
        _attn_patch.warn_once(("test", id(sent)), "combined by the rule")
    assert sent == [("42", "combined by the rule")]
    assert [r.getMessage() for r in caplog.records].count("combined by the rule") == 1
