"""InFusion's pure math (attention/infusion.py): parsing, schedule, formulas, key/value injection rows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from zsve.attention import infusion as inf
from zsve.attention.processor import AttnCall


def test_infusion_module_imports_no_comfyui():
    tree = ast.parse((Path(inf.__file__)).read_text())
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    assert not tops & {"comfy", "comfy_api", "comfy_extras", "nodes", "execution", "folder_paths"}, tops


def test_parse_blocks_and_concepts():
    assert inf.parse_blocks("4") == (4,)
    assert inf.parse_blocks("4-11") == tuple(range(4, 12))
    assert inf.parse_blocks("6-7, 2 ,2") == (2, 6, 7)
    with pytest.raises(inf.InFusionConfigError, match="range like"):
        inf.parse_blocks("a")
    with pytest.raises(inf.InFusionConfigError, match="at least one"):
        inf.parse_blocks(" ")
    assert inf.parse_concepts("cat->dog, red -> blue; red car->green truck") == [
        ("cat", "dog"), ("red", "blue"), ("red car", "green truck")]
    with pytest.raises(inf.InFusionConfigError, match="source words->edit words"):
        inf.parse_concepts("cat dog")


def test_schedule_follows_the_papers_order():
    b = inf.phase_bounds(50, 0.5, 0.8)
    assert b == (25, 40)
    phases = [inf.phase_of(i, b) for i in range(50)]
    assert phases[:25] == ["feature"] * 25 and phases[25:40] == ["kv"] * 15 and phases[40:] == ["fusion"] * 10
    with pytest.raises(inf.InFusionConfigError):
        inf.phase_bounds(10, 0.8, 0.5)
    # inversion (ascending) sigma index k <-> edit step N - k; the edit (descending) index is the step
    asc = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0])
    assert inf.edit_step(asc, torch.tensor([2.0])) == (0, 4)
    assert inf.edit_step(asc, torch.tensor([0.1])) == (3, 4)
    assert inf.edit_step(asc.flip(0), torch.tensor([0.5])) == (2, 4)
    assert inf.edit_step(None, torch.tensor([0.5])) == (None, None)


def test_inject_difference_per_chunk():
    g = torch.Generator().manual_seed(0)
    edit = torch.randn(2 * 3, 4, 5, 5, generator=g)  # 2 chunks x 3 frames
    src = torch.randn(3, 4, 5, 5, generator=g)
    assert torch.equal(inf.inject_difference(edit, src, 0.0), edit)
    full = inf.inject_difference(edit, src, 1.0)
    assert torch.allclose(full[:3], src) and torch.allclose(full[3:], src)
    half = inf.inject_difference(edit, src, 0.5)
    assert torch.allclose(half[3:], 0.5 * (edit[3:] + src))


def _rows(f, h, nq, nk, seed):
    return torch.randn(f, h, nq, nk, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def test_fuse_self_equals_the_paper_where_masks_agree_and_stays_a_distribution():
    edit, src = _rows(2, 2, 6, 6, 1), _rows(2, 2, 6, 6, 2)
    me = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 0, 0]], dtype=torch.float32)
    out = inf.fuse_self(edit, src, me, me)
    paper = me[:, None, :, None] * edit + (1 - me)[:, None, :, None] * src
    assert torch.allclose(out, paper)
    # masks that disagree: rows still sum to 1; source-only object area takes the edit's own map
    ms = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.float32)
    out = inf.fuse_self(edit, src, me, ms)
    assert torch.allclose(out.sum(-1), torch.ones(2, 2, 6))
    assert torch.allclose(out[0, :, 2], edit[0, :, 2])  # Me=0, Ms=1
    assert torch.allclose(out[0, :, 1], 0.5 * (edit[0, :, 1] + src[0, :, 1]))  # Me=1, Ms=0
    assert torch.allclose(out[0, :, 3], src[0, :, 3])  # neither: the source


def test_fuse_cross_alpha():
    edit, src = _rows(1, 2, 4, 77, 3), _rows(1, 2, 4, 77, 4)
    assert torch.allclose(inf.fuse_cross(edit, src, 1.0), edit)
    assert torch.allclose(inf.fuse_cross(edit, src, 0.0), src)
    assert torch.allclose(inf.fuse_cross(edit, src, 0.25), 0.25 * edit + 0.75 * src)


class _Tok:
    """Whitespace tokenizer satisfying attention/align.py's protocol."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text):
        ids = [self.vocab.setdefault(w, len(self.vocab) + 10) for w in text.split()]
        return [1] + ids + [2]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return inv[ids[0]]


def _plan(**kw):
    args = dict(tokenizer=_Tok(), source="a red cat on a mat", edit="a blue dog on a mat",
                concepts="cat->dog, red->blue", inversion_timesteps=[-1, 1, 201, 401, 601, 801],
                feature_blocks=(1,), attention_blocks=(0, 1, 2, 3), s1=0.4, s2=0.8)
    args.update(kw)
    return inf.make_plan(**args)


def test_make_plan_concepts_alignment_and_errors():
    plan = _plan()
    assert plan.cross_mode == "replace" and plan.mapper.shape == (77, 77)
    assert [c.label for c in plan.concepts] == ["cat->dog", "red->blue"]
    assert plan.concepts[0].source_indices == [3] and plan.concepts[0].edit_indices == [3]
    assert plan.concepts[1].source_indices == [2]
    assert plan.bounds == (2, 4) and plan.steps_of("fusion") == [4]
    assert plan.timestep_to_step[801] == 0 and plan.timestep_of_step(4) == 1
    assert _plan(edit="a blue dog sits on a mat").cross_mode == "refine"
    with pytest.raises(inf.InFusionConfigError, match="'cow' is not a word of the source prompt"):
        _plan(concepts="cow->dog")
    with pytest.raises(inf.InFusionConfigError, match="edit prompt"):
        _plan(concepts="cat->horse")
    # the edit prompt's end-of-text token and padding keep their own maps in the fusion (default), or not
    assert plan.end_of_text == 7 and _plan(end_of_text_maps="source").end_of_text is None
    assert _plan(edit="a red cat on a mat", concepts="").end_of_text is None  # the same prompt: nothing to align
    with pytest.raises(inf.InFusionConfigError, match="end_of_text_maps must be one of edit, source"):
        _plan(end_of_text_maps="x")


def test_kv_injection_replaces_rows_of_every_chunk_and_only_in_its_phase():
    plan = _plan(kv_region="all")  # Plug-and-Play's reading: every query row (see the "outside" test below)
    rec = inf.InFusionRecord(config=inf.InFusionRecordConfig(feature_blocks=(1,), attention_blocks=(0, 1, 2, 3),
                                                             s1=0.4, s2=0.8), frames=2, num_steps=5)
    g = torch.Generator().manual_seed(0)
    ks, vs = torch.randn(2, 4, 8, generator=g).half(), torch.randn(2, 4, 8, generator=g).half()
    rec.add_kv(401, "output_1_0", ks, vs)  # timestep 401 = edit step 2: the kv phase
    assert rec.nbytes == 2 * ks.numel() * 2
    ctl = inf.InFusionController(rec, plan)
    k, v = torch.randn(4, 4, 8, generator=g), torch.randn(4, 4, 8, generator=g)

    def call(t, layer="output_1_0", kind="self", cou=(1, 0)):
        return AttnCall(kind=kind, layer=layer, hw=(2, 2), frames=2, cond_or_uncond=list(cou), sigma=1.0, timestep=t,
                        heads=2)

    k2, v2 = ctl.process_kv(call(401), k, v)
    assert torch.equal(k2[:2], ks.float()) and torch.equal(k2[2:], ks.float()) and torch.equal(v2[2:], vs.float())
    assert ctl.process_kv(call(801), k, v) is None  # feature phase
    assert ctl.process_kv(call(401, layer="input_1_0"), k, v) is None
    assert ctl.process_kv(call(401, kind="cross"), k, v) is None
    plan.inject_uncond = False
    k3, _ = ctl.process_kv(call(401), k, v)
    assert torch.equal(k3[:2], k[:2]) and torch.equal(k3[2:], ks.float())
    with pytest.raises(Exception, match="not a step of the inversion"):
        ctl.process_kv(call(402), k, v)


def test_feature_injection_rows_chunks_and_context_windows():
    plan = _plan(feature_region="all")
    rec = inf.InFusionRecord(config=inf.InFusionRecordConfig(feature_blocks=(1,), attention_blocks=(0, 1, 2, 3),
                                                             s1=0.4, s2=0.8), frames=3, num_steps=5)
    src = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1)).half()
    rec.add_feature(801, 1, src)  # edit step 0: the feature phase
    ctl = inf.InFusionController(rec, plan)
    out = torch.randn(6, 4, 2, 2)
    fns = ctl.feature_targets(801, [1, 0], 6)
    assert set(fns) == {1}
    new = fns[1](out)
    assert torch.allclose(new[:3], src.float(), atol=1e-6) and torch.allclose(new[3:], src.float(), atol=1e-6)
    assert ctl.feature_targets(401, [1, 0], 6) == {}  # key/value phase: no hooks at all
    # context windows: the edit reads the entry the same window recorded (not a slice of another recording)
    src_w = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2)).half()
    rec.add_feature(801, 1, src_w, window=(1, 2))
    win = ctl.feature_targets(801, [0], 2, frame_index=[1, 2])[1](torch.zeros(2, 4, 2, 2))
    assert torch.allclose(win, src_w.float(), atol=1e-6)
    with pytest.raises(Exception, match=r"context window \[0, 1\]: sample the edit with the same context windows"):
        ctl.feature_targets(801, [0], 2, frame_index=[0, 1])
    with pytest.raises(ValueError, match="recorded 3"):
        ctl.feature_targets(801, [0], 2, frame_index=[2, 3])
    with pytest.raises(ValueError, match="recorded 3"):
        ctl.feature_targets(801, [0], 2)
    assert ctl.counts["feature"] == 2


def test_recorder_keeps_one_entry_per_context_window():
    cfg = inf.InFusionRecordConfig(feature_blocks=(1,), attention_blocks=(0, 1, 2, 3), s1=0.4, s2=0.8)
    r = inf.InFusionRecorder(cfg)
    for window in ([0, 1], [1, 2]):
        fns = r.feature_targets(801, 0, 5, [0], 2, frame_index=window)
        fns[1](torch.full((2, 4, 2, 2), float(window[0])))
    rec = r.finalize()
    assert rec.frames == 3 and set(rec.features) == {(801, 1, (0, 1)), (801, 1, (1, 2))}
    assert float(rec.feature(801, 1, window=[1, 2]).float().mean()) == 1.0


def test_feature_readings_sign_and_region():
    """The readings of the paper's feature difference (docs/infusion.md): towards the source (the default, outside
    the concepts' source masks) or away from it, everywhere / outside / inside the concepts."""
    edit, src = torch.zeros(2, 1, 1, 2), torch.ones(1, 1, 1, 2)
    w = torch.tensor([[[1.0, 0.0]]])  # [F, H, W]: the first position is inside the region
    assert torch.equal(inf.inject_difference(edit, src, 1.0, "source"), torch.ones(2, 1, 1, 2))
    assert torch.equal(inf.inject_difference(edit, src, 0.5, "difference"), torch.full((2, 1, 1, 2), -0.5))
    assert inf.inject_difference(edit, src, 1.0, "source", w).tolist() == [[[[1.0, 0.0]]]] * 2
    with pytest.raises(inf.InFusionConfigError, match="feature mode"):
        inf.inject_difference(edit, src, 1.0, "add")
    assert _plan().feature_region == "outside" and _plan().feature_mode == "source"
    assert _plan(concepts="").feature_region == "all"  # no concepts: no masks, everywhere
    with pytest.raises(inf.InFusionConfigError, match="feature region"):
        _plan(feature_region="around")
    rec = inf.InFusionRecord(config=inf.InFusionRecordConfig(feature_blocks=(1,), attention_blocks=(0, 1, 2, 3),
                                                             s1=0.4, s2=0.8), frames=1, num_steps=5)
    rec.add_feature(801, 1, torch.ones(1, 1, 1, 2).half())
    for region, want in (("outside", [0.0, 1.0]), ("inside", [1.0, 0.0]), ("all", [1.0, 1.0])):
        ctl = inf.InFusionController(rec, _plan(feature_region=region))
        ctl.concept_region = lambda hw: torch.tensor([[[1.0, 0.0]]])  # the concepts cover the first position
        new = ctl.feature_targets(801, [0], 1)[1](torch.zeros(1, 1, 1, 2))
        assert new.flatten().tolist() == want, region
    with pytest.raises(inf.InFusionConfigError, match="kv_end"):  # no fusion steps: no source masks to limit it
        inf.check_record(rec, _plan(s2=1.0))


def test_kv_injection_outside_the_concepts_keeps_the_edits_own_keys_values_inside():
    """kv_region "outside": the query rows outside the concepts' source masks attend to the source's keys/values,
    the rows inside to the edit's own (attend_output; no key/value replacement, no probability matrix)."""
    rec = inf.InFusionRecord(config=inf.InFusionRecordConfig(feature_blocks=(1,), attention_blocks=(0, 1, 2, 3),
                                                             s1=0.4, s2=0.8), frames=2, num_steps=5)
    g = torch.Generator().manual_seed(0)
    ks, vs = torch.randn(2, 4, 8, generator=g).half(), torch.randn(2, 4, 8, generator=g).half()
    rec.add_kv(401, "output_1_0", ks, vs)
    q, k, v = (torch.randn(4, 4, 8, generator=g) for _ in range(3))
    region = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])  # [F, H, W]: the concepts

    def attend(q_, k_, v_):  # one head
        return torch.softmax(q_ @ k_.transpose(1, 2) / 8 ** 0.5, -1) @ v_

    for inject_uncond, kinds in ((True, {0, 1}), (False, {0})):
        ctl = inf.InFusionController(rec, _plan(kv_region="outside", inject_uncond=inject_uncond))
        ctl._kv_layers = {"output_1_0"}
        ctl.concept_region = lambda hw: region
        c = AttnCall(kind="self", layer="output_1_0", hw=(2, 2), frames=2, cond_or_uncond=[1, 0], sigma=1.0,
                     timestep=401, heads=1)
        assert ctl.process_kv(c, k, v) is None and ctl.active(c) and ctl.kinds(c) == kinds
        if not inject_uncond:  # the dispatcher hands the processor its chunks only (the conditional one)
            c = AttnCall(kind="self", layer="output_1_0", hw=(2, 2), frames=2, cond_or_uncond=[0], sigma=1.0,
                         timestep=401, heads=1)
        c.q, c.k, c.v = (x[-2 * len(c.cond_or_uncond):] for x in (q, k, v))
        out = ctl.attend_output(c, attend)
        src = attend(c.q, ks.float().repeat(len(c.cond_or_uncond), 1, 1), vs.float().repeat(len(c.cond_or_uncond), 1, 1))
        own = attend(c.q, c.k, c.v)
        inside = region.reshape(2, 4).repeat(len(c.cond_or_uncond), 1).bool()
        assert torch.allclose(out[inside], own[inside], atol=1e-5) and torch.allclose(out[~inside], src[~inside], atol=1e-5)
        with pytest.raises(inf.InFusionConfigError, match="needs the attention output alone"):  # no explicit-probability path
            ctl(c, torch.zeros(2, 1, 4, 4))
    assert _plan().kv_region == "outside" and _plan(kv_region="outside", concepts="").kv_region == "all"
    with pytest.raises(inf.InFusionConfigError, match="kv region"):
        _plan(kv_region="inside")
    with pytest.raises(inf.InFusionConfigError, match="key/value injection is limited"):
        inf.check_record(rec, _plan(kv_region="outside", s2=1.0, feature_region="all"))
