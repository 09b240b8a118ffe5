"""The examples (examples/*.sh), one per family at a published size for a stated cluster:
each one's layout fits its GPUs by the planner (--plan, 80 GB H100s, 8 to a node), with the
figure its header quotes, and a reduced form (the same flags but the layout's, a test-size
preset, one CPU process, two steps) trains, so that no flag of an example rots."""
import glob
import os
import re
import shlex
import subprocess

import pytest

import train
from conftest import ROOT, without_flags

EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")))
GPUS_PER_NODE, GPU_GB = 8, 80
# What the test gives instead of the example's data and tokenizer (the plan depends on
# neither: a preset's vocabulary holds the byte tokenizer's ids). T5's own tokenizer starts
# the decoder with its pad, 0; the byte tokenizer's pad is 257.
FOR_BYTES = {"t5": ["--set", "decoder_start_token_id=257"]}
# The test-size preset of each example's model (default: "test").
TEST_PRESET = {"qwen3-30b-a3b": "test-qwen3-moe", "nemotron-h-8b": "test-hybrid"}
LAYOUT = ("--tp", "--pp", "--cp", "--ep", "--vpp", "--pp-layers")
SMALL = ["--steps", "2", "--warmup-steps", "1", "--seq-len", "64", "--global-batch-size", "4",
         "--micro-batch-size", "2", "--sample-tokens", "0", "--eval-batches", "1", "--peak-tflops", "1",
         "--device", "cpu"]


def read(path):
    """(nodes, {array name: its words}, the planned GiB per GPU its header quotes)."""
    with open(path) as f:
        text = f.read()
    arrays = {name: shlex.split(words) for name, words in re.findall(r"^(\w+)=\((.*?)\)$", text, re.M | re.S)}
    planned = re.search(r"^# Planned per GPU \(train\.py --plan\): ([\d.]+) GiB of (\d+) GB\.$", text, re.M)
    assert planned and int(planned[2]) == GPU_GB, f"{path}: no 'Planned per GPU' line"
    return int(re.search(r"^NODES=(\d+)$", text, re.M)[1]), arrays, float(planned[1])


def flag(args, name):
    return args[args.index(name) + 1]


def test_every_family_has_an_example_and_each_is_valid_bash():
    families = {flag(read(path)[1]["TRAIN"], "--model") for path in EXAMPLES}
    assert families == {"gpt", "llama", "mixtral", "mamba", "bert", "t5"}
    for path in EXAMPLES:
        check = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_the_layout_fits_and_the_header_quotes_the_plan(path, capsys):
    nodes, arrays, planned = read(path)
    args = arrays["TRAIN"]
    train.main([*args, *FOR_BYTES.get(flag(args, "--model"), []), "--plan", "--device",
                "cpu", "--world-size", str(nodes * GPUS_PER_NODE), "--device-memory-gb", str(GPU_GB)])
    out = capsys.readouterr().out
    assert "\nfits: peak" in out, out[-2000:]
    peak = max(float(v) for v in re.findall(r"^  peak +([\d.]+) GiB$", out, re.M))
    assert f"{peak:.2f}" == f"{planned:.2f}", f"{path} says {planned} GiB, the planner {peak:.2f}"


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_a_reduced_form_trains(path, tmp_path, capsys):
    _, arrays, _ = read(path)
    args = without_flags(arrays["TRAIN"], *LAYOUT)
    args[args.index("--config") + 1] = TEST_PRESET.get(flag(args, "--config"), "test")
    extra = FOR_BYTES.get(flag(args, "--model"), [])
    records = train.train(train.flags.parse_args([*args, *extra, *SMALL, "--save", str(tmp_path / "ckpt")]))
    assert [r["step"] for r in records] == [1, 2]
    if "FINETUNE_TRAIN" in arrays:  # then the fine-tune, from that checkpoint, on a tiny task
        for name in ("a", "b"):
            os.makedirs(tmp_path / "task" / name)
            (tmp_path / "task" / name / "t.txt").write_text((name * 7 + "\n") * 300)
        tuned = train.train(train.flags.parse_args([
            "--load", str(tmp_path / "ckpt"), "--task", str(tmp_path / "task"),
            *without_flags(arrays["FINETUNE_TRAIN"], *LAYOUT), *SMALL]))
        assert [r["step"] for r in tuned] == [1, 2]


def test_the_readme_table_quotes_the_headers():
    with open(os.path.join(ROOT, "docs", "examples.md")) as f:
        rows = dict(re.findall(r"^\| [^|]+ \| `(examples/[\w.-]+\.sh)` \|[^|]+\|[^|]+\| ([\d.]+) GiB \|$", f.read(), re.M))
    assert {os.path.join(ROOT, p) for p in rows} == set(EXAMPLES)
    for script, gib in rows.items():
        assert float(gib) == read(os.path.join(ROOT, script))[2], script
