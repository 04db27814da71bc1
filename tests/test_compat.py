"""The ComfyUI APIs the pack builds on, checked against the ComfyUI under test (scripts/test.sh runs these, and
the rest of the `compat` selection, on every ComfyUI checkout it finds: see README "Tested ComfyUI versions").

Each check is written against what the running ComfyUI offers (feature detection, as nodes/_compat.py does),
so it holds on 0.3.64 and on 0.8.0 alike."""

from __future__ import annotations

import inspect

import comfy.context_windows as cw
import comfy.sample
import comfy.samplers
import execution
import pytest
import torch
from comfy.ldm.modules import attention as comfy_attention

from zsve.nodes import _compat
from zsve.nodes._attn_patch import add_processor
from zsve.nodes.context import FrameBatchContextHandler, KeyFrameWindow, VideoContextWindows
from zsve.nodes.videop2p import VideoP2PGuider, _NullTextSampler
from zsve_harness import encode_text, executor_kwargs, get_executor

pytestmark = pytest.mark.compat


def _params(fn) -> dict:
    return dict(inspect.signature(fn).parameters)


def _takes_all(ours, theirs) -> bool:
    """Whether `ours` (an override) accepts every parameter `theirs` (the core method) is called with."""
    mine = _params(ours)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in mine.values()) and any(
            p.kind is inspect.Parameter.VAR_POSITIONAL for p in mine.values()):
        return True
    return all(name in mine for name, p in _params(theirs).items()
               if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))


# --- node schemas ---------------------------------------------------------------------------------------

def test_every_node_schema_builds_as_the_server_sends_it(pack_node_ids):
    """Every node's schema, finalised by this ComfyUI: the inputs the executor validates against and the node
    info the server's /object_info sends to the frontend."""
    import nodes

    assert pack_node_ids
    for node_id in pack_node_ids:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        inputs = cls.INPUT_TYPES()
        assert "required" in inputs, node_id
        info = cls.GET_NODE_INFO_V1()
        assert info["name"] == node_id and info["category"].startswith("Zero-Shot Video Edit"), node_id
        assert set(inputs["required"]) <= set(info["input"]["required"]), node_id


# --- executor (the test harness) ---------------------------------------------------------------------

def test_harness_builds_the_executor_this_comfyui_takes():
    kw = executor_kwargs()
    takes = _params(execution.PromptExecutor.__init__)
    assert set(kw) <= set(takes), f"PromptExecutor takes {list(takes)}, the harness passes {list(kw)}"
    assert ("cache_args" in kw) == ("cache_args" in takes)
    ex = get_executor()
    assert isinstance(ex, execution.PromptExecutor)


# --- context windows ---------------------------------------------------------------------------------

def test_context_windows_build_on_this_comfyui():
    takes_total = "total_frames" in _params(cw.IndexListContextWindow.__init__)
    w = _compat.index_list_window([1, 2, 3], 0, 8)
    assert w.index_list == [1, 2, 3] and w.dim == 0
    if takes_total:
        assert w.total_frames == 8
    kw = KeyFrameWindow([0, 2, 3], [0], total_frames=8)
    assert kw.zsve_total_frames == 8 and kw.zsve_anchors == [0]
    x = torch.arange(8.0).view(8, 1, 1, 1)
    assert torch.equal(kw.get_tensor(x).flatten(), torch.tensor([0.0, 2, 3]))


def test_context_handler_overrides_match_the_core_signatures():
    """FrameBatchContextHandler overrides core methods; each must still accept what the core passes."""
    for name, fn in vars(FrameBatchContextHandler).items():
        core = getattr(cw.IndexListContextHandler, name, None)
        if callable(fn) and core is not None and not name.startswith("__"):
            assert _takes_all(fn, core), f"FrameBatchContextHandler.{name}{inspect.signature(fn)} vs core " \
                                         f"{inspect.signature(core)}"
    assert _takes_all(FrameBatchContextHandler.__init__, cw.IndexListContextHandler.__init__)


def test_context_windows_execute_with_key_frames_on_this_comfyui(tiny_model):
    """The handler's full execute (windows with key frames, their fusion) runs on this ComfyUI: 7 frames,
    windows of 3 overlapping by 1, every frame's result is its own (a fake model adds 10)."""
    m = VideoContextWindows.execute(tiny_model, context_length=3, context_overlap=1,
                                    context_schedule="standard_static", context_stride=1, closed_loop=False,
                                    fuse_method="pyramid", key_frames="first and middle").result[0]
    h = m.model_options["context_handler"]
    x = torch.arange(7.0).view(7, 1, 1, 1).expand(7, 4, 2, 2).clone()
    mo = {"transformer_options": {"sample_sigmas": torch.tensor([5.0, 0.0])}}
    seen = []

    def calc(model, conds, sub_x, sub_t, model_options):
        seen.append(list(model_options["transformer_options"]["context_window"].index_list))
        return [sub_x + 10.0]

    out = h.execute(calc, None, [[{}]], x, torch.full((7,), 5.0), mo)[0]
    assert torch.allclose(out, x + 10.0)
    assert seen and all(0 in w and 3 in w for w in seen), seen


# --- attention -----------------------------------------------------------------------------------------

class _Reader:
    """A read-only processor (active on cross-attention: the pack computes those probabilities itself)."""

    def __init__(self, active=True):
        self.on = active
        self.n = 0

    def active(self, call):
        return self.on and call.kind == "cross"

    def __call__(self, call, probs):
        self.n += 1
        return None


def _sample(model, clip):
    pos, neg = encode_text(clip, "a red circle"), encode_text(clip, "")
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(1))
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", pos, neg, lat, seed=0, disable_pbar=True)


def _with_override(model, calls: list):
    m = model.clone()

    def override(func, *args, **kwargs):
        calls.append(func.__name__)
        return func(*args, **kwargs)

    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return m


def test_attention_dispatcher_keeps_attention_overrides(tiny_model, tiny_clip):
    """Where ComfyUI's attention functions take transformer_options, an attention override in the model's
    transformer options (another pack's, e.g. a sage/flash switch) still applies to every attention call the
    pack's dispatcher hands back to ComfyUI: with no processor, and with processors inactive for a call."""
    accepts = _compat.accepts_keyword(comfy_attention.optimized_attention, "transformer_options")
    plain_calls: list = []
    base = _sample(_with_override(tiny_model, plain_calls), tiny_clip)
    if accepts:
        assert plain_calls, "this ComfyUI applies attention overrides"

    for procs in ([], [_Reader(active=False)]):
        calls: list = []
        m = _with_override(tiny_model, calls)
        if procs:
            for p in procs:
                add_processor(m, p)
        else:
            from zsve.nodes._attn_patch import ensure_dispatchers

            ensure_dispatchers(m)
        out = _sample(m, tiny_clip)
        assert torch.allclose(out, base, atol=1e-5)
        if accepts:
            assert len(calls) == len(plain_calls), f"processors {procs}: {len(calls)} of {len(plain_calls)}"

    # an active processor: the pack computes those calls' probabilities itself, the rest still go through
    calls = []
    m = _with_override(tiny_model, calls)
    reader = _Reader(active=True)
    add_processor(m, reader)
    out = _sample(m, tiny_clip)
    assert reader.n > 0 and torch.allclose(out, base, atol=1e-5)
    if accepts:
        assert 0 < len(calls) < len(plain_calls)


def test_attention_kwargs_follow_the_function_signature():
    def old(q, k, v, heads, mask=None, attn_precision=None):
        return None

    def new(q, k, v, heads, mask=None, attn_precision=None, **kwargs):
        return None

    to = {"n_heads": 2}
    assert _compat.attention_kwargs(old, to) == {}
    assert _compat.attention_kwargs(new, to) == {"transformer_options": to}
    assert _compat.attention_kwargs(new, None) == {}


# --- sampling overrides --------------------------------------------------------------------------------

def test_sampling_overrides_accept_what_this_comfyui_passes():
    assert _takes_all(VideoP2PGuider.sample, comfy.samplers.CFGGuider.sample)
    assert _takes_all(VideoP2PGuider.predict_noise, comfy.samplers.CFGGuider.predict_noise)
    assert _takes_all(_NullTextSampler.sample, comfy.samplers.KSAMPLER.sample)
