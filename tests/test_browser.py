"""The shipped workflows as the real frontend meets them (issue 22): ComfyUI's server on 127.0.0.1 with this pack in
custom_nodes and the frontend package its requirements.txt pins, headless Chromium driven by Playwright. For every
workflow, loaded the way a drop on the canvas does (app.handleFile): no missing-node dialog, no page error and no
console error from the pack, every link connected, the widget values as in the file, app.graphToPrompt() equal to the
converter the other tests run (tests/zsve_workflows.py), every node at least the size the frontend computes for it
and wide enough for its title and widget texts as the canvas measures them, the starting view as saved. Two
screenshots per workflow (the starting view, the whole graph) are kept in output/browser/ (ZSVE_BROWSER_ARTEFACTS to put them elsewhere).

Skipped, saying why, only where no browser can be had (scripts/env.sh's zsve_browser installs Debian's chromium,
Playwright and the pinned frontend where apt and pip work).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from zsve_browser import PACK_NAME, Browser, BrowserUnavailable, Server, check_available, workflow_needs
from zsve_layout import NOTE_SCREEN_PX, curves_behind, overlaps, spline

import zsve_boot
from zsve_workflows import FRONTEND_ONLY, _ordered_inputs, is_widget, load_ui, ui_to_api

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
ARTEFACTS = Path(os.environ.get("ZSVE_BROWSER_ARTEFACTS", ROOT / "output" / "browser"))


@pytest.fixture(scope="module")
def frontend():
    try:
        check_available(zsve_boot.COMFYUI)
    except BrowserUnavailable as e:
        pytest.skip(f"no browser for the frontend test: {e}")
    models, inputs = workflow_needs(WORKFLOWS)
    server = Server(zsve_boot.COMFYUI, models, inputs)
    browser = None
    try:
        server.start()
        browser = Browser(server.url)
        browser.open_app()
        yield server, browser
    finally:
        if browser is not None:
            browser.close()
        server.stop()


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, abs_tol=1e-6)
    return a == b


def _api(prompt: dict) -> dict:
    """class_type and inputs per node; inputs the node's schema does not have (the frontend's display widgets,
    e.g. Load Video's `video-preview`, sent empty and ignored by the server) are left out, checked to be empty."""
    out = {}
    for k, v in prompt.items():
        known = {name for name, _spec, _opt in _ordered_inputs(v["class_type"])}
        extra = {name: x for name, x in v["inputs"].items() if name not in known}
        assert all(x in ("", None) for x in extra.values()), (v["class_type"], extra)
        out[k] = {"class_type": v["class_type"], "inputs": {n: x for n, x in v["inputs"].items() if n in known}}
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_in_the_frontend(frontend, path):
    server, browser = frontend
    ui = load_ui(path)
    r = browser.load(path)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    browser.screenshot(ARTEFACTS / f"{path.stem}.png")  # the starting view
    browser.overview(ARTEFACTS / f"{path.stem}_overview.png")  # the whole graph

    assert not r["dialogs"], f"{path.name}: a dialog opened: {r['dialogs']}"
    errors = [c for c in r["console"] if c["type"] == "pageerror"
              or (c["type"] == "error" and (PACK_NAME in c["url"] or PACK_NAME in c["text"]))]
    assert not errors, f"{path.name}: {errors}"
    by_id = {n["id"]: n for n in r["nodes"]}
    assert set(by_id) == {n["id"] for n in ui["nodes"]}
    for n in r["nodes"]:
        assert n["registered"] and not n["has_errors"], f"{path.name}: {n['type']} is missing or has errors"
    # every link connected, as in the file
    assert sorted(tuple(link[:5]) for link in r["links"]) == sorted(tuple(link[:5]) for link in ui["links"])
    for n in ui["nodes"]:
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                got = next(x for x in by_id[n["id"]]["inputs"] if x["name"] == inp["name"])
                assert got["link"] == inp["link"], f"{path.name}: {n['type']}.{inp['name']} not connected"
    # widget values as in the file
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            assert by_id[n["id"]]["widgets"][0]["value"] == n["widgets_values"][0]
            continue
        values = iter(n["widgets_values"])
        shown = {w["name"]: w["value"] for w in by_id[n["id"]]["widgets"]}
        for name, spec, _opt in _ordered_inputs(n["type"]):
            if not is_widget(spec):
                continue
            want = next(values)
            if spec[0] == "INT" and name in ("seed", "noise_seed"):
                next(values)
            assert _same(shown.get(name), want), f"{path.name}: {n['type']}.{name} = {shown.get(name)!r}, file {want!r}"
    # the API prompt the frontend queues is the one the headless tests run
    assert _api(r["prompt"]) == _api(ui_to_api(ui)), f"{path.name}: graphToPrompt differs from ui_to_api"
    # sizes: at least the frontend's own minimum; the title and each widget's label and value fit
    for n in r["nodes"]:
        w, h = n["size"]
        # a media preview's computed size follows the node's own width (the preview fills it): not a minimum
        if n["min_size"] and not n["has_media"]:
            assert w + 0.5 >= n["min_size"][0] and h + 0.5 >= n["min_size"][1], \
                f"{path.name}: {n['title']} is {w:.0f}x{h:.0f}, the frontend needs {n['min_size']}"
        assert n["text"]["title"] + 40 <= w, f"{path.name}: the title {n['title']!r} is cut ({w:.0f} px)"
        for name, wtype, label_w, value_w in n["text"]["widgets"]:
            if wtype in ("customtext", "textarea", "markdown", "button") or n["type"] in FRONTEND_ONLY:
                continue
            assert label_w + value_w + 60 <= w, f"{path.name}: {n['title']}.{name} is cut ({w:.0f} px)"
    # no node covers another as the frontend placed and sized them (media previews resized)
    for i, a in enumerate(r["nodes"]):
        for b in r["nodes"][i + 1:]:
            assert not overlaps(a, b), f"{path.name}: {a['title']} overlaps {b['title']} in the frontend"
    assert math.isclose(r["view"]["scale"], ui["extra"]["ds"]["scale"]), r["view"]
    assert r["groups"] == len(ui["groups"])
    # no link runs behind a node, as the frontend draws them: its slot positions, its spline, the nodes' boxes
    # with their title bars and media previews as loaded
    curves = [(lid, src, dst, spline(a, b)) for lid, src, dst, a, b in r["curves"]]
    boxes = {nid: ((x, y, x + w, y + h), title) for nid, (x, y, w, h), title in r["boxes"]}
    assert len(curves) == len(ui["links"]) and len(boxes) == len(ui["nodes"])
    behind = curves_behind(curves, boxes, every=True)
    assert not behind, f"{path.name}: links behind nodes in the frontend: {behind}"
    # the Read me note is readable at the starting view: its text at least NOTE_SCREEN_PX high on screen
    # (web/js/read_me_note.js sets the font size the file asks for), all of it in its box, its top-left on the canvas
    assert len(r["notes"]) == 1, r["notes"]
    note = r["notes"][0]
    on_screen = note["font_px"] * note["screen_scale"]
    assert math.isclose(note["screen_scale"], ui["extra"]["ds"]["scale"], rel_tol=0.02), note
    assert on_screen >= NOTE_SCREEN_PX - 0.5, f"{path.name}: the note's text is {on_screen:.1f} px on screen: {note}"
    assert note["scroll_h"] <= note["client_h"] + 2, f"{path.name}: the note's text does not fit its box: {note}"
    x, y, _w, _h = note["rect"]
    assert 0 <= x < note["canvas"][0] / 2 and 0 <= y < note["canvas"][1] / 2, f"{path.name}: note at {note['rect']}"
