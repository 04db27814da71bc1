"""GPU check for newer ComfyUI versions: the Video-P2P workflow (Null-Text Optimize's backward pass included)
run by ComfyUI's own server on a full-size SD1.5-architecture checkpoint, with dynamic VRAM where that ComfyUI
offers it. UNTESTED ON A GPU so far: no GPU has been available to the project when it was written. Its CPU
smoke mode has been run with ComfyUI 0.8.0 (`--cpu --frames 2 --size 64 --steps 2 --inner-steps 1`: the
workflow succeeded, 264 s on 2 shared cores; 0.8.0 has no dynamic VRAM).

Why a server run: ComfyUI's main.py decides the model patcher (newer versions swap in a dynamic-VRAM patcher
on NVIDIA GPUs) and the memory settings; only a checkpoint loaded through ComfyUI's own loader gets them. So
the check
  1. writes a random-weight checkpoint with the full SD1.5 architecture (ComfyUI's loader detects it as SD1.5)
     and a short moving-square clip into a temporary base directory, links this pack into its custom_nodes/,
     and converts the shipped workflow `workflows/videop2p_word_swap.json` to an API
     prompt on that checkpoint (fewer steps; done in a child process that imports ComfyUI on the CPU);
  2. starts ComfyUI's main.py on a free loopback port with that base directory (the UI is not served:
     --front-end-root points at an empty folder), with --enable-dynamic-vram where its cli_args offer it;
  3. queues the prompt, waits for its history entry, and reports: success or the node error, the seconds,
     the device and VRAM from /system_stats, and the server's log lines about dynamic VRAM.

Usage (on the GPU machine, with a Python that has a CUDA torch and the ComfyUI's requirements):

    python benchmarks/gpu_check.py --comfyui /path/to/ComfyUI [--frames 8] [--size 64] [--steps 10]
    python benchmarks/gpu_check.py --comfyui ~/comfy/ComfyUI-0.8 --cpu --frames 2 --size 32 --steps 2   # smoke

Prints one JSON object (also written to --out) and exits 0 when the workflow succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from _models import SD15_UNET  # benchmarks/_models.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "videop2p_word_swap.json"
CKPT_NAME = "zsve_random_sd15.safetensors"

SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


# --- 1. preparation (child process: ComfyUI imported on the CPU) ------------------------------------------

def prepare(base: Path, frames: int, size: int, steps: int, inner_steps: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import importlib

    importlib.import_module("zsve_boot")  # boots ComfyUI (CPU) and loads the pack
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from zsve_harness import init_module_, moving_square_frames, write_video
    from zsve_workflows import load_ui, ui_to_api

    ckpt = base / "models" / "checkpoints" / CKPT_NAME
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        cfg = comfy.supported_models.SD15(dict(SD15_UNET))
        cfg.set_inference_dtype(torch.float16, None)
        model = comfy.model_patcher.ModelPatcher(cfg.get_model({}, "model.diffusion_model."),
                                                 load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        unet = model.model.diffusion_model
        init_module_(unet, 0, std=0.02)
        with torch.no_grad():  # residual branches start small, as in SD, so that activations stay finite
            for name, mod in unet.named_modules():
                if name.endswith("out_layers.3") or name.endswith("proj_out") or name == "out.2":
                    for w in mod.parameters():
                        w.mul_(0.1)
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                    comfy.sd1_clip.SD1ClipModel))
        init_module_(clip.cond_stage_model, 1, std=0.02)
        ae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
        init_module_(ae, 2, std=0.02)
        vae = comfy.sd.VAE(sd=ae.state_dict())
        comfy.sd.save_checkpoint(str(ckpt), model, clip, vae)
    (base / "input").mkdir(parents=True, exist_ok=True)
    write_video(moving_square_frames(frames=frames, size=size), base / "input" / "input.mp4")

    prompt = ui_to_api(load_ui(WORKFLOW))
    for node in prompt.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CKPT_NAME
        if ct in ("VideoDDIMInvert", "BasicScheduler"):
            inputs["steps"] = steps
        if ct == "NullTextOptimize":
            inputs["inner_steps"] = inner_steps
    return prompt


# --- 2./3. the server run --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, data: dict, timeout: float = 30.0):
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_server_check(comfy: Path, base: Path, prompt: dict, cpu: bool, timeout: float) -> dict:
    port = _free_port()
    web = base / "web"
    web.mkdir(exist_ok=True)
    (web / "index.html").write_text("<html></html>")
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
           "--front-end-root", str(web), "--disable-auto-launch"]
    cli = (comfy / "comfy" / "cli_args.py").read_text()
    dynamic_flag = "--enable-dynamic-vram" in cli
    if cpu:
        cmd.append("--cpu")
    elif dynamic_flag:
        cmd.append("--enable-dynamic-vram")
    log_path = base / "server.log"
    report: dict = {"cmd": " ".join(cmd[1:]), "dynamic_vram_flag_offered": dynamic_flag}
    t0 = time.time()
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, cwd=str(comfy), stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:  # wait for the server (bounded)
                if server.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited with status {server.returncode} before serving")
                try:
                    report["system_stats_before"] = _get(f"{url}/system_stats")
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    if time.time() - t0 > 240:
                        raise RuntimeError("ComfyUI did not start serving within 240 s") from None
                    time.sleep(1.0)
            report["startup_s"] = round(time.time() - t0, 1)
            try:
                queued = _post(f"{url}/prompt", {"prompt": prompt, "client_id": "zsve-gpu-check"})
            except urllib.error.HTTPError as e:
                report.update(ok=False, error=f"prompt refused: {e.read().decode(errors='replace')[:2000]}")
                return report
            pid = queued["prompt_id"]
            t1 = time.time()
            entry = None
            while time.time() - t1 < timeout:
                hist = _get(f"{url}/history/{pid}")
                if pid in hist:
                    entry = hist[pid]
                    break
                if server.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited with status {server.returncode} while running the prompt")
                time.sleep(2.0)
            report["run_s"] = round(time.time() - t1, 1)
            if entry is None:
                report.update(ok=False, error=f"no result within {timeout:.0f} s")
                return report
            status = entry.get("status", {})
            report["ok"] = status.get("status_str") == "success"
            for event, data in status.get("messages", []):
                if event == "execution_error":
                    report["error"] = f"{data.get('node_type')} (node {data.get('node_id')}): " \
                                      f"{data.get('exception_message', '').strip()}"
            report["system_stats_after"] = _get(f"{url}/system_stats")
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    text = log_path.read_text(errors="replace")
    report["dynamic_vram_log"] = [ln.strip() for ln in text.splitlines() if "dynamic" in ln.lower()][:10]
    report["dynamic_vram_enabled"] = any("enabled" in ln.lower() and "disabled" not in ln.lower()
                                         for ln in report["dynamic_vram_log"])
    report["log_tail"] = text.splitlines()[-15:]
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy" / "ComfyUI")))
    p.add_argument("--cpu", action="store_true", help="smoke mode on the CPU (no GPU, no dynamic VRAM)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (latent side = size / 8)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=5, help="Null-Text Optimize iterations per step")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the workflow")
    p.add_argument("--base", default=None, help="base directory to use (kept); default: a temporary one (removed)")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    p.add_argument("--prepare", default=None, help=argparse.SUPPRESS)  # child: write the prompt JSON here
    a = p.parse_args()
    comfy = Path(a.comfyui).expanduser().resolve()
    if a.prepare:
        prompt = prepare(Path(a.base), a.frames, a.size, a.steps, a.inner_steps)
        Path(a.prepare).write_text(json.dumps(prompt))
        return
    base = Path(a.base).resolve() if a.base else Path(tempfile.mkdtemp(prefix="zsve-gpu-check-"))
    report: dict = {"comfyui": str(comfy), "frames": a.frames, "size": a.size, "steps": a.steps,
                    "inner_steps": a.inner_steps, "cpu": a.cpu}
    try:
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / "zero_shot_video_edit"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        t0 = time.time()
        env = dict(os.environ, COMFYUI_PATH=str(comfy))
        subprocess.run([sys.executable, __file__, "--comfyui", str(comfy), "--base", str(base), "--prepare",
                        str(base / "prompt.json"), "--frames", str(a.frames), "--size", str(a.size),
                        "--steps", str(a.steps), "--inner-steps", str(a.inner_steps)], check=True, env=env)
        report["prepare_s"] = round(time.time() - t0, 1)
        prompt = json.loads((base / "prompt.json").read_text())
        report.update(run_server_check(comfy, base, prompt, a.cpu, a.timeout))
    except Exception as e:  # reported, not raised: the JSON says what failed
        report.update(ok=False, error=f"{type(e).__name__}: {e}")
    finally:
        if not a.base:
            shutil.rmtree(base, ignore_errors=True)
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    sys.exit(0 if report.get("ok") else 1)


if __name__ == "__main__":
    main()
