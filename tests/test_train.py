"""train.py end to end: learning, data-parallel equality, resume, and bad input.

Multi-process runs go through torchrun exactly as a user launches them (gloo on CPU)."""
import gc
import json
import os
import subprocess
import sys

import pytest
import torch

import generate
import parallel
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and quick; --peak-tflops skips the start-up matmul that measures the CPU.
FAST = ["--config", "test", "--seq-len", "32", "--global-batch-size", "8", "--steps", "10",
        "--warmup-steps", "2", "--lr", "3e-3", "--sample-tokens", "0", "--peak-tflops", "1",
        "--eval-every", "0", "--eval-batches", "1"]


def run(args, nproc=1, expect_ok=True):
    """Run train.py (under torchrun when nproc > 1); return the CompletedProcess."""
    launcher = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f]


def assert_same_curve(got, expected, rel=1e-5):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected), 1):
        assert abs(a - b) <= rel * abs(b), f"step {step}: {a} vs {b}"


def test_loss_falls_on_builtin_corpus(tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = run(["--model", "llama", *FAST, "--steps", "40", "--metrics", str(metrics),
                "--sample-tokens", "20"])
    curve = losses(metrics)
    assert curve[-1] < 0.75 * curve[0]
    assert "---- sample ----" in proc.stdout
    record = json.loads(metrics.read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "val_loss"} <= set(record)


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_data_parallel_equals_one_process(model, tmp_path):
    """dp=2 and dp=4, with and without gradient accumulation, follow the dp=1 curve."""
    reference = tmp_path / "ref.jsonl"
    run(["--model", model, *FAST, "--metrics", str(reference)])
    expected = losses(reference)
    for nproc, micro in [(1, 2), (2, 4), (2, 1), (4, 2), (4, 1)]:
        metrics = tmp_path / f"dp{nproc}-mb{micro}.jsonl"
        run(["--model", model, *FAST, "--micro-batch-size", str(micro), "--metrics", str(metrics)],
            nproc=nproc)
        assert_same_curve(losses(metrics), expected)


def test_training_lets_go_of_the_model():
    """DataParallel's gradient hooks form a cycle the garbage collector may not see (autograd
    holds them in C++); train() closes it, so the model and, under torchrun, its process
    groups are torn down while the interpreter still runs, not during its exit."""
    def alive():  # other tests in this process may hold their own models
        gc.collect()
        return sum(isinstance(o, (parallel.DataParallel, torch.nn.Parameter)) for o in gc.get_objects())
    before = alive()
    train.train(train.parse_args(["--model", "llama", *FAST, "--steps", "2"]))
    assert alive() == before


def test_resume_equals_uninterrupted_run(tmp_path):
    full = tmp_path / "full.jsonl"
    run(["--model", "llama", *FAST, "--metrics", str(full)])
    first = tmp_path / "first.jsonl"
    ckpt = tmp_path / "ckpt"
    run(["--model", "llama", *FAST, "--steps", "10", "--save", str(ckpt), "--save-every", "4",
         "--metrics", str(first)])
    # Resume from step 4 (not the newest) into a new save root; then from the newest.
    resumed = tmp_path / "resumed.jsonl"
    run(["--model", "llama", *FAST, "--load", str(ckpt / "step_00000004"),
         "--save", str(tmp_path / "ckpt2"), "--metrics", str(resumed)])
    assert_same_curve(losses(resumed), losses(full)[4:], rel=1e-6)
    # Resume under dp=2 from the dp=1 checkpoint: the layout-free index at work.
    resumed2 = tmp_path / "resumed2.jsonl"
    run(["--model", "llama", *FAST, "--load", str(ckpt / "step_00000008"), "--metrics",
         str(resumed2)], nproc=2)
    assert_same_curve(losses(resumed2), losses(full)[8:])


# ----------------------------------------------------------------------------
# Bad input: one line naming the problem, exit status 2
# ----------------------------------------------------------------------------

def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("argv,message", [
    (["--model", "bert2"], "unknown --model"),
    (["--model", "llama", "--config", "llama9"], "unknown --config"),
    (["--model", "llama", "--tp", "2"], "not divisible by tp*cp*pp"),
    (["--model", "llama", "--global-batch-size", "8", "--micro-batch-size", "3"], "micro-batch-size"),
    (["--model", "llama", "--data", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["--model", "llama", "--load", "/"], "not a checkpoint"),
    (["--model", "llama", "--load", "/no/such/dir"], "no such directory"),
    (["--model", "llama", "--set", "n_heads=5"], "n_kv_heads"),
    (["--model", "llama", "--precision", "fp8"], "fp8"),
    (["--model", "llama", "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--model", "llama", "--global-batch-size", "0"], "--global-batch-size must be >= 1"),
    (["--model", "llama", "--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--model", "llama", "--eval-batches", "0"], "--eval-batches must be >= 1"),
    (["--model", "llama", "--lr", "-0.001"], "--lr must be >= 0"),
    (["--model", "llama", "--warmup-steps", "-3"], "--warmup-steps must be >= 0"),
    (["--model", "llama", "--min-lr-ratio", "2"], "between 0 and 1"),
    (["--model", "llama", "--adam-eps", "0"], "--adam-eps must be > 0"),
    (["--model", "llama", "--steps", "0"], "--steps must be >= 1"),
    (["--model", "llama", "--save", "/proc/no-checkpoints-here"], "cannot create it"),
    (["--model", "llama", "--save", os.path.join(ROOT, "README.md")], "is a file"),
    (["--model", "llama", "--metrics", "/proc/no-metrics-here.jsonl"], "--metrics /proc/no-metrics-here.jsonl: cannot open"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    assert message in one_line_error(capsys, argv + ["--config", "test"] * ("--config" not in argv))


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--temperature", "--top-k"])
def test_generate_refuses_negative_sampling_flags(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--load", "checked-after-the-flags", flag, "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {flag} must be >= 0, got -1")


def test_checkpoints_are_never_overwritten_or_silently_loaded_when_damaged(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    argv = ["--model", "gpt", *FAST, "--steps", "2", "--save", str(ckpt)]
    train.main(argv)
    saved = (ckpt / "step_00000002" / "shard-00000.safetensors").read_bytes()
    assert "already holds checkpoints" in one_line_error(capsys, argv)
    assert (ckpt / "step_00000002" / "shard-00000.safetensors").read_bytes() == saved
    assert "different model" in one_line_error(capsys, ["--model", "llama", *FAST, "--load", str(ckpt)])
    shard = ckpt / "step_00000002" / "shard-00000.safetensors"
    shard.write_bytes(saved[: len(saved) // 2])  # truncated, as by a full disk
    assert "damaged" in one_line_error(capsys, ["--model", "gpt", *FAST, "--load", str(ckpt),
                                                "--steps", "3"])
