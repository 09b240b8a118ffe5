"""The data side of BERT (data.py): special tokens, masked-language-model examples and
classification tasks. Statistical checks use fixed seeds (they pass or fail the same on every
run); their tolerances are about 5 standard deviations of the sampled share."""
import json
import os

import numpy as np
import pytest
import torch

import data
from errors import UsageError

BYTE = data.get_tokenizer("byte")
T = data.bert_special_tokens("byte")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"]
WORDS = ["\n", "the", "cat", "##s", "sat", "on", "mat", "##ting", "."]


def _write_wordpiece(directory, specials, config=None):
    """A small WordPiece tokenizer.json (and tokenizer_config.json) as BERT's are written."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(specials + WORDS)},
                                     unk_token="[UNK]"))
    # Spaces separate words, newlines are tokens of their own (a line end to split at).
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(specials)
    os.makedirs(directory)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if config:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return data.HF_PREFIX + str(directory)


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    return _write_wordpiece(tmp_path_factory.mktemp("wp") / "bert", SPECIALS,
                            {"mask_token": {"content": "[MASK]", "special": True},
                             "cls_token": "[CLS]"})


@pytest.fixture(scope="module")
def stdlib():
    return data.load_dataset(None, "byte", 128)[0]


def _byte_data(docs):
    """A TokenDataset of byte documents, each ended by end-of-text as load_dataset ends them."""
    return data.TokenDataset([np.concatenate([np.concatenate([data._encode(BYTE, d), [256]])
                                              for d in docs]).astype(np.uint16)], "docs")


def _unmasked(b):
    """The text before masking: the labels where a position is predicted, else the input."""
    return torch.where(b["labels"] != data.IGNORE_INDEX, b["labels"], b["input_ids"])


def _segments(ids, tokens):
    """(A, B) of one row's ids: [CLS] A [SEP] B [SEP]."""
    ids = ids.tolist()
    sep1 = ids.index(tokens.sep)
    sep2 = ids.index(tokens.sep, sep1 + 1)
    return ids[1:sep1], ids[sep1 + 1:sep2]


# ----------------------------------------------------------------------------
# Special tokens and per-token properties
# ----------------------------------------------------------------------------

def test_byte_special_tokens():
    assert (T.cls, T.sep, T.mask, T.pad) == (257, 258, 259, 260) == \
        (data.BYTE_CLS, data.BYTE_SEP, data.BYTE_MASK, data.BYTE_PAD)
    assert T.n_vocab == data.BYTE_BERT_VOCAB == 261 > BYTE.n_vocab
    assert np.array_equal(T.ordinary, np.arange(256))  # end-of-text (256) is not ordinary


def test_hf_special_tokens(wordpiece):
    t = data.bert_special_tokens(wordpiece)
    ids = {s: i for i, s in enumerate(SPECIALS + WORDS)}
    assert (t.cls, t.sep, t.mask, t.pad) == (ids["[CLS]"], ids["[SEP]"], ids["[MASK]"], ids["[PAD]"])
    assert t.n_vocab == len(ids)
    assert sorted(t.ordinary.tolist()) == [ids[w] for w in WORDS]  # no special, no end-of-text


def test_tokenizers_without_bert_tokens(tmp_path):
    # gpt2 is refused by name: nothing is downloaded.
    with pytest.raises(UsageError, match=r"tokenizer gpt2 has no \[CLS\] token: .*"
                                         r"use --tokenizer byte or hf:DIR"):
        data.bert_special_tokens("gpt2")
    no_mask = _write_wordpiece(tmp_path / "no-mask", [s for s in SPECIALS if s != "[MASK]"])
    with pytest.raises(UsageError, match=r"no \[MASK\] token: BERT needs \[CLS\], \[SEP\], "
                                         r"\[MASK\] and \[PAD\]"):
        data.bert_special_tokens(no_mask)


def test_byte_token_properties():
    ids = data._encode(BYTE, "ab_1 é!\nx")
    assert data.continues_word(ids, "byte").tolist() == [
        False, True, True, True, False, False, True, False, False, False]  # é is 2 bytes
    assert data.ends_line(ids, "byte").tolist() == [False] * 8 + [True, False]


def test_wordpiece_token_properties(wordpiece):
    enc = data.get_tokenizer(wordpiece)
    ids = np.array(enc.encode_ordinary("the cats sat\non the matting."))
    assert [enc.decode([i]) for i in ids[[1, 2, 7]]] == ["cat", "##s", "mat"]
    assert data.continues_word(ids, wordpiece).tolist() == [
        False, False, True, False, False, False, False, False, True, False]
    assert data.ends_line(ids, wordpiece).tolist() == [False] * 4 + [True] + [False] * 5


# ----------------------------------------------------------------------------
# Masked-language-model examples
# ----------------------------------------------------------------------------

def test_example_structure(stdlib):
    b = data.MaskedLMData(stdlib, "byte").batch(0, 0, 64, 128)
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels",
                      "sentence_order_labels"}
    assert all(v.dtype == torch.int64 for v in b.values())
    assert b["sentence_order_labels"].shape == (64,)
    n_padded = 0
    for ids, mask, types, labels in zip(b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                        b["labels"]):
        assert ids.shape == mask.shape == types.shape == labels.shape == (128,)
        sep = torch.nonzero(ids == T.sep).flatten().tolist()
        assert ids[0] == T.cls and len(sep) == 2 and sep[0] >= 2 and sep[1] >= sep[0] + 2
        length = sep[1] + 1
        assert mask.tolist() == [1] * length + [0] * (128 - length)
        assert (ids[length:] == T.pad).all() and not (ids[:length] == T.pad).any()
        assert types.tolist() == [0] * (sep[0] + 1) + [1] * (sep[1] - sep[0]) + [0] * (128 - length)
        is_text = (mask == 1) & (ids != T.cls) & (ids != T.sep)
        predicted = labels != data.IGNORE_INDEX
        assert not (predicted & ~is_text).any() and predicted.any()
        assert (labels[predicted] < 256).all()  # the original text's bytes
        n_padded += length < 128
    assert n_padded > 0  # short_seq_prob makes some


def test_masking_statistics(stdlib):
    b = data.MaskedLMData(stdlib, "byte").batch(0, 0, 512, 128)
    predicted = b["labels"] != data.IGNORE_INDEX
    n_text = (b["attention_mask"].sum(1) - 3).tolist()  # all but [CLS] and two [SEP]
    assert predicted.sum(1).tolist() == [max(1, round(0.15 * n)) for n in n_text]
    shown, original = b["input_ids"][predicted], b["labels"][predicted]
    n = len(shown)  # ~ 512 * 13.5 ~ 6,900 (whole lines): a share p has sd sqrt(p (1 - p) / n) <= 0.005
    assert n > 6000
    masked = (shown == T.mask).float().mean().item()
    replaced = ((shown != T.mask) & (shown != original)).float().mean().item()
    kept = (shown == original).float().mean().item()
    # A random replacement draws the original byte itself 1 time in 256: it counts as kept.
    assert abs(masked - 0.8) < 0.02 and abs(replaced - 0.1 * 255 / 256) < 0.015
    assert abs(kept - 0.1 * 257 / 256) < 0.015
    assert (shown[shown != T.mask] < 256).all()  # replacements are ordinary: no eot, no special
    # Unpredicted text is never changed: it is the input as it was read.
    assert ((b["input_ids"] == T.mask) <= predicted).all()


def _whole_words_split(b, tokenizer_name, tokens):
    """How many words of the batch are partly predicted (a segment's first token starts a word)."""
    split = 0
    for ids, labels in zip(_unmasked(b), b["labels"]):
        a, bb = _segments(ids, tokens)
        for segment, first in ((a, 1), (bb, len(a) + 2)):
            predicted = (labels[first:first + len(segment)] != data.IGNORE_INDEX).numpy()
            word = np.cumsum(~data.continues_word(np.array(segment), tokenizer_name))
            for w in np.unique(word):
                split += len(set(predicted[word == w])) > 1
    return split


def test_whole_word_masking(stdlib):
    token_wise = data.MaskedLMData(stdlib, "byte").batch(0, 0, 64, 128)
    assert _whole_words_split(token_wise, "byte", T) > 0  # the check below can fail
    b = data.MaskedLMData(stdlib, "byte", whole_word=True).batch(0, 0, 64, 128)
    assert _whole_words_split(b, "byte", T) == 0
    n_text = b["attention_mask"].sum(1) - 3
    k = torch.clamp(torch.round(0.15 * n_text), min=1)
    predicted = (b["labels"] != data.IGNORE_INDEX).sum(1)
    assert (predicted <= k).all() and predicted.sum() > 0.9 * k.sum()


def test_whole_word_masking_wordpiece(wordpiece):
    enc = data.get_tokenizer(wordpiece)
    ids = enc.encode_ordinary("the cats sat on the matting.\n" * 400)
    ds = data.TokenDataset([np.array(ids, np.uint16)], "wp")
    t = data.bert_special_tokens(wordpiece)
    b = data.MaskedLMData(ds, wordpiece, whole_word=True).batch(0, 0, 64, 40)
    assert _whole_words_split(b, wordpiece, t) == 0
    predicted = _unmasked(b)[b["labels"] != data.IGNORE_INDEX]
    assert (predicted == WORDS.index("##s") + len(SPECIALS)).any()  # words of 2 pieces are masked
    assert not np.isin(b["input_ids"], [t.cls, t.sep, t.pad, enc.eot_token])[
        b["labels"] != data.IGNORE_INDEX].any()


def test_determinism_and_rows(stdlib):
    ds = data.MaskedLMData(stdlib, "byte", whole_word=True)
    full = ds.batch(3, 7, 8, 64)
    for key, value in ds.batch(3, 7, 8, 64).items():
        assert torch.equal(value, full[key])  # same (seed, step): same batch
    assert not torch.equal(ds.batch(4, 7, 8, 64)["input_ids"], full["input_ids"])
    assert not torch.equal(ds.batch(3, 8, 8, 64)["input_ids"], full["input_ids"])
    for rows in (slice(4, 8), slice(0, 2), slice(7, 8)):
        part = ds.batch(3, 7, 8, 64, rows=rows)
        for key, value in part.items():
            assert torch.equal(value, full[key][rows]), (rows, key)
    # Row i does not depend on the batch size either: rows are drawn from (seed, step, i).
    assert torch.equal(ds.batch(3, 7, 16, 64)["input_ids"][:8], full["input_ids"])


def test_sentence_order():
    corpus = "".join(f"line {i:05d}\n" for i in range(3000))
    ds = data.MaskedLMData(_byte_data([corpus]), "byte", mask_prob=0.05)
    b = ds.batch(0, 1, 1000, 48)
    order = b["sentence_order_labels"]
    assert set(order.tolist()) == {0, 1}
    assert abs(order.float().mean().item() - 0.5) < 0.08  # sd 0.016 over 1000 rows
    shown_in_corpus = []
    for ids, swapped in zip(_unmasked(b), order.tolist()):
        a, bb = _segments(ids, T)
        first, second = (bb, a) if swapped else (a, bb)
        assert (bytes(first) + bytes(second)).decode() in corpus  # the window as it was read
        if b"\n" in bytes(first + second)[:-1]:
            assert bytes(first).endswith(b"\n")  # cut at a line end where there is one
        shown_in_corpus.append((bytes(a) + bytes(bb)).decode() in corpus)
    # Rows labelled 1 are shown out of order (unless a fragment happens to fit either way).
    assert np.mean([s for s, o in zip(shown_in_corpus, order.tolist()) if o]) < 0.1


def test_windows_never_cross_documents():
    rng = np.random.default_rng(0)
    docs = [f"<{i}:" + "xyz\n" * int(rng.integers(0, 12)) + ">" for i in range(400)]
    docs[::7] = ["!"] * len(docs[::7])  # one-token documents: the tokens after them are taken
    ds = data.MaskedLMData(_byte_data(docs), "byte", short_seq_prob=0.0)
    b = ds.batch(0, 0, 500, 64)
    assert not (b["input_ids"] == 256).any() and not (b["labels"] == 256).any()
    lengths = []
    for ids, swapped in zip(_unmasked(b), b["sentence_order_labels"].tolist()):
        a, bb = _segments(ids, T)
        text = bytes(bb + a if swapped else a + bb).decode()
        assert any(text in d for d in docs), text
        lengths.append(len(text))
    assert min(lengths) >= 2


def test_bad_arguments(stdlib):
    with pytest.raises(UsageError, match="--seq-len 5 or more"):
        data.MaskedLMData(stdlib, "byte").batch(0, 0, 1, 4)
    for p in (0, 1.5):
        with pytest.raises(UsageError, match=r"--mask-prob must be in \(0, 1\]"):
            data.MaskedLMData(stdlib, "byte", mask_prob=p)
    with pytest.raises(UsageError, match=r"fewer than --seq-len \+ 1 = 1001"):
        data.MaskedLMData(_byte_data(["short"]), "byte").batch(0, 0, 1, 1000)


# ----------------------------------------------------------------------------
# Classification tasks
# ----------------------------------------------------------------------------

CLASSES = {"alpha": "abc \n", "beta": "xyz!\n", "gamma": "0123\n"}  # disjoint characters


@pytest.fixture
def task_dir(tmp_path):
    for i, (name, line) in enumerate(CLASSES.items()):
        (tmp_path / name).mkdir()
        for f in range(2):  # class k has (k + 1) * 2 files of 1,000 bytes: shares 1:2:3
            for g in range(i + 1):
                (tmp_path / name / f"{f}-{g}.txt").write_text(line * 200)
    (tmp_path / ".hidden").mkdir()  # not a class
    return tmp_path


def test_classification_labels(task_dir):
    train, val = data.load_task(str(task_dir), "byte", 64)
    assert train.class_names == val.class_names == sorted(CLASSES) and train.n_classes == 3
    assert np.allclose(train.class_shares, [1 / 6, 2 / 6, 3 / 6], atol=0.01)
    assert abs(val.n_tokens / (train.n_tokens + val.n_tokens) - 0.05) < 0.01
    for ds in (train, val):
        b = ds.batch(0, 0, 600, 64)
        assert b["input_ids"].shape == (600, 64) and b["labels"].shape == (600,)
        assert (b["token_type_ids"] == 0).all() and (b["input_ids"][:, 0] == T.cls).all()
        lengths = b["attention_mask"].sum(1)
        assert (lengths < 64).any() and (lengths == 64).any()  # short windows: padding
        for ids, n, label in zip(b["input_ids"], lengths.tolist(), b["labels"].tolist()):
            assert ids[n - 1] == T.sep and (ids[n:] == T.pad).all()
            text = set(ids[1:n - 1].tolist()) - {256}  # a window may span two files of a class
            assert text <= set(CLASSES[ds.class_names[label]].encode()), (label, text)
    counts = np.bincount(train.batch(1, 0, 3000, 64)["labels"], minlength=3) / 3000
    assert np.allclose(counts, train.class_shares, atol=0.045)  # sd <= 0.009 over 3000 rows
    rows = train.batch(2, 5, 8, 64, rows=slice(4, 8))
    full = train.batch(2, 5, 8, 64)
    assert all(torch.equal(v, full[k][4:8]) for k, v in rows.items())


def test_classification_errors(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.txt").write_text("text\n" * 100)
    with pytest.raises(UsageError, match=r"at least 2 classes; .* has 1 \(only\)"):
        data.load_task(str(tmp_path), "byte", 16)
    with pytest.raises(UsageError, match="no such file or directory"):
        data.load_task(str(tmp_path / "missing"), "byte", 16)


def test_stdlib_packages():
    train, val = data.load_task(data.STDLIB_PACKAGES, "byte", 128)
    assert train.n_classes >= 4 and train.class_names == sorted(train.class_names)
    assert abs(train.class_shares.sum() - 1) < 1e-9 and train.class_shares.max() < 0.5
    b = val.batch(0, 0, 32, 128)
    assert b["labels"].min() >= 0 and b["labels"].max() < train.n_classes


def test_train_with_a_wordpiece_tokenizer_and_whole_word_masking(tmp_path):
    """train.py end to end with a BERT vocabulary (hf:DIR without an end-of-text token, as
    BERT's: [SEP] ends its documents) and whole-word masking: the heads' figures are logged."""
    from conftest import FAST, train_job
    wordpiece = _write_wordpiece(tmp_path / "bert", [s for s in SPECIALS if s != "<|endoftext|>"])
    assert data.get_tokenizer(wordpiece).eot_token == SPECIALS.index("[SEP]")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cats sat on the matting .\nthe cat sat .\n" * 200)
    records, _ = train_job(["--model", "bert", *FAST, "--tokenizer", wordpiece, "--data", str(corpus),
                            "--whole-word-masking", "--set", "vocab_size=16", "--steps", "3"])
    assert {"mlm_accuracy", "sentence_order_accuracy"} <= records[-1].keys()
    assert all(np.isfinite(r["loss"]) for r in records)
