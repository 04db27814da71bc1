"""attention/align.py: P2P token alignment, hand-computed cases with a toy tokenizer, plus the real
SD1 CLIP tokenizer that ships with ComfyUI."""

import pytest
import torch

from zsve.attention import align


class ToyTokenizer:
    """Whitespace tokenizer; some words split into several pieces, like BPE does."""

    SPLIT = {"watercolor": ["water", "color"], "porsche": ["por", "s", "che"], "car,": ["car", ","]}

    def __init__(self):
        self.vocab = {"<bos>": 0, "<eos>": 1}

    def _id(self, piece):
        return self.vocab.setdefault(piece, len(self.vocab))

    def encode(self, text):
        ids = [0]
        for w in text.lower().split():
            ids.extend(self._id(p) for p in self.SPLIT.get(w, [w]))
        return ids + [1]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


@pytest.fixture
def tok():
    return ToyTokenizer()


def test_word_spans_and_indices_multi_token(tok):
    spans = align.word_spans("a watercolor Porsche car, fast", tok)
    assert spans == [("a", [1]), ("watercolor", [2, 3]), ("Porsche", [4, 5, 6]), ("car,", [7, 8]), ("fast", [9])]
    assert align.word_indices("a watercolor Porsche car, fast", "porsche", tok) == [4, 5, 6]
    assert align.word_indices("a watercolor Porsche car, fast", "car", tok) == [7, 8]  # punctuation ignored
    assert align.word_indices("a cat and a cat", "cat", tok) == [2, 5]  # every occurrence
    assert align.word_indices("a cat and a cat", 3, tok) == [4]
    assert align.word_indices("a cat", "dog", tok) == []


def test_phrase_positions_runs_words_and_errors(tok):
    """The one reading of a words input: per comma-separated phrase, the run of its words where they stand
    together, else every occurrence of each word; a missing word is named with the prompt's words."""
    text = "a red watercolor hat and red shoes, a hat"
    # runs: 'red watercolor hat' once; 'red' alone: both occurrences; 'hat' alone: both
    assert align.phrase_positions(text, "red watercolor hat", tok) == [[2, 3, 4, 5]]
    assert align.phrase_positions(text, "red, hat", tok) == [[2, 7], [5, 10]]
    # words apart ('red' ... 'shoes,' is a run: punctuation ignored; 'hat shoes' is not): every occurrence
    assert align.phrase_positions(text, "red shoes", tok) == [[7, 8]]
    assert align.phrase_positions(text, "hat shoes", tok) == [[5, 8, 10]]
    assert align.phrase_positions(text, ["RED", " ", "Hat"], tok) == [[2, 7], [5, 10]]  # a list: the phrases
    assert align.phrase_positions(text, " , ", tok) == []
    assert align.split_phrases(" red hat,, green  dots ,") == [["red", "hat"], ["green", "dots"]]
    with pytest.raises(align.WordNotInPrompt, match=r"'dog' is not a word of the edit prompt 'a red .*' "
                       r"\(its words: a, red, watercolor, hat, and, shoes\)") as e:
        align.phrase_positions(text, "red hat, dog", tok, "edit")
    assert e.value.word == "dog" and isinstance(e.value, align.AlignmentError)
    with pytest.raises(align.WordNotInPrompt, match="only part of the word 'watercolor'"):
        align.phrase_positions(text, "water", tok)
    # punctuation-only words name no token: left out, never matched to the prompt's punctuation
    assert align.phrase_positions("a cat - a dog", "? dog, -", tok) == [[5]]
    with pytest.raises(align.WordNotInPrompt, match=r"without weight syntax such as '\(red:1.2\)'"):
        align.phrase_positions(text, "(red:1.2) hat", tok)


def test_replacement_mapper_same_token_counts(tok):
    m = align.replacement_mapper("a red car", "a blue car", tok, max_len=8)
    # identity everywhere: 'red' (pos 2) -> 'blue' (pos 2), tail in order
    assert torch.equal(m, torch.eye(8))


def test_replacement_mapper_one_to_many(tok):
    # 'car' (1 token, pos 2) -> 'porsche' (3 tokens, pos 2..4); 'fast' moves from pos 3 to pos 5
    m = align.replacement_mapper("a car fast", "a porsche fast", tok, max_len=10)
    expect = torch.zeros(10, 10)
    expect[0, 0] = expect[1, 1] = 1
    expect[2, 2] = expect[2, 3] = expect[2, 4] = 1 / 3  # the word's mass spread over 3 tokens
    expect[3, 5] = 1  # 'fast'
    expect[4, 6] = expect[5, 7] = expect[6, 8] = expect[7, 9] = 1  # EOS + padding in order
    assert torch.allclose(m, expect)
    # many-to-one: the 3 source tokens all feed the single target token
    m2 = align.replacement_mapper("a porsche fast", "a car fast", tok, max_len=10)
    assert torch.allclose(m2[2:5, 2], torch.ones(3))
    assert m2[5, 3] == 1 and m2[6, 4] == 1
    # rows are source positions: EOS 6 -> 4, and target tail positions past the source's end take position 9
    assert m2[6, 4] == 1 and m2[9, 7:].tolist() == [1, 1, 1] and m2[:, 9].sum() == 1
    # the attention mass on the words and EOS is preserved (the padding tail is truncated at max_len)
    base = torch.zeros(2, 10)
    base[:, :5] = torch.softmax(torch.randn(2, 5), -1)
    assert torch.allclose((base @ m).sum(-1), base.sum(-1))


def test_replacement_mapper_rejects_different_word_counts(tok):
    with pytest.raises(align.AlignmentError, match="same number of words"):
        align.replacement_mapper("a car", "a red car", tok)


def test_global_alignment_is_lcs_with_gaps():
    pairs = align.global_alignment([1, 2, 3], [1, 9, 2, 3])
    assert pairs == [(0, 0), (None, 1), (1, 2), (2, 3)]
    pairs = align.global_alignment([1, 2, 3], [1, 3])
    assert [(i, j) for i, j in pairs if i is not None and j is not None] == [(0, 0), (2, 1)]


def test_refinement_mapper_inserted_words(tok):
    mapper, alphas = align.refinement_mapper("a car fast", "a watercolor car fast", tok, max_len=10)
    # target: BOS a water color car fast EOS ... ; source: BOS a car fast EOS ...
    assert mapper.tolist() == [0, 1, -1, -1, 2, 3, 4, 5, 6, 7]
    assert alphas.tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 1, 1]
    # removed word: target is shorter
    mapper, alphas = align.refinement_mapper("a red car", "a car", tok, max_len=6)
    assert mapper.tolist() == [0, 1, 3, 4, 5, 5] and alphas.tolist() == [1] * 6


def test_too_long_prompt_is_rejected(tok):
    with pytest.raises(align.AlignmentError, match="shorten"):
        align.word_spans(" ".join(["w"] * 80), tok)


def test_real_sd1_tokenizer(tiny_clip):
    hf = tiny_clip.tokenizer.clip_l.tokenizer
    text = "a silver jeep driving, watercolor painting of a zebracorn"
    ids = hf.encode(text)
    # the ids are what ComfyUI's SD1 tokenizer feeds CLIP (BOS + tokens + EOS/padding)
    comfy_ids = [t[0] for t in tiny_clip.tokenize(text)["l"][0]]
    assert comfy_ids[: len(ids)] == ids and len(comfy_ids) == 77
    spans = align.word_spans(text, hf)
    assert [w for w, _ in spans] == text.split()
    flat = [i for _, s in spans for i in s]
    assert flat == list(range(1, len(ids) - 1))  # every token belongs to exactly one word, in order
    assert spans[3][1] == [4, 5]  # "driving," -> "driving" ","
    assert spans[-1] == ("zebracorn", [10, 11, 12])  # "ze" "brac" "orn"
    m = align.replacement_mapper("a silver jeep", "a red porsche", hf)
    assert m.shape == (77, 77) and torch.allclose(m.sum(0)[: len(hf.encode("a red porsche"))], torch.ones(len(hf.encode("a red porsche"))))


# Prompt-to-Prompt's seq_aligner (get_mapper) on the real SD1 tokenizer, max_len 16: the values below were
# computed by running the reference rule (traceback order: gap in x, gap in y, diagonal; tail mapper[j] = j).
REFERENCE_MAPPERS = {
    ("a dog", "a dog and a dog on the beach"): [0, 1, 2, -1, -1, -1, -1, -1, -1, 3, 10, 11, 12, 13, 14, 15],
    ("a dog", "a photo of a dog"): [0, 1, -1, -1, -1, 2, 3, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    ("a cat and a dog", "a dog and a cat"): [0, 1, -1, 3, 4, -1, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    ("a red circle on blue stripes", "a red circle on blue stripes watercolor painting"):
        [0, 1, 2, 3, 4, 5, 6, -1, -1, 7, 10, 11, 12, 13, 14, 15],
    ("a red car on a road", "a car"): [0, 1, 3, 7, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
}


@pytest.mark.parametrize("pair", list(REFERENCE_MAPPERS))
def test_refinement_matches_prompt_to_prompt_up_to_the_end_of_text(tiny_clip, pair):
    """Ties between repeated words are broken as the reference does (an appended 'a dog' is new, the first keeps
    the source's maps); every position up to the target's end-of-text token maps as in the reference."""
    hf = tiny_clip.tokenizer.clip_l.tokenizer
    mapper, alphas = align.refinement_mapper(*pair, hf, max_len=16)
    ref = REFERENCE_MAPPERS[pair]
    n = len(hf.encode(pair[1]))  # BOS .. EOS of the target
    assert mapper.tolist()[:n] == ref[:n]
    assert alphas.tolist()[:n] == [float(v >= 0) for v in ref[:n]]


def test_refinement_tail_maps_padding_to_padding_where_the_reference_maps_it_to_source_words(tiny_clip):
    """The one difference, on purpose: after the target's end-of-text token the reference maps target position j
    to source position j, so with a longer source the target's padding takes the maps of the source's words
    ('on', 'a', 'road' below); ours maps the target's end-of-text and padding in order onto the source's."""
    hf = tiny_clip.tokenizer.clip_l.tokenizer
    src, tgt = "a red car on a road", "a car"
    mapper, _ = align.refinement_mapper(src, tgt, hf, max_len=16)
    n_src, n_tgt = len(hf.encode(src)), len(hf.encode(tgt))  # 8 and 4 (BOS .. EOS)
    ref = REFERENCE_MAPPERS[(src, tgt)]
    assert ref[n_tgt:n_tgt + 3] == [4, 5, 6]  # the reference: source words 'on', 'a', 'road' on padding
    assert all(v >= n_src for v in mapper.tolist()[n_tgt:])  # ours: source padding only
    assert mapper.tolist()[n_tgt - 1] == n_src - 1  # end-of-text to end-of-text, as in the reference
