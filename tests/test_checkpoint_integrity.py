"""Checkpoint integrity: per-file checksums in the index, file names kept inside the step
directory, leftovers of crashed saves cleaned, file modes like the rest of the checkpoint.
One process, in-process runs; one checkpoint is saved per module and copied per test."""
import json
import os
import shutil
import stat
import struct
import zlib

import pytest

import checkpoint
from conftest import FAST, one_line_error, train_job

ARGV = ["--model", "gpt", *FAST, "--steps", "2"]
STEP = "step_00000002"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    train_job([*ARGV, "--save", str(root)])
    return root


@pytest.fixture
def ckpt(saved, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    return root


def _resume(root):
    return [*ARGV, "--steps", "3", "--load", str(root)]


def _rewrite_index(root, index):
    """index.json as given, and the checksum meta.json keeps of it to match (an edit made
    knowingly: what the checks behind the checksum see)."""
    text = json.dumps(index)
    (root / STEP / "index.json").write_text(text)
    meta = json.loads((root / STEP / "meta.json").read_text())
    meta["index_crc32"] = zlib.crc32(text.encode())
    (root / STEP / "meta.json").write_text(json.dumps(meta))


def _index(root):
    return json.loads((root / STEP / "index.json").read_text())


def test_index_records_a_checksum_of_every_file(ckpt):
    index = json.loads((ckpt / STEP / "index.json").read_text())
    files = index[checkpoint.FILES]
    on_disk = sorted(n for n in os.listdir(ckpt / STEP) if n.endswith(".safetensors"))
    assert sorted(files) == on_disk and "shard-00000.safetensors" in files
    for name, entry in files.items():
        assert entry["bytes"] == (ckpt / STEP / name).stat().st_size
        assert entry["crc32"] == checkpoint._checksum(ckpt / STEP / name)


def test_a_flipped_byte_in_a_shard_is_refused_naming_it(ckpt, capsys):
    shard = ckpt / STEP / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    middle = header + (len(data) - header) // 2  # in the tensor data, not the header
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    shard.write_bytes(bytes(data))
    err = one_line_error(capsys, _resume(ckpt))
    assert "shard-00000.safetensors is damaged: checksum mismatch" in err
    assert "load an earlier step" in err


def test_an_index_naming_a_file_outside_the_step_directory_is_refused(ckpt, capsys):
    (ckpt / "x.safetensors").write_bytes((ckpt / STEP / "shard-00000.safetensors").read_bytes())
    index = _index(ckpt)
    for key, entry in index.items():
        if key != checkpoint.FILES:
            for piece in entry["pieces"]:
                piece["file"] = "../x.safetensors"
    _rewrite_index(ckpt, index)
    err = one_line_error(capsys, _resume(ckpt))
    assert "'../x.safetensors' outside the checkpoint directory" in err
    for bad in ["/etc/passwd", "a/b.safetensors", "..", ""]:
        with pytest.raises(Exception, match="outside the checkpoint directory"):
            checkpoint._check_file_name(str(ckpt / STEP), bad)


def test_a_shard_that_is_a_link_out_of_the_step_directory_is_refused(ckpt, capsys):
    """The same bytes (its checksum passes) but a symbolic link to a file elsewhere: refused."""
    shard = ckpt / STEP / "shard-00000.safetensors"
    outside = ckpt.parent / "elsewhere.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    assert "(or is a link out of it)" in one_line_error(capsys, _resume(ckpt))


def test_files_named_in_other_indexes_stay_in_their_folders(tmp_path, capsys):
    """A Hugging Face weight_map naming ../x, a prepared folder's meta.json naming a file
    outside it, and a planted link at a resumed run's metrics: refused, or not followed."""
    import convert
    import data
    import metrics
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "../x.safetensors"}}))
    with pytest.raises(Exception, match="lies outside"):
        convert._HFTensors(str(tmp_path / "hf"))
    data.prepare("stdlib", str(tmp_path / "prepared"))
    meta_path = tmp_path / "prepared" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["train"][0]["file"] = "../../etc/passwd"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="lies outside"):
        data.load_dataset(str(tmp_path / "prepared"), "byte", 16)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    records = tmp_path / "m.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in [{"run": {"start_step": 0}}, {"step": 1}, {"step": 2}]))
    os.symlink(victim, str(records) + ".tmp")
    assert metrics.trim_metrics(str(records), 1) == 1
    assert victim.read_text() == "mine" and [r["step"] for r in metrics.read_metrics(records)] == [1]


def test_an_edited_index_is_refused(ckpt, capsys):
    """index.json holds every other file's checksum, and meta.json its own: a deleted files
    table, or a piece's place changed, is seen."""
    original = (ckpt / STEP / "index.json").read_text()
    for edit in ("files", "offset"):
        index = json.loads(original)
        if edit == "files":
            del index[checkpoint.FILES]
        else:
            index["model.embed.weight"]["pieces"][0]["offset"][0] = 1
        (ckpt / STEP / "index.json").write_text(json.dumps(index))
        assert "index.json does not match the checksum meta.json keeps of it" in one_line_error(capsys, _resume(ckpt))


@pytest.mark.parametrize("edit,message", [
    ("dtype", "holds model.embed.weight as F32 [257, 64], but index.json says bfloat16 [257, 64]"),
    ("shape", "holds model.embed.weight as F32 [257, 64], but index.json says float32 [256, 64]"),
    ("malformed", "a piece of 'model.embed.weight' lacks its file, or an offset and shape of 2 sizes"),
    ("unknown dtype", "entry 'model.embed.weight' lacks a shape, a known dtype or its pieces"),
])
def test_an_index_unlike_the_stored_tensors_is_refused(ckpt, capsys, edit, message):
    """Behind the index's checksum (edited knowingly): each stored tensor's dtype and shape
    must be the index's, and the index's form what a checkpoint's is."""
    index = _index(ckpt)
    entry = index["model.embed.weight"]
    if edit == "dtype":
        entry["dtype"] = "bfloat16"
    elif edit == "shape":
        entry["pieces"][0]["shape"][0] = 256  # (the rest "missing": had it gone unseen, random)
    elif edit == "malformed":
        del entry["pieces"][0]["offset"]
    else:
        entry["dtype"] = "complex32"
    _rewrite_index(ckpt, index)
    assert message in one_line_error(capsys, _resume(ckpt))


def test_checkpoints_without_checksums_still_load(ckpt):
    index = _index(ckpt)
    del index[checkpoint.FILES]  # as written before checksums existed (and before meta.json kept one)
    (ckpt / STEP / "index.json").write_text(json.dumps(index))
    meta = json.loads((ckpt / STEP / "meta.json").read_text())
    del meta["index_crc32"]
    (ckpt / STEP / "meta.json").write_text(json.dumps(meta))
    records, out = train_job([*_resume(ckpt), "--save", str(ckpt)])
    assert "resumed from" in out and (ckpt / "step_00000003" / "index.json").is_file()
    assert [r["step"] for r in records][-1] == 3


def test_leftover_temporary_directories_are_cleaned_when_saving_again(tmp_path):
    root = tmp_path / "ckpt"
    leftover = root / ".tmp-step_00000007"  # a crashed save of another step
    leftover.mkdir(parents=True)
    (leftover / "shard-00000.safetensors").write_bytes(b"partial")
    (root / "notes").mkdir()
    (root / ".tmp-step_file").write_text("a file, not ours to remove")
    train_job([*ARGV, "--save", str(root)])
    assert not leftover.exists()
    assert (root / "notes").is_dir() and (root / ".tmp-step_file").is_file()
    assert checkpoint.complete_steps(root) == [2]


def test_weights_are_as_readable_as_the_rest_of_the_checkpoint(ckpt):
    mode = stat.S_IMODE((ckpt / STEP / "meta.json").stat().st_mode)
    for name in os.listdir(ckpt / STEP):
        assert stat.S_IMODE((ckpt / STEP / name).stat().st_mode) == mode, name
