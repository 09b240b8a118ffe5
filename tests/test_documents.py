"""Documents as users hold them: JSON Lines files and Megatron-LM's indexed datasets
(PREFIX.bin + PREFIX.idx), read by train.py and described by `data.py inspect`.

The Megatron pair is written here by `published_writer`, from the format as Megatron-LM
documents and writes it (megatron/core/datasets/indexed_dataset.py's _IndexWriter: header,
version, dtype code, sequence and document-boundary counts, int32 lengths, int64 byte
pointers, int64 document boundaries), independently of data.py, including what data.py's own
writer never makes (several sequences per document, as --split-sentences writes them; int32
tokens). data.py must read it to the same documents and tokens, and its own writer must
write the published bytes.
"""
import gzip
import json
import os
import re
import struct

import numpy as np
import pytest
import torch

import data
from conftest import LAYOUT, assert_same_run, one_line_error, one_process, train_job, train_on
from errors import UsageError

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
         np.uint16: 8}


def published_writer(prefix, documents, dtype):
    """Megatron-LM's format, written from its description: `documents` is a list of
    documents, each a list of sequences (lists of token ids)."""
    sequences = [seq for doc in documents for seq in doc]
    lengths = [len(seq) for seq in sequences]
    with open(prefix + ".bin", "wb") as f:
        for seq in sequences:
            f.write(np.array(seq, dtype).tobytes())
    pointers, offset = [], 0
    for n in lengths:
        pointers.append(offset)
        offset += n * np.dtype(dtype).itemsize
    boundaries = [0]
    for doc in documents:
        boundaries.append(boundaries[-1] + len(doc))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sequences)))
        f.write(struct.pack("<Q", len(boundaries)))
        f.write(np.array(lengths, np.int32).tobytes())
        f.write(np.array(pointers, np.int64).tobytes())
        f.write(np.array(boundaries, np.int64).tobytes())


DOCUMENTS = [[[5, 6, 7, 256]], [[1, 2], [3, 4, 256]], [[9] * 40 + [256]], [[8, 256]]]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_a_megatron_pair_reads_as_its_documents(tmp_path, dtype):
    prefix = str(tmp_path / "corpus_text_document")
    published_writer(prefix, DOCUMENTS, dtype)
    for name in (prefix, prefix + ".bin", prefix + ".idx"):
        ds = data.IndexedDataset(data.indexed_prefix(name))
        assert ds.dtype == np.dtype(dtype) and ds.n_documents == len(DOCUMENTS)
        assert [ds.document(i).tolist() for i in range(ds.n_documents)] == [
            [t for seq in doc for t in seq] for doc in DOCUMENTS]
    # Validation: the last quarter of the documents (one, 2 tokens), widened to whole
    # documents until it holds a window of seq_len + 1.
    train, val = ds.split(seq_len=4, val_fraction=0.25)
    assert val.shards[0].tolist() == [9] * 40 + [256, 8, 256]
    assert np.concatenate([train.shards[0], val.shards[0]]).tolist() == ds.tokens.tolist()


def test_our_writer_writes_the_published_bytes(tmp_path):
    documents = [[[5, 6, 7, 256]], [[1, 2, 3, 4, 256]], [[9] * 40 + [256]]]
    published_writer(str(tmp_path / "theirs"), documents, np.uint16)
    data.write_indexed(str(tmp_path / "ours"), [np.array(d[0]) for d in documents], np.uint16)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


def _jsonl(path, texts, key="text", opener=open):
    with opener(path, "wt") as f:
        for text in texts:
            f.write(json.dumps({key: text, "id": len(text)}) + "\n")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_json_lines_are_documents_ending_in_end_of_text(tmp_path, suffix):
    texts = ["first document\n", "second, with \"quotes\" and ünïcode", "third"]
    path = str(tmp_path / f"corpus{suffix}")
    _jsonl(path, texts, "content", gzip.open if suffix.endswith(".gz") else open)
    documents = list(data._documents(data.get_tokenizer("byte"), [path], "content"))
    assert [bytes(d[:-1].tolist()).decode() for d in documents] == texts
    assert all(d[-1] == 256 for d in documents)
    prefix = str(tmp_path / "prepared")
    data.main(["prepare", path, prefix, "--format", "megatron", "--json-key", "content"])
    ds = data.IndexedDataset(prefix)
    assert [ds.document(i).tolist() for i in range(ds.n_documents)] == [d.tolist() for d in documents]
    with pytest.raises(UsageError, match=r"line 1: no text under the key 'text' \(keys: 'content', 'id'\); "
                                         r"name the text's key with --json-key"):
        list(data._documents(data.get_tokenizer("byte"), [path], "text"))


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl, line 2: not JSON"):
        data.load_dataset(str(path), "byte", 4)


def _damage(prefix, how):
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    if how == "truncated bin":
        with open(bin_, "r+b") as f:
            f.truncate(os.path.getsize(bin_) - 2)
    elif how == "not an index":
        with open(idx, "r+b") as f:
            f.write(b"NOTANIDX")
    elif how == "float dtype":
        with open(idx, "r+b") as f:
            f.seek(17)
            f.write(bytes([7]))
    elif how == "index of another dtype":  # says int32, the .bin holds uint16
        with open(idx, "r+b") as f:
            f.seek(17)
            f.write(bytes([4]))
    elif how == "missing bin":
        os.remove(bin_)


@pytest.mark.parametrize("how,message", [
    ("truncated bin", r"corpus.bin: 102 bytes, but .*corpus.idx describes 52 tokens of uint16 = 104 bytes"),
    ("not an index", r"corpus.idx: not a Megatron index"),
    ("float dtype", r"corpus.idx: dtype code 7 is not an integer token type"),
    ("index of another dtype", r"corpus.idx: sequence lengths and byte offsets disagree: the offsets are "
                               r"those of 2-byte tokens, not of its dtype int32 \(code 4\)"),
    ("missing bin", r"corpus.bin: no such file"),
])
def test_a_damaged_pair_is_one_error_line(tmp_path, capsys, how, message):
    prefix = str(tmp_path / "corpus")
    published_writer(prefix, DOCUMENTS, np.uint16)
    _damage(prefix, how)
    line = one_line_error(capsys, ["--model", "llama", *LAYOUT, "--data", prefix, "--seq-len", "8"])
    assert re.search(message, line), line
    with pytest.raises(SystemExit):
        data.main(["inspect", prefix])
    assert re.search(message, capsys.readouterr().out)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, capsys):
    prefix = str(tmp_path / "other_tokenizer")
    published_writer(prefix, [[[1000 + i for i in range(60)] + [256]]] * 4, np.uint16)
    line = one_line_error(capsys, ["--model", "llama", *LAYOUT, "--data", prefix, "--seq-len", "8",
                                   "--steps", "1"])
    assert "holds token id" in line and "outside the model's vocabulary of 257" in line, line


def test_inspect_describes_each_kind_of_source(tmp_path, capsys):
    prefix = str(tmp_path / "corpus")
    published_writer(prefix, DOCUMENTS, np.uint16)
    lines = data.inspect(prefix, "byte")
    assert lines[0].endswith("corpus: Megatron indexed dataset, 4 documents, 5 sequences, 52 tokens of uint16")
    assert lines[1] == "token ids 1..256"
    assert lines[2] == "first document: 4 tokens, beginning [5, 6, 7, 256]"
    path = tmp_path / "a.jsonl"
    _jsonl(path, ["hi", "there"])
    lines = data.inspect(str(path), "byte")
    assert lines[0].endswith("1 text/JSON Lines files, 2 documents, 9 tokens (byte, each document ending "
                             "in end-of-text 256)")
    assert lines[3] == "  decoded (byte): 'hi<|endoftext|>'"


def test_training_on_a_megatron_pair_under_tp_2_x_dp_2_equals_one_process(ranks, tmp_path):
    """`data.py prepare --format megatron` of the standard library's text, trained at tp 2 x
    dp 2 (4 ranks) and in one process: the same losses and gradient norms every step."""
    prefix = str(tmp_path / "stdlib")
    data.main(["prepare", "stdlib", prefix, "--format", "megatron"])
    argv = ["--model", "llama", *LAYOUT, "--data", prefix, "--steps", "4"]
    got, _ = train_on(ranks, 4, argv + ["--tp", "2"])
    assert_same_run(got, one_process(argv))


def _stream_dataset(name, first, n_docs, length):
    docs = [np.append(np.arange(first + 100 * k, first + 100 * k + length), 256 + first) for k in range(n_docs)]
    return data.TokenDataset([np.concatenate(docs)], name, eot=256 + first)


def test_a_blend_gives_each_source_its_weight():
    """Megatron's greedy interleave: after every number of samples, each source's count is
    within one sample of its weight's share (so within 1% of it over 10,000 samples), and
    each source's samples are its own, in its own epoch order."""
    sources = [_stream_dataset(n, first, 50, 30) for n, first in (("a", 0), ("b", 10_000), ("c", 20_000))]
    weights = [0.5, 0.3, 0.2]
    blend = data.BlendedDataset(sources, [5, 3, 2], "abc")  # (weights are normalized)
    n = 10_000
    blend._choose(n)
    counts = np.cumsum(np.eye(3)[blend._source], axis=0)
    lags = counts - np.outer(np.arange(1, n + 1), weights)
    assert np.abs(lags).max() <= 1
    progress = blend.progress(n, seq_len=8)
    assert progress["blend_shares"] == pytest.approx(weights, abs=0.01 * min(weights))
    x = blend.samples(range(40), seed=1, seq_len=8)
    for row, k, i in zip(x, blend._source, blend._index):
        assert np.array_equal(row, sources[k].samples([i], (1, k), 8)[0])
        assert (row < 10_000 * (k + 1)).all() and (row >= 10_000 * k).all()


@pytest.mark.parametrize("bad,message", [
    (["a", "0.7"], "blend weight 'a' \\(before 0.7\\) is not a positive number"),
    (["0.7", "a", "b"], "a blend is WEIGHT SOURCE pairs, e.g. --data 0.7 A 0.3 B; got 3 words"),
    (["heavy", "a", "0.3", "b"], "blend weight 'heavy' \\(before a\\) is not a positive number"),
    (["0", "a", "1", "b"], "blend weight '0'"),
])
def test_a_blend_that_does_not_parse_is_one_error_line(capsys, bad, message):
    line = one_line_error(capsys, ["--model", "llama", *LAYOUT, "--data", *bad])
    assert re.search(message, line), line


def test_a_blend_resumed_under_another_layout_reads_what_an_uninterrupted_run_reads(ranks, tmp_path):
    """Training on a blend of a JSON Lines file and a Megatron dataset: 10 steps in one
    process, against 4 steps saved and resumed at dp 2 (the blend's choices recomputed from
    the step): the same losses and gradient norms; the metrics carry the epochs and shares."""
    path = tmp_path / "docs.jsonl"
    _jsonl(path, [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(200)])
    prefix = str(tmp_path / "stdlib")
    data.main(["prepare", "stdlib", prefix, "--format", "megatron"])
    argv = ["--model", "llama", *LAYOUT, "--data", "0.25", str(path), "0.75", prefix]
    full = one_process(argv)
    assert full[-1]["blend_shares"] == [0.25, 0.75] and len(full[-1]["epoch"]) == 2
    ckpt = str(tmp_path / "ckpt")
    train_on(ranks, 1, argv + ["--steps", "10", "--save", ckpt, "--save-every", "4"])
    resumed, out = train_on(ranks, 2, argv + ["--load", f"{ckpt}/step_00000004"])
    assert_same_run(resumed, full[4:])
    assert "shares 0.25/0.75" in out


def test_eod_mask_loss_takes_end_of_text_targets_out_of_the_loss(ranks, tmp_path):
    """--eod-mask-loss: exactly the end-of-text targets become IGNORE_INDEX, and the loss is
    the mean over the targets left, also when data-parallel ranks hold different numbers of
    them (dp 2 = one process)."""
    ds = _stream_dataset("a", 0, 20, 6)
    x, y = ds.batch(0, 0, 8, 16)
    ds.eod_mask_loss = True
    x2, y2 = ds.batch(0, 0, 8, 16)
    assert torch.equal(x, x2) and (y2 != 256).all()
    assert torch.equal(y2 == data.IGNORE_INDEX, y == 256) and (y == 256).sum() >= 8
    path = tmp_path / "short.jsonl"
    _jsonl(path, [f"doc {i} " + "ab" * (i % 5) for i in range(300)])  # many end-of-texts per sample
    argv = ["--model", "llama", *LAYOUT, "--data", str(path), "--eod-mask-loss", "--steps", "4"]
    got, _ = train_on(ranks, 2, argv)
    assert_same_run(got, one_process(argv))
    plain = one_process([a for a in argv if a != "--eod-mask-loss"])
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(got, plain))  # the flag is felt


ANIMALS = ["cat", "dog", "owl", "yak", "emu", "elk", "bee", "fox"]


def _pairs(path, repeats):
    with open(path, "w") as f:
        for _ in range(repeats):
            for i, animal in enumerate(ANIMALS):
                f.write(json.dumps({"prompt": f"animal {i}:", "response": f" {animal}"}) + "\n")


def test_prompt_response_rows_count_response_tokens_only(tmp_path):
    path = tmp_path / "pairs.jsonl"
    _pairs(path, 2)
    train, val = data.load_dataset(str(path), "byte", 16)
    assert isinstance(train, data.InstructionData) and len(train.examples) == 15 and len(val.examples) == 1
    x, y = train.batch(0, 0, 4, 16)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        text = bytes(t for t in row_x if t < 256).decode()
        answer = ANIMALS[int(text.split()[1].rstrip(":"))]
        # the targets are " cat" and end-of-text, where the prompt ("animal N:", 9 bytes) ends
        assert [t for t in row_y if t != data.IGNORE_INDEX] == [*f" {answer}".encode(), 256]
        assert row_y[:8] == [data.IGNORE_INDEX] * 8 and row_y[8] == ord(" ")
    assert data.inspect(str(path))[0].endswith("prompt/response pairs, 16 examples (1 for validation), "
                                               "224 tokens")
    x, y = train.batch(0, 0, 4, 10)  # cut at seq_len + 1 = 11 tokens: " c" of the response
    assert [(row != data.IGNORE_INDEX).sum().item() for row in y] == [2] * 4


def test_a_tiny_llama_learns_prompt_to_response_pairs(tmp_path):
    """Eight prompt -> response pairs, each five times in the file (the last is validation):
    trained on the responses alone, the tiny llama's validation loss (response tokens only)
    falls from chance to near zero in 150 CPU steps."""
    path = tmp_path / "pairs.jsonl"
    _pairs(path, 5)
    records, _ = train_job(
        ["--model", "llama", "--config", "test", "--data", str(path), "--seq-len", "16", "--global-batch-size", "8",
         "--steps", "150", "--lr", "3e-3", "--warmup-steps", "10", "--eval-every", "50", "--sample-tokens", "0",
         "--device", "cpu"])
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert records[0]["loss"] > 4 and val[-1] < 0.05, (records[0]["loss"], val)
