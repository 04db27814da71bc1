"""Peak memory of inversion + reconstruction for long clips with frame context windows (tiny model, CPU).

Each frame count runs in a fresh process so the peak resident set size (ru_maxrss) belongs to that run:

    bash scripts/run.sh benchmarks/long_video_memory.py [--frames 16 32 64] [--window 8] [--steps 10]

Prints one row per frame count: frames, with/without context windows, peak RSS (MiB), trajectory bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(frames: int, window: int, steps: int, size: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import importlib
    import resource

    importlib.import_module("zsve_boot")  # boots ComfyUI before any comfy import
    import torch

    from zsve_harness import encode_text, make_tiny_clip, make_tiny_model

    comfy_sample = importlib.import_module("comfy.sample")
    nodes = importlib.import_module("nodes")
    glue = importlib.import_module("zsve.nodes._comfy")

    model, clip = make_tiny_model(0), make_tiny_clip(0)
    if window:
        model = nodes.NODE_CLASS_MAPPINGS["VideoContextWindows"].execute(
            model, context_length=window, context_overlap=window // 4, context_schedule="standard_static",
            context_stride=1, closed_loop=False, fuse_method="pyramid").args[0]
    pos, neg = encode_text(clip, "a red circle on blue stripes"), encode_text(clip, "")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lat = {"samples": torch.randn(frames, 4, size, size, generator=torch.Generator().manual_seed(0))}
    z, inv = glue.run_inversion(model, lat, pos, None, steps, 1.0, disable_pbar=True)
    comfy_sample.sample(model, torch.zeros_like(z["samples"]), steps, 1.0, "ddim", "ddim_uniform", pos, neg,
                        z["samples"], disable_noise=True, seed=0, disable_pbar=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"frames": frames, "window": window, "peak_rss_mib": peak / 1024, "peak_over_boot_mib": (peak - base) / 1024,
            "trajectory_mib": inv.nbytes / 2**20}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=16, help="latent side (16 = 128x128 pixels)")
    p.add_argument("--child", action="store_true")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.frames[0], a.window, a.steps, a.size)))
        return
    print(f"| frames | context window | peak RSS MiB | over boot MiB | trajectory MiB |  (latent {a.size}x{a.size}, "
          f"{a.steps} steps)")
    print("|---|---|---|---|---|")
    for f in a.frames:
        for w in (0, a.window):
            out = subprocess.run([sys.executable, __file__, "--child", "--frames", str(f), "--window", str(w),
                                  "--steps", str(a.steps), "--size", str(a.size)], capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if not line:
                print(f"| {f} | {w or 'none'} | failed: {out.stderr.strip().splitlines()[-1:]} | | |")
                continue
            r = json.loads(line[-1])
            print(f"| {f} | {w or 'none'} | {r['peak_rss_mib']:.0f} | {r['peak_over_boot_mib']:.0f} | "
                  f"{r['trajectory_mib']:.2f} |")


if __name__ == "__main__":
    main()
