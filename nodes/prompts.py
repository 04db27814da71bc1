"""Edit Prompts (issue 16): the source, edit and negative prompts typed once, encoded like CLIP Text Encode, and
the prompt pair (ZSVE_PROMPT_PAIR) that every attention-control node reads its word positions from.

Word positions come from the very tokenization that made the conditionings (`clip.tokenize`), so ComfyUI's prompt
syntax aligns: `(red:1.3)` / `[...]` weights (a weight scales the token's embedding, not its position),
escaped parentheses `\\(`, and `embedding:name` textual inversions (one placeholder word whose tokens are the
embedding's vectors). The prompt pair holds, for each prompt, its *plain text*: the words ComfyUI tokenized, weight
syntax and escapes removed, embeddings written `embedding:name`, and a tokenizer adapter (`PairTokenizer`) whose
`encode(plain text)` returns exactly ComfyUI's token ids. attention/align.py then works on (plain text, adapter)
as on any text: word swap, refinement, reweighting and blend words refer to the plain words.

Refused with a message: prompts longer than one 75-token CLIP chunk (Prompt-to-Prompt control works on one
77-token context), text the tokenizer changes so that words cannot be matched to tokens (align.AlignmentError).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import comfy.sd1_clip as sd1_clip
import torch
from comfy_api.latest import io

from ..attention import align
from ..attention.p2p import END_OF_TEXT_MAPS
from ._comfy import CATEGORY, ZSVEInputError
from .contract import conditioning_matches

NODE = "EditPrompts"
PromptPairType = io.Custom("ZSVE_PROMPT_PAIR")
EMBEDDING_ID_BASE = 10_000_000  # placeholder token ids of embedding vectors (CLIP's vocabulary is 49408)


def end_of_text_maps_input() -> io.Combo.Input:
    """The `end_of_text_maps` input of every node with Prompt-to-Prompt cross-attention control (Attention Blend,
    Video-P2P Guider, InFusion Inject): one definition, one default (attention/p2p.py `END_OF_TEXT_MAPS`)."""
    return io.Combo.Input(
        "end_of_text_maps", options=list(END_OF_TEXT_MAPS), default=END_OF_TEXT_MAPS[0], optional=True,
        tooltip="Cross-attention maps of the edit prompt's end-of-text token and padding while the source's maps "
        "are followed. edit (default): their own maps; CLIP reads the whole prompt into them, the changed words "
        "included, so the source's maps there pull the edit back to the source (toy model: a gray background "
        "asked to become black stays gray). source: the source's maps, as Prompt-to-Prompt, FateZero and "
        "Video-P2P do.")


def end_of_text_note(maps: str) -> str:
    """The line the P2P-controlled nodes add to their UI text when cross-attention control is active, so that a
    workflow saved before the input existed (and now running with its default) says what it does."""
    if maps == "source":
        return ("end_of_text_maps source: the edit prompt's end-of-text token and padding take the source's maps "
                "(Prompt-to-Prompt's alignment)")
    return ("end_of_text_maps edit: the edit prompt's end-of-text token and padding keep their own maps (the "
            "pack's default; 'source' gives Prompt-to-Prompt's alignment)")


def _sd_tokenizer(clip, node: str):
    """The CLIP-L SDTokenizer of a CLIP (SD1.x; SDXL's clip_l too)."""
    tok = getattr(clip, "tokenizer", None)
    for name in ("clip_l", "clip_g"):
        sd_tok = getattr(tok, name, None)
        if sd_tok is not None and hasattr(sd_tok, "tokenizer"):
            return name[-1], sd_tok
    raise ZSVEInputError(f"{node}: this CLIP has no CLIP-L/G tokenizer; connect the CLIP of an SD1.x/2.x or "
                         "SDXL-family checkpoint.")


class PairTokenizer:
    """The align.Tokenizer protocol over the prompts' own tokenization: `encode(plain text)` returns ComfyUI's
    ids (BOS, content, EOS) for a plain text of the pair, the Hugging Face tokenizer for any other text;
    `decode([id])` a token's text (embedding placeholders: '' but the last, which carries the whole word)."""

    def __init__(self, hf, start: int, end: int):
        self.hf = hf
        self.start, self.end = start, end
        self.table: dict[str, list[int]] = {}
        self.pieces: dict[int, str] = {}

    def __deepcopy__(self, memo):
        return self

    def encode(self, text: str) -> list[int]:
        if text in self.table:
            return list(self.table[text])
        return list(self.hf(text)["input_ids"])

    def decode(self, ids) -> str:
        i = int(ids[0])
        if i in self.pieces:
            return self.pieces[i]
        return self.hf.decode([i])


def _entries(text: str, ident: str | None) -> list[tuple[str, str]]:
    """ComfyUI's split of a prompt into tokenized entries (sd1_clip.SDTokenizer.tokenize_with_weights): weight
    groups (ComfyUI's own parser), each split at embedding identifiers; [(kind 'text'|'embedding', text)]."""
    out: list[tuple[str, str]] = []
    for segment, _weight in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0):
        seg = sd1_clip.unescape_important(segment)
        if ident is None:
            if seg != "":
                out.append(("text", seg))
            continue
        parts = re.split(" {0}|\n{0}".format(re.escape(ident)), seg)
        pieces = [("text", parts[0])] + [("embedding", ident + p) for p in parts[1:]]
        for kind, piece in pieces:
            if piece == "":
                continue
            if kind == "text" and piece.startswith(ident):
                kind = "embedding"
            if kind == "embedding":
                words = piece[len(ident):].strip("\n").split()
                out.append(("embedding", ident + (words[0] if words else "")))
                if len(words) > 1:
                    out.append(("text", " ".join(words[1:])))
            else:
                out.append(("text", piece))
    return out


@dataclass(eq=False)
class PromptSide:
    """One prompt: the text as typed, its plain text (see the module doc), and its CONDITIONING."""

    text: str
    plain: str
    conditioning: list
    n_tokens: int  # content tokens (without BOS/EOS)

    def __deepcopy__(self, memo):
        return self

    @property
    def embedding(self) -> torch.Tensor:
        """The text embedding [1, 77*k, dim] of the conditioning (what the sampler's positive must carry)."""
        return self.conditioning[0][0]

    @property
    def pooled(self) -> torch.Tensor | None:
        """The pooled text embedding [1, D'] (SDXL: clip_g's, part of the model's `y`), or None (SD1.x)."""
        p = self.conditioning[0][1].get("pooled_output")
        return p if torch.is_tensor(p) else None


@dataclass(eq=False)
class PromptPair:
    """ZSVE_PROMPT_PAIR: source, edit and negative prompt with one tokenizer adapter for word positions."""

    source: PromptSide
    edit: PromptSide
    negative: PromptSide
    tokenizer: PairTokenizer
    notes: list[str] = field(default_factory=list)

    def __deepcopy__(self, memo):
        return self

    def summary(self) -> str:
        return (f"source: {self.source.plain!r} ({self.source.n_tokens} tokens); edit: {self.edit.plain!r} "
                f"({self.edit.n_tokens} tokens)")


def _side(clip, text: str, ptok: PairTokenizer, key: str, sd_tok, emb_ids: dict, what: str,
          align_words: bool) -> PromptSide:
    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens_scheduled(tokens)
    if not align_words:
        return PromptSide(text, text, cond, 0)
    with_ids = clip.tokenize(text, return_word_ids=True)[key]
    if len(with_ids) > 1:
        n = sum(1 for chunk in with_ids for t in chunk if t[2] != 0)
        raise ZSVEInputError(
            f"{NODE}: the {what} prompt has {n} tokens, more than one CLIP chunk (75): Prompt-to-Prompt attention "
            "control aligns words within one 77-token context. Shorten the prompt to 75 tokens."
        )
    content = [t for t in with_ids[0] if t[2] != 0]
    groups: dict[int, list] = {}
    for tok, _w, wid in content:
        groups.setdefault(int(wid), []).append(tok)
    # ComfyUI splits at embedding names only where it has an embedding directory
    ident = sd_tok.embedding_identifier if getattr(sd_tok, "embedding_directory", None) is not None else None
    entries = _entries(text, ident)
    ids: list[int] = []
    plain = ""
    for i, (kind, piece) in enumerate(entries):
        got = groups.get(i + 1, [])
        if kind == "embedding":
            if not got or not all(torch.is_tensor(t) for t in got):
                raise ZSVEInputError(
                    f"{NODE}: the {what} prompt names {piece!r}, which ComfyUI did not find (it skips the word and "
                    "logs a warning), so the words cannot be matched to the tokens. Put the embedding file in "
                    "ComfyUI/models/embeddings or remove the word."
                )
            for k in range(len(got)):
                tid = emb_ids.setdefault((piece, k), EMBEDDING_ID_BASE + len(emb_ids))
                ptok.pieces[tid] = piece if k == len(got) - 1 else ""
                ids.append(tid)
            plain += (" " if plain and not plain.endswith(" ") else "") + piece + " "
            continue
        expected = sd_tok.tokenizer(piece)["input_ids"][sd_tok.tokens_start:-1 if sd_tok.tokenizer_adds_end_token
                                                        else None]
        if any(torch.is_tensor(t) for t in got) or [int(t) for t in got] != list(expected):
            raise ZSVEInputError(
                f"{NODE}: cannot match the {what} prompt's words to the tokens ComfyUI made of {piece!r}; write the "
                "prompt without this syntax (plain words, (word:weight) and embedding:name are supported)."
            )
        ids.extend(int(t) for t in got)
        plain += piece
    if sum(len(g) for g in groups.values()) != len(ids):
        raise ZSVEInputError(f"{NODE}: cannot match the {what} prompt's words to its tokens (ComfyUI made "
                             f"{len(content)} tokens, the words {len(ids)}); simplify the prompt syntax.")
    plain = " ".join(plain.split())
    ptok.table[plain] = [sd_tok.start_token] + ids + [sd_tok.end_token]
    try:
        align.word_spans(plain, ptok)
    except align.AlignmentError as e:
        raise ZSVEInputError(f"{NODE}: {what} prompt: {e}") from None
    return PromptSide(text, plain, cond, len(ids))


def make_prompt_pair(clip, source_text: str, edit_text: str, negative_text: str = "") -> PromptPair:
    """Encode the three prompts as CLIP Text Encode does and build the pair's word/token alignment."""
    if clip is None:
        raise ZSVEInputError(f"{NODE}: connect the CLIP of the checkpoint (CLIP output of Load Checkpoint).")
    if not (source_text or "").strip() or not (edit_text or "").strip():
        raise ZSVEInputError(f"{NODE}: give both the source prompt (what the video shows) and the edit prompt.")
    key, sd_tok = _sd_tokenizer(clip, NODE)
    ptok = PairTokenizer(sd_tok.tokenizer, sd_tok.start_token, sd_tok.end_token)
    emb_ids: dict = {}
    source = _side(clip, source_text, ptok, key, sd_tok, emb_ids, "source", True)
    edit = _side(clip, edit_text, ptok, key, sd_tok, emb_ids, "edit", True)
    negative = _side(clip, negative_text or "", ptok, key, sd_tok, emb_ids, "negative", False)
    notes = []
    if source.plain != source.text.strip() or edit.plain != edit.text.strip():
        notes.append(f"words for attention control: source {source.plain!r}, edit {edit.plain!r}")
    return PromptPair(source, edit, negative, ptok, notes)


def check_pair(prompts, node: str) -> PromptPair:
    if not isinstance(prompts, PromptPair):
        raise ZSVEInputError(f"{node}: 'prompts' must be the prompt pair output of Edit Prompts (source -> edit).")
    return prompts


def check_inversion_prompt(prompts: PromptPair, inversion, node: str) -> None:
    """Refuse a prompt pair whose source prompt is not the prompt the inversion was made with."""
    info = getattr(inversion, "info", {})
    ref = info.get("positive_embedding")
    if ref is None:
        return
    if not conditioning_matches([{"cross_attn": ref, "pooled_output": info.get("positive_pooled")}],
                                prompts.source.embedding, prompts.source.pooled):
        raise ZSVEInputError(
            f"{node}: the inversion was made with another positive prompt than the prompt pair's source "
            f"({prompts.source.text!r}): the recorded attention belongs to that other prompt. Connect Edit Prompts' "
            "'source' CONDITIONING to Video DDIM Invert's positive (or correct source_text)."
        )


class EditPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Edit Prompts (source -> edit)",
            category=CATEGORY,
            description=(
                "Type the prompts once: the source prompt (what the video shows), the edit prompt and the negative "
                "prompt, encoded exactly as CLIP Text Encode encodes them, plus the prompt pair that Attention Blend, "
                "InFusion Inject, the Video-P2P Guider and Latent Blend With Inversion read their word positions "
                "from. Word positions come from the same tokenization as the conditionings, so (word:weight), "
                "escaped parentheses and embedding:name align. Connect 'source' to Video DDIM Invert's positive and "
                "'edit' / 'negative' to the edit sampler."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint (SD1.x/2.x or SDXL family; on SDXL the "
                              "conditionings carry the pooled output, as CLIP Text Encode makes them)."),
                io.String.Input("source_text", multiline=True, default="",
                                tooltip="The source prompt: a text that describes the input video (FateZero/Video-P2P "
                                "invert with it), e.g. 'a silver jeep driving down a road'."),
                io.String.Input("edit_text", multiline=True, default="",
                                tooltip="The edit prompt: the source prompt with the words changed that should change, "
                                "e.g. 'a red jeep driving down a road' (same word count: word swap; otherwise "
                                "refinement)."),
                io.String.Input("negative_text", multiline=True, default="", optional=True,
                                tooltip="The negative prompt of the edit's guidance (empty in the papers). Keep it "
                                "within 75 tokens."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="source", tooltip="The source prompt's CONDITIONING: Video DDIM "
                                       "Invert's positive (and Null-Text Optimize's source)."),
                io.Conditioning.Output(display_name="edit", tooltip="The edit prompt's CONDITIONING: the edit "
                                       "sampler's positive."),
                io.Conditioning.Output(display_name="negative", tooltip="The negative prompt's CONDITIONING: the edit "
                                       "sampler's negative (and Null-Text Optimize's empty)."),
                PromptPairType.Output(display_name="prompts", tooltip="The prompt pair (texts, conditionings and "
                                      "their token alignment) for the attention-control nodes."),
            ],
        )

    @classmethod
    def execute(cls, clip, source_text, edit_text, negative_text="") -> io.NodeOutput:
        pair = make_prompt_pair(clip, source_text, edit_text, negative_text or "")
        return io.NodeOutput(pair.source.conditioning, pair.edit.conditioning, pair.negative.conditioning, pair,
                             ui={"text": [pair.summary()] + pair.notes})


NODES = [EditPrompts]
