"""The attention store in RAM vs spilled to disk (issue 21): inversion and FateZero edit time, peak RSS, store
bytes, side by side in one run, each row in a fresh process (tiny SD1.5-architecture model, CPU, one thread):

    nice -n 10 bash scripts/run.sh benchmarks/store_spill.py [--frames 16] [--size 32] [--steps 10] [--repeat 2]

Rows alternate RAM / spill `--repeat` times so the spread of each shows the noise. The store is recorded through
Attention Store (record_window 1.0, skip_full_res off, Temporal Self-Attention "middle") with no budget (RAM) or
a budget of 1 byte and over_budget "spill to disk" (every step to disk); the edit is Attention Blend (refine,
FateZero's windows 0.8/0.8, blend words) sampled with KSamplerAdvanced-equivalent ddim, cfg 7.5. Prints per row:
inversion and edit seconds, peak RSS over the process's RSS before the inversion (MiB), the store's size, what
of it is in RAM and on disk, the seconds spent writing the files (inversion) and reading them (edit: wall time of
the safetensors reads, less disturbed by a shared machine than the totals), the tensors read during the edit, and whether the edit equals the first row's
bit for bit. The summary line compares the fastest (least disturbed) run of each. Then, in one process, the edit
with the same store spilled and loaded into RAM, alternating `--repeat` times: separate processes on a shared
machine differ by more than the spill costs, this row compares like with like.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = "a red circle on blue stripes"
EDIT = "a red square on blue stripes"


def _setup(frames: int, size: int, budget: float, over: str):
    """In a benchmark process: ComfyUI booted, one thread, the tiny model with Temporal Self-Attention "middle", its
    Attention Store (record_window 1.0, skip_full_res off, the given budget), the prompts' conditioning and the
    frames' latent. Returns a namespace of what the rows use."""
    sys.path.insert(0, str(ROOT / "tests"))
    import importlib
    from types import SimpleNamespace

    importlib.import_module("zsve_boot")  # boots ComfyUI before any comfy import
    import torch

    torch.set_num_threads(1)
    from zsve_harness import encode_text, make_tiny_clip, make_tiny_model, prompt_pair

    fz = importlib.import_module("zsve.nodes.fatezero")
    model, clip = make_tiny_model(0), make_tiny_clip(0)
    model = fz.TemporalSelfAttentionPatch.execute(model, mode="middle", include_own_frame=False,
                                                  min_channels=0).result[0]
    store_model = fz.AttentionStore.execute(model, record_window=1.0, skip_full_res=False, memory_budget_gb=budget,
                                            over_budget=over).result[0]
    g = torch.Generator().manual_seed(0)
    lat = {"samples": torch.randn(1, 4, size, size, generator=g) + 0.3 * torch.randn(frames, 4, size, size, generator=g)}
    return SimpleNamespace(
        torch=torch, fz=fz, model=model, clip=clip, store_model=store_model, latent=lat,
        pos=encode_text(clip, SRC), epos=encode_text(clip, EDIT), neg=encode_text(clip, ""),
        pair=prompt_pair(clip, SRC, EDIT), glue=importlib.import_module("zsve.nodes._comfy"),
        comfy_sample=importlib.import_module("comfy.sample"))


def _blend(b, inv):
    """Attention Blend as every row wires it: refine, FateZero's windows 0.8/0.8, blend words "circle"."""
    return b.fz.AttentionBlend.execute(b.model, inv, b.pair, mode="refine", cross_replace=0.8, cross_replace_words="",
                                       self_replace_start=0.0, self_replace_end=0.8, reweight="", blend_words="circle",
                                       blend_threshold=0.3, only_cond=True).result[0]


def _edit(b, blend, z, steps: int):
    return b.comfy_sample.sample(blend, b.torch.zeros_like(z["samples"]), steps, 7.5, "ddim", "ddim_uniform", b.epos,
                                 b.neg, z["samples"], disable_noise=True, seed=0, disable_pbar=True)


def child(mode: str, frames: int, size: int, steps: int) -> dict:
    import resource
    import time

    budget, over = (0.0, "refuse") if mode == "ram" else (1e-9, "spill to disk")
    b = _setup(frames, size, budget, over)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    z, inv = b.glue.run_inversion(b.store_model, b.latent, b.pos, None, steps, 1.0, disable_pbar=True)
    t_inv = time.perf_counter() - t0
    st = inv.records["attention"]
    blend = _blend(b, inv)
    t0 = time.perf_counter()
    out = _edit(b, blend, z, steps)
    t_edit = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "inversion_s": t_inv, "edit_s": t_edit, "peak_over_start_mib": (peak - base) / 1024,
            "store_mib": st.nbytes / 2**20, "ram_mib": st.ram_nbytes / 2**20, "disk_mib": st.disk_nbytes / 2**20,
            "per_frame_step_mib": st.bytes_per_frame_step / 2**20,
            "tensors_read": getattr(st.entries, "loads", 0),
            "write_s": getattr(st.entries, "write_seconds", 0.0), "read_s": getattr(st.entries, "read_seconds", 0.0),
            "edit_sha": hashlib.sha256(out.float().contiguous().numpy().tobytes()).hexdigest()[:16]}


def timing(frames: int, size: int, steps: int, repeat: int) -> dict:
    """One process: a spilled inversion, and the same store loaded into RAM (a RAM AttentionStore with the same
    tensors); the edit with each, alternating `repeat` times (the same process, the same load on the machine)."""
    import dataclasses
    import time

    b = _setup(frames, size, 1e-9, "spill to disk")
    z, spilled = b.glue.run_inversion(b.store_model, b.latent, b.pos, None, steps, 1.0, disable_pbar=True)
    st = spilled.records["attention"]
    assert st.spilled
    ram = dataclasses.replace(st, entries={k: {n: v.clone() for n, v in e.items()} for k, e in st.entries.items()},
                              spill_dir=None)
    in_ram = dataclasses.replace(spilled, records={"attention": ram})
    times: dict = {"ram": [], "spill": []}
    outs = {}
    for _ in range(repeat):
        for mode, inv in (("ram", in_ram), ("spill", spilled)):
            blend = _blend(b, inv)
            t0 = time.perf_counter()
            outs[mode] = _edit(b, blend, z, steps)
            times[mode].append(time.perf_counter() - t0)
    return {"times": times, "equal": bool(b.torch.equal(outs["ram"], outs["spill"]))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="latent side (32 = 256x256 pixels)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--child", default="")
    a = p.parse_args()
    if a.child == "timing":
        print(json.dumps(timing(a.frames, a.size, a.steps, a.repeat)))
        return
    if a.child:
        print(json.dumps(child(a.child, a.frames, a.size, a.steps)))
        return
    print(f"tiny SD1.5-architecture model, {a.frames} frames, latent {a.size}x{a.size}, {a.steps} steps, CPU, 1 thread")
    print("| store | inversion s | edit s | peak RSS over start MiB | store MiB (per frame per step) | in RAM MiB | "
          "on disk MiB | writing / reading s | tensors read from disk | edit = first row |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, first = [], None
    for _ in range(a.repeat):
        for mode in ("ram", "spill"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--frames", str(a.frames), "--size",
                                  str(a.size), "--steps", str(a.steps)], capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if not line:
                print(f"| {mode} | failed: {out.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(line[-1])
            first = first or r["edit_sha"]
            rows.append(r)
            print(f"| {mode} | {r['inversion_s']:.2f} | {r['edit_s']:.2f} | {r['peak_over_start_mib']:.0f} | "
                  f"{r['store_mib']:.1f} ({r['per_frame_step_mib']:.2f}) | {r['ram_mib']:.1f} | {r['disk_mib']:.1f} | "
                  f"{r['write_s']:.2f} / {r['read_s']:.2f} | {r['tensors_read']} | {r['edit_sha'] == first} |", flush=True)

    def best(mode, k):  # the least disturbed run of each (a shared machine only ever adds time)
        v = [r[k] for r in rows if r["mode"] == mode]
        return min(v) if v else float("nan")

    print(f"one process per row, spill / RAM, best of {a.repeat} each: inversion "
          f"{best('spill', 'inversion_s') / best('ram', 'inversion_s'):.2f}x, edit "
          f"{best('spill', 'edit_s') / best('ram', 'edit_s'):.2f}x, peak RSS over start "
          f"{best('spill', 'peak_over_start_mib') / best('ram', 'peak_over_start_mib'):.2f}x")
    out = subprocess.run([sys.executable, __file__, "--child", "timing", "--frames", str(a.frames), "--size",
                          str(a.size), "--steps", str(a.steps), "--repeat", str(a.repeat)], capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not line:
        print(f"edit timing in one process failed: {out.stderr.strip().splitlines()[-1:]}")
        return
    r = json.loads(line[-1])
    t = r["times"]
    print(f"edit in one process, the same store spilled and loaded into RAM, alternating: RAM "
          f"{' '.join(f'{x:.2f}' for x in t['ram'])} s, spilled {' '.join(f'{x:.2f}' for x in t['spill'])} s; "
          f"spill / RAM best {min(t['spill']) / min(t['ram']):.2f}x, median "
          f"{sorted(t['spill'])[len(t['spill']) // 2] / sorted(t['ram'])[len(t['ram']) // 2]:.2f}x; edits equal: "
          f"{r['equal']}")


if __name__ == "__main__":
    main()
