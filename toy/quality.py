"""Measure the toy model's prompt following on HELD-OUT prompts (shape/colour/background combinations never
seen in training), the way a user would generate: CLIPTextEncode -> KSampler -> VAEDecode (ComfyUI's own
node classes), then the toy detector on every decoded image.

    cd <pack root> && python -m toy.quality [--weights PATH] [--per-prompt 8] [--steps 20] [--cfg 5[,12,...]]
                                            [--shape-gap]
    python -m toy.quality --all-prompts --per-class     # every one-object combination, per colour/shape/background
    python -m toy.quality --all-prompts --per-class --backgrounds "blue dots" --per-prompt 32   # one class, more samples
    python -m toy.quality --two-objects 48              # two-object prompts: each named object where its colour is
    python -m toy.quality --split test --per-prompt 16 --json FILE
        # each benchmark item's edit prompt drawn from noise: the model's own share of the item
        # (`python -m toy.benchmark --split test --merge RESULTS --drawn FILE` splits the rows' edit ok by it)

Prints one line per prompt and the totals; --json writes the numbers to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import boot


def generate(model, clip, vae, prompt: str, n: int, seed: int, steps: int, cfg: float,
             sampler: str = "euler", scheduler: str = "normal", negative_text: str = ""):
    """n images [n, H, W, 3] for one prompt through ComfyUI's node classes."""
    import nodes

    pos = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = nodes.CLIPTextEncode().encode(clip, negative_text)[0]
    from .scenes import SIZE

    latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, n)[0]
    out = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent)[0]
    return nodes.VAEDecode().decode(vae, out)[0]


def measure(model, clip, vae, specs, per_prompt: int = 8, steps: int = 20, cfg: float = 5.0, seed: int = 1234,
            sampler: str = "euler", scheduler: str = "normal", verbose: bool = True, background: bool = True) -> dict:
    import numpy as np

    from . import detect as det
    from . import scenes

    rows = []
    tot = {"color": 0, "shape": 0, "both": 0, "background": 0, "n": 0}
    for i, (shape, color, bg) in enumerate(specs):
        prompt = scenes.caption_of([f"a {color} {shape}"], bg)
        imgs = generate(model, clip, vae, prompt, per_prompt, seed + i, steps, cfg, sampler, scheduler).numpy()
        c = s = b = g = 0
        for img in imgs:
            d = det.detect(img)
            c += d.color == color
            s += d.shape == shape
            b += d.color == color and d.shape == shape
            if background:
                g += background_right(img, bg)
        rows.append({"prompt": prompt, "color": c / len(imgs), "shape": s / len(imgs), "both": b / len(imgs),
                     "background": g / len(imgs), "n": len(imgs),
                     "classes": {"colour": color, "shape": shape, "background": bg.caption()}})
        for k, v in (("color", c), ("shape", s), ("both", b), ("background", g)):
            tot[k] += v
        tot["n"] += len(imgs)
        if verbose:
            print(f"{prompt:45s} colour {c}/{len(imgs)} shape {s}/{len(imgs)} both {b}/{len(imgs)} "
                  f"background {g}/{len(imgs)}", flush=True)
    n = max(1, tot["n"])
    return {
        "color_acc": tot["color"] / n,
        "shape_acc": tot["shape"] / n,
        "both_acc": tot["both"] / n,
        "background_acc": tot["background"] / n,
        "samples": tot["n"],
        "prompts": len(specs),
        "rows": rows,
        "settings": {"steps": steps, "cfg": cfg, "sampler": sampler, "scheduler": scheduler, "seed": seed,
                     "per_prompt": per_prompt},
        "chance": {"color": 1 / 4, "shape": 1 / 3},
        "_np": np.__name__,
    }


def two_object_specs(n: int, seed: int = 77) -> list[tuple]:
    """n two-object prompts drawn by the training scenes' own draw (`scenes.random_scene` with two objects: two
    colours allowed on the background, any two shapes, the left object named first);
    [(s1, c1, s2, c2, background)]."""
    import numpy as np

    from . import scenes

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sc = scenes.random_scene(rng, two_object_p=1.0)
        (o1, o2), bg = sc.objects, sc.background
        out.append((o1.shape, o1.color, o2.shape, o2.color, bg))
    return out


def object_region(img, color: str):
    """[H, W] bool: where a bright object of `color` is (its 8x8-block coverage above 0.25), grown by 4 px."""
    import numpy as np

    from . import detect as det
    from . import metrics

    cov = det.block_mean(det.color_coverage(np.asarray(img, np.float32), color)) > 0.25
    return metrics.dilate(cov.repeat(8, 0).repeat(8, 1)[None], 4)[0]


def read_named(img, color: str, others=()):
    """The detector's reading (`detect.Detection`) of the object of `color` in an image that names other objects of
    the colours `others`: read where its colour is (`object_region`), the others' coverage passed as what may be
    drawn over it (`detect.detect`'s `occluders`). The one reading of a named object in a many-object image
    (`oracle_two`, `measure_two`, `drawn_right`)."""
    import numpy as np

    from . import detect as det

    arr = np.asarray(img, np.float32)
    occ = None
    if others:
        occ = np.clip(sum(det.color_coverage(arr, c) for c in others), 0.0, 1.0)
    return det.detect(arr, object_region(arr, color), occluders=occ)


def oracle_two(n: int = 200, seed: int = 5) -> float:
    """Share of objects `measure_two`'s reading gets right on n rendered two-object training scenes passed through
    the toy VAE's 8x8 block means (what a perfect model would draw)."""
    import numpy as np

    from . import detect as det
    from . import scenes

    rng = np.random.default_rng(seed)
    ok = total = 0
    for _ in range(n):
        sc = scenes.random_scene(rng, two_object_p=1.0)
        img, _ = scenes.render(sc)
        img = det.block_mean(img).repeat(8, 0).repeat(8, 1)
        for o in sc.objects:
            d = read_named(img, o.color, [p.color for p in sc.objects if p is not o])
            ok += d.shape == o.shape and d.color == o.color
            total += 1
    return ok / total


def measure_two(model, clip, vae, specs, per_prompt: int = 8, steps: int = 20, cfg: float = 5.0, seed: int = 4321,
                sampler: str = "euler", scheduler: str = "normal", verbose: bool = True) -> dict:
    """Plain generation of two-object prompts ("a red circle and a green square on gray", two different colours):
    per named object, the detector reads the region its colour covers (`object_region`): right colour (the
    object is drawn), right shape, both; per sample: both objects right. The model's own share of the benchmark's
    two-object edits (objects of half size 22-29 px). How often the reading itself is right: `oracle_two`.
    `confusion`: {"asked->read": objects} over the objects whose colour was drawn (a circle read as a square...)."""
    from . import scenes

    tot = {"color": 0, "shape": 0, "both": 0, "objects": 0, "scene": 0, "n": 0}
    by_shape: dict = {}  # shape -> [drawn right, objects]
    confusion: dict = {}  # (asked shape, shape read) -> objects whose colour was drawn
    rows = []
    for i, (s1, c1, s2, c2, bg) in enumerate(specs):
        prompt = scenes.caption_of([f"a {c1} {s1}", f"a {c2} {s2}"], bg)
        imgs = generate(model, clip, vae, prompt, per_prompt, seed + i, steps, cfg, sampler, scheduler).numpy()
        scene_ok = 0
        for img in imgs:
            ok_all = True
            for shape, color in ((s1, c1), (s2, c2)):
                d = read_named(img, color, [c2 if color == c1 else c1])
                c, s = d.color == color, d.shape == shape
                tot["color"] += c
                tot["shape"] += s
                tot["both"] += c and s
                tot["objects"] += 1
                got = by_shape.setdefault(shape, [0, 0])
                got[0] += s
                got[1] += 1
                if c:
                    confusion[(shape, d.shape)] = confusion.get((shape, d.shape), 0) + 1
                ok_all &= bool(c and s)
            scene_ok += ok_all
        tot["scene"] += scene_ok
        tot["n"] += len(imgs)
        rows.append({"prompt": prompt, "scene": scene_ok / len(imgs), "n": len(imgs)})
        if verbose:
            print(f"{prompt:60s} both objects right {scene_ok}/{len(imgs)}", flush=True)
    k = max(1, tot["objects"])
    return {"color_acc": tot["color"] / k, "shape_acc": tot["shape"] / k, "both_acc": tot["both"] / k,
            "scene_acc": tot["scene"] / max(1, tot["n"]), "samples": tot["n"], "prompts": len(specs), "rows": rows,
            "shape_by_class": {k: tuple(v) for k, v in sorted(by_shape.items())},
            "confusion": {f"{a}->{b}": n for (a, b), n in sorted(confusion.items())},
            "settings": {"steps": steps, "cfg": cfg, "sampler": sampler, "scheduler": scheduler, "seed": seed,
                         "per_prompt": per_prompt}}


DRAWN_BAR = 0.875  # an edit prompt the model draws in >= 87.5% of its plain samples (14 of 16): a method should make it too


def edit_prompt_scene(spec) -> tuple[list[tuple[str, str]], object]:
    """What a benchmark item's edit prompt asks the model to draw: [(shape, colour)] per named object, in the
    prompt's order, and the background (a `scenes.Background`)."""
    objs = [(spec.expect_shape, spec.expect_color) if i == spec.target else (m.shape, m.color)
            for i, m in enumerate(spec.motions)]
    return objs, spec.edit_background


def drawn_right(img, objects: list[tuple[str, str]], background) -> bool:
    """Whether one generated image [H, W, 3] (0..1) shows every named (shape, colour) and the background: one
    object read on the whole image (as `measure`: the image's one bright object), two objects each where its colour
    is (as `measure_two`; which side each is on is not checked), the background outside the bright objects grown
    by 8 px (as `measure`). Raises ValueError for two objects of one colour (the reading finds each object by its
    colour; the toy world's captions never name two of one colour)."""
    from . import detect as det

    if len({c for _, c in objects}) < len(objects):
        raise ValueError(f"drawn_right: two objects of one colour {objects}: each is read where its colour is")
    if len(objects) == 1:
        d = det.detect(img)
        ok = d.shape == objects[0][0] and d.color == objects[0][1]
    else:
        ok = True
        for shape, color in objects:
            d = read_named(img, color, [c for _, c in objects if c != color])
            ok &= d.shape == shape and d.color == color
    return ok and background_right(img, background)


def background_right(img, background) -> bool:
    """Whether a generated image [H, W, 3] shows `background` outside its bright objects grown by 8 px."""
    from . import detect as det
    from . import metrics

    fg = det.object_pixels(img)
    fg = metrics.dilate(fg, 8) if fg.any() else fg
    return metrics.detect_background(img, fg) == background


def edit_prompts_drawn(model, clip, vae, specs, per_prompt: int = 16, steps: int = 20, cfg: float = 5.0,
                       seed: int = 1234, sampler: str = "euler", scheduler: str = "normal",
                       verbose: bool = True) -> dict:
    """The model's own share of each benchmark item: plain generation of the item's EDIT prompt (no inversion, no
    source clip: `per_prompt` samples from noise, KSampler `sampler`/`scheduler`) and the share of samples that
    show everything it names (`drawn_right`). An edit whose prompt the model does not draw from noise is beyond
    the model before any method acts. {item name: {"prompt", "kind", "drawn" (0..1), "n"}}."""
    out = {}
    for i, spec in enumerate(specs):
        objects, bg = edit_prompt_scene(spec)
        imgs = generate(model, clip, vae, spec.edit_prompt, per_prompt, seed + i, steps, cfg, sampler,
                        scheduler).numpy()
        ok = sum(drawn_right(img, objects, bg) for img in imgs)
        out[spec.name] = {"prompt": spec.edit_prompt, "kind": spec.kind, "drawn": ok / len(imgs), "n": len(imgs)}
        if verbose:
            print(f"{spec.name:28s} {spec.edit_prompt:60s} drawn right {ok}/{len(imgs)}", flush=True)
    return out


def drawn_summary(drawn: dict) -> str:
    """Per edit kind: the items' mean share drawn right and how many items the model draws in >= `DRAWN_BAR` of
    the samples."""
    kinds: dict = {}
    for r in drawn.values():
        kinds.setdefault(r["kind"], []).append(r["drawn"])
    lines = [f"| edit kind | items | edit prompt drawn right (mean) | items drawn in >= {DRAWN_BAR:.1%} |",
             "|---|---|---|---|"]
    for k, v in kinds.items():
        lines.append(f"| {k} | {len(v)} | {sum(v) / len(v):.0%} | {sum(x >= DRAWN_BAR for x in v)} |")
    v = [r["drawn"] for r in drawn.values()]
    lines.append(f"| all | {len(v)} | {sum(v) / max(1, len(v)):.0%} | {sum(x >= DRAWN_BAR for x in v)} |")
    return "\n".join(lines)


def per_class(rows: list[dict]) -> dict:
    """{"colour"|"shape"|"background": {class: (right, samples)}} from `measure`'s rows: how often the prompt's
    colour (for the colour classes), shape (shape classes) or background (background classes) is drawn right."""
    out: dict = {"colour": {}, "shape": {}, "background": {}}
    what = {"colour": "color", "shape": "shape", "background": "background"}
    for r in rows:
        for axis, cls in r["classes"].items():
            ok, n = out[axis].get(cls, (0, 0))
            out[axis][cls] = (ok + round(r[what[axis]] * r["n"]), n + r["n"])
    return out


def class_table(classes: dict, title: str = "") -> str:
    """A markdown table per axis: class, share drawn right, samples."""
    lines = []
    for axis, d in classes.items():
        lines += [f"| {axis} | " + " | ".join(d) + " |", "|---|" + "---|" * len(d),
                  f"| {title or 'drawn right'} | " + " | ".join(f"{ok / n:.0%} ({ok}/{n})" for ok, n in d.values())
                  + " |", ""]
    return "\n".join(lines)


def shape_word_gap(model, clip, t_indices=(999, 800, 600, 400, 200, 100), n: int = 48, seed: int = 3) -> list[dict]:
    """Does the trained denoiser use the shape word? For fresh single-object training scenes, the v-prediction
    loss with the true caption and with the shape word swapped (circle <-> square, triangle -> circle), at a
    few timesteps, same noise. A positive gap means the shape word helps the prediction."""
    import numpy as np
    import torch

    from . import model as tm
    from . import scenes
    from .train import v_training_pair

    dm, ms = model.model.diffusion_model, model.model.model_sampling
    lf, gain = model.model.latent_format, float(tm.DEFAULT_CONFIG["latent_gain"])
    other = {"circle": "square", "square": "circle", "triangle": "circle"}
    cache: dict = {}

    def enc(text):
        if text not in cache:
            cache[text] = clip.encode_from_tokens(clip.tokenize(text)).float()
        return cache[text]

    rows = []
    for t in t_indices:
        rng = np.random.default_rng(seed)
        losses = np.zeros(2)  # true caption, shape word swapped
        for k in range(n):
            sc = scenes.random_scene(rng, two_object_p=0.0)
            img, _ = scenes.render(sc)
            x0 = lf.process_in(tm.pixels_to_latent(torch.from_numpy(img)[None], gain))
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(k))
            xc, ts, target = v_training_pair(ms, x0, ms.sigmas[t].float().view(1), eps)
            shape = sc.objects[0].shape
            for i, cap in enumerate((sc.caption(), sc.caption().replace(shape, other[shape]))):
                losses[i] += float(((dm(xc, ts, context=enc(cap)) - target) ** 2).mean()) / n
        true_loss, swapped_loss = (float(v) for v in losses)
        rows.append({"t": t, "true_caption": true_loss, "shape_swapped": swapped_loss})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=str, default="5",
                   help="guidance; several comma-separated values give one line (and JSON entry) per value")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train-prompts", action="store_true", help="measure on (a sample of) training prompts instead")
    p.add_argument("--all-prompts", action="store_true",
                   help="measure on every single-object combination (120 prompts: training and held-out)")
    p.add_argument("--backgrounds", default=None, metavar="CAPTIONS",
                   help="with --all-prompts: only the prompts on these backgrounds, comma-separated captions as the "
                        "prompts write them (e.g. \"blue dots,red dots\"): more samples of a class for the same time")
    p.add_argument("--per-class", action="store_true",
                   help="also print, per colour, shape and background, how often the class is drawn right")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--two-objects", type=int, default=0, metavar="N",
                   help="measure instead N two-object prompts drawn as the training scenes draw them (each named "
                        "object read where its colour is, on either side: `object_region`)")
    p.add_argument("--split", default=None,
                   help="measure instead each item of a benchmark split (dev, test, public, fresh<seed>): plain "
                        "generation of its edit prompt, the share of samples that show everything it names; "
                        "--json writes {\"split\", ..., \"items\": {item: ...}} for `python -m toy.benchmark --drawn`")
    p.add_argument("--shape-gap", action="store_true",
                   help="also print the v-loss with the true caption vs the shape word swapped, per timestep")
    a = p.parse_args()
    boot.boot(threads=a.threads, load_nodes=False)
    import torch

    from . import model as tm
    from . import scenes

    if a.backgrounds:
        want = {b.strip() for b in a.backgrounds.split(",") if b.strip()}
        known = {b.caption() for b in scenes.all_backgrounds()}
        if not a.all_prompts or not want or want - known:
            raise SystemExit(f"toy.quality --backgrounds: needs --all-prompts and captions among {sorted(known)}; "
                             f"got {a.backgrounds!r}")
    if a.split:
        try:
            items = scenes.split_set(a.split, 2)
        except ValueError as e:
            raise SystemExit(f"toy.quality --split: {e}") from None
    model, clip, vae, info = tm.load(a.weights or tm.WEIGHTS)
    if a.split:
        t0 = time.time()
        with torch.inference_mode():
            drawn = edit_prompts_drawn(model, clip, vae, items, a.per_prompt, a.steps,
                                       float(a.cfg.split(",")[0]), a.seed, a.sampler, a.scheduler)
        print(drawn_summary(drawn) + f"\n({round(time.time() - t0, 1)} s, model steps {info['train'].get('steps')})")
        if a.json:
            a.json.write_text(json.dumps({"split": a.split, "per_prompt": a.per_prompt, "cfg": a.cfg,
                                          "sampler": a.sampler, "scheduler": a.scheduler,
                                          "model_steps": info["train"].get("steps"), "items": drawn}, indent=1))
        return
    if a.two_objects:
        out = []
        for cfg in [float(c) for c in a.cfg.split(",")]:
            t0 = time.time()
            with torch.inference_mode():
                res = measure_two(model, clip, vae, two_object_specs(a.two_objects), a.per_prompt, a.steps, cfg,
                                  a.seed, a.sampler, a.scheduler)
            res["seconds"] = round(time.time() - t0, 1)
            out.append(res)
            print(f"two-object prompts: {res['prompts']}, samples: {res['samples']}, cfg {cfg:g} | per object: colour "
                  f"{res['color_acc']:.1%} shape {res['shape_acc']:.1%} both {res['both_acc']:.1%} | both objects "
                  f"right {res['scene_acc']:.1%} | {res['seconds']} s", flush=True)
            print("shape drawn right per shape: " + ", ".join(f"{k} {ok / n:.0%} ({ok}/{n})"
                                                             for k, (ok, n) in res["shape_by_class"].items()))
            print("asked -> read (objects whose colour was drawn): " + ", ".join(
                f"{k} {n}" for k, n in res["confusion"].items()))
        if a.json:
            a.json.write_text(json.dumps(out[0] if len(out) == 1 else {"by_cfg": out}, indent=1))
        return
    specs = (scenes.single_specs() if a.all_prompts else scenes.train_specs()[::5] if a.train_prompts
             else scenes.heldout_specs())
    if a.backgrounds:
        specs = [sp for sp in specs if sp[2].caption() in want]
    which = "all" if a.all_prompts else "training" if a.train_prompts else "held-out"
    results = []
    for cfg in [float(c) for c in a.cfg.split(",")]:
        t0 = time.time()
        with torch.inference_mode():
            res = measure(model, clip, vae, specs, a.per_prompt, a.steps, cfg, a.seed, a.sampler, a.scheduler)
        res.pop("_np")
        res["train"] = info["train"]
        res["seconds"] = round(time.time() - t0, 1)
        results.append(res)
        print(f"{which} prompts: {res['prompts']}, samples: {res['samples']}, cfg {cfg:g} | colour {res['color_acc']:.1%} "
              f"shape {res['shape_acc']:.1%} both {res['both_acc']:.1%} background {res['background_acc']:.1%} | "
              f"model steps {info['train'].get('steps')} | {res['seconds']} s", flush=True)
        if a.per_class:
            res["per_class"] = per_class(res["rows"])
            print(class_table(res["per_class"], f"drawn right, {which} prompts, cfg {cfg:g}"), flush=True)
    out = results[0] if len(results) == 1 else {"by_cfg": results}
    if a.shape_gap:
        with torch.inference_mode():
            gap = shape_word_gap(model, clip)
        for r in gap:
            print(f"t={r['t']:4d}: v-loss true caption {r['true_caption']:.4f}, shape word swapped "
                  f"{r['shape_swapped']:.4f} (gap {r['shape_swapped'] - r['true_caption']:+.4f})")
        out["shape_gap"] = gap
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
