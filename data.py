"""Tokenizers, text corpora and the batches train.py reads.

Three kinds of data source, all named by one string (`--data`):

  1. "stdlib" (or nothing): real text that needs no download, the Python standard library's
     own top-level source files, tokenized in memory at start-up (~4.7 MB, under a second).
  2. A text file, a directory (every file under it, hidden ones and files with NUL bytes
     skipped) or a glob pattern: also tokenized in memory; fine for a few hundred MB.
  3. A directory written by `python data.py prepare SRC OUT_DIR`: token shards on disk that
     are memory-mapped, so a corpus far larger than RAM costs no start-up time.

Each file is a document, and each document ends with the tokenizer's end-of-text token (as in
GPT-2's data), so that windows spanning two documents show the model where one ends.

The batch contract, on which layout-independent training rests: the global batch of step s is
drawn by a random generator seeded by (seed, s) only; each data-parallel rank then reads its
own rows of it. So every parallel layout sees the same global batch, and resuming at step s
needs no data-loader state: the step number is the position.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import sysconfig
import time

import numpy as np
import tiktoken
import torch

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
        return tiktoken.Encoding(BYTE_TOKENIZER, pat_str=r"[^\n]{1,64}\n?|\n",
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


class HFTokenizer:
    """A Hugging Face tokenizer (DIR/tokenizer.json, run by the optional `tokenizers`
    package) with the part of tiktoken's Encoding that this code uses: encode_ordinary,
    decode, n_vocab, eot_token and name.

    eot_token, which ends every document, is the tokenizer's end-of-sequence token: the
    eos_token of DIR/tokenizer_config.json, else eos_token_id of DIR/config.json, else the
    first of <|endoftext|>, </s>, <eos> in the vocabulary; with none of these, a UsageError."""

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
        self.name = HF_PREFIX + directory
        self.n_vocab = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eot_token = self._eos_id(directory)

    def _eos_id(self, directory):
        def read(file):
            try:
                with open(os.path.join(directory, file)) as f:
                    return json.load(f)
            except (OSError, ValueError):
                return {}
        eos = read("tokenizer_config.json").get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and self._tok.token_to_id(eos) is not None:
            return self._tok.token_to_id(eos)
        eos_id = read("config.json").get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int):
            return eos_id
        for token in ("<|endoftext|>", "</s>", "<eos>"):
            if self._tok.token_to_id(token) is not None:
                return self._tok.token_to_id(token)
        raise UsageError(f"tokenizer {self.name} has no end-of-text token: set eos_token in "
                         f"{directory}/tokenizer_config.json")

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


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


class TokenDataset:
    """Token shards (1-D integer arrays, usually np.memmap) read as random windows."""

    def __init__(self, shards: list[np.ndarray], name: str):
        self.shards, self.name = list(shards), name
        self.n_tokens = sum(len(s) for s in self.shards)
        self._bounds = {}  # seq_len -> cumulative count of window starts, shard by shard

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

    def batch(self, step: int, seed: int, global_batch_size: int, seq_len: int,
              rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (int64, [rows, seq_len]) for the given rows of step's global batch."""
        bounds = self._window_bounds(seq_len)
        # All global_batch_size starts are drawn, from (seed, step) alone and never the rank,
        # so rows 4:8 on a data-parallel rank are rows 4:8 of the one-process batch. Only the
        # selected windows are then read from disk.
        starts = np.random.default_rng([seed, step]).integers(0, bounds[-1], global_batch_size)
        starts = starts[rows if rows is not None else slice(None)]
        shard = np.searchsorted(bounds, starts, side="right") - 1  # skips shards with no starts
        offset = starts - bounds[shard]
        windows = torch.from_numpy(np.stack([np.asarray(self.shards[i][o:o + seq_len + 1], np.int64)
                                             for i, o in zip(shard, offset)]))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


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
            files += sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                            if os.path.isfile(f))
        else:
            files.append(p)
    files = [f for f in files if _is_text(f)]
    if not files:
        raise UsageError(f"--data {spec}: found no text files; point it at text")
    return files


def _is_text(path):
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def _read(paths, val_fraction=0.0, block_bytes=1 << 24):
    """Yield (text, split) for the files laid end to end, and (None, split) at each file's end.
    Bytes before the last val_fraction of the total are "train", the rest "val". Files are read
    in blocks of whole lines (~16 MB), so a huge file never sits in memory whole and no UTF-8
    character is split between blocks."""
    val_start = int(sum(map(os.path.getsize, paths)) * (1 - val_fraction))
    offset, last = 0, "train"
    for path in paths:
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


def load_dataset(spec: str | None, tokenizer_name: str, seq_len: int,
                 val_fraction: float = 0.05) -> tuple[TokenDataset, TokenDataset]:
    """(train, val) for a source named as in the module docstring."""
    if spec is not None and os.path.isfile(os.path.join(spec, "meta.json")):
        with open(os.path.join(spec, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format") != 1:
            raise UsageError(f"--data {spec}: unknown format {meta.get('format')}; "
                             f"run data.py prepare again")
        if meta["tokenizer"] != tokenizer_name:
            raise UsageError(f"--data {spec} was prepared with tokenizer {meta['tokenizer']!r}, "
                             f"not {tokenizer_name!r}: pass --tokenizer {meta['tokenizer']}")
        train, val = [TokenDataset([np.memmap(os.path.join(spec, s["file"]), meta["dtype"], "r")
                                    for s in meta[split]], f"--data {spec} ({split})")
                      for split in ("train", "val")]
        for ds in (train, val):
            ds.n_windows(seq_len)  # too short for seq_len? fail now, not at the first batch
        return train, val

    enc, name = get_tokenizer(tokenizer_name), f"--data {spec or 'stdlib'}"
    tokens = np.concatenate([_encode(enc, text) for text, _ in _read(_source_files(spec))])
    # The last val_fraction of the stream is validation, but at least one window's worth.
    n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
    if len(tokens) - n_val < seq_len + 1:
        raise UsageError(f"{name} has {len(tokens)} tokens, fewer than 2 * (--seq-len + 1) = "
                         f"{2 * (seq_len + 1)} for a train and a validation window; use a smaller "
                         f"--seq-len or more data")
    return (TokenDataset([tokens[:-n_val]], f"{name} (train)"),
            TokenDataset([tokens[-n_val:]], f"{name} (val)"))


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
            tokens[:n].tofile(self.file)
            self.shards[-1]["tokens"] += n
            tokens = tokens[n:]

    def close(self):
        if self.file is not None:
            self.file.close()
        return self.shards


def prepare(src: str, out_dir: str, tokenizer_name: str = BYTE_TOKENIZER,
            val_fraction: float = 0.005, shard_tokens: int = 100_000_000) -> dict:
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
    os.makedirs(tmp)
    writers = {split: _ShardWriter(tmp, split, _dtype(enc), shard_tokens)
               for split in ("train", "val")}
    try:
        # Validation is the last val_fraction of the bytes, the same "tail of the stream" rule
        # as load_dataset's in-memory split; unlike a split by documents, it works for one file.
        for text, split in _read(paths, val_fraction):
            writers[split].write(_encode(enc, text))
        meta = {"format": 1, "tokenizer": tokenizer_name, "dtype": np.dtype(_dtype(enc)).name,
                **{split: w.close() for split, w in writers.items()}}
        if not meta["train"] or not meta["val"]:
            raise UsageError(f"{src}: too little text to split into train and validation; "
                             f"use more data or a larger --val-fraction")
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, out_dir)  # on POSIX this also replaces an empty out_dir
    except BaseException:
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = {split: sum(s["tokens"] for s in meta[split]) for split in ("train", "val")}
    print(f"prepared {out_dir}: {n['train']:,} train + {n['val']:,} val tokens "
          f"({tokenizer_name}) in {len(meta['train'])} + {len(meta['val'])} shards "
          f"from {len(paths)} files, {time.time() - t0:.1f}s")
    return meta


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Data tools for train.py.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize text into memory-mapped shards for --data")
    p.add_argument("src", help='"stdlib", a text file, a directory or a glob pattern')
    p.add_argument("out_dir", help="new directory for the shards and meta.json")
    p.add_argument("--tokenizer", default=BYTE_TOKENIZER, help="byte, " + ", ".join(TIKTOKEN_NAMES) + " or hf:DIR")
    p.add_argument("--val-fraction", type=float, default=0.005)
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    args = parser.parse_args()
    try:
        prepare(args.src, args.out_dir, args.tokenizer, args.val_fraction, args.shard_tokens)
    except UsageError as e:
        sys.exit(f"error: {e}")
