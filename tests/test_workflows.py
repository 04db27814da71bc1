"""Every shipped workflow is a valid UI-format file and runs headless through ComfyUI's executor."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nodes
import pytest
import torch
from zsve_layout import NOTE_SCREEN_PX, hidden_links, min_width, overlaps, rect

from zsve_harness import (
    CAPTURED,
    OBJECTS,
    make_tiny_controlnet,
    make_tiny_sdxl_clip,
    make_tiny_sdxl_model,
    moving_square_frames,
    run_prompt,
    write_video,
)
from zsve_workflows import (
    FRONTEND_ONLY,
    _ordered_inputs,
    _outputs,
    display_name,
    is_widget,
    load_ui,
    shipped_prompt,
    ui_to_api,
)

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_is_valid_ui_format(path):
    ui = load_ui(path)
    assert ui["version"] == 0.4 and ui["nodes"] and "links" in ui
    ids = {n["id"] for n in ui["nodes"]}
    for link in ui["links"]:
        link_id, src, src_slot, dst, dst_slot, typ = link
        assert src in ids and dst in ids
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert dst_node["inputs"][dst_slot]["link"] == link_id
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        assert link_id in src_node["outputs"][src_slot]["links"]
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        assert n["type"] in nodes.NODE_CLASS_MAPPINGS, f"{path.name} uses {n['type']}, not core or this pack"
        assert not n["type"].startswith("ZSVETest")
    # the template browser's card shows the file stem as its title: snake_case, short enough not to be cut
    assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", path.stem) and len(path.stem) <= 26, path.stem
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file() or thumb.with_suffix(".png").is_file(), f"{path.name} has no thumbnail"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_reads_at_first_sight(path):
    """Issue 22: stages as groups (2-4, titled, each holding its nodes), a Markdown note saying what to provide and
    what to change, a starting view at zoom >= 0.6 that shows the note and the first stage, no node overlapping
    another, every node wide enough for its title, widget labels with values and slot names."""
    ui = load_ui(path)
    groups = ui["groups"]
    assert 2 <= len(groups) <= 4 and all(g["title"].strip() for g in groups), [g["title"] for g in groups]
    graph_nodes = [n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY]
    for n in graph_nodes:  # every node inside exactly one group
        x0, y0, x1, y1 = rect(n)
        inside = [g["title"] for g in groups if g["bounding"][0] <= x0 and g["bounding"][1] <= y0
                  and x1 <= g["bounding"][0] + g["bounding"][2] and y1 <= g["bounding"][1] + g["bounding"][3]]
        assert len(inside) == 1, f"{path.name}: {n.get('title', n['type'])} is in groups {inside}"
    for i, a in enumerate(groups):  # groups do not overlap
        for b in groups[i + 1:]:
            ax, ay, aw, ah = a["bounding"]
            bx, by, bw, bh = b["bounding"]
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah), (a["title"], b["title"])
    notes = [n for n in ui["nodes"] if n["type"] in FRONTEND_ONLY]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for needed in ("input.mp4", "models/checkpoints", "Change first"):
        assert needed in text, f"{path.name}: the note does not say {needed!r}"
    for n in graph_nodes:  # the files the graph reads are named in the note
        if n["type"] in ("LoraLoader", "ControlNetLoader", "LoadImageMask"):
            assert n["widgets_values"][0] in text, f"{path.name}: the note does not name {n['widgets_values'][0]}"
    ds = ui["extra"]["ds"]
    assert ds["scale"] >= 0.6
    view = (-ds["offset"][0], -ds["offset"][1], 1280 / ds["scale"] - ds["offset"][0],
            720 / ds["scale"] - ds["offset"][1])  # what a 1280x720 canvas shows
    first = [n for n in graph_nodes if rect(n)[1] < groups[0]["bounding"][1] + groups[0]["bounding"][3]]
    for n in notes + first:  # the note and the first stage's nodes start inside the view
        x0, y0, _x1, _y1 = rect(n)
        assert view[0] <= x0 < view[2] and view[1] <= y0 < view[3], f"{n.get('title', n['type'])} not in view"
    for i, a in enumerate(ui["nodes"]):
        for b in ui["nodes"][i + 1:]:
            assert not overlaps(a, b), f"{path.name}: {a.get('title', a['type'])} overlaps {b.get('title', b['type'])}"
    # links: none runs behind a node, title bar included (the single strip had links behind up to ten nodes);
    # tests/test_browser.py checks the same with the frontend's own slot positions and node boxes
    behind = hidden_links(ui, every=True)
    assert not behind, f"{path.name}: links behind nodes: {behind}"
    # the note's text is given a font size readable at the starting zoom (web/js/read_me_note.js applies it)
    assert notes[0]["properties"]["zsve_text_px"] * ds["scale"] >= NOTE_SCREEN_PX
    for n in graph_nodes:
        shown, ins = [], []
        values = iter(n["widgets_values"])
        for name, spec, _opt in _ordered_inputs(n["type"]):
            if is_widget(spec):
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                shown.append((name, next(values), bool(opts.get("multiline"))))
                if spec[0] == "INT" and name in ("seed", "noise_seed"):
                    shown.append(("control after generate", next(values), False))
            else:
                ins.append(name)
        outs = [name for name, _t in _outputs(n["type"])]
        slots = [(ins[i] if i < len(ins) else "", outs[i] if i < len(outs) else "")
                 for i in range(max(len(ins), len(outs)))]
        need = min_width(n.get("title", display_name(n["type"])), shown, slots)
        assert n["size"][0] >= need, f"{path.name}: {n.get('title', n['type'])} is {n['size'][0]} wide, needs {need:.0f}"


def test_layout_check_finds_what_it_looks_for():
    """The geometric checks above catch an overlap, a link behind a node and a node too narrow for its title."""
    a = {"id": 1, "type": "A", "pos": [0, 0], "size": [200, 100]}
    b = {"id": 2, "pos": [150, 50], "size": [200, 100]}
    c = {"id": 3, "type": "C", "pos": [1000, 0], "size": [200, 100]}
    assert overlaps(a, b) and not overlaps(a, c)
    behind = {"id": 2, "pos": [500, -20], "size": [200, 100], "title": "in the way"}
    ui = {"nodes": [a, behind, c], "links": [[1, 1, 0, 3, 0, "MODEL"]]}
    assert hidden_links(ui) == [(1, "in the way")]
    behind["pos"] = [500, 400]
    assert hidden_links(ui) == []
    # a link from low left to high right is an S (it leaves its output horizontally): a node on the curve hides it,
    # a node on the straight line between its ends near the output does not (the Bezier is tested, not the chord)
    c["pos"] = [1000, -600]
    behind["pos"], behind["size"] = [560, -330], [60, 60]
    assert hidden_links(ui) == [(1, "in the way")]
    behind["pos"], behind["size"] = [260, -50], [40, 10]
    assert hidden_links(ui) == []
    assert min_width("a very long title of a node that will not fit", [], []) > 300


def test_invert_reconstruct_video_workflow_runs_headless(io_dirs, tiny_model, tiny_clip, tiny_vae):
    prompt, by_type = shipped_prompt("invert_reconstruct_video", (tiny_model, tiny_clip, tiny_vae), io_dirs / "in",
                                     frames=4)
    prompt["cap_enc"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [by_type["VAEEncode"], 0], "key": "enc"}}
    prompt["cap_zt"] = {"class_type": "ZSVETestCapture",
                        "inputs": {"value": [by_type["VideoDDIMInvert"], 0], "key": "zT"}}
    prompt["cap_rec"] = {"class_type": "ZSVETestCapture",
                         "inputs": {"value": [by_type["KSamplerAdvanced"], 0], "key": "rec"}}
    run_prompt(prompt)
    saved = list((io_dirs / "out").rglob("*.mp4"))
    assert len(saved) == 1 and saved[0].name.startswith("reconstruction")
    enc, rec = CAPTURED["enc"]["samples"], CAPTURED["rec"]["samples"]
    assert enc.shape[0] == 4
    zt = CAPTURED["zT"]["samples"]
    err = (rec - enc).abs().mean() / enc.abs().mean()
    err_zt = (zt - enc).abs().mean() / enc.abs().mean()
    # A random-weight tiny UNet on 8x8 latents is a poor denoiser, which bounds the DDIM round trip
    # (tests/test_inversion.py checks the inversion itself against the closed form); the graph must still
    # bring z_T back to the input.
    assert err < 0.25 and err < 0.25 * err_zt, f"relative reconstruction error {err:.3f} (z_T: {err_zt:.3f})"


def test_ui_to_api_maps_widgets_positionally():
    ui = load_ui(Path(__file__).resolve().parents[1] / "workflows" / "invert_reconstruct_video.json")
    prompt = ui_to_api(ui)
    ks = next(v for v in prompt.values() if v["class_type"] == "KSamplerAdvanced")["inputs"]
    assert ks["add_noise"] == "disable" and ks["noise_seed"] == 0 and ks["steps"] == 20
    assert ks["sampler_name"] == "ddim" and ks["scheduler"] == "ddim_uniform"  # after the seed's control widget
    assert ks["return_with_leftover_noise"] == "disable"
    json.dumps(prompt)
    assert torch.is_tensor(torch.zeros(1))


# The tiny UNet is narrower and shallower than SD1.5: settings of the shipped workflows adapted to it (as in
# tests/test_every_method_composes.py), and few steps.
TINY_SETTINGS = {"InFusionSource": dict(feature_blocks="1", attention_blocks="0-3"),
                 "InFusionInject": dict(feature_blocks="1", attention_blocks="0-3"),
                 "NullTextOptimize": dict(inner_steps=1), "TemporalSelfAttentionPatch": dict(min_channels=0)}
PACK_TYPES = {"VideoDDIMInvert", "AttentionStore", "AttentionBlend", "TemporalSelfAttentionPatch",
              "LatentBlendWithInversion", "NullTextOptimize", "VideoP2PGuider", "VideoP2PBranchOutputs",
              "InFusionSource", "InFusionInject", "LatentBlendMaskPreview"}


@pytest.fixture(scope="module")
def headless_dirs(tmp_path_factory, tiny_model, tiny_clip, tiny_vae):
    """Input/output folders for the shipped workflows: a 3-frame clip, a mask image, an empty LoRA file."""
    import comfy.utils
    import folder_paths
    import numpy as np
    from PIL import Image

    work = tmp_path_factory.mktemp("headless")
    for d in ("in", "out", "loras"):
        (work / d).mkdir()
    write_video(moving_square_frames(frames=3, size=64), work / "in" / "input.mp4")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(np.stack([mask] * 3, -1), "RGB").save(work / "in" / "mask.png")
    comfy.utils.save_torch_file({}, str(work / "loras" / "zsve_empty_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(work / "loras"))
    old = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(work / "in"))
    folder_paths.set_output_directory(str(work / "out"))
    OBJECTS["headless_ckpt"] = (tiny_model, tiny_clip, tiny_vae)
    OBJECTS["headless_ckpt_sdxl"] = (make_tiny_sdxl_model(), make_tiny_sdxl_clip(), tiny_vae)
    OBJECTS["headless_cn"] = make_tiny_controlnet(tiny_model)
    yield work
    folder_paths.set_input_directory(old[0])
    folder_paths.set_output_directory(old[1])


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_shipped_workflow_runs_headless(headless_dirs, path):
    """Each shipped workflow, as shipped (its SaveVideo and previews included), runs through ComfyUI's executor
    on the tiny models (the SDXL workflows on the tiny SDXL): every node of the pack executes, the video is
    written, the decoded frames are finite."""
    ckpt = "headless_ckpt_sdxl" if path.stem.startswith("sdxl") else "headless_ckpt"
    prompt = ui_to_api(load_ui(path), replace={
        "CheckpointLoaderSimple": {"class_type": "ZSVETestCheckpoint", "inputs": {"key": ckpt}},
        # no ControlNet file here: a tiny ControlNet built through ComfyUI's classes stands in for the loader
        "ControlNetLoader": {"class_type": "ZSVETestProvide", "inputs": {"key": "headless_cn"}}})
    for node in prompt.values():
        ct, inputs = node["class_type"], node["inputs"]
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = 3
        inputs.update(TINY_SETTINGS.get(ct, {}))
        if ct == "LoraLoader":
            inputs["lora_name"] = "zsve_empty_lora.safetensors"
        if ct == "LoadImageMask":
            inputs.update(image="mask.png", channel="red")
        if ct == "SaveVideo":
            inputs["filename_prefix"] = f"headless/{path.stem}"
    dec = next(k for k, v in prompt.items() if v["class_type"] == "VAEDecode")
    prompt["cap"] = {"class_type": "ZSVETestCapture", "inputs": {"value": [dec, 0], "key": "headless_out"}}
    res = run_prompt(prompt)
    ran = {prompt[n]["class_type"] for n in res["executed"] | {str(c) for c in res["cached"]} if n in prompt}
    ours = {v["class_type"] for v in prompt.values()} & PACK_TYPES
    assert ours and ours <= ran, f"{path.name}: pack nodes that did not run: {ours - ran}"
    out = CAPTURED["headless_out"]
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    assert list((headless_dirs / "out" / "headless").glob(f"{path.stem}*.mp4")), f"{path.name} wrote no video"


def test_shipped_workflows_are_what_the_generator_writes():
    """workflows/*.json are written by scripts/make_workflows.py: each file's note and its nodes (type, title, in
    execution order) are its spec's (the layout search is left out: it takes about a minute per workflow). A spec
    edited without running the generator (a note changed, a node added) fails here."""
    import runpy

    gen = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "make_workflows.py"),
                         run_name="make_workflows")
    assert sorted(gen["WORKFLOWS"]) == sorted(p.stem for p in WORKFLOWS)
    for name, wf in gen["WORKFLOWS"].items():
        ui = load_ui(Path(__file__).resolve().parents[1] / "workflows" / f"{name}.json")
        notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
        assert len(notes) == 1 and notes[0]["widgets_values"][0] == wf["note"], f"{name}: the note is not the spec's"
        got = [(n["type"], n.get("title")) for n in sorted(ui["nodes"], key=lambda n: n["order"])
               if n["type"] != "MarkdownNote"]
        want = [(n["type"], n.get("title")) for n in wf["nodes"]]
        assert got == want, f"{name}: nodes differ from the spec; run scripts/make_workflows.py {name}"
