"""Tokenizers, text corpora and the batches train.py reads.

Four kinds of data source, all named by one string (`--data`):

  1. "stdlib" (or nothing): real text that needs no download, the Python standard library's
     own top-level source files, tokenized in memory at start-up (~4.7 MB, under a second).
  2. A text file, a JSON Lines file (`.jsonl`, `.jsonl.gz`: one document per line, its text
     under `--json-key`, default "text"), a directory (every such file under it, hidden
     ones and files with NUL bytes skipped) or a glob pattern: also tokenized in memory;
     fine for a few hundred MB.
  3. A directory written by `python data.py prepare SRC OUT_DIR`: token shards on disk that
     are memory-mapped, so a corpus far larger than RAM costs no start-up time.
  4. A Megatron-LM indexed dataset, named by its prefix (PREFIX.bin + PREFIX.idx, as
     Megatron's tools/preprocess_data.py writes them, or `data.py prepare --format
     megatron`): memory-mapped too.

Each text file, and each line of a JSON Lines file, is a document, and each document ends
with the tokenizer's end-of-text token (as in GPT-2's data), so that windows spanning two
documents show the model where one ends. `--split TRAIN,VAL[,TEST]` divides a source's
documents (split_points; a prepared directory keeps its own split). Inside a sample, a token's
document and its position in it (document_inputs: Megatron's rule, a document ends at each
end-of-text) let the model attend within documents only (--reset-attention-mask) and restart
positions (--reset-position-ids). `python data.py inspect PATH` describes any source.

The batch contract, on which layout-independent training rests: row r of step s is global
sample s x global_batch_size + r, a function of (seed, s, r) alone (TokenDataset: epochs of
shuffled documents, as Megatron cuts them); each data-parallel rank reads its own rows. So
every parallel layout sees the same global batch, and resuming at step s needs no data-loader
state: the step number is the position. Several sources blend by weight (`--data 0.7 A 0.3
B`: BlendedDataset), and a JSON Lines file of prompt/response or chat `messages` records is
fine-tuning data (InstructionData: the loss on the responses only; packed several to a row
with --reset-attention-mask).

BERT (bert.py) reads the same sources differently: MaskedLMData makes masked-language-model
examples ([CLS] A [SEP] B [SEP], 15% of the text to predict, A and B swapped half the time for
sentence-order prediction) and load_task a labelled classification task for fine-tuning. Their
batches keep the contract one level finer: row i of step s is drawn from (seed, s, i) alone.

T5 (t5.py) reads them as SpanCorruptionData: 15% of a window, in spans of 3 tokens on average,
is replaced by sentinels (<extra_id_0>, <extra_id_1>, ...) in the encoder's input, and the
decoder predicts the spans; its rows are drawn as BERT's are.
"""
import contextlib
import dataclasses
import errno
import functools
import glob
import gzip
import hashlib
import json
import os
import shutil
import struct
import sys
import sysconfig
import time

import numpy as np
import tiktoken
import torch

import errors
from errors import UsageError

BYTE_TOKENIZER = "byte"
TIKTOKEN_NAMES = ("gpt2", "cl100k_base", "o200k_base")
HF_PREFIX = "hf:"  # "hf:DIR": the tokenizer.json of a Hugging Face model folder


def get_tokenizer(name: str = BYTE_TOKENIZER):
    """"byte" (built here, 257 tokens), one of tiktoken's named encodings, or "hf:DIR"
    (a Hugging Face tokenizer.json, through HFTokenizer's tiktoken-like interface)."""
    if name == BYTE_TOKENIZER:
        # One token per UTF-8 byte plus end-of-text: lossless for any string and needs no
        # download. The pattern only cuts text into chunks (there are no merges to limit).
        return _ByteEncoding(BYTE_TOKENIZER, pat_str=r"[^\n]{1,64}\n?|\n",
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})
    if name.startswith(HF_PREFIX):
        return HFTokenizer(name[len(HF_PREFIX):])
    if name not in TIKTOKEN_NAMES:
        raise UsageError(f"unknown tokenizer {name!r}: use --tokenizer one of "
                         f"{', '.join((BYTE_TOKENIZER,) + TIKTOKEN_NAMES)}, or hf:DIR (a folder "
                         f"with a Hugging Face tokenizer.json)")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises whatever its download raised
        raise UsageError(f"cannot load tokenizer {name!r} (tiktoken needs to download it or find "
                         f"it in TIKTOKEN_CACHE_DIR): use --tokenizer byte, or run once with "
                         f"network access") from e


class _ByteEncoding(tiktoken.Encoding):
    """The byte tokenizer: a tiktoken Encoding (n_vocab 257) whose decode also renders the ids
    after end-of-text that T5 adds to it (257: "<pad>", 357 - i: "<extra_id_i>", see
    t5_special_tokens), as HFTokenizer.decode renders a vocabulary's special tokens, instead of
    failing on them: a T5's samples print readably. (BERT's byte specials reuse ids 257-260;
    BERT never decodes, and they would print under T5's names.)"""

    def decode_bytes(self, tokens) -> bytes:
        tokens, out, start = list(tokens), [], 0
        for i, t in enumerate(tokens + [None]):
            if t is None or t in _BYTE_T5_NAMES:
                out.append(super().decode_bytes(tokens[start:i]))
                out.append(_BYTE_T5_NAMES.get(t, b""))
                start = i + 1
        return b"".join(out)

    def decode(self, tokens, errors: str = "replace") -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)


class HFTokenizer:
    """A Hugging Face tokenizer (DIR/tokenizer.json, run by the optional `tokenizers`
    package) with the part of tiktoken's Encoding that this code uses: encode_ordinary,
    decode, n_vocab, eot_token and name.

    eot_token, which ends every document, is the tokenizer's end-of-sequence token: the
    eos_token of DIR/tokenizer_config.json, else eos_token_id of DIR/config.json, else the
    first of <|endoftext|>, </s>, <eos>, [SEP] (BERT's vocabularies have no end-of-text) in
    the vocabulary; with none of these, a UsageError."""

    def __init__(self, directory: str):
        try:
            import tokenizers
        except ImportError:
            raise UsageError(f"tokenizer {HF_PREFIX}{directory} needs the tokenizers package: "
                             f"pip install tokenizers") from None
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise UsageError(f"tokenizer {HF_PREFIX}{directory}: no file {path}")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exceptions
            raise UsageError(f"cannot read tokenizer {path} ({' '.join(str(e).split())})") from None
        # Like tiktoken's encode_ordinary: "<|endoftext|>" written in a text is text, not a token.
        self._tok.encode_special_tokens = True
        self.name, self.directory = HF_PREFIX + directory, directory
        self.n_vocab = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eot_token = self._eos_id(directory)

    def _eos_id(self, directory):
        def read(file):
            return _read_json(os.path.join(directory, file))
        eos = read("tokenizer_config.json").get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and self._tok.token_to_id(eos) is not None:
            return self._tok.token_to_id(eos)
        eos_id = read("config.json").get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int):
            return eos_id
        for token in ("<|endoftext|>", "</s>", "<eos>", "[SEP]"):  # [SEP]: BERT's vocabularies
            if self._tok.token_to_id(token) is not None:
                return self._tok.token_to_id(token)
        raise UsageError(f"tokenizer {self.name} has no end-of-text token: set eos_token in "
                         f"{directory}/tokenizer_config.json")

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, text: str) -> list[int]:
        """A chat template's text, its special tokens (<|im_start|> ...) as tokens."""
        self._tok.encode_special_tokens = False
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = True

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


# A Hugging Face tokenizer's files: what an exported folder and a checkpoint carry.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(name: str) -> dict:
    """{file name: bytes}: the files of an hf:DIR tokenizer, for a checkpoint to carry so
    that its text reads without DIR ({} for the built-in and tiktoken encodings, which need
    no folder). The end-of-text token is written into tokenizer_config.json, as DIR may have
    named it in its config.json, which stays behind."""
    if not name.startswith(HF_PREFIX):
        return {}
    enc = get_tokenizer(name)
    files = {}
    for file in TOKENIZER_FILES:
        path = os.path.join(enc.directory, file)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[file] = f.read()
    config = _read_json(os.path.join(enc.directory, "tokenizer_config.json"))
    if config.get("eos_token") is None or "tokenizer_config.json" not in files:
        config["eos_token"] = enc._tok.id_to_token(enc.eot_token)
        files["tokenizer_config.json"] = json.dumps(config, indent=1, ensure_ascii=False).encode()
    return files


def _read_json(path) -> dict:
    """A JSON file's object, or {} if it is missing or unreadable (optional config files);
    one that holds something else is a UsageError naming it."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return errors.check_json(value, path)


def _byte_spelling():
    """GPT-2's map of the 256 bytes to printable characters, in which byte-level BPE files
    (tokenizer.json) spell their tokens: printable bytes stand for themselves, the others
    for the characters from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def tokenizer_json(enc) -> dict:
    """A tiktoken encoding (byte, gpt2, cl100k_base, o200k_base) as a Hugging Face
    tokenizer.json: the same byte-level BPE, so that an exported model's folder carries its
    tokenizer and transformers encodes every text to the same ids (tested). Its vocabulary
    is the encoding's ranks; its merges, every split of a token into two tokens, in the
    order of the merged token's rank (tiktoken merges the pair whose result ranks lowest);
    a pre-token that is a token as a whole is taken whole (ignore_merges), as tiktoken
    does; the text is cut by the encoding's own regex; special tokens are added tokens."""
    ranks, spell = enc._mergeable_ranks, _byte_spelling()

    def spelled(token):
        return "".join(spell[b] for b in token)
    merges = sorted((rank, ranks[token[:i]], ranks[token[i:]], spelled(token[:i]), spelled(token[i:]))
                    for token, rank in ranks.items() for i in range(1, len(token))
                    if token[:i] in ranks and token[i:] in ranks)
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in enc._special_tokens.items()],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **byte_level}]},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {spelled(token): rank for token, rank in ranks.items()},
                  "merges": [[left, right] for *_, left, right in merges]}}


# A text that exercises a tokenizer: words, code, digits, whitespace runs, accents, CJK, emoji.
FINGERPRINT_TEXT = ("The quick brown fox jumps over the lazy dog. def main():\n    return 42\n\n"
                    "Ünïcödé naïve café, 日本語のテキスト, 1234567890 \t tabs\r\n 🦊🐶 -- <end>")


def tokenizer_fingerprint(name: str) -> str:
    """What identifies a tokenizer's behaviour, not its path: a hash of its vocabulary size,
    end-of-text id and the ids of FINGERPRINT_TEXT. A checkpoint records it, so that a
    tokenizer folder that moved can be named again (--tokenizer) and checked to be the same.
    Computed once per process and state of the folder's files (each save records it)."""
    stamp = ()
    if name.startswith(HF_PREFIX):
        paths = [os.path.join(name[len(HF_PREFIX):], f) for f in (*TOKENIZER_FILES, "config.json")]
        stamp = tuple((s.st_mtime_ns, s.st_size) if (s := _stat(p)) else None for p in paths)
    return _fingerprint(name, stamp)


def _stat(path):
    try:
        return os.stat(path)
    except OSError:
        return None


@functools.cache
def _fingerprint(name, stamp):
    enc = get_tokenizer(name)
    probe = [enc.n_vocab, enc.eot_token, *map(int, enc.encode_ordinary(FINGERPRINT_TEXT))]
    return hashlib.sha256(json.dumps(probe).encode()).hexdigest()[:16]


def eot_token(enc) -> int:
    return enc.eot_token


def _dtype(enc):
    return np.uint16 if enc.n_vocab <= 2**16 else np.uint32


def _encode(enc, text):
    """Token ids of a text (None: a document's end) as an array of _dtype(enc)."""
    if text is None:
        return np.array([enc.eot_token], _dtype(enc))
    if enc.name == BYTE_TOKENIZER:  # the ids are the UTF-8 bytes: no tokenizer needed (10x faster)
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(_dtype(enc))
    return np.array(enc.encode_ordinary(text), _dtype(enc))


SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = (0.95, 0.05, 0.0)  # shares of the documents (--split)


class TokenDataset:
    """Token shards (1-D integer arrays, usually np.memmap) laid end to end: a stream of
    documents, each ending in end-of-text `eot` (without `eot`, each shard is one document;
    `doc_starts`, when known, gives their token offsets).

    `batch` cuts samples as Megatron's GPTDataset does: each epoch lays the documents end to
    end in an order shuffled by (seed, epoch) and cuts that stream into samples of seq_len + 1
    tokens (a sample's last target is the next one's first input), visited in an order
    shuffled by (seed, epoch). Global sample g is sample g mod n of epoch g div n (n samples
    per epoch), and row r of step s is global sample s x global_batch_size + r on every
    layout: each sample is seen once per epoch, and where a run is in its data depends on its
    step alone (no loader state to save). `window` gives BERT's and T5's example builders
    random windows inside one shard instead.

    `vocab_size`, when set, is checked on every sample and window read: a file written with
    another tokenizer (a Megatron .bin records none) is refused, not trained as garbage.
    `eod_mask_loss` (Megatron's --eod-mask-loss) takes out of the loss the prediction made at
    each end-of-text input (its target is the next document's first token, which the document
    that ended cannot predict): its label is IGNORE_INDEX. The end-of-text itself stays a
    target, so the model learns where documents end."""

    def __init__(self, shards: list[np.ndarray], name: str, eot: int | None = None,
                 doc_starts: np.ndarray | None = None):
        self.shards, self.name = list(shards), name
        self.n_tokens = sum(len(s) for s in self.shards)
        self._bounds = {}  # seq_len -> cumulative count of window starts, shard by shard
        self._shard_starts = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(np.int64)
        if doc_starts is not None:
            starts = np.asarray(doc_starts, np.int64)
        elif eot is None:
            starts = self._shard_starts
        else:  # a document ends after each end-of-text
            starts = np.concatenate([[0], *[np.flatnonzero(np.asarray(s) == eot) + 1 + offset
                                            for s, offset in zip(self.shards, self._shard_starts)]])
        self.doc_starts = np.unique(np.concatenate([starts, [self.n_tokens]]))
        self._epochs = {}
        self.eot, self.vocab_size, self.eod_mask_loss = eot, None, False

    def n_samples(self, seq_len: int) -> int:
        """Samples per epoch; raises UsageError if there is not one."""
        if self.n_tokens < seq_len + 1:
            raise UsageError(f"{self.name} has {self.n_tokens} tokens, fewer than --seq-len + 1 = "
                             f"{seq_len + 1}; use a smaller --seq-len or more data")
        return (self.n_tokens - 1) // seq_len

    def _epoch(self, seed, epoch, seq_len):
        """(document order, where each ordered document starts in the epoch's stream, sample
        order) of one epoch, the last two kept."""
        key = (seed, epoch, seq_len)
        if key not in self._epochs:
            rng = np.random.default_rng([*np.atleast_1d(seed), epoch])
            order = rng.permutation(len(self.doc_starts) - 1)
            lengths = np.diff(self.doc_starts)[order]
            self._epochs = {k: v for k, v in self._epochs.items() if k[1] >= epoch - 1}
            self._epochs[key] = (order, np.concatenate([[0], np.cumsum(lengths)]),
                                 rng.permutation(self.n_samples(seq_len)))
        return self._epochs[key]

    def _check_on_disk(self, shard, stop):
        """A memory-mapped shard must still hold its first `stop` tokens on disk: reading a
        page of a file truncated since it was mapped (the data changed under the run) would
        end the process with SIGBUS, no message and no checkpoint."""
        if isinstance(shard, np.memmap) and shard.filename is not None:
            needed = shard.offset + min(stop, len(shard)) * shard.itemsize
            size = os.path.getsize(shard.filename) if os.path.exists(shard.filename) else 0
            if size < needed:
                raise UsageError(f"{self.name}: {shard.filename} shrank while training (now {size:,} bytes, "
                                 f"{needed:,} needed): the data changed under the run; restore it and resume "
                                 f"from the last checkpoint")

    def _stream(self, start, stop):
        """Tokens [start, stop) of the shards laid end to end."""
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - self._shard_starts[first]
            self._check_on_disk(self.shards[first], offset + stop - start)
            piece = self.shards[first][offset:offset + stop - start]
            pieces.append(np.asarray(piece, np.int64))
            start += len(piece)
            first += 1
        return np.concatenate(pieces)

    def samples(self, indices, seed, seq_len: int) -> np.ndarray:
        """Global samples `indices` (int64, [len(indices), seq_len + 1])."""
        n = self.n_samples(seq_len)
        rows = []
        for g in np.asarray(indices):
            order, starts, sample_order = self._epoch(seed, int(g) // n, seq_len)
            position, need, row = int(sample_order[g % n]) * seq_len, seq_len + 1, []
            doc = int(np.searchsorted(starts, position, side="right")) - 1
            while need:  # the sample's tokens, across as many documents as it spans
                begin = self.doc_starts[order[doc]] + position - starts[doc]
                end = min(self.doc_starts[order[doc] + 1], begin + need)
                row.append(self._stream(begin, end))
                need -= end - begin
                position, doc = starts[doc + 1], doc + 1
            rows.append(np.concatenate(row))
        samples = np.stack(rows) if rows else np.zeros((0, seq_len + 1), np.int64)
        self._check_ids(samples)
        return samples

    def check_end_of_text(self, n_documents=1000):
        """Documents are found by their end-of-text (--reset-attention-mask and the other
        document flags): a UsageError when one of the first n_documents lacks it (but the
        last document, which a train/validation split may have cut)."""
        ends = self.doc_starts[1:-1][:n_documents] - 1
        if self.eot is None or any(self._stream(e, e + 1)[0] != self.eot for e in ends):
            raise UsageError(f"{self.name}: documents do not end with end-of-text (id {self.eot}), "
                             f"by which the document flags find them; prepare the data with one "
                             f"(Megatron's preprocess_data.py: --append-eod)")

    def describe(self, seq_len: int) -> str:
        return (f"{self.n_tokens:,} train tokens in {len(self.doc_starts) - 1:,} documents, "
                f"{self.n_samples(seq_len):,} samples per epoch")

    def progress(self, samples_seen: int, seq_len: int, seed=0) -> dict:
        """Where training is in this data: epochs (fractional) after `samples_seen` samples
        (`seed`: the run's, on which packed fine-tuning rows per epoch depend)."""
        return {"epoch": samples_seen / self.n_samples(seq_len)}

    def batch(self, step: int, seed: int, global_batch_size: int, seq_len: int,
              rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (int64, [rows, seq_len]) for the given rows of step's global batch."""
        indices = step * global_batch_size + np.arange(global_batch_size)[rows if rows is not None else slice(None)]
        windows = torch.from_numpy(self.samples(indices, seed, seq_len))
        inputs, labels = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.eod_mask_loss:
            labels[inputs == self.eot] = IGNORE_INDEX
        return inputs, labels

    def _window_bounds(self, seq_len):
        if seq_len not in self._bounds:
            # A window of seq_len + 1 tokens lies inside one shard (shards are separate files,
            # so a window across two would join unrelated text): a shard of L tokens has
            # L - seq_len starts, a shorter one none.
            counts = [max(len(s) - seq_len, 0) for s in self.shards]
            if sum(counts) == 0:
                longest = max((len(s) for s in self.shards), default=0)
                raise UsageError(f"{self.name} has {longest} tokens (longest shard), fewer than "
                                 f"--seq-len + 1 = {seq_len + 1}; use a smaller --seq-len or "
                                 f"more data")
            self._bounds[seq_len] = np.concatenate([[0], np.cumsum(counts)])
        return self._bounds[seq_len]

    def n_windows(self, seq_len: int) -> int:
        """How many distinct windows there are; raises UsageError if none."""
        return int(self._window_bounds(seq_len)[-1])

    def _check_ids(self, tokens):
        if self.vocab_size is not None and len(tokens) and not 0 <= tokens.min() <= tokens.max() < self.vocab_size:
            raise UsageError(f"{self.name} holds token id {int(tokens.max())} (or {int(tokens.min())}) "
                             f"outside the model's vocabulary of {self.vocab_size}: it was written with "
                             f"another tokenizer; pass that one as --tokenizer (python data.py inspect "
                             f"shows its id range)")

    def window(self, index: int, seq_len: int) -> tuple[int, np.ndarray]:
        """Window number `index` of the n_windows(seq_len) that batch draws from (seq_len + 1
        tokens, int64) and the index of its shard: for readers that draw their own starts."""
        bounds = self._window_bounds(seq_len)
        shard = int(np.searchsorted(bounds, index, side="right")) - 1
        offset = index - bounds[shard]
        self._check_on_disk(self.shards[shard], offset + seq_len + 1)
        window = np.asarray(self.shards[shard][offset:offset + seq_len + 1], np.int64)
        self._check_ids(window)
        return shard, window


def document_inputs(input_ids, eot):
    """Megatron's document rule for samples that pack several documents (its
    --reset-attention-mask and --reset-position-ids): a document ends at each end-of-text
    input token, which belongs to the document it ends. Returns (documents, positions),
    int64 (B, T): each token's document number in its row, and its position in that
    document (0 at each document's first token)."""
    first = torch.ones_like(input_ids, dtype=torch.bool)
    first[:, 1:] = input_ids[:, :-1] == eot
    index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    starts = torch.where(first, index, 0).cummax(1).values
    return first.long().cumsum(1) - 1, index - starts


class BlendedDataset:
    """Sources blended by weight, as Megatron's BlendedDataset: global sample i is the next
    sample of the source whose count so far lags its share of i + 1 samples the most (ties:
    the first source), so after any number of samples each source's count is within one of
    its weight's share. The choices are computed in order and kept (about a microsecond per
    sample per source: a run resumed at step s computes the first s x batch once)."""

    def __init__(self, sources: list[TokenDataset], weights: list[float], name: str):
        total = sum(weights)
        self.sources, self.weights, self.name = sources, [w / total for w in weights], name
        self._source, self._index, self._counts = [], [], [0] * len(sources)
        self._shares_at = 0, np.zeros(len(sources), np.int64)  # (samples counted, their sources)
        self.eot = sources[0].eot
        self.vocab_size, self.eod_mask_loss = None, False

    def __setattr__(self, name, value):  # vocab_size, eod_mask_loss: every source's
        if name in ("vocab_size", "eod_mask_loss"):
            for source in self.sources:
                setattr(source, name, value)
        super().__setattr__(name, value)

    def _choose(self, upto):
        counts, weights = self._counts, self.weights
        for i in range(len(self._source), upto):
            k = max(range(len(weights)), key=lambda k: weights[k] * (i + 1) - counts[k])
            self._source.append(k)
            self._index.append(counts[k])
            counts[k] += 1

    def samples(self, indices, seed, seq_len: int) -> np.ndarray:
        indices = np.asarray(indices)
        self._choose(int(indices.max()) + 1 if len(indices) else 0)
        source = np.array([self._source[i] for i in indices], np.int64)
        index = np.array([self._index[i] for i in indices], np.int64)
        out = np.zeros((len(indices), seq_len + 1), np.int64)
        for k, ds in enumerate(self.sources):
            mine = source == k
            if mine.any():
                out[mine] = ds.samples(index[mine], (seed, k), seq_len)
        return out

    @property
    def n_tokens(self):
        return sum(ds.n_tokens for ds in self.sources)

    def describe(self, seq_len: int) -> str:
        return "blend of " + ", ".join(f"{w:.2f} x {ds.name.removesuffix(' (train)')} ({ds.n_tokens:,} tokens, "
                                       f"{ds.n_samples(seq_len):,} samples per epoch)"
                                       for w, ds in zip(self.weights, self.sources))

    def progress(self, samples_seen: int, seq_len: int, seed=0) -> dict:
        """Each source's share of the samples so far and its epochs."""
        self._choose(samples_seen)
        counted, counts = self._shares_at
        if samples_seen < counted:  # (an earlier point: count again from the start)
            counted, counts = 0, np.zeros(len(self.sources), np.int64)
        counts = counts + np.bincount(self._source[counted:samples_seen], minlength=len(self.sources))
        self._shares_at = samples_seen, counts
        return {"epoch": [round(c / ds.n_samples(seq_len), 4) for c, ds in zip(counts, self.sources)],
                "blend_shares": [round(c / max(samples_seen, 1), 4) for c in counts]}

    batch = TokenDataset.batch  # (the same rule: row r of step s is global sample s x batch + r)

    def check_end_of_text(self):
        for source in self.sources:
            source.check_end_of_text()


class InstructionData:
    """Fine-tuning examples for a decoder, from JSON Lines records: {"prompt": ...,
    "response": ...}, or {"messages": [{"role": ..., "content": ...}, ...]} rendered by the
    tokenizer's chat template (chat_examples). An example is its tokens and which of them
    are targets: the response (each assistant turn) and the closing end-of-text; labels
    elsewhere are IGNORE_INDEX, so the loss counts response tokens alone. Examples are
    visited once per epoch in an order shuffled by (seed, epoch), and laid into rows of
    seq_len + 1 tokens: one example per row, or with `packed` (set for
    --reset-attention-mask, which keeps the packed examples from seeing each other) as many
    consecutive examples as fit. A row is padded at its end with end-of-text whose targets
    are ignored (causal attention never looks right); an example longer than a row is cut.
    Row r of step s is global row s x global_batch_size + r on every layout, as
    TokenDataset's samples are."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], eot: int, name: str):
        """examples: (tokens int64, targets bool: tokens[j] is trained, predicted from tokens[:j])."""
        self.examples, self.eot, self.name = examples, eot, name
        self.n_tokens = sum(len(tokens) for tokens, _ in examples)
        self.vocab_size, self.eod_mask_loss, self.packed = None, False, False
        self._epochs = {}  # (seed, seq_len, packed) -> [rows of epoch 0, of epoch 1, ...] so far

    def _epoch_rows(self, seed, epoch, seq_len):
        """The rows of an epoch: lists of example indices (every earlier epoch's kept, so that
        a global row number finds its epoch)."""
        epochs = self._epochs.setdefault((seed, seq_len, self.packed), [])
        while len(epochs) <= epoch:
            order = np.random.default_rng([seed, len(epochs)]).permutation(len(self.examples))
            rows, used = [], seq_len + 1
            for i in order.tolist():
                size = len(self.examples[i][0])
                if not self.packed or used + size > seq_len + 1:
                    rows.append([])
                    used = 0
                rows[-1].append(i)
                used += size
            epochs.append(rows)
        return epochs[epoch]

    def _locate(self, g, seed, seq_len):
        """(epoch, row in it) of global row g."""
        epoch = 0
        while g >= len(self._epoch_rows(seed, epoch, seq_len)):
            g -= len(self._epoch_rows(seed, epoch, seq_len))
            epoch += 1
        return epoch, g

    def batch(self, step: int, seed: int, global_batch_size: int, seq_len: int,
              rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        indices = step * global_batch_size + np.arange(global_batch_size)[rows if rows is not None else slice(None)]
        tokens = np.full((len(indices), seq_len + 1), self.eot, np.int64)
        labels = np.full((len(indices), seq_len), IGNORE_INDEX, np.int64)
        for row, g in enumerate(indices.tolist()):
            epoch, r = self._locate(g, seed, seq_len)
            start = 0
            for i in self._epoch_rows(seed, epoch, seq_len)[r]:
                example, targets = (a[:seq_len + 1 - start] for a in self.examples[i])
                tokens[row, start:start + len(example)] = example
                trained = np.flatnonzero(targets[1:]) + 1  # (the first token has nothing before it)
                labels[row, start + trained - 1] = example[trained]
                start += len(example)
        TokenDataset._check_ids(self, tokens)
        return torch.from_numpy(tokens[:, :-1]).contiguous(), torch.from_numpy(labels)

    def check_end_of_text(self):
        """(Every example ends with end-of-text: load_instructions appends it.)"""

    def describe(self, seq_len: int) -> str:
        longest = max(len(tokens) for tokens, _ in self.examples)
        cut = sum(len(tokens) > seq_len + 1 for tokens, _ in self.examples)
        return (f"{len(self.examples):,} fine-tuning examples, {self.n_tokens:,} tokens (longest "
                f"{longest}; {cut} cut at --seq-len + 1){'; packed' if self.packed else ''}")

    def progress(self, samples_seen: int, seq_len: int, seed=0) -> dict:
        if not self.packed:
            return {"epoch": samples_seen / len(self.examples)}
        epoch, row = self._locate(samples_seen, seed, seq_len)  # (packed rows per epoch vary)
        return {"epoch": epoch + row / len(self._epoch_rows(seed, epoch, seq_len))}


def _instruction_file(spec, json_key):
    """Whether `spec` is one JSON Lines file of fine-tuning records (its first record has
    "prompt" and "response", or "messages", and no `json_key`)."""
    if not (isinstance(spec, str) and _is_jsonl(spec) and os.path.isfile(spec)):
        return False
    _, _, record = next(_json_records(spec), (0, 0, {}))
    return (isinstance(record, dict) and json_key not in record
            and ({"prompt", "response"} <= set(record) or "messages" in record))


def load_instructions(path, tokenizer_name, shares=DEFAULT_SPLIT):
    """{split: InstructionData} of a fine-tuning JSON Lines file (prompt/response or
    messages records): the examples in order, cut by the (train, val, test) shares, at least
    one example for each split with a share."""
    enc = get_tokenizer(tokenizer_name)
    examples = []
    for _, number, record in _json_records(path):
        where = f"{path}, line {number}"
        if isinstance(record, dict) and "messages" in record:
            segments = chat_segments(enc, record["messages"], where)
        elif isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("prompt", "response")):
            if not record["prompt"]:
                raise UsageError(f"{where}: an empty prompt (the first response token needs a token "
                                 f"before it)")
            segments = [(_encode(enc, record["prompt"]), False), (_encode(enc, record["response"]), True)]
        else:
            raise UsageError(f"{where}: a fine-tuning file needs the text keys \"prompt\" and "
                             f"\"response\", or a \"messages\" list, on every line")
        segments.append((np.array([enc.eot_token]), True))  # the end: a target, and a document's end
        examples.append((np.concatenate([t for t, _ in segments]).astype(np.int64),
                         np.concatenate([np.full(len(t), trained) for t, trained in segments])))
    sizes = [max(1, round(len(examples) * x)) if x else 0 for x in shares[1:]]
    if len(examples) <= sum(sizes):
        raise UsageError(f"{path} has {len(examples)} fine-tuning example(s); at least {sum(sizes) + 1} "
                         f"are needed (one for training and each other split)")
    cuts = [0, len(examples) - sum(sizes), len(examples) - sizes[1], len(examples)]
    return {split: InstructionData(examples[a:b], enc.eot_token, f"--data {path} ({split})")
            for split, a, b in zip(SPLITS, cuts[:-1], cuts[1:]) if b > a}


def chat_template(enc):
    """The Jinja chat template of a Hugging Face tokenizer folder (tokenizer_config.json's
    "chat_template": a string, or the one named "default" of a list; else the file
    chat_template.jinja beside it), or None."""
    directory = getattr(enc, "directory", None)
    if directory is None:
        return None
    template = _read_json(os.path.join(directory, "tokenizer_config.json")).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is None and os.path.isfile(os.path.join(directory, "chat_template.jinja")):
        with open(os.path.join(directory, "chat_template.jinja")) as f:
            template = f.read()
    return template if isinstance(template, str) else None


def render_chat(enc, messages, add_generation_prompt=False):
    """The text of a conversation as the tokenizer's chat template writes it, rendered as
    transformers renders it (a sandboxed Jinja environment that trims blocks, with loop
    controls, raise_exception and the folder's special tokens as variables)."""
    import jinja2.sandbox  # (torch depends on Jinja2: always there)
    template = chat_template(enc)
    if template is None:
        raise UsageError(f"chat \"messages\" need the tokenizer's chat template: --tokenizer "
                         f"{enc.name} has none (use hf:DIR whose tokenizer_config.json has a "
                         f"chat_template), or write prompt/response records")

    def raise_exception(message):
        raise UsageError(f"the chat template refused a conversation: {message}")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: time.strftime(fmt))
    config = _read_json(os.path.join(enc.directory, "tokenizer_config.json"))
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                        "mask_token")}
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special)


def chat_segments(enc, messages, where):
    """A conversation as (tokens, trained) segments: each assistant turn (what the template
    writes for it after the generation prompt) trained, everything else not. The template
    is rendered for each growing prefix of the conversation, which must extend the text
    before it (templates that rewrite earlier turns cannot be cut into turns)."""
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise UsageError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., "
                         f"\"content\": ...}} objects with text values")
    if not any(m["role"] == "assistant" for m in messages):
        raise UsageError(f"{where}: a conversation without an assistant turn has nothing to learn")
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render_chat(enc, messages[:i], True), render_chat(enc, messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UsageError(f"{where}: the chat template does not render this conversation turn by "
                             f"turn (an earlier turn's text changes), so its assistant turns cannot "
                             f"be told apart")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    pieces.append((render_chat(enc, messages)[len(done):], False))
    return [(np.asarray(enc.encode_chat(text), np.int64), trained) for text, trained in pieces if text]


def parse_blend(specs: list[str]) -> list[tuple[float, str]]:
    """--data W1 SRC1 W2 SRC2 ...: (weight, source) pairs (weights positive numbers)."""
    if len(specs) % 2:
        raise UsageError(f"--data {' '.join(specs)}: a blend is WEIGHT SOURCE pairs, e.g. --data 0.7 A "
                         f"0.3 B; got {len(specs)} words")
    pairs = []
    for weight, source in zip(specs[::2], specs[1::2]):
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise UsageError(f"--data: blend weight {weight!r} (before {source}) is not a positive "
                             f"number; a blend is WEIGHT SOURCE pairs")
        pairs.append((value, source))
    return pairs


def _source_files(spec: str | None) -> list[str]:
    """The text files that a source names, in a fixed (sorted) order."""
    if spec in (None, "stdlib"):
        return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec, recursive=True))
        if not paths:
            raise UsageError(f"--data {spec}: matched no files; check the pattern")
    elif os.path.exists(spec):
        paths = [spec]
    else:
        raise UsageError(f"--data {spec}: no such file or directory; check the path")
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += _files_under(p)
        elif os.path.isfile(p):
            files.append(p)
        elif p == spec:  # (a pattern's other matches: skipped)
            raise UsageError(f"--data {spec} is not a regular file (a FIFO, a device, ...): point it "
                             f"at a file or a folder of files")
    once = {}  # each file once, however many names reach it
    for f in files:
        once.setdefault(os.path.realpath(f), f)
    files = [f for f in once.values() if _is_jsonl(f) or _is_text(f)]
    if not files:
        raise UsageError(f"--data {spec}: found no text files; point it at text")
    return files


def _files_under(folder):
    """The regular files under `folder`, sorted, hidden ones (.name) left out: linked
    directories are followed, but not back into one already walked (a link loop would list
    every file again at each level, some 40 times)."""
    seen, files = set(), []
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, n) for n in names
                  if not n.startswith(".") and os.path.isfile(os.path.join(root, n))]
    return sorted(files)


def _is_text(path):
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def _is_jsonl(path):
    return path.endswith((".jsonl", ".jsonl.gz"))


def _json_records(path):
    """(bytes read so far, line number, record) of each non-empty line of a JSON Lines file
    (gzip-compressed if its name ends in .gz; then the bytes are the compressed file's)."""
    with open(path, "rb") as raw, (gzip.open(raw) if path.endswith(".gz") else raw) as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{path}, line {number}: not JSON ({e}); one JSON object per "
                                     f"line is expected") from None
                yield raw.tell(), number, record
        except (OSError, EOFError) as e:  # a damaged or truncated .gz
            raise UsageError(f"{path}: cannot be read to the end ({e}); is it complete?") from None


def _jsonl_documents(path, json_key):
    """(bytes read so far, text) of each record of a JSON Lines file."""
    for end, number, record in _json_records(path):
        text = record.get(json_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            keys = ", ".join(map(repr, record)) if isinstance(record, dict) else "none"
            raise UsageError(f"{path}, line {number}: no text under the key {json_key!r} "
                             f"(keys: {keys}); name the text's key with --json-key")
        yield end, text


def _read(paths, val_fraction=0.0, block_bytes=1 << 24, json_key="text"):
    """Yield (text, split) for the files laid end to end, and (None, split) at each document's
    end (a text file's, a JSON Lines record's). Bytes before the last val_fraction of the
    total are "train", the rest "val" (a JSON Lines record goes where its line ends). Text
    files are read in blocks of whole lines (~16 MB), so a huge file never sits in memory
    whole and no UTF-8 character is split between blocks."""
    val_start = int(sum(map(os.path.getsize, paths)) * (1 - val_fraction))
    offset, last = 0, "train"
    for path in paths:
        if _is_jsonl(path):
            for end, text in _jsonl_documents(path, json_key):
                last = "train" if offset + end <= val_start else "val"
                yield text, last
                yield None, last
            offset += os.path.getsize(path)
            continue
        with open(path, "rb") as f:
            while lines := f.readlines(block_bytes):
                block = b"".join(lines)
                cut = min(max(val_start - offset, 0), len(block))
                while 0 < cut < len(block) and block[cut] & 0xC0 == 0x80:
                    cut += 1  # a UTF-8 continuation byte: move the cut to the next character
                offset += len(block)
                for split, part in (("train", block[:cut]), ("val", block[cut:])):
                    if part:
                        yield part.decode("utf-8", errors="replace"), split
                        last = split
        yield None, last


def parse_split(spec: str) -> tuple[float, float, float]:
    """--split TRAIN,VAL[,TEST] (Megatron's --split, e.g. 969,30,1 or 98,2): the shares of the
    documents that go to training, validation and test, normalized."""
    try:
        shares = [float(part) for part in spec.split(",")]
    except ValueError:
        shares = []
    if not 2 <= len(shares) <= 3 or not all(0 <= x < float("inf") for x in shares) or shares[0] <= 0 \
            or shares[1] <= 0:
        raise UsageError(f"--split {spec}: expected TRAIN,VAL[,TEST] shares such as 98,2 or 969,30,1 "
                         f"(train and validation above 0)")
    shares += [0.0] * (3 - len(shares))
    return tuple(x / sum(shares) for x in shares)


def split_points(doc_starts, shares, seq_len: int, name: str) -> np.ndarray:
    """Token offsets [0, a, b, n] cutting a stream of documents (doc_starts: each one's
    first token, then n) into train [0, a), val [a, b) and test [b, n), as Megatron splits:
    runs of whole documents in proportion to the shares of the document count. A split
    with a share gets at least one sample (seq_len + 1 tokens): it is widened by whole
    documents taken from the one before it; where even that cannot be (a few long
    documents: one text file), the stream is cut by tokens instead, val and test at its end."""
    doc_starts = np.asarray(doc_starts, np.int64)
    n_docs, n_tokens, need = len(doc_starts) - 1, int(doc_starts[-1]), seq_len + 1
    bounds = [int(round(x * n_docs)) for x in np.cumsum([0.0, *shares])]
    bounds[-1] = n_docs
    for k in (2, 1):  # test, then validation: widen backwards into the split before
        while shares[k] and doc_starts[bounds[k + 1]] - doc_starts[bounds[k]] < need and bounds[k] > 0:
            bounds[k] -= 1
            bounds[k - 1] = min(bounds[k - 1], bounds[k])
    cuts = doc_starts[bounds]
    if all(size >= need for size, share in zip(np.diff(cuts), shares) if share):
        return cuts
    sizes = [max(int(n_tokens * x), need) if x else 0 for x in shares[1:]]
    cuts = np.array([0, n_tokens - sum(sizes), n_tokens - sizes[1], n_tokens], np.int64)
    if cuts[1] < need:
        wanted = " + ".join(f"{s} ({need})" for s, x in zip(SPLITS, shares) if x)
        raise UsageError(f"{name} has {n_tokens} tokens, too few for a sample of --seq-len + 1 = {need} "
                         f"in each split, {wanted}; use a smaller --seq-len or more data")
    return cuts


def split_stream(tokens, doc_starts, shares, seq_len: int, name: str, eot=None) -> dict:
    """{split: TokenDataset} of one token stream (split_points), each split a view of it
    with its own documents (a document cut by a token split counts in both parts)."""
    cuts = split_points(doc_starts, shares, seq_len, name)
    doc_starts = np.asarray(doc_starts, np.int64)
    out = {}
    for split, (a, b) in zip(SPLITS, zip(cuts[:-1], cuts[1:])):
        if b > a:
            inside = doc_starts[(doc_starts > a) & (doc_starts < b)]
            out[split] = TokenDataset([tokens[a:b]], f"{name} ({split})", eot,
                                      doc_starts=np.concatenate([[0], inside - a]))
    return out


def load_splits(spec, tokenizer_name: str, seq_len: int, split=None, json_key: str = "text") -> dict:
    """{"train", "val"[, "test"]: dataset} for a source named as in the module docstring (a
    string), or for a blend of them ([W1, SRC1, W2, SRC2, ...]: BlendedDataset, each split
    blended alike). `split`: the (train, val, test) shares (split_points), DEFAULT_SPLIT when
    None; a prepared folder keeps the split data.py prepare made and refuses another."""
    shares = split or DEFAULT_SPLIT
    if isinstance(spec, (list, tuple)) and len(spec) == 1:
        spec = spec[0]
    if _instruction_file(spec, json_key):
        return load_instructions(spec, tokenizer_name, shares)
    if isinstance(spec, (list, tuple)):
        pairs = parse_blend(list(spec))
        sources = [load_splits(source, tokenizer_name, seq_len, split, json_key) for _, source in pairs]
        weights = [w for w, _ in pairs]
        return {name: BlendedDataset([s[name] for s in sources], weights, f"--data blend ({name})")
                for name in SPLITS if all(name in s for s in sources)}
    prefix = indexed_prefix(spec)
    if prefix is not None:
        return IndexedDataset(prefix).split(seq_len, shares, get_tokenizer(tokenizer_name).eot_token)
    if spec is not None and os.path.isfile(os.path.join(spec, "meta.json")):
        if split is not None:
            raise UsageError(f"--split: {spec} was split into train and validation by data.py prepare "
                             f"(its --val-fraction); drop --split, or prepare it again")
        where = os.path.join(spec, "meta.json")
        try:
            with open(where) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read {where} ({e}); prepare the folder again") from None
        errors.check_json(meta, where, {"format": int, "tokenizer": str, "dtype": str, "train": list, "val": list},
                          required=("format", "tokenizer", "dtype", "train", "val"))
        if meta["dtype"] not in ("uint16", "uint32"):
            raise UsageError(f"{where}: unknown dtype {meta['dtype']!r} (prepare writes uint16 or uint32); "
                             f"prepare the folder again")
        for name in ("train", "val"):
            for shard in meta[name]:
                errors.check_json(shard, f"{where} ({name} shard)", {"file": str}, required=("file",))
        if meta.get("format") != 1:
            raise UsageError(f"--data {spec}: unknown format {meta.get('format')}; "
                             f"run data.py prepare again")
        if meta["tokenizer"] != tokenizer_name:
            raise UsageError(f"--data {spec} was prepared with tokenizer {meta['tokenizer']!r}, "
                             f"not {tokenizer_name!r}: pass --tokenizer {meta['tokenizer']}")
        eot = get_tokenizer(tokenizer_name).eot_token
        splits = {name: TokenDataset([np.memmap(errors.path_inside(spec, s["file"], f"{spec}/meta.json"),
                                                meta["dtype"], "r")
                                      for s in meta[name]], f"--data {spec} ({name})", eot)
                  for name in ("train", "val")}
        for ds in splits.values():
            ds.n_samples(seq_len)  # too short for seq_len? fail now, not at the first batch
        return splits

    enc = get_tokenizer(tokenizer_name)
    documents = list(_documents(enc, _source_files(spec), json_key))
    doc_starts = np.concatenate([[0], np.cumsum([len(d) for d in documents])])
    return split_stream(np.concatenate(documents), doc_starts, shares, seq_len,
                        f"--data {spec or 'stdlib'}", enc.eot_token)


def recorded_tokenizer(spec) -> str | None:
    """The tokenizer a --data source records (a folder of data.py prepare's shards; in a
    blend, the first such), or None: what --tokenizer defaults to, so it need not be typed
    again."""
    for source in [spec] if isinstance(spec, str) else list(spec or []):
        if isinstance(source, str) and os.path.isfile(os.path.join(source, "meta.json")):
            tokenizer = _read_json(os.path.join(source, "meta.json")).get("tokenizer")
            if isinstance(tokenizer, str):
                return tokenizer
    return None


def load_dataset(spec, tokenizer_name: str, seq_len: int, val_fraction: float | None = None,
                 json_key: str = "text"):
    """(train, val) of load_splits: validation val_fraction of the documents (None: the
    default split, or a prepared folder's), no test."""
    split = None if val_fraction is None else (1 - val_fraction, val_fraction, 0.0)
    splits = load_splits(spec, tokenizer_name, seq_len, split, json_key)
    return splits["train"], splits["val"]


# ----------------------------------------------------------------------------
# Megatron-LM's indexed dataset: PREFIX.bin + PREFIX.idx
# ----------------------------------------------------------------------------
# PREFIX.bin is every sequence's token ids back to back, in one dtype. PREFIX.idx, all
# little-endian: the magic b"MMIDIDX\0\0"; version <Q (1); a dtype code <B; the number of
# sequences <Q and of document boundaries <Q (documents + 1); each sequence's length (int32)
# and byte offset in .bin (int64); the document boundaries (int64: 0, then after each
# document the index of the next sequence). tools/preprocess_data.py writes one sequence per
# document (per sentence with --split-sentences), ending in end-of-text with --append-eod,
# in uint16 when the vocabulary has fewer than 65,500 ids, else int32.

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                7: np.float32, 8: np.uint16}
_INDEX_HEADER = struct.Struct("<9sQBQQ")


def indexed_prefix(spec):
    """The PREFIX of a Megatron dataset that `spec` names (PREFIX, PREFIX.bin or PREFIX.idx),
    or None when it names something else."""
    if not spec:
        return None
    prefix = spec[:-4] if spec.endswith((".bin", ".idx")) else spec
    return prefix if os.path.isfile(prefix + ".idx") or os.path.isfile(prefix + ".bin") else None


class IndexedDataset:
    """A Megatron-LM indexed dataset, memory-mapped and checked: every sequence contiguous in
    .bin, as many bytes as .idx describes, an integer dtype. Damage is one UsageError naming
    the file and what is wrong (`problems` lists them all, for `data.py inspect`)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        problems = self.problems()
        if problems:
            raise UsageError(problems[0])

    def problems(self) -> list[str]:
        idx, bin_ = self.prefix + ".idx", self.prefix + ".bin"
        missing = [p for p in (idx, bin_) if not os.path.isfile(p)]
        if missing:
            return [f"{p}: no such file (a Megatron dataset is PREFIX.bin + PREFIX.idx)" for p in missing]
        with open(idx, "rb") as f:
            head = f.read(_INDEX_HEADER.size)
        if len(head) < _INDEX_HEADER.size or head[:9] != INDEX_MAGIC:
            return [f"{idx}: not a Megatron index (it does not start with MMIDIDX)"]
        _, version, code, n_seq, n_bounds = _INDEX_HEADER.unpack(head)
        problems = []
        if version != 1:
            problems.append(f"{idx}: index version {version}; only version 1 exists")
        if code not in INDEX_DTYPES or INDEX_DTYPES[code] in (np.float32, np.float64):
            return problems + [f"{idx}: dtype code {code} is not an integer token type (uint16 = 8, "
                               f"int32 = 4, ...)"]
        self.dtype = np.dtype(INDEX_DTYPES[code])
        size = _INDEX_HEADER.size + 12 * n_seq + 8 * n_bounds
        if os.path.getsize(idx) < size or n_bounds < 1:
            return problems + [f"{idx}: {os.path.getsize(idx)} bytes, fewer than the {size} its header "
                               f"describes ({n_seq} sequences, {n_bounds} document boundaries): truncated"]
        self.lengths = np.memmap(idx, np.int32, "r", _INDEX_HEADER.size, (n_seq,))
        pointers = np.memmap(idx, np.int64, "r", _INDEX_HEADER.size + 4 * n_seq, (n_seq,))
        self.bounds = np.memmap(idx, np.int64, "r", _INDEX_HEADER.size + 12 * n_seq, (n_bounds,))
        starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        if (self.lengths < 0).any() or not np.array_equal(pointers, starts[:-1] * self.dtype.itemsize):
            fits = [size for size in (1, 2, 4, 8) if np.array_equal(pointers, starts[:-1] * size)]
            problems.append(f"{idx}: sequence lengths and byte offsets disagree" + (
                f": the offsets are those of {fits[0]}-byte tokens, not of its dtype {self.dtype.name} "
                f"(code {code}); is it the index of another file?" if fits else
                " (not one sequence after another); rewrite it with Megatron's or this tool's writer"))
        if self.bounds[0] != 0 or self.bounds[-1] != n_seq or (np.diff(self.bounds) < 0).any():
            problems.append(f"{idx}: document boundaries do not run from 0 to its {n_seq} sequences")
        expected = int(starts[-1]) * self.dtype.itemsize
        if os.path.getsize(bin_) != expected:
            problems.append(f"{bin_}: {os.path.getsize(bin_)} bytes, but {idx} describes {starts[-1]:,} "
                            f"tokens of {self.dtype.name} = {expected} bytes: truncated, or the index of "
                            f"another file or dtype")
        if not problems:
            self.tokens = np.memmap(bin_, self.dtype, "r") if expected else np.zeros(0, self.dtype)
            self.doc_starts = starts[np.asarray(self.bounds)]  # token offset of each document
        return problems

    @property
    def n_documents(self) -> int:
        return len(self.doc_starts) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_starts[i]:self.doc_starts[i + 1]]

    def split(self, seq_len: int, shares=DEFAULT_SPLIT, eot=None) -> dict:
        """{split: TokenDataset} by documents (split_points), views of the memory-mapped
        tokens; `eot`: the tokenizer's end-of-text (the files do not record it)."""
        return split_stream(self.tokens, self.doc_starts, shares, seq_len, f"--data {self.prefix}", eot)


def write_indexed(prefix: str, documents, dtype) -> tuple[int, int]:
    """Write `documents` (arrays of token ids) as Megatron-LM's PREFIX.bin + PREFIX.idx, one
    sequence per document, through temporary files renamed into place at the end. Returns
    (documents, tokens)."""
    dtype = np.dtype(dtype)
    code = next(c for c, t in INDEX_DTYPES.items() if np.dtype(t) == dtype)
    lengths = []
    try:
        with open(prefix + ".bin.tmp", "wb") as f:
            for tokens in documents:
                np.asarray(tokens, dtype).tofile(f)
                lengths.append(len(tokens))
        lengths = np.array(lengths, np.int32)
        pointers = (np.cumsum(lengths, dtype=np.int64) - lengths) * dtype.itemsize
        with open(prefix + ".idx.tmp", "wb") as f:
            f.write(_INDEX_HEADER.pack(INDEX_MAGIC, 1, code, len(lengths), len(lengths) + 1))
            f.write(lengths.tobytes())
            f.write(pointers.astype(np.int64).tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        os.replace(prefix + ".bin.tmp", prefix + ".bin")
        os.replace(prefix + ".idx.tmp", prefix + ".idx")
    finally:
        for tmp in (prefix + ".bin.tmp", prefix + ".idx.tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
    return len(lengths), int(lengths.sum())


class _ShardWriter:
    """Appends tokens to {split}-00000.bin, {split}-00001.bin, ... of at most shard_tokens each."""

    def __init__(self, out_dir, split, dtype, shard_tokens):
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.shard_tokens = shard_tokens
        self.shards, self.file = [], None

    def write(self, tokens):
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.shards.append({"file": name, "tokens": 0})
                self.file = open(os.path.join(self.out_dir, name), "wb")
            n = min(len(tokens), self.shard_tokens - self.shards[-1]["tokens"])
            self.file.write(tokens[:n].tobytes())  # (a full disk: OSError ENOSPC, as any write)
            self.shards[-1]["tokens"] += n
            tokens = tokens[n:]

    def close(self):
        if self.file is not None:
            file, self.file = self.file, None
            file.close()
        return self.shards


def _documents(enc, paths, json_key):
    """The token ids of each document of the files, end-of-text included."""
    pieces = []
    for text, _ in _read(paths, json_key=json_key):
        pieces.append(_encode(enc, text))
        if text is None:
            yield np.concatenate(pieces)
            pieces = []


def prepare_megatron(src: str, prefix: str, tokenizer_name: str = BYTE_TOKENIZER,
                     json_key: str = "text") -> tuple[int, int]:
    """Tokenize a source into Megatron-LM's PREFIX.bin + PREFIX.idx, one sequence per
    document (each ending in end-of-text, as preprocess_data.py --append-eod writes them),
    in uint16 when the vocabulary has fewer than 65,500 ids, else int32, as Megatron chooses.
    The split into train and validation is made when it is read."""
    t0 = time.time()
    taken = [p for p in (prefix + ".bin", prefix + ".idx") if os.path.exists(p)]
    if taken:
        raise UsageError(f"{taken[0]} already exists: choose another prefix or remove it")
    enc, paths = get_tokenizer(tokenizer_name), _source_files(src)
    dtype = np.uint16 if enc.n_vocab < 65_500 else np.int32
    try:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        n_docs, n_tokens = write_indexed(prefix, _documents(enc, paths, json_key), dtype)
    except OSError as e:
        raise UsageError(f"cannot write {prefix}.bin/.idx: {e.strerror}; nothing was written") from None
    print(f"prepared {prefix}.bin + .idx: {n_docs:,} documents, {n_tokens:,} tokens ({tokenizer_name}, "
          f"{np.dtype(dtype).name}) from {len(paths)} files, {time.time() - t0:.1f}s")
    return n_docs, n_tokens


def prepare(src: str, out_dir: str, tokenizer_name: str = BYTE_TOKENIZER,
            val_fraction: float = DEFAULT_SPLIT[1], shard_tokens: int = 100_000_000, json_key: str = "text") -> dict:
    """Tokenize a source into raw token shards + meta.json in out_dir, for load_dataset."""
    t0 = time.time()
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UsageError(f"{out_dir} already exists and is not empty: choose another OUT_DIR "
                         f"or remove it")
    if not 0 < val_fraction < 1 or shard_tokens < 1:
        raise UsageError("--val-fraction must be in (0, 1) and --shard-tokens >= 1")
    enc = get_tokenizer(tokenizer_name)
    paths = _source_files(src)
    # Written next to out_dir and renamed into place at the end, so a crash never leaves a
    # half-written dataset that looks complete.
    tmp = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise UsageError(f"{out_dir}: cannot create it ({e.strerror}); choose another OUT_DIR") from None
    writers = {split: _ShardWriter(tmp, split, _dtype(enc), shard_tokens)
               for split in ("train", "val")}
    try:
        # Validation is the last val_fraction of the bytes, the same "tail of the stream" rule
        # as load_dataset's in-memory split; unlike a split by documents, it works for one file.
        for text, split in _read(paths, val_fraction, json_key=json_key):
            writers[split].write(_encode(enc, text))
        meta = {"format": 1, "tokenizer": tokenizer_name, "dtype": np.dtype(_dtype(enc)).name,
                **{split: w.close() for split, w in writers.items()}}
        if not meta["train"] or not meta["val"]:
            raise UsageError(f"{src}: too little text to split into train and validation; "
                             f"use more data or a larger --val-fraction")
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, out_dir)  # on POSIX this also replaces an empty out_dir
    except BaseException as e:
        for w in writers.values():
            with contextlib.suppress(OSError):  # (its buffer cannot reach a full disk either)
                w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, an unreadable source file
            reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
            raise UsageError(f"cannot prepare {out_dir}: {reason}"
                             f"{f' ({e.filename})' if e.filename else ''}; nothing was written; "
                             f"free space or choose another OUT_DIR") from None
        raise
    n = {split: sum(s["tokens"] for s in meta[split]) for split in ("train", "val")}
    print(f"prepared {out_dir}: {n['train']:,} train + {n['val']:,} val tokens "
          f"({tokenizer_name}) in {len(meta['train'])} + {len(meta['val'])} shards "
          f"from {len(paths)} files, {time.time() - t0:.1f}s")
    return meta


# BERT's special tokens for the byte tokenizer: new ids after its 256 bytes and end-of-text, so
# a BERT model on bytes needs a vocabulary of BYTE_BERT_VOCAB = 261 ids.
BYTE_CLS, BYTE_SEP, BYTE_MASK, BYTE_PAD = 257, 258, 259, 260
BYTE_BERT_VOCAB = 261
IGNORE_INDEX = -100  # the label of a position without a prediction (cross_entropy's default)
BERT_SPECIALS = ("cls", "sep", "mask", "pad")


@dataclasses.dataclass(frozen=True, eq=False)
class BertTokens:
    """The ids BERT adds to a vocabulary. n_vocab holds every id, specials included; ordinary
    are the ids that random replacement may draw (no special token, no end-of-text)."""
    cls: int
    sep: int
    mask: int
    pad: int
    n_vocab: int
    ordinary: np.ndarray


@functools.lru_cache(maxsize=None)
def bert_special_tokens(tokenizer_name: str) -> BertTokens:
    """[CLS], [SEP], [MASK] and [PAD] of the byte tokenizer (new ids) or of an hf:DIR
    tokenizer (the *_token entries of DIR/tokenizer_config.json, else "[CLS]" etc.)."""
    if tokenizer_name == BYTE_TOKENIZER:
        ordinary = np.arange(256)
        ordinary.flags.writeable = False  # cached and shared by every caller
        return BertTokens(BYTE_CLS, BYTE_SEP, BYTE_MASK, BYTE_PAD, BYTE_BERT_VOCAB, ordinary)
    hf = tokenizer_name.startswith(HF_PREFIX)  # tiktoken's encodings have no BERT tokens
    enc = get_tokenizer(tokenizer_name) if hf else None
    vocab = enc._tok.get_vocab(with_added_tokens=True) if hf else {}
    config = _read_json(os.path.join(tokenizer_name[len(HF_PREFIX):], "tokenizer_config.json")) \
        if hf else {}
    ids = {}
    for kind in BERT_SPECIALS:
        token = config.get(f"{kind}_token") or f"[{kind.upper()}]"  # a string or {"content": ...}
        ids[kind] = vocab.get(token.get("content") if isinstance(token, dict) else token)
        if ids[kind] is None:
            raise UsageError(f"tokenizer {tokenizer_name} has no [{kind.upper()}] token: BERT "
                             f"needs [CLS], [SEP], [MASK] and [PAD]; use --tokenizer byte or "
                             f"hf:DIR with a BERT vocabulary")
    special = set(enc._tok.get_added_tokens_decoder()) | {enc.eot_token, *ids.values()}
    ordinary = np.setdiff1d(np.arange(enc.n_vocab), sorted(special))
    ordinary.flags.writeable = False
    return BertTokens(**ids, n_vocab=enc.n_vocab, ordinary=ordinary)


@functools.lru_cache(maxsize=None)
def _token_tables(tokenizer_name):
    """Per id of the BERT vocabulary: (ends a line, is a word piece); see ends_line and
    continues_word. Special ids are neither."""
    n = bert_special_tokens(tokenizer_name).n_vocab
    if tokenizer_name == BYTE_TOKENIZER:
        word = np.zeros(n, bool)  # [A-Za-z0-9_] and the bytes of non-ASCII characters
        word[[c for c in range(256) if c >= 0x80 or chr(c).isalnum() or chr(c) == "_"]] = True
        return np.arange(n) == ord("\n"), word
    tok = get_tokenizer(tokenizer_name)._tok
    # "Contains", not "ends with": code tokenizers merge a newline with the next line's indent.
    texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
    pieces = [tok.id_to_token(i) or "" for i in range(n)]
    return (np.array(["\n" in t for t in texts]),
            np.array([p.startswith("##") for p in pieces]))  # WordPiece's continuation mark


def ends_line(tokens: np.ndarray, tokenizer_name: str) -> np.ndarray:
    """Per token: does its text end a line (contain a newline)? A segment may end after it."""
    return _token_tables(tokenizer_name)[0][tokens]


def continues_word(tokens: np.ndarray, tokenizer_name: str) -> np.ndarray:
    """Per token of a sequence: does it continue the previous token's word? Byte tokens: both
    are word bytes ([A-Za-z0-9_] or a byte of a non-ASCII character). Otherwise WordPiece's
    convention: the token is written "##..." The first token never continues a word."""
    tokens = np.asarray(tokens)
    word = _token_tables(tokenizer_name)[1][tokens]
    if tokenizer_name == BYTE_TOKENIZER:
        return np.concatenate([[False], word[1:] & word[:-1]])
    return np.concatenate([[False], word[1:]])


def _example_length(rng, longest, short_seq_prob):
    """Usually `longest`; with probability short_seq_prob a uniform length in [2, longest], so
    that batches hold padding as they will in use (Megatron's short_seq_prob)."""
    return longest if rng.random() >= short_seq_prob else int(rng.integers(2, longest + 1))


def _bert_batch(build, step, seed, global_batch_size, seq_len, rows, pad):
    """The examples `build(rng, seq_len)` -> (ids, token types, token labels, row label) of the
    selected rows, padded to seq_len, row i drawn from (seed, step, i) alone whatever the
    selection. Returns int64 tensors: ids, attention mask, token types, token labels [rows,
    seq_len] and row labels [rows]."""
    rows = range(global_batch_size)[rows if rows is not None else slice(None)]
    ids = np.full((len(rows), seq_len), pad, np.int64)
    types, labels = np.zeros_like(ids), np.full_like(ids, IGNORE_INDEX)
    lengths, row_labels = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
    for r, i in enumerate(rows):
        x, x_types, x_labels, row_labels[r] = build(np.random.default_rng([seed, step, i]), seq_len)
        lengths[r] = len(x)
        ids[r, :len(x)], types[r, :len(x)], labels[r, :len(x)] = x, x_types, x_labels
    mask = (np.arange(seq_len) < lengths[:, None]).astype(np.int64)
    return tuple(map(torch.from_numpy, (ids, mask, types, labels, row_labels)))


class MaskedLMData:
    """BERT's pre-training examples from a TokenDataset: [CLS] A [SEP] B [SEP] [PAD]...

    A and B are a window of one document cut at a line boundary, swapped with probability 0.5
    (sentence-order prediction, label 1 = swapped). mask_prob of the text is predicted, chosen
    token by token or, with whole_word, word by word; of those 80% become [MASK], 10% a random
    ordinary id and 10% stay, so the model cannot learn that only [MASK] needs predicting."""

    def __init__(self, data: TokenDataset, tokenizer_name: str, mask_prob: float = 0.15,
                 whole_word: bool = False, short_seq_prob: float = 0.1):
        if not 0 < mask_prob <= 1:
            raise UsageError("--mask-prob must be in (0, 1]")
        self.tokens = bert_special_tokens(tokenizer_name)
        self.data, self.tokenizer_name = data, tokenizer_name
        self.eot = get_tokenizer(tokenizer_name).eot_token
        self.mask_prob, self.whole_word, self.short_seq_prob = mask_prob, whole_word, short_seq_prob
        self.n_tokens = data.n_tokens
        # Predicted tokens are drawn uniformly from the text, so always answering the commonest
        # token scores its share of the text (estimated on up to 10M tokens): the baseline
        # the masked-token accuracy must beat (a byte's is the space's, ~29% of Python source).
        sample, left = [], 10_000_000
        for shard in data.shards:
            sample.append(np.asarray(shard[:left]))
            left -= len(sample[-1])
            if left <= 0:
                break
        sample = np.concatenate(sample)
        sample = sample[sample != self.eot]
        self.majority_share = float(np.bincount(sample).max() / len(sample))

    def batch(self, step: int, seed: int, global_batch_size: int, seq_len: int,
              rows: slice | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, token_type_ids, labels (-100: nothing to predict), all
        [rows, seq_len], and sentence_order_labels [rows] for the given rows of step's batch."""
        if seq_len < 5:
            raise UsageError(f"--seq-len {seq_len} is too short for BERT's [CLS] A [SEP] B [SEP]; "
                             f"use --seq-len 5 or more")
        ids, mask, types, labels, order = _bert_batch(self._example, step, seed, global_batch_size,
                                                      seq_len, rows, self.tokens.pad)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                "labels": labels, "sentence_order_labels": order}

    def _text(self, rng, seq_len):
        """Usually seq_len - 3 tokens (see _example_length) from a random start, never past a
        document's end: the window is cut at its first end-of-text, or if that leaves under 2
        tokens, the tokens after it are taken (a window without 2 tokens in one document is
        drawn again)."""
        n = _example_length(rng, seq_len - 3, self.short_seq_prob)
        for _ in range(100):
            _, w = self.data.window(rng.integers(self.data.n_windows(seq_len)), seq_len)
            ends = np.flatnonzero(w == self.eot).tolist()
            for lo, hi in zip([0] + [e + 1 for e in ends], ends + [len(w)]):
                if hi - lo >= 2:
                    return w[lo:min(hi, lo + n)]
        raise UsageError(f"{self.data.name}: found no 2 tokens within one document in 100 "
                         f"windows; BERT needs documents of 2 tokens or more")

    def _example(self, rng, seq_len):
        t, text = self.tokens, self._text(rng, seq_len)
        # Sentences are lines here: A ends at a line end where there is one, else anywhere.
        # With three line ends or more, both segments are whole lines (the window's partial
        # first and last lines dropped): were only the cut at a line end, "the first segment
        # ends mid-line" would give the order away without reading either segment.
        lines = np.flatnonzero(ends_line(text, self.tokenizer_name)) + 1  # just after each line end
        if len(lines) >= 3:
            text, lines = text[lines[0]:lines[-1]], lines[1:-1] - lines[0]
        lines = lines[lines < len(text)]
        cut = lines[rng.integers(len(lines))] if len(lines) else rng.integers(1, len(text))
        a, b, swapped = text[:cut], text[cut:], rng.random() < 0.5
        if swapped:
            a, b = b, a
        ids = np.concatenate([[t.cls], a, [t.sep], b, [t.sep]])
        types = (np.arange(len(ids)) >= len(a) + 2).astype(np.int64)
        is_text = np.ones(len(ids), bool)
        is_text[[0, len(a) + 1, -1]] = False
        # Words: a text token that does not continue the one before starts one; a segment's first
        # token always does. Without whole_word, every token is a word of its own.
        starts = is_text
        if self.whole_word:
            starts = is_text & ~continues_word(ids, self.tokenizer_name)
            starts[[1, len(a) + 2]] = True
        text_pos = np.flatnonzero(is_text)
        word_of = np.cumsum(starts[text_pos]) - 1  # the word of each text position
        lengths = np.bincount(word_of).tolist()
        # Google's BERT: words in random order, each taken if it fits the count, until it is met.
        k = max(1, round(self.mask_prob * len(text_pos)))
        n, picked = 0, np.zeros(len(lengths), bool)
        for w in rng.permutation(len(lengths)).tolist():
            if n + lengths[w] <= k:
                picked[w], n = True, n + lengths[w]
                if n == k:
                    break
        chosen = text_pos[picked[word_of]]
        labels = np.full(len(ids), IGNORE_INDEX)
        labels[chosen] = ids[chosen]
        r = rng.random(len(chosen))
        ids[chosen[r < 0.8]] = t.mask
        replaced = chosen[(r >= 0.8) & (r < 0.9)]
        ids[replaced] = t.ordinary[rng.integers(len(t.ordinary), size=len(replaced))]
        return ids, types, labels, int(swapped)


STDLIB_PACKAGES = "stdlib-packages"
# Packages of every CPython 3.9-3.13 without large test suites inside, so no class dwarfs the
# others. The "stdlib" corpus is only the top-level *.py files: this text is unseen in
# pre-training.
STDLIB_TASK_CLASSES = ("asyncio", "email", "http", "importlib", "json", "logging",
                       "multiprocessing", "urllib", "xml")


class ClassificationData:
    """A labelled task: windows of the classes' text, [CLS] window [SEP] [PAD]..., each labelled
    with its class. The dataset has one or more shards per class (shard_labels); windows are
    drawn uniformly over all of them, so a class's share is its share of the text."""

    def __init__(self, data: TokenDataset, shard_labels: list[int], class_names: list[str],
                 tokenizer_name: str, seq_len: int, short_seq_prob: float = 0.1):
        self.data, self.shard_labels = data, np.array(shard_labels)
        self.class_names, self.n_classes = list(class_names), len(class_names)
        self.n_tokens, self.short_seq_prob = data.n_tokens, short_seq_prob
        self.tokens = bert_special_tokens(tokenizer_name)
        # The fraction of windows (of seq_len) per class: the majority's is the accuracy of
        # always guessing it, the baseline a fine-tuned model must beat.
        windows = np.diff(data._window_bounds(seq_len))
        self.class_shares = np.bincount(self.shard_labels, windows, self.n_classes) / windows.sum()
        self.majority_share = float(self.class_shares.max())

    def batch(self, step: int, seed: int, global_batch_size: int, seq_len: int,
              rows: slice | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, token_type_ids [rows, seq_len] and labels [rows] (class
        ids) for the given rows of step's batch."""
        if seq_len < 4:
            raise UsageError(f"--seq-len {seq_len} is too short for [CLS] text [SEP]; "
                             f"use --seq-len 4 or more")
        ids, mask, types, _, labels = _bert_batch(self._example, step, seed, global_batch_size,
                                                  seq_len, rows, self.tokens.pad)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}

    def _example(self, rng, seq_len):
        n = _example_length(rng, seq_len - 2, self.short_seq_prob)
        shard, w = self.data.window(rng.integers(self.data.n_windows(seq_len)), seq_len)
        ids = np.concatenate([[self.tokens.cls], w[:n], [self.tokens.sep]])
        return ids, 0, IGNORE_INDEX, self.shard_labels[shard]


def _task_classes(spec):
    """{class name: its text source} of a task, sorted by name (the label ids)."""
    if spec == STDLIB_PACKAGES:
        root = sysconfig.get_paths()["stdlib"]
        classes = {c: os.path.join(root, c, "**", "*.py") for c in STDLIB_TASK_CLASSES
                   if os.path.isdir(os.path.join(root, c))}
    else:
        _source_files(spec)  # a missing or empty directory: the usual message
        if not os.path.isdir(spec):
            raise UsageError(f"--task {spec} is a file: a classification task is a directory "
                             f"with one sub-directory of text per class")
        classes = {c: os.path.join(spec, c) for c in sorted(os.listdir(spec))
                   if os.path.isdir(os.path.join(spec, c)) and not c.startswith(".")}
    if len(classes) < 2:
        raise UsageError(f"a classification task needs at least 2 classes; {spec} has "
                         f"{len(classes)} ({', '.join(classes) or 'no sub-directories'})")
    return classes


def task_class_names(spec: str) -> list[str]:
    """The class names of a task (what load_task's labels count), without reading its text."""
    return list(_task_classes(spec))


def load_task(spec: str, tokenizer_name: str, seq_len: int,
              val_fraction: float = 0.05) -> tuple[ClassificationData, ClassificationData]:
    """(train, val) of a classification task: "stdlib-packages" (which standard-library package
    a piece of source comes from) or a directory with one sub-directory of text per class, the
    sub-directory's name the class's (sorted names: label ids). Validation is the tail of
    every class's text: val_fraction of its tokens (not of its documents: a class may be a few
    files, and its validation share must not hang on their sizes)."""
    classes = _task_classes(spec)
    enc = get_tokenizer(tokenizer_name)
    splits = {"train": ([], []), "val": ([], [])}  # split -> (shards, their labels)
    for label, (name, source) in enumerate(classes.items()):
        tokens = np.concatenate(list(_documents(enc, _source_files(source), "text")))
        parts = split_stream(tokens, [0, len(tokens)], (1 - val_fraction, val_fraction, 0.0), seq_len,
                             f"task class {name}", enc.eot_token)
        for split, ds in parts.items():
            splits[split][0].extend(ds.shards)
            splits[split][1].extend([label] * len(ds.shards))
    return tuple(ClassificationData(TokenDataset(shards, f"task {spec} ({split})"), labels,
                                    list(classes), tokenizer_name, seq_len)
                 for split, (shards, labels) in splits.items())


# T5's special tokens. T5's vocabularies end with T5_SENTINELS sentinels, <extra_id_0> the last
# id, and the byte tokenizer's follow that convention after end-of-text (T5's EOS) and <pad>:
# <extra_id_i> = 357 - i, so a T5 on bytes needs a vocabulary of BYTE_T5_VOCAB = 358 ids. (They
# overlap BERT's byte specials, 257-260: another model, another vocabulary.)
T5_SENTINELS = 100
BYTE_T5_PAD = 257
BYTE_T5_VOCAB = BYTE_T5_PAD + 1 + T5_SENTINELS
_BYTE_T5_NAMES = {BYTE_T5_PAD: b"<pad>", **{BYTE_T5_VOCAB - 1 - i: f"<extra_id_{i}>".encode()
                                            for i in range(T5_SENTINELS)}}


@dataclasses.dataclass(frozen=True)
class T5Tokens:
    """The ids T5's span corruption uses: sentinels[i] is <extra_id_i>'s, which stands for the
    i-th corrupted span. pad is also the decoder's start token (T5's decoder_start_token_id).
    n_vocab holds every id, specials included."""
    eos: int
    pad: int
    sentinels: tuple[int, ...]
    n_vocab: int


@functools.lru_cache(maxsize=None)
def t5_special_tokens(tokenizer_name: str) -> T5Tokens:
    """EOS, <pad> and <extra_id_0>, <extra_id_1>, ... of the byte tokenizer (new ids, see
    BYTE_T5_VOCAB) or of an hf:DIR tokenizer (eos_token and pad_token of
    DIR/tokenizer_config.json, else "</s>" and "<pad>"; the sentinels as many consecutive ones
    from <extra_id_0> as the vocabulary has, added tokens included)."""
    if tokenizer_name == BYTE_TOKENIZER:
        return T5Tokens(eos=256, pad=BYTE_T5_PAD, n_vocab=BYTE_T5_VOCAB,
                        sentinels=tuple(BYTE_T5_VOCAB - 1 - i for i in range(T5_SENTINELS)))
    hf = tokenizer_name.startswith(HF_PREFIX)  # tiktoken's encodings have no sentinels
    enc = get_tokenizer(tokenizer_name) if hf or tokenizer_name not in TIKTOKEN_NAMES else None
    vocab = enc._tok.get_vocab(with_added_tokens=True) if hf else {}
    if "<extra_id_0>" not in vocab:
        raise UsageError(f"tokenizer {tokenizer_name} has no <extra_id_0> sentinel tokens: T5's "
                         f"span corruption needs them; use --tokenizer byte or hf:DIR of a T5 "
                         f"tokenizer")
    sentinels = []
    while f"<extra_id_{len(sentinels)}>" in vocab:
        sentinels.append(vocab[f"<extra_id_{len(sentinels)}>"])
    directory = tokenizer_name[len(HF_PREFIX):]
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    ids = {}
    for kind, default in (("eos", "</s>"), ("pad", "<pad>")):
        token = config.get(f"{kind}_token") or default  # a string or {"content": ...}
        token = token.get("content") if isinstance(token, dict) else token
        ids[kind] = vocab.get(token)
        if ids[kind] is None:
            raise UsageError(f"tokenizer {tokenizer_name} has no {kind} token ({token}): T5 needs "
                             f"one; set {kind}_token in {directory}/tokenizer_config.json, or "
                             f"use --tokenizer byte or hf:DIR of a T5 tokenizer")
    return T5Tokens(**ids, sentinels=tuple(sentinels), n_vocab=enc.n_vocab)


def _noise_counts(length, noise_density, mean_span_length):
    """T5's (noise tokens, noise spans) of a raw window of `length` tokens: round(length *
    noise_density) noise tokens, at least 1 and at most length - 1, in round(noise /
    mean_span_length) spans, at least 1 and at most the non-noise tokens (every span, noise or
    not, holds a token). Rounding is Python's (half to even), as T5's."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = min(max(round(noise / mean_span_length), 1), length - noise)
    return noise, spans


@functools.lru_cache(maxsize=None)
def span_corruption_lengths(seq_len: int, noise_density: float = 0.15,
                            mean_span_length: float = 3.0,
                            n_sentinels: int = T5_SENTINELS) -> tuple[int, int]:
    """(raw_len, decoder_len) of span corruption for an encoder input of seq_len tokens.

    A raw window of L tokens with N noise tokens in S spans becomes an encoder input of
    L - N + S + 1 tokens (the text left, a sentinel per span, EOS) and targets of N + S + 1
    (each span's sentinel then its tokens, then EOS). raw_len is the largest L whose input fits
    seq_len (T5's random_spans_helper; the input is padded up to seq_len); decoder_len is the
    targets' length rounded up to a multiple of 8, so sequence parallelism can split it.
    UsageError if seq_len holds no example or raw_len needs more than n_sentinels spans."""
    def input_len(length):
        noise, spans = _noise_counts(length, noise_density, mean_span_length)
        return length - noise + spans + 1

    if seq_len < input_len(2):  # 2 raw tokens: 1 kept, 1 noise
        raise UsageError(f"--seq-len {seq_len} is too short for T5's span corruption (text, a "
                         f"sentinel and EOS); use --seq-len {input_len(2)} or more")
    # The input never shrinks as L grows (neither L - N nor S does), and L = seq_len - 1 gives
    # an input of seq_len - N + S <= seq_len: the search climbs from there.
    raw_len = max(seq_len - 1, 2)
    while input_len(raw_len + 1) <= seq_len:
        raw_len += 1
    noise, spans = _noise_counts(raw_len, noise_density, mean_span_length)
    if spans > n_sentinels:
        longest = 2  # the longest raw window within n_sentinels spans
        while _noise_counts(longest + 1, noise_density, mean_span_length)[1] <= n_sentinels:
            longest += 1
        raise UsageError(f"--seq-len {seq_len} corrupts {raw_len} tokens in {spans} spans, more "
                         f"than the tokenizer's {n_sentinels} sentinels; use --seq-len "
                         f"{input_len(longest)} or less")
    return raw_len, -(-(noise + spans + 1) // 8) * 8


def _segment(rng, n, parts):
    """n tokens cut into `parts` non-empty runs, uniformly over all ways (T5's
    _random_segmentation): the run lengths."""
    cuts = np.sort(rng.choice(n - 1, parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [n]]))


class SpanCorruptionData:
    """T5's pre-training examples from a TokenDataset (T5's span corruption): a raw window of
    raw_len tokens (span_corruption_lengths) loses noise_density of its tokens in spans of
    mean_span_length on average, each replaced by a sentinel in the encoder's input; the
    decoder predicts the spans, each after its sentinel:

        raw      The cat sat on the mat .
        inputs   The <extra_id_0> on the <extra_id_1> </s> <pad>...
        labels   <extra_id_0> cat sat <extra_id_1> mat . </s> -100...

    As T5's random_spans_noise_mask: the noise and the non-noise tokens are each cut into S
    random non-empty runs, interleaved non-noise first (a window starts with text and ends with
    a noise span). A raw window may span two documents; its end-of-text is ordinary text. Row i
    of step s is drawn from (seed, s, i) alone, as BERT's rows (see _bert_batch)."""

    def __init__(self, data: TokenDataset, tokenizer_name: str, noise_density: float = 0.15,
                 mean_span_length: float = 3.0):
        if not 0 < noise_density < 1:
            raise UsageError(f"T5's noise density must be in (0, 1), got {noise_density}")
        if not mean_span_length >= 1:
            raise UsageError(f"T5's mean noise span length must be >= 1, got {mean_span_length}")
        self.tokens = t5_special_tokens(tokenizer_name)
        self.data, self.tokenizer_name = data, tokenizer_name
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.n_tokens = data.n_tokens
        self._sentinels = np.array(self.tokens.sentinels, np.int64)

    def lengths(self, seq_len: int) -> tuple[int, int]:
        """(raw_len, decoder_len) of a batch of seq_len: see span_corruption_lengths."""
        return span_corruption_lengths(seq_len, self.noise_density, self.mean_span_length,
                                       len(self.tokens.sentinels))

    def batch(self, step: int, seed: int, global_batch_size: int, seq_len: int,
              rows: slice | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask [rows, seq_len]; labels (-100: nothing to predict) and
        decoder_input_ids (labels shifted right after the start token, pad) [rows, decoder_len]
        for the given rows of step's batch."""
        raw_len, decoder_len = self.lengths(seq_len)
        longest = max((len(s) for s in self.data.shards), default=0)
        if longest < raw_len:
            raise UsageError(f"{self.data.name} has {longest} tokens (longest shard), fewer than "
                             f"the {raw_len} that T5's --seq-len {seq_len} corrupts into one "
                             f"example; use a smaller --seq-len or more data")
        t, n_windows = self.tokens, self.data.n_windows(raw_len - 1)
        rows = range(global_batch_size)[rows if rows is not None else slice(None)]
        ids = np.full((len(rows), seq_len), t.pad, np.int64)
        labels = np.full((len(rows), decoder_len), IGNORE_INDEX, np.int64)
        mask = np.zeros_like(ids)
        for r, i in enumerate(rows):
            rng = np.random.default_rng([seed, step, i])
            x, y = self._example(rng, self.data.window(rng.integers(n_windows), raw_len - 1)[1])
            ids[r, :len(x)], mask[r, :len(x)], labels[r, :len(y)] = x, 1, y
        decoder_ids = np.concatenate([np.full((len(rows), 1), t.pad), labels[:, :-1]], 1)
        decoder_ids[decoder_ids == IGNORE_INDEX] = t.pad
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels), "decoder_input_ids": torch.from_numpy(decoder_ids)}

    def _example(self, rng, window):
        """(encoder input, targets) of one raw window, both ending with EOS."""
        noise, spans = _noise_counts(len(window), self.noise_density, self.mean_span_length)
        runs = np.stack([_segment(rng, len(window) - noise, spans),  # non-noise, noise, non-noise...
                         _segment(rng, noise, spans)], 1).ravel()
        is_noise = np.repeat(np.tile([False, True], spans), runs)
        span = np.repeat(np.arange(2 * spans) // 2, runs)  # the span pair of each position
        starts = np.concatenate([[True], is_noise[1:] != is_noise[:-1]])  # a run's first token
        sentinel = self._sentinels[span]

        def corrupt(hidden):  # the hidden runs' first tokens become their sentinel, the rest go
            x = np.where(starts & hidden, sentinel, window)[~hidden | starts]
            return np.concatenate([x, [self.tokens.eos]])
        return corrupt(is_noise), corrupt(~is_noise)


def inspect(path: str, tokenizer_name: str | None = None, json_key: str = "text", show: int = 16) -> list[str]:
    """What train.py would read from `path` (any --data source), as lines: its kind,
    documents, tokens, dtype, the range of its token ids, and the first document's first
    `show` ids (decoded with `tokenizer_name`, if given). Problems of a Megatron dataset are
    "error: ..." lines, all of them."""
    prefix = indexed_prefix(path)
    if prefix is not None:
        ds = IndexedDataset.__new__(IndexedDataset)
        ds.prefix = prefix
        problems = ds.problems()
        if problems:
            return [f"error: {p}" for p in problems]
        lines = [f"{prefix}: Megatron indexed dataset, {ds.n_documents:,} documents, {len(ds.lengths):,} "
                 f"sequences, {len(ds.tokens):,} tokens of {ds.dtype.name}"]
        tokens, first = ds.tokens, ds.document(0) if ds.n_documents else ds.tokens[:0]
    elif _instruction_file(path, json_key):
        train, val = load_instructions(path, tokenizer_name or BYTE_TOKENIZER).values()
        examples = train.examples + val.examples
        lines = [f"{path}: fine-tuning examples, {len(examples):,} ({len(val.examples)} for "
                 f"validation), {train.n_tokens + val.n_tokens:,} tokens"]
        tokens, first = np.concatenate([t for t, _ in examples]), examples[0][0]
    elif path and os.path.isfile(os.path.join(path, "meta.json")):
        meta = _read_json(os.path.join(path, "meta.json"))
        train, val = load_dataset(path, meta["tokenizer"], 0)
        tokenizer_name = tokenizer_name or meta["tokenizer"]
        lines = [f"{path}: prepared shards ({meta['tokenizer']}), {train.n_tokens:,} train + {val.n_tokens:,} "
                 f"val tokens of {meta['dtype']} in {len(train.shards)} + {len(val.shards)} shards"]
        tokens, first = np.concatenate(train.shards + val.shards), train.shards[0]
    else:
        enc = get_tokenizer(tokenizer_name or BYTE_TOKENIZER)
        paths = _source_files(path)
        documents = list(_documents(enc, paths, json_key))
        lines = [f"{path or 'stdlib'}: {len(paths)} text/JSON Lines files, {len(documents):,} documents, "
                 f"{sum(map(len, documents)):,} tokens ({enc.name}, each document ending in "
                 f"end-of-text {enc.eot_token})"]
        tokens, first = np.concatenate(documents), documents[0]
    if len(tokens):
        lines.append(f"token ids {int(tokens.min())}..{int(tokens.max())}")
    lines.append(f"first document: {len(first):,} tokens, beginning {np.asarray(first[:show]).tolist()}")
    if tokenizer_name and len(first):
        lines.append(f"  decoded ({tokenizer_name}): {get_tokenizer(tokenizer_name).decode(first[:show].tolist())!r}")
    return lines


def main(argv=None):
    parser = errors.ArgumentParser(description="Data tools for train.py.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize text into memory-mapped shards for --data")
    p.add_argument("src", help='"stdlib", a text or JSON Lines file, a directory or a glob pattern')
    p.add_argument("out", help="new directory for the shards and meta.json; with --format megatron "
                               "the PREFIX of PREFIX.bin and PREFIX.idx")
    p.add_argument("--format", choices=["shards", "megatron"], default="shards",
                   help="shards: this project's (split, tokenizer recorded); megatron: Megatron-LM's "
                        "indexed dataset, which Megatron-LM and this trainer both read")
    p.add_argument("--tokenizer", default=BYTE_TOKENIZER, help="byte, " + ", ".join(TIKTOKEN_NAMES) + " or hf:DIR")
    p.add_argument("--json-key", default="text", help="JSON Lines: the key of each record's text")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_SPLIT[1],
                   help="shards: share of the tokens held out for validation (train.py's default "
                        "--split holds out as much)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="shards: tokens per shard file")
    p = commands.add_parser("inspect", help="what train.py would read from a --data source")
    p.add_argument("path", help="a Megatron PREFIX, a prepared directory, or a text/JSON Lines source")
    p.add_argument("--tokenizer", default=None, help="decode the first tokens with this tokenizer")
    p.add_argument("--json-key", default="text", help="JSON Lines: the key of each record's text")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            lines = inspect(args.path, args.tokenizer, args.json_key)
            print("\n".join(lines))
            if any(line.startswith("error:") for line in lines):
                sys.exit(1)
        elif args.format == "megatron":
            prepare_megatron(args.src, args.out, args.tokenizer, args.json_key)
        else:
            prepare(args.src, args.out, args.tokenizer, args.val_fraction, args.shard_tokens, args.json_key)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
