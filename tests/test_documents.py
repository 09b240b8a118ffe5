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
import kernels
import models
import parallel
from conftest import (LAYOUT, assert_same_run, byte_level_bpe, check_layouts, one_line_error, one_process,
                      train_job, train_on)
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
    train, val = ds.split(seq_len=4, shares=(0.75, 0.25, 0)).values()
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


def test_eod_mask_loss_takes_the_prediction_at_end_of_text_out_of_the_loss(ranks, tmp_path):
    """--eod-mask-loss, as Megatron defines it: exactly the targets of end-of-text *inputs*
    (the next document's first token) become IGNORE_INDEX, the end-of-text targets stay, and
    the loss is the mean over the targets left, also when data-parallel ranks hold different
    numbers of them (dp 2 = one process)."""
    ds = _stream_dataset("a", 0, 20, 6)
    x, y = ds.batch(0, 0, 8, 16)
    ds.eod_mask_loss = True
    x2, y2 = ds.batch(0, 0, 8, 16)
    assert torch.equal(x, x2) and torch.equal(y2 == data.IGNORE_INDEX, x == 256) and (x == 256).sum() >= 8
    kept = y2 != data.IGNORE_INDEX
    assert torch.equal(y2[kept], y[kept]) and (y2 == 256).any()
    path = tmp_path / "short.jsonl"
    _jsonl(path, [f"doc {i} " + "ab" * (i % 5) for i in range(300)])  # many end-of-texts per sample
    argv = ["--model", "llama", *LAYOUT, "--data", str(path), "--eod-mask-loss", "--steps", "4"]
    got, _ = train_on(ranks, 2, argv)
    assert_same_run(got, one_process(argv))
    plain = one_process([a for a in argv if a != "--eod-mask-loss"])
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(got, plain))  # the flag is felt


def test_split_cuts_whole_documents_as_megatron_does():
    """--split: runs of whole documents by share of the document count (Megatron's rule),
    a split too small for a sample widened by whole documents from the one before it, and
    a stream of too few documents cut by tokens (validation and test at its end)."""
    starts = np.arange(0, 1001, 10)  # 100 documents of 10 tokens
    assert data.split_points(starts, (0.9, 0.05, 0.05), 8, "x").tolist() == [0, 900, 950, 1000]
    assert data.split_points(starts, (0.98, 0.01, 0.01), 15, "x").tolist() == [0, 960, 980, 1000]
    assert data.split_points(starts, (0.95, 0.05, 0), 8, "x").tolist() == [0, 950, 1000, 1000]
    assert data.split_points([0, 1000], (0.9, 0.05, 0.05), 8, "x").tolist() == [0, 900, 950, 1000]
    with pytest.raises(UsageError, match="too few for a sample"):
        data.split_points([0, 20], (0.9, 0.05, 0.05), 8, "x")
    assert data.parse_split("969,30,1") == (0.969, 0.03, 0.001)
    assert data.parse_split("98,2") == (0.98, 0.02, 0.0)
    for bad in ("98", "a,b", "98,0", "1,2,3,4", "98,-1,3"):
        with pytest.raises(UsageError, match="TRAIN,VAL"):
            data.parse_split(bad)


def test_a_test_split_is_evaluated_at_the_end(tmp_path):
    """--split 90,5,5: validation and test are disjoint runs of documents at the end, and the
    test loss is measured once, after the last step (in its record and the summary line)."""
    path = tmp_path / "docs.jsonl"
    _jsonl(path, [f"document {i}: " + "lorem ipsum " * (i % 9 + 1) for i in range(200)])
    splits = data.load_splits(str(path), "byte", 16, data.parse_split("90,5,5"))
    docs = [len(splits[k].doc_starts) - 1 for k in data.SPLITS]
    assert docs == [180, 10, 10] and splits["train"].shards[0][-1] == 256
    records, out = train_job(["--model", "llama", *LAYOUT, "--data", str(path), "--split", "90,5,5", "--steps", "3"])
    assert [("test_loss" in r) for r in records] == [False, False, True]
    assert f"| test {records[-1]['test_loss']:.4f} |" in out


def megatron_masks_and_positions(tokens, eot):
    """Megatron-LM's get_ltor_masks_and_position_ids for one row, transcribed from its
    definition: after each end-of-text at index i, later tokens may not attend tokens up to
    i, and positions from i + 1 on restart at 0. (mask (T, T) True = may attend, positions)."""
    T = len(tokens)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    positions = torch.arange(T)
    previous = 0
    for i in (tokens == eot).nonzero().flatten().tolist():
        mask[i + 1:, :i + 1] = False
        positions[i + 1:] -= i + 1 - previous
        previous = i + 1
    return mask, positions


def test_documents_follow_megatrons_rule():
    """data.document_inputs (each token's document and position in it) gives Megatron's
    positions, and kernels.positions_mask on its documents Megatron's mask, for rows that
    start, end and do not end with end-of-text, and with two in a row."""
    rows = torch.tensor([[5, 6, 256, 7, 8, 9, 256, 256, 3, 4],
                         [256, 1, 2, 3, 4, 5, 6, 7, 8, 256],
                         [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    documents, positions = data.document_inputs(rows, 256)
    index = torch.arange(rows.shape[1])
    mask = kernels.positions_mask(index, index, documents=documents)
    for row, got_mask, got_positions in zip(rows, mask[:, 0], positions):
        want_mask, want_positions = megatron_masks_and_positions(row, 256)
        assert torch.equal(got_mask, want_mask) and torch.equal(got_positions, want_positions)


PACKED = [[5, 6, 7, 256], [10, 11, 12, 13, 14, 256], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 256],
          [40, 41, 42]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model", ["llama", "gpt", "mixtral"])
def test_a_packed_document_reads_as_if_alone(request, model, backend):
    """With each token's document and restarted positions, a document packed among others
    gives the logits it gives alone (what --reset-attention-mask with --reset-position-ids
    promise), on the torch path and in the Triton kernels; without them it does not."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    cfg = models.make_config(model, "test")
    module = models.build(model, cfg, "cpu", seed=0).eval()
    row = torch.tensor([sum(PACKED, [])])
    documents, positions = data.document_inputs(row, 256)
    with torch.no_grad():
        packed = module(row, documents=documents, positions=positions)
        plain = module(row)
        start = 0
        for doc in PACKED:
            alone = module(torch.tensor([doc]))
            part = slice(start, start + len(doc))
            torch.testing.assert_close(packed[:, part], alone, atol=2e-5, rtol=1e-4)
            start += len(doc)
        assert (plain[:, len(PACKED[0]):] - packed[:, len(PACKED[0]):]).abs().max() > 1e-3


def _short_documents(path):
    _jsonl(path, [f"doc {i} " + "ab" * (i % 7) for i in range(300)])  # several documents per sample


DOCUMENT_FLAGS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]


def _packed_logits_under_cp(model, comm):
    """On each cp rank: (its share of the packed row's logits, the same tokens' logits with
    each document alone)."""
    import torch.distributed as dist
    layout = parallel.Layout(cp=dist.get_world_size(), rank=dist.get_rank(), cp_comm=comm,
                             cp_group=dist.group.WORLD)
    cfg = models.make_config(model, "test")
    packed = [*PACKED[:-1], PACKED[-1] + [256], [50, 51]]  # 28 tokens: divisible by 2 x cp
    row = torch.tensor([sum(packed, [])])
    documents, positions = data.document_inputs(row, 256)
    with torch.no_grad():
        got = models.build(model, cfg, "cpu", 0, layout).eval()(row, documents=documents, positions=positions)
        whole = models.build(model, cfg, "cpu", 0).eval()
        alone = torch.cat([whole(torch.tensor([doc])) for doc in packed], dim=1)
    return got, parallel.context_shard(alone, layout)


@pytest.mark.parametrize("model,comm", [("llama", "ring"), ("gpt", "ring"), ("llama", "allgather")])
def test_a_packed_document_reads_as_if_alone_under_cp_2(ranks, model, comm):
    for rank, (got, alone) in ranks(2).run(_packed_logits_under_cp, model=model, comm=comm).items():
        torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-4, msg=lambda m: f"rank {rank}: {m}")


@pytest.mark.parametrize("model,flags,layouts", [
    ("llama", DOCUMENT_FLAGS, [(2, ["--tp", "2"]), (2, ["--cp", "2"]), (2, ["--cp", "2", "--cp-comm", "allgather"]),
                               (2, ["--pp", "2"]), (2, [])]),
    ("gpt", DOCUMENT_FLAGS, [(4, ["--cp", "2", "--tp", "2"])]),
    ("gpt", ["--reset-position-ids"], [(2, ["--cp", "2"])]),
    ("mixtral", ["--reset-attention-mask"], [(2, ["--ep", "2"])]),
])
def test_document_flags_equal_one_process_on_every_layout(ranks, tmp_path, model, flags, layouts):
    """Per-document attention and positions: tp (with sp), cp (ring and all-gather), pp, dp
    and ep give the one-process run's loss and gradient norm at every step, and the flags
    change the run."""
    path = tmp_path / "short.jsonl"
    _short_documents(path)
    argv = ["--model", model, *LAYOUT, "--data", str(path), "--steps", "4", "--micro-batch-size", "2", *flags]
    check_layouts(ranks, argv, layouts)
    plain = one_process(argv[:-len(flags)])
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(one_process(argv)[1:], plain[1:]))


@pytest.mark.parametrize("argv,message", [
    (["--model", "mamba", "--reset-attention-mask"], "--reset-attention-mask applies to the attention decoders"),
    (["--model", "bert", "--reset-position-ids"], "--reset-position-ids applies to the attention decoders"),
])
def test_document_flags_refused_where_they_cannot_apply(capsys, argv, message):
    assert message in one_line_error(capsys, [*argv, "--config", "test", "--steps", "1"])


def test_document_flags_need_documents_ending_in_end_of_text(capsys, tmp_path):
    """A Megatron pair written without end-of-text (preprocess_data.py without --append-eod)
    has documents that --reset-attention-mask cannot find: refused, naming the fix."""
    prefix = str(tmp_path / "noeod")
    published_writer(prefix, [[[5, 6, 7] * 20]] * 30, np.uint16)
    error = one_line_error(capsys, ["--model", "llama", "--config", "test", "--data", prefix, "--seq-len", "16",
                                    "--reset-attention-mask", "--steps", "1"])
    assert "do not end with end-of-text" in error and "--append-eod" in error


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
    assert data.inspect(str(path))[0].endswith("fine-tuning examples, 16 (1 for validation), 224 tokens")
    x, y = train.batch(0, 0, 4, 10)  # cut at seq_len + 1 = 11 tokens: " c" of the response
    assert [(row != data.IGNORE_INDEX).sum().item() for row in y] == [2] * 4


def test_packed_prompt_response_rows_read_as_their_examples_alone(tmp_path):
    """Packed rows (--reset-attention-mask): several examples to a row, each example once per
    epoch with its own response-only targets, and the summed loss of packed rows, with each
    token's document and restarted positions, that of every example in a row of its own."""
    path = tmp_path / "pairs.jsonl"
    _pairs(path, 3)
    train = data.load_dataset(str(path), "byte", 48)[0]
    unpacked = [train.batch(0, 0, len(train.examples), 48)]
    train.packed = True
    rows = train._epoch_rows(0, 0, 48)
    assert sorted(sum(rows, [])) == list(range(len(train.examples))) and len(rows) < len(train.examples) / 2
    packed = [train.batch(0, 0, len(rows), 48)]
    assert train.progress(len(rows), 48) == {"epoch": 1.0}
    response_tokens = sum(targets.sum() for _, targets in train.examples)
    for x, y in unpacked + packed:
        assert (y != data.IGNORE_INDEX).sum() == response_tokens
    model = models.build("llama", models.make_config("llama", "test"), "cpu", seed=0).eval()
    with torch.no_grad():
        alone = model(*unpacked[0])
        x, y = packed[0]
        documents, positions = data.document_inputs(x, 256)
        together = model(x, y, documents=documents, positions=positions)
        apart = model(x, y)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
    assert abs(apart - alone) > 1e-2


def test_packed_prompt_response_rows_equal_one_process_at_dp_2(ranks, tmp_path):
    path = tmp_path / "pairs.jsonl"
    _pairs(path, 8)
    argv = ["--model", "llama", *LAYOUT, "--data", str(path), "--reset-attention-mask", "--reset-position-ids",
            "--seq-len", "64", "--steps", "4"]
    check_layouts(ranks, argv, [(2, [])])
    unpacked_epochs = 4 * 8 / 61  # (61 training examples, one to a row)
    assert one_process(argv)[-1]["epoch"] > 3 * unpacked_epochs  # about four to a row


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "name an animal"}, {"role": "assistant", "content": "the fox"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a dog?"},
     {"role": "assistant", "content": "lazy"}, {"role": "user", "content": "and then"},
     {"role": "assistant", "content": "it jumps over"}],
]


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE with ChatML's special tokens and a ChatML chat template."""
    return byte_level_bpe(tmp_path_factory.mktemp("chat_tokenizer"),
                          ["the quick brown fox jumps over the lazy dog, name an animal"] * 10, 320,
                          ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          {"eos_token": "<|endoftext|>", "chat_template": CHATML})


def test_chat_messages_render_as_transformers_renders_them(chat_tokenizer_dir, tmp_path):
    """{"messages": [...]} records: the text and tokens of transformers' apply_chat_template
    (the oracle) plus end-of-text, trained on exactly each assistant turn's text (its
    content and <|im_end|>) and the end-of-text; a tiny llama trains on them."""
    transformers = pytest.importorskip("transformers")
    oracle = transformers.AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    enc = data.get_tokenizer("hf:" + chat_tokenizer_dir)
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for _ in range(10):
            for conversation in CONVERSATIONS:
                f.write(json.dumps({"messages": conversation}) + "\n")
    train = data.load_splits(str(path), "hf:" + chat_tokenizer_dir, 64)["train"]
    for conversation, (tokens, targets) in zip(CONVERSATIONS, train.examples):
        for prompt in (False, True):
            assert data.render_chat(enc, conversation, prompt) == oracle.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=prompt)
        want = oracle.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert tokens.tolist() == [*want, enc.eot_token]
        trained = enc.decode(tokens[targets].tolist())
        answers = [m["content"] + "<|im_end|>\n" for m in conversation if m["role"] == "assistant"]
        assert trained == "".join(answers) + "<|endoftext|>"
    records, _ = train_job(["--model", "llama", *LAYOUT, "--data", str(path), "--tokenizer",
                            "hf:" + chat_tokenizer_dir, "--seq-len", "64", "--steps", "2",
                            "--reset-attention-mask"])
    assert len(records) == 2


def test_chat_messages_need_a_chat_template(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS))
    with pytest.raises(UsageError, match="need the tokenizer's chat template: --tokenizer byte has none"):
        data.load_splits(str(path), "byte", 16)


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
