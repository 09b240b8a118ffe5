"""Bad input, everywhere: whatever a user gets wrong (a flag, a path, a config field, a
damaged file) in train.py, generate.py, convert.py or `data.py prepare` ends with exactly one
line on stderr, `error: ...`, naming the problem and the fix, exit status 2, no traceback,
and nothing the user saved overwritten or lost.

Each case runs the tool's main() in this process (no subprocess), so the table stays fast;
every case fails while the input is checked, before any training.
"""
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import convert
import data
import flags
import generate
import train
from conftest import FAST, ROOT
from errors import UsageError

TOOLS = {"train": train.main, "generate": generate.main, "convert": convert.main, "data": data.main}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def one_line_error(capsys, tool, argv):
    """The tool's main(argv) exits 2 with one line on stderr, `error: ...`. Returns it."""
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[tool](argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-step checkpoint of the test llama, and its Hugging Face export: what the
    damaged copies below start from."""
    root = tmp_path_factory.mktemp("saved")
    ckpt, hf = str(root / "ckpt"), str(root / "hf")
    train.main(["--model", "llama", *FAST, "--steps", "1", "--save", ckpt])
    convert.main(["export", ckpt, hf])
    return {"ckpt": ckpt, "hf": hf}


# Damage done to a copy of the checkpoint's meta.json or the HF folder's config.json:
# (which file, a function of its parsed JSON returning the new content).
def meta(change):
    return ("ckpt", os.path.join(checkpoint.step_dir_name(1), "meta.json"), change)


def hf_config(change):
    return ("hf", "config.json", change)


def edited(**fields):
    """A change that sets (or, given None, deletes) top-level keys."""
    def change(d):
        for key, value in fields.items():
            d.pop(key) if value is None else d.__setitem__(key, value)
        return d
    return change


def config_edited(**fields):
    """A change to the config inside meta.json."""
    def change(d):
        d["config"].update(fields)
        return d
    return change


NOT_JSON = lambda d: "{ not json"  # noqa: E731

LLAMA = ["--model", "llama"]
PLAN2 = ["--plan", "--world-size", "2"]  # a layout of 2 ranks, checked without launching them
SMALL = ["--seq-len", "32", "--global-batch-size", "8", "--steps", "1", "--sample-tokens", "0",
         "--peak-tflops", "1", "--device", "cpu"]


def case(tool, argv, message, damage=None, marks=()):
    shown = [a for a in argv if a not in SMALL]  # the case's own flags, in its test id
    return pytest.param(tool, argv, message, damage, marks=marks, id=f"{tool}:{' '.join(shown)}"[:90])


CASES = [
    # train.py: names, layouts, batches, paths
    case("train", ["--model", "bert2"], "unknown --model"),
    case("train", [*LLAMA, "--config", "llama9"], "unknown --config"),
    case("train", [*LLAMA, "--tp", "2"], "not divisible by tp*cp*pp"),
    case("train", [*LLAMA, "--global-batch-size", "8", "--micro-batch-size", "3"], "micro-batch-size"),
    case("train", [*LLAMA, "--data", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
    case("train", [*LLAMA, "--load", "/"], "not a checkpoint"),
    case("train", [*LLAMA, "--load", "/no/such/dir"], "no such directory"),
    case("train", [*LLAMA, "--tokenizer", "sentencepiece"], "unknown tokenizer"),
    case("train", [*LLAMA, "--tokenizer", "hf:/no/dir"], "hf:/no/dir"),
    case("train", [*LLAMA, "--task", "stdlib-packages"], "pass --model bert"),
    case("train", [*LLAMA, "--tp", "two"], "--tp: invalid int value"),
    case("train", [*LLAMA, "--no-such-flag"], "unrecognized arguments"),
    case("train", [*LLAMA, "--save", "/proc/no-checkpoints-here"], "cannot create it"),
    case("train", [*LLAMA, "--save", os.path.join(ROOT, "README.md")], "is a file"),
    case("train", [*LLAMA, "--metrics", "/proc/no-metrics-here.jsonl"],
         "--metrics /proc/no-metrics-here.jsonl: cannot open"),
    case("train", [*LLAMA, *SMALL, "--metrics", "/dev/full"], "--metrics /dev/full: cannot write it "
         "(the disk is full)"),
    pytest.param("train", [*LLAMA, "--device", "cuda"], "no CUDA device", None, marks=NO_GPU,
                 id="train:--device cuda"),
    # train.py: numbers out of range
    case("train", [*LLAMA, "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    case("train", [*LLAMA, "--global-batch-size", "0"], "--global-batch-size must be >= 1"),
    case("train", [*LLAMA, "--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    case("train", [*LLAMA, "--eval-batches", "0"], "--eval-batches must be >= 1"),
    case("train", [*LLAMA, "--steps", "0"], "--steps must be >= 1"),
    case("train", [*LLAMA, "--lr", "-0.001"], "--lr must be >= 0"),
    case("train", [*LLAMA, "--warmup-steps", "-3"], "--warmup-steps must be >= 0"),
    case("train", [*LLAMA, "--min-lr-ratio", "2"], "between 0 and 1"),
    case("train", [*LLAMA, "--adam-eps", "0"], "--adam-eps must be > 0"),
    case("train", [*LLAMA, "--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be > 0"),
    case("train", [*LLAMA, "--distributed-timeout-minutes", "-1"], "--distributed-timeout-minutes must be > 0"),
    case("train", [*LLAMA, "--plan", "--world-size", "0"], "--world-size must be >= 1"),
    case("train", [*LLAMA, "--plan", "--plan-mfu", "2"], "--plan-mfu must be in (0, 1]"),
    case("train", [*LLAMA, "--plan", "--device-memory-gb", "nan"], "--device-memory-gb must be a finite number"),
    # train.py: NaN and inf in float flags
    *[case("train", [*LLAMA, flag, value], f"{flag} must be a finite number, got {value}")
      for flag, value in [("--lr", "nan"), ("--lr", "inf"), ("--adam-eps", "nan"), ("--clip-grad", "inf"),
                          ("--weight-decay", "nan"), ("--min-lr-ratio", "nan"),
                          ("--initial-loss-scale", "inf"), ("--peak-tflops", "nan"),
                          ("--ddp-bucket-mb", "inf"), ("--distributed-timeout-minutes", "nan")]],
    case("train", ["--model", "mixtral", "--moe-capacity-factor", "nan"],
         "--moe-capacity-factor must be a finite number"),
    case("train", ["--model", "mixtral", "--moe-aux-loss-coef", "-1"], "--moe-aux-loss-coef must be >= 0"),
    case("train", ["--model", "bert", "--mask-prob", "nan"], "--mask-prob must be a finite number"),
    # train.py: layouts
    *[case("train", [*LLAMA, flag, "0"], f"{flag} must be >= 1") for flag in ("--tp", "--pp", "--cp", "--ep", "--vpp")],
    case("train", [*LLAMA, *PLAN2, "--cp", "2", "--seq-len", "33"], "not divisible by 2*cp = 4"),
    case("train", [*LLAMA, *PLAN2, "--pp", "2", "--pp-layers", "1,x"], "expected comma-separated integers"),
    case("train", [*LLAMA, *PLAN2, "--pp", "2", "--pp-layers", "1,3"], "add up to n_layers=2"),
    # train.py: config fields (--set)
    case("train", [*LLAMA, "--set", "n_heads=5"], "n_kv_heads"),
    case("train", [*LLAMA, "--set", "colour=red"], "not a config field"),
    case("train", [*LLAMA, "--set", "dim=big"], "expected a int"),
    case("train", [*LLAMA, "--set", "norm_eps=nan"], "config field norm_eps must be a finite number"),
    case("train", [*LLAMA, "--set", "rope_theta=inf"], "config field rope_theta must be a finite number"),
    case("train", [*LLAMA, "--set", "rope_theta=0"], "rope_theta must be > 0"),
    *[case("train", [*LLAMA, "--set", f"{field}={value}"], f"config field {field} must be >= 1")
      for field, value in [("dim", 0), ("n_layers", 0), ("n_heads", 0), ("vocab_size", 0), ("ffn_dim", -5)]],
    case("train", ["--model", "gpt", "--set", "dim=-64"], "config field dim must be >= 1"),
    case("train", [*LLAMA, "--set", "dim=36"], "head_dim=9 is odd"),
    case("train", [*LLAMA, "--set", "dim=66"], "dim=66 is not divisible by n_heads=4"),
    case("train", ["--model", "gpt", "--set", "dim=66"], "dim=66 is not divisible by n_heads=4"),
    case("train", [*LLAMA, "--set", "vocab_size=10000000000"], "the embedding alone"),
    case("train", [*LLAMA, "--set", "n_layers=1000000000"], "n_layers=1,000,000,000: the parameters alone"),
    # train.py: numbers beyond any run (a typo would overflow, allocate terabytes, or hang)
    case("train", [*LLAMA, "--seed", "-1"], "--seed must be >= 0"),
    case("train", [*LLAMA, "--seed", str(2**64)], "--seed must be <= 4,611,686,018,427,387,904"),
    case("train", [*LLAMA, "--global-batch-size", str(10**12)], "--global-batch-size must be <= 16,777,216"),
    case("train", [*LLAMA, "--distributed-timeout-minutes", "1e13"], "--distributed-timeout-minutes must be <= 10,080"),
    case("train", [*LLAMA, "--precision", "fp8", "--fp8-amax-history-len", str(10**12)],
         "--fp8-amax-history-len must be <= 100,000"),
    # fp16: a loss scale below 1 shrinks the gradients into underflow, silently
    case("train", [*LLAMA, "--precision", "fp16", "--initial-loss-scale", "1e-30"], "--initial-loss-scale must be >= 1"),
    case("train", [*LLAMA, "--precision", "fp16", "--initial-loss-scale", "nan"],
         "--initial-loss-scale must be a finite number"),
    # train.py: damaged checkpoints and Hugging Face folders
    case("train", [*LLAMA, "--load", "{ckpt}"], "meta.json", meta(NOT_JSON)),
    case("train", [*LLAMA, "--load", "{ckpt}"], "lacks 'tokens_seen'", meta(edited(tokens_seen=None))),
    case("train", [*LLAMA, "--load", "{ckpt}"], "config field dim must be of type int, got 'big'",
         meta(config_edited(dim="big"))),
    case("train", [*LLAMA, "--load", "{ckpt}"], "the field 'schedule' must be dict", meta(edited(schedule="x"))),
    case("train", [*LLAMA, "--load", "{ckpt}"], "(schedule): the field 'lr' must be int or float",
         meta(edited(schedule={"lr": "big"}))),
    case("train", [*LLAMA, "--load", "{ckpt}"], "the field 'seed' must be int", meta(edited(seed="x"))),
    case("train", [*LLAMA, "--load", "{ckpt}"], "loss_scale nan is not a positive finite number",
         meta(edited(loss_scale=float("nan")))),
    case("train", [*LLAMA, "--load", "{ckpt}"], "(fp8): the field 'history_len' is missing",
         meta(edited(fp8={"recipe": "delayed"}))),
    case("train", [*LLAMA, "--load", "hf:{hf}"], "the field 'rope_scaling' must be dict or null, got [1, 2]",
         hf_config(edited(rope_scaling=[1, 2]))),
    case("train", [*LLAMA, "--load", "hf:{hf}"], "rope_parameters: the field 'factor' must be int or float",
         hf_config(edited(rope_parameters={"rope_type": "llama3", "factor": "x"}))),
    case("train", [*LLAMA, "--load", "hf:{hf}"], "hidden_size='big' must be a positive integer",
         hf_config(edited(hidden_size="big"))),
    case("train", [*LLAMA, "--load", "hf:{hf}"], "config field norm_eps must be of type float",
         hf_config(edited(rms_norm_eps="small"))),
    # generate.py
    *[case("generate", ["--load", "checked-after-the-flags", flag, "-1"], f"{flag} must be >= 0, got -1")
      for flag in ("--max-new-tokens", "--temperature", "--top-k")],
    case("generate", ["--load", "{ckpt}", "--temperature", "nan"], "--temperature must be a finite number"),
    case("generate", ["--load", "{ckpt}", "--temperature", "inf"], "--temperature must be a finite number"),
    case("generate", ["--load", "{ckpt}", "--device", "tpu"], "--device tpu: not a device"),
    pytest.param("generate", ["--load", "{ckpt}", "--device", "cuda"], "no CUDA device", None,
                 marks=NO_GPU, id="generate:--device cuda"),
    case("generate", ["--load", "{ckpt}", "--prompt", "x" * 300], "--prompt is 300 tokens but the "
         "model's context is max_seq_len=256"),
    case("generate", ["--load", "/no/such/dir"], "no such directory"),
    case("generate", ["--prompt", "x"], "the following arguments are required: --load"),
    case("generate", ["--load", "{ckpt}"], "has a str for 'step'", meta(edited(step="ten"))),
    case("generate", ["--load", "{ckpt}"], "unknown field(s): colour", meta(config_edited(colour="red"))),
    case("generate", ["--load", "{ckpt}"], "unknown model 'bloom'", meta(edited(model="bloom"))),
    case("generate", ["--load", "{hf}"], "has no 'num_hidden_layers'", hf_config(edited(num_hidden_layers=None))),
    case("generate", ["--load", "{hf}"], "num_attention_heads=0 must be a positive integer",
         hf_config(edited(num_attention_heads=0))),
    case("generate", ["--load", "{ckpt}", "--prompts-file", "/dev/null"], "has no prompts"),
    case("generate", ["--load", "{ckpt}", "--prompts-file", "/no/such/prompts.txt"], "cannot read it"),
    case("generate", ["--load", "{ckpt}", "--prompt", "a", "--prompt", "x" * 300], "--prompt is 300 tokens"),
    case("generate", ["--load", "{ckpt}", "--tp", "3"], "n_heads=4 is not divisible by tp=3"),
    case("generate", ["--load", "{ckpt}", "--stop", ""], "--stop '': a stop string needs"),
    case("generate", ["--load", "{ckpt}", "--tp", "2"], "needs 2 processes (one per shard) but this job has 1"),
    case("generate", ["--load", "{ckpt}", "--pp", "2"], "--pp 2: generate.py shards a model with --tp"),
    case("generate", ["--load", "{ckpt}", "--ep", "2"], "expert parallelism needs a mixture of experts"),
    # convert.py
    case("convert", ["import", "{hf}", "/proc/no-checkpoint-here"], "cannot create it"),
    case("convert", ["export", "{ckpt}", "/proc/no-folder-here"], "cannot create it"),
    case("convert", ["export", "{ckpt}", ROOT], "already exists and is not empty"),
    case("convert", ["import", "/no/such/dir", "{tmp}/out"], "no config.json"),
    case("convert", ["import", "{hf}"], "the following arguments are required: ckpt_dir"),
    case("convert", ["export", "{ckpt}", "{tmp}/out"], "config field dim must be >= 1",
         meta(config_edited(dim=0))),
    case("convert", ["export", "{ckpt}", "{tmp}/out"], "lacks 'model'", meta(edited(model=None))),
    case("convert", ["import", "{hf}", "{tmp}/out"], "not valid JSON", hf_config(NOT_JSON)),
    case("convert", ["import", "{hf}", "{tmp}/out"], "hidden_act='relu'", hf_config(edited(hidden_act="relu"))),
    case("convert", ["import", "{hf}", "{tmp}/out"], "model_type 'bloom' is not supported",
         hf_config(edited(model_type="bloom"))),
    # data.py prepare
    case("data", ["prepare", "stdlib", "/proc/no-data-here"], "cannot create it"),
    case("data", ["prepare", "/no/such/text", "{tmp}/out"], "no such file or directory"),
    case("data", ["prepare", "stdlib", "{tmp}/out", "--val-fraction", "nan"], "--val-fraction"),
    case("data", ["prepare", "stdlib", "{tmp}/out", "--tokenizer", "sentencepiece"], "unknown tokenizer"),
    case("data", ["prepare", "stdlib", ROOT], "already exists and is not empty"),
    case("data", ["tokenize"], "invalid choice: 'tokenize'"),
]


@pytest.mark.parametrize("tool,argv,message,damage", CASES)
def test_bad_input_is_one_line(capsys, tmp_path, saved, tool, argv, message, damage):
    paths = {**saved, "tmp": str(tmp_path)}
    if damage:  # a damaged copy, in place of the saved folder
        folder, file, change = damage
        paths[folder] = str(tmp_path / folder)
        shutil.copytree(saved[folder], paths[folder])
        with open(os.path.join(paths[folder], file)) as f:
            content = change(json.load(f))
        with open(os.path.join(paths[folder], file), "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
    argv = [a.format(**paths) for a in argv]
    if tool == "train" and "--config" not in argv:
        argv += ["--config", "test"]
    assert message in one_line_error(capsys, tool, argv)


def test_non_finite_weights_are_neither_imported_nor_exported(capsys, tmp_path, saved):
    """A Hugging Face folder with a NaN weight: refused on import (nothing written); a model
    with one: refused on export."""
    import safetensors.torch
    shutil.copytree(saved["hf"], tmp_path / "hf")
    weights = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    line = one_line_error(capsys, "convert", ["import", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert "model.layers.0.mlp.up_proj.weight in" in line and "non-finite" in line
    assert not (tmp_path / "out").exists()
    model = convert.from_hf(saved["hf"])
    with torch.no_grad():
        model.layers["1"].attn.q_proj.weight[0, 0] = float("inf")
    with pytest.raises(UsageError, match="model.layers.1.self_attn.q_proj.weight holds non-finite"):
        convert.export_model(model, str(tmp_path / "exported"))


def test_data_that_is_not_plain_files_is_one_line_or_read_once(capsys, tmp_path):
    """A FIFO as --data (reading it would wait for a writer for ever): one line. A folder
    with a link back to itself: each file read once (not once per level of the loop). A
    prompts file that is not UTF-8: one line."""
    os.mkfifo(tmp_path / "fifo")
    assert "is not a regular file" in one_line_error(capsys, "train", [*LLAMA, "--config", "test", *SMALL, "--data",
                                                                       str(tmp_path / "fifo")])
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text\n")
    os.symlink(tmp_path / "texts", tmp_path / "texts" / "again")
    assert data._source_files(str(tmp_path / "texts")) == [str(tmp_path / "texts" / "a.txt")]
    (tmp_path / "prompts.txt").write_bytes(b"hello \xff\xfe world\n")
    line = one_line_error(capsys, "generate", ["--load", "checked-after", "--prompts-file", str(tmp_path / "prompts.txt")])
    assert "is not UTF-8 text (byte 0xff at offset 6)" in line


def test_a_data_shard_truncated_while_training_is_one_line(capsys, tmp_path, monkeypatch):
    """A prepared shard cut short after the run mapped it: reading the lost pages would end
    the process with SIGBUS (no message, no checkpoint); the read is refused first, naming
    the shard, and the checkpoint saved before stays."""
    data.prepare("stdlib", str(tmp_path / "prepared"))
    shard = tmp_path / "prepared" / json.loads((tmp_path / "prepared" / "meta.json").read_text())["train"][0]["file"]
    real_step = train.train_step

    def step_then_truncate(run, step):
        if step == 1:
            os.truncate(shard, 4096)
        return real_step(run, step)
    monkeypatch.setattr(train, "train_step", step_then_truncate)
    line = one_line_error(capsys, "train", [*LLAMA, "--config", "test", *SMALL, "--steps", "3", "--data",
                                            str(tmp_path / "prepared"), "--save", str(tmp_path / "ckpt"),
                                            "--save-every", "1", "--global-batch-size", "64"])
    assert f"{shard} shrank while training (now 4,096 bytes" in line
    assert checkpoint.complete_steps(str(tmp_path / "ckpt")) == [1]


def test_odd_seq_len_trains_without_context_parallelism():
    """Only context parallelism (its zigzag halves) needs --seq-len divisible by 2 * cp: one
    step of 8 sequences of 33 tokens, a finite loss."""
    records = train.train(flags.parse_args(["--model", "llama", *FAST, "--steps", "1", "--seq-len", "33"]))
    assert [r["step"] for r in records] == [1] and records[0]["tokens_seen"] == 8 * 33
    assert 0 < records[0]["loss"] < 10


def _prepared_meta(change):
    def damage(tmp_path):
        data.prepare("stdlib", str(tmp_path / "prepared"))
        path = tmp_path / "prepared" / "meta.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
        return [*LLAMA, "--config", "test", *SMALL, "--data", str(tmp_path / "prepared")]
    return damage


def _tokenizer_config(content):
    def damage(tmp_path):
        from conftest import byte_level_bpe
        byte_level_bpe(tmp_path, ["the quick brown fox"] * 10, 300, ["<|endoftext|>"], content)
        return [*LLAMA, "--config", "test", *SMALL, "--set", "vocab_size=300", "--tokenizer", f"hf:{tmp_path}"]
    return damage


def _hf_index(change):
    def damage(tmp_path, hf):
        shutil.copytree(hf, tmp_path / "hf")
        listing = change({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}})
        (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(listing))
        return [*LLAMA, *SMALL, "--load", f"hf:{tmp_path / 'hf'}"]
    return damage


def _rng_file(tmp_path, ckpt):
    from safetensors.torch import save_file
    shutil.copytree(ckpt, tmp_path / "ckpt")
    step = tmp_path / "ckpt" / checkpoint.step_dir_name(1)
    rng = step / "rng-00000.safetensors"
    save_file({"gpu": torch.zeros(3)}, str(rng))  # a state of another kind, its checksum made to fit
    index = json.loads((step / "index.json").read_text())
    index[checkpoint.FILES][rng.name] = {"crc32": checkpoint._checksum(rng), "bytes": rng.stat().st_size}
    text = json.dumps(index)
    (step / "index.json").write_text(text)
    meta = json.loads((step / "meta.json").read_text())
    meta["index_crc32"] = __import__("zlib").crc32(text.encode())
    (step / "meta.json").write_text(json.dumps(meta))
    return [*LLAMA, "--config", "test", *SMALL, "--steps", "2", "--load", str(tmp_path / "ckpt")]


@pytest.mark.parametrize("damage,message", [
    (_prepared_meta(lambda m: [1]), "prepared/meta.json is not a JSON object"),
    (_prepared_meta(lambda m: {**m, "train": "x"}), "the field 'train' must be list"),
    (_prepared_meta(lambda m: {k: v for k, v in m.items() if k != "dtype"}), "the field 'dtype' is missing"),
    (_prepared_meta(lambda m: {**m, "dtype": "float99"}), "unknown dtype 'float99'"),
    (_prepared_meta(lambda m: {**m, "train": [5]}), "(train shard) is not a JSON object"),
    (_tokenizer_config([1]), "tokenizer_config.json is not a JSON object"),
    (_hf_index(lambda i: {**i, "weight_map": [1]}), "the field 'weight_map' must be dict"),
    (_hf_index(lambda i: {"metadata": {}}), "the field 'weight_map' is missing"),
    (_hf_index(lambda i: {**i, "weight_map": {"model.embed_tokens.weight": 5}}),
     "the field 'model.embed_tokens.weight' must be str"),
    (_rng_file, "cannot restore the random-number state"),
], ids=["prepared-list", "prepared-train", "prepared-dtype-missing", "prepared-dtype", "prepared-shard",
        "tokenizer-config", "hf-index-list", "hf-index-missing", "hf-index-value", "rng"])
def test_damaged_files_are_one_line(capsys, tmp_path, saved, damage, message):
    """Every JSON (and rng) file read from a folder anyone may have edited is checked in
    form where it is read: a wrong type or a missing field is one line naming the file
    and the field."""
    extra = {"_hf_index": [saved["hf"]], "_rng_file": [saved["ckpt"]]}
    name = getattr(damage, "__qualname__", "").split(".")[0]
    argv = damage(tmp_path, *extra.get(name, []))
    assert message in one_line_error(capsys, "train", argv)


def test_a_metrics_file_with_odd_records_is_read_around_them(tmp_path):
    """A --metrics file whose lines hold other records (a "run" that is no header, a step
    that is no number): a resumed run trims around them without a traceback."""
    import metrics
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            [{"run": "x"}, {"step": "x"}, {"run": {"start_step": 0}}, {"step": 1}, {"step": 2}]))
    assert metrics.trim_metrics(str(path), 1) == 1
    assert [r["step"] for r in metrics.read_metrics(path)] == ["x", 1]
    assert metrics.describe_run(path) == "?"


# ----------------------------------------------------------------------------
# A disk that fills up, for real: a small filesystem of its own (a tmpfs, where this user
# may mount one) filled to the brim, or a file-size limit (ulimit -f) on the process
# ----------------------------------------------------------------------------

@pytest.fixture(params=["tmpfs", "ulimit -f"])
def small_disk(request, tmp_path):
    """(a directory, run(argv) -> CompletedProcess, the reason the error must give): tools
    run as a user runs them, writing into the directory until a write fails: "tmpfs",
    ENOSPC from a filesystem filled first but for 8 KiB; "ulimit -f", EFBIG past 64 KiB in
    any one file."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = request.param == "tmpfs"
    if mounted and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                                  capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the file-size limit variant runs instead)")

    def run(argv, fill=mounted):
        if fill:  # all but a few KiB of the filesystem taken
            with open(folder / "filler", "wb") as f:
                f.write(b"\0" * (shutil.disk_usage(folder).free - 8192))
        limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))) if not mounted else None
        try:
            return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                                  preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        finally:
            if fill:
                os.remove(folder / "filler")
    yield folder, run, "the disk is full" if mounted else "File too large"
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def assert_one_line(proc, *messages):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(m in lines[0] for m in messages), lines[0]


def files_of(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name not in (checkpoint.LOCK, "filler")}


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(small_disk, saved):
    folder, run, reason = small_disk
    root = folder / "ckpt"
    shutil.copytree(saved["ckpt"], root)
    before = files_of(root)
    proc = run(["train.py", "--model", "llama", *FAST, "--steps", "2", "--load", str(root), "--save", str(root)])
    assert_one_line(proc, reason, f"{checkpoint.step_dir_name(1)} is intact")
    assert files_of(root) == before  # no .tmp-step_ left, step 1 as it was


@pytest.mark.parametrize("tool", ["convert import", "convert export", "data prepare"])
def test_a_full_disk_while_converting_or_preparing_leaves_nothing(small_disk, saved, tool):
    folder, run, reason = small_disk
    source = {"convert import": saved["hf"], "convert export": saved["ckpt"], "data prepare": "stdlib"}[tool]
    script, command = tool.split()
    proc = run([f"{script}.py", command, source, str(folder / "out")])
    assert_one_line(proc, reason, "nothing was written")
    assert not [p for p in folder.iterdir() if p.name != "filler"]
