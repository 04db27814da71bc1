"""Layout of the shipped UI workflows: stages as rows that read left to right, one group per stage, a note, a
starting view; and the geometric checks the tests run on every workflow (no overlap, widths that fit the labels,
links not hidden behind nodes).

Geometry as LiteGraph has it (frontend 1.27): a node's `pos` is the top-left of its body, its title bar (30 px)
sits above it; `size` is the body's width and height. A link is drawn as a cubic Bezier from the output slot (right
edge) to the input slot (left edge), with control points a quarter of the distance out horizontally; links are drawn
under the nodes. The view is `extra.ds`: screen = (graph + offset) * scale.

Text widths are estimated with Arial's advance widths (the canvas fonts: titles 14 px, widgets and slots 12 px); the
browser test (tests/test_browser.py) checks the sizes against the real frontend's computeSize and measureText.
"""

from __future__ import annotations

import math

TITLE_H = 30
SLOT_H = 20
WIDGET_H = 28
TITLE_PX = 14
TEXT_PX = 12
GAP_X = 120          # between sub-columns of a stage (room for the links)
FIRST_GAP_X = 200    # right of the first column (the loaders: their links to every row run down this gap)
GAP_Y = 50          # between nodes of a sub-column (plus the title bar)
ROW_GAP = 110       # between stage rows (group title bars)
GROUP_PAD = 20
GROUP_TITLE_H = 50  # LiteGraph group title (24 px font) and room above the first node's title
NOTE_W = 420
INDENT = 1           # rows after the first start this many columns in
GRID_MIN_W = 0
VIEW_W = 1240        # the canvas width (px) the starting view is made for
SCALE = 0.75        # the starting view's zoom
# Nodes that show media once run (image previews, video players) get room for it.
MEDIA_TYPES = {"PreviewImage": 260, "SaveVideo": 300, "LoadVideo": 300, "LoadImageMask": 300, "LoadImage": 300,
               "SaveImage": 300}
VIDEO_PLAYERS = {"LoadVideo"}
IMAGE_LOADERS = {"LoadImage", "LoadImageMask"}
MULTILINE_H = 70    # a multiline STRING widget (textarea)
PACK_BADGE_W = 0    # the node-source badge is drawn inside the title bar's right end (checked in the browser)

# Arial advance widths in em, by character class (close enough to size boxes; the browser test measures).
_NARROW = set("iljI.,:;|!'`()[]{} ")
_SEMI = set("frt-\"/\\*")
_WIDE = set("mwMW@%")


def text_width(s: str, px: float) -> float:
    w = 0.0
    for ch in str(s):
        if ch in _NARROW:
            w += 0.28
        elif ch in _SEMI:
            w += 0.36
        elif ch in _WIDE:
            w += 0.86
        elif ch.isupper():
            w += 0.68
        elif ch.isdigit():
            w += 0.56
        else:
            w += 0.54
    return w * px


def widget_text(value) -> str:
    """The value as the widget shows it (booleans as true/false, floats with their decimals)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def min_width(title: str, widgets: list[tuple[str, object, bool]], slots: list[tuple[str, str]]) -> float:
    """The width a node needs so that nothing in it is cut: its title, every widget's label and value on one line
    (multiline text boxes excepted), every row of input/output slot names."""
    need = text_width(title, TITLE_PX) + TITLE_H + 30 + PACK_BADGE_W
    for label, value, multiline in widgets:
        if multiline:
            continue
        need = max(need, text_width(label, TEXT_PX) + text_width(widget_text(value), TEXT_PX) + 100)
    for left, right in slots:
        need = max(need, text_width(left, TEXT_PX) + text_width(right, TEXT_PX) + 70)
    return need


def node_size(node_type: str, title: str, widgets: list[tuple[str, object, bool]], slots: list[tuple[str, str]]
              ) -> list[int]:
    w = max(240, min_width(title, widgets, slots))
    h = SLOT_H * len(slots) + 14
    for _label, _value, multiline in widgets:
        h += MULTILINE_H + 8 if multiline else WIDGET_H
    h = max(h, 46, MEDIA_TYPES.get(node_type, 0))
    if node_type in VIDEO_PLAYERS:  # the player is as wide as the node and as high as the video (square: width)
        h = max(h, w + 120)
    if node_type in IMAGE_LOADERS:  # the image preview likewise
        h = max(h, w + 60)
    return [int(math.ceil(w / 10) * 10), int(math.ceil(h / 10) * 10)]


def rect(node: dict) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a node with its title bar."""
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_H, x + w, y + h


def overlaps(a: dict, b: dict, margin: float = 0.0) -> bool:
    ax0, ay0, ax1, ay1 = rect(a)
    bx0, by0, bx1, by1 = rect(b)
    return ax0 < bx1 + margin and bx0 < ax1 + margin and ay0 < by1 + margin and by0 < ay1 + margin


def slot_pos(node: dict, slot: int, output: bool) -> tuple[float, float]:
    x, y = node["pos"]
    return (x + node["size"][0] if output else x), y + SLOT_H * (slot + 0.5)


def link_points(ui: dict, link: list, samples: int = 24) -> list[tuple[float, float]]:
    by_id = {n["id"]: n for n in ui["nodes"]}
    _, src, src_slot, dst, dst_slot, _t = link
    x0, y0 = slot_pos(by_id[src], src_slot, True)
    x3, y3 = slot_pos(by_id[dst], dst_slot, False)
    d = math.hypot(x3 - x0, y3 - y0) * 0.25
    x1, y1, x2, y2 = x0 + d, y0, x3 - d, y3
    pts = []
    for i in range(samples + 1):
        t = i / samples
        a, b, c, e = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        pts.append((a * x0 + b * x1 + c * x2 + e * x3, a * y0 + b * y1 + c * y2 + e * y3))
    return pts


def hidden_links(ui: dict, inset: float = 8.0, every: bool = False) -> list[tuple[int, str]]:
    """(link id, title of a node it runs behind) for every link whose curve passes under a third node (the first
    such node; with `every`, one pair per node it runs behind)."""
    out = []
    for link in ui["links"]:
        pts = link_points(ui, link)
        for n in ui["nodes"]:
            if n["id"] in (link[1], link[3]):
                continue
            x0, y0, x1, y1 = rect(n)
            if any(x0 + inset < x < x1 - inset and y0 + inset < y < y1 - inset for x, y in pts):
                out.append((link[0], n.get("title") or n.get("type")))
                if not every:
                    break
    return out


def layout(ui: dict, stage_of: dict[int, str], stages: list[tuple[str, str]], note: str,
           sizes: dict[int, list[int]], min_col: dict[int, int] | None = None) -> dict:
    """Places the nodes of `ui` (node id -> stage key in stage_of; `stages` = [(key, group title)] in reading
    order) in one row per stage, the nodes of a stage in sub-columns by their depth in the stage's own chains
    (a chain reads left to right; `min_col` pushes a node to a later sub-column), adds a group per stage, a
    MarkdownNote with `note` left of the first row and a starting view on the note and the first row.

    Where a node sits in its column, and whether it moves a column further right, is searched (coordinate
    descent, deterministic): fewest links running behind nodes first, then the narrowest first row that the
    starting view shows at a zoom >= 0.6, then the shortest links."""
    by_id = {n["id"]: n for n in ui["nodes"]}
    sources: dict[int, list[int]] = {n["id"]: [] for n in ui["nodes"]}
    for _lid, src, _ss, dst, _ds, _t in ui["links"]:
        sources[dst].append(src)
    order = {n["id"]: i for i, n in enumerate(ui["nodes"])}
    stage_rank = {k: i for i, (k, _t) in enumerate(stages)}
    shift_of = {}
    for key, _t in stages:
        if any(stage_of[n["id"]] == key for n in ui["nodes"]):
            shift_of[key] = 0 if not shift_of else INDENT
    far = {n["id"]: sum(1 for _l, src, _s, dst, _d, _t in ui["links"]
                        if src == n["id"] and stage_rank[stage_of[dst]] > stage_rank[stage_of[n["id"]]])
           for n in ui["nodes"]}
    # the state searched: each node's least sub-column and its rank inside its column
    push = dict(min_col or {})
    # in a column, the nodes feeding later rows first go to the bottom (their links leave below the row); a
    # video player grows with the video it plays: always last in its column, nothing below it to cover
    rank = {nid: i for i, nid in enumerate(sorted(by_id, key=lambda i: (far[i], order[i])))}

    def columns() -> list[tuple[str, str, list[list[int]]]]:
        depth: dict[int, int] = {}

        def depth_of(nid: int) -> int:
            if nid not in depth:
                same = [s for s in sources[nid] if stage_of[s] == stage_of[nid]]
                depth[nid] = max(1 + max(depth_of(s) for s in same) if same else 0, push.get(nid, 0))
            return depth[nid]

        out = []
        for key, group_title in stages:
            if key not in shift_of:
                continue
            cols: dict[int, list[int]] = {}
            members = [nid for nid in by_id if stage_of[nid] == key]
            for nid in sorted(members, key=lambda i: (by_id[i]["type"] in VIDEO_PLAYERS, rank[i])):
                cols.setdefault(depth_of(nid), []).append(nid)
            out.append((key, group_title, [cols.get(d, []) for d in range(max(cols) + 1)]))
        return out

    note_id = max(by_id) + 1
    x_start = 40 + NOTE_W + 60

    def place() -> list[dict]:
        layout_cols = columns()
        # one grid of columns for all rows (a column's width: its widest node in any row), the rows after the
        # first starting INDENT columns in: the links from the inputs' first column (loader, video) then run down
        # the gap right of it instead of through the nodes below it
        ncols = max(len(c) + shift_of[k] for k, _t, c in layout_cols)
        grid = [GRID_MIN_W] * ncols
        for k, _t, cols in layout_cols:
            for i, col in enumerate(cols):
                if col:
                    grid[i + shift_of[k]] = max(grid[i + shift_of[k]], max(sizes[nid][0] for nid in col))
        xs = [x_start]
        for i, w in enumerate(grid):
            xs.append(xs[-1] + w + (FIRST_GAP_X if i == 0 else GAP_X))
        y = 60.0
        groups = []
        for key, group_title, cols in layout_cols:
            s = shift_of[key]
            row_bottom = y
            top = y + GROUP_TITLE_H + TITLE_H
            used = [i for i, col in enumerate(cols) if col]
            for i, col in enumerate(cols):
                cy = top
                for nid in col:
                    by_id[nid]["pos"] = [xs[i + s], cy]
                    by_id[nid]["size"] = [grid[i + s], sizes[nid][1]]
                    cy += sizes[nid][1] + TITLE_H + GAP_Y
                    row_bottom = max(row_bottom, cy - GAP_Y)
            x0, x1 = xs[used[0] + s], xs[used[-1] + s] + grid[used[-1] + s]
            groups.append({"id": len(groups) + 1, "title": group_title,
                           "bounding": [x0 - GROUP_PAD, y, x1 - x0 + 2 * GROUP_PAD, row_bottom + GROUP_PAD - y],
                           "color": "#3f789e", "font_size": 24, "flags": {}})
            y = row_bottom + GROUP_PAD + ROW_GAP
        return groups

    def cost() -> tuple:
        groups = place()
        first_row = [n for n in by_id.values() if n["pos"][1] < groups[0]["bounding"][1] + groups[0]["bounding"][3]]
        too_wide = max(0.0, max(n["pos"][0] for n in first_row) - (VIEW_W / 0.6 - 20))
        length = sum(math.dist(slot_pos(by_id[src], ss, True), slot_pos(by_id[dst], ds, False))
                     for _l, src, ss, dst, ds, _t in ui["links"])
        width = max(n["pos"][0] + n["size"][0] for n in by_id.values())
        return (round(too_wide), len(hidden_links(ui, every=True)), round(width + length / 4))

    best = cost()
    for _sweep in range(3):
        improved = False
        for nid in sorted(by_id, key=lambda i: order[i]):
            # a further column (and back)
            for d in range(0, 4):
                old = push.get(nid, 0)
                if d == old:
                    continue
                push[nid] = d
                c = cost()
                if c < best:
                    best, improved = c, True
                else:
                    push[nid] = old
            # up or down in its column: exchange the ranks with each other node of the stage
            for other in sorted(by_id, key=lambda i: order[i]):
                if other == nid or stage_of[other] != stage_of[nid]:
                    continue
                rank[nid], rank[other] = rank[other], rank[nid]
                c = cost()
                if c < best:
                    best, improved = c, True
                else:
                    rank[nid], rank[other] = rank[other], rank[nid]
        if not improved:
            break
    groups = place()
    first = groups[0]["bounding"]
    note_h = max(first[3] - GROUP_TITLE_H, 300)
    ui["nodes"].insert(0, {
        "id": note_id, "type": "MarkdownNote", "pos": [40, first[1] + GROUP_TITLE_H], "size": [NOTE_W, note_h],
        "flags": {}, "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [],
        "properties": {}, "widgets_values": [note], "title": "Read me", "color": "#432", "bgcolor": "#653"})
    ui["last_node_id"] = note_id
    ui["groups"] = groups
    # the starting view: the note's top-left corner near the screen's top-left, zoomed so that a 1280 px wide
    # canvas shows the first row (at least its nodes' beginnings), between 0.6 and SCALE
    first_row = [n for n in ui["nodes"] if n["pos"][1] < first[1] + first[3]]
    right = max(n["pos"][0] for n in first_row) + 200
    scale = round(max(0.6, min(SCALE, 1240 / right)), 3)
    ui["extra"]["ds"] = {"scale": scale, "offset": [20 / scale - 20, 20 / scale - first[1] + 10]}
    return ui
