"""The toy benchmark: every registered method edits every clip of the fixed benchmark set
(toy/scenes.py `benchmark_set`), and one table of metrics (toy/metrics.py) is printed.

    cd <pack root> && python -m toy.benchmark [--split public|dev|test] [--methods a,b] [--items a,b] [--steps 20]
                                              [--cfg 5] [--frames 8] [--json out.json] [--merge a.json b.json]

Splits (toy/scenes.py `split_set`): "public" is the six fixed items the rows were first set up on; "dev" and
"test" are generated from the whole toy vocabulary by a seeded generator (`scenes.SPLITS`). Settings are chosen
on dev only; test is the held-out report, printed with 95% bootstrap intervals over items, per edit kind, and
the bar of issue 20 (`bar_check`). `--list` prints a split's items.

A method is a function

    fn(model, clip, vae, frames, source_prompt, edit_prompt, spec) -> edited frames

with `frames` a float tensor [F, H, W, 3] in 0..1, MODEL/CLIP/VAE the toy model's ComfyUI objects and
`spec` a `BenchSpec` (the EditSpec in `spec.edit`, sampling settings in `spec.steps`, `spec.cfg`, ...).
Register it with `@register("row label")` in a module imported before `main()` runs (add the import to
`METHOD_MODULES` below, e.g. FateZero / Video-P2P / BLD / InFusion rows), and it becomes a row.

The first rows:
- "per-frame edit without attention control": each frame on its own is DDIM-inverted with the source prompt
  (VideoDDIMInvert's run_inversion) and re-sampled with the edit prompt (KSamplerAdvanced semantics:
  add_noise disabled, ddim sampler, ddim_uniform scheduler, same steps);
- "inversion + edit prompt, no control": the same on the whole clip at once (frames = latent batch);
- "reconstruction (source prompt)": the whole clip inverted and re-sampled with the SOURCE prompt at guidance
  1, i.e. the preservation ceiling of inversion (edit success is expected to be ~0 except where the edit is a no-op).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import boot

METHODS: dict[str, Callable] = {}
# Modules (relative to the pack) that register further rows when imported, e.g. "toy.methods_fatezero".
METHOD_MODULES: list[str] = ["toy.methods_bld", "toy.methods_fatezero", "toy.methods_videop2p", "toy.methods_infusion"]


def register(name: str):
    def deco(fn):
        METHODS[name] = fn
        return fn

    return deco


@dataclass
class BenchSpec:
    edit: object  # scenes.EditSpec
    clip: object  # scenes.Clip (source frames and ground-truth masks)
    steps: int = 20
    cfg: float = 5.0
    inversion_cfg: float = 1.0
    sampler: str = "ddim"
    scheduler: str = "ddim_uniform"
    negative_prompt: str = ""
    extra: dict = field(default_factory=dict)


# --- shared building blocks for methods ---------------------------------------------------------------


def _pack():
    return boot.load_pack()


def prompt_pair(clip, source: str, edit: str, negative: str = ""):
    """Edit Prompts' prompt pair (the attention-control nodes read their word positions from it)."""
    return _pack().nodes.prompts.make_prompt_pair(clip, source, edit, negative)


def encode_text(clip, text: str):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def encode_frames(vae, frames):
    import nodes

    return nodes.VAEEncode().encode(vae, frames)[0]


def decode(vae, latent):
    import nodes

    return nodes.VAEDecode().decode(vae, latent)[0]


def invert(model, latent, positive, spec: BenchSpec):
    """VideoDDIMInvert's runner: (z_T latent, Inversion)."""
    run_inversion = _pack().nodes._comfy.run_inversion
    return run_inversion(model, latent, positive, None, spec.steps, spec.inversion_cfg, disable_pbar=True)


def sample_from(model, z_T, positive, negative, spec: BenchSpec):
    """KSamplerAdvanced(add_noise=disable, sampler, ddim_uniform, same steps, full denoise)."""
    import nodes

    return nodes.KSamplerAdvanced().sample(model, "disable", 0, spec.steps, spec.cfg, spec.sampler, spec.scheduler,
                                           positive, negative, z_T, 0, 10000, "disable")[0]


def invert_and_sample(model, clip, vae, frames, source_prompt, sample_prompt, spec: BenchSpec):
    src = encode_text(clip, source_prompt)
    pos = encode_text(clip, sample_prompt)
    neg = encode_text(clip, spec.negative_prompt)
    z_T, _ = invert(model, encode_frames(vae, frames), src, spec)
    return decode(vae, sample_from(model, z_T, pos, neg, spec))


# --- the first rows ------------------------------------------------------------------------------------


@register("per-frame edit without attention control")
def per_frame_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    import torch

    outs = [invert_and_sample(model, clip, vae, frames[i: i + 1], source_prompt, edit_prompt, spec)
            for i in range(frames.shape[0])]
    return torch.cat(outs)


@register("inversion + edit prompt, no control")
def inversion_edit(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    return invert_and_sample(model, clip, vae, frames, source_prompt, edit_prompt, spec)


@register("reconstruction (source prompt)")
def reconstruction(model, clip, vae, frames, source_prompt, edit_prompt, spec):
    """Inversion + source prompt at guidance 1 (the inversion's own): how much inversion alone preserves."""
    from dataclasses import replace

    return invert_and_sample(model, clip, vae, frames, source_prompt, source_prompt, replace(spec, cfg=1.0))


# --- running --------------------------------------------------------------------------------------------

COLUMNS = [
    ("success", "edit ok", "{:.0%}"),
    ("others_kept", "kept", "{:.0%}"),
    ("psnr_bg", "PSNR bg", "{:.1f}"),
    ("psnr_vae", "PSNR vs VAE", "{:.1f}"),
    ("ssim_bg", "SSIM bg", "{:.3f}"),
    ("leak", "leak", "{:.1%}"),
    ("warp_err", "warp err", "{:.4f}"),
    ("warp_vae", "warp over VAE", "{:.4f}"),
    ("rel_change", "rel chg", "{:.2f}"),
]


def vae_round_trip(vae, frames):
    """[F, H, W, 3] numpy 0..1: the frames through the VAE and back (decode(encode(frames))): the reference of the
    "PSNR vs VAE" preservation measure (toy/metrics.py)."""
    import torch

    with torch.inference_mode():
        return decode(vae, encode_frames(vae, torch.as_tensor(frames))).detach().cpu().float().numpy()


def run(model, clip, vae, methods: list[str] | None = None, steps: int = 20, cfg: float = 5.0, frames: int = 8,
        items: list[str] | None = None, verbose: bool = True, on_row: Callable | None = None,
        split: str = "public", partial: bool = False, frames_dir: Path | None = None) -> dict:
    """Run the methods on the items of a split (toy/scenes.py `split_set`: "public", "dev", "test").
    Returns {method: {"items": {name: scores}, "mean": scores}}; each item's scores carry its "kind" and whether it
    is a "local" edit. `on_row(results)` is called after each row (the CLI saves --json there, so a long run keeps
    its rows; with `partial` also after each item)."""
    import torch

    from . import metrics, scenes

    specs = [s for s in scenes.split_set(split, frames) if items is None or s.name in items]
    if items is not None and len(specs) != len(set(items)):
        known = {s.name for s in scenes.split_set(split, frames)}
        raise SystemExit(f"unknown item(s) of split {split!r}: {sorted(set(items) - known)}")
    names = methods or list(METHODS)
    results = {}
    refs: dict = {}  # item -> its clip's VAE round trip (the "PSNR vs VAE" reference), once for every row
    for mname in names:
        fn = METHODS[mname]
        per = {}
        t0 = time.time()
        for es in specs:
            clip_ = es.clip()
            bs = BenchSpec(es, clip_, steps=steps, cfg=cfg)
            src = torch.from_numpy(clip_.frames)
            with torch.inference_mode():
                edited = fn(model, clip, vae, src, es.source_prompt, es.edit_prompt, bs)
            if vae is not None and es.name not in refs:
                refs[es.name] = vae_round_trip(vae, src)
            edited = edited.detach().cpu().float().numpy()
            per[es.name] = metrics.toy_scores(edited, clip_, es, latent_ref=refs.get(es.name))
            per[es.name].update(kind=item_kind(es), local=es.local, _frames=edited)
            if frames_dir is not None:  # uint8 frames, to score again without running the row again
                import numpy as np

                Path(frames_dir).mkdir(parents=True, exist_ok=True)
                np.savez_compressed(Path(frames_dir) / f"{_slug(mname)}__{es.name}.npz",
                                    frames=(np.clip(edited, 0, 1) * 255).round().astype(np.uint8))
            if verbose:
                sc = per[es.name]
                print(f"  {mname} | {es.name}: " + ", ".join(f"{k} {sc[k]:.3g}" for k, _, _ in COLUMNS), flush=True)
            if on_row is not None and partial:  # a long run keeps every finished item
                on_row({**results, mname: {"items": per, "mean": mean_scores(per), "seconds": time.time() - t0}})
        results[mname] = {"items": per, "mean": mean_scores(per), "seconds": time.time() - t0}
        if on_row is not None:
            on_row(results)
    return results


def _slug(m: str) -> str:
    return m.replace(" ", "_").replace(",", "").replace("+", "plus").replace("(", "").replace(")", "")


def item_kind(es) -> str:
    """The edit kind of an item for the per-kind tables: the generated kinds (scenes.EDIT_KINDS); the public
    set's background items are told apart by whether the background's pattern stays."""
    if es.kind == "background" and es.background.kind == es.edit_background.kind:
        return "background_recolor"
    return es.kind


def mean_scores(per: dict) -> dict:
    """Mean of each column over the items (nan items left out; inf kept as inf)."""
    import numpy as np

    mean = {}
    for k, _, _ in COLUMNS:
        vals = [per[n].get(k, math.nan) for n in per]
        vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
        finite = [v for v in vals if math.isfinite(v)]
        mean[k] = float(np.mean(finite)) if finite else (float("inf") if vals else float("nan"))
    return mean


def to_json(res: dict) -> dict:
    """The results without the edited frames (what --json writes and --merge reads)."""
    return {m: {"mean": r["mean"], "seconds": r["seconds"],
                "items": {n: {k: v for k, v in s.items() if not k.startswith("_")} for n, s in r["items"].items()}}
            for m, r in res.items()}


# Rows that are not editing methods a user runs blind: they bound the others and are marked in the tables.
REFERENCE_ROWS = {
    "reconstruction (source prompt)": "reference: no edit (the source prompt back)",
    "Blended latent (ground-truth mask)": "oracle: the user mask is the ground-truth object mask",
}


def label(m: str) -> str:
    return f"{m} *(ref)*" if m in REFERENCE_ROWS else m


def _cell(v: float, fmt: str) -> str:
    return "inf" if v == float("inf") else ("nan" if v != v else fmt.format(v))


def table(results: dict) -> str:
    """One markdown table: a row per method, the mean over the benchmark items."""
    head = "| method | " + " | ".join(h for _, h, _ in COLUMNS) + " | s |"
    sep = "|---|" + "---|" * (len(COLUMNS) + 1)
    lines = [head, sep]
    for m, r in results.items():
        cells = [_cell(r["mean"].get(k, math.nan), fmt) for k, _, fmt in COLUMNS]
        lines.append(f"| {label(m)} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def local_items(results: dict) -> list[str]:
    """The benchmark items that are local edits (one object changes, the rest must stay): from the items' own
    "local" flag, else (results of older runs) the public set's kinds."""
    from . import scenes

    kinds = {s.name: s.local for s in scenes.benchmark_set()}
    names = next(iter(results.values()))["items"] if results else {}
    return [n for n, sc in names.items() if sc.get("local", kinds.get(n, True))]


def best_local(results: dict, methods_only: bool = True) -> str | None:
    """The row with the highest mean background PSNR over the local edits (reference rows excluded)."""
    import numpy as np

    loc = local_items(results)
    rows = {m: float(np.mean([r["items"][n]["psnr_bg"] for n in loc])) for m, r in results.items()
            if not (methods_only and m in REFERENCE_ROWS)} if loc else {}
    return max(rows, key=rows.get) if rows else None


def item_table(results: dict, key: str = "psnr_bg", fmt: str = "{:.1f}") -> str:
    """Per item: one metric (background PSNR by default) for every row, and its mean over the local edits."""
    import numpy as np

    if not results:
        return ""
    names = list(next(iter(results.values()))["items"])
    loc = local_items(results)
    order = loc + [n for n in names if n not in loc]
    heads = loc + (["mean (local)"] if loc else []) + [n for n in order if n not in loc]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for m, r in results.items():
        vals = [_cell(r["items"][n][key], fmt) for n in order]
        if loc:
            vals.insert(len(loc), _cell(float(np.mean([r["items"][n][key] for n in loc])), fmt))
        lines.append(f"| {label(m)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def parse_methods(text: str) -> list[str]:
    """Row labels from a comma-separated list; a label that itself contains a comma ("inversion + edit prompt,
    no control") is recognised whole."""
    names, cur = [], ""
    for part in text.split(","):
        cur = f"{cur},{part}" if cur else part.strip()
        if cur in METHODS:
            names.append(cur)
            cur = ""
    if cur:
        raise SystemExit(f"unknown benchmark row {cur!r}; rows are: {'; '.join(METHODS)}")
    return names


def report(res: dict, title: str) -> str:
    lines = [title, table(res), "", "background PSNR (dB) per item:", item_table(res)]
    if len(res) > 1:
        lines.append(f"best background PSNR over the local edits (reference rows excluded): {best_local(res)}")
    lines += [f"*(ref)* {m}: {REFERENCE_ROWS[m]}" for m in res if m in REFERENCE_ROWS]
    return "\n".join(lines)


# --- the dev / test splits: intervals over items, per-kind tables, the bar ---------------------------------

BASELINE = "inversion + edit prompt, no control"
# The editing rows the issue-20 bar applies to (>= 90% edit success, and better than BASELINE on local-edit
# background PSNR and on warp error with separated 95% intervals).
BAR_ROWS = ["FateZero (style)", "FateZero (local blended)", "FateZero (local + latent blend)",
            "Blended latent (attention mask)", "Video-P2P (fast)", "Video-P2P (null-text)", "InFusion"]
BAR_SUCCESS = 0.9
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def bootstrap_ci(values, n: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95):
    """(mean, low, high): the mean of the finite values and its percentile bootstrap interval (resampling the
    items with replacement, numpy Generator seeded by `seed`). nan for no values."""
    import numpy as np

    v = np.asarray([x for x in values if _finite(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


# (key, header, format, which items): the split tables' columns
SPLIT_COLUMNS = [
    ("success", "edit ok", "{:.0%}", "all"),
    ("others_kept", "kept", "{:.0%}", "all"),
    ("psnr_bg", "PSNR bg (local)", "{:.1f}", "local"),
    ("psnr_vae", "PSNR vs VAE (local)", "{:.1f}", "local"),
    ("psnr_bg", "PSNR bg (global)", "{:.1f}", "global"),
    ("ssim_bg", "SSIM bg (local)", "{:.3f}", "local"),
    ("leak", "leak (local)", "{:.1%}", "local"),
    ("warp_err", "warp err", "{:.4f}", "all"),
    ("warp_vae", "warp over VAE", "{:.4f}", "all"),
    ("rel_change", "rel chg", "{:.2f}", "all"),
]


def _values(r: dict, key: str, which: str) -> list[float]:
    """The items' values of `key` in the order of the item names (so that an interval does not depend on the order in
    which the items were run or merged: `bootstrap_ci` resamples positions)."""
    items = r["items"]
    loc = set(local_items({"_": r}))
    names = [n for n in sorted(items) if which == "all" or (which == "local") == (n in loc)]
    return [items[n][key] for n in names if key in items[n]]


def summary(res: dict) -> dict:
    """{row: {header: (mean, low, high)}} for the split tables."""
    return {m: {h: bootstrap_ci(_values(r, k, w)) for k, h, _, w in SPLIT_COLUMNS} for m, r in res.items()}


def _ci_cell(ci, fmt: str) -> str:
    m, lo, hi = ci
    if m != m:
        return "-"
    f = (lambda x: fmt.format(x).rstrip("%")) if fmt.endswith("%}") else fmt.format
    return f"{fmt.format(m)} [{f(lo)}, {f(hi)}]"


def ci_table(res: dict) -> str:
    """A row per method (its item count in brackets): the mean over the items and its 95% bootstrap interval
    [low, high] per column."""
    summ = summary(res)
    lines = ["| method | " + " | ".join(h for _, h, _, _ in SPLIT_COLUMNS) + " | s |",
             "|---|" + "---|" * (len(SPLIT_COLUMNS) + 1)]
    for m, r in res.items():
        cells = [_ci_cell(summ[m][h], fmt) for _, h, fmt, _ in SPLIT_COLUMNS]
        lines.append(f"| {label(m)} ({len(r['items'])}) | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def kinds_of(res: dict) -> list[str]:
    from . import scenes

    seen = []
    for r in res.values():
        for sc in r["items"].values():
            k = sc.get("kind")
            if k and k not in seen:
                seen.append(k)
    order = list(scenes.EDIT_KINDS)
    return sorted(seen, key=lambda k: order.index(k) if k in order else len(order))


def kind_table(res: dict, key: str = "success", fmt: str = "{:.0%}") -> str:
    """Per edit kind (columns, with the item count): the mean of one metric for every row (nan items left out)."""
    import numpy as np

    kinds = kinds_of(res)
    if not kinds:
        return ""
    first = next(iter(res.values()))["items"]
    count = {k: sum(1 for sc in first.values() if sc.get("kind") == k) for k in kinds}
    lines = ["| method | " + " | ".join(f"{k} ({count[k]})" for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for m, r in res.items():
        cells = []
        for k in kinds:
            v = [sc[key] for sc in r["items"].values() if sc.get("kind") == k and key in sc and _finite(sc[key])]
            cells.append(_cell(float(np.mean(v)), fmt) if v else "-")
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _all_items_have(res: dict, key: str) -> bool:
    """Whether every item of the baseline and of the bar's rows in `res` (reference rows do not count) has `key`."""
    rows = [r for m, r in res.items() if m == BASELINE or m in BAR_ROWS] or list(res.values())
    return all(key in sc for r in rows for sc in r["items"].values())


def bar_psnr(res: dict) -> str:
    """The preservation column the bar reads: "PSNR vs VAE (local)" (against the source's VAE round trip) when every
    item of the baseline and of the bar's rows in `res` has it (reference rows do not count), else "PSNR bg (local)"
    (against the frames: results saved before the measure existed, or a merge that mixes both).
    Why the round trip: the toy VAE (an 8x8 block mean) cannot hold striped or dotted backgrounds, so against the
    frames a perfectly kept background scores what the VAE keeps of it (18-20 dB on most test items); that loss is
    the same for every row and hides the rows' own (toy/metrics.py, toy/RESULTS.md "Preservation against the VAE
    round trip")."""
    return "PSNR vs VAE (local)" if _all_items_have(res, "psnr_vae") else "PSNR bg (local)"


def bar_warp(res: dict) -> str:
    """The steadiness column the bar reads: "warp over VAE" (the warp error minus the source's VAE round trip's,
    `metrics.warp_error_over`) when every item of the baseline and of the bar's rows has it, else "warp err".
    Why: the round trip's own warp error (the flow's errors at occlusions and on stripes and dots, what an edit that
    changed nothing scores) is 42-75% of each row's mean on the test split and varies 30-fold between its items, the
    same for every row on an item; it widens every row's interval without telling rows apart (toy/RESULTS.md, "Warp error over the VAE round
    trip"). The difference of two rows' means is the same in both columns."""
    return "warp over VAE" if _all_items_have(res, "warp_vae") else "warp err"


def bar_check(res: dict, rows: list[str] | None = None, baseline: str = BASELINE) -> dict:
    """Issue 20's bar per editing row present in `res`: {row: {"pass": bool, "why": [failed conditions],
    "note": the comparisons against the frames (PSNR) and of the plain warp error when the bar reads the VAE ones}}.
    A row passes with mean edit success >= BAR_SUCCESS, its local-edit preservation PSNR interval (`bar_psnr`)
    above the baseline's and its warp-error interval (`bar_warp`) below the baseline's (95% bootstrap intervals, no
    overlap), the baseline taken on the row's items."""
    if baseline not in res:
        return {}
    summ = summary(res)
    psnr, warp = bar_psnr(res), bar_warp(res)
    out = {}
    for m in rows or BAR_ROWS:
        if m not in res:
            continue
        s, why = summ[m], []
        # the baseline on the same items (a row run on part of the split is compared on that part)
        same = {n: sc for n, sc in res[baseline]["items"].items() if n in res[m]["items"]}
        b = summary({baseline: {**res[baseline], "items": same}})[baseline]
        if not s["edit ok"][0] >= BAR_SUCCESS:
            ok = s["edit ok"][0]  # one decimal where whole percents would round up to the bar (89.9% -> "90%")
            why.append(f"edit ok {ok:.0%} < {BAR_SUCCESS:.0%}" if round(ok * 100) < BAR_SUCCESS * 100
                       else f"edit ok {ok:.1%} < {BAR_SUCCESS:.0%}")
        notes = []
        for col in dict.fromkeys([psnr, "PSNR bg (local)"]):
            if not s[col][1] > b[col][2]:
                (why if col == psnr else notes).append(
                    f"{col} interval [{s[col][1]:.1f}, {s[col][2]:.1f}] not above the baseline's "
                    f"[{b[col][1]:.1f}, {b[col][2]:.1f}]")
            elif col != psnr:
                notes.append(f"{col} interval [{s[col][1]:.1f}, {s[col][2]:.1f}] above the baseline's "
                             f"[{b[col][1]:.1f}, {b[col][2]:.1f}]")
        for col in dict.fromkeys([warp, "warp err"]):
            ok = s[col][2] < b[col][1]
            text = (f"{col} interval [{s[col][1]:.4f}, {s[col][2]:.4f}] {'below' if ok else 'not below'} the "
                    f"baseline's [{b[col][1]:.4f}, {b[col][2]:.4f}]")
            if col == warp:
                if not ok:
                    why.append(text)
            else:
                notes.append(text)
        out[m] = {"pass": not why, "why": why, "note": "; ".join(notes)}
    return out


def match_rows(before: dict, after: dict) -> dict:
    """{row of `after`: row of `before`} for a paired comparison: the row of the same label, or else the longest label
    of `before` that the `after` row's label starts with (a variant row: 'FateZero (style), source maps' is compared
    with 'FateZero (style)'). Rows without a match are left out."""
    out = {}
    for m in after:
        if m in before:
            out[m] = m
            continue
        cands = [b for b in before if m.startswith(b)]
        if cands:
            out[m] = max(cands, key=len)
    return out


def paired_table(before: dict, after: dict) -> str:
    """Per matched row (`match_rows`), over the items both results have: the mean of `before` and of `after` and the
    paired difference after - before with its 95% bootstrap interval (items resampled, as `bootstrap_ci`), for edit
    ok, local-edit preservation PSNR and warp error; then edit ok per edit kind, before -> after. The way to compare
    two settings or checkpoints run on the same items: the items' own difficulty cancels."""
    cols = [("success", "edit ok", "{:+.1f}", 100.0, "all"), ("psnr_bg", "PSNR bg (local)", "{:+.2f}", 1.0, "local"),
            ("psnr_vae", "PSNR vs VAE (local)", "{:+.2f}", 1.0, "local"), ("warp_err", "warp err", "{:+.4f}", 1.0, "all")]
    # (no "warp over VAE": per item it is the warp error minus a constant of the item, so its paired difference is the
    # warp error's)
    lines = ["| row (after vs before) | items | " + " | ".join(f"{h}: before, after, difference [95%]"
                                                           for _, h, _, _, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    kind_lines = []
    for m, b in match_rows(before, after).items():
        bi, ai = before[b]["items"], after[m]["items"]
        names = sorted(n for n in ai if n in bi)  # item order: as `_values`
        if not names:
            continue
        loc = set(local_items({"_": {"items": {n: ai[n] for n in names}}}))
        cells = []
        for key, _, fmt, scale, which in cols:
            use = [n for n in names if which == "all" or n in loc]
            pairs = [(bi[n].get(key), ai[n].get(key)) for n in use]
            pairs = [(x, y) for x, y in pairs if _finite(x) and _finite(y)]
            if not pairs:
                cells.append("-")
                continue
            d, lo, hi = bootstrap_ci([(y - x) * scale for x, y in pairs])
            mb = sum(x for x, _ in pairs) / len(pairs) * scale
            ma = sum(y for _, y in pairs) / len(pairs) * scale
            num = "{:.1f}" if scale == 100.0 else fmt.replace("+", "")
            cells.append(f"{num.format(mb)}, {num.format(ma)}, {fmt.format(d)} [{fmt.format(lo)}, {fmt.format(hi)}]")
        name = m if m == b else f"{m} vs {b}"
        lines.append(f"| {label(name)} | {len(names)} | " + " | ".join(cells) + " |")
        kinds: dict = {}
        for n in names:
            kinds.setdefault(ai[n].get("kind", "?"), []).append((bi[n]["success"], ai[n]["success"]))
        kind_lines.append(f"- {label(name)}: " + ", ".join(
            f"{k} {sum(x for x, _ in v) / len(v):.0%} -> {sum(y for _, y in v) / len(v):.0%} ({len(v)})"
            for k, v in kinds.items()))
    return "\n".join(lines + ["", "edit ok per edit kind, before -> after (items):"] + kind_lines)


def bar_lines(bar: dict) -> list[str]:
    """`bar_check`'s verdicts as markdown list lines, one per row."""
    return [f"- {m}: {'PASS' if v['pass'] else 'FAIL: ' + '; '.join(v['why'])}"
            + (f" (for reference: {v['note']})" if v.get("note") else "") for m, v in bar.items()]


def baseline_pairs(res: dict) -> str:
    """`paired_table` of every bar row against the uncontrolled edit (BASELINE), without the per-kind lines."""
    rows = [m for m in BAR_ROWS if m in res]
    table = paired_table({m: res[BASELINE] for m in rows}, {m: res[m] for m in rows})
    return table.split("\n\nedit ok per edit kind")[0].replace("| row (after vs before) |", "| row (row vs uncontrolled) |")


def split_of(res: dict) -> str | None:
    """The generated split the results' items belong to (by their names), or None."""
    from . import scenes

    names = next(iter(res.values()))["items"] if res else {}
    for split in scenes.SPLITS:
        if names and all(n.startswith(split) for n in names):
            known = {s.name for s in scenes.split_set(split, 2)}
            return split if set(names) <= known else None
    return None


def drawn_items(res: dict, drawn: dict, bar: float | None = None) -> tuple[list[str], list[str]]:
    """(items whose edit prompt the model draws, the other items) among the results' items: `drawn` is
    `toy.quality --split`'s {item: {"drawn": share of plain samples right}}; drawn = share >= `bar`
    (quality.DRAWN_BAR). Raises ValueError when an item of the results has no entry."""
    from .quality import DRAWN_BAR

    bar = DRAWN_BAR if bar is None else bar
    names = sorted(next(iter(res.values()))["items"]) if res else []  # item order: as `_values`
    missing = [n for n in names if n not in drawn]
    if missing:
        raise ValueError(f"--drawn has no entry for {missing[:3]}{'...' if len(missing) > 3 else ''}: run "
                         "`python -m toy.quality --split <split> --json FILE` for this split")
    yes = [n for n in names if drawn[n]["drawn"] >= bar]
    return yes, [n for n in names if n not in yes]


def load_drawn(path: Path, split: str) -> dict:
    """The {item: ...} of a `toy.quality --split` JSON for `split`, checked before any run: SystemExit naming
    the problem when the file is missing, is of another split or lacks one of the split's items."""
    from . import scenes

    if split == "public":
        raise SystemExit("--drawn reads a generated split (dev, test, fresh<seed>); the public items have no "
                         "`toy.quality --split` file")
    if not path.is_file():
        raise SystemExit(f"--drawn {path}: no such file; write it with `python -m toy.quality --split {split} "
                         f"--json {path}`")
    d = json.loads(path.read_text())
    if d.get("split") != split:
        raise SystemExit(f"--drawn {path} is for split {d.get('split')!r}, not {split!r}: run `python -m "
                         f"toy.quality --split {split} --json FILE`")
    missing = [s.name for s in scenes.split_set(split, 2) if s.name not in d.get("items", {})]
    if missing:
        raise SystemExit(f"--drawn {path} has no entry for {missing[:3]}: run `python -m toy.quality --split {split} "
                         f"--json FILE` again")
    return d["items"]


def drawn_table(res: dict, drawn: dict, bar: float | None = None) -> str:
    """Per row, edit ok (95% bootstrap interval) on the items whose edit prompt the model draws from noise and
    on the others: a method's misses told apart from the model's."""
    yes, no = drawn_items(res, drawn, bar)
    lines = [f"| method | edit ok, edit prompt drawn ({len(yes)}) | edit ok, not drawn ({len(no)}) |",
             "|---|---|---|"]
    for m, r in res.items():
        cells = []
        for names in (yes, no):
            vals = [r["items"][n].get("success") for n in names if n in r["items"]]
            cells.append(_ci_cell(bootstrap_ci(vals), "{:.0%}") if vals else "-")
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_report(res: dict, title: str, drawn: dict | None = None) -> str:
    lines = [title, "", "means over the items with 95% bootstrap intervals (items resampled, "
             f"{BOOTSTRAP_SAMPLES} draws, seed {BOOTSTRAP_SEED}):", ci_table(res), ""]
    for key, name, fmt in (("success", "edit ok", "{:.0%}"), ("psnr_bg", "PSNR bg (dB)", "{:.1f}"),
                           ("psnr_vae", "PSNR vs VAE (dB)", "{:.1f}"),
                           ("warp_err", "warp err", "{:.4f}"), ("warp_vae", "warp over VAE", "{:.4f}"),
                           ("others_kept", "kept", "{:.0%}")):
        lines += [f"{name} per edit kind (items):", kind_table(res, key, fmt), ""]
    if BASELINE in res and split_of(res):
        lines += [f"the model's own share: {BASELINE!r} per requested class (share of frames right, items):",
                  class_table(res, BASELINE, split_of(res))]
    bar = bar_check(res)
    if bar:
        lines.append(f"the bar (edit ok >= {BAR_SUCCESS:.0%}; {bar_psnr(res)} and {bar_warp(res)} intervals separated from "
                     f"{BASELINE!r}, better):")
        lines += bar_lines(bar)
    if BASELINE in res and any(m in res for m in BAR_ROWS):
        lines += ["", f"paired against {BASELINE!r} (each row minus it on the same items; the bar asks for "
                      "separated intervals, this is the paired reading of the same comparison):",
                  baseline_pairs(res)]
    if drawn is not None:
        from .quality import DRAWN_BAR

        lines += ["", f"edit ok on the items whose edit prompt the model draws (plain generation, >= "
                      f"{DRAWN_BAR:.1%} of the samples right) and on the others (95% bootstrap intervals):",
                  drawn_table(res, drawn)]
        yes, _ = drawn_items(res, drawn)
        sub = {m: dict(r, items={n: r["items"][n] for n in yes if n in r["items"]}) for m, r in res.items()}
        sub_bar = bar_check(sub)
        if sub_bar:
            lines += ["", f"the bar on those {len(yes)} items only:"]
            lines += bar_lines(sub_bar)
            lines += ["", "paired against the uncontrolled edit on those items:", baseline_pairs(sub)]
    lines += [f"*(ref)* {m}: {REFERENCE_ROWS[m]}" for m in res if m in REFERENCE_ROWS]
    return "\n".join(lines)


def edit_classes(es) -> dict:
    """{"colour"|"shape"|"background": (class, score key)}: what an item asks the model to draw new, and which of
    its scores says whether it did (the object's colour / shape, the new background)."""
    out = {}
    if es.target is not None:
        src = es.motions[es.target]
        if es.expect_color != src.color:
            out["colour"] = (es.expect_color, "success_color")
        if es.expect_shape != src.shape:
            out["shape"] = (es.expect_shape, "success_shape")
        if es.edit_background != es.background:
            out["background"] = (es.edit_background.caption(), "success_background")
    else:
        out["background"] = (es.edit_background.caption(), "success")
    return out


def class_success(res: dict, row: str, split: str) -> dict:
    """{axis: {class: (mean share of frames right, items)}} of one row: per colour, shape and background the
    items' frames that show the requested class (an item counts for every class it asks for)."""
    import numpy as np

    from . import scenes

    specs = {s.name: s for s in scenes.split_set(split)}
    acc: dict = {"colour": {}, "shape": {}, "background": {}}
    for name, sc in res[row]["items"].items():
        for axis, (cls, key) in edit_classes(specs[name]).items():
            if key in sc:
                acc[axis].setdefault(cls, []).append(sc[key])
    return {axis: {c: (float(np.mean(v)), len(v)) for c, v in sorted(d.items())} for axis, d in acc.items()}


def class_table(res: dict, row: str, split: str) -> str:
    lines = []
    for axis, d in class_success(res, row, split).items():
        lines += [f"| {axis} | " + " | ".join(d) + " |", "|---|" + "---|" * len(d),
                  f"| {row} | " + " | ".join(f"{m:.0%} ({n})" for m, n in d.values()) + " |", ""]
    return "\n".join(lines)


def list_split(split: str, frames: int = 8) -> str:
    """A markdown table of a split's items (what RESULTS.md lists)."""
    from . import scenes

    lines = ["| item | motion | source prompt | edit prompt |", "|---|---|---|---|"]
    for s in scenes.split_set(split, frames):
        lines.append(f"| {s.name} | {s.motion} | {s.source_prompt} | {s.edit_prompt} |")
    return "\n".join(lines)


def rescore(frames_dir: Path, split: str, frames: int, methods: list[str] | None = None, vae=None) -> dict:
    """Results from the clips a `--frames-dir` run saved, scored with the current metrics (seconds: 0); with the
    toy VAE `vae`, also "PSNR vs VAE"."""
    import numpy as np

    from . import metrics, scenes

    specs = scenes.split_set(split, frames)
    names = methods or list(METHODS)
    res = {}
    refs: dict = {}  # item -> its clip's VAE round trip, once for every row
    for m in names:
        per = {}
        for es in specs:
            f = Path(frames_dir) / f"{_slug(m)}__{es.name}.npz"
            if not f.exists():
                continue
            edited = np.load(f)["frames"].astype(np.float32) / 255.0
            clip_ = es.clip()
            if vae is not None and es.name not in refs:
                refs[es.name] = vae_round_trip(vae, clip_.frames)
            per[es.name] = metrics.toy_scores(edited, clip_, es, latent_ref=refs.get(es.name))
            per[es.name].update(kind=item_kind(es), local=es.local)
        if per:
            res[m] = {"items": per, "mean": mean_scores(per), "seconds": 0.0}
    return res


def warp_parts_table(frames_dir: Path, split: str, frames: int, methods: list[str] | None = None) -> str:
    """Where each row's warp error is, from the clips a `--frames-dir` run saved: per row, the mean over the local and
    over the other items of `metrics.warp_error_parts` (inside / outside the edited region, each minus the source's
    own warp error there)."""
    import numpy as np

    from . import metrics, scenes

    specs = scenes.split_set(split, frames)
    lines = ["| method | local: inside | local: outside | others: inside | others: outside | items |",
             "|---|---|---|---|---|---|"]
    for m in methods or list(METHODS):
        parts: dict = {True: [], False: []}
        for es in specs:
            f = Path(frames_dir) / f"{_slug(m)}__{es.name}.npz"
            if f.exists():
                edited = np.load(f)["frames"].astype(np.float32) / 255.0
                parts[bool(es.local)].append(metrics.warp_error_parts(edited, es.clip(), es))
        if not parts[True] and not parts[False]:
            continue
        cells = []
        for loc in (True, False):
            for k in ("inside", "outside"):
                v = [p[k] for p in parts[loc]]
                cells.append(f"{np.mean(v):.4f}" if v else "-")
        lines.append(f"| {label(m)} | " + " | ".join(cells) + f" | {len(parts[True])} + {len(parts[False])} |")
    return "\n".join(lines)


def _has_kinds(r: dict) -> bool:
    return bool(r.get("items")) and all("kind" in sc for sc in r["items"].values())


def merge_json(paths: list[Path]) -> dict:
    """The union of several --json outputs (a later file's row replaces an earlier one of the same label; rows of
    the dev/test splits, whose items carry their kind, are joined item by item instead), rows in the order they are
    registered (rows no longer registered last), whatever the order of the runs."""
    res: dict = {}
    for f in paths:
        for m, r in json.loads(Path(f).read_text()).items():
            if m in res and _has_kinds(res[m]) and _has_kinds(r):  # split runs: item ranges of one row join
                items = {**res[m]["items"], **r["items"]}
                res[m] = {"items": items, "mean": mean_scores(items), "seconds": res[m]["seconds"] + r["seconds"]}
            else:
                res[m] = r
    rank = {m: i for i, m in enumerate(METHODS)}
    return dict(sorted(res.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _register_rows():
    for mod in METHOD_MODULES:
        importlib.import_module("." + mod.split(".", 1)[1] if mod.startswith("toy.") else mod, __package__)
    if __name__ == "__main__":  # run as `python -m toy.benchmark`: method modules registered into toy.benchmark
        METHODS.update(importlib.import_module(".benchmark", __package__).METHODS)


def _split_name(text: str) -> str:
    """argparse type of --split: public, dev, test or fresh<seed>."""
    if text in ("public", "dev", "test") or re.fullmatch(r"fresh\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use public, dev, test or fresh<seed> (e.g. fresh7070)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--methods", default=None,
                   help="comma-separated row labels (labels containing a comma are matched whole; default: all)")
    p.add_argument("--split", default="public", type=_split_name,
                   help="public: the six fixed items; dev: generated items for choosing settings; test: generated "
                        "held-out items (toy/scenes.py SPLITS), reported with bootstrap intervals and per edit kind; "
                        "fresh<seed>: 120 items of the same generator with another seed (diagnostics off both splits)")
    p.add_argument("--kinds", default=None,
                   help="only the items of these edit kinds, comma-separated (color, shape, two_object, background, "
                        "background_recolor, object_background)")
    p.add_argument("--list", action="store_true", help="print the split's items and exit")
    p.add_argument("--items", default=None, help="comma-separated benchmark item names (default: all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--save-frames", type=Path, default=None, help="write source|edit strips as PNGs here")
    p.add_argument("--frames-dir", type=Path, default=None,
                   help="write every edited clip here (uint8 .npz per row and item); --rescore reads them back")
    p.add_argument("--rescore", type=Path, default=None,
                   help="score the clips of an earlier --frames-dir run again with the current metrics (nothing is "
                        "run; rows from --methods, default all rows found) and write --json")
    p.add_argument("--warp-parts", type=Path, default=None,
                   help="print where each row's warp error is (inside / outside the edited region, minus the source's "
                        "own) from the clips of an earlier --frames-dir run (nothing is run)")
    p.add_argument("--drawn", type=Path, default=None,
                   help="`python -m toy.quality --split <split> --json` output: also print each row's edit ok on the "
                        "items whose edit prompt the model draws from noise and on the others")
    p.add_argument("--compare", type=Path, nargs=2, default=None, metavar=("BEFORE", "AFTER"),
                   help="paired comparison of two --json outputs run on the same items (two settings or checkpoints): "
                        "per row the difference after - before with its 95%% bootstrap interval; nothing is run")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="print the tables of earlier --json outputs (e.g. rows run in separate processes) and "
                        "write their union to --json; nothing is run")
    a = p.parse_args()
    _register_rows()
    if a.list:
        print(list_split(a.split, a.frames))
        return
    rep = report if a.split == "public" else split_report
    if a.drawn:
        drawn = load_drawn(a.drawn, a.split)
        rep = lambda res, title: split_report(res, title, drawn)  # noqa: E731
    if a.compare:
        before, after = (merge_json([f]) for f in a.compare)
        print(f"paired comparison: {a.compare[1]} (after) vs {a.compare[0]} (before)")
        print(paired_table(before, after))
        return
    if a.merge:
        res = merge_json(a.merge)
        print(rep(res, f"toy benchmark ({a.split} split): merged from {', '.join(str(f) for f in a.merge)}"))
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
        return
    if a.warp_parts:
        print(f"warp error inside / outside the edited region, minus the source's own ({a.split} split, clips in "
              f"{a.warp_parts}):")
        print(warp_parts_table(a.warp_parts, a.split, a.frames, parse_methods(a.methods) if a.methods else None))
        return
    if a.rescore:
        boot.boot(threads=a.threads)
        from . import model as tm

        vae = tm.load(a.weights or tm.WEIGHTS)[2]
        res = rescore(a.rescore, a.split, a.frames, parse_methods(a.methods) if a.methods else None, vae=vae)
        print(rep(res, f"toy benchmark ({a.split} split): rescored from {a.rescore}"))
        if a.json:
            a.json.write_text(json.dumps(to_json(res), indent=1))
        return
    boot.boot(threads=a.threads)
    from . import model as tm

    model, clip, vae, info = tm.load(a.weights or tm.WEIGHTS)
    methods = parse_methods(a.methods) if a.methods else None
    items = a.items.split(",") if a.items else None
    if a.kinds:
        from . import scenes

        kinds = a.kinds.split(",")
        items = [s.name for s in scenes.split_set(a.split, a.frames)
                 if item_kind(s) in kinds and (items is None or s.name in items)]
        if not items:
            raise SystemExit(f"no item of kind {a.kinds} in split {a.split!r}")

    def save(res):
        if a.json:
            a.json.write_text(json.dumps(to_json(res), indent=1))

    res = run(model, clip, vae, methods, a.steps, a.cfg, a.frames, items, on_row=save, split=a.split,
              partial=a.split != "public", frames_dir=a.frames_dir)
    print()
    print(rep(res, f"toy benchmark ({a.split} split, {len(next(iter(res.values()))['items'])} items): {a.frames} "
                   f"frames, {a.steps} steps, cfg {a.cfg}, model steps {info['train'].get('steps')}"))
    if a.save_frames:
        _save_strips(res, a.save_frames, a.frames, a.split)


def _save_strips(res: dict, out: Path, frames: int, split: str = "public"):
    import numpy as np
    from PIL import Image

    from . import scenes

    out.mkdir(parents=True, exist_ok=True)
    specs = {s.name: s for s in scenes.split_set(split, frames)}
    for m, r in res.items():
        for name, sc in r["items"].items():
            src = specs[name].clip().frames
            grid = np.concatenate([np.concatenate(list(src), 1), np.concatenate(list(sc["_frames"]), 1)], 0)
            fn = out / f"{name}__{m.replace(' ', '_').replace(',', '').replace('+', 'plus')}.png"
            Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(fn)
    print(f"strips written to {out}")


if __name__ == "__main__":
    main()
