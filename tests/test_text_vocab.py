"""The locally built character / word tokenizers."""

import itertools
import json

import pytest

from vqdiffusion.text_vocab import _apply_bpe, build_char_clip_tokenizer, caption_words


def test_caption_words_counts_and_sorts():
    captions = ["A red circle, large.", "a red square", "two shapes: red"]
    assert caption_words(captions) == ("a", "circle", "large", "red", "shapes", "square", "two")
    assert caption_words(captions, min_count=2) == ("a", "red")


def test_plain_character_tokenizer_is_unchanged_by_an_empty_word_list():
    plain, empty = build_char_clip_tokenizer(), build_char_clip_tokenizer(words=())
    assert plain.get_vocab() == empty.get_vocab()
    # one token per character, the last of a word carrying the end-of-word marker
    assert plain.tokenize("red dog") == ["r", "e", "d</w>", "d", "o", "g</w>"]


@pytest.mark.parametrize(
    "words",
    [
        ("circle", "cir", "circ", "ci", "c", "le", "circlet"),  # shared prefixes and suffixes
        ("top", "to", "stop", "tops", "pot", "opt", "ot"),  # overlapping pairs in every order
        ("a", "an", "and", "nad", "dna", "ana", "banana", "nab"),
    ],
)
def test_every_listed_word_is_one_token_and_others_spell_out(words):
    tok = build_char_clip_tokenizer(words=words)
    vocab = tok.get_vocab()
    for word in words:
        pieces = tok.tokenize(word)
        assert pieces == [word + "</w>"], (word, pieces)
        assert tok(word, add_special_tokens=False).input_ids == [vocab[word + "</w>"]]
    # any string over the same letters still round-trips through ids (characters as the fallback)
    letters = sorted(set("".join(words)))
    for combo in itertools.islice(itertools.product(letters, repeat=4), 200):
        text = "".join(combo)
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids).replace(" ", "") == text


def test_merge_simulation_matches_the_real_bpe():
    words = ("square", "squares", "quarter", "are", "re")
    tok = build_char_clip_tokenizer(words=words)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    ranks = {tuple(pair): i for i, pair in enumerate(merges)}
    for text in ["square", "squarer", "requa", "aresq", "quart", "rerere"]:
        assert _apply_bpe(text, ranks) == tok.tokenize(text)


def test_words_outside_the_alphabet_are_rejected():
    with pytest.raises(ValueError, match="outside the tokenizer's alphabet"):
        build_char_clip_tokenizer(words=("Red",))
    with pytest.raises(ValueError, match="outside"):
        build_char_clip_tokenizer(words=("",))
