"""Layout of the shipped UI workflows: stages as rows that read left to right, one group per stage, a note, a
starting view; and the geometric checks the tests run on every workflow (no overlap, widths that fit the labels,
no link hidden behind a node).

Geometry as LiteGraph has it (frontend 1.27): a node's `pos` is the top-left of its body, its title bar (30 px)
sits above it; `size` is the body's width and height. A link is drawn as a cubic Bezier from the output slot (right
edge) to the input slot (left edge), with control points a quarter of the distance out horizontally
(LitegraphLinkAdapter.renderLinkDirect); links are drawn under the nodes. The view is `extra.ds`:
screen = (graph + offset) * scale.

Text widths are estimated with Arial's advance widths (the canvas fonts: titles 14 px, widgets and slots 12 px); the
browser test (tests/test_browser.py) checks the sizes against the real frontend's computeSize and measureText.
"""

from __future__ import annotations

import math
import random

import numpy as np

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
SCALE = 0.75        # the starting view's zoom, at most
SCALE_MIN = 0.7     # ... and at least, where the first row allows (the search keeps the first row this narrow)
NOTE_SCREEN_PX = 12  # the note's text on screen at the starting zoom (px): its font size is this / the zoom
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


# Where the frontend puts a slot's dot (LiteGraph, frontend 1.27: measured in the browser test): inputs 10 px right
# of the node's left edge, outputs 9 px left of its right edge, slot i at (i + 0.7) slot heights below the body's top.
SLOT_IN_X = 10
SLOT_OUT_X = 9
SLOT_Y = 0.7


def slot_pos(node: dict, slot: int, output: bool) -> tuple[float, float]:
    x, y = node["pos"]
    return (x + node["size"][0] - SLOT_OUT_X if output else x + SLOT_IN_X), y + SLOT_H * (slot + SLOT_Y)


def spline(a: tuple[float, float], b: tuple[float, float], samples: int | None = None) -> np.ndarray:
    """Points (samples + 1, 2) of the link LiteGraph draws from an output at `a` to an input at `b`: a cubic Bezier
    whose control points lie a quarter of the distance out, right of `a` and left of `b` (frontend 1.27
    LitegraphLinkAdapter.renderLinkDirect, SPLINE_LINK). By default one point per 4 px of the control polygon."""
    (x0, y0), (x3, y3) = a, b
    d = math.hypot(x3 - x0, y3 - y0) * 0.25
    if samples is None:
        samples = max(16, int((2 * d + math.hypot(x3 - x0 - 2 * d, y3 - y0)) / 4))
    t = np.linspace(0.0, 1.0, samples + 1)[:, None]
    ctrl = np.array([[x0, y0], [x0 + d, y0], [x3 - d, y3], [x3, y3]], dtype=float)
    w = np.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], axis=1)
    return w @ ctrl


def link_points(ui: dict, link: list, samples: int | None = None) -> np.ndarray:
    by_id = {n["id"]: n for n in ui["nodes"]}
    _, src, src_slot, dst, dst_slot, _t = link
    return spline(slot_pos(by_id[src], src_slot, True), slot_pos(by_id[dst], dst_slot, False), samples)


def curves_behind(curves: list[tuple[object, object, object, np.ndarray]],
                  boxes: dict[object, tuple[tuple[float, float, float, float], str]], inset: float = 0.0,
                  every: bool = False) -> list[tuple[object, str]]:
    """(link, node title) for every curve (link, source node, target node, points) with a point strictly inside a
    third node's box (x0, y0, x1, y1) shrunk by `inset` (negative: grown, a margin); the first such node per link,
    or with `every` each node it runs behind. Nodes are drawn over links, so such a stretch of the link is hidden."""
    if not boxes:
        return []
    keys = list(boxes)
    r = np.array([boxes[k][0] for k in keys], dtype=float) + np.array([inset, inset, -inset, -inset])
    out = []
    for link, src, dst, pts in curves:
        x, y = pts[:, 0:1], pts[:, 1:2]
        inside = ((x > r[:, 0]) & (x < r[:, 2]) & (y > r[:, 1]) & (y < r[:, 3])).any(axis=0)
        for i in np.flatnonzero(inside):
            if keys[i] in (src, dst):
                continue
            out.append((link, boxes[keys[i]][1]))
            if not every:
                break
    return out


def hidden_links(ui: dict, inset: float = 0.0, every: bool = False) -> list[tuple[int, str]]:
    """(link id, title of a node it runs behind) for every link whose curve passes under a third node, title bar
    included (the first such node; with `every`, one pair per node it runs behind)."""
    curves = [(link[0], link[1], link[3], link_points(ui, link)) for link in ui["links"]]
    boxes = {n["id"]: (rect(n), n.get("title") or n.get("type")) for n in ui["nodes"]}
    return curves_behind(curves, boxes, inset, every)


LIFTS = (0, 40, 80, 140, 220, 320)   # extra room above a node in its column (px), searched
GAPS = (120, 160, 220, 300)         # widths of the gutter right of a grid column (px), searched
ROW_GAPS = (0, 80, 160, 260)            # extra room above a stage row (px), searched
INDENTS = tuple(range(9))             # the grid column a later row starts in, searched
LENGTH_W = 0.5                      # cost of a link's length (per px), against the graph's width + height
BACK_W = 2.0                        # ... of a link looping back left (per px)
NARROW_W = 2.0                      # ... of the first row's width beyond what SCALE_MIN shows (per px)
KICKS = 100                         # random restarts of the search
CLEAR = 6.0                         # links kept this far (px) from the nodes they do not connect


def layout(ui: dict, stage_of: dict[int, str], stages: list[tuple[str, str]], note: str,
           sizes: dict[int, list[int]], min_col: dict[int, int] | None = None) -> dict:
    """Places the nodes of `ui` (node id -> stage key in stage_of; `stages` = [(key, group title)] in reading
    order) in one row per stage on one grid of columns, the nodes of a stage in sub-columns by their depth in the
    stage's own chains (a chain reads left to right; `min_col` pushes a node to a later sub-column), adds a group
    per stage, a MarkdownNote with `note` left of the first row and a starting view on the note and the first row.

    Searched (coordinate descent, then KICKS random restarts from a fixed seed: the same layout every run): each
    node's sub-column, rank in its column and room above it, each row's first grid column and the room above it,
    each gutter's width. The cost, in this order: the first row too wide for the starting view at zoom 0.6; the
    links that run behind a node or within CLEAR px of one (a first descent puts the links looping back left
    before these, so that the search starts from rows that read left to right); the links looping back; the size
    of the graph, the length of the links, how far they loop back and how far the first row is wider than the view
    at SCALE_MIN shows."""
    by_id = {n["id"]: n for n in ui["nodes"]}
    sources: dict[int, list[int]] = {n["id"]: [] for n in ui["nodes"]}
    for _lid, src, _ss, dst, _ds, _t in ui["links"]:
        sources[dst].append(src)
    order = {n["id"]: i for i, n in enumerate(ui["nodes"])}
    stage_rank = {k: i for i, (k, _t) in enumerate(stages)}
    keys = [k for k, _t in stages if any(stage_of[n["id"]] == k for n in ui["nodes"])]
    titles = dict(stages)
    far = {n["id"]: sum(1 for _l, src, _s, dst, _d, _t in ui["links"]
                        if src == n["id"] and stage_rank[stage_of[dst]] > stage_rank[stage_of[n["id"]]])
           for n in ui["nodes"]}
    # the state searched
    push = dict(min_col or {})
    # in a column, the nodes feeding later rows first go to the bottom (their links leave below the row); a
    # video player grows with the video it plays: always last in its column, nothing below it to cover
    rank = {nid: i for i, nid in enumerate(sorted(by_id, key=lambda i: (far[i], order[i])))}
    lift = {nid: 0 for nid in by_id}
    shift = {k: (0 if i == 0 else 1) for i, k in enumerate(keys)}
    row_gap = {k: 0 for k in keys}
    gaps: dict[int, int] = {}

    def columns() -> list[tuple[str, list[list[int]]]]:
        depth: dict[int, int] = {}

        def depth_of(nid: int) -> int:
            if nid not in depth:
                same = [s for s in sources[nid] if stage_of[s] == stage_of[nid]]
                depth[nid] = max(1 + max(depth_of(s) for s in same) if same else 0, push.get(nid, 0))
            return depth[nid]

        out = []
        for key in keys:
            cols: dict[int, list[int]] = {}
            members = [nid for nid in by_id if stage_of[nid] == key]
            for nid in sorted(members, key=lambda i: (by_id[i]["type"] in VIDEO_PLAYERS, rank[i])):
                cols.setdefault(depth_of(nid), []).append(nid)
            out.append((key, [cols.get(d, []) for d in range(max(cols) + 1)]))
        return out

    note_id = max(by_id) + 1
    x_start = 40 + NOTE_W + 60

    def place() -> list[dict]:
        layout_cols = columns()
        ncols = max(len(c) + shift[k] for k, c in layout_cols)
        grid = [GRID_MIN_W] * ncols
        for k, cols in layout_cols:
            for i, col in enumerate(cols):
                if col:
                    grid[i + shift[k]] = max(grid[i + shift[k]], max(sizes[nid][0] for nid in col))
        xs = [x_start]
        for i, w in enumerate(grid):
            xs.append(xs[-1] + w + gaps.get(i, FIRST_GAP_X if i == 0 else GAP_X))
        y = 60.0
        groups = []
        for key, cols in layout_cols:
            s = shift[key]
            y += row_gap[key]
            row_bottom = y
            top = y + GROUP_TITLE_H + TITLE_H
            used = [i for i, col in enumerate(cols) if col]
            for i, col in enumerate(cols):
                cy = top
                for nid in col:
                    cy += lift[nid]
                    by_id[nid]["pos"] = [xs[i + s], cy]
                    by_id[nid]["size"] = [grid[i + s], sizes[nid][1]]
                    cy += sizes[nid][1] + TITLE_H + GAP_Y
                    row_bottom = max(row_bottom, cy - GAP_Y)
            x0, x1 = xs[used[0] + s], xs[used[-1] + s] + grid[used[-1] + s]
            groups.append({"id": len(groups) + 1, "title": titles[key],
                           "bounding": [x0 - GROUP_PAD, y, x1 - x0 + 2 * GROUP_PAD, row_bottom + GROUP_PAD - y],
                           "color": "#3f789e", "font_size": 24, "flags": {}})
            y = row_bottom + GROUP_PAD + ROW_GAP
        return groups

    ids = list(by_id)
    link_ends = np.array([[src, ss, dst, ds] for _l, src, ss, dst, ds, _t in ui["links"]])
    idx = {nid: i for i, nid in enumerate(ids)}
    ends = np.array([[idx[a], idx[b]] for a, _s, b, _d in link_ends])
    coarse, fine = np.linspace(0.0, 1.0, 65)[None, :], np.linspace(0.0, 1.0, 401)[None, :]

    def count(tt: np.ndarray, clear: float) -> int:
        """(link, node) pairs where the link passes behind, or within `clear` px of, a node it does not connect,
        the link sampled at the points `tt`."""
        pos = np.array([by_id[i]["pos"] for i in ids], dtype=float)
        size = np.array([by_id[i]["size"] for i in ids], dtype=float)
        x0 = pos[ends[:, 0], 0] + size[ends[:, 0], 0] - SLOT_OUT_X
        y0 = pos[ends[:, 0], 1] + SLOT_H * (link_ends[:, 1] + SLOT_Y)
        x3 = pos[ends[:, 1], 0] + SLOT_IN_X
        y3 = pos[ends[:, 1], 1] + SLOT_H * (link_ends[:, 3] + SLOT_Y)
        d = (np.hypot(x3 - x0, y3 - y0) * 0.25)[:, None]
        a, b, c, e = (1 - tt) ** 3, 3 * (1 - tt) ** 2 * tt, 3 * (1 - tt) * tt ** 2, tt ** 3
        px = (a + b) * x0[:, None] + b * d + (c + e) * x3[:, None] - c * d
        py = (a + b) * y0[:, None] + (c + e) * y3[:, None]
        r0 = pos - [clear, TITLE_H + clear]
        r1 = pos + size + clear
        inside = ((px[:, :, None] > r0[:, 0]) & (px[:, :, None] < r1[:, 0]) & (py[:, :, None] > r0[:, 1])
                  & (py[:, :, None] < r1[:, 1])).any(axis=1)
        inside[np.arange(len(ends)), ends[:, 0]] = False
        inside[np.arange(len(ends)), ends[:, 1]] = False
        return int(inside.sum())

    def crossings() -> int:
        """Links behind (or within CLEAR px of) a node they do not connect: 64 points per link (a wider margin),
        then, where none is found, 400 points (about one per 10 px on the longest links)."""
        return count(coarse, 2 * CLEAR) or count(fine, CLEAR)

    backward_first = True  # the first descent: no link looping back first; then: no link behind a node first

    def cost() -> tuple:
        groups = place()
        first_row = [n for n in by_id.values() if n["pos"][1] < groups[0]["bounding"][1] + groups[0]["bounding"][3]]
        right = max(n["pos"][0] for n in first_row) + 200
        too_wide = max(0.0, right - VIEW_W / 0.6)  # the starting view cannot show the first row
        narrow = max(0.0, right - VIEW_W / SCALE_MIN)  # ... at SCALE_MIN
        length = back = 0.0
        nback = 0
        for _l, src, ss, dst, ds, _t in ui["links"]:
            a, b = slot_pos(by_id[src], ss, True), slot_pos(by_id[dst], ds, False)
            length += math.dist(a, b)
            back += max(0.0, a[0] + GAP_X - b[0])  # a link into a node left of its source loops back
            nback += a[0] > b[0]
        width = max(n["pos"][0] + n["size"][0] for n in by_id.values())
        height = max(n["pos"][1] + n["size"][1] for n in by_id.values())
        rest = round(width + height + length * LENGTH_W + back * BACK_W + narrow * NARROW_W)
        if backward_first:
            return (round(too_wide), nback, crossings(), rest)
        return (round(too_wide), crossings(), nback, rest)

    def try_set(state: dict, key, values, default=0) -> bool:
        """Each of `values` for state[key] in turn; keeps the best (the cost lower than `best`)."""
        nonlocal best
        old = state.get(key, default)
        improved = False
        for v in values:
            if v == old:
                continue
            state[key] = v
            c = cost()
            if c < best:
                best, old, improved = c, v, True
            else:
                state[key] = old
        return improved

    def descend() -> None:
        nonlocal best
        best = cost()
        for _sweep in range(8):
            improved = False
            for key in keys[1:]:
                improved |= try_set(shift, key, INDENTS)
                improved |= try_set(row_gap, key, ROW_GAPS)
            for i in range(len(by_id)):
                improved |= try_set(gaps, i, GAPS + (FIRST_GAP_X,), FIRST_GAP_X if i == 0 else GAP_X)
            for nid in sorted(by_id, key=lambda i: order[i]):
                improved |= try_set(push, nid, range(4))
                improved |= try_set(lift, nid, LIFTS)
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

    state = (push, rank, lift, shift, row_gap, gaps)
    best = cost()
    descend()
    backward_first = False
    best = cost()
    descend()
    # kicks (a fixed seed: the same layout every run): a few variables set at random, descend again, keep the
    # result where it is better
    rng = random.Random(22)
    nodes_sorted = sorted(by_id, key=lambda i: order[i])
    for _kick in range(KICKS):
        if best[1] == 0 and _kick >= 20:
            break
        saved, saved_best = [dict(d) for d in state], best
        for _ in range(rng.randint(2, 5)):
            nid = rng.choice(nodes_sorted)
            what = rng.randrange(4)
            if what == 0:
                push[nid] = rng.randrange(4)
            elif what == 1:
                lift[nid] = rng.choice(LIFTS)
            elif what == 2:
                other = rng.choice([o for o in nodes_sorted if stage_of[o] == stage_of[nid]])
                rank[nid], rank[other] = rank[other], rank[nid]
            elif len(keys) > 1:
                key = rng.choice(keys[1:])
                shift[key] = rng.choice(INDENTS)
        descend()
        if not best < saved_best:
            for d, old in zip(state, saved):
                d.clear()
                d.update(old)
            best = saved_best
    groups = place()
    first = groups[0]["bounding"]
    ui["groups"] = groups
    # the starting view: the note's top-left corner near the screen's top-left, zoomed so that a 1280 px wide
    # canvas shows the first row (at least its nodes' beginnings), between 0.6 and SCALE
    first_row = [n for n in ui["nodes"] if n["pos"][1] < first[1] + first[3]]
    right = max(n["pos"][0] for n in first_row) + 200
    scale = round(max(0.6, min(SCALE, VIEW_W / right)), 3)
    ui["extra"]["ds"] = {"scale": scale, "offset": [20 / scale - 20, 20 / scale - first[1] + 10]}
    # the note: its text NOTE_SCREEN_PX high on screen at that zoom (web/js/read_me_note.js sets the font size from
    # the node's properties), as tall as its text needs and at least as the first row
    text_px = math.ceil(NOTE_SCREEN_PX / scale)
    note_h = max(first[3] - GROUP_TITLE_H, note_height(note, NOTE_W, text_px))
    ui["nodes"].insert(0, {
        "id": note_id, "type": "MarkdownNote", "pos": [40, first[1] + GROUP_TITLE_H], "size": [NOTE_W, note_h],
        "flags": {}, "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [],
        "properties": {"zsve_text_px": text_px}, "widgets_values": [note], "title": "Read me", "color": "#432",
        "bgcolor": "#653"})
    ui["last_node_id"] = note_id
    return ui


def note_height(markdown: str, width: float, px: float) -> int:
    """The height (px) a MarkdownNote `width` wide needs to show `markdown` at font size `px` without scrolling, as
    frontend 1.27 renders it (paragraphs and list items wrapped at the box's width less its padding, lists indented,
    `##` headings 1.5 times larger; line height about 1.2; the browser test checks the text fits)."""
    h = 0.0
    for line in markdown.split("\n"):
        if not line.strip():
            h += 0.5 * px
            continue
        size, indent, text = px, 0.0, line
        if line.startswith("## "):
            size, text = 1.5 * px, line[3:]
            h += 0.8 * size
        elif line.startswith("- "):
            indent, text = 2.5 * px, line[2:]
        text = text.replace("*", "").replace("`", "")
        words, lines, cur = text.split(), 1, 0.0
        avail = width - 20 - 1.2 * px - indent
        for w in words:
            ww = text_width(w + " ", size)
            if cur + ww > avail and cur > 0:
                lines, cur = lines + 1, 0.0
            cur += ww
        h += lines * 1.2 * size
    return int(math.ceil((1.1 * h + 2 * px + 60) / 10) * 10)  # 10 % and a line to spare: fonts differ a little
