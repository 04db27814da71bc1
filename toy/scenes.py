"""Procedural toy scenes, captions, clips with ground-truth masks, and the fixed benchmark set.

Images are float32 numpy arrays [H, W, 3] in 0..1 (videos [F, H, W, 3]); masks are bool [H, W]
(videos [F, H, W]). Everything is deterministic given a seed (numpy Generator).

The world is deliberately small so a tiny model can learn it on 2 CPU cores (see toy/README in
RESULTS.md): objects are big, saturated, fully bright colours; backgrounds are dim (max channel <= 0.5),
so a simple detector can separate object from background on the decoded (8x8-blocky) image.

This module does not import ComfyUI or torch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np

SIZE = 128  # image side in pixels (16x16 latents with the 8x toy VAE)

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
COLOR_NAMES = tuple(COLORS)
# Dim background colours (never brighter than 0.5 in any channel).
DIM = {name: tuple(0.5 * c for c in rgb) for name, rgb in COLORS.items()}
PLAIN = {"black": (0.0, 0.0, 0.0), "gray": (0.35, 0.35, 0.35), "white": (0.5, 0.5, 0.5)}
# NB: "white" is rendered as a light gray 0.5 so that it stays dimmer than any object colour.
PATTERN_BG = (0.08, 0.08, 0.08)  # the dark ground under stripes and dots
STRIPE_PERIOD = 32
DOT_PERIOD = 32
DOT_RADIUS = 7
OBJECT_R = (28.0, 40.0)  # half size (px) of the one object of a scene
TWO_OBJECT_R = (22.0, 29.0)  # half size of each of two objects side by side
CLIP_R = (20.0, 40.0)  # bounds of an object's half size at the end of a random clip


@dataclass(frozen=True)
class Background:
    kind: str  # "plain", "stripes", "dots", "gradient"
    color: str = ""  # plain: black/gray/white; stripes/dots: a COLORS name; gradient: ""

    def caption(self) -> str:
        if self.kind == "plain":
            return self.color
        if self.kind == "gradient":
            return "a gradient"
        return f"{self.color} {self.kind}"


def all_backgrounds() -> list[Background]:
    out = [Background("plain", c) for c in PLAIN]
    out += [Background("stripes", c) for c in COLOR_NAMES]
    out += [Background("dots", c) for c in COLOR_NAMES]
    out.append(Background("gradient"))
    return out


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: float  # centre, pixels
    cy: float
    r: float  # half size, pixels (circle radius, half side of square, half base/height of triangle)

    def phrase(self) -> str:
        return f"a {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: Background
    phase: float = 0.0  # stripes/dots/gradient offset in pixels

    def caption(self) -> str:
        return caption_of([o.phrase() for o in self.objects], self.background)


def caption_of(phrases: list[str], background: Background) -> str:
    return " and ".join(phrases) + " on " + background.caption()


# --- rendering ----------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    yy, xx = (_YY, _XX) if size == SIZE else (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5)
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    if shape == "triangle":  # apex up, base 2r at cy + r, height 2r
        top, bottom = cy - r, cy + r
        frac = (yy - top) / (2 * r)  # 0 at apex, 1 at base
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= frac * r)
    raise ValueError(f"unknown shape {shape!r}")


def render_background(bg: Background, phase: float = 0.0, size: int = SIZE) -> np.ndarray:
    yy, xx = (_YY, _XX) if size == SIZE else (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5)
    img = np.empty((size, size, 3), np.float32)
    if bg.kind == "plain":
        img[:] = PLAIN[bg.color]
    elif bg.kind == "stripes":  # vertical stripes, half period on
        img[:] = PATTERN_BG
        on = ((xx + phase) % STRIPE_PERIOD) < STRIPE_PERIOD / 2
        img[on] = DIM[bg.color]
    elif bg.kind == "dots":
        img[:] = PATTERN_BG
        px = (xx + phase) % DOT_PERIOD - DOT_PERIOD / 2
        py = (yy + phase) % DOT_PERIOD - DOT_PERIOD / 2
        img[px * px + py * py <= DOT_RADIUS**2] = DIM[bg.color]
    elif bg.kind == "gradient":  # dark to light gray, left to right
        v = 0.05 + 0.45 * (xx / size)
        img[:] = v[..., None]
    else:
        raise ValueError(f"unknown background {bg.kind!r}")
    return img


def render(scene: Scene, size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image [H,W,3] and one visible-region mask per object (later objects are drawn on top)."""
    img = render_background(scene.background, scene.phase, size)
    masks = []
    for o in scene.objects:
        m = shape_mask(o.shape, o.cx, o.cy, o.r, size)
        img[m] = COLORS[o.color]
        masks = [prev & ~m for prev in masks]
        masks.append(m)
    return img, masks


# --- captions and splits ------------------------------------------------------------------------------


def allowed(color: str, bg: Background) -> bool:
    """Objects never share their colour word with a stripes/dots background (keeps captions unambiguous)."""
    return not (bg.kind in ("stripes", "dots") and bg.color == color)


def single_specs() -> list[tuple[str, str, Background]]:
    return [(s, c, b) for b in all_backgrounds() for c in COLOR_NAMES for s in SHAPES if allowed(c, b)]


def heldout_specs() -> list[tuple[str, str, Background]]:
    """The held-out single-object (shape, colour, background) combinations: never seen in training.

    Every 7th combination in a fixed order (7 is coprime to the 3 shapes and 4 colours, so all shapes
    and colours are held out somewhere); every shape, colour and background also appears in
    training, only not in this combination."""
    specs = single_specs()
    return [s for i, s in enumerate(specs) if i % 7 == 3]


def train_specs() -> list[tuple[str, str, Background]]:
    held = set(heldout_specs())
    return [s for s in single_specs() if s not in held]


def random_object(rng: np.random.Generator, shape: str, color: str, r_range=None, x_range=None) -> Obj:
    r = float(rng.uniform(*(r_range or OBJECT_R)))
    lo, hi = r + 2, SIZE - r - 2
    if x_range is not None:
        lo, hi = max(lo, x_range[0]), min(hi, x_range[1])
    return Obj(shape, color, float(rng.uniform(lo, hi)), float(rng.uniform(r + 2, SIZE - r - 2)), r)


def random_scene(rng: np.random.Generator, two_object_p: float = 0.15, heldout_ok: bool = False,
                 either_side: bool = False, dots_p: float = 0.0) -> Scene:
    """A training scene: one object from the training combinations, or (with two_object_p) two
    objects of different colours side by side (the left one named first; with `either_side`, the first named is on
    the left or the right with equal odds, as in the second half of the benchmark's crossing clips). Without
    `either_side` the random stream is the one training always drew. `dots_p`: with this probability a one-object
    scene is drawn from the combinations on dots only (the backgrounds the model draws worst), otherwise from all
    combinations uniformly (a quarter of them on dots), so about p + (1 - p) / 4 of the one-object scenes are on
    dots; 0 draws from the same random stream as before the option existed."""
    phase = float(rng.uniform(0, STRIPE_PERIOD))
    if rng.uniform() < two_object_p:
        bgs = all_backgrounds()
        while True:
            bg = bgs[rng.integers(len(bgs))]
            c1, c2 = rng.choice(COLOR_NAMES, 2, replace=False)
            if allowed(c1, bg) and allowed(c2, bg):
                break
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        sides = [(0, SIZE / 2 - 2), (SIZE / 2 + 2, SIZE)]
        if either_side and rng.uniform() < 0.5:
            sides.reverse()
        o1 = random_object(rng, str(s1), str(c1), TWO_OBJECT_R, sides[0])
        o2 = random_object(rng, str(s2), str(c2), TWO_OBJECT_R, sides[1])
        return Scene((o1, o2), bg, phase)
    specs = single_specs() if heldout_ok else train_specs()
    if dots_p > 0 and rng.uniform() < dots_p:
        specs = [s for s in specs if s[2].kind == "dots"]
    shape, color, bg = specs[rng.integers(len(specs))]
    return Scene((random_object(rng, shape, color),), bg, phase)


def restricted_scene(rng: np.random.Generator, colors: list[str] | None = None,
                     backgrounds: list[Background] | None = None, r_range=None) -> Scene:
    """A one-object scene from a smaller world (for experiments on what makes shapes hard to learn): colour and
    background drawn uniformly from the given ones (all when None; a colour never on stripes/dots of its own
    colour), shape uniform, half size from r_range (default OBJECT_R)."""
    cols = list(colors or COLOR_NAMES)
    bgs = list(backgrounds or all_backgrounds())
    if not any(allowed(c, b) for c in cols for b in bgs):
        raise ValueError("no allowed (colour, background) pair in this world")
    while True:
        bg = bgs[rng.integers(len(bgs))]
        col = cols[rng.integers(len(cols))]
        if allowed(col, bg):
            break
    shape = str(rng.choice(SHAPES))
    obj = random_object(rng, shape, col, r_range)
    return Scene((obj,), bg, float(rng.uniform(0, STRIPE_PERIOD)))


# --- clips --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Motion:
    """Linear motion of one object over the clip: centre from start to end, half size from r0 to r1."""

    shape: str
    color: str
    start: tuple[float, float]
    end: tuple[float, float]
    r0: float
    r1: float

    def at(self, u: float) -> Obj:
        cx = self.start[0] + (self.end[0] - self.start[0]) * u
        cy = self.start[1] + (self.end[1] - self.start[1]) * u
        return Obj(self.shape, self.color, cx, cy, self.r0 + (self.r1 - self.r0) * u)


@dataclass
class Clip:
    frames: np.ndarray  # [F, H, W, 3] float32 0..1
    masks: np.ndarray  # [F, n_objects, H, W] bool (visible region of each object)
    prompt: str
    motions: tuple[Motion, ...]
    background: Background
    phase_speed: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def render_clip(motions: tuple[Motion, ...], background: Background, frames: int = 8, phase: float = 0.0,
                phase_speed: float = 0.0) -> Clip:
    imgs, masks = [], []
    for f in range(frames):
        u = f / max(1, frames - 1)
        scene = Scene(tuple(m.at(u) for m in motions), background, phase + phase_speed * f)
        img, ms = render(scene)
        imgs.append(img)
        masks.append(np.stack(ms))
    prompt = caption_of([f"a {m.color} {m.shape}" for m in motions], background)
    return Clip(np.stack(imgs), np.stack(masks), prompt, tuple(motions), background, phase_speed)


def random_clip(seed: int, frames: int = 8, two_objects: bool = False) -> Clip:
    """A clip from a seed: 1 or 2 objects translating (and resizing by up to 25%) over a background."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, two_object_p=1.0 if two_objects else 0.0, heldout_ok=True)
    motions = []
    for o in scene.objects:
        r1 = float(np.clip(o.r * rng.uniform(0.8, 1.25), *CLIP_R))
        half = SIZE / 2
        if len(scene.objects) == 2:  # stay on own half
            xlo, xhi = (r1 + 2, half - 2) if o.cx < half else (half + 2, SIZE - r1 - 2)
        else:
            xlo, xhi = r1 + 2, SIZE - r1 - 2
        dx = float(rng.uniform(-24, 24))
        dy = float(rng.uniform(-24, 24))
        ex = float(np.clip(o.cx + dx, max(xlo, r1 + 2), xhi))
        ey = float(np.clip(o.cy + dy, r1 + 2, SIZE - r1 - 2))
        sx = float(np.clip(o.cx, max(xlo, o.r + 2), min(xhi, SIZE - o.r - 2)))
        motions.append(Motion(o.shape, o.color, (sx, o.cy), (ex, ey), o.r, r1))
    return render_clip(tuple(motions), scene.background, frames, phase=scene.phase)


# --- the benchmark set --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditSpec:
    """One benchmark item. `target` is the index of the edited object (None for a global edit);
    `expect` says what the edited object should look like (shape, colour) and `expect_background` the
    background after the edit."""

    name: str
    kind: str  # "color", "shape", "two_object", "background", "background_recolor", "object_background"
    motions: tuple[Motion, ...]
    background: Background
    edit_background: Background
    target: int | None
    expect_shape: str | None
    expect_color: str | None
    frames: int = 8
    phase: float = 0.0
    motion: str = "translate"  # "translate", "zoom", "cross" (generated items; the public set translates)

    @property
    def local(self) -> bool:
        """A local edit: one object changes, everything else (the other object, the background) must stay."""
        return self.target is not None and self.edit_background == self.background

    def clip(self) -> Clip:
        return render_clip(self.motions, self.background, self.frames, self.phase)

    @property
    def source_prompt(self) -> str:
        return caption_of([f"a {m.color} {m.shape}" for m in self.motions], self.background)

    @property
    def edit_prompt(self) -> str:
        phrases = []
        for i, m in enumerate(self.motions):
            if i == self.target:
                phrases.append(f"a {self.expect_color} {self.expect_shape}")
            else:
                phrases.append(f"a {m.color} {m.shape}")
        return caption_of(phrases, self.edit_background)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["source_prompt"], d["edit_prompt"] = self.source_prompt, self.edit_prompt
        return d


def normalise_prompt(prompt: str) -> str:
    """A prompt as the toy captions write it: lower case, single spaces, no final full stop."""
    return " ".join(prompt.lower().split()).rstrip(".").rstrip()


def edit_with_prompt(spec: EditSpec, edit_prompt: str) -> EditSpec | None:
    """`spec` (same clip) with the edit that `edit_prompt` asks for, so that the toy metrics judge that edit: the edit
    prompt must name the clip's objects in order ("a <colour> <shape>", joined by " and ") and a background ("on
    <background>"), in the toy vocabulary. At most one object may change; the background may change too. Returns
    `spec` itself when the prompt is its own, None when the prompt is outside the vocabulary, changes two objects or
    nothing (the toy metrics then cannot say what the edit should look like). Letter case, repeated spaces and a
    final full stop are ignored (`normalise_prompt`)."""
    if edit_prompt == spec.edit_prompt:
        return spec
    edit_prompt = normalise_prompt(edit_prompt)
    objects, sep, bg_text = edit_prompt.partition(" on ")
    backgrounds = {b.caption(): b for b in all_backgrounds()}
    if not sep or bg_text not in backgrounds:
        return None
    phrases = objects.split(" and ")
    if len(phrases) != len(spec.motions):
        return None
    changed = []
    for i, (phrase, m) in enumerate(zip(phrases, spec.motions)):
        words = phrase.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
            return None
        if (words[1], words[2]) != (m.color, m.shape):
            changed.append((i, words[2], words[1]))
    if len(changed) > 1:
        return None
    edit_bg = backgrounds[bg_text]
    target, shape, color = changed[0] if changed else (None, None, None)
    if target is None and edit_bg == spec.background:
        return None  # the prompt asks for no change
    if target is None:
        kind = "background_recolor" if edit_bg.kind == spec.background.kind else "background"
    elif edit_bg != spec.background:
        kind = "object_background"
    elif len(spec.motions) > 1:
        kind = "two_object"
    else:
        kind = "shape" if shape != spec.motions[target].shape else "color"
    return replace(spec, kind=kind, edit_background=edit_bg, target=target, expect_shape=shape, expect_color=color)


def benchmark_set(frames: int = 8) -> list[EditSpec]:
    """The fixed benchmark: colour swap (x2), shape swap, background change (stripes -> dots), two-object (edit
    one only), background recolour (green -> blue stripes, the style-like edit)."""
    circle = Motion("circle", "red", (44.0, 52.0), (84.0, 76.0), 34.0, 34.0)
    square = Motion("square", "blue", (80.0, 44.0), (50.0, 84.0), 30.0, 36.0)
    tri = Motion("triangle", "yellow", (46.0, 80.0), (84.0, 58.0), 36.0, 30.0)
    left = Motion("circle", "green", (32.0, 40.0), (36.0, 86.0), 24.0, 24.0)
    right = Motion("square", "red", (96.0, 84.0), (94.0, 42.0), 24.0, 27.0)
    gray, black = Background("plain", "gray"), Background("plain", "black")
    blue_stripes, green_dots = Background("stripes", "blue"), Background("dots", "green")
    green_stripes = Background("stripes", "green")
    specs = [
        EditSpec("color_swap", "color", (circle,), gray, gray, 0, "circle", "blue", frames),
        EditSpec("color_swap_stripes", "color", (tri,), blue_stripes, blue_stripes, 0, "triangle", "red", frames),
        EditSpec("shape_swap", "shape", (square,), black, black, 0, "circle", "blue", frames),
        EditSpec("background_change", "background", (circle,), blue_stripes, green_dots, None, None, None, frames),
        EditSpec("two_object", "two_object", (left, right), gray, gray, 1, "square", "yellow", frames),
        # the style-like global edit: the background's colour changes, its layout (the stripes) stays
        EditSpec("background_recolor", "background", (tri,), green_stripes, blue_stripes, None, None, None, frames),
    ]
    return [replace(s) for s in specs]


# --- the generated benchmark (dev / test splits) -------------------------------------------------------

EDIT_KINDS = ("color", "shape", "two_object", "background", "background_recolor", "object_background")
# name -> (seed, number of items). Rows' settings are chosen on "dev" only; "test" is never used to choose one.
SPLITS = {"dev": (2020, 60), "test": (4040, 42)}
MOTIONS_SINGLE = ("translate", "zoom")
MOTIONS_TWO = ("translate", "cross")


def _single_motion(rng: np.random.Generator, shape: str, color: str, motion: str) -> Motion:
    if motion == "zoom":  # the centre drifts a little, the half size grows or shrinks by 35-60%
        r_small, r_big = float(rng.uniform(20, 25)), float(rng.uniform(33, 40))
        r0, r1 = (r_small, r_big) if rng.uniform() < 0.5 else (r_big, r_small)
        c0 = (float(rng.uniform(r_big + 2, SIZE - r_big - 2)), float(rng.uniform(r_big + 2, SIZE - r_big - 2)))
        c1 = (float(np.clip(c0[0] + rng.uniform(-6, 6), r_big + 2, SIZE - r_big - 2)),
              float(np.clip(c0[1] + rng.uniform(-6, 6), r_big + 2, SIZE - r_big - 2)))
        return Motion(shape, color, c0, c1, r0, r1)
    r0 = float(rng.uniform(*OBJECT_R))  # translate: up to 40 px per axis, size change up to 25%
    r1 = float(np.clip(r0 * rng.uniform(0.8, 1.25), 24.0, 40.0))
    rm = max(r0, r1)
    lo, hi = rm + 2, SIZE - rm - 2
    c0 = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    c1 = (float(np.clip(c0[0] + rng.uniform(-40, 40), lo, hi)), float(np.clip(c0[1] + rng.uniform(-40, 40), lo, hi)))
    return Motion(shape, color, c0, c1, r0, r1)


def _two_motions(rng: np.random.Generator, objs: list[tuple[str, str]], motion: str) -> tuple[Motion, Motion]:
    """Two objects; the first named starts on the left (as in training captions). "translate": each stays on its
    own half; "cross": they swap sides, one in the upper and one in the lower band (they pass without overlapping)."""
    if motion == "cross":
        ra, rb = float(rng.uniform(22, 25)), float(rng.uniform(22, 25))
        upper = rng.uniform() < 0.5
        ya = float(rng.uniform(ra + 2, ra + 8)) if upper else float(rng.uniform(SIZE - ra - 8, SIZE - ra - 2))
        yb = float(rng.uniform(SIZE - rb - 8, SIZE - rb - 2)) if upper else float(rng.uniform(rb + 2, rb + 8))
        xa0, xb0 = float(rng.uniform(ra + 2, 40)), float(rng.uniform(SIZE - 40, SIZE - rb - 2))
        xa1, xb1 = float(rng.uniform(SIZE - 40, SIZE - ra - 2)), float(rng.uniform(rb + 2, 40))
        return (Motion(objs[0][0], objs[0][1], (xa0, ya), (xa1, ya + float(rng.uniform(-4, 4))), ra, ra),
                Motion(objs[1][0], objs[1][1], (xb0, yb), (xb1, yb + float(rng.uniform(-4, 4))), rb, rb))
    out = []
    for k, (shape, color) in enumerate(objs):
        r0 = float(rng.uniform(*TWO_OBJECT_R))
        r1 = float(np.clip(r0 * rng.uniform(0.85, 1.15), 20.0, 29.0))
        rm = max(r0, r1)
        xlo, xhi = (rm + 2, SIZE / 2 - 2) if k == 0 else (SIZE / 2 + 2, SIZE - rm - 2)
        xlo, xhi = min(xlo, xhi), max(xlo, xhi)
        ylo, yhi = rm + 2, SIZE - rm - 2
        c0 = (float(rng.uniform(xlo, xhi)), float(rng.uniform(ylo, yhi)))
        c1 = (float(np.clip(c0[0] + rng.uniform(-12, 12), xlo, xhi)),
              float(np.clip(c0[1] + rng.uniform(-40, 40), ylo, yhi)))
        out.append(Motion(shape, color, c0, c1, r0, r1))
    return out[0], out[1]


def _apart(motions, frames: int) -> bool:
    """True when the objects' bounding squares never touch over the clip (2 px margin)."""
    for f in range(frames):
        u = f / max(1, frames - 1)
        a, b = (m.at(u) for m in motions)
        if abs(a.cx - b.cx) <= a.r + b.r + 2 and abs(a.cy - b.cy) <= a.r + b.r + 2:
            return False
    return True


def _draw_item(rng: np.random.Generator, cyc: dict, name: str, kind: str, k: int, frames: int) -> EditSpec:
    """One generated item of `kind` (its k-th in the split)."""
    colour_pairs, shape_pairs, shapes, colours, bgs = (cyc[x] for x in ("colour_pairs", "shape_pairs", "shapes",
                                                                       "colours", "bgs"))
    phase = float(rng.uniform(0, STRIPE_PERIOD))
    motion = (MOTIONS_TWO if kind == "two_object" else MOTIONS_SINGLE)[k % 2]
    if kind in ("color", "shape", "object_background"):
        if kind == "shape":
            s0, s1 = shape_pairs.draw()
            c0 = c1 = colours.draw()
        else:
            c0, c1 = colour_pairs.draw()
            s0 = shapes.draw()
            s1 = s0 if kind == "color" else shape_pairs.draw(lambda p: p[0] == s0)[1]
        bg = bgs.draw(lambda b: allowed(c0, b) and allowed(c1, b))
        ebg = bg
        if kind == "object_background":
            ebg = bgs.draw(lambda b: b != bg and b.kind != bg.kind and allowed(c1, b))
        mo = (_single_motion(rng, s0, c0, motion),)
        return EditSpec(name, kind, mo, bg, ebg, 0, s1, c1, frames, phase, motion)
    if kind == "two_object":
        ca, cb = colour_pairs.draw()
        sa, sb = shapes.draw(), shapes.draw()
        bg = bgs.draw(lambda b: allowed(ca, b) and allowed(cb, b))
        target = int(rng.integers(2))
        src_s, src_c = (sa, ca) if target == 0 else (sb, cb)
        other_c = cb if target == 0 else ca
        what = ("color", "shape", "both")[k % 3]
        new_c = src_c if what == "shape" else colours.draw(lambda c: c not in (src_c, other_c) and allowed(c, bg))
        new_s = src_s if what == "color" else shape_pairs.draw(lambda p: p[0] == src_s)[1]
        for _ in range(100):  # the objects never overlap (each frame's visible masks are the whole objects)
            mo = _two_motions(rng, [(sa, ca), (sb, cb)], motion)
            if _apart(mo, frames):
                break
        return EditSpec(name, kind, mo, bg, bg, target, new_s, new_c, frames, phase, motion)
    # background / background_recolor: the objects stay
    s0, c0 = shapes.draw(), colours.draw()
    if kind == "background":
        bg = bgs.draw(lambda b: allowed(c0, b))
        ebg = bgs.draw(lambda b: b.kind != bg.kind and allowed(c0, b))
    else:
        bg = bgs.draw(lambda b: b.kind != "gradient" and allowed(c0, b))
        ebg = bgs.draw(lambda b: b.kind == bg.kind and b != bg and allowed(c0, b))
    mo = (_single_motion(rng, s0, c0, motion),)
    return EditSpec(name, kind, mo, bg, ebg, None, None, None, frames, phase, motion)


class _Cycle:
    """Draws from a list in shuffled rounds, so that a split of n items covers every value once n allows."""

    def __init__(self, rng: np.random.Generator, values):
        self.rng, self.values, self.queue = rng, list(values), []

    def draw(self, ok=lambda v: True):
        for _ in range(4 * len(self.values) + 4):
            if not self.queue:
                self.queue = [self.values[i] for i in self.rng.permutation(len(self.values))]
            for j, v in enumerate(self.queue):
                if ok(v):
                    return self.queue.pop(j)
            self.queue = []
        raise ValueError("no allowed value")


def generate_items(seed: int, n: int, prefix: str, frames: int = 8) -> list[EditSpec]:
    """n benchmark items drawn from the whole toy vocabulary, fixed by `seed`: the edit kinds in turn
    (EDIT_KINDS), source/target colours, shapes and backgrounds drawn in shuffled rounds (so every colour pair,
    shape pair and background comes up), motions in turn (translate / zoom for one object, translate / cross
    for two). Item i is named f"{prefix}{i:02d}_{kind}"."""
    rng = np.random.default_rng(seed)
    colour_pairs = _Cycle(rng, [(a, b) for a in COLOR_NAMES for b in COLOR_NAMES if a != b])
    shape_pairs = _Cycle(rng, [(a, b) for a in SHAPES for b in SHAPES if a != b])
    shapes, colours = _Cycle(rng, SHAPES), _Cycle(rng, COLOR_NAMES)
    bgs = _Cycle(rng, all_backgrounds())
    cyc = dict(colour_pairs=colour_pairs, shape_pairs=shape_pairs, shapes=shapes, colours=colours, bgs=bgs)
    kind_count: dict = {}
    out = []
    for i in range(n):
        kind = EDIT_KINDS[i % len(EDIT_KINDS)]
        k = kind_count.get(kind, 0)
        kind_count[kind] = k + 1
        out.append(_draw_item(rng, cyc, f"{prefix}{i:02d}_{kind}", kind, k, frames))
    return out


FRESH_N = 120  # items of a "fresh<seed>" set


def split_set(split: str, frames: int = 8) -> list[EditSpec]:
    """The benchmark items of a split: "public" (the six fixed items of `benchmark_set`, looked at while the rows
    were first set up), "dev" (generated, settings may be chosen on it) or "test" (generated, held out); or
    "fresh<seed>" (e.g. "fresh7070"): FRESH_N items of the same generator with another seed, named "fresh00_...",
    for diagnostics that must stay off both splits (e.g. comparing checkpoints on one edit kind)."""
    if split == "public":
        return benchmark_set(frames)
    m = re.fullmatch(r"fresh(\d+)", split)
    if m:
        seed = int(m.group(1))
        if seed in {s for s, _ in SPLITS.values()}:
            raise ValueError(f"fresh{seed}: seed {seed} is a benchmark split's seed; choose another")
        return generate_items(seed, FRESH_N, "fresh", frames)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: public, {', '.join(SPLITS)}, fresh<seed>")
    seed, n = SPLITS[split]
    return generate_items(seed, n, split, frames)
