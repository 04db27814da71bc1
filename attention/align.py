"""Prompt-to-Prompt token alignment between a source and an edit prompt (written from the algorithm's
description in the P2P paper/code notes, not copied).

Everything works on a minimal tokenizer protocol:

    encode(text) -> list[int]   token ids including BOS and EOS
    decode([id]) -> str         the surface text of one token (no added spaces)

ComfyUI's SD1 tokenizer exposes the Hugging Face CLIPTokenizer as `clip.tokenizer.clip_l.tokenizer`, which
satisfies it. Token positions are positions in the 77-token text context (BOS at 0).

- `word_spans`: which context positions belong to each whitespace-separated word (a word may span
  several tokens: "watercolor" -> "water" "color", "car," -> "car" ",").
- `word_indices`: the positions of a word (all its occurrences) or of the n-th word.
- `phrase_positions`: the positions of each comma-separated phrase of a words input ("red hat, green dots"),
  or `WordNotInPrompt` naming the word that is missing: the one place every node's words input is read
  (FateZero's blend words, reweight and per-word windows, Video-P2P's Local Blend words, InFusion's concepts,
  Latent Blend's and Source Attention Mask's words).
- `replacement_mapper`: a [T, T] matrix M for a word swap between prompts with the same number of words:
  edit map column j = sum_i source column i * M[i, j]. Unchanged words map one-to-one; a swapped word's
  attention mass is spread evenly over the new word's tokens; the tail (EOS + padding) maps in order.
- `refinement_mapper`: for prompts that add/remove words: a global (Needleman-Wunsch) alignment of
  the token sequences; target position j takes the source column mapper[j], or keeps its own map where
  alphas[j] == 0 (tokens that have no counterpart in the source). Ties as in P2P's seq_aligner. Difference
  from the reference, on purpose: the positions after the target's end-of-text token map in order onto the
  source's end-of-text and padding; the reference maps target position j to source position j, so when the
  source is longer the target's padding takes the maps of source *words* (e.g. 'a red car on a road' -> 'a car':
  padding positions 4, 5, 6 take 'on', 'a', 'road'). tests/test_align.py shows both.

This module does not import ComfyUI.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Protocol

import torch

MAX_LEN = 77


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class AlignmentError(ValueError):
    """A prompt that cannot be aligned; the message says what to change."""


class WordNotInPrompt(AlignmentError):
    """A word of a words input that is not a whole word of the prompt it must come from. The message names the
    word, the prompt, the prompt's words and, when the word is only part of a longer word there, that word;
    callers prefix the input's and the node's names."""

    def __init__(self, word: str, text: str, which: str = ""):
        self.word, self.text = word, text
        words = ", ".join(dict.fromkeys(w for w in (normalise_word(x) for x in text.split()) if w))
        prompt = f"the {which} prompt" if which else "the prompt"
        syntax = (" (words inputs take the plain words, without weight syntax such as '(red:1.2)')"
                  if any(c in word for c in "()[]:") else "")
        super().__init__(f"'{word}' is not a word of {prompt} {text!r}{missing_word_hint(text, word)}{syntax} "
                         f"(its words: {words})")


def normalise_word(word: str) -> str:
    return word.lower().strip(string.punctuation + " ")


def _tokens(text: str, tokenizer: Tokenizer, max_len: int) -> list[int]:
    ids = list(tokenizer.encode(text))
    if len(ids) > max_len:
        raise AlignmentError(
            f"the prompt {text!r} has {len(ids) - 2} tokens; attention control works on one {max_len}-token context "
            f"({max_len - 2} tokens at most): shorten the prompt"
        )
    return ids[1:-1]


def end_of_text(text: str, tokenizer: Tokenizer, max_len: int = MAX_LEN) -> int:
    """Context position of the end-of-text token of `text` (BOS at 0: the number of word tokens + 1); the padding
    follows it. Raises AlignmentError when `text` is longer than the context."""
    return len(_tokens(text, tokenizer, max_len)) + 1


def word_spans(text: str, tokenizer: Tokenizer, max_len: int = MAX_LEN) -> list[tuple[str, list[int]]]:
    """[(word, [context positions])] for the whitespace-separated words of `text`."""
    ids = _tokens(text, tokenizer, max_len)
    pieces = [tokenizer.decode([i]).strip("#").replace(" ", "") for i in ids]
    words = text.split()
    spans: list[tuple[str, list[int]]] = []
    pos = 0
    for word in words:
        target = len(word.replace(" ", ""))
        got = 0
        span: list[int] = []
        while got < target and pos < len(pieces):
            got += len(pieces[pos])
            span.append(pos + 1)  # +1: BOS occupies position 0
            pos += 1
        if got != target and word.strip():
            # The tokenizer changed the word's length (unicode normalisation, dropped characters).
            raise AlignmentError(
                f"cannot match the word {word!r} of {text!r} to its tokens; avoid special characters in the prompt"
            )
        spans.append((word, span))
    # Whatever the tokenizer produced beyond the words (should not happen) is attached to the last word.
    if pos < len(pieces) and spans:
        spans[-1][1].extend(range(pos + 1, len(pieces) + 1))
    return spans


def word_indices(text: str, word: str | int, tokenizer: Tokenizer, max_len: int = MAX_LEN) -> list[int]:
    """Context positions of `word` in `text`: every occurrence of a word (case and punctuation are
    ignored), or the word at index `word` if an int. Empty if the word does not occur."""
    spans = word_spans(text, tokenizer, max_len)
    if isinstance(word, int):
        return list(spans[word][1]) if 0 <= word < len(spans) else []
    key = normalise_word(word)
    out: list[int] = []
    for w, span in spans:
        if normalise_word(w) == key:
            out.extend(span)
    return out


def split_phrases(words: str | Sequence[str]) -> list[list[str]]:
    """'red hat, green dots' -> [['red', 'hat'], ['green', 'dots']]: the comma-separated phrases of a words input,
    each split into its whitespace-separated words (empty phrases dropped). A list is taken as the phrases."""
    parts = words.split(",") if isinstance(words, str) else list(words)
    return [ws for ws in (p.split() for p in parts) if ws]


def phrase_positions(text: str, words: str | Sequence[str], tokenizer: Tokenizer, which: str = "",
                     max_len: int = MAX_LEN) -> list[list[int]]:
    """Context positions (BOS at 0) of each phrase of a words input in `text`, one sorted list per phrase.

    words: comma-separated phrases ('red hat, green dots') or a list of phrases; a phrase is one or more
    whitespace-separated words (case and punctuation ignored, whole words only). Where the phrase's words occur in
    `text` in order and next to each other, the positions are those of every such run ('red hat' in 'a red hat and
    red shoes' is positions of 'red hat' only); otherwise (words apart, or a single word) every occurrence of each
    word. Empty phrases and punctuation-only words ('-') are dropped; an empty input gives [].

    Raises WordNotInPrompt for the first word that is not a word of `text` (`which` names the prompt in the
    message: 'source', 'edit'), AlignmentError when `text` is longer than the context."""
    spans = word_spans(text, tokenizer, max_len)
    keys = [normalise_word(w) for w, _ in spans]
    out: list[list[int]] = []
    for phrase in split_phrases(words):
        # punctuation-only words ('-') name no token: left out (a phrase of nothing else is dropped)
        phrase = [w for w in phrase if normalise_word(w)]
        if not phrase:
            continue
        want = [normalise_word(w) for w in phrase]
        for w, key in zip(phrase, want):
            if key not in keys:
                raise WordNotInPrompt(w, text, which)
        k = len(want)
        runs = [i for i in range(len(keys) - k + 1) if keys[i:i + k] == want] if k > 1 else []
        if runs:
            pos = {p for i in runs for _, span in spans[i:i + k] for p in span}
        else:
            pos = {p for (_, span), key in zip(spans, keys) if key in want for p in span}
        out.append(sorted(pos))
    return out


def _tail(mapper_fill, src_end: int, dst_end: int, max_len: int) -> None:
    """Map positions from dst_end on (EOS, padding) in order onto the source positions from src_end."""
    for j in range(dst_end, max_len):
        mapper_fill(min(src_end + (j - dst_end), max_len - 1), j)


def replacement_mapper(source: str, target: str, tokenizer: Tokenizer, max_len: int = MAX_LEN) -> torch.Tensor:
    """[max_len, max_len] word-swap mapper (float32). Raises AlignmentError if the word counts differ."""
    s_spans = word_spans(source, tokenizer, max_len)
    t_spans = word_spans(target, tokenizer, max_len)
    if len(s_spans) != len(t_spans):
        raise AlignmentError(
            f"a word swap needs prompts with the same number of words: {len(s_spans)} in {source!r}, "
            f"{len(t_spans)} in {target!r}"
        )
    m = torch.zeros(max_len, max_len)
    m[0, 0] = 1.0  # BOS
    for (_, si), (_, ti) in zip(s_spans, t_spans):
        if len(si) == len(ti):
            for a, b in zip(si, ti):
                m[a, b] = 1.0
        else:
            # Spread the source word's total attention evenly over the target word's tokens.
            for b in ti:
                for a in si:
                    m[a, b] = 1.0 / len(ti)
    s_end = 1 + sum(len(s) for _, s in s_spans)
    t_end = 1 + sum(len(t) for _, t in t_spans)

    def fill(a, b):
        m[a, b] = 1.0

    _tail(fill, s_end, t_end, max_len)
    return m


def global_alignment(x: Sequence, y: Sequence, match: float = 1.0, mismatch: float = -1.0,
                     gap: float = 0.0) -> list[tuple[int | None, int | None]]:
    """Needleman-Wunsch alignment of x and y: [(i or None, j or None)] pairs in order.

    With the P2P scores (match 1, mismatch -1, gap 0) a mismatch is never better than two gaps, so
    aligned pairs are equal tokens and the result is a longest common subsequence. Ties are broken as in
    Prompt-to-Prompt's `seq_aligner.global_align`: walking back from the end, a gap in x (a y token without
    counterpart) first, then a gap in y, then the diagonal. With repeated words this aligns a source word with
    its *first* occurrence in the target when words are appended ('a dog' -> 'a dog and a dog': the first
    'a dog' keeps the source maps, the appended one is new), as the reference does (tests/test_align.py).
    """
    n, m = len(x), len(y)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * gap
    for j in range(1, m + 1):
        score[0][j] = j * gap
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i][j] = max(diag, score[i - 1][j] + gap, score[i][j - 1] + gap)
    pairs: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        if j > 0 and (i == 0 or score[i][j] == score[i][j - 1] + gap):
            pairs.append((None, j - 1))
            j -= 1
        elif i > 0 and (j == 0 or score[i][j] == score[i - 1][j] + gap):
            pairs.append((i - 1, None))
            i -= 1
        else:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    pairs.reverse()
    return pairs


def refinement_mapper(source: str, target: str, tokenizer: Tokenizer,
                      max_len: int = MAX_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper int64 [max_len], alphas float32 [max_len]): target position j takes the source column
    mapper[j] where alphas[j] == 1; alphas[j] == 0 (mapper -1) for target tokens without a counterpart."""
    xs = _tokens(source, tokenizer, max_len)
    ys = _tokens(target, tokenizer, max_len)
    mapper = torch.full((max_len,), -1, dtype=torch.int64)
    mapper[0] = 0
    for i, j in global_alignment(xs, ys):
        if i is not None and j is not None and xs[i] == ys[j]:
            mapper[j + 1] = i + 1

    def fill(a, b):
        mapper[b] = a

    _tail(fill, len(xs) + 1, len(ys) + 1, max_len)
    alphas = (mapper >= 0).to(torch.float32)
    return mapper, alphas


def missing_word_hint(text: str, word: str) -> str:
    """'' or a sentence for a message about `word` not being a word of `text`: when it is only part of a longer
    word there (e.g. 'red' in 'reddish'), say so (attention control works on whole words)."""
    key = normalise_word(word)
    longer = [w for w in (normalise_word(x) for x in text.split()) if key and key in w and w != key]
    if not longer:
        return ""
    return (f" ('{word}' is only part of the word '{longer[0]}' there: control works on whole words, so give "
            f"'{longer[0]}')")


def word_count(text: str) -> int:
    return len(text.split())
