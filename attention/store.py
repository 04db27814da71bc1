"""The attention store: what the inversion records for FateZero's attention fusion, and its memory
accounting.

What is stored, per (timestep, layer, kind), for the conditional rows of the inversion (fp16, CPU):

- **self-attention: the layer's projected queries and keys** `q [F, Nq, C]`, `k [F or 1, Nk, C]`, not the
  probabilities. P2P/FateZero replace self-attention *per head*, so a head-averaged map would change
  the method; per-head probabilities are what makes FateZero's store ~100 GB (heads x Nq x Nk per frame).
  softmax(q k^T / sqrt(d)) recomputed at edit time gives the exact per-head maps from C x (Nq + Nk)
  numbers per frame instead of heads x Nq x Nk. When every frame attends to the same key frames
  ("middle", "first" and "all" temporal modes) the keys are identical for all frames and are stored
  once (`k` has one row).
- **cross-attention: per-head probabilities** `p [F, heads, Nq, T]` (T = 77). P2P's word swap/refinement
  acts per head, and these maps are small (T << Nk). Blend masks average them over heads (exactly what
  the reference does: the mask is a mean over heads x layers).

Which layers: those whose query map is at least `min_factor` times smaller than the latent (FateZero: 2,
i.e. 32x32 and below at 512x512; the 64x64 level is never stored). Which steps: only the edit steps
i < `kept_steps(N, record_window)` (step 0 = noisiest), enough for replace windows ending at
`record_window`. A memory budget is checked before every entry and projected after the first step, so
an over-budget configuration fails at the first step with a message, not after filling the RAM, or, with
`StoreConfig.spill` (Attention Store's over_budget "spill to disk"), moves the store to disk from then on:

**Spill to disk.** A spilled store keeps only its index (keys, tensor names, sizes) and the entries of the
step being recorded in RAM; every finished step (all layers of one timestep, every context window) is
written as one safetensors file in a directory the store owns (`spill_dir`), deleted when the store is
garbage-collected (weakref.finalize, also at interpreter exit). Reads load lazily from the step's file
(safetensors.safe_open, memory-mapped) and keep at most one step's tensors cached: the edit reads one
timestep at a time, in order, so each stored tensor is read from disk once per edit. Spilled or not, every
read returns the same fp16 tensors, so the edit's result is bitwise the same (tests/test_store_spill.py).

`estimate_store_bytes` computes the size of a configuration from the same per-entry accounting
(`entry_nbytes`) the store uses; a test checks it against a real recording.

This module does not import ComfyUI.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .attn import attention_probs
from .temporal import key_frames, shares_keys

TEXT_TOKENS = 77


def format_bytes(n: float) -> str:
    """Bytes for a message: MiB below 1 GiB (never '0.00 GiB'), GiB above."""
    n = float(n)
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"


class StoreBudgetError(RuntimeError):
    """The attention store would exceed its memory budget."""


class StoreDiskError(StoreBudgetError):
    """A store over its memory budget would spill to disk, but the disk has no room for it."""


class StoreLookupError(KeyError):
    """The edit asked for a step/layer the store does not have; the message says what to change."""

    def __str__(self):  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


log = logging.getLogger(__name__)

# FateZero's code stores and fuses the attention maps with at most 32x32 queries (attention_store.py,
# `attn.shape[-2] <= 32**2`): at 512x512 every level but the latent's full resolution (min_factor 2).
FATEZERO_MAX_QUERIES = 32 * 32


def fatezero_skips_full_res(latent_hw: Sequence[int], factor: int = 1) -> bool:
    """Whether FateZero's query-length rule leaves out the level `factor` times smaller than a latent of this
    size (factor 1: the full-resolution level)."""
    return (int(latent_hw[0]) // factor) * (int(latent_hw[1]) // factor) > FATEZERO_MAX_QUERIES


@dataclass(frozen=True)
class StoreConfig:
    record_window: float = 1.0  # fraction of the edit's steps (from the noisiest) that are recorded
    min_factor: int = 2  # record layers whose query map is >= this factor smaller than the latent
    self_attention: bool = True
    cross_attention: bool = True
    budget_bytes: int = 0  # 0: no budget
    dtype: torch.dtype = torch.float16
    # True: nothing is recorded at the inversion; the edit recomputes the source attention of each fused step
    # from the inversion's trajectory (nodes/_source_pass.py) into a one-step store (RecomputedAttention)
    recompute: bool = False
    # only layers at these factors (None: all at >= min_factor); cross-attention kept as its head mean
    # [F, 1, Nq, T] float32 (what cross_mean gives from per-head fp16 maps, bitwise) -- the recompute mode's
    # record for Attention Blend's mask output
    factors: tuple | None = None
    head_mean: bool = False
    spill: bool = False  # over the budget: spill to disk (True) or refuse (False); no budget: RAM
    spill_dir: str = ""  # the folder under which a spilled store makes its own directory ("": tempfile's)


# a spilled store refuses unless the disk keeps this fraction of the store free beyond it
SPILL_DISK_HEADROOM = 0.05


def full_res_hint(config: StoreConfig, latent_hw: Sequence[int]) -> str | None:
    """The hint for a store that leaves out the finest attention level (skip_full_res: the levels finer than
    `config.min_factor`, the model's finest attention level, attention/arch.py) where FateZero's own rule (maps of
    at most 32x32 queries) would record every level (SD1.5: latents of 32x32 or smaller, frames of 256x256 or
    smaller); None where the two agree. Shown in Attention Blend's UI text and the log."""
    if config.min_factor > 1 and not fatezero_skips_full_res(latent_hw, config.min_factor // 2):
        return (f"the latent is {int(latent_hw[0])}x{int(latent_hw[1])}: FateZero's rule (maps of at most 32x32 "
                "queries) records every level at this size, skip_full_res leaves the finest attention level out: "
                "turn Attention Store's skip_full_res off to match FateZero")
    return None


def kept_steps(num_steps: int, record_window: float) -> int:
    """How many edit steps (from the noisiest, step 0) are recorded. Covers a cross window ending at
    `record_window` (rows < int(w*(N+1))) and a self window ending there (steps < int(w*N))."""
    return max(0, min(num_steps, int(float(record_window) * (num_steps + 1))))


def entry_nbytes(kind: str, frames: int, nq: int, nk: int, channels: int, heads: int, shared_keys: bool = False,
                 text_tokens: int = TEXT_TOKENS, dtype_bytes: int = 2) -> int:
    """Bytes of one store entry (the accounting the store and the estimate share)."""
    if kind == "self":
        return (frames * nq * channels + (1 if shared_keys else frames) * nk * channels) * dtype_bytes
    if kind == "cross":
        return frames * heads * nq * text_tokens * dtype_bytes
    raise ValueError(kind)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensor_name(key: tuple, name: str) -> str:
    """The safetensors name of one tensor of an entry (unique within a step's file)."""
    window = ",".join(str(int(i)) for i in key[3]) if len(key) > 3 else "-"
    return f"{key[1]}|{key[2]}|{window}|{name}"


class SpilledEntries(MutableMapping):
    """The entries of a spilled store: a mapping (timestep, layer, kind[, window]) -> {name: tensor} like the
    RAM store's dict, backed by one safetensors file per recorded step in `directory`.

    Writing: entries of the current timestep stay in RAM (`pending`) until an entry of another timestep
    arrives or `flush()` is called; then the step is written whole (safetensors files are written at once) and
    only its index stays in RAM. Writing an entry again (or a window's merged cross map of the current step)
    replaces the old one; a file with no live entry left is deleted.
    Reading: `self[key]` returns the pending tensors, or loads the entry's tensors from its step's file
    (safe_open, memory-mapped) into a cache of at most one file (one step); reading another step drops it.
    The returned tensors are fresh CPU tensors; writing into them does not change the store (use `[key] =`)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._index: dict = {}  # key -> (path, {name: (tensor name, bytes)})
        self._files: dict = {}  # path -> [live entries, size on disk in bytes]
        self.pending: dict = {}
        self._pending_t: int | None = None
        self._cache_path: str | None = None
        self._cache: dict = {}
        self._written = 0
        self.loads = 0  # tensors read from disk (the one-step cache's misses)
        self.read_seconds = 0.0  # wall time spent reading tensors from the files / writing them (benchmarks)
        self.write_seconds = 0.0

    # -- mapping ------------------------------------------------------------------------------------------
    def __contains__(self, key) -> bool:
        return key in self.pending or key in self._index

    def __getitem__(self, key) -> dict:
        e = self.pending.get(key)
        if e is not None:
            return e
        path, fields = self._index[key]
        if path != self._cache_path:
            self._cache, self._cache_path = {}, path
        missing = [t for t, _ in fields.values() if t not in self._cache]
        if missing:
            t0 = time.perf_counter()
            with safe_open(path, framework="pt", device="cpu") as f:
                for t in missing:
                    self._cache[t] = f.get_tensor(t)
            self.loads += len(missing)
            self.read_seconds += time.perf_counter() - t0
        return {name: self._cache[t] for name, (t, _) in fields.items()}

    def __setitem__(self, key, data: dict) -> None:
        if not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise TypeError("a spilled attention store holds tensors only")
        if self.pending and self._pending_t != int(key[0]):
            self.flush()
        self._pending_t = int(key[0])
        self._drop_on_disk(key)
        self.pending[key] = data

    def __delitem__(self, key) -> None:
        if key in self.pending:
            del self.pending[key]
        elif key in self._index:
            self._drop_on_disk(key)
        else:
            raise KeyError(key)

    def __iter__(self) -> Iterator:
        yield from list(self._index)
        yield from list(self.pending)

    def __len__(self) -> int:
        return len(self._index) + len(self.pending)

    # -- disk ---------------------------------------------------------------------------------------------
    def nbytes_of(self, key) -> int:
        """Bytes of an entry's tensors (0 if absent), without reading it from disk."""
        e = self.pending.get(key)
        if e is not None:
            return sum(_nbytes(v) for v in e.values())
        hit = self._index.get(key)
        return sum(b for _, b in hit[1].values()) if hit else 0

    @property
    def pending_nbytes(self) -> int:
        """Bytes of the entries held in RAM (the step being recorded)."""
        return sum(_nbytes(v) for e in self.pending.values() for v in e.values())

    @property
    def disk_nbytes(self) -> int:
        """Size of the step files on disk (tensors + safetensors headers)."""
        return sum(size for _, size in self._files.values())

    @property
    def files(self) -> int:
        return len(self._files)

    def flush(self) -> None:
        """Write the pending step to one safetensors file; only its index stays in RAM."""
        if not self.pending:
            return
        t0 = time.perf_counter()
        tensors, index = {}, {}
        for key, data in self.pending.items():
            fields = {}
            for name, v in data.items():
                t = _tensor_name(key, name)
                tensors[t] = v.detach().to("cpu").contiguous()
                fields[name] = (t, _nbytes(v))
            index[key] = fields
        path = os.path.join(self.directory, f"step{self._written:05d}_t{self._pending_t}.safetensors")
        save_file(tensors, path)
        self._written += 1
        self._files[path] = [len(index), os.path.getsize(path)]
        for key, fields in index.items():
            self._index[key] = (path, fields)
        self.pending = {}
        self.write_seconds += time.perf_counter() - t0

    def _drop_on_disk(self, key) -> None:
        hit = self._index.pop(key, None)
        if hit is None:
            return
        path = hit[0]
        self._files[path][0] -= 1
        if self._files[path][0] <= 0:
            del self._files[path]
            if self._cache_path == path:
                self._cache, self._cache_path = {}, None
            try:
                os.remove(path)
            except OSError:
                pass


@dataclass
class LayerInfo:
    hw: tuple[int, int]
    heads: int
    channels: int
    factor: int


@dataclass(eq=False)
class AttentionStore:
    """Read-only after recording. Lives in `Inversion.records["attention"]`; shared, never copied.

    `entries` is a dict in RAM, or, once `spill()` was called, a SpilledEntries mapping backed by safetensors
    files in `spill_dir` (deleted with the store); the read methods are the same for both."""

    config: StoreConfig
    frames: int
    latent_hw: tuple[int, int]
    num_steps: int | None = None
    entries: dict = field(default_factory=dict)  # (timestep, layer, kind) -> dict of tensors
    layers: dict = field(default_factory=dict)  # layer name -> LayerInfo
    _nbytes: int = 0
    spill_dir: str | None = None  # the directory of a spilled store's files (None: in RAM)

    def __deepcopy__(self, memo):
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors, in RAM or on disk (the store's size)."""
        return self._nbytes

    @property
    def spilled(self) -> bool:
        return isinstance(self.entries, SpilledEntries)

    @property
    def ram_nbytes(self) -> int:
        """Bytes of stored tensors held in RAM (a spilled store: only the step being recorded)."""
        return self.entries.pending_nbytes if self.spilled else self._nbytes

    @property
    def disk_nbytes(self) -> int:
        """Bytes of a spilled store's files on disk (0 in RAM)."""
        return self.entries.disk_nbytes if self.spilled else 0

    def spill(self, root: str | None = None) -> str:
        """Move the store to disk: a new directory under `root` (default: tempfile's folder) owned by this store
        (deleted when it is garbage-collected); the finished steps are written at once, the last (current) step
        when the next one starts or at `flush()`. Returns the directory. Errors: OSError if it cannot be made."""
        if self.spilled:
            return self.spill_dir
        root = root or tempfile.gettempdir()
        os.makedirs(root, exist_ok=True)
        directory = tempfile.mkdtemp(prefix="zsve_store_", dir=root)
        weakref.finalize(self, shutil.rmtree, directory, True)
        spilled = SpilledEntries(directory)
        first: dict = {}  # timesteps in recording order; the last one (being recorded) stays in RAM
        for key in self.entries:
            first.setdefault(key[0], len(first))
        for key, data in sorted(self.entries.items(), key=lambda kv: first[kv[0][0]]):  # one file a step
            spilled[key] = data
        self.entries = spilled
        self.spill_dir = directory
        return directory

    def flush(self) -> None:
        """A spilled store: write the step being recorded to disk (end of the recording). RAM: nothing."""
        if self.spilled:
            self.entries.flush()

    def entry_nbytes(self, key: tuple) -> int:
        """Bytes of one entry (0 if absent), without reading a spilled entry from disk."""
        if self.spilled:
            return self.entries.nbytes_of(key)
        return sum(_nbytes(v) for v in self.entries.get(key, {}).values() if isinstance(v, torch.Tensor))

    @property
    def timesteps(self) -> list[int]:
        return sorted({key[0] for key in self.entries}, reverse=True)

    def has_step(self, timestep: int) -> bool:
        return any(key[0] == timestep for key in self.entries)

    def layer_names(self, kind: str) -> list[str]:
        return sorted({key[1] for key in self.entries if key[2] == kind})

    def add(self, timestep: int, layer: str, kind: str, data: dict, window: tuple | None = None) -> None:
        """`window`: the absolute frame indices of a context window; self-attention recorded under context
        windows is kept per window (its keys depend on the window's frames) and read back by the same window."""
        key = (int(timestep), layer, kind) if window is None else (int(timestep), layer, kind, tuple(window))
        self._nbytes -= self.entry_nbytes(key)
        self.entries[key] = data
        self._nbytes += sum(_nbytes(v) for v in data.values() if isinstance(v, torch.Tensor))

    def merge_window_cross(self, timestep: int, layer: str, window: Sequence[int], p: torch.Tensor) -> None:
        """Write a context window's cross-attention maps p [len(window), heads, Nq, T] into the layer's full-frame
        entry of this timestep (the blend masks read it), growing it to the frames seen so far. In RAM the
        existing tensor is written in place; in a spilled store the step's entry is in RAM until the step
        ends, and a merge into an entry already on disk writes a new copy."""
        key = (int(timestep), layer, "cross")
        idx = torch.as_tensor(list(window))
        n = max(self.frames, max(window) + 1)
        old = self.entries.get(key, {}).get("p")
        if old is not None and old.shape[0] >= n:
            in_ram = not self.spilled or key in self.entries.pending
            if in_ram:
                old[idx] = p  # in place: the merged entry's size is unchanged
                return
            full = old.clone()
        else:
            full = torch.zeros((n,) + tuple(p.shape[1:]), dtype=p.dtype)
            if old is not None:
                full[: old.shape[0]] = old
        full[idx] = p
        self.add(timestep, layer, "cross", {"p": full})

    def _entry(self, timestep: int, layer: str, kind: str) -> dict:
        e = self.entries.get((int(timestep), layer, kind))
        if e is None:
            raise StoreLookupError(f"no stored {kind}-attention for layer {layer} at timestep {timestep}")
        return e

    def self_qk(self, timestep: int, layer: str, frames: Sequence[int] | None = None, device=None,
                window: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The inversion's projected self-attention queries and keys of a layer: q [F, Nq, C], k [F, Nk, C]
        (keys shared by all frames are expanded, not copied), as stored (fp16). With `window` (a context
        window's frames) the entry recorded for that very window is used."""
        if window is not None:
            e = self.entries.get((int(timestep), layer, "self", tuple(window)))
            if e is not None:
                frames = None
            elif (int(timestep), layer, "self") not in self.entries:
                raise StoreLookupError(
                    f"no stored self-attention for layer {layer} at timestep {timestep} for the context window "
                    f"{list(window)}: sample the edit with the same context windows as the inversion")
            else:
                e = self._entry(timestep, layer, "self")
        else:
            e = self._entry(timestep, layer, "self")
        q, k = e["q"], e["k"]
        if frames is not None:
            idx = torch.as_tensor(list(frames))
            q = q[idx]
            k = k if k.shape[0] == 1 else k[idx]
        if device is not None:
            q, k = q.to(device), k.to(device)
        if k.shape[0] == 1 and q.shape[0] != 1:
            k = k.expand(q.shape[0], -1, -1)
        return q, k

    def self_probs(self, timestep: int, layer: str, frames: Sequence[int] | None = None,
                   device=None, window: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                   head_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-head self-attention probabilities of the inversion, recomputed from `self_qk`:
        [F, heads, Nq, Nk] in `dtype` (float32 by default), only the heads (h0, h1) of `head_range` if given."""
        q, k = self.self_qk(timestep, layer, frames, device, window)
        return attention_probs(q, k, self.layers[layer].heads, dtype=dtype, head_range=head_range)

    def cross_probs(self, timestep: int, layer: str, frames: Sequence[int] | None = None,
                    device=None, window: Sequence[int] | None = None) -> torch.Tensor:
        """Per-head cross-attention probabilities of the inversion: [F, heads, Nq, T] float32."""
        if window is not None:
            e = self.entries.get((int(timestep), layer, "cross", tuple(window)))
            if e is not None:
                return e["p"].to(device=device, dtype=torch.float32)
        p = self._entry(timestep, layer, "cross")["p"]
        if frames is not None:
            p = p[torch.as_tensor(list(frames))]
        return p.to(device=device, dtype=torch.float32)

    def cross_mean(self, timestep: int, layer: str) -> torch.Tensor:
        """Head-averaged cross-attention [F, Nq, T] float32 (for masks)."""
        return self._entry(timestep, layer, "cross")["p"].float().mean(1)

    @property
    def bytes_per_frame_step(self) -> int:
        """Stored bytes per frame per recorded step (what a longer clip or more steps add)."""
        return self.nbytes // max(1, self.frames * len(self.timesteps))

    def where(self) -> str:
        """Where the store lives, for the UI text: RAM, or the spill directory with its size on disk."""
        if not self.spilled:
            return "in RAM (CPU)"
        e = self.entries
        return (f"spilled to disk: {format_bytes(e.disk_nbytes)} in {e.files} file(s) in {self.spill_dir} (deleted "
                f"with the inversion), {format_bytes(self.ram_nbytes)} in RAM")

    def summary(self) -> str:
        n_steps = len(self.timesteps)
        return (f"attention store: {self.frames} frame(s), {n_steps} step(s), {len(self.layer_names('self'))} self / "
                f"{len(self.layer_names('cross'))} cross layer(s), {self.nbytes / 2**20:.2f} MiB (fp16), "
                f"{format_bytes(self.bytes_per_frame_step)} per frame per step, {self.where()}")


def _latent_hw(call) -> tuple[int, int]:
    shape = call.extra.get("original_shape") if call.extra else None
    if shape is None:
        return call.hw
    return int(shape[-2]), int(shape[-1])


def layer_factor(latent_hw: tuple[int, int], hw: tuple[int, int]) -> int:
    return max(1, int(round(latent_hw[0] / max(1, hw[0]))))


class AttentionRecorder:
    """A processor that fills an AttentionStore during the inversion (one recorder per run)."""

    def __init__(self, config: StoreConfig):
        self.config = config
        self.store: AttentionStore | None = None
        self._step_t: int | None = None
        self._first_step_bytes = 0
        self._steps_seen = 0
        self._kept: int | None = None

    def _edit_step(self, call) -> int | None:
        """The edit step index (0 = noisiest) this evaluation corresponds to, if the schedule is known."""
        if call.step_index is None or call.total_steps is None:
            return None
        ss = call.extra.get("sample_sigmas") if call.extra else None
        ascending = ss is not None and float(ss[0]) < float(ss[-1])
        n = call.total_steps
        if ascending:  # inversion: sigma index k (1..N) <-> edit step N - k
            return n - call.step_index
        return call.step_index

    def needs_probs(self, call) -> bool:
        """Self-attention is recorded as q/k (no probabilities); cross-attention as maps."""
        return call.kind == "cross"

    def kinds(self, call) -> set[int]:
        return {0}

    def active(self, call) -> bool:
        cfg = self.config
        if call.kind == "self" and not cfg.self_attention:
            return False
        if call.kind == "cross" and not cfg.cross_attention:
            return False
        if 0 not in call.cond_or_uncond:
            return False
        factor = layer_factor(_latent_hw(call), call.hw)
        if factor < cfg.min_factor or (cfg.factors is not None and factor not in cfg.factors):
            return False
        i = self._edit_step(call)
        if i is not None and i >= kept_steps(call.total_steps, cfg.record_window):
            return False
        return True

    def _budget_error(self, need: int) -> StoreBudgetError:
        b = self.config.budget_bytes
        return StoreBudgetError(
            f"the attention store needs {format_bytes(need)}, more than its memory budget of {format_bytes(b)}. "
            + ("" if self.config.head_mean else  # the recompute mode's mask record: that mode is already set
               "Set AttentionStore's source_attention to 'recompute at edit' (only the mask level is kept, the edit "
               "recomputes each fused step), or ")
            + "set its over_budget to 'spill to disk' (the store in files on disk), lower its "
            "record_window (only the steps of the replace windows are needed), use fewer frames or a smaller "
            "resolution, keep skip_full_res on, or raise memory_budget_gb."
        )

    def _spill_root(self) -> str:
        return self.config.spill_dir or tempfile.gettempdir()

    def _over_budget(self, need: int) -> None:
        """The store (projected: `need` bytes in all) exceeds the budget: refuse, or (config.spill) check that the
        disk has room for it and spill the store from now on. Errors: StoreBudgetError, StoreDiskError."""
        if not self.config.spill:
            raise self._budget_error(need)
        root = self._spill_root()
        os.makedirs(root, exist_ok=True)
        free = shutil.disk_usage(root).free
        st = self.store
        on_disk = st.disk_nbytes if st.spilled else 0
        want = int((need - on_disk) * (1 + SPILL_DISK_HEADROOM))
        if free < want:
            raise StoreDiskError(
                f"the attention store needs {format_bytes(need)}, more than its memory budget of "
                f"{format_bytes(self.config.budget_bytes)}, and cannot spill to disk: {root} has "
                f"{format_bytes(free)} free, {format_bytes(want)} needed (the store + {SPILL_DISK_HEADROOM:.0%}). "
                "Free disk space there (ComfyUI's temp directory, --temp-directory), lower AttentionStore's "
                "record_window, use fewer frames or a smaller resolution, or raise AttentionStore's memory_budget_gb "
                "and set over_budget to 'refuse'."
            )
        if not st.spilled:
            d = st.spill(root)
            log.info("Attention Store: the store (%s projected) exceeds memory_budget_gb (%s): spilling to %s",
                     format_bytes(need), format_bytes(self.config.budget_bytes), d)

    def __call__(self, call, probs):
        cfg = self.config
        window = tuple(call.frame_index) if call.frame_index is not None else None
        latent_hw = _latent_hw(call)
        if self.store is None:
            self.store = AttentionStore(config=cfg, frames=call.frames if window is None else max(window) + 1,
                                        latent_hw=latent_hw, num_steps=call.total_steps)
            hint = full_res_hint(cfg, latent_hw)
            if hint:
                log.info("Attention Store: %s", hint)
        st = self.store
        if window is not None:
            st.frames = max(st.frames, max(window) + 1)
        elif call.frames != st.frames:
            raise ValueError(f"attention store: a call with {call.frames} frames in a recording of {st.frames}")
        # Step bookkeeping: project the total after the first recorded step.
        if call.timestep != self._step_t:
            if self._step_t is not None:
                self._steps_seen += 1
                if self._steps_seen == 1 and cfg.budget_bytes and call.total_steps:
                    projected = self._first_step_bytes * kept_steps(call.total_steps, cfg.record_window)
                    if projected > cfg.budget_bytes:
                        self._over_budget(projected)  # refuses, or spills (the first step is written too)
            self._step_t = call.timestep
        rows = call.rows(0)
        src = call.q if call.kind == "self" else probs
        idx = torch.as_tensor(rows, device=src.device if src is not None else "cpu")
        info = st.layers.get(call.layer)
        if call.kind == "self":
            if call.q is None or call.k is None:
                raise RuntimeError("the attention dispatcher did not pass q/k to the recorder")
            q = call.q.index_select(0, idx).detach().to("cpu", cfg.dtype)
            k = call.k.index_select(0, idx).detach().to("cpu", cfg.dtype)
            if k.shape[0] > 1 and torch.equal(k, k[:1].expand_as(k)):
                k = k[:1].clone()
            data = {"q": q, "k": k}
            channels = q.shape[-1]
        else:
            p = probs.index_select(0, idx).detach().to("cpu", cfg.dtype)
            data = {"p": p.float().mean(1, keepdim=True) if cfg.head_mean else p}
            channels = call.q.shape[-1] if call.q is not None else 0
        if info is None:
            st.layers[call.layer] = LayerInfo(hw=tuple(call.hw), heads=call.heads, channels=int(channels),
                                              factor=layer_factor(latent_hw, call.hw))
        if window is not None and call.kind == "cross":
            # cross-attention under context windows: kept per window (read back by the same window, exact) and
            # merged into one full-frame tensor for the blend masks (each window writing its frames)
            st.merge_window_cross(call.timestep, call.layer, window, data["p"])
        new = sum(_nbytes(v) for v in data.values())
        key = (int(call.timestep), call.layer, call.kind) + ((window,) if window is not None else ())
        new -= st.entry_nbytes(key)
        if cfg.budget_bytes and not st.spilled and st.nbytes + new > cfg.budget_bytes:
            need = st.nbytes + new
            if self._steps_seen == 0 and call.total_steps:  # within the first step: at least this much a step
                need = max(need, (self._first_step_bytes + new) * kept_steps(call.total_steps, cfg.record_window))
            self._over_budget(need)
        st.add(call.timestep, call.layer, call.kind, data, window=window)
        if self._steps_seen == 0:
            self._first_step_bytes += new
        return None

    def finalize(self) -> AttentionStore | None:
        if self.store is not None:
            self.store.flush()  # a spilled store: the last step to disk
        return self.store


def mask_factor(factors: Sequence[int], wanted: int = 4) -> int:
    """The recorded factor closest to `wanted` (ties: the coarser): the level of FateZero's blend masks
    (attention/fatezero.py mask_layers, 16x16 at 512 px: factor 4)."""
    return min(factors, key=lambda f: (abs(math.log(f / wanted)), -f))


@dataclass(eq=False)
class RecomputedAttention:
    """What an inversion with `StoreConfig.recompute` keeps in `Inversion.records["attention"]`: the settings and
    `masks`, the head-mean cross-attention of the blend-mask level only (an AttentionStore, `head_mean`; 394 KiB per
    frame per step for SD1.5 at 512 px, for Attention Blend's mask output). The edit (Attention Blend) runs the
    source pass of each fused step again, at the inversion's own inputs (the trajectory latent and timestep, the
    source prompt), records that step into a fresh AttentionStore with `config` and fuses from it
    (nodes/_source_pass.py). Cost: one UNet pass over the frames' conditional rows per fused step."""

    config: StoreConfig
    masks: AttentionStore | None = None
    recompute: bool = True

    def __deepcopy__(self, memo):
        return self

    @property
    def nbytes(self) -> int:
        return self.masks.nbytes if self.masks is not None else 0

    @property
    def ram_nbytes(self) -> int:
        return self.masks.ram_nbytes if self.masks is not None else 0

    def summary(self) -> str:
        kept = (f"{self.nbytes / 2**20:.2f} MiB ({format_bytes(self.masks.bytes_per_frame_step)} per frame per step), "
                f"{self.masks.where()}") if self.masks is not None else "0 B"
        return ("attention recomputed at the edit (one extra UNet pass per fused step); kept: the blend-mask level's "
                f"head-mean cross-attention, {kept}")


class _MaskRecorder:
    """The recorder of a recompute-mode store: head-mean cross-attention of the mask level, nothing else."""

    def __init__(self, config: StoreConfig):
        self.config = config
        self.inner = AttentionRecorder(replace(config, self_attention=False, cross_attention=True, head_mean=True,
                                               dtype=torch.float16, recompute=False))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, call, probs):
        return self.inner(call, probs)

    def finalize(self) -> RecomputedAttention:
        return RecomputedAttention(self.config, masks=self.inner.finalize())


class AttentionStoreSpec:
    """A record spec (nodes/_comfy.py run_inversion): a fresh recorder per inversion run."""

    def __init__(self, config: StoreConfig):
        self.config = config

    def __deepcopy__(self, memo):
        return self

    def new_recorder(self) -> AttentionRecorder | _MaskRecorder:
        return _MaskRecorder(self.config) if self.config.recompute else AttentionRecorder(self.config)


# --- size of a configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    name: str
    factor: int  # latent size / query map size
    channels: int
    heads: int


# SD1.5 UNet transformer blocks (ComfyUI keys), see ../../shared/reference/comfyui-hooks.md §1.4.
SD15_LAYERS = tuple(
    [LayerSpec(f"input_{b}_0", 1, 320, 8) for b in (1, 2)]
    + [LayerSpec(f"input_{b}_0", 2, 640, 8) for b in (4, 5)]
    + [LayerSpec(f"input_{b}_0", 4, 1280, 8) for b in (7, 8)]
    + [LayerSpec("middle_0_0", 8, 1280, 8)]
    + [LayerSpec(f"output_{b}_0", 4, 1280, 8) for b in (3, 4, 5)]
    + [LayerSpec(f"output_{b}_0", 2, 640, 8) for b in (6, 7, 8)]
    + [LayerSpec(f"output_{b}_0", 1, 320, 8) for b in (9, 10, 11)]
)


def _kv(layer: LayerSpec, frames: int, mode: str, include_self: bool, min_channels: int) -> tuple[int, bool]:
    """(key frames per frame, keys identical for all frames) for a layer under a temporal mode."""
    if mode == "per-frame" or layer.channels < min_channels or frames <= 1:
        return 1, frames <= 1
    keys = key_frames(mode, frames, include_self)
    return len(keys[0]), shares_keys(keys)


def estimate_store_bytes(frames: int, latent_hw: tuple[int, int], steps: int, record_window: float = 1.0,
                         min_factor: int = 2, temporal_mode: str = "middle", include_self: bool = False,
                         min_channels: int = 0, layers: Sequence[LayerSpec] = SD15_LAYERS,
                         self_attention: bool = True, cross_attention: bool = True, dtype_bytes: int = 2) -> int:
    """Bytes this pack's store needs for a configuration (same accounting as AttentionStore)."""
    per_step = 0
    for lay in layers:
        if lay.factor < min_factor:
            continue
        h, w = latent_hw[0] // lay.factor, latent_hw[1] // lay.factor
        nq = h * w
        k, shared = _kv(lay, frames, temporal_mode, include_self, min_channels)
        if self_attention:
            per_step += entry_nbytes("self", frames, nq, k * nq, lay.channels, lay.heads, shared, dtype_bytes=dtype_bytes)
        if cross_attention:
            per_step += entry_nbytes("cross", frames, nq, TEXT_TOKENS, lay.channels, lay.heads, dtype_bytes=dtype_bytes)
    return per_step * kept_steps(steps, record_window)


def estimate_fatezero_bytes(frames: int, latent_hw: tuple[int, int], steps: int, temporal_mode: str = "middle",
                            include_self: bool = False, min_channels: int = 640,
                            layers: Sequence[LayerSpec] = SD15_LAYERS, dtype_bytes: int = 2) -> int:
    """Bytes of FateZero's own store for comparison: per-head self and cross probabilities of every layer
    with at most 32x32 queries, every step (attention_store.py, algorithms.md §1.2)."""
    per_step = 0
    for lay in layers:
        h, w = latent_hw[0] // lay.factor, latent_hw[1] // lay.factor
        nq = h * w
        if nq > 32 * 32:
            continue
        k, _ = _kv(lay, frames, temporal_mode, include_self, min_channels)
        per_step += frames * lay.heads * nq * (k * nq + TEXT_TOKENS) * dtype_bytes
    return per_step * steps
