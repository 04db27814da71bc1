"""Train the toy model's UNet (v- or eps-prediction, ComfyUI's SD1.5 noise schedule) on fresh procedural scenes.

    cd <pack root> && python -m toy.train --steps 4000            # start (or resume) a run
    python -m toy.train --steps 8000 --resume                    # continue the same run to 8000 steps

Deterministic: the scenes and the noise of step k come from generators seeded with (seed, k), so a
resumed run is identical to an uninterrupted one (up to floating-point reduction order); the resume state
(optimizer, raw and EMA weights, step) is kept next to the checkpoint in `<weights>.state.pt`, which is
not committed. One CPU thread by default (the machine is shared).

What is trained: the UNet only. The text encoder (SD1 tokenizer + a 2-layer width-64 CLIP-L-architecture
transformer) is random and frozen, and its outputs are computed through comfy.sd.CLIP exactly as
CLIPTextEncode does (cached per caption, since it is frozen). The VAE is hand-set (toy/model.py), so the
training latents are its closed-form encoding of the rendered scenes. The EMA weights go to the
checkpoint every --save-every steps (atomic write).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from . import boot


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000, help="train until this global step")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--cosine-from", type=int, default=None,
                   help="cosine-decay the learning rate from this step to 2%% of --lr at --steps (default: constant)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-p", type=float, default=0.1, help="caption dropout (empty prompt) for CFG")
    p.add_argument("--two-object-p", type=float, default=0.15)
    p.add_argument("--two-object-sides", choices=["left-first", "either"], default="left-first",
                   help="two-object scenes: the first named object on the left (the committed model's training) or "
                        "on either side with equal odds (the benchmark's crossing clips name the right-hand one first "
                        "in their later frames)")
    p.add_argument("--dots-p", type=float, default=0.0,
                   help="probability that a one-object scene is drawn from the combinations on dots only (the classes "
                        "the committed model draws worst; otherwise uniform, a quarter on dots); 0: the committed "
                        "model's training")
    p.add_argument("--prediction", choices=["v", "eps"], default="v")
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="eps only: Min-SNR loss weighting (0 = plain MSE)")
    p.add_argument("--attn-loss", type=float, default=0.0,
                   help="weight of the cross-attention localisation loss (toy/attn_loss.py; 0 = off)")
    p.add_argument("--attn-loss-two-object", type=float, default=None,
                   help="the localisation loss's weight on the words of two-object scenes (default: --attn-loss, "
                        "the committed model's training); their words attend to their objects ~6x worse than one "
                        "object's (loss 0.19 vs 0.03 with the committed weights)")
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="extra loss weight on the latent pixels of the objects and their 1-pixel ring (0 = plain "
                        "loss); shapes differ only near their outlines, which the plain loss barely weighs")
    p.add_argument("--model-channels", type=int, default=None,
                   help="UNet width (default: toy/model.py's 32); a wider UNet is a different model: give it its own --out")
    p.add_argument("--unet-fp16", action="store_true",
                   help="store the checkpoint's UNet in fp16 (training stays fp32); keeps a wider UNet's file small")
    p.add_argument("--object-r", type=str, default=None,
                   help="half-size range of the one object of a scene, 'lo,hi' px (default scenes.OBJECT_R); "
                        "with --two-object-r, an experiment with bigger objects (give it its own --out)")
    p.add_argument("--two-object-r", type=str, default=None, help="half-size range of each of two objects, 'lo,hi'")
    p.add_argument("--colors", type=str, default=None,
                   help="experiment: train on one-object scenes of these colours only, comma separated "
                        "(scenes.restricted_scene; no held-out split)")
    p.add_argument("--backgrounds", type=str, default=None,
                   help="experiment: ... and of these backgrounds only, by caption, ';' separated (e.g. 'gray;blue stripes')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="checkpoint path (default toy/weights/toy_sd15.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from a checkpoint when its resume state is gone (a new machine): its UNet (EMA "
                   "weights), text encoder, config and step count; the optimizer starts afresh, so the run is not "
                   "identical to an uninterrupted one (recorded as init_from_step)")
    return p.parse_args()


def object_weight_map(scene_masks, latent_size: int):
    """[B, 1, h, w] in 0..1 from each scene's object masks (a list of [H, W] per scene): the objects' pixel
    coverage per latent pixel, grown by one latent pixel (3x3 max) so that the ring just outside an outline,
    where a circle and a square differ, is weighted too."""
    import numpy as np
    import torch

    m = torch.from_numpy(np.stack([np.any(np.stack(ms), 0) for ms in scene_masks]).astype(np.float32))[:, None]
    m = torch.nn.functional.adaptive_avg_pool2d(m, latent_size)
    return torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)


def v_training_pair(model_sampling, x0, sigma, eps):
    """(UNet input, timestep, v target) for x0 noised to `sigma` with `eps` (ComfyUI's EPS noise scaling,
    x0 + eps * sigma, then x / sqrt(sigma^2 + 1)). v = alpha * eps - sigma_vp * x0 in the VP parameterisation;
    ComfyUI's V_PREDICTION turns it back with denoised = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)."""
    s4 = sigma.view(-1, 1, 1, 1)
    xc = model_sampling.calculate_input(sigma, x0 + eps * s4)
    return xc, model_sampling.timestep(sigma).float(), (eps - s4 * x0) / (s4**2 + 1) ** 0.5


def scene_sampler(a):
    """The training world from the options: a function rng -> Scene. --object-r/--two-object-r set the object
    sizes of this process's scenes module; --colors/--backgrounds restrict it to one-object scenes of a smaller
    world (scenes.restricted_scene), otherwise scenes.random_scene with its held-out split."""
    from . import scenes

    if a.object_r:
        scenes.OBJECT_R = tuple(float(v) for v in a.object_r.split(","))
    if a.two_object_r:
        scenes.TWO_OBJECT_R = tuple(float(v) for v in a.two_object_r.split(","))
    if a.dots_p and (a.colors or a.backgrounds):
        raise SystemExit("--dots-p acts on the full world's scenes; it has no effect with --colors/--backgrounds")
    if not (a.colors or a.backgrounds):
        return lambda rng: scenes.random_scene(rng, two_object_p=a.two_object_p,
                                               either_side=a.two_object_sides == "either", dots_p=a.dots_p)
    colors = a.colors.split(",") if a.colors else None
    if colors and set(colors) - set(scenes.COLOR_NAMES):
        raise SystemExit(f"unknown colour(s) {sorted(set(colors) - set(scenes.COLOR_NAMES))}")
    bgs = None
    if a.backgrounds:
        by_caption = {b.caption(): b for b in scenes.all_backgrounds()}
        unknown = [c for c in a.backgrounds.split(";") if c not in by_caption]
        if unknown:
            raise SystemExit(f"unknown background(s) {unknown}; choose from {sorted(by_caption)}")
        bgs = [by_caption[c] for c in a.backgrounds.split(";")]
    return lambda rng: scenes.restricted_scene(rng, colors, bgs)


def main():
    a = parse()
    boot.boot(threads=a.threads)
    import numpy as np
    import torch

    from . import model as tm
    from . import scenes

    out = a.out or tm.WEIGHTS
    draw_scene = scene_sampler(a)
    state_path = Path(str(out) + ".state.pt")
    config = json.loads(json.dumps(tm.DEFAULT_CONFIG))
    config["seed"] = a.seed
    config["prediction"] = a.prediction
    st = torch.load(state_path, weights_only=False) if a.resume and state_path.exists() else None
    if st is not None:  # a resumed run keeps its architecture unless told otherwise
        a.model_channels = a.model_channels or st["args"].get("model_channels")
        a.unet_fp16 = a.unet_fp16 or bool(st["args"].get("unet_fp16"))
    if a.model_channels:
        config["unet"]["model_channels"] = a.model_channels
    if a.unet_fp16:
        config["unet_storage"] = "fp16"
    torch.manual_seed(a.seed)
    if a.init_from is not None and st is None:
        model, clip, _, info = tm.load(a.init_from)
        config = info["config"]
        if a.unet_fp16:
            config["unet_storage"] = "fp16"
        # recorded in the resume state, so that a later --resume builds this architecture and storage again
        a.model_channels = int(config["unet"]["model_channels"])
        a.unet_fp16 = config.get("unet_storage") == "fp16"
        init_step, init_minutes = int(info["train"].get("steps", 0)), float(info["train"].get("train_minutes", 0.0))
    else:
        model = tm.build_unet(config, init_seed=a.seed)
        clip = tm.build_clip(config, init_seed=a.seed + 1)
        init_step = None
    dm = model.model.diffusion_model
    ms = model.model.model_sampling
    latent_format = model.model.latent_format
    gain = float(config["latent_gain"])
    opt = torch.optim.AdamW(dm.parameters(), lr=a.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in dm.state_dict().items()}
    step, elapsed, loss_hist = 0, 0.0, []
    if st is not None:
        config["prediction"] = st["args"].get("prediction", "eps")
        dm.load_state_dict(st["unet"])
        opt.load_state_dict(st["opt"])
        ema = st["ema"]
        clip.cond_stage_model.load_state_dict(st["clip"])
        step, elapsed, loss_hist = st["step"], st["elapsed"], st.get("loss_hist", [])
        init_step = st.get("init_from_step")
        print(f"resumed at step {step} ({elapsed / 60:.1f} min so far)", flush=True)
    elif init_step is not None:
        step, elapsed = init_step, init_minutes * 60
        print(f"initialised from {a.init_from} at step {step} (fresh optimizer)", flush=True)
    dm.train()

    cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def cond_of(text: str) -> torch.Tensor:
        if text not in cache:
            tokens = clip.tokenize(text)
            cache[text] = clip.encode_from_tokens(tokens).float().cpu()
        return cache[text]

    n_train = len(ms.sigmas)

    # Optional cross-attention localisation loss: record every cross-attention's probabilities through an
    # attn2 replace patch (the same computation as the default attention, kept differentiable).
    from . import attn_loss

    recorded: list = []
    two_w = a.attn_loss_two_object
    if two_w is not None and a.attn_loss <= 0:
        raise SystemExit("--attn-loss-two-object needs --attn-loss > 0 (the loss it reweights)")
    transformer_options: dict = {}
    span_cache: dict = {}
    if a.attn_loss > 0:
        pack = boot.load_pack()
        attention_probs, apply_probs = pack.attention.attn.attention_probs, pack.attention.attn.apply_probs
        word_spans = pack.attention.align.word_spans
        tok = clip.tokenizer.clip_l.tokenizer

        def record(q, k, v, extra):
            probs = attention_probs(q, k, extra["n_heads"])
            recorded.append(probs)
            return apply_probs(probs, v, extra["n_heads"])

        keys = pack.nodes._attn_patch.transformer_block_keys(model)
        transformer_options = {"patches_replace": {"attn2": {key: record for key in keys}}}
    train_info = {}

    def write(final=False):
        train_info.update(
            {
                "steps": step,
                "batch": a.batch,
                "lr": a.lr,
                "cosine_from": a.cosine_from,
                "ema": a.ema,
                "seed": a.seed,
                "threads": a.threads,
                "uncond_p": a.uncond_p,
                "two_object_p": a.two_object_p,
                "two_object_sides": a.two_object_sides,
                "dots_p": a.dots_p,
                "min_snr_gamma": a.min_snr_gamma,
                "attn_loss": a.attn_loss,
                **({"attn_loss_two_object": two_w} if two_w is not None else {}),
                "object_weight": a.object_weight,
                "object_r": list(scenes.OBJECT_R),
                "two_object_r": list(scenes.TWO_OBJECT_R),
                "colors": a.colors,
                "backgrounds": a.backgrounds,
                "train_minutes": round(elapsed / 60, 2),
                "loss_last100": float(np.mean(loss_hist[-100:])) if loss_hist else None,
                "weights": "ema",
                **({"init_from_step": init_step} if init_step is not None else {}),
                "script": "python -m toy.train",
            }
        )
        tm.save(out, model, clip, config, train_info, unet_state=ema)
        torch.save(
            {"unet": dm.state_dict(), "opt": opt.state_dict(), "ema": ema, "clip": clip.cond_stage_model.state_dict(),
             "step": step, "elapsed": elapsed, "loss_hist": loss_hist, "args": vars(a), "init_from_step": init_step},
            str(state_path) + ".tmp",
        )
        Path(str(state_path) + ".tmp").replace(state_path)

    loc_hist: list[float] = []
    t_last = time.time()
    while step < a.steps:
        rng = np.random.default_rng([a.seed, step])
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        imgs, texts, regions, obj_masks, n_objects = [], [], [], [], []
        for _ in range(a.batch):
            sc = draw_scene(rng)
            img, masks = scenes.render(sc)
            imgs.append(img)
            n_objects.append(len(sc.objects))
            texts.append("" if rng.uniform() < a.uncond_p else sc.caption())
            if a.attn_loss > 0 or a.object_weight > 0:
                obj_masks.append(masks)
            if a.attn_loss > 0:
                if texts[-1] and texts[-1] not in span_cache:
                    span_cache[texts[-1]] = attn_loss.token_regions(texts[-1], len(sc.objects),
                                                                    word_spans(texts[-1], tok))
                regions.append(span_cache.get(texts[-1], []))
        x = torch.from_numpy(np.stack(imgs))
        x0 = latent_format.process_in(tm.pixels_to_latent(x, gain))
        ctx = torch.cat([cond_of(t) for t in texts])
        t_idx = torch.randint(0, n_train, (a.batch,), generator=g)
        sigma = ms.sigmas[t_idx].float()
        eps = torch.randn(x0.shape, generator=g)
        xc, timestep, v_target = v_training_pair(ms, x0, sigma, eps)
        lr = a.lr * min(1.0, (step + 1) / a.warmup)
        if a.cosine_from is not None and step >= a.cosine_from:
            frac = (step - a.cosine_from) / max(1, a.steps - a.cosine_from)
            lr *= 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        recorded.clear()
        pred = dm(xc, timestep, context=ctx, transformer_options=transformer_options)
        # Min-SNR-gamma weighting (Hang et al. 2023) for eps prediction: w = min(SNR, gamma) / SNR with
        # SNR = 1 / sigma^2, i.e. min(1, gamma * sigma^2): the nearly clean timesteps (whose eps loss is
        # large but matters little) no longer dominate the gradient over the noisy ones.
        if config["prediction"] == "v":
            if a.object_weight > 0:
                wmap = 1.0 + a.object_weight * object_weight_map(obj_masks, x0.shape[-1])
                loss = (wmap * (pred - v_target) ** 2).sum() / (wmap.sum() * pred.shape[1])
            else:
                loss = torch.nn.functional.mse_loss(pred, v_target)  # plain v-MSE
        else:
            w = torch.clamp(a.min_snr_gamma * sigma**2, max=1.0) if a.min_snr_gamma > 0 else torch.ones_like(sigma)
            loss = (((pred - eps) ** 2).mean((1, 2, 3)) * w).mean()
        diffusion_loss = loss.detach()
        if a.attn_loss > 0:
            maps, used = attn_loss.token_targets(regions, obj_masks, scenes.SIZE)
            weight = None
            if two_w is not None:
                weight = torch.tensor([two_w / a.attn_loss if n > 1 else 1.0 for n in n_objects])
            loc = torch.stack([attn_loss.localisation_loss(p, maps, used, weight) for p in recorded]).mean()
            loc_hist.append(float(loc.detach()))
            loss = loss + a.attn_loss * loc
            recorded.clear()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            for k, v in dm.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        lv = float(diffusion_loss)
        if not math.isfinite(lv):
            raise SystemExit(f"loss is {lv} at step {step}")
        loss_hist.append(lv)
        if step % 20 == 0:
            extra = f" attn-loc {np.mean(loc_hist[-20:]):.3f}" if loc_hist else ""
            print(f"step {step} loss {np.mean(loss_hist[-20:]):.4f}{extra} lr {lr:.2e} {elapsed / step:.2f} s/step "
                  f"{elapsed / 60:.1f} min", flush=True)
        if step % a.save_every == 0 or step == a.steps:
            write()
            t_last = time.time()
    print(f"done: {step} steps in {elapsed / 60:.1f} min -> {out}", flush=True)


if __name__ == "__main__":
    main()
