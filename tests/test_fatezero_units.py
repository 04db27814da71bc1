"""attention/p2p.py, temporal.py, store.py: hand-computed cases."""

import pytest
import torch

from zsve.attention import p2p, store, temporal
from zsve.attention.attn import attention_probs
from zsve.attention.processor import AttnCall

# --- p2p ---------------------------------------------------------------------------------------------

def test_time_word_alphas_like_p2p():
    a = p2p.time_word_alphas(10, 0.8, max_len=5)  # rows [0, int(0.8*11)=8) are 1
    assert a.shape == (11, 5)
    assert a[:, 0].tolist() == [1] * 8 + [0] * 3
    b = p2p.time_word_alphas(10, 0.8, [([2, 3], (0.2, 0.5))], max_len=5)  # rows [2, 5) for tokens 2, 3
    assert b[:, 2].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert torch.equal(b[:, 3], b[:, 2]) and torch.equal(b[:, 1], a[:, 1])
    assert p2p.self_window_steps(50, (0.0, 0.8)) == (0, 40)
    assert p2p.self_window_steps(50, 0.9) == (0, 45)


def test_replace_refine_reweight_formulas():
    base = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    edit = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    m = torch.zeros(4, 4)
    m[0, 0] = 1
    m[1, 1] = m[1, 2] = 0.5  # one source token -> two target tokens
    m[2, 3] = 1
    assert torch.allclose(p2p.replace_cross(base, m), torch.tensor([[0.5, 0.15, 0.15, 0.2]]))
    mapper = torch.tensor([0, -1, 1, 2])
    alphas = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.allclose(p2p.refine_cross(base, edit, mapper, alphas), torch.tensor([[0.5, 0.2, 0.3, 0.2]]))
    eq = torch.tensor([1.0, 10.0, 1.0, 1.0])
    on = p2p.cross_control(base, edit, torch.ones(4), "refine", mapper, alphas, eq)
    assert torch.allclose(on, torch.tensor([[0.5, 2.0, 0.3, 0.2]]))  # reweighted, not renormalised
    off = p2p.cross_control(base, edit, torch.zeros(4), "refine", mapper, alphas, eq)
    assert torch.equal(off, edit)  # outside the window: the edit's own map
    part = p2p.cross_control(base, edit, torch.tensor([1.0, 1.0, 0.0, 0.0]), "none")
    assert torch.allclose(part, torch.tensor([[0.5, 0.3, 0.3, 0.4]]))


def test_self_fusion():
    edit = torch.full((1, 2, 3, 4), 1.0)
    base = torch.full((1, 2, 3, 4), 3.0)
    assert torch.equal(p2p.self_fusion(edit, base, None), base)
    mask = torch.tensor([[1.0, 0.0, 0.25]])  # per query pixel
    out = p2p.self_fusion(edit, base, mask)
    assert torch.allclose(out[0, :, 0], torch.ones(2, 4)) and torch.allclose(out[0, :, 1], torch.full((2, 4), 3.0))
    assert torch.allclose(out[0, :, 2], torch.full((2, 4), 0.25 * 1 + 0.75 * 3))


# --- temporal ------------------------------------------------------------------------------------------

def test_key_frames_modes():
    assert temporal.key_frames("per-frame", 3) == [[0], [1], [2]]
    assert temporal.key_frames("first", 3) == [[0], [0], [0]]
    assert temporal.key_frames("middle", 4) == [[1], [1], [1], [1]]  # (F-1)//2, as FateZero's 'mid'
    assert temporal.key_frames("middle", 5, include_self=True) == [[2, 0], [2, 1], [2, 2], [2, 3], [2, 4]]
    assert temporal.key_frames("previous+first", 3) == [[0, 0], [0, 0], [1, 0]]
    assert temporal.key_frames("all", 2) == [[0, 1], [0, 1]]
    # context window: absolute frames 4..7 -> key frames chosen inside the window
    assert temporal.key_frames("first", 4, frame_ids=[4, 5, 6, 7]) == [[0]] * 4
    assert temporal.key_frames("previous+first", 3, frame_ids=[10, 11, 12]) == [[0, 0], [0, 0], [1, 0]]
    with pytest.raises(ValueError, match="choose one of"):
        temporal.key_frames("sideways", 3)


def test_gather_frames_rows_are_chunk_times_frames():
    # 2 chunks (uncond, cond) x 3 frames, 2 tokens, 1 channel; value = 100*chunk + 10*frame + token
    h = torch.tensor([[[100.0 * c + 10 * f + t] for t in range(2)] for c in range(2) for f in range(3)])
    g = temporal.gather_frames(h, 2, temporal.key_frames("previous+first", 3))
    assert g.shape == (6, 4, 1)
    assert g[2, :, 0].tolist() == [10, 11, 0, 1]  # chunk 0, frame 2: previous (1) then first (0)
    assert g[5, :, 0].tolist() == [110, 111, 100, 101]  # chunk 1 uses its own chunk's frames
    patch = temporal.TemporalKV("middle", min_channels=2)
    n = torch.randn(6, 2, 1)
    assert patch(n, n, n, {"cond_or_uncond": [1, 0]})[1] is n  # 1 channel < min_channels: per-frame
    patch = temporal.TemporalKV("middle")
    _, ctx, val = patch(h, h, h, {"cond_or_uncond": [1, 0]})
    assert ctx.shape == (6, 2, 1) and ctx[0, :, 0].tolist() == [10, 11] and ctx[4, :, 0].tolist() == [110, 111]
    assert val is ctx


def test_temporal_attention_equals_attention_over_key_frames():
    torch.manual_seed(0)
    f, n, c, heads = 3, 4, 8, 2
    x = torch.randn(f, n, c)
    wq, wk = torch.randn(c, c), torch.randn(c, c)
    ctx = temporal.gather_frames(x, 1, temporal.key_frames("first", f))
    p = attention_probs(x @ wq, ctx @ wk, heads)
    # frame 2 attending to frame 0's tokens == plain attention of frame 2's queries on frame 0's keys
    ref = attention_probs((x[2:3] @ wq), (x[0:1] @ wk), heads)
    assert torch.allclose(p[2:3], ref, atol=1e-6)


# --- store ---------------------------------------------------------------------------------------------

def _call(kind, q, k, t=500, frames=2, hw=(2, 2), heads=2, cou=(0,), step=None, total=None, latent=(4, 4),
          layer="input_4_0"):
    return AttnCall(kind=kind, layer=layer, hw=hw, frames=frames, cond_or_uncond=list(cou), sigma=1.0,
                    timestep=t, heads=heads, step_index=step, total_steps=total,
                    extra={"original_shape": [frames, 4, *latent]}, q=q, k=k)


def test_recorder_stores_qk_fp16_and_recomputes_per_head_probs():
    torch.manual_seed(0)
    rec = store.AttentionStoreSpec(store.StoreConfig(min_factor=1)).new_recorder()
    q = torch.randn(4, 4, 8)  # rows: uncond f0 f1, cond f0 f1
    k = torch.randn(4, 4, 8)
    call = _call("self", q, k, cou=(1, 0))
    probs = attention_probs(q, k, 2)
    assert rec.active(call) and rec(call, probs) is None
    st = rec.finalize()
    assert st.entries[(500, "input_4_0", "self")]["q"].dtype == torch.float16
    got = st.self_probs(500, "input_4_0")
    assert got.shape == (2, 2, 4, 4)
    assert torch.allclose(got, probs[2:], atol=2e-3)  # the cond rows, per head, up to fp16 rounding
    assert st.nbytes == 2 * (2 * 4 * 8) * 2  # q and k, fp16
    assert st.nbytes == store.entry_nbytes("self", 2, 4, 4, 8, 2)
    # identical key rows (middle/first temporal modes) are stored once
    rec2 = store.AttentionStoreSpec(store.StoreConfig(min_factor=1)).new_recorder()
    kk = torch.randn(1, 4, 8).expand(2, 4, 8)
    rec2(_call("self", q[:2], kk), attention_probs(q[:2], kk, 2))
    st2 = rec2.finalize()
    assert st2.entries[(500, "input_4_0", "self")]["k"].shape[0] == 1
    assert st2.nbytes == store.entry_nbytes("self", 2, 4, 4, 8, 2, shared_keys=True)
    assert torch.allclose(st2.self_probs(500, "input_4_0"), attention_probs(q[:2], kk, 2), atol=2e-3)


def test_recorder_layer_and_step_selection():
    rec = store.AttentionRecorder(store.StoreConfig(min_factor=2, record_window=0.5))
    q = torch.randn(2, 16, 8)
    full = _call("self", q, q, hw=(4, 4))  # factor 1: not recorded with min_factor 2
    assert not rec.active(full)
    half = _call("self", q[:, :4], q[:, :4], hw=(2, 2))
    assert rec.active(half)
    assert not rec.active(_call("self", q, q, hw=(2, 2), cou=(1,)))  # no cond rows
    # inversion steps: ascending sample_sigmas, index k <-> edit step N - k; N = 4, kept = int(0.5*5) = 2
    ss = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    for k, expect in [(1, False), (2, False), (3, True), (4, True)]:
        c = _call("self", q[:, :4], q[:, :4], hw=(2, 2), step=k, total=4)
        c.extra["sample_sigmas"] = ss
        assert rec.active(c) == expect, k


def test_budget_raises_before_exceeding():
    cfg = store.StoreConfig(min_factor=1, budget_bytes=300)
    rec = store.AttentionRecorder(cfg)
    q = torch.randn(2, 4, 8)
    rec(_call("self", q, q, t=900), None)  # 256 bytes
    rec(_call("self", q, q, t=900), None)  # the same entry again (a re-run of the step) replaces, not adds
    assert rec.store.nbytes == 256
    with pytest.raises(store.StoreBudgetError, match="memory_budget_gb"):
        rec(_call("self", q, q, t=900, layer="input_5_0"), None)  # another layer: 512 > 300
    assert rec.finalize().nbytes == 256  # nothing beyond the budget was stored


def test_budget_projection_fails_after_the_first_step():
    cfg = store.StoreConfig(min_factor=1, budget_bytes=1000)
    rec = store.AttentionRecorder(cfg)
    q = torch.randn(2, 4, 8)
    ss = torch.linspace(0, 10, 11)
    c = _call("self", q, q, t=100, step=1, total=10)
    c.extra["sample_sigmas"] = ss
    rec(c, None)  # 256 bytes in step 1; 10 steps -> 2560 > 1000
    c2 = _call("self", q, q, t=200, step=2, total=10)
    c2.extra["sample_sigmas"] = ss
    with pytest.raises(store.StoreBudgetError, match="2.4e-06 GiB|needs"):
        rec(c2, None)


def test_store_survives_deepcopy():
    import copy

    st = store.AttentionStore(config=store.StoreConfig(), frames=1, latent_hw=(8, 8))
    assert copy.deepcopy({"s": st})["s"] is st


def test_estimate_for_the_readme_configuration():
    ours = store.estimate_store_bytes(frames=8, latent_hw=(64, 64), steps=50, record_window=0.8, min_factor=2,
                                      temporal_mode="middle", min_channels=640)
    theirs = store.estimate_fatezero_bytes(frames=8, latent_hw=(64, 64), steps=50, temporal_mode="middle")
    # hand check of one 32x32 self entry: q 8*1024*640 + shared k 1*1024*640, fp16
    assert store.entry_nbytes("self", 8, 1024, 1024, 640, 8, True) == (8 + 1) * 1024 * 640 * 2
    assert ours < theirs / 5
    # the figures quoted in README.md / docs/fatezero.md
    assert (round(ours / 2**30, 1), round(theirs / 2**30, 1)) == (5.7, 36.2)
    ten = store.estimate_store_bytes(frames=8, latent_hw=(64, 64), steps=10, record_window=0.8, min_factor=2,
                                     temporal_mode="middle", min_channels=640)
    assert round(ten / 2**30, 1) == 1.1


# --- the edit-time controller on a hand-built store ----------------------------------------------------

def _controller(only_cond=True, blend="", self_window=(0.0, 1.0), cross=1.0):
    from test_align import ToyTokenizer

    from zsve.attention.fatezero import FateZeroController, make_plan

    torch.manual_seed(0)
    st = store.AttentionStore(config=store.StoreConfig(min_factor=1), frames=2, latent_hw=(4, 4))
    st.layers["L"] = store.LayerInfo(hw=(4, 4), heads=1, channels=4, factor=1)
    q = torch.randn(2, 16, 4).half()
    k = torch.randn(2, 16, 4).half()
    p = torch.zeros(2, 1, 16, 77)
    p[:, 0, :, 0] = 0.5
    p[:, 0, 0, 2] = 0.5  # token 2 ("circle") attends to pixel (0, 0) only
    p[:, 0, 1:, 1] = 0.5
    for t in (999, 500):
        st.add(t, "L", "self", {"q": q, "k": k})
        st.add(t, "L", "cross", {"p": p.half()})
    plan = make_plan(ToyTokenizer(), "a circle", "a circle", [-1, 500, 999], cross_window=cross,
                     self_window=self_window, blend_words=blend, blend_threshold=0.5, only_cond=only_cond)
    return FateZeroController(st, plan), st, q, k, p


def _edit_call(kind, cou, t=999, nk=16):
    return AttnCall(kind=kind, layer="L", hw=(4, 4), frames=2, cond_or_uncond=list(cou), sigma=1.0, timestep=t,
                    heads=1, extra={}), torch.rand(2 * len(cou), 1, 16, nk)


def test_controller_rows_steps_and_separate_cond_uncond_calls():
    ctrl, st, q, k, p = _controller()
    assert ctrl.plan.timestep_to_step == {999: 0, 500: 1}
    call, probs = _edit_call("self", [1, 0])
    assert ctrl.active(call)
    out = ctrl(call, probs)
    inv = attention_probs(q.float(), k.float(), 1)
    assert torch.equal(out[:2], probs[:2])  # uncond rows untouched
    assert torch.allclose(out[2:], inv)  # cond rows: the inversion's map
    call, probs = _edit_call("self", [1])  # uncond alone (cond/uncond in separate calls)
    assert not ctrl.active(call)
    call, probs = _edit_call("self", [0])  # cond alone
    assert ctrl.active(call) and torch.allclose(ctrl(call, probs), inv)
    call, probs = _edit_call("cross", [0], nk=77)
    assert torch.allclose(ctrl(call, probs), p)  # same prompt, window 1: the source maps
    ctrl_all, *_ = _controller(only_cond=False)
    call, probs = _edit_call("self", [1, 0])
    assert torch.allclose(ctrl_all(call, probs), torch.cat([inv, inv]))
    call, _ = _edit_call("self", [0], t=750)
    with pytest.raises(KeyError, match="same number of steps"):
        ctrl.active(call)


def test_controller_windows_and_blend_mask():
    ctrl, st, q, k, p = _controller(self_window=(0.5, 1.0), cross=0.0, blend="circle")
    call, _ = _edit_call("self", [0], t=999)  # step 0: outside [1, 2)
    assert not ctrl.active(call)
    call, _ = _edit_call("cross", [0], t=999, nk=77)  # cross window 0: never
    assert not ctrl.active(call)
    call, probs = _edit_call("self", [0], t=500)  # step 1: fused with the blend mask
    assert ctrl.active(call)
    out = ctrl(call, probs)
    inv = attention_probs(q.float(), k.float(), 1)
    # mask of "circle" (token 2 attends to pixel (0, 0)): 3x3 max-pool -> the top-left 2x2 block
    expect_mask = torch.zeros(4, 4)
    expect_mask[:2, :2] = 1
    m = ctrl._mask(call, 500, (4, 4))
    assert torch.equal(m, expect_mask.reshape(1, 16).expand(2, 16))
    mm = expect_mask.reshape(1, 1, 16, 1)
    assert torch.allclose(out, mm * probs + (1 - mm) * inv)


def test_end_of_text_maps_edit_keeps_the_edit_prompts_own_tail():
    """end_of_text_maps 'edit' (default): the edit prompt's end-of-text token and padding keep their own maps in the
    cross window (control weight 0 there), for word swap and refinement alike; 'source': P2P's (the source's maps)."""
    from test_align import ToyTokenizer

    from zsve.attention import align
    from zsve.attention.fatezero import FusionConfigError, make_plan

    tok = ToyTokenizer()
    ts = [-1, 1, 251, 501, 751]
    assert align.end_of_text("a red watercolor car", tok) == 6  # BOS, a, red, water, color, car, EOS
    for src, edit, mode in (("a red car", "a blue car", "replace"), ("a car", "a watercolor car", "refine")):
        eot = align.end_of_text(edit, tok)
        own = make_plan(tok, src, edit, ts, mode=mode, cross_window=0.8)
        ref = make_plan(tok, src, edit, ts, mode=mode, cross_window=0.8, end_of_text_maps="source")
        assert own.cross_mode == ref.cross_mode == mode
        assert ref.cross_alphas[:4].eq(1).all() and ref.cross_alphas[4].eq(0).all()
        assert torch.equal(own.cross_alphas[:, :eot], ref.cross_alphas[:, :eot])
        assert own.cross_alphas[:, eot:].eq(0).all()
        # one step of control: the tail columns are the edit's own, the words' columns the aligned source's
        base, mine = torch.rand(2, 3, 77), torch.rand(2, 3, 77)
        out = p2p.cross_control(base, mine, own.cross_alphas[0], own.cross_mode, own.mapper, own.refine_alphas)
        assert torch.equal(out[..., eot:], mine[..., eot:]) and torch.equal(out[..., :2], base[..., :2])
    same = make_plan(tok, "a car", "a car", ts, cross_window=0.8)  # identical prompts: the source's maps as they are
    assert same.cross_mode == "none" and same.cross_alphas[:4].eq(1).all()
    with pytest.raises(FusionConfigError, match="end_of_text_maps must be one of edit, source"):
        make_plan(tok, "a car", "a red car", ts, end_of_text_maps="eot")
    with pytest.raises(ValueError, match="end-of-text maps"):
        p2p.own_end_of_text(torch.ones(77), 3, "both")


def test_make_plan_words_windows_and_fallback():
    from test_align import ToyTokenizer

    from zsve.attention.fatezero import FusionConfigError, make_plan

    tok = ToyTokenizer()
    ts = [-1, 1, 251, 501, 751]  # 4 steps: timestep 751 is edit step 0
    plan = make_plan(tok, "a car fast", "a watercolor car fast", ts, mode="replace", cross_window=0.8,
                     word_windows="watercolor:0.2-0.6", self_window=(0.0, 0.5), reweight="watercolor:10",
                     blend_words="car")
    assert plan.cross_mode == "refine" and "using refinement" in plan.notes[0]  # 3 vs 4 words
    assert plan.timestep_to_step == {751: 0, 501: 1, 251: 2, 1: 3}
    # default window 0.8 -> rows [0, 4); 'watercolor' (tokens 2, 3) -> rows [int(0.2*5), int(0.6*5)) = [1, 3)
    assert plan.cross_alphas[:, 1].tolist() == [1, 1, 1, 1, 0]
    assert plan.cross_alphas[:, 2].tolist() == [0, 1, 1, 0, 0] and torch.equal(plan.cross_alphas[:, 3],
                                                                                plan.cross_alphas[:, 2])
    assert plan.equalizer[2] == 10 and plan.equalizer[3] == 10 and plan.equalizer[4] == 1
    assert plan.self_steps == (0, 2) and plan.blend_indices == [2]
    same = make_plan(tok, "a red car", "a blue car", ts, mode="replace")
    assert same.cross_mode == "replace" and same.mapper.shape == (77, 77) and not same.notes
    with pytest.raises(FusionConfigError, match="record_window"):
        make_plan(tok, "a car", "a car", ts, cross_window=1.0, self_window=(0, 0.5), record_window=0.5)
    with pytest.raises(FusionConfigError, match="0.2-0.6"):
        make_plan(tok, "a car", "a car", ts, word_windows="car:x")
