import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from errors import UsageError

BYTE = data.get_tokenizer("byte")


def test_byte_tokenizer_is_lossless():
    assert BYTE.n_vocab == 257 and data.eot_token(BYTE) == 256
    text = "plain ascii\nnaïve café — 日本語 🎉\r\n\n\n" + "x" * 200 + "\n"
    assert BYTE.encode_ordinary(text) == list(text.encode())
    assert BYTE.decode(BYTE.encode_ordinary(text)) == text
    assert BYTE.encode("a<|endoftext|>", allowed_special="all") == [97, 256]


def test_byte_fast_path_equals_the_tokenizer():
    """data.py reads the byte tokenizer's ids straight off the UTF-8 bytes."""
    text = "naïve café — 日本語 🎉 \ufffd <|endoftext|>\n" * 3
    assert data._encode(BYTE, text).tolist() == BYTE.encode_ordinary(text)
    assert data._encode(BYTE, None).tolist() == [256]


def test_unknown_tokenizer():
    with pytest.raises(UsageError, match="--tokenizer one of byte"):
        data.get_tokenizer("sentencepiece")


def test_batch_contract():
    ds = data.TokenDataset([np.arange(1000, dtype=np.uint16)], "t")
    x, y = ds.batch(step=3, seed=7, global_batch_size=8, seq_len=16)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)  # y is x shifted by one
    assert torch.equal(ds.batch(3, 7, 8, 16)[0], x)  # same (seed, step): same batch
    assert torch.equal(x, torch.from_numpy(ds.samples(range(24, 32), 7, 16)[:, :-1]))  # step 3: samples 24-31
    assert not torch.equal(ds.batch(4, 7, 8, 16)[0], x)
    assert not torch.equal(ds.batch(3, 8, 8, 16)[0], x)
    for dp in (2, 4, 8):  # each data-parallel rank's rows are those rows of the dp=1 batch
        per = 8 // dp
        for rank in range(dp):
            rows = slice(rank * per, (rank + 1) * per)
            xr, yr = ds.batch(3, 7, 8, 16, rows=rows)
            assert torch.equal(xr, x[rows]) and torch.equal(yr, y[rows])


def test_an_epoch_reads_every_token_once_in_shuffled_documents():
    """Megatron's samples: per epoch the documents in a shuffled order, cut into samples of
    seq_len + 1; the inputs of an epoch's samples hold each token at most once (all but the
    stream's last few), and a sample runs on inside a document, or from its end-of-text into
    the next document's start. A document cut between two shards (as prepare's shards cut
    them) is still one document."""
    eot = 10_000
    docs = [np.append(np.arange(k * 100, k * 100 + n), eot) for k, n in enumerate([30, 5, 47, 12, 60])]
    stream = np.concatenate(docs)
    shards = [stream[:50], stream[50:]]  # the third document spans both
    ds = data.TokenDataset(shards, "t", eot)
    assert ds.doc_starts.tolist() == [0, 31, 37, 85, 98, 159]
    L = 8
    n = ds.n_samples(L)
    assert n == (len(stream) - 1) // L
    epoch0 = ds.samples(range(n), seed=3, seq_len=L)
    inputs = epoch0[:, :-1].ravel()
    words = inputs[inputs != eot]
    assert len(set(words.tolist())) == len(words) and len(inputs) == n * L
    assert len(words) >= len(stream) - len(docs) - L
    starts = {int(d[0]) for d in docs}
    for row in epoch0:
        for a, b in zip(row[:-1], row[1:]):
            assert b == a + 1 or (a == eot and b in starts) or b == eot, row
    epoch1 = ds.samples(range(n, 2 * n), seed=3, seq_len=L)
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(ds.samples([5, n + 5], 3, L), np.stack([epoch0[5], epoch1[5]]))


def test_too_little_data():
    with pytest.raises(UsageError, match=r"fewer than --seq-len \+ 1 = 9"):
        data.TokenDataset([np.arange(5), np.arange(3)], "tiny").batch(0, 0, 1, seq_len=8)


def _write_corpus(root):
    """A small text folder; returns its documents in the order data.py reads them."""
    docs = {"a.txt": "hello world\n" * 50,
            "sub/b.md": "naïve café 日本語\r\nline two\n" * 40,
            "sub/c.txt": "no trailing newline " * 30}
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode())
    (root / "image.bin").write_bytes(b"\x89PNG\0\0\0binary")  # not text: skipped
    (root / ".hidden.txt").write_text("skipped too")
    return list(docs.values())


def _stream(docs):
    return np.concatenate([BYTE.encode_ordinary(d) + [256] for d in docs])


def _tokens(*datasets):
    return np.concatenate([np.asarray(s) for ds in datasets for s in ds.shards])


def test_load_text_folder_and_glob(tmp_path):
    docs = _write_corpus(tmp_path)
    expected = _stream(docs)
    train, val = data.load_dataset(str(tmp_path), "byte", seq_len=16, val_fraction=0.1)
    np.testing.assert_array_equal(_tokens(train, val), expected)
    # Validation is whole documents: 10% of three rounds to none, so at least one.
    np.testing.assert_array_equal(_tokens(val), _stream(docs[2:]))
    train, val = data.load_dataset(str(tmp_path / "**" / "*.txt"), "byte", seq_len=100)
    np.testing.assert_array_equal(_tokens(train, val), _stream([docs[0], docs[2]]))
    np.testing.assert_array_equal(_tokens(val), _stream(docs[2:]))
    # One document: the stream is cut by tokens, at least one sample (17 tokens) for validation.
    train, val = data.load_dataset(str(tmp_path / "a.txt"), "byte", seq_len=16)
    np.testing.assert_array_equal(_tokens(train, val), _stream(docs[:1]))
    assert val.n_tokens == max(int(len(_stream(docs[:1])) * 0.05), 17)


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file or directory"):
        data.load_dataset(str(tmp_path / "missing"), "byte", 16)
    with pytest.raises(UsageError, match="matched no files"):
        data.load_dataset(str(tmp_path / "*.nothing"), "byte", 16)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(UsageError, match="use a smaller --seq-len or more data"):
        data.load_dataset(str(tmp_path / "short.txt"), "byte", 16)


def test_split_never_cuts_a_character(tmp_path):
    text = "ab日本\n語é🎉x\n" * 7 + "tail日本"  # multi-byte characters, no final newline
    (tmp_path / "f.txt").write_text(text)
    for block_bytes in (1, 5, 1 << 24):
        for percent in range(101):
            parts = list(data._read([str(tmp_path / "f.txt")], percent / 100, block_bytes))
            train = "".join(t for t, split in parts if t is not None and split == "train")
            val = "".join(t for t, split in parts if t is not None and split == "val")
            assert train + val == text


def test_prepare_roundtrip(tmp_path, capsys):
    docs = _write_corpus(tmp_path / "src")
    out = tmp_path / "prepared"
    meta = data.prepare(str(tmp_path / "src"), str(out), val_fraction=0.2, shard_tokens=500)
    assert "prepared" in capsys.readouterr().out
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and len(meta["train"]) > 1 and len(meta["val"]) >= 1
    train, val = data.load_dataset(str(out), "byte", seq_len=16)
    assert all(isinstance(s, np.memmap) for s in train.shards + val.shards)
    expected = _stream(docs)
    np.testing.assert_array_equal(_tokens(train, val), expected)
    assert 0.15 < val.n_tokens / len(expected) < 0.25
    x, y = train.batch(0, 0, 4, 16)
    assert x.shape == (4, 16)
    assert sorted(os.listdir(tmp_path)) == ["prepared", "src"]  # no temporary directory left

    with pytest.raises(UsageError, match="not empty"):
        data.prepare(str(tmp_path / "src"), str(out))
    with pytest.raises(UsageError, match="pass --tokenizer byte"):
        data.load_dataset(str(out), "gpt2", seq_len=16)
    with pytest.raises(UsageError, match="fewer than --seq-len"):
        data.load_dataset(str(out), "byte", seq_len=10_000)


def test_prepare_refuses_an_empty_split(tmp_path):
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(UsageError, match="too little text"):
        data.prepare(str(tmp_path / "one.txt"), str(tmp_path / "out"), val_fraction=0.5)
    assert os.listdir(tmp_path) == ["one.txt"]  # the temporary directory is gone


def test_prepare_cli(tmp_path):
    docs = _write_corpus(tmp_path / "src")
    out = str(tmp_path / "out")
    cmd = [sys.executable, "data.py", "prepare", str(tmp_path / "src"), out,
           "--val-fraction", "0.1"]
    cwd = os.path.dirname(os.path.abspath(data.__file__))
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0 and "prepared" in done.stdout, done.stderr
    np.testing.assert_array_equal(_tokens(*data.load_dataset(out, "byte", 16)), _stream(docs))
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)  # again: out exists
    assert done.returncode == 2 and done.stderr.startswith("error:"), done.stderr
    assert "not empty" in done.stderr


def test_stdlib_corpus():
    train, val = data.load_dataset(None, "byte", seq_len=256)
    assert train.n_tokens + val.n_tokens > 1_000_000
    assert train.shards[0][-1] == 256 and 0.02 < val.n_tokens / (train.n_tokens + val.n_tokens) < 0.1
    x, y = train.batch(0, 0, 2, 256)
    assert BYTE.decode(x[0].tolist())  # real text, decodable


def test_prepared_data_brings_its_tokenizer(tmp_path, capsys):
    """Training on shards prepared with a tokenizer needs no --tokenizer again (meta.json
    says it); a checkpoint needs no --model again (meta.json says it); without either, one
    line naming the flag."""
    import flags
    import train
    from conftest import FAST, byte_level_bpe, one_line_error, without_flags
    tokenizer = "hf:" + byte_level_bpe(tmp_path, ["the quick brown fox jumps over the lazy dog"] * 10, 300,
                                       ["<|endoftext|>"], {"eos_token": "<|endoftext|>"})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("the lazy dog jumps over the quick brown fox. " * 200)
    data.prepare(str(tmp_path / "src"), str(tmp_path / "prepared"), tokenizer, val_fraction=0.1)
    assert data.recorded_tokenizer([str(tmp_path / "prepared")]) == tokenizer
    ckpt = str(tmp_path / "ckpt")
    records = train.train(flags.parse_args(["--model", "llama", *FAST, "--steps", "2", "--data",
                                            str(tmp_path / "prepared"), "--save", ckpt]))
    assert len(records) == 2
    resumed = train.train(flags.parse_args([*without_flags(FAST, "--config"), "--steps", "3", "--data", str(tmp_path / "prepared"),
                                            "--load", ckpt]))
    assert [r["step"] for r in resumed] == [3]
    assert "--model is required" in one_line_error(capsys, [*FAST, "--steps", "1"])
