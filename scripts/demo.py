"""The project's main command: run a shipped workflow headless through ComfyUI's executor.

Default: the toy model (toy/weights, loaded with the pack's ToyModelLoader) on a toy clip. With
--checkpoint/--video/--source-prompt/--edit-prompt the same workflow runs on a real SD1.5 checkpoint and
a real video. Writes the output video, a side-by-side comparison (source | result [| mask]) and a metrics
JSON, and prints their paths. On a toy clip the JSON's "toy" scores (edit ok, background kept; toy/metrics.py)
judge the edit the edit prompt asks for ("toy_edit"): the clip's own, or another one of its object and/or background
typed with --edit-prompt in the toy vocabulary (e.g. "a green triangle on blue stripes"); outside it they are left
out, and the run says so.

    bash scripts/demo.sh                       # toy model, toy clip, blended-latent local edit
    bash scripts/demo.sh --workflow invert_reconstruct_video
    bash scripts/demo.sh --checkpoint ~/models/v1-5.safetensors --video in.mp4 \
        --source-prompt "a silver jeep driving" --edit-prompt "a red jeep driving" --words "red jeep" \
        --source-words "silver jeep"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

DEFAULT_WORKFLOW = "blended_latent_auto_mask"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workflow", default=os.environ.get("ZSVE_DEMO_WORKFLOW", DEFAULT_WORKFLOW),
                   help="name of a workflow in workflows/ (without .json)")
    p.add_argument("--checkpoint", help="a real SD1.5-family checkpoint (.safetensors/.ckpt) instead of the toy model")
    p.add_argument("--video", help="a video file instead of the toy clip")
    p.add_argument("--source-prompt", help="text describing the input video")
    p.add_argument("--edit-prompt", help="the edited text")
    p.add_argument("--words", help="the edited words of the edit prompt, for masks (default: from the toy clip)")
    p.add_argument("--source-words", help="the same thing's words in the source prompt, for the masks of the old "
                   "object (blend words, Source Attention Mask, InFusion concepts; default: from the toy clip)")
    p.add_argument("--steps", type=int, help="DDIM steps for inversion and editing (default: the workflow's)")
    p.add_argument("--frames", type=int, default=8, help="frames of the toy clip")
    p.add_argument("--clip", default="color_swap_stripes",
                   help="toy benchmark clip name (toy.scenes.benchmark_set; default: a yellow triangle on blue stripes "
                        "turned red)")
    p.add_argument("--out", default=str(ROOT / "output" / "demo"), help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    import importlib

    importlib.import_module("zsve_boot")  # boots ComfyUI on CPU and loads the pack through ComfyUI's loader
    import numpy as np
    import torch

    from zsve_harness import run_prompt, write_video
    from zsve_workflows import load_ui, ui_to_api

    folder_paths = importlib.import_module("folder_paths")
    comfy_utils = importlib.import_module("comfy.utils")
    InputImpl = importlib.import_module("comfy_api.latest").InputImpl

    wf_path = ROOT / "workflows" / f"{args.workflow}.json"
    if not wf_path.is_file():
        names = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
        print(f"no workflow named {args.workflow!r}; shipped workflows: {', '.join(names)}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    work_in = out / "input"
    work_in.mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(work_in))
    folder_paths.set_output_directory(str(out))

    # --- the video -----------------------------------------------------------------------------------
    spec = None
    if args.video:
        src = Path(args.video).expanduser().resolve()
        if not src.is_file():
            print(f"--video {src} does not exist", file=sys.stderr)
            return 2
        shutil.copy(src, work_in / ("input" + src.suffix))
        video_name = "input" + src.suffix
        masks = None
    else:
        from zsve.toy import scenes

        specs = {s.name: s for s in scenes.benchmark_set(frames=args.frames)}
        if args.clip not in specs:
            print(f"--clip must be one of {', '.join(specs)}", file=sys.stderr)
            return 2
        spec = specs[args.clip]
        clip = spec.clip()
        write_video(torch.from_numpy(clip.frames), work_in / "input.mp4")
        video_name = "input.mp4"
        masks = clip.masks
    source_prompt = args.source_prompt or (spec.source_prompt if spec else None)
    edit_prompt = args.edit_prompt or (spec.edit_prompt if spec else None)
    scored = None  # the toy clip with the edit the edit prompt asks for: what the toy metrics judge
    if spec is not None:
        norm = scenes.normalise_prompt
        if args.source_prompt and norm(args.source_prompt) != spec.source_prompt:
            why = f"--source-prompt {args.source_prompt!r} is not the toy clip's {spec.source_prompt!r}"
        elif norm(edit_prompt) == spec.source_prompt:
            why = f"the edit prompt {edit_prompt!r} asks for no change of {spec.source_prompt!r}"
        else:
            scored = scenes.edit_with_prompt(spec, edit_prompt)
            why = (f"the edit prompt {edit_prompt!r} is not an edit of one object and/or the background of "
                   f"{spec.source_prompt!r} in the toy vocabulary")
        if scored is None:
            print(f"[zsve demo] toy scores (edit ok, background kept) left out: {why}")
    # the toy clip's edit, or the one --edit-prompt asks for on its clip (None when that cannot be read)
    edit = scored if args.edit_prompt else spec
    if spec is not None:
        # the user-mask workflow's mask.png (white = edit, one for all frames): the edited object's region over
        # the clip, grown by 4 px; for a background edit the background (outside every object's grown region)
        from PIL import Image
        from scipy.ndimage import binary_dilation

        target = (edit or spec).target
        objs = clip.masks[:, [target]] if target is not None else clip.masks
        region = binary_dilation(objs.any(axis=(0, 1)), iterations=4)
        if target is None:
            region = ~region
        Image.fromarray((region * 255).astype(np.uint8)).convert("RGB").save(work_in / "mask.png")
    # the words of what the edit changes, in the edit prompt (mask words) and in the source prompt (blend words,
    # Source Attention Mask, InFusion concepts, Video-P2P): the toy clip's edit, or the one --edit-prompt asks for on
    # its clip; the benchmark rows' rule (toy/methods_bld.py: the object's phrase, the background's words, or both)
    words, source_words = args.words, args.source_words
    if edit is not None:
        from types import SimpleNamespace

        from zsve.toy import methods_bld

        words = words or methods_bld.edit_words(SimpleNamespace(edit=edit))
        source_words = source_words or methods_bld.source_words(SimpleNamespace(edit=edit))
    if source_prompt is None:
        print("--source-prompt is required with --video", file=sys.stderr)
        return 2

    # --- the workflow --------------------------------------------------------------------------------
    ui = load_ui(wf_path)
    replace = {}
    if args.checkpoint:
        ck = Path(args.checkpoint).expanduser().resolve()
        if not ck.is_file():
            print(f"--checkpoint {ck} does not exist", file=sys.stderr)
            return 2
        folder_paths.add_model_folder_path("checkpoints", str(ck.parent), is_default=True)
        ckpt_name = ck.name
    else:
        replace["CheckpointLoaderSimple"] = {"class_type": "ToyModelLoader",
                                             "inputs": {"weights": "toy_sd15.safetensors"}}
        ckpt_name = None
    prompt = ui_to_api(ui, replace=replace)
    # on the toy clip the word widgets follow its edit; an edit prompt whose edit cannot be read (outside the toy
    # vocabulary, two objects changed, no change) leaves them naming the workflow's example words: stop, saying so
    word_nodes = sorted({n["class_type"] for n in prompt.values() if _uses_words(n["class_type"], n["inputs"])})
    if spec is not None and args.edit_prompt and word_nodes and not (words and source_words):
        print(f"--words and --source-words are needed: the workflow's {', '.join(word_nodes)} name the edited words, "
              f"and they cannot be read from --edit-prompt {args.edit_prompt!r} (outside the toy vocabulary, more than "
              "one object changed, or no change): give --words (the edited words of the edit prompt) and "
              "--source-words (the same thing in the source prompt)", file=sys.stderr)
        return 2
    for node in prompt.values():
        inputs, ct, title = node["inputs"], node["class_type"], node.get("_meta", {}).get("title", "")
        if ct == "CheckpointLoaderSimple" and ckpt_name:
            inputs["ckpt_name"] = ckpt_name
        if ct == "LoadVideo":
            inputs["file"] = video_name
        if ct == "CLIPTextEncode" and title == "Source prompt":
            inputs["text"] = source_prompt
        if ct == "EditPrompts":
            inputs["source_text"] = source_prompt
            if edit_prompt:
                inputs["edit_text"] = edit_prompt
        if args.steps and "steps" in inputs and isinstance(inputs["steps"], int):
            inputs["steps"] = args.steps
        if ct == "LatentBlendWithInversion" and words:
            inputs["words"] = words
        if ct == "LoraLoader" and inputs.get("lora_name") not in folder_paths.get_filename_list("loras"):
            # the workflow names an example LoRA file: without it, an empty LoRA (no keys: the model unchanged)
            (out / "loras").mkdir(exist_ok=True)
            comfy_utils.save_torch_file({}, str(out / "loras" / "zsve_no_lora.safetensors"))
            folder_paths.add_model_folder_path("loras", str(out / "loras"))
            print(f"[zsve demo] {inputs.get('lora_name')} is not in models/loras: the LoRA node runs with an empty "
                  "LoRA (the model unchanged)")
            inputs["lora_name"] = "zsve_no_lora.safetensors"
        # the workflows' word widgets name the words of their own example prompts: on a toy clip, its words
        if ct == "SourceAttentionMask" and source_words:
            inputs["words"] = source_words
        if source_words and words:
            if ct == "AttentionBlend" and inputs.get("blend_words"):
                inputs["blend_words"] = source_words
            if ct == "VideoP2PGuider":
                inputs.update(blend_words=source_words, blend_words_edit=words)
            if ct == "InFusionInject":  # one concept per changed phrase, paired in order ("red, gray" / "blue, black")
                src_p = [w.strip() for w in source_words.split(",") if w.strip()]
                edit_p = [w.strip() for w in words.split(",") if w.strip()]
                if len(src_p) != len(edit_p):
                    raise SystemExit(f"--source-words {source_words!r} and --words {words!r}: give as many phrases "
                                     "(comma separated) on both sides, one InFusion concept per pair")
                inputs["concepts"] = ", ".join(f"{a}->{b}" for a, b in zip(src_p, edit_p))
        if ct == "CrossAttentionReweight" and edit_prompt:  # the words the toy clip's edit adds, as the benchmark
            src_w, edit_w = source_prompt.split(), edit_prompt.split()
            added = ([e for a, e in zip(src_w, edit_w) if a != e] if len(src_w) == len(edit_w)
                     else [w for w in edit_w if w not in src_w])
            if added:
                inputs["reweight"] = ", ".join(f"{w}:4" for w in added)
        if spec is not None and ct in ("AttentionBlend", "VideoP2PGuider") and inputs.get("reweight"):
            word = str(inputs["reweight"]).split(":")[0].strip()
            if word not in (edit_prompt or "").split():
                inputs["reweight"] = ""  # the example's style word is not in the toy clip's edit prompt
    print(f"[zsve demo] workflow {wf_path.name}: {len(prompt)} nodes; source: {source_prompt!r}"
          + (f"; edit: {edit_prompt!r}" if edit_prompt and args.workflow != "invert_reconstruct_video" else ""))
    from zsve_harness import GraphError

    try:
        result = run_prompt(prompt)
    except GraphError as e:  # e.g. a model file the workflow names is missing: say it per node
        data = e.details
        node_errors = data[3] if isinstance(data, tuple) and len(data) > 3 and isinstance(data[3], dict) else {}
        lines = [f"{v.get('class_type')}: {err.get('details') or err.get('message')}"
                 for v in node_errors.values() for err in v.get("errors", [])]
        print("[zsve demo] the workflow did not run: " + ("; ".join(lines) if lines else str(e))
              + (" (the workflow's Read me note says which files to put in ComfyUI/models)" if lines else ""),
              file=sys.stderr)
        return 1

    # --- outputs -------------------------------------------------------------------------------------
    videos = sorted((p for p in out.rglob("*.mp4") if work_in not in p.parents), key=lambda p: p.stat().st_mtime)
    if not videos:
        print("the workflow saved no video", file=sys.stderr)
        return 1
    result_video = videos[-1]
    src_frames = InputImpl.VideoFromFile(str(work_in / video_name)).get_components().images.float()
    res_frames = InputImpl.VideoFromFile(str(result_video)).get_components().images.float()
    n = min(len(src_frames), len(res_frames))
    src_frames, res_frames = src_frames[:n], res_frames[:n]
    if res_frames.shape[1:3] != src_frames.shape[1:3]:
        res_frames = torch.nn.functional.interpolate(res_frames.movedim(-1, 1), size=src_frames.shape[1:3],
                                                     mode="bilinear").movedim(1, -1)
    panels = [src_frames, res_frames]
    mask_pngs = []
    for nid, outs in (result["ui"].get("outputs") or {}).items():
        title = prompt.get(nid, {}).get("_meta", {}).get("title", "").lower()
        if "mask" in title:
            for im in outs.get("images", []):
                base = folder_paths.get_directory_by_type(im.get("type", "temp")) or folder_paths.get_temp_directory()
                mask_pngs.append(Path(base) / im.get("subfolder", "") / im["filename"])
    if mask_pngs:
        from PIL import Image

        mk = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0)
              for p in mask_pngs[-n:]]
        if len(mk) == n:
            mk = torch.nn.functional.interpolate(torch.stack(mk).movedim(-1, 1), size=src_frames.shape[1:3],
                                                 mode="nearest").movedim(1, -1)
            panels.append(mk)
    side = torch.cat(panels, dim=2)
    side_path = out / "side_by_side.mp4"
    write_video(side, side_path)

    from zsve.toy import metrics as M

    region = None
    if masks is not None and scored is not None and scored.target is not None:
        region = masks[:n, scored.target]
    metrics = {
        "workflow": args.workflow,
        "source_prompt": source_prompt,
        "edit_prompt": edit_prompt,
        "frames": int(n),
        "psnr_outside_edit": M.masked_psnr(res_frames.numpy(), src_frames.numpy(), region),
        "ssim_outside_edit": M.masked_ssim(res_frames.numpy(), src_frames.numpy(), region),
        "warp_error": M.warp_error(res_frames.numpy(), src_frames.numpy()),
        "relative_frame_change": M.relative_frame_change(res_frames.numpy(), src_frames.numpy()),
        "seconds": round(time.time() - t0, 1),
        "executed_nodes": sorted(result["executed"]),
    }
    if scored is not None and args.workflow != "invert_reconstruct_video":
        from zsve.toy import benchmark as B
        from zsve.toy import model as TM

        metrics["toy_edit"] = {"edit_prompt": scored.edit_prompt, "kind": scored.kind}  # what the scores judge
        clip_ = scored.clip()  # preservation also against the clip's toy-VAE round trip ("psnr_vae", toy/metrics.py)
        metrics["toy"] = M.toy_scores(res_frames.numpy(), clip_, scored,
                                      latent_ref=B.vae_round_trip(TM.load()[2], clip_.frames))
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(_no_nan(metrics), indent=1, default=float) + "\n")
    print(f"[zsve demo] result video:  {result_video}")
    print(f"[zsve demo] side by side:  {side_path}")
    print(f"[zsve demo] metrics:       {metrics_path}")
    print(f"[zsve demo] done in {metrics['seconds']} s")
    return 0


def _uses_words(class_type: str, inputs: dict) -> bool:
    """Whether a node (API format) has a word widget in use that names words of the prompts."""
    if class_type == "LatentBlendWithInversion":
        return inputs.get("mask_source") != "user mask" and bool(inputs.get("words"))
    if class_type == "AttentionBlend":
        return bool(inputs.get("blend_words"))
    return class_type in ("SourceAttentionMask", "VideoP2PGuider", "InFusionInject")


def _no_nan(x):
    """Strict JSON: a metric that does not apply (NaN, e.g. the kept background of an edit that changes it) -> null."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    try:
        return None if x != x else x  # NaN is the one value unequal to itself (numpy scalars included)
    except (TypeError, ValueError):
        return x


if __name__ == "__main__":
    sys.exit(main())
