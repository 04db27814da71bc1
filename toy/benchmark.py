"""The toy benchmark: every registered method edits every clip of the fixed benchmark set
(toy/scenes.py `benchmark_set`), and one table of metrics (toy/metrics.py) is printed.

    cd <pack root> && python -m toy.benchmark [--methods a,b] [--steps 20] [--cfg 5] [--frames 8] [--json out.json]

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
    ("ssim_bg", "SSIM bg", "{:.3f}"),
    ("leak", "leak", "{:.1%}"),
    ("warp_err", "warp err", "{:.4f}"),
    ("rel_change", "rel chg", "{:.2f}"),
]


def run(model, clip, vae, methods: list[str] | None = None, steps: int = 20, cfg: float = 5.0, frames: int = 8,
        items: list[str] | None = None, verbose: bool = True, on_row: Callable | None = None) -> dict:
    """Run the methods on the benchmark set. Returns {method: {"items": {name: scores}, "mean": scores}}.
    `on_row(results)` is called after each row (the CLI saves --json there, so a long run keeps its rows)."""
    import numpy as np
    import torch

    from . import metrics, scenes

    specs = [s for s in scenes.benchmark_set(frames) if items is None or s.name in items]
    names = methods or list(METHODS)
    results = {}
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
            edited = edited.detach().cpu().float().numpy()
            per[es.name] = metrics.toy_scores(edited, clip_, es)
            per[es.name]["_frames"] = edited
            if verbose:
                sc = per[es.name]
                print(f"  {mname} | {es.name}: " + ", ".join(f"{k} {sc[k]:.3g}" for k, _, _ in COLUMNS), flush=True)
        mean = {}
        for k, _, _ in COLUMNS:
            vals = [per[n][k] for n in per if not (isinstance(per[n][k], float) and math.isnan(per[n][k]))]
            finite = [v for v in vals if math.isfinite(v)]
            mean[k] = float(np.mean(finite)) if finite else (float("inf") if vals else float("nan"))
        results[mname] = {"items": per, "mean": mean, "seconds": time.time() - t0}
        if on_row is not None:
            on_row(results)
    return results


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
        cells = [_cell(r["mean"][k], fmt) for k, _, fmt in COLUMNS]
        lines.append(f"| {label(m)} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def local_items(results: dict) -> list[str]:
    """The benchmark items that are local edits (one object changes, the rest must stay)."""
    from . import scenes

    kinds = {s.name: s.kind for s in scenes.benchmark_set()}
    names = next(iter(results.values()))["items"] if results else {}
    return [n for n in names if kinds.get(n) != "background"]


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


def merge_json(paths: list[Path]) -> dict:
    """The union of several --json outputs (a later file's row replaces an earlier one of the same label), rows in
    the order they are registered (rows no longer registered last), whatever the order of the runs."""
    res: dict = {}
    for f in paths:
        res.update(json.loads(Path(f).read_text()))
    rank = {m: i for i, m in enumerate(METHODS)}
    return dict(sorted(res.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _register_rows():
    for mod in METHOD_MODULES:
        importlib.import_module("." + mod.split(".", 1)[1] if mod.startswith("toy.") else mod, __package__)
    if __name__ == "__main__":  # run as `python -m toy.benchmark`: method modules registered into toy.benchmark
        METHODS.update(importlib.import_module(".benchmark", __package__).METHODS)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--methods", default=None,
                   help="comma-separated row labels (labels containing a comma are matched whole; default: all)")
    p.add_argument("--items", default=None, help="comma-separated benchmark item names (default: all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--save-frames", type=Path, default=None, help="write source|edit strips as PNGs here")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="print the tables of earlier --json outputs (e.g. rows run in separate processes) and "
                        "write their union to --json; nothing is run")
    a = p.parse_args()
    _register_rows()
    if a.merge:
        res = merge_json(a.merge)
        print(report(res, f"toy benchmark: merged from {', '.join(str(f) for f in a.merge)}"))
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
        return
    boot.boot(threads=a.threads)
    from . import model as tm

    model, clip, vae, info = tm.load(a.weights or tm.WEIGHTS)
    methods = parse_methods(a.methods) if a.methods else None
    items = a.items.split(",") if a.items else None

    def save(res):
        if a.json:
            a.json.write_text(json.dumps(to_json(res), indent=1))

    res = run(model, clip, vae, methods, a.steps, a.cfg, a.frames, items, on_row=save)
    print()
    print(report(res, f"toy benchmark: {a.frames} frames, {a.steps} steps, cfg {a.cfg}, "
                      f"model steps {info['train'].get('steps')}"))
    if a.save_frames:
        _save_strips(res, a.save_frames, a.frames)


def _save_strips(res: dict, out: Path, frames: int):
    import numpy as np
    from PIL import Image

    from . import scenes

    out.mkdir(parents=True, exist_ok=True)
    specs = {s.name: s for s in scenes.benchmark_set(frames)}
    for m, r in res.items():
        for name, sc in r["items"].items():
            src = specs[name].clip().frames
            grid = np.concatenate([np.concatenate(list(src), 1), np.concatenate(list(sc["_frames"]), 1)], 0)
            fn = out / f"{name}__{m.replace(' ', '_').replace(',', '').replace('+', 'plus')}.png"
            Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(fn)
    print(f"strips written to {out}")


if __name__ == "__main__":
    main()
