"""The data side of T5 (data.py): special tokens, span-corruption lengths and examples.
Statistical checks use fixed seeds (they pass or fail the same on every run); their tolerances
are about 5 standard deviations of the sampled share."""
import json
import os

import numpy as np
import pytest
import torch

import data
from errors import UsageError

BYTE = data.get_tokenizer("byte")
T = data.t5_special_tokens("byte")
WORDS = ["the", "cat", "sat", "on", "mat", ".", "\n"]
SENTINELS = [f"<extra_id_{i}>" for i in range(5)]


def _byte_data(docs):
    """A TokenDataset of byte documents, each ended by end-of-text as load_dataset ends them."""
    return data.TokenDataset([np.concatenate([np.concatenate([data._encode(BYTE, d), [256]])
                                              for d in docs]).astype(np.uint16)], "docs")


# Numbered lines in documents of 40-90 lines: every 12 tokens of it occur once, so a window
# rebuilt from an example is found at one place or nowhere.
DOCS = ["".join(f"line {d:02d}.{i:03d}\n" for i in range(40 + 7 * d % 50)) for d in range(12)]


@pytest.fixture(scope="module")
def docs():
    return _byte_data(DOCS)


def _write_tokenizer(directory, specials, config=None, sentinels=SENTINELS):
    """A small word-level tokenizer.json (and tokenizer_config.json) with T5's sentinels added
    after the vocabulary, as added tokens (as T5's tokenizer.json has them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)},
                                     unk_token="<unk>" if "<unk>" in specials else None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Punctuation()])
    tok.add_special_tokens(sentinels)
    os.makedirs(directory)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if config:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return data.HF_PREFIX + str(directory)


def _rebuild(ids, labels, tokens):
    """(raw window, noise mask, span lengths) of one row: each sentinel of the input replaced
    by the tokens that follow the same sentinel in the labels. Checks that both list the
    sentinels <extra_id_0>, <extra_id_1>, ... in order and end with EOS."""
    # The byte tokenizer's EOS is its end-of-text, which the text between two documents holds:
    # the input's EOS is its last token before the padding (the text never holds pad).
    ids, labels = ids.tolist(), labels.tolist()
    n, m = len(ids) - ids[::-1].index(next(x for x in ids[::-1] if x != tokens.pad)), \
        len(labels) - labels[::-1].index(next(y for y in labels[::-1] if y != data.IGNORE_INDEX))
    assert ids[n - 1] == tokens.eos and ids[n:] == [tokens.pad] * (len(ids) - n)
    assert labels[m - 1] == tokens.eos and data.IGNORE_INDEX not in labels[:m]
    sentinels = list(tokens.sentinels)
    ids, labels = ids[:n - 1], labels[:m]
    in_input = [x for x in ids if x in sentinels]
    assert in_input == sentinels[:len(in_input)] and labels[0] == sentinels[0]
    spans, k = [], -1
    for y in labels[:-1]:
        if y in sentinels:
            k += 1
            assert y == sentinels[k]
            spans.append([])
        else:
            spans[-1].append(y)
    assert len(spans) == len(in_input)
    raw, noise = [], []
    for x in ids:
        span = spans[sentinels.index(x)] if x in sentinels else [x]
        raw += span
        noise += [x in sentinels] * len(span)
    return np.array(raw), np.array(noise), [len(s) for s in spans]


def _where(window, corpus):
    """The start of every occurrence of window in the 1-D array corpus."""
    views = np.lib.stride_tricks.sliding_window_view(corpus, len(window))
    return np.flatnonzero((views == window).all(1))


# ----------------------------------------------------------------------------
# Special tokens
# ----------------------------------------------------------------------------

def test_byte_special_tokens():
    assert (T.eos, T.pad, T.n_vocab) == (256, 257, 358) and data.BYTE_T5_VOCAB == 358
    assert T.sentinels == tuple(range(357, 257, -1)) and len(T.sentinels) == data.T5_SENTINELS
    assert T.sentinels[0] == 357 and T.sentinels[99] == 258  # T5's order: <extra_id_0> is last
    assert BYTE.n_vocab == 257  # the other models' vocabulary does not grow
    # Samples of a T5 print readably: the new ids decode to their names, as hf:DIR's specials do.
    assert BYTE.decode([104, 105, 357, 32, 354, 257, 256]) == \
        "hi<extra_id_0> <extra_id_3><pad><|endoftext|>"
    assert BYTE.decode(list(range(258, 358))) == "".join(f"<extra_id_{i}>" for i in range(99, -1, -1))
    assert BYTE.decode_bytes([0xC3, 357, 0xA9]) == b"\xc3<extra_id_0>\xa9"
    text = "naïve café — 日本語\n"
    assert BYTE.decode(BYTE.encode_ordinary(text)) == text


def test_hf_special_tokens(tmp_path):
    specials = ["<pad>", "</s>", "<unk>"]
    tok = _write_tokenizer(tmp_path / "t5", specials,
                           {"eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>"})
    t = data.t5_special_tokens(tok)
    n = len(specials) + len(WORDS)
    assert (t.eos, t.pad) == (1, 0) and t.sentinels == tuple(range(n, n + 5))
    assert t.n_vocab == n + 5
    enc = data.get_tokenizer(tok)
    assert enc.decode([3 + WORDS.index("cat"), n + 1]).replace(" ", "") == "cat<extra_id_1>"
    # Other names from tokenizer_config.json; without it, </s> and <pad>. Only consecutive
    # sentinels from <extra_id_0> count.
    named = _write_tokenizer(tmp_path / "named", ["[P]", "<eos>"], {"eos_token": "<eos>",
                                                                    "pad_token": "[P]"},
                             sentinels=["<extra_id_0>", "<extra_id_1>", "<extra_id_3>"])
    t = data.t5_special_tokens(named)
    assert (t.eos, t.pad) == (1, 0) and len(t.sentinels) == 2
    assert data.t5_special_tokens(_write_tokenizer(tmp_path / "plain", specials)).eos == 1


def test_prompts_encode_each_sentinel_as_the_tokenizers_own_token(tmp_path):
    """generate.py's T5 prompts: "<extra_id_N>" becomes the id the tokenizer itself gives
    that name (the byte tokenizer: 357 - N; a tokenizer.json: its added token's id, read
    with the tokenizers library), the text around it is encoded as usual, EOS ends it."""
    import generate
    from tokenizers import Tokenizer
    assert generate.encode_with_sentinels("hi<extra_id_0> x<extra_id_3>", "byte") == \
        [104, 105, 357, 32, 120, 354, 256]
    name = _write_tokenizer(tmp_path / "t5", ["<pad>", "</s>", "<unk>"],
                            {"eos_token": "</s>", "pad_token": "<pad>"})
    own = Tokenizer.from_file(str(tmp_path / "t5" / "tokenizer.json"))
    ids = generate.encode_with_sentinels("the cat<extra_id_1> on<extra_id_0><extra_id_4>", name)
    assert ids == [own.token_to_id(t) for t in
                   ("the", "cat", "<extra_id_1>", "on", "<extra_id_0>", "<extra_id_4>", "</s>")]
    with pytest.raises(UsageError, match="<extra_id_5>: the tokenizer has 5 sentinels"):
        generate.encode_with_sentinels("the<extra_id_5>", name)


def test_tokenizers_without_t5_tokens(tmp_path):
    def one_line_error(name, match):
        with pytest.raises(UsageError, match=match) as e:
            data.t5_special_tokens(name)
        assert "\n" not in str(e.value)

    # tiktoken's encodings are refused by name: nothing is downloaded.
    one_line_error("gpt2", r"tokenizer gpt2 has no <extra_id_0> sentinel tokens: T5's span "
                           r"corruption needs them; use --tokenizer byte or hf:DIR of a T5 tokenizer")
    one_line_error("sentencepiece", "unknown tokenizer")
    no_sentinels = _write_tokenizer(tmp_path / "none", ["<pad>", "</s>"], sentinels=[])
    one_line_error(no_sentinels, f"tokenizer {no_sentinels} has no <extra_id_0> sentinel tokens")
    no_pad = _write_tokenizer(tmp_path / "no-pad", ["</s>"])
    one_line_error(no_pad, r"has no pad token \(<pad>\): T5 needs one; set pad_token in .*"
                           r"tokenizer_config.json, or use --tokenizer byte")
    no_eos = _write_tokenizer(tmp_path / "no-eos", ["<pad>", "</s>"], {"eos_token": "<eos>"})
    one_line_error(no_eos, r"has no eos token \(<eos>\)")


# ----------------------------------------------------------------------------
# Lengths
# ----------------------------------------------------------------------------

def test_lengths_by_hand():
    # seq_len 512, T5's: L = 568 raw tokens hold N = round(85.2) = 85 noise tokens in
    # S = round(28.3) = 28 spans, an input of 568 - 85 + 28 + 1 = 512; L = 569 (N = round(85.35)
    # = 85, S = 28) would need 513. Targets 85 + 28 + 1 = 114 (T5's 568 and 114), padded to 120.
    assert data.span_corruption_lengths(512) == (568, 120)
    # seq_len 64: L = 70 has N = round(10.5) = 10 (half to even, as T5 rounds), S = round(3.3)
    # = 3: 70 - 10 + 3 + 1 = 64; L = 71: N = round(10.65) = 11, S = round(3.7) = 4: 65.
    # Targets 10 + 3 + 1 = 14 -> 16.
    assert data.span_corruption_lengths(64) == (70, 16)
    assert data.span_corruption_lengths(65) == (71, 16)  # 11 + 4 + 1 = 16 targets
    # seq_len 3, the least: L = 2 has 1 noise token (round(0.3) = 0, raised to 1) in 1 span:
    # 2 - 1 + 1 + 1 = 3; L = 3 would need 4. Targets 3 -> 8.
    assert data.span_corruption_lengths(3) == (2, 8)
    # Half noise in spans of 2, seq_len 20: L = 26 has N = 13, S = round(6.5) = 6: 26 - 13 + 6 +
    # 1 = 20; L = 27: N = round(13.5) = 14, S = 7: 22. Targets 13 + 6 + 1 = 20 -> 24.
    assert data.span_corruption_lengths(20, 0.5, 2.0) == (26, 24)
    # Every span, noise or not, holds a token: at half noise in spans of 1, L = 19 has N =
    # round(9.5) = 10 and only 9 tokens of text, so 9 spans: an input of 19 (one pad at 20);
    # L = 20: N = S = 10, 21.
    assert data.span_corruption_lengths(20, 0.5, 1.0) == (19, 24)


def test_lengths_rule():
    """For every seq_len: the largest raw window whose input fits, as T5's formula says."""
    def input_and_targets(length, density, mean):
        noise = min(max(round(length * density), 1), length - 1)
        spans = min(max(round(noise / mean), 1), length - noise)
        return length - noise + spans + 1, noise + spans + 1

    for density, mean in ((0.15, 3.0), (0.3, 8.0), (0.5, 1.0)):
        for seq_len in range(3, 400):
            raw, decoder = data.span_corruption_lengths(seq_len, density, mean, n_sentinels=10**6)
            inputs, targets = input_and_targets(raw, density, mean)
            assert inputs <= seq_len < input_and_targets(raw + 1, density, mean)[0]
            assert decoder % 8 == 0 and targets <= decoder < targets + 8
            if (density, mean) == (0.15, 3.0):
                assert inputs == seq_len  # T5's settings never leave padding


def test_length_errors():
    with pytest.raises(UsageError, match=r"--seq-len 2 is too short for T5's span corruption .*"
                                         r"use --seq-len 3 or more"):
        data.span_corruption_lengths(2)
    # 100 sentinels: at most 301 noise tokens (round(301 / 3) = 100), so L <= 2009 (2010 * 0.15
    # = 301.5 rounds to 302), an input of 2009 - 301 + 100 + 1 = 1809.
    assert data.span_corruption_lengths(1809)[0] == 2009
    with pytest.raises(UsageError, match=r"--seq-len 1810 corrupts 2010 tokens in 101 spans, more "
                                         r"than the tokenizer's 100 sentinels; use --seq-len 1809 "
                                         r"or less"):
        data.span_corruption_lengths(1810)
    # 5 sentinels: N <= 16 (round(17 / 3) = 6), L <= 110 (16.5 rounds to 16, 111 * 0.15 = 16.65
    # to 17): an input of 110 - 16 + 5 + 1 = 100.
    assert data.span_corruption_lengths(100, n_sentinels=5)[0] == 110
    with pytest.raises(UsageError, match="101 corrupts 111 tokens in 6 spans, more than the "
                                         "tokenizer's 5 sentinels; use --seq-len 100 or less"):
        data.span_corruption_lengths(101, n_sentinels=5)


# ----------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------

def test_example_structure(docs):
    corpus = docs.shards[0].astype(np.int64)
    b = data.SpanCorruptionData(docs, "byte").batch(0, 0, 64, 64)
    assert set(b) == {"input_ids", "attention_mask", "labels", "decoder_input_ids"}
    assert all(v.dtype == torch.int64 for v in b.values())
    assert b["input_ids"].shape == b["attention_mask"].shape == (64, 64)
    assert b["labels"].shape == b["decoder_input_ids"].shape == (64, 16)  # see test_lengths_by_hand
    windows, crossing = [], 0
    for ids, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"]):
        n = int((ids != T.pad).sum())  # the input and its EOS (see _rebuild)
        assert mask.tolist() == [1] * n + [0] * (64 - n) and ids[n - 1] == T.eos
        raw, noise, spans = _rebuild(ids, labels, T)
        assert len(raw) == 70 and noise.sum() == 10 and len(spans) == 3 and min(spans) >= 1
        assert not noise[0] and noise[-1]  # text first, a noise span last
        assert ids[n - 2] == T.sentinels[len(spans) - 1] and ids[0] not in T.sentinels
        assert (labels[:10 + 3 + 1] != data.IGNORE_INDEX).all()
        assert (labels[10 + 3 + 1:] == data.IGNORE_INDEX).all()
        starts = _where(raw, corpus)
        assert len(starts) == 1, BYTE.decode(raw.tolist())  # the raw window, token for token
        windows.append(starts[0])
        crossing += 256 in raw.tolist()
    assert len(set(windows)) > 60 and crossing > 0  # windows across documents keep their eot
    decoder = b["decoder_input_ids"]
    assert (decoder[:, 0] == T.pad).all()
    expect = b["labels"][:, :-1].clone()
    expect[expect == data.IGNORE_INDEX] = T.pad
    assert torch.equal(decoder[:, 1:], expect)  # the labels shifted right after the start token
    assert BYTE.decode(b["input_ids"][0].tolist()).endswith("<extra_id_2><|endoftext|>")


def test_padding():
    """Half noise in spans of 1 at seq_len 20: 19 raw tokens make 19 input tokens, 1 pad."""
    ds = data.SpanCorruptionData(_byte_data(["abcdefghijklmnopqrstuvwxyz" * 20]), "byte",
                                 noise_density=0.5, mean_span_length=1.0)
    b = ds.batch(0, 0, 16, 20)
    assert b["labels"].shape == (16, 24)
    assert (b["attention_mask"][:, :19] == 1).all() and (b["attention_mask"][:, 19] == 0).all()
    assert (b["input_ids"][:, 18] == T.eos).all() and (b["input_ids"][:, 19] == T.pad).all()
    for ids, labels in zip(b["input_ids"], b["labels"]):
        raw, noise, spans = _rebuild(ids, labels, T)
        assert len(raw) == 19 and noise.sum() == 10 and sorted(spans) == [1] * 8 + [2]
        assert bytes(raw.tolist()).decode() in "abcdefghijklmnopqrstuvwxyz" * 20


def _t5_noise_rate(length, noise, spans, n):
    """How often each position is noise, over n masks of T5's random_spans_noise_mask."""
    rng = np.random.default_rng(12345)

    def segmentation(items):  # T5's _random_segmentation: n rows of segment lengths
        first = np.tile([1] * (spans - 1) + [0] * (items - spans), (n, 1))
        first = np.pad(rng.permuted(first, axis=1), ((0, 0), (1, 0)))
        segment = np.cumsum(first, 1)
        return np.stack([(segment == k).sum(1) for k in range(spans)], 1)

    runs = np.stack([segmentation(length - noise), segmentation(noise)], 2).reshape(n, 2 * spans)
    starts = np.zeros((n, length), int)
    np.put_along_axis(starts, np.cumsum(runs, 1)[:, :-1], 1, 1)
    return (np.cumsum(starts, 1) % 2 == 1).mean(0)


def test_noise_statistics(docs):
    b = data.SpanCorruptionData(docs, "byte").batch(1, 3, 2000, 64)
    masks, lengths = [], []
    for ids, labels in zip(b["input_ids"], b["labels"]):
        raw, noise, spans = _rebuild(ids, labels, T)
        masks.append(noise)
        lengths += spans
    masks = np.array(masks)
    assert len({m.tobytes() for m in masks}) > 1900  # every row its own spans
    rate = masks.mean(0)
    assert rate[0] == 0 and rate[-1] == 1
    # Each position is noise as often as in T5's random_spans_noise_mask, ported from its
    # TensorFlow (a shuffle marks where segments start) and run 20,000 times: the difference of
    # the two shares has sd <= 0.012, and that of the mean of 10 positions <= 0.004.
    expect = _t5_noise_rate(70, 10, 3, 20000)
    assert np.abs(rate - expect).max() < 0.06
    assert np.abs(rate.reshape(7, 10).mean(1) - expect.reshape(7, 10).mean(1)).max() < 0.02
    assert expect[10:60].max() < 0.13 and expect[-2] > 0.7  # far from flat: the last span ends it
    # 10 noise tokens in 3 spans, each split uniformly: a span holds 1 to 8, 10/3 on average,
    # P(1) = C(8, 1) / C(9, 2) = 8 / 36 (the other two spans share 9 tokens 8 ways).
    assert np.mean(lengths) == pytest.approx(10 / 3) and min(lengths) == 1 and max(lengths) == 8
    assert abs(np.mean(np.array(lengths) == 1) - 8 / 36) < 0.03  # sd 0.005
    # The text between spans is cut the same way: 60 tokens in 3 runs, the first one of them.
    first_noise = masks.argmax(1)
    assert first_noise.min() == 1 and abs(first_noise.mean() - 20) < 1.5  # sd 0.3


def test_determinism_and_rows(docs):
    ds = data.SpanCorruptionData(docs, "byte")
    full = ds.batch(3, 7, 8, 64)
    for key, value in ds.batch(3, 7, 8, 64).items():
        assert torch.equal(value, full[key])  # same (seed, step): same batch
    assert not torch.equal(ds.batch(4, 7, 8, 64)["input_ids"], full["input_ids"])
    assert not torch.equal(ds.batch(3, 8, 8, 64)["input_ids"], full["input_ids"])
    for rows in (slice(4, 8), slice(0, 2), slice(7, 8), slice(2, 6)):
        part = ds.batch(3, 7, 8, 64, rows=rows)
        for key, value in part.items():
            assert torch.equal(value, full[key][rows]), (rows, key)
    # Row i does not depend on the batch size either: rows are drawn from (seed, step, i).
    assert torch.equal(ds.batch(3, 7, 16, 64)["labels"][:8], full["labels"])


def test_hf_examples(tmp_path):
    tok = _write_tokenizer(tmp_path / "t5", ["<pad>", "</s>", "<unk>"])
    enc, t = data.get_tokenizer(tok), data.t5_special_tokens(tok)
    corpus = np.array(enc.encode_ordinary("the cat sat on the mat .\n" * 300), np.uint16)
    ds = data.SpanCorruptionData(data.TokenDataset([corpus], "wl"), tok)
    assert ds.tokens == t and ds.n_tokens == len(corpus)
    b = ds.batch(0, 0, 32, 40)  # 44 raw tokens, 7 noise in 2 spans: 10 targets
    assert ds.lengths(40) == (44, 16) and b["labels"].shape == (32, 16)
    for ids, labels in zip(b["input_ids"], b["labels"]):
        raw, noise, spans = _rebuild(ids, labels, t)
        assert len(_where(raw, corpus.astype(np.int64))) > 0 and len(spans) == 2
    assert "<extra_id_1>" in enc.decode(b["input_ids"][0].tolist())
    with pytest.raises(UsageError, match="more than the tokenizer's 5 sentinels; use --seq-len "
                                         "100 or less"):
        ds.batch(0, 0, 1, 101)


def test_bad_arguments(docs):
    with pytest.raises(UsageError, match="use --seq-len 3 or more"):
        data.SpanCorruptionData(docs, "byte").batch(0, 0, 1, 2)
    short = data.SpanCorruptionData(_byte_data(["x" * 566]), "byte")  # 567 tokens with eot
    with pytest.raises(UsageError, match=r"docs has 567 tokens \(longest shard\), fewer than the "
                                         r"568 that T5's --seq-len 512 corrupts into one example; "
                                         r"use a smaller --seq-len or more data"):
        short.batch(0, 0, 1, 512)
    assert short.batch(0, 0, 1, 511)["input_ids"].shape == (1, 511)  # 567 raw tokens
    for density in (0, 1, 1.5):
        with pytest.raises(UsageError, match=r"noise density must be in \(0, 1\)"):
            data.SpanCorruptionData(docs, "byte", noise_density=density)
    with pytest.raises(UsageError, match="mean noise span length must be >= 1"):
        data.SpanCorruptionData(docs, "byte", mean_span_length=0.5)
    with pytest.raises(UsageError, match="has no <extra_id_0>"):
        data.SpanCorruptionData(docs, "gpt2")
