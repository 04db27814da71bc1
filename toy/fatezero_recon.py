"""FateZero's founding effect on the toy model: DDIM-invert a clip with its source prompt, then sample it
back with the SAME prompt at guidance 7.5 — plainly (classifier-free guidance drifts away from the
inversion path), and with AttentionBlend replacing every step's self- and cross-attention by the
inversion's (the maps recorded while inverting). Prints the frame PSNR of both against the source.

    cd <pack root> && python -m toy.fatezero_recon [--clips 5] [--frames 4] [--steps 20] [--cfg 7.5]

Both runs use the same Temporal Self-Attention (middle frame, as FateZero) on the inversion and the edit.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from . import boot


def psnr(a, b) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def measure(model, clip, vae, clips: int = 5, frames: int = 4, steps: int = 20, cfg: float = 7.5,
            verbose: bool = True, only_cond: bool = True) -> dict:
    import torch

    from . import scenes
    from .benchmark import BenchSpec, _pack, decode, encode_frames, encode_text, invert, prompt_pair, sample_from

    fz = _pack().nodes.fatezero
    m = fz.TemporalSelfAttentionPatch.execute(model, mode="middle", include_own_frame=False,
                                              min_channels=0).result[0]
    store_model = fz.AttentionStore.execute(m, record_window=1.0, skip_full_res=False,
                                            memory_budget_gb=0.0).result[0]
    rows = []
    for e in scenes.benchmark_set(frames)[:clips]:
        c = scenes.render_clip(e.motions, e.background, frames)
        src = torch.from_numpy(c.frames)
        spec = replace(BenchSpec(edit=e, clip=c), steps=steps, cfg=cfg)
        pos, neg = encode_text(clip, c.prompt), encode_text(clip, "")
        z_T, inv = invert(store_model, encode_frames(vae, src), pos, spec)
        plain = decode(vae, sample_from(m, z_T, pos, neg, spec))
        blend = fz.AttentionBlend.execute(m, inv, prompt_pair(clip, c.prompt, c.prompt), mode="replace",
                                          cross_replace=1.0, cross_replace_words="", self_replace_start=0.0,
                                          self_replace_end=1.0, reweight="", blend_words="", blend_threshold=0.3,
                                          only_cond=only_cond).result[0]
        fused = decode(vae, sample_from(blend, z_T, pos, neg, spec))
        row = {"clip": e.name, "prompt": c.prompt, "plain_psnr": psnr(plain, src), "fused_psnr": psnr(fused, src)}
        rows.append(row)
        if verbose:
            print(f"{e.name:20s} plain {row['plain_psnr']:.2f} dB  fused {row['fused_psnr']:.2f} dB", flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("plain_psnr", "fused_psnr")}
    return {"rows": rows, **mean, "settings": {"clips": clips, "frames": frames, "steps": steps, "cfg": cfg}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--clips", type=int, default=5)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--all-rows", action="store_true", help="control the unconditional rows too (only_cond off)")
    a = p.parse_args()
    boot.boot(threads=a.threads)
    import torch

    from . import model as tm

    with torch.inference_mode():
        model, clip, vae, info = tm.load(a.weights or tm.WEIGHTS)
        res = measure(model, clip, vae, a.clips, a.frames, a.steps, a.cfg, only_cond=not a.all_rows)
    print(f"mean frame PSNR vs source at cfg {a.cfg:g}: plain DDIM {res['plain_psnr']:.2f} dB, FateZero full "
          f"attention replacement {res['fused_psnr']:.2f} dB | model steps {info['train'].get('steps')}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
