"""Context windows over the frames of SD1.x/2.x and SDXL-family video edits (frames are the latent batch).

ComfyUI's core context-window handler is used as is, except for one thing: at ComfyUI 0.3.64 its
`set_step` compares the whole per-frame sigma tensor with the schedule (`isclose(sample_sigmas, timestep)`),
which only works when the batch is 1 (WAN, dim 2) — with frames as the batch (dim 0) it fails whenever the
frame count differs from steps + 1 (0.8.0 compares the first sigma only, as this override does on every
version). This node installs the core handler subclass with that comparison done on the (shared) sigma,
through the same public model_options slot ContextWindowsManual uses. Windows are built through
nodes/_compat.py (0.8.0's windows take the clip's frame count).
"""

from __future__ import annotations

import comfy.context_windows as cw
import torch
from comfy_api.latest import io

from ._comfy import CATEGORY, check_choice
from ._compat import index_list_window, window_init_kwargs

SCHEDULES = [cw.ContextSchedules.STATIC_STANDARD, cw.ContextSchedules.UNIFORM_STANDARD,
             cw.ContextSchedules.UNIFORM_LOOPED, cw.ContextSchedules.BATCHED]
KEY_FRAMES = {"first and middle": ("first", "middle"), "first": ("first",), "middle": ("middle",), "none": ()}


class KeyFrameWindow(cw.IndexListContextWindow):
    """A window whose index list also holds the clip's global key frames (`zsve_anchors`, not fused from this
    window). `zsve_total_frames` lets temporal attention find the clip's middle frame."""

    def __init__(self, index_list: list[int], anchors: list[int], total_frames: int, dim: int = 0):
        super().__init__(index_list, dim=dim, **window_init_kwargs(total_frames))
        self.zsve_anchors = list(anchors)
        self.zsve_total_frames = int(total_frames)


class FrameBatchContextHandler(cw.IndexListContextHandler):
    def __init__(self, *args, key_frames: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.key_frames = tuple(key_frames)

    def set_step(self, timestep: torch.Tensor, model_options: dict):
        return super().set_step(timestep.reshape(-1)[:1], model_options)

    def global_key_frames(self, total: int) -> list[int]:
        frames = {"first": 0, "middle": (total - 1) // 2}
        return sorted({frames[k] for k in self.key_frames})

    def get_context_windows(self, model, x_in: torch.Tensor, model_options: dict) -> list:
        windows = super().get_context_windows(model, x_in, model_options)
        total = x_in.size(self.dim)
        keys = self.global_key_frames(total)
        out = []
        for w in windows:
            idx = [int(i) for i in w.index_list]
            added = [k for k in keys if k not in idx]
            out.append(KeyFrameWindow(sorted(idx + added), added, total, dim=self.dim))
        return out

    def combine_context_window_results(self, x_in, sub_conds_out, sub_conds, window, window_idx, total_windows,
                                       timestep, conds_final, counts_final, biases_final):
        added = getattr(window, "zsve_anchors", None)
        if added:  # fuse only the window's own frames: a key frame added for attention is not the window's
            keep = [p for p, i in enumerate(window.index_list) if i not in added]
            own = index_list_window([window.index_list[p] for p in keep], self.dim, x_in.size(self.dim))
            sel = torch.as_tensor(keep, device=sub_conds_out[0].device)
            sub_conds_out = [o.index_select(self.dim, sel) for o in sub_conds_out]
            window = own
        return super().combine_context_window_results(x_in, sub_conds_out, sub_conds, window, window_idx,
                                                      total_windows, timestep, conds_final, counts_final,
                                                      biases_final)


class VideoContextWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoContextWindows",
            display_name="Video Context Windows (frames)",
            category=CATEGORY,
            description=(
                "Edit clips longer than one batch: ComfyUI's core context windows over the frames (the latent "
                "batch) of an SD1.x/2.x or SDXL-family model, for inversion and editing alike. Apply it to the MODEL before "
                "Video DDIM Invert and the edit sampler. The attention patches of this pack receive absolute "
                "frame indices of each window, and the clip's first/middle frames are added to every window "
                "(key_frames), so temporal key frames stay global. Same options as the core "
                "Context Windows (Manual) node, with the frame dimension fixed (at ComfyUI 0.3.64 the core node "
                "fails when frames are the batch and the frame count differs from steps + 1)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with context windows over its frames."),
                io.Int.Input("context_length", min=1, default=16, tooltip="Frames per window (FateZero/Video-P2P "
                             "use 8; more frames per window give more consistent edits and need more memory)."),
                io.Int.Input("context_overlap", min=0, default=4, tooltip="Frames shared by neighbouring windows; "
                             "their results are blended with the fuse method."),
                io.Combo.Input("context_schedule", options=SCHEDULES,
                    tooltip="How windows are laid over the clip (core ComfyUI schedules)."),
                io.Int.Input("context_stride", min=1, default=1, tooltip="Stride for the uniform schedules."),
                io.Boolean.Input("closed_loop", default=False, tooltip="Wrap windows around the end of the clip "
                                 "(looped schedules only)."),
                io.Combo.Input("fuse_method", options=cw.ContextFuseMethods.LIST_STATIC,
                               default=cw.ContextFuseMethods.PYRAMID,
                               tooltip="How overlapping window results are blended."),
                io.Combo.Input("key_frames", options=list(KEY_FRAMES), default="first and middle", optional=True,
                               tooltip="Frames of the whole clip added to every window that lacks them, so that "
                               "Temporal Self-Attention's 'first' (Video-P2P) and 'middle' (FateZero) modes attend "
                               "to the same key frame in every window (consistent edits across windows). An added "
                               "frame costs one frame of compute per window and is not fused from that window. "
                               "'none': key frames are chosen inside each window (core behaviour)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with frame context windows applied during sampling.")],
        )

    @classmethod
    def execute(cls, model, context_length, context_overlap, context_schedule, context_stride, closed_loop,
                fuse_method, key_frames="first and middle") -> io.NodeOutput:
        if context_overlap >= context_length:
            raise ValueError(f"VideoContextWindows: context_overlap ({context_overlap}) must be smaller than "
                             f"context_length ({context_length}).")
        check_choice("VideoContextWindows", "key_frames", key_frames, KEY_FRAMES)
        check_choice("VideoContextWindows", "context_schedule", context_schedule, SCHEDULES)
        check_choice("VideoContextWindows", "fuse_method", fuse_method, cw.ContextFuseMethods.LIST_STATIC)
        model = model.clone()
        model.model_options["context_handler"] = FrameBatchContextHandler(
            context_schedule=cw.get_matching_context_schedule(context_schedule),
            fuse_method=cw.get_matching_fuse_method(fuse_method),
            context_length=context_length, context_overlap=context_overlap, context_stride=context_stride,
            closed_loop=closed_loop, dim=0, key_frames=KEY_FRAMES[key_frames])
        cw.create_prepare_sampling_wrapper(model)
        return io.NodeOutput(model)


NODES = [VideoContextWindows]
