"""Distributed checkpoints: a directory per step, written by all ranks in parallel.

On disk:

    SAVE_ROOT/step_00000100/
        meta.json                 step, model name, config, tokenizer, train state
        index.json                every global tensor: shape, dtype, and its pieces
        shard-00000.safetensors   the tensors one rank owns (weights + optimizer state)
        rng-00000.safetensors     that rank's random-number-generator state
        replicated.safetensors    tensors every rank holds alike (FP8 amax histories), if any
        tokenizer.json, ...       the files of an hf:DIR tokenizer, if the run had one: the
                                  step directory is then a tokenizer folder (see tokenizer)

The index is layout-free: a piece records which region (offset, shape) of the global
tensor it holds, so a rank under any other parallel layout reads exactly the region
it needs from whichever pieces overlap it. Tensors are safetensors only; nothing is
loaded with pickle.

Atomic: everything is written into `.tmp-step_...` and renamed into place last, so
a crash mid-save leaves the previous checkpoint as the newest complete one. Such a
leftover `.tmp-step_*` directory is removed when a later run next saves into that root
(`clean_leftovers`); nothing else under the root is touched.

Integrity: index.json also holds, under the key "files" (tensor keys all begin with
"model." or "optimizer.", so it cannot clash), {file name: {"crc32": ..., "bytes": ...}}
for every safetensors file of the step: the shards, the rng files and replicated.safetensors,
and the tokenizer's files.
Each rank checksums the files it wrote (in parallel) and the main rank gathers the sums
into the index with the pieces. Loading checks each file it opens, once per file, before
reading it, and refuses a damaged one with a one-line UsageError naming it. Checkpoints
written before checksums existed (no "files" in the index) still load, unverified. A
piece's "file" must be a plain name inside the step directory (no separator, no "..").

Files are written readable as the rest of the checkpoint (0o666 less the umask):
safetensors' save_file alone creates them 0o600.
"""
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import zlib

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import data
import errors
import models
import parallel
from errors import UsageError

FORMAT = 1
STEP_PREFIX = "step_"
REPLICATED = "replicated.safetensors"
TMP_PREFIX = ".tmp-" + STEP_PREFIX
FILES = "files"  # index.json's key of the per-file checksums


def step_dir_name(step):
    return f"{STEP_PREFIX}{step:08d}"


STEP_NAME = re.compile(STEP_PREFIX + r"(\d+)")  # step_00000100; not step_latest, step_00000100.bak
LOCK = ".lock"  # held by the run saving into a root (lock_root)


def _steps(root):
    """{step: its directory's name} of the directories under `root` named as ours (a copy
    or link under another name, step_latest, is the user's and ignored), complete or not
    (clean_leftovers removes no link)."""
    if not os.path.isdir(root):
        return {}
    steps = {}
    for name in os.listdir(root):
        match = STEP_NAME.fullmatch(name)
        path = os.path.join(root, name)
        if match and os.path.isdir(path):
            steps[int(match[1])] = name
    return steps


def complete_steps(root):
    """Steps with a complete checkpoint under `root` (a rename finished), ascending."""
    return sorted(step for step, name in _steps(root).items()
                  if os.path.isfile(os.path.join(root, name, "index.json")))


def newest(root):
    """The newest complete step directory under `root`, or None."""
    steps = complete_steps(root)
    return os.path.join(root, step_dir_name(steps[-1])) if steps else None


def resolve(path):
    """`--load PATH`: a step directory, or a save root (its newest complete step)."""
    if not os.path.exists(path):
        raise UsageError(f"--load {path}: no such directory")
    if os.path.isfile(os.path.join(path, "index.json")):
        return path
    step_dir = newest(path)
    if step_dir is None:
        raise UsageError(f"--load {path} is not a checkpoint: no index.json and no "
                                  f"complete {STEP_PREFIX}* directory inside")
    return step_dir


def _fsync_write(path, text):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def clean_leftovers(root):
    """Remove the `.tmp-step_*` directories a crashed save left under `root`, and step
    directories without index.json (a save never renames one into place: a copy cut
    short), which a later save of that step would otherwise trip on; never a complete
    step, nor anything else. Called by the main rank as a run saves, holding the root
    (lock_root): no other run is writing there."""
    if not os.path.isdir(root):
        return
    incomplete = [name for step, name in _steps(root).items()
                  if not os.path.isfile(os.path.join(root, name, "index.json"))]
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if (name.startswith(TMP_PREFIX) or name in incomplete) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def lock_root(root):
    """Hold save root `root` for this run (its main rank, until the returned file is
    closed or the process ends, however it ends: the lock goes with it, none is left
    stale). A second run saving into the same root stops at once, naming the first,
    instead of removing its save in progress as a leftover. (On a filesystem that cannot
    lock files, nothing is held.)"""
    path = os.path.join(root, LOCK)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise UsageError(f"--save {root}: cannot create {path} ({e.strerror}); choose another "
                         f"directory") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):  # a filesystem without locks: go on unlocked
            return f
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UsageError(f"--save {root} is in use by another run ({holder}); wait for it to end, "
                         f"or choose another --save directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def _checksum(path):
    """zlib.crc32 of the file, streamed in 4 MiB blocks. Measured: ~0.06 s for a 100 MB
    file from the page cache (~1.8 GB/s; blake2b took ~0.15 s), small beside writing it."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def write_safetensors(tensors, path, metadata=None):
    """safetensors' save_file, its I/O failures raised as the OSError they are (it raises a
    SafetensorError of its own, "... No space left on device (os error 28)"), so that a full
    disk is one line and no half-written save is left, as for any other write."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), path) from None


def _save_file(tensors, path, sums):
    """write_safetensors, then make the file readable like the others (save_file creates it
    0o600), flush it to disk, and record its checksum and size in `sums` under its name."""
    write_safetensors(tensors, path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    sums[os.path.basename(path)] = {"crc32": _checksum(path), "bytes": os.path.getsize(path)}


def _check_file_name(step_dir, name):
    """A file named in the index must lie inside the step directory (a plain name, and not
    a link to a file elsewhere: errors.path_inside)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or os.sep in name or ".." in name or os.path.isabs(name)):
        raise UsageError(f"{step_dir}/index.json names the file {name!r} outside the "
                                  f"checkpoint directory; the index is damaged or not ours")
    errors.path_inside(step_dir, name, f"{step_dir}/index.json")


def verify_file(step_dir, name, files):
    """Refuse `name` (in `step_dir`) if its size or checksum differs from the index's
    `files` table. Files of checkpoints written without checksums pass unverified."""
    _check_file_name(step_dir, name)
    expected = (files or {}).get(name)
    if expected is None:
        return
    path = os.path.join(step_dir, name)
    try:
        ok = (os.path.getsize(path) == expected["bytes"]
              and _checksum(path) == expected["crc32"])
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); the checkpoint is damaged "
                                  f"or incomplete; load an earlier step") from None
    if not ok:
        raise UsageError(f"{path} is damaged: checksum mismatch; the checkpoint cannot "
                                  f"be used; load an earlier step (--load ITS_ROOT/{STEP_PREFIX}N)")


def read_index(step_dir, meta=None):
    """A step's index.json, checked against the checksum its meta.json (`meta`, read if not
    given) keeps of it (checkpoints written before it was kept: unverified) and checked in
    form, or a one-line UsageError:
    the index holds the checksums of every other file, so an edit of it (a deleted files
    table, a piece's geometry changed) must not pass unseen."""
    path = os.path.join(step_dir, "index.json")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); the checkpoint is damaged") from None
    expected = (meta or read_meta(step_dir)).get("index_crc32")
    if expected is not None and zlib.crc32(text) != expected:
        raise UsageError(f"{path} does not match the checksum meta.json keeps of it; the checkpoint "
                         f"is damaged or was edited; load another step")
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path} ({e}); the checkpoint is damaged") from None
    problem = _index_problem(index)
    if problem:
        raise UsageError(f"{path}: {problem}; the checkpoint is damaged")
    return index


def _index_problem(index):
    """What is wrong with the form of a parsed index.json, or None."""
    def ints(v, n=None):
        return isinstance(v, list) and all(type(x) is int and x >= 0 for x in v) and (n is None or len(v) == n)
    if not isinstance(index, dict):
        return "not a JSON object"
    files = index.get(FILES, {})
    if not isinstance(files, dict) or not all(
            isinstance(s, dict) and type(s.get("crc32")) is int and type(s.get("bytes")) is int
            for s in files.values()):
        return f"its {FILES!r} table is not {{file: {{crc32, bytes}}}}"
    for key, entry in index.items():
        if key == FILES:
            continue
        if not (isinstance(entry, dict) and ints(entry.get("shape")) and entry.get("dtype") in SAFETENSORS_DTYPES
                and isinstance(entry.get("pieces"), list)):
            return f"entry {key!r} lacks a shape, a known dtype or its pieces"
        rank = len(entry["shape"])
        for piece in entry["pieces"]:
            if not (isinstance(piece, dict) and isinstance(piece.get("file"), str)
                    and ints(piece.get("offset"), rank) and ints(piece.get("shape"), rank)):
                return f"a piece of {key!r} lacks its file, or an offset and shape of {rank} sizes"
    return None


# index.json's dtypes (torch's names) -> safetensors' (a stored tensor must be what the index says)
SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "bfloat16": "BF16", "float16": "F16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _index_files(step_dir):
    """The checksum table of a step's index.json, or None (older checkpoints: no table)."""
    return read_index(step_dir).get(FILES)


def _all_named_parameters(modules):
    """(global name, parameter) of this rank's model chunks (one module, or a list). With
    several chunks a name can repeat: a parameter that every chunk holds (keep_chunk's
    `shared`) has a copy in each."""
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    return [(name, p) for m in modules for name, p in m.named_parameters()]


def _named_parameters(modules):
    """Global name -> parameter over this rank's model chunks: of a repeated name, the copy
    that counts (the first chunk's: parallel.counts_once), which is the one saved."""
    params = {}
    for name, p in _all_named_parameters(modules):
        if name not in params or not parallel.tags(p).pp_tied_copy:
            params[name] = p
    return params


def train_state_tensors(modules, optimizer):
    """{global name: (tensor, its parameter)}: weights (fp32: under mixed precision the
    optimizer's main weights, not the 16-bit parameters), then AdamW's two moments, each
    shaped like its parameter (so it sits in the same region of the global tensor).
    Collective under ZeRO-1 (the moments are gathered over dp): call on every rank."""
    params = _named_parameters(modules)
    tensors = {f"model.{name}": (p.detach(), p) for name, p in params.items()}
    for name, state in optimizer.state_tensors().items():
        for key, tensor in state.items():
            tensors[f"model.{name}" if key == "model" else f"optimizer.{key}.{name}"] = (tensor, params[name])
    return tensors


def _extent_slices(extent):
    return tuple(slice(0, n) for n in extent)


def _writes(param, layout):
    """Whether this rank writes `param` (and its optimizer state): one copy of each piece.
    Replicas along dp x cp hold the same tensors and only the first writes them (for
    experts, the first of their expert-data-parallel replicas); among tp ranks and pipeline
    stages, the copy that counts once (parallel.counts_once)."""
    first_replica = (layout.expert_dp_rank if parallel.tags(param).expert else layout.dp_cp_rank) == 0
    return first_replica and parallel.counts_once(param, layout)


def save(root, step, modules, optimizer, layout, meta, replicated=None, files=None):
    """Write one checkpoint of this rank's model chunks (a module or a list), the
    `replicated` tensors (a dict: the same on every rank, written once) and `files` ({name:
    bytes}, written once: the tokenizer's, data.tokenizer_files). Call on every rank;
    returns the step directory."""
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    exists = None
    with _every_rank_writes(root, step, tmp, layout):
        if layout.is_main:
            clean_leftovers(root)  # of a crashed save, this step's included
            if os.path.exists(final):
                exists = f"refusing to overwrite the existing checkpoint {final}"
            else:
                os.makedirs(tmp)
    parallel.raise_if_any(exists, layout)

    state = train_state_tensors(modules, optimizer)
    shard = f"shard-{layout.rank:05d}.safetensors"
    tensors, pieces = {}, {}
    for key, (tensor, param) in state.items():
        if not _writes(param, layout):
            continue
        shape, offset, extent = parallel.global_region(param)
        tensors[key] = tensor[_extent_slices(extent)].contiguous().cpu()
        pieces[key] = {"shape": shape, "dtype": str(tensor.dtype).removeprefix("torch."),
                       "pieces": [{"file": shard, "offset": offset, "shape": extent}]}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    with _every_rank_writes(root, step, tmp, layout):
        sums = {}  # this rank's files: name -> {"crc32", "bytes"}
        if tensors:
            _save_file(tensors, os.path.join(tmp, shard), sums)
            _fsync_write(os.path.join(tmp, f"pieces-{layout.rank:05d}.json"), json.dumps(pieces))
        _save_file(rng, os.path.join(tmp, f"rng-{layout.rank:05d}.safetensors"), sums)
        if replicated and layout.is_main:
            _save_file({k: v.detach().contiguous().cpu() for k, v in replicated.items()},
                       os.path.join(tmp, REPLICATED), sums)
        for name, content in (files or {}).items() if layout.is_main else ():
            path = os.path.join(tmp, name)
            with open(path, "xb") as f:
                f.write(content)
                os.fsync(f.fileno())
            sums[name] = {"crc32": zlib.crc32(content), "bytes": len(content)}
        _fsync_write(os.path.join(tmp, f"sums-{layout.rank:05d}.json"), json.dumps(sums))

    with _every_rank_writes(root, step, tmp, layout):
        if layout.is_main:
            _write_index(tmp, final, step, meta)
    return final


def tokenizer(step_dir, meta):
    """The tokenizer to read a checkpoint's text with: the one it was trained with, or
    where that was a folder (hf:DIR) since moved, changed or deleted, the copy of its files
    the checkpoint carries (the step directory is then the tokenizer folder)."""
    name = meta["tokenizer"]
    copy = os.path.join(step_dir, "tokenizer.json")
    if not name.startswith(data.HF_PREFIX) or not os.path.isfile(copy):
        return name
    try:
        if data.tokenizer_fingerprint(name) == meta.get("tokenizer_fingerprint"):
            return name
    except UsageError:  # (the folder is gone)
        pass
    files = _index_files(step_dir)
    for file in data.TOKENIZER_FILES:
        if os.path.isfile(os.path.join(step_dir, file)):
            verify_file(step_dir, file, files)
    return data.HF_PREFIX + os.path.abspath(step_dir)


def _write_index(tmp, final, step, meta):
    """The main rank's last part of a save: gather the ranks' pieces and checksums into
    index.json, write meta.json, and rename the step into place."""
    index, files = {}, {}
    for name in sorted(os.listdir(tmp)):
        if name.startswith("pieces-"):
            for key, entry in json.load(open(os.path.join(tmp, name))).items():
                index.setdefault(key, {**entry, "pieces": []})["pieces"] += entry["pieces"]
            os.remove(os.path.join(tmp, name))
        elif name.startswith("sums-"):
            files.update(json.load(open(os.path.join(tmp, name))))
            os.remove(os.path.join(tmp, name))
    index[FILES] = dict(sorted(files.items()))
    index_text = json.dumps(index, indent=1)
    _fsync_write(os.path.join(tmp, "meta.json"), json.dumps({
        "format": FORMAT, "step": step, **meta, "index_crc32": zlib.crc32(index_text.encode())}, indent=1))
    # index.json last: its presence marks the directory complete.
    _fsync_write(os.path.join(tmp, "index.json"), index_text)
    os.replace(tmp, final)


class SaveFailed(UsageError):
    """A checkpoint that could not be written (its one line says why and what is intact);
    `error`: this rank's OSError, or None where another rank's failed."""

    def __init__(self, message, error):
        super().__init__(message)
        self.error = error


def write_failure(error):
    """Why a write failed, in a few words: "the disk is full", else the system's reason."""
    if error is None:
        return "another rank could not write its files"
    return "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))


@contextlib.contextmanager
def _every_rank_writes(root, step, tmp, layout):
    """A part of a save that every rank runs, ending as a barrier does. If any rank met an
    OSError (a full disk, a lost mount), every rank raises the same UsageError here, none
    left waiting for one that gave up, and the temporary directory is removed: the previous
    checkpoint stays the newest complete one."""
    error = None
    try:
        yield
    except OSError as e:
        error = e
    failed = torch.tensor(float(error is not None), device=layout.device)
    if parallel.all_reduce_world(failed, layout).item():
        if layout.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(_save_failure(root, step, error), error) from None


def _save_failure(root, step, error):
    """The one line of a save that could not be written: why, and what is intact."""
    reason = write_failure(error)
    if error is not None and error.filename:
        reason += f" ({error.filename})"
    earlier = [s for s in complete_steps(root) if s < step]
    kept = (f"the previous checkpoint {os.path.join(root, step_dir_name(earlier[-1]))} is intact "
            f"(--load {root} resumes from it)" if earlier else "no earlier checkpoint was there")
    return (f"cannot save step {step} into {root}: {reason}; nothing of it was kept and {kept}; "
            f"free space or choose another --save directory")


def read_replicated(step_dir):
    """The tensors saved once for every rank (`save`'s `replicated`), on the CPU."""
    path = os.path.join(step_dir, REPLICATED)
    verify_file(step_dir, REPLICATED, _index_files(step_dir))
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise UsageError(f"cannot read {path} ({e}); the checkpoint is damaged or incomplete")


# What every reader of meta.json takes from it (train.py's resume, generate.py, convert.py),
# checked once here so that a damaged file is one line naming the key, not a KeyError later.
META_KEYS = {"step": (int,), "model": (str,), "config": (dict,), "tokenizer": (str,),
             "tokens_seen": (int,), "optimizer_steps": (int,), "loss_scale": (int, float),
             "loss_scale_clean_steps": (int,)}
# ... and what some readers take where a checkpoint has it (written by later code, or only
# by some runs).
OPTIONAL_META = {"seed": int, "schedule": dict, "fp8": dict, "tokenizer_fingerprint": str,
                 "expert_bias": bool, "index_crc32": int, "run_id": str}
FP8_META = {"recipe": str, "history_len": int, "steps_recorded": int, "names": list}


def read_meta(step_dir):
    try:
        with open(os.path.join(step_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {step_dir}/meta.json ({e}); the checkpoint is damaged")
    if not isinstance(meta, dict):
        raise UsageError(f"{step_dir}/meta.json is not a JSON object; the checkpoint is damaged")
    if meta.get("format") != FORMAT:
        raise UsageError(f"{step_dir} has checkpoint format {meta.get('format')}, "
                                  f"this code reads format {FORMAT}")
    for key, kinds in META_KEYS.items():
        if key not in meta or not isinstance(meta[key], kinds) or isinstance(meta[key], bool):
            problem = "lacks" if key not in meta else f"has a {type(meta[key]).__name__} for"
            raise UsageError(f"{step_dir}/meta.json {problem} {key!r} (expected "
                                      f"{' or '.join(k.__name__ for k in kinds)}); the checkpoint "
                                      f"is damaged; load another step")
    where = f"{step_dir}/meta.json"
    if not 0 < meta["loss_scale"] < float("inf"):  # (NaN too: a scale that skips every step)
        raise UsageError(f"{where}: loss_scale {meta['loss_scale']} is not a positive finite number; "
                         f"the checkpoint is damaged; load another step")
    errors.check_json(meta, where, OPTIONAL_META)
    if "schedule" in meta:  # (learning-rate flags: numbers)
        errors.check_json(meta["schedule"], f"{where} (schedule)", dict.fromkeys(meta["schedule"], (int, float)))
    if "fp8" in meta:
        errors.check_json(meta["fp8"], f"{where} (fp8)", FP8_META, required=FP8_META)
    try:
        models.config_from_dict(meta["model"], meta["config"])
    except UsageError as e:
        raise UsageError(f"{step_dir}/meta.json: {e}; the checkpoint is damaged or was "
                                  f"written by other code") from None
    return meta


class _Reader:
    """Reads regions of global tensors from a checkpoint's pieces, opening each file once."""

    def __init__(self, step_dir, meta):
        self.step_dir = step_dir
        self.index = read_index(step_dir, meta)
        self.sums = self.index.pop(FILES, None)  # None: written before checksums
        self.files = {}

    def _open(self, name):
        if name not in self.files:
            verify_file(self.step_dir, name, self.sums)  # once per file: it is then cached
            path = os.path.join(self.step_dir, name)
            try:
                self.files[name] = safe_open(path, framework="pt")
            except (OSError, SafetensorError) as e:
                raise UsageError(f"cannot read {path} ({e}); the checkpoint is damaged "
                                          f"or incomplete")
        return self.files[name]

    def read_into(self, key, target, param):
        """Fill `target`, shaped like `param`, with the region of global tensor `key` that
        `param` holds on this rank, from whichever pieces overlap it."""
        entry = self.index.get(key)
        if entry is None:
            raise UsageError(f"checkpoint {self.step_dir} has no tensor {key}")
        shape, offset, extent = parallel.global_region(param)
        if entry["shape"] != shape:
            raise UsageError(f"{key}: checkpoint shape {entry['shape']} differs from "
                                      f"the model's {shape}; the config does not match")
        covered = 0
        for piece in entry["pieces"]:
            # Overlap of the piece's region with the wanted region, per dimension.
            lo = [max(o, p) for o, p in zip(offset, piece["offset"])]
            hi = [min(o + s, p + n) for o, s, p, n in
                  zip(offset, extent, piece["offset"], piece["shape"])]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            src = self._open(piece["file"]).get_slice(key)
            if src.get_shape() != piece["shape"] or src.get_dtype() != SAFETENSORS_DTYPES[entry["dtype"]]:
                raise UsageError(f"{self.step_dir}/{piece['file']} holds {key} as {src.get_dtype()} "
                                 f"{src.get_shape()}, but index.json says {entry['dtype']} {piece['shape']}; "
                                 f"the checkpoint is damaged")
            src_index = tuple(slice(a - p, b - p) for a, b, p in zip(lo, hi, piece["offset"]))
            dst_index = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
            target[dst_index] = src[src_index].to(target.dtype)
            covered += _numel(lo, hi)
        if covered != _numel([0] * len(extent), extent):
            raise UsageError(f"checkpoint {self.step_dir} is missing part of {key}")


def _numel(lo, hi):
    n = 1
    for a, b in zip(lo, hi):
        n *= b - a
    return n


def load(step_dir, modules, optimizer, layout):
    """Load weights of this rank's model chunks (a module or a list), optimizer state and
    this rank's RNG state; return meta.json."""
    meta = read_meta(step_dir)
    reader = _Reader(step_dir, meta)
    params = _named_parameters(modules)
    with torch.no_grad():
        for name, p in _all_named_parameters(modules):  # every copy of a repeated name
            reader.read_into(f"model.{name}", p.data, p)
        if optimizer is not None:
            optimizer.load_state_tensors(
                lambda name, key, target: reader.read_into(
                    f"model.{name}" if key == "model" else f"optimizer.{key}.{name}", target, params[name]),
                meta["optimizer_steps"])
    rng_file = os.path.join(step_dir, f"rng-{layout.rank:05d}.safetensors")
    if os.path.exists(rng_file):  # the same rank existed when saving: restore its stream
        verify_file(step_dir, os.path.basename(rng_file), reader.sums)
        try:
            with safe_open(rng_file, framework="pt") as f:
                torch.set_rng_state(f.get_tensor("cpu"))
                if "cuda" in f.keys() and torch.cuda.is_available():
                    torch.cuda.set_rng_state(f.get_tensor("cuda"))
        except (SafetensorError, RuntimeError, TypeError) as e:  # a state of another kind
            raise UsageError(f"cannot restore the random-number state from {rng_file} "
                             f"({' '.join(str(e).split())[:120]}); the checkpoint is damaged") from None
    return meta


def load_weights(step_dir, modules, layout):
    """Only the weights, for a model with other heads than the checkpoint's (fine-tuning a
    pre-trained BERT): each parameter the checkpoint holds is read, the others keep their
    fresh initialization. Returns the names of those (new heads), in model order."""
    reader = _Reader(step_dir, read_meta(step_dir))
    new = []
    with torch.no_grad():
        for name, p in _all_named_parameters(modules):
            if f"model.{name}" in reader.index:
                reader.read_into(f"model.{name}", p.data, p)
            else:
                new.append(name)
    return new
