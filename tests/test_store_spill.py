"""The attention store's spill to disk (issue 21): memory_budget_gb + over_budget decide between the RAM, refusing
and one safetensors file per recorded step; the edit gives bitwise the RAM store's result through the real
ComfyUI executor (with and without context windows); the files go with the store; a full disk is refused."""

from __future__ import annotations

import gc
import os
from collections import namedtuple

import folder_paths
import pytest
import torch

import zsve.attention.store as S
import zsve.nodes._comfy as glue
from zsve.nodes.fatezero import SPILL_FOLDER, AttentionStore
from zsve_harness import CAPTURED, OBJECTS, GraphError, encode_text, run_prompt

SRC = "a red circle on blue stripes"
EDIT = "a red square on blue stripes"
STEPS = 5
TINY = 1e-9  # GiB: a budget of 1 byte, under any store


def _latent(frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, 16, 16, generator=g)
    return {"samples": base + 0.3 * torch.randn(frames, 4, 16, 16, generator=g)}


def _store_model(model, budget_gb=0.0, over_budget="refuse", record_window=1.0):
    return AttentionStore.execute(model, record_window=record_window, skip_full_res=False, memory_budget_gb=budget_gb,
                                  over_budget=over_budget).result[0]


def _invert(model, frames=3, steps=4, **kw):
    pos = encode_text(OBJECTS["clip"], SRC)
    return glue.run_inversion(_store_model(model, **kw), _latent(frames), pos, None, steps, 1.0, disable_pbar=True)[1]


@pytest.fixture(autouse=True)
def _objects(tiny_model, tiny_clip):
    OBJECTS.update({"model": tiny_model, "clip": tiny_clip})


def _all_entries(st):
    return {k: {n: v.clone() for n, v in e.items()} for k, e in st.entries.items()}


def test_budget_decides_between_ram_refusing_and_spilling(tiny_model):
    """No budget, or a budget the store fits: RAM, whatever over_budget says. Over the budget: 'refuse' stops
    with a message naming the inputs, 'spill to disk' writes every recorded step (the first one too) to its own
    file under ComfyUI's temp directory and keeps bitwise the same entries."""
    ram = _invert(tiny_model).records["attention"]
    assert not ram.spilled and ram.nbytes > 0 and ram.ram_nbytes == ram.nbytes
    for budget in (0.0, 1.0):  # 0 = no budget; 1 GiB: the store fits
        st = _invert(tiny_model, budget_gb=budget, over_budget="spill to disk").records["attention"]
        assert not st.spilled and "in RAM" in st.summary()
    with pytest.raises(S.StoreBudgetError, match="memory budget") as e:
        _invert(tiny_model, budget_gb=TINY, over_budget="refuse")
    assert "over_budget" in str(e.value) and "memory_budget_gb" in str(e.value)
    inv = _invert(tiny_model, budget_gb=TINY, over_budget="spill to disk")
    st = inv.records["attention"]
    assert st.spilled and os.path.dirname(st.spill_dir) == os.path.join(folder_paths.get_temp_directory(), SPILL_FOLDER)
    files = sorted(os.listdir(st.spill_dir))
    assert len(files) == len(st.timesteps) == len(ram.timesteps) == 4 and all(f.endswith(".safetensors") for f in files)
    assert st.ram_nbytes == 0 and st.nbytes == ram.nbytes and st.disk_nbytes >= st.nbytes
    assert inv.nbytes < ram.nbytes  # the inversion's RAM: the trajectory, not the spilled store
    assert set(st.entries) == set(ram.entries)
    for k, e in ram.entries.items():
        got = st.entries[k]
        assert got.keys() == e.keys() and all(torch.equal(got[n], e[n]) and got[n].dtype == e[n].dtype for n in e)
    text = st.summary()
    assert "spilled to disk" in text and st.spill_dir in text and "per frame per step" in text


def test_a_budget_the_first_step_fits_spills_from_the_projection_on(tiny_model):
    """A budget above one step but below the projected store: the projection after the first step spills, the
    first step's entries are written too, every step has its file."""
    ram = _invert(tiny_model).records["attention"]
    per_step = ram.nbytes // len(ram.timesteps)
    budget = 1.5 * per_step / 2**30
    with pytest.raises(S.StoreBudgetError, match="memory budget"):
        _invert(tiny_model, budget_gb=budget)
    st = _invert(tiny_model, budget_gb=budget, over_budget="spill to disk").records["attention"]
    assert st.spilled and len(os.listdir(st.spill_dir)) == 4 and st.nbytes == ram.nbytes
    assert all(torch.equal(st.entries[k]["q"], e["q"]) for k, e in ram.entries.items() if k[2] == "self")


def test_a_full_disk_is_refused_with_a_message(tiny_model, monkeypatch):
    """Spilling needs room for the projected store (+5%) on the temp directory's disk: refused otherwise, naming
    the node's inputs; nothing is left behind."""
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(S.shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - 1000, 1000))
    root = os.path.join(folder_paths.get_temp_directory(), SPILL_FOLDER)
    before = set(os.listdir(root)) if os.path.isdir(root) else set()
    with pytest.raises(S.StoreDiskError, match="cannot spill to disk") as e:
        _invert(tiny_model, budget_gb=TINY, over_budget="spill to disk")
    msg = str(e.value)
    assert "0.0 MiB free" in msg and root in msg
    assert "memory_budget_gb" in msg and "over_budget" in msg and "record_window" in msg
    gc.collect()
    assert (set(os.listdir(root)) if os.path.isdir(root) else set()) <= before


def test_the_files_go_with_the_store(tiny_model):
    inv = _invert(tiny_model, budget_gb=TINY, over_budget="spill to disk")
    d = inv.records["attention"].spill_dir
    assert os.path.isdir(d) and os.listdir(d)
    del inv
    gc.collect()
    assert not os.path.exists(d)


def test_reads_cache_one_step_and_merges_into_a_spilled_entry():
    """Reading every entry of a step twice loads each tensor once; another step drops the cache (one step in
    RAM). A window's cross maps merged into a step already on disk are kept (a new copy), the old file's
    tensor is not changed in place."""
    st = S.AttentionStore(config=S.StoreConfig(), frames=4, latent_hw=(8, 8))
    st.layers["a"] = S.LayerInfo((4, 4), 2, 8, 2)
    g = torch.Generator().manual_seed(0)
    for t in (100, 200):
        st.add(t, "a", "self", {"q": torch.randn(4, 16, 8, generator=g).half(), "k": torch.randn(1, 16, 8).half()})
        st.add(t, "a", "cross", {"p": torch.rand(4, 2, 16, 77, generator=g).half()})
    ref = _all_entries(st)
    st.spill()
    st.flush()
    e = st.entries
    assert e.files == 2 and not e.pending and st.ram_nbytes == 0
    for _ in range(2):
        st.self_qk(200, "a"), st.cross_probs(200, "a"), st.cross_mean(200, "a")
    assert e.loads == 3 and len(e._cache) == 3
    st.self_probs(100, "a")
    assert e.loads == 5 and len(e._cache) == 2  # step 100's q and k only
    p = torch.ones(2, 2, 16, 77, dtype=torch.float16)
    st.merge_window_cross(200, "a", (1, 2), p)  # step 200 is on disk: a new copy, pending
    assert (200, "a", "cross") in e.pending
    got = st.entries[(200, "a", "cross")]["p"]
    want = ref[(200, "a", "cross")]["p"].clone()
    want[1:3] = p
    assert torch.equal(got, want)
    st.flush()
    assert torch.equal(st.entries[(200, "a", "cross")]["p"], want) and e.files == 3
    assert torch.equal(st.entries[(100, "a", "cross")]["p"], ref[(100, "a", "cross")]["p"])


def _graph(budget_gb, over_budget, windows: bool, source_attention="store"):
    model = ["tmp", 0]
    g = {
        "model": {"class_type": "ZSVETestProvide", "inputs": {"key": "model"}},
        "clip": {"class_type": "ZSVETestProvide", "inputs": {"key": "clip"}},
        "lat": {"class_type": "ZSVETestProvide", "inputs": {"key": "lat"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": SRC, "clip": ["clip", 0]}},
        "epos": {"class_type": "CLIPTextEncode", "inputs": {"text": EDIT, "clip": ["clip", 0]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["clip", 0]}},
        "pp": {"class_type": "EditPrompts", "inputs": {"clip": ["clip", 0], "source_text": SRC, "edit_text": EDIT}},
        "tmp": {"class_type": "TemporalSelfAttentionPatch",
                "inputs": {"model": ["model", 0], "mode": "previous+first", "include_own_frame": False,
                           "min_channels": 0}},
    }
    if windows:
        g["win"] = {"class_type": "VideoContextWindows", "inputs": {
            "model": ["tmp", 0], "context_length": 2, "context_overlap": 1, "context_schedule": "standard_static",
            "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid"}}
        model = ["win", 0]
    g.update({
        "store": {"class_type": "AttentionStore",
                  "inputs": {"model": model, "record_window": 0.8, "skip_full_res": False,
                             "memory_budget_gb": budget_gb, "source_attention": source_attention,
                             "over_budget": over_budget}},
        "inv": {"class_type": "VideoDDIMInvert",
                "inputs": {"model": ["store", 0], "latent": ["lat", 0], "positive": ["pos", 0], "steps": STEPS,
                           "cfg": 1.0}},
        "blend": {"class_type": "AttentionBlend", "inputs": {
            "model": model, "inversion": ["inv", 1], "prompts": ["pp", 3], "mode": "replace", "cross_replace": 0.8,
            "cross_replace_words": "", "self_replace_start": 0.0, "self_replace_end": 0.6, "reweight": "",
            "blend_words": "circle", "blend_threshold": 0.95, "only_cond": True}},
        "edit": {"class_type": "KSamplerAdvanced",
                 "inputs": {"model": ["blend", 0], "add_noise": "disable", "noise_seed": 0, "steps": STEPS,
                            "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
                            "positive": ["epos", 0], "negative": ["neg", 0], "latent_image": ["inv", 0],
                            "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "cap_edit": {"class_type": "ZSVETestCapture", "inputs": {"value": ["edit", 0], "key": "edit"}},
        "cap_mask": {"class_type": "ZSVETestCapture", "inputs": {"value": ["blend", 1], "key": "mask"}},
        "cap_inv": {"class_type": "ZSVETestCapture", "inputs": {"value": ["inv", 1], "key": "inv"}},
    })
    return g


def _ui_text(result, node):
    """A node's UI text from ComfyUI's history result ({"outputs": {node: {"text": [...]}}})."""
    return " ".join(str(t) for t in result["ui"]["outputs"].get(node, {}).get("text") or [])


def _store(inv):
    rec = inv.records["attention"]
    return rec.masks if getattr(rec, "recompute", False) else rec  # recompute mode: its mask record


@pytest.mark.parametrize("windows, source_attention", [(False, "store"), (True, "store"), (False, "recompute at edit")],
                         ids=["whole clip", "context windows", "recompute mode's mask record"])
def test_the_edit_with_a_spilled_store_is_bitwise_the_ram_edit(windows, source_attention):
    """Through ComfyUI's executor: the same graph with the store in RAM and spilled (budget of 1 byte, 'spill to
    disk') gives torch.equal edits and blend masks; Video DDIM Invert's text says where the store went; the
    files are deleted when the next prompt drops the spilled inversion from ComfyUI's cache. In recompute mode
    the record spilled is the blend-mask level's."""
    OBJECTS["lat"] = _latent(frames=4 if windows else 3, seed=5)
    run_prompt(_graph(0.0, "refuse", windows, source_attention))
    ram_edit, ram_mask = CAPTURED["edit"]["samples"].clone(), CAPTURED["mask"].clone()
    ram_store = _store(CAPTURED["inv"])
    assert not ram_store.spilled
    if windows:
        assert {key[3] for key in ram_store.entries if len(key) == 4}
    r = run_prompt(_graph(TINY, "spill to disk", windows, source_attention))
    assert {"inv", "blend", "edit"} <= r["executed"]
    st = _store(CAPTURED["inv"])
    assert st.spilled and set(st.entries) == set(ram_store.entries)
    d = st.spill_dir
    assert len(os.listdir(d)) == len(st.timesteps) and st.entries.loads > 0
    text = _ui_text(r, "inv")
    assert "spilled to disk" in text and d in text and "per frame per step" in text, text
    assert torch.equal(CAPTURED["edit"]["samples"], ram_edit)
    assert torch.equal(CAPTURED["mask"], ram_mask) and 0 < float(ram_mask.mean()) < 1  # the blend words act
    del st
    CAPTURED.clear()
    run_prompt(_graph(0.0, "refuse", windows, source_attention))  # the spilled inversion leaves ComfyUI's cache
    gc.collect()
    assert not os.path.exists(d)


def test_the_node_refuses_an_unknown_choice_and_says_where_it_spills(tiny_model):
    with pytest.raises(Exception, match="over_budget"):
        _store_model(tiny_model, budget_gb=1.0, over_budget="swap")
    out = AttentionStore.execute(tiny_model, 1.0, False, 2.0, over_budget="spill to disk")
    assert "spills to disk" in " ".join(out.ui["text"]) and SPILL_FOLDER in " ".join(out.ui["text"])
    out = AttentionStore.execute(tiny_model, 1.0, False, 0.0, over_budget="spill to disk")  # no budget: RAM
    assert "spill" not in " ".join(out.ui["text"])
    OBJECTS["lat"] = _latent()
    with pytest.raises(GraphError, match="memory budget"):
        run_prompt(_graph(TINY, "refuse", False))
