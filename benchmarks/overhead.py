"""Cost of the pack's attention control on the full-size SD1.5 UNet (issue 21): UNet seconds per evaluated row
and peak memory of every method against plain sampling, side by side in one run, and a per-layer table at
512x512 sizes (64x64 latent).

    nice -n 10 bash scripts/run.sh benchmarks/overhead.py [--frames 4] [--size 32] [--steps 5] [--repeat 1] [--arch sdxl]

The UNet is ComfyUI's SD15 configuration (comfy.supported_models.SD15 with the unet config ComfyUI detects for
SD1.5 checkpoints, comfy/model_detection.py), built through comfy.model_base.BaseModel / ModelPatcher with random
weights initialised explicitly (tests/zsve_harness.py init_module_), bf16 compute on the CPU, one thread. The
text encoder is a one-layer CLIP of SD1.5's width (768) with the real SD1 tokenizer: conditioning of the right
shape, cheap to encode. Each row runs in its own process (so its peak RSS is its own); the rows are run in
order, `--repeat` times, and plain sampling first and last in every round, so that the noise of a loaded
machine shows in the two plain-sampling rows.

Per row: UNet evaluations of the timed stage (forward calls of the diffusion model) and the rows they
evaluated (batch: frames x conditionings x branches), UNet seconds per row-evaluation relative to plain
sampling (the overhead ratio), peak RSS relative to plain sampling, store bytes. Edit rows time only the
edit stage (the inversion they need runs first in the same process and is not counted); inversion rows time
the inversion. The dispatcher's counters (nodes/_attn_patch.py STATS) show how many attention calls took the
optimized path, how many rows got explicit probabilities and how many calls were answered at the output level.

Per-layer table (`--layers`): one attention call of each layer kind the methods touch, at 512 px sizes
(SD1.5: 64x64 self 320 ch, 32x32 self/cross 640 ch, 16x16 self 1280 ch; 8 heads; cond + uncond rows of
`--frames` frames), through the pack's dispatcher with the processor of each method, against ComfyUI's
optimized attention on the same q/k/v; the previous explicit float32 path (all rows, all heads) for reference.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from _models import SD15_UNET  # benchmarks/_models.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["plain_sampling", "plain_inversion", "inversion_temporal", "inversion_store", "inversion_recompute",
        "fatezero_style", "fatezero_local", "fatezero_style_recompute", "fatezero_local_recompute", "blended_latent",
        "infusion", "videop2p_fast"]
SRC, EDIT, NEG = "a cat walking on the grass", "a dog walking on the grass", ""
CLIP_768 = {"hidden_size": 768, "intermediate_size": 768, "num_attention_heads": 4, "num_hidden_layers": 1,
            "projection_dim": 768}
# --arch sdxl: SDXL's exact layout at a fifth of its width (benchmarks/_models.py SDXL_SMALL: 70 transformer
# blocks, 9 decoder blocks, 64-channel heads), with an SDXL CLIP (clip_l + clip_g, the real tokenizers) whose
# widths give its context (128 + 128 = 256) and pooled output (clip_g's 128)
SDXL_CLIP_L = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": 128}
SDXL_CLIP_G = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": 256}


def _boot():
    sys.path.insert(0, str(ROOT / "tests"))
    importlib.import_module("zsve_boot")  # boots ComfyUI before any comfy import
    import torch

    torch.set_num_threads(1)
    return torch


def build_sd15(torch, dtype):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    from zsve_harness import init_module_

    cfg = comfy.supported_models.SD15(dict(SD15_UNET))
    cfg.set_inference_dtype(dtype, None)
    base = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    init_module_(base.diffusion_model, 0)
    base.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def build_clip():
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    from zsve_harness import init_module_

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(CLIP_768)})
    init_module_(clip.cond_stage_model, 1)
    return clip


def build_sdxl(torch, dtype):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _models import SDXL_SMALL, make_sdxl_model

    # the CLIP below gives a pooled output of clip_g's width (128): the model's `y` takes that width
    return make_sdxl_model(**dict(SDXL_SMALL, pooled_dim=SDXL_CLIP_G["hidden_size"]), dtype=dtype)


def build_sdxl_clip():
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    from zsve_harness import init_module_

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(SDXL_CLIP_L),
                                                "clip_g_model_config": dict(SDXL_CLIP_G)})
    init_module_(clip.cond_stage_model, 1)
    return clip


def _defaults(node_cls) -> dict:
    out = {}
    for i in node_cls.define_schema().inputs:
        d = getattr(i, "default", None)
        if d is not None:
            out[i.id] = d
    return out


class UNetTimer:
    """Forward hooks on the diffusion model (a benchmark's own instrumentation): calls, rows, seconds."""

    def __init__(self, module):
        self.on = False
        self.calls = self.rows = 0
        self.seconds = 0.0
        self._t0 = None
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, mod, args):
        if self.on:
            self._t0 = time.process_time()
            self.rows += int(args[0].shape[0])
            self.calls += 1

    def _post(self, mod, args, out):
        if self.on and self._t0 is not None:
            self.seconds += time.process_time() - self._t0
            self._t0 = None


def child(row: str, frames: int, size: int, steps: int, arch: str = "sd15") -> dict:
    torch = _boot()
    import resource

    import comfy.sample
    import comfy.samplers

    from zsve.nodes import _attn_patch as ap
    from zsve.nodes._comfy import run_inversion
    from zsve.nodes.blend import apply_latent_blend
    from zsve.nodes.fatezero import AttentionBlend, AttentionStore, TemporalSelfAttentionPatch
    from zsve.nodes.infusion import InFusionInject, InFusionSource
    from zsve.nodes.prompts import make_prompt_pair
    from zsve.nodes.videop2p import VideoP2PGuiderNode

    if arch == "sdxl":
        model, clip = build_sdxl(torch, torch.bfloat16), build_sdxl_clip()
    else:
        model, clip = build_sd15(torch, torch.bfloat16), build_clip()
    pair = make_prompt_pair(clip, SRC, EDIT, NEG)
    pos, edit, neg = pair.source.conditioning, pair.edit.conditioning, pair.negative.conditioning
    timer = UNetTimer(model.model.diffusion_model)
    g = torch.Generator().manual_seed(0)
    lat = {"samples": torch.randn(1, 4, size, size, generator=g) + 0.3 * torch.randn(frames, 4, size, size, generator=g)}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store_bytes = 0

    def sample(m, latent, positive, negative, add_noise: bool):
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1)) if add_noise \
            else torch.zeros_like(latent)
        return comfy.sample.sample(m, noise, steps, 7.5, "ddim", "ddim_uniform", positive, negative, latent,
                                   disable_noise=not add_noise, seed=0, disable_pbar=True)

    def temporal(m):
        args = dict(_defaults(TemporalSelfAttentionPatch), mode="middle")
        return TemporalSelfAttentionPatch.execute(m, **args).args[0]

    def invert(m):
        return run_inversion(m, lat, pos, None, steps, 1.0, disable_pbar=True)

    def timed(fn):
        ap.STATS.reset()
        timer.on = True
        try:
            return fn()
        finally:
            timer.on = False

    with torch.inference_mode():
        if row == "plain_sampling":
            timed(lambda: sample(model, lat["samples"], edit, neg, True))
        elif row == "plain_inversion":
            timed(lambda: invert(model))
        elif row == "inversion_temporal":
            timed(lambda: invert(temporal(model)))
        elif row in ("inversion_store", "inversion_recompute"):
            args = dict(_defaults(AttentionStore))
            if row == "inversion_recompute":
                args["source_attention"] = "recompute at edit"
            m = AttentionStore.execute(temporal(model), **args).args[0]
            _, inv = timed(lambda: invert(m))
            store_bytes = inv.records["attention"].nbytes
        elif row.startswith(("fatezero_style", "fatezero_local")):
            base = temporal(model)
            args = dict(_defaults(AttentionStore))
            if row.endswith("_recompute"):  # the source pass's UNet evaluations are counted in the edit stage
                args["source_attention"] = "recompute at edit"
            m = AttentionStore.execute(base, **args).args[0]
            z, inv = invert(m)
            store_bytes = inv.records["attention"].nbytes
            args = _defaults(AttentionBlend)
            if row.startswith("fatezero_local"):
                args["blend_words"] = "cat"
            e = AttentionBlend.execute(base, inv, pair, **args).args[0]
            timed(lambda: sample(e, z["samples"], edit, neg, False))
        elif row == "blended_latent":
            z, inv = invert(model)
            e, _, _ = apply_latent_blend(model, inv, "cross-attention", prompts=pair, words="dog")
            timed(lambda: sample(e, z["samples"], edit, neg, False))
        elif row == "infusion":
            base = temporal(model)
            m = InFusionSource.execute(base, **_defaults(InFusionSource)).args[0]
            z, inv = invert(m)
            store_bytes = inv.records["infusion"].nbytes if "infusion" in inv.records else inv.nbytes
            args = dict(_defaults(InFusionInject), concepts="cat->dog")
            e = InFusionInject.execute(base, inv, pair, **args).args[0]
            timed(lambda: sample(e, z["samples"], edit, neg, False))
        elif row == "videop2p_fast":
            base = temporal(model)
            args = _defaults(VideoP2PGuiderNode)
            args.update(_defaults(VideoP2PGuiderNode))
            z, inv = invert(base)
            guider = VideoP2PGuiderNode.execute(base, inv, pair, **{k: v for k, v in args.items()
                                                                     if k not in ("cfg",)}, cfg=7.5).args[0]
            ms = guider.model_patcher.get_model_object("model_sampling")
            sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps).cpu()
            x = z["samples"]
            timed(lambda: guider.sample(torch.zeros_like(x), x, comfy.samplers.sampler_object("ddim"), sigmas,
                                        disable_pbar=True, seed=0))
        else:
            raise ValueError(row)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = ap.STATS
    return {"row": row, "evals": timer.calls, "rows": timer.rows, "unet_s": timer.seconds,
            "s_per_row": timer.seconds / max(1, timer.rows), "peak_rss_mib": peak / 1024,
            "boot_rss_mib": rss0 / 1024, "store_bytes": int(store_bytes),
            "plain_calls": s.plain_calls, "output_calls": s.output_calls, "explicit_calls": s.explicit_calls,
            "explicit_rows": s.explicit_rows, "optimized_rows": s.optimized_rows, "reader_calls": s.reader_calls,
            "max_chunk_mib": s.max_chunk_bytes / 2**20}


# --- per-layer table ------------------------------------------------------------------------------------

LAYERS = [  # (name, kind, hw, channels) at 512x512, SD1.5
    ("64x64 self (320 ch)", "self", 64, 320), ("32x32 self (640 ch)", "self", 32, 640),
    ("32x32 cross (640 ch)", "cross", 32, 640), ("16x16 self (1280 ch)", "self", 16, 1280),
]


def _explicit_f32(q, k, v, heads):
    from zsve.attention.attn import apply_probs, attention_probs

    return apply_probs(attention_probs(q, k, heads), v, heads)


def timeit(fn, reps):
    fn()  # warm-up
    t0 = time.process_time()  # CPU seconds of this (one-thread) process: robust to a loaded machine
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


def layers_child(frames: int, reps: int) -> list[dict]:
    torch = _boot()
    from comfy.ldm.modules.attention import optimized_attention

    from zsve.attention.fatezero import FateZeroController, FusionPlan
    from zsve.attention.store import AttentionRecorder, AttentionStore, LayerInfo, StoreConfig
    from zsve.nodes import _attn_patch as ap

    dt = torch.bfloat16
    heads, t, sigma = 8, 500, 1.0

    class _MS:  # the integer timestep of the call's sigma (ComfyUI's model_sampling.timestep)
        def timestep(self, s):
            return torch.full((1,), float(t))

    g = torch.Generator().manual_seed(0)
    out = []
    for name, kind, side, ch in LAYERS:
        nq = side * side
        nk = nq if kind == "self" else 77
        b = 2 * frames
        q = torch.randn(b, nq, ch, generator=g).to(dt)
        k = torch.randn(b, nk, ch, generator=g).to(dt)
        v = torch.randn(b, nk, ch, generator=g).to(dt)
        extra = {"n_heads": heads, "activations_shape": [b, ch, side, side], "original_shape": [frames, 4, 64, 64],
                 "cond_or_uncond": [1, 0], "sigmas": torch.tensor([sigma]),
                 "sample_sigmas": torch.tensor([sigma, 0.0])}
        store = AttentionStore(config=StoreConfig(), frames=frames, latent_hw=(64, 64), num_steps=1)
        lay = "output_7_0"
        store.layers[lay] = LayerInfo(hw=(side, side), heads=heads, channels=ch, factor=64 // side)
        if kind == "self":
            store.add(t, lay, "self", {"q": q[frames:].half(), "k": k[frames:frames + 1].half()})
        store.add(t, lay, "cross", {"p": torch.rand(frames, heads, side * side, 77, generator=g).half()})
        alphas = torch.ones(2, 77)
        plan_style = FusionPlan(num_steps=1, timestep_to_step={t: 0}, cross_mode="none", cross_alphas=alphas,
                                self_steps=(0, 1))
        plan_local = FusionPlan(num_steps=1, timestep_to_step={t: 0}, cross_mode="none", cross_alphas=alphas,
                                self_steps=(0, 1), blend_indices=[2], mask_factor=64 // side)
        procs = {"FateZero style (no blend)": FateZeroController(store, plan_style),
                 "FateZero local (blend mask)": FateZeroController(store, plan_local)}
        if kind == "self":
            procs["Attention Store recorder (inversion)"] = AttentionRecorder(StoreConfig(min_factor=1))
        disp = ap._Dispatcher(kind, ("output", 7, 0), _MS())

        with torch.inference_mode():
            base = timeit(partial(optimized_attention, q, k, v, heads), reps)
            if b * heads * nq * nk * 4 <= 2**31:  # the previous path's float32 matrix (skipped above 2 GiB)
                old = timeit(partial(_explicit_f32, q, k, v, heads), reps)
                out.append({"layer": name, "path": "previous explicit path (float32, all rows)", "s": old,
                            "ratio": old / base, "opt_s": base})
            for pname, proc in procs.items():
                if pname.startswith("Attention Store"):
                    e = dict(extra, cond_or_uncond=[0], **{ap.RECORDERS_KEY: {"r": proc}})
                    qq, kk, vv = q[:frames], k[:frames], v[:frames]
                    ref = timeit(partial(optimized_attention, qq, kk, vv, heads), reps)
                    s = timeit(partial(disp, qq, kk, vv, e), reps)
                    out.append({"layer": name, "path": pname, "s": s, "ratio": s / ref, "opt_s": ref})
                    continue
                if isinstance(proc, FateZeroController) and kind == "cross" and "local" in pname:
                    continue
                e = dict(extra, **{ap.PROCESSORS_KEY: [proc]})
                ap.STATS.reset()
                s = timeit(partial(disp, q, k, v, e), reps)
                how = "output level" if ap.STATS.output_calls else \
                    f"explicit ({ap.STATS.max_chunk_bytes / 2**20:.0f} MiB chunk)"
                out.append({"layer": name, "path": f"{pname}: {how}", "s": s, "ratio": s / base, "opt_s": base})
    return out


def _run_child(args: list[str]) -> dict | list | None:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith(("{", "["))]
    if not line:
        print(f"child {args} failed: {res.stderr.strip().splitlines()[-5:]}", file=sys.stderr)
        return None
    return json.loads(line[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=32, help="latent side (32 = 256x256 pixels)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--rows", nargs="+", default=ROWS)
    p.add_argument("--layers", action="store_true", help="also the per-layer table at 512 px sizes")
    p.add_argument("--layer-reps", type=int, default=3)
    p.add_argument("--child", default="")
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15",
                   help="sd15: the full-size SD1.5 UNet; sdxl: SDXL's layout at a fifth of its width (SDXL_SMALL)")
    a = p.parse_args()
    if a.child == "layers":
        print(json.dumps(layers_child(a.frames, a.layer_reps)))
        return
    if a.child:
        print(json.dumps(child(a.child, a.frames, a.size, a.steps, a.arch)))
        return
    unet = ("full-size SD1.5 UNet" if a.arch == "sd15" else
            "SDXL-layout UNet at a fifth of SDXL's width (benchmarks/_models.py SDXL_SMALL)")
    print(f"{unet} (random weights), bf16 on CPU, 1 thread; {a.frames} frames, latent {a.size}x{a.size}, "
          f"{a.steps} steps, ddim, cfg 7.5")
    results = []
    for r in range(a.repeat):
        order = ["plain_sampling"] + [x for x in a.rows if x != "plain_sampling"] + ["plain_sampling"]
        for row in order:
            res = _run_child(["--child", row, "--frames", str(a.frames), "--size", str(a.size), "--steps", str(a.steps),
                              "--arch", a.arch])
            if res is not None:
                res["round"] = r
                results.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
    plain = [x for x in results if x["row"] == "plain_sampling"]
    if not plain:
        print("plain sampling failed: no reference")
        return
    ref_s = sum(x["s_per_row"] for x in plain) / len(plain)
    ref_rss = sum(x["peak_rss_mib"] for x in plain) / len(plain)
    spread = ", ".join(f"{x['s_per_row']:.3f}" for x in plain)
    print(f"plain sampling rows: {spread} s per row-evaluation (spread = noise of the machine)")
    ref_stage = sum(x["unet_s"] for x in plain) / len(plain)
    print("| row | round | UNet evals (rows) | s per row-eval | overhead ratio | stage UNet s (vs plain sampling) | "
          "peak RSS MiB | RSS ratio | store MiB | attention calls: optimized / output-level / explicit (rows) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in results:
        print(f"| {x['row']} | {x['round']} | {x['evals']} ({x['rows']}) | {x['s_per_row']:.3f} | "
              f"{x['s_per_row'] / ref_s:.2f}x | {x['unet_s']:.1f} ({x['unet_s'] / ref_stage:.2f}x) | "
              f"{x['peak_rss_mib']:.0f} | {x['peak_rss_mib'] / ref_rss:.2f}x | "
              f"{x['store_bytes'] / 2**20:.1f} | {x['plain_calls']} / {x['output_calls']} / {x['explicit_calls']} "
              f"({x['explicit_rows']}) |")
    if a.layers:
        rows = _run_child(["--child", "layers", "--frames", str(a.frames), "--layer-reps", str(a.layer_reps)])
        if rows:
            print(f"\nper layer at 512x512 sizes, {a.frames} frames x (cond + uncond), bf16, 1 thread:")
            print("| layer | path | s per call | optimized s | ratio |")
            print("|---|---|---|---|---|")
            for x in rows:
                print(f"| {x['layer']} | {x['path']} | {x['s']:.3f} | {x['opt_s']:.3f} | {x['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
