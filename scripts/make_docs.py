"""Generate the node help pages web/docs/<NodeId>.md (shown by ComfyUI's frontend in the node library)
from each node's V3 schema (description, inputs with defaults and tooltips, outputs) plus the hand-written
notes in docs/nodes/<NodeId>.md (when and how to change the defaults, the papers' values).

Run: `bash scripts/run.sh scripts/make_docs.py`. tests/test_docs.py checks the pages are current.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str):
        return f'"{v}"' if v else '""'
    return str(v)


def render(node_cls) -> str:
    s = node_cls.define_schema()
    lines = [f"# {s.display_name or s.node_id}", "", s.description.strip(), ""]
    if s.inputs:
        lines += ["## Inputs", "", "| input | type | default | what it does |", "|---|---|---|---|"]
        for inp in s.inputs:
            t = inp.get_io_type() if hasattr(inp, "get_io_type") else getattr(inp, "io_type", "")
            default = getattr(inp, "default", None)
            opt = " (optional)" if getattr(inp, "optional", False) else ""
            extra = ""
            options = getattr(inp, "options", None)
            if options and t == "COMBO" and len(options) <= 8:
                extra = " Options: " + ", ".join(f"`{o}`" for o in options) + "."
            rng = ""
            if getattr(inp, "min", None) is not None or getattr(inp, "max", None) is not None:
                rng = f" Range {_fmt(inp.min)}..{_fmt(inp.max)}."
            tip = (inp.tooltip or "").replace("|", "\\|").replace("\n", " ")
            d = "" if default is None else _fmt(default).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{inp.id}`{opt} | {t} | {d} | {tip}{rng}{extra} |")
        lines.append("")
    if s.outputs:
        lines += ["## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
        for i, out in enumerate(s.outputs):
            t = out.get_io_type() if hasattr(out, "get_io_type") else getattr(out, "io_type", "")
            name = out.display_name or out.id or t
            lines.append(f"| `{name}` | {t} | {(out.tooltip or '').replace('|', '/')} |")
            del i
        lines.append("")
    notes = ROOT / "docs" / "nodes" / f"{s.node_id}.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    return "\n".join(lines)


def pages(node_classes) -> dict[str, str]:
    return {c.define_schema().node_id: render(c) for c in node_classes}


def main():
    from zsve_boot import PACK

    out = ROOT / "web" / "docs"
    out.mkdir(parents=True, exist_ok=True)
    for node_id, text in pages(PACK.nodes.all_nodes()).items():
        (out / f"{node_id}.md").write_text(text)
        print(f"wrote web/docs/{node_id}.md")


if __name__ == "__main__":
    main()
