"""The dispatcher pays only for what processors need (issue 21): rows nobody changes go through ComfyUI's optimized
attention, recorders of q/k get no probabilities, the output-level fusions (FateZero, InFusion, Video-P2P
self-attention) give the explicit result, explicit probabilities come in chunks of heads within a stated bound.
Correctness only: timings are benchmarks/overhead.py's business."""

from __future__ import annotations

import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention

from zsve.attention.attn import apply_probs, attention_probs
from zsve.attention.fatezero import FateZeroController, FusionPlan
from zsve.attention.store import AttentionRecorder, AttentionStore, LayerInfo, StoreConfig
from zsve.nodes import _attn_patch as ap

T, HEADS, F = 500, 4, 2


class _MS:
    def timestep(self, s):
        return torch.full((1,), float(T))


def _qkv(side=8, ch=32, nk=None, seed=0, rows=2 * F):
    g = torch.Generator().manual_seed(seed)
    nq = side * side
    nk = nq if nk is None else nk
    return (torch.randn(rows, nq, ch, generator=g), torch.randn(rows, nk, ch, generator=g),
            torch.randn(rows, nk, ch, generator=g))


def _extra(side=8, ch=32, cou=(1, 0), **procs):
    e = {"n_heads": HEADS, "activations_shape": [len(cou) * F, ch, side, side], "original_shape": [F, 4, 4 * side, 4 * side],
         "cond_or_uncond": list(cou), "sigmas": torch.tensor([1.0]), "sample_sigmas": torch.tensor([1.0, 0.0])}
    e.update(procs)
    return e


def _store(q, k, side=8, ch=32, seed=1):
    st = AttentionStore(config=StoreConfig(), frames=F, latent_hw=(4 * side, 4 * side), num_steps=1)
    st.layers["output_7_0"] = LayerInfo(hw=(side, side), heads=HEADS, channels=ch, factor=4)
    st.add(T, "output_7_0", "self", {"q": q.half(), "k": k.half()})
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(F, HEADS, side * side, 77, generator=g)
    logits[:, :, : side * side // 2, 2] += 6.0  # token 2 (the blend word) on the upper half of the map
    st.add(T, "output_7_0", "cross", {"p": logits.softmax(-1).half()})
    return st


def _plan(blend=None):
    return FusionPlan(num_steps=1, timestep_to_step={T: 0}, cross_mode="none", cross_alphas=torch.ones(2, 77),
                      self_steps=(0, 1), blend_indices=blend, mask_factor=4)


def _reference_fatezero(ctrl, q, k, v, cou=(1, 0)):
    """The previous dispatcher: float32 probabilities of every row through the processor's __call__."""
    disp = ap._Dispatcher("self", ("output", 7, 0), _MS())
    call = disp.make_call(q, _extra(cou=cou))
    call.q, call.k, call.v = q, k, v
    probs = ctrl(call, attention_probs(q, k, HEADS))
    return apply_probs(probs, v, HEADS)


@pytest.mark.parametrize("blend", [None, [2]], ids=["style", "local"])
def test_fatezero_self_fusion_at_the_output_level_equals_the_explicit_maps(blend):
    q, k, v = _qkv()
    src_q, src_k = _qkv(seed=3, rows=F)[:2]
    ctrl = FateZeroController(_store(src_q, src_k), _plan(blend))
    ref = _reference_fatezero(ctrl, q, k, v)
    disp = ap._Dispatcher("self", ("output", 7, 0), _MS())
    ap.STATS.reset()
    out = disp(q, k, v, _extra(**{ap.PROCESSORS_KEY: [ctrl]}))
    assert ap.STATS.output_calls == 1 and ap.STATS.explicit_calls == 0
    assert ap.STATS.optimized_rows == F  # the unconditional chunk (only_cond): ComfyUI's optimized attention
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    # the unconditional rows are plain attention, the conditional rows are not
    torch.testing.assert_close(out[:F], optimized_attention(q[:F], k[:F], v[:F], HEADS), rtol=1e-4, atol=1e-4)
    assert (out[F:] - optimized_attention(q[F:], k[F:], v[F:], HEADS)).abs().max() > 1e-2
    if blend:  # a local edit: the mask keeps part of the rows and fuses the rest
        m = ctrl._mask(None, T, (8, 8))  # the stored mode: the store is the controller's
        assert 0 < float(m.mean()) < 1


def test_fatezero_output_level_fusion_with_a_soft_mask_equals_the_explicit_maps(monkeypatch):
    q, k, v = _qkv()
    src_q, src_k = _qkv(seed=3, rows=F)[:2]
    ctrl = FateZeroController(_store(src_q, src_k), _plan([2]))
    soft = torch.rand(F, 64, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(ctrl, "_mask", lambda call, t, hw: soft)
    ref = _reference_fatezero(ctrl, q, k, v)
    disp = ap._Dispatcher("self", ("output", 7, 0), _MS())
    ap.STATS.reset()
    out = disp(q, k, v, _extra(**{ap.PROCESSORS_KEY: [ctrl]}))
    assert ap.STATS.output_calls == 1
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_fatezero_fusion_in_bf16_stays_within_bf16_rounding_of_the_float32_result():
    q, k, v = _qkv()
    src_q, src_k = _qkv(seed=3, rows=F)[:2]
    ctrl = FateZeroController(_store(src_q, src_k), _plan([2]))
    ref = _reference_fatezero(ctrl, q, k, v)
    disp = ap._Dispatcher("self", ("output", 7, 0), _MS())
    out = disp(q.bfloat16(), k.bfloat16(), v.bfloat16(), _extra(**{ap.PROCESSORS_KEY: [ctrl]}))
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, err


def test_cross_control_gets_explicit_probabilities_of_the_conditional_rows_only():
    q, k, v = _qkv(nk=77)
    src_q, src_k = _qkv(seed=3, rows=F)[:2]
    st = _store(src_q, src_k)
    ctrl = FateZeroController(st, _plan())
    disp = ap._Dispatcher("cross", ("output", 7, 0), _MS())
    call = disp.make_call(q, _extra())
    ref = apply_probs(ctrl(call, attention_probs(q, k, HEADS)), v, HEADS)
    ap.STATS.reset()
    out = disp(q, k, v, _extra(**{ap.PROCESSORS_KEY: [ctrl]}))
    assert ap.STATS.explicit_rows == F and ap.STATS.optimized_rows == F and ap.STATS.output_calls == 0
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    # cross_mode "none" with alpha 1: the cond rows take the stored maps
    torch.testing.assert_close(out[F:], apply_probs(st.cross_probs(T, "output_7_0"), v[F:], HEADS), rtol=2e-3, atol=2e-3)


def test_a_recorder_of_q_and_k_gets_no_probabilities_and_the_call_stays_optimized():
    q, k, v = _qkv()
    rec = AttentionRecorder(StoreConfig(min_factor=1))
    seen = []
    orig = rec.__call__

    class Spy:
        def __getattr__(self, name):
            return getattr(rec, name)

        def __call__(self, call, probs):
            seen.append(probs)
            return orig(call, probs)

    disp = ap._Dispatcher("self", ("output", 7, 0), _MS())
    ap.STATS.reset()
    out = disp(q, k, v, _extra(**{ap.RECORDERS_KEY: {"store": Spy()}}))
    assert seen == [None] and ap.STATS.explicit_calls == 0 and ap.STATS.reader_calls == 1
    torch.testing.assert_close(out, optimized_attention(q, k, v, HEADS))
    e = rec.store.entries[(T, "output_7_0", "self")]
    torch.testing.assert_close(e["q"], q[F:].half())  # the conditional rows only


class HeadwiseSharpen:
    """A per-head controller without an output-level form: p^2 renormalised, on the conditional chunk."""

    def __init__(self, split=True):
        self.split = split
        self.ranges = []

    def active(self, call):
        return True

    def kinds(self, call):
        return {0}

    def splits_heads(self, call):
        return self.split

    def __call__(self, call, probs):
        self.ranges.append(call.head_range)
        p = probs.float() ** 2
        return (p / p.sum(-1, keepdim=True)).to(probs.dtype)


def test_explicit_probabilities_come_in_chunks_of_heads_within_the_bound(monkeypatch):
    q, k, v = _qkv()
    nq = nk = q.shape[1]
    disp = ap._Dispatcher("self", ("output", 7, 0), _MS())
    whole = HeadwiseSharpen(split=False)
    ref = disp(q, k, v, _extra(**{ap.PROCESSORS_KEY: [whole]}))
    assert whole.ranges == [None]
    one_head = F * nq * nk * 4  # float32 scores of one head of the conditional rows
    monkeypatch.setattr(ap, "EXPLICIT_CHUNK_BYTES", 2 * one_head + 1)
    assert ap.head_chunk(F, HEADS, nq, nk) == 2
    split = HeadwiseSharpen()
    ap.STATS.reset()
    out = disp(q, k, v, _extra(**{ap.PROCESSORS_KEY: [split]}))
    assert split.ranges == [(0, 2), (2, 4)]
    assert ap.STATS.max_chunk_bytes <= ap.EXPLICIT_CHUNK_BYTES and ap.STATS.explicit_rows == F
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the floor: one head, whatever the budget
    monkeypatch.setattr(ap, "EXPLICIT_CHUNK_BYTES", 1)
    assert ap.head_chunk(F, HEADS, nq, nk) == 1
    # against the float32 reference of the previous dispatcher (all rows explicit)
    probs = attention_probs(q, k, HEADS)
    p2 = probs[F:] ** 2
    probs[F:] = p2 / p2.sum(-1, keepdim=True)
    torch.testing.assert_close(out, apply_probs(probs, v, HEADS), rtol=1e-4, atol=1e-4)


def test_videop2p_self_replacement_at_the_output_level_equals_the_explicit_maps():
    from zsve.attention.videop2p import BRANCHES_KEY, BranchPlan, VideoP2PController

    q, k, v = _qkv(rows=2 * 2 * F)  # [chunk][branch][frame]
    plan = _plan()
    ctrl = VideoP2PController(plan, BranchPlan(), F, (32, 32))
    disp = ap._Dispatcher("self", ("output", 7, 0), _MS())
    extra = _extra(**{ap.PROCESSORS_KEY: [ctrl], BRANCHES_KEY: 2})
    extra["activations_shape"] = [4 * F, 32, 8, 8]
    call = disp.make_call(q, extra)
    call.q, call.k, call.v = q, k, v
    ref = apply_probs(ctrl(call, attention_probs(q, k, HEADS)), v, HEADS)
    ap.STATS.reset()
    out = disp(q, k, v, extra)
    assert ap.STATS.output_calls == 1 and ap.STATS.optimized_rows == 2 * F
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    # the target branch of the cond chunk attends with the source branch's map
    s0 = 2 * F
    torch.testing.assert_close(out[s0 + F:], optimized_attention(q[s0:s0 + F], k[s0:s0 + F], v[s0 + F:], HEADS),
                               rtol=1e-4, atol=1e-4)


def test_the_store_reports_bytes_per_frame_per_step():
    q, k, _ = _qkv(rows=F)
    st = _store(q, k)
    assert st.bytes_per_frame_step == st.nbytes // F
    assert "per frame per step" in st.summary()
