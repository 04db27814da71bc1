"""UI-format (frontend, schema 0.4) workflows <-> API-format prompts, using ComfyUI's node schemas.

ComfyUI has no Python converter (the frontend does it), so the pack keeps its workflows as UI files
(drag-and-drop) generated from compact specs by `scripts/make_workflows.py`, and tests/the demo convert
them to API prompts here to execute them headless.
"""

from __future__ import annotations

import json
from pathlib import Path

import nodes

# Nodes the frontend alone defines (virtual: never in an API prompt).
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _ordered_inputs(class_type: str) -> list[tuple[str, tuple, bool]]:
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    it = cls.INPUT_TYPES()
    out = []
    for section, optional in (("required", False), ("optional", True)):
        for name, spec in it.get(section, {}).items():
            out.append((name, spec, optional))
    return out


def is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in WIDGET_TYPES


def _has_control(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def _outputs(class_type: str) -> list[tuple[str, str]]:
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    types = list(cls.RETURN_TYPES)
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def display_name(class_type: str) -> str:
    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type) or class_type


def build_ui(spec: list[dict], title: str = "", stages: list[tuple[str, str]] | None = None, note: str = "") -> dict:
    """spec: [{"id": "name", "type": ClassType, "widgets": {name: value}, "links": {input: ("src id", slot)},
    "title": optional, "stage": key, "col": optional least sub-column in its stage}] in execution order. Widgets not given take the schema default.
    With `stages` ([(key, group title)] in reading order), the nodes are laid out by stage (tests/zsve_layout.py)
    with a group per stage and `note` as a Markdown note; without, in one row (as the generator did before)."""
    from zsve_layout import layout, node_size

    sizes: dict[int, list[int]] = {}
    ids = {n["id"]: i + 1 for i, n in enumerate(spec)}
    links: list[list] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes = []
    for order, n in enumerate(spec):
        nid = ids[n["id"]]
        inputs, widgets, shown = [], [], []
        for name, ispec, optional in _ordered_inputs(n["type"]):
            if is_widget(ispec):
                opts = ispec[1] if len(ispec) > 1 and isinstance(ispec[1], dict) else {}
                shown.append((name, n.get("widgets", {}).get(name, opts.get("default", "")),
                              bool(opts.get("multiline"))))
                if name in n.get("widgets", {}):
                    val = n["widgets"][name]
                elif "default" in opts:
                    val = opts["default"]
                elif isinstance(ispec[0], list):
                    val = ispec[0][0]
                else:
                    val = (opts.get("options") or [None])[0]
                widgets.append(val)
                if _has_control(name, ispec):
                    widgets.append("fixed")
                    shown.append(("control after generate", "fixed", False))
                continue
            link_id = None
            if name in n.get("links", {}):
                src, slot = n["links"][name]
                link_id = len(links) + 1
                src_type = _outputs(next(s["type"] for s in spec if s["id"] == src))[slot][1]
                links.append([link_id, ids[src], slot, nid, len(inputs), src_type])
                out_links.setdefault((ids[src], slot), []).append(link_id)
            elif not optional:
                raise ValueError(f"workflow node {n['id']} ({n['type']}): required input '{name}' is not linked")
            inputs.append({"name": name, "type": ispec[0] if isinstance(ispec[0], str) else "COMBO",
                           "link": link_id})
        in_names = [i["name"] for i in inputs]
        out_names = [name for name, _t in _outputs(n["type"])]
        slots = [(in_names[i] if i < len(in_names) else "", out_names[i] if i < len(out_names) else "")
                 for i in range(max(len(in_names), len(out_names)))]
        sizes[nid] = node_size(n["type"], n.get("title", display_name(n["type"])), shown, slots)
        ui_nodes.append({
            "id": nid, "type": n["type"], "pos": [40 + 330 * order, 80 + 60 * (order % 3)], "size": [300, 160],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": [],
            "properties": {"Node name for S&R": n["type"]}, "widgets_values": widgets,
            **({"title": n["title"]} if "title" in n else {}),
        })
    for node in ui_nodes:
        node["outputs"] = [
            {"name": name, "type": t, "links": out_links.get((node["id"], slot), []), "slot_index": slot}
            for slot, (name, t) in enumerate(_outputs(node["type"]))
        ]
    ui = {
        "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
        "groups": [], "config": {}, "extra": {"zsve_title": title}, "version": 0.4,
    }
    if stages is not None:
        layout(ui, {ids[n["id"]]: n["stage"] for n in spec}, stages, note, sizes,
               {ids[n["id"]]: n["col"] for n in spec if "col" in n})
    return ui


def ui_to_api(ui: dict, replace: dict | None = None) -> dict:
    """Convert a UI workflow to an API prompt. `replace` maps a node's class_type (or its id as a string) to
    an API node that stands in for it (e.g. a test model provider instead of CheckpointLoaderSimple)."""
    replace = replace or {}
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, dict] = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:  # muted / bypassed / notes
            continue
        nid = str(node["id"])
        sub = replace.get(nid, replace.get(node["type"]))
        if sub is not None:
            prompt[nid] = json.loads(json.dumps(sub))
            continue
        if node["type"] not in nodes.NODE_CLASS_MAPPINGS:
            raise KeyError(f"workflow uses node type {node['type']!r}, which is not installed")
        inputs: dict = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, spec, _ in _ordered_inputs(node["type"]):
            if not is_widget(spec):
                continue
            if i >= len(values):
                break
            if name not in inputs:
                inputs[name] = values[i]
            i += 1
            if _has_control(name, spec):
                i += 1
        prompt[nid] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def load_ui(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


WORKFLOWS_DIR = Path(__file__).resolve().parents[1] / "workflows"


def shipped_prompt(name: str, models: tuple, input_dir: Path, frames: int, size: int = 64,
                   key: str = "ckpt") -> tuple[dict, dict]:
    """A shipped workflow (workflows/<name>.json) as an API prompt ready to run headless on test models:
    a moving-square clip written to <input_dir>/input.mp4 (what its LoadVideo reads), the checkpoint loader
    replaced by the test node holding `models` (MODEL, CLIP, VAE). Returns (prompt, {class_type: node id})."""
    from zsve_harness import OBJECTS, moving_square_frames, write_video

    write_video(moving_square_frames(frames=frames, size=size), input_dir / "input.mp4")
    OBJECTS[key] = models
    prompt = ui_to_api(load_ui(WORKFLOWS_DIR / f"{name}.json"),
                       replace={"CheckpointLoaderSimple": {"class_type": "ZSVETestCheckpoint", "inputs": {"key": key}}})
    return prompt, {v["class_type"]: k for k, v in prompt.items()}
