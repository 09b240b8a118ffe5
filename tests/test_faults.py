"""Faults a real run meets, injected on purpose.

Non-finite training: a step whose loss or gradient norm is inf/nan stops the run (exit 1,
one line naming the step and the last good checkpoint, nothing of the bad state saved) or,
with --on-nonfinite skip, is skipped without touching the weights, until --max-skipped-steps
in a row stop it; fp16's scaler stops when its scale falls below the minimum; a checkpoint
is never written with a non-finite value. NaN is injected where a real fault would put it:
into the reduced gradients, the loss, or a weight.

Processes that stop: SIGTERM (to one process, or to one rank of a torchrun job) stops
training after the current step with a checkpoint, and the resumed run continues the
uninterrupted one exactly; `kill -9` in the middle of a save leaves the previous checkpoint
loadable; a stopped (SIGSTOP) or killed rank ends the job within --distributed-timeout-minutes
with one line from the rank that waited; a resumed run's --metrics holds each step once.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import flags
import generate
import metrics
import parallel
import train
from conftest import FAST, LAYOUT, ROOT, main_job, one_line_error, train_job

ARGV = ["--model", "llama", *FAST, "--precision", "fp32"]


def poison_gradients(monkeypatch, bad_steps):
    """NaN in one reduced gradient (after DataParallel.finish, before the scaler and the
    clipping) at these step indices (0-based, counted by finish calls in this run)."""
    real, calls = parallel.DataParallel.finish, []

    def finish(self):
        real(self)
        if len(calls) in bad_steps:
            self.buckets[0].grad_shard[0] = float("nan")
        calls.append(1)
    monkeypatch.setattr(parallel.DataParallel, "finish", finish)


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_nonfinite_gradient_stops_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path):
    poison_gradients(monkeypatch, {4})  # the record of step 5; checkpoints at 2 and 4
    save = tmp_path / "ckpt"
    code, err = main_job([*ARGV, "--save", str(save), "--save-every", "2",
                          "--metrics", str(tmp_path / "m.jsonl")])
    line = one_line(err)
    assert code == 1
    assert "step 5:" in line and str(save / "step_00000004") in line, line
    assert checkpoint.complete_steps(str(save)) == [2, 4]  # nothing at 6, 10 or of the bad step
    monkeypatch.undo()
    records, _ = train_job([*ARGV, "--steps", "6", "--load", str(save / "step_00000004"),
                            "--save", str(tmp_path / "again")])
    assert [r["step"] for r in records] == [5, 6] and all(math.isfinite(r["loss"]) for r in records)


def test_nonfinite_loss_stops_without_a_checkpoint(monkeypatch):
    real = train.forward_backward

    def forward_backward(run, batch_rows, forward_only=False):
        loss = real(run, batch_rows, forward_only)
        return float("inf") if not forward_only and run.optimizer.steps == 2 else loss
    monkeypatch.setattr(train, "forward_backward", forward_backward)
    code, err = main_job(ARGV)
    line = one_line(err)
    assert code == 1 and "step 3:" in line and "no checkpoint was saved" in line, line


def test_enormous_learning_rate_stops(tmp_path):
    save = tmp_path / "ckpt"
    code, err = main_job([*ARGV, "--lr", "1e30", "--warmup-steps", "0", "--save", str(save),
                          "--save-every", "1"])
    line = one_line(err)
    assert code == 1 and "non-finite" in line, line
    step = int(line.split("step ")[1].split(":")[0])
    assert checkpoint.complete_steps(str(save)) == list(range(1, step))
    assert (f"last good checkpoint: {save / checkpoint.step_dir_name(step - 1)}" in line if step > 1
            else "no checkpoint was saved" in line), line


def test_skip_leaves_the_weights_and_recovers(monkeypatch):
    poison_gradients(monkeypatch, {3, 4})
    real_step, weights = train.train_step, {}

    def train_step(run, step):
        before = [p.detach().clone() for m in run.modules for p in m.parameters()]
        record = real_step(run, step)
        after = [p.detach().clone() for m in run.modules for p in m.parameters()]
        weights[step + 1] = all(torch.equal(a, b) for a, b in zip(before, after))
        return record
    monkeypatch.setattr(train, "train_step", train_step)
    records, out = train_job([*ARGV, "--on-nonfinite", "skip"])
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["step"] for r in records if r.get("skipped")] == [4, 5]
    assert weights == {s: s in (4, 5) for s in range(1, 11)}  # unchanged exactly when skipped
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records[5:])
    assert records[-1]["loss"] < records[0]["loss"]
    assert "step 5: non-finite" in out and "(2 in a row)" in out
    assert [r["lr"] for r in records] == [train.lr_at(s, flags.parse_args(ARGV)) for s in range(10)]


def test_max_skipped_steps_in_a_row_stop(monkeypatch, tmp_path):
    poison_gradients(monkeypatch, {2, 4, 5, 6})  # 3 skipped, a good step, then 3 in a row
    code, err = main_job([*ARGV, "--on-nonfinite", "skip", "--max-skipped-steps", "3",
                          "--save", str(tmp_path / "ckpt"), "--save-every", "4"])
    line = one_line(err)
    assert code == 1 and "step 7:" in line and "3 consecutive" in line, line
    assert f"last good checkpoint: {tmp_path / 'ckpt' / 'step_00000004'}" in line, line


def test_fp16_loss_scale_below_the_minimum_stops(monkeypatch):
    poison_gradients(monkeypatch, set(range(100)))
    code, err = main_job([*ARGV[:-2], "--precision", "fp16", "--initial-loss-scale", "4"])
    line = one_line(err)
    # Overflows halve 4 -> 2 -> 1 (skipped, going on) -> 0.5 (< MIN_LOSS_SCALE): stop at step 3.
    assert code == 1 and "step 3:" in line and "loss scale 0.5" in line, line


def test_a_checkpoint_is_never_written_with_a_nonfinite_weight(monkeypatch, tmp_path):
    real = train.train_step

    def train_step(run, step):
        record = real(run, step)
        if step == 3:  # a NaN the step's checks do not see (say, a bit flip after the update)
            with torch.no_grad():
                next(run.modules[0].parameters()).view(-1)[0] = float("nan")
        return record
    monkeypatch.setattr(train, "train_step", train_step)
    save = tmp_path / "ckpt"
    code, err = main_job([*ARGV, "--save", str(save), "--save-every", "2"])
    line = one_line(err)
    assert code == 1 and "step 4:" in line and "refusing to save" in line, line
    assert checkpoint.complete_steps(str(save)) == [2]
    assert str(save / "step_00000002") in line


# ----------------------------------------------------------------------------
# Signals, killed and stopped processes
# ----------------------------------------------------------------------------

@pytest.fixture
def start(tmp_path):
    """start(argv, nproc=1, python=("train.py",)) launches train.py (or those python
    arguments) as a user does, in the background: (Popen, the files of its stdout and
    stderr). Whatever is still running when the test ends is killed."""
    procs = []

    def launch(argv, nproc=1, python=("train.py",)):
        launcher = [sys.executable, *python] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *python]
        out, err = tmp_path / f"out-{len(procs)}", tmp_path / f"err-{len(procs)}"
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(subprocess.Popen(launcher + argv, cwd=ROOT, stdout=o, stderr=e,
                                          start_new_session=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}))
        return procs[-1], out, err
    yield launch
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finish(proc, timeout=120):
    """Wait for a launched job: its exit status."""
    return proc.wait(timeout=timeout)


def wait_for(condition, timeout=60, what="a condition"):
    start_time = time.monotonic()
    while not condition():
        assert time.monotonic() - start_time < timeout, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def steps_written(metrics_file):
    return len(metrics.read_metrics(metrics_file)) if os.path.exists(metrics_file) else 0


def worker(torchrun, rank):
    """The pid of torchrun's worker process of this rank (its child with RANK=rank)."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if parent == torchrun.pid and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


def test_sigterm_saves_and_the_resumed_run_equals_the_uninterrupted_one(start, tmp_path):
    argv = ["--model", "llama", *FAST, "--precision", "fp32", "--steps", "60", "--log-every", "100"]
    save, metrics_file = tmp_path / "ckpt", tmp_path / "m.jsonl"
    job = [*argv, "--save", str(save), "--metrics", str(metrics_file)]
    proc, out, err = start(job)
    wait_for(lambda: steps_written(metrics_file) >= 1, what="the first step")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0, err.read_text()
    stopped = re.search(r"stopped by SIGTERM after step (\d+)/60: saved (\S+); to resume, run the "
                        r"same command with --load (\S+)", out.read_text())
    assert stopped, out.read_text() + err.read_text()
    step = int(stopped[1])
    assert step < 60 and checkpoint.complete_steps(str(save)) == [step]
    assert stopped[2] == str(save / checkpoint.step_dir_name(step)) and stopped[3] == str(save)
    assert "Traceback" not in err.read_text()

    proc, out, err = start([*job, "--load", str(save)])  # the same command, resumed
    assert finish(proc) == 0, err.read_text()
    assert checkpoint.complete_steps(str(save)) == [step, 60]
    resumed = metrics.read_metrics(metrics_file)
    proc, _, err = start([*argv, "--metrics", str(tmp_path / "whole.jsonl")])
    assert finish(proc) == 0, err.read_text()
    whole = metrics.read_metrics(tmp_path / "whole.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 61))  # each step once
    for a, b in zip(resumed, whole):  # step for step, exactly
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"]) == (b["step"], b["loss"], b["grad_norm"], b["lr"])


def test_a_second_run_on_the_same_save_root_stops_naming_the_first(start, tmp_path, capsys):
    """Two runs saving into one root: the second stops at once, naming the first (it would
    otherwise remove the first's save in progress as a crash's leftover); once the first
    ended (here by SIGTERM, saving), the root is free again."""
    save, metrics_file = tmp_path / "ckpt", tmp_path / "m.jsonl"
    first = ["--model", "llama", *FAST, "--steps", "400", "--log-every", "1000", "--save", str(save)]
    proc, _, err = start([*first, "--metrics", str(metrics_file)])
    wait_for(lambda: steps_written(metrics_file) >= 1, what="the first run's first step")
    line = one_line_error(capsys, [*ARGV, "--steps", "2", "--save", str(save)])
    assert f"--save {save} is in use by another run (pid {proc.pid} on " in line
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0, err.read_text()
    (saved,) = checkpoint.complete_steps(str(save))
    records, _ = train_job([*ARGV, "--steps", str(saved + 1), "--save", str(save), "--load", str(save)])
    assert [r["step"] for r in records] == [saved + 1]


def test_a_save_root_holds_the_users_files_beside_ours(tmp_path, capsys):
    """A copy of a step under another name, a step_latest link, an incomplete step
    directory at a future step (a copy cut short): --load and --save go on around them,
    the incomplete one removed when that step is saved; --save inside a step directory is
    refused (it would nest checkpoints and start from step 0)."""
    save = tmp_path / "ckpt"
    train_job([*ARGV, "--steps", "1", "--save", str(save)])
    step_1 = save / checkpoint.step_dir_name(1)
    shutil.copytree(step_1, save / (step_1.name + ".bak"))
    os.symlink(step_1, save / "step_latest")
    (save / checkpoint.step_dir_name(2)).mkdir()  # incomplete: no index.json
    (save / checkpoint.step_dir_name(2) / "shard-00000.safetensors").write_bytes(b"cut short")
    records, out = train_job([*ARGV, "--steps", "3", "--save", str(save), "--save-every", "1", "--load", str(save)])
    assert "resumed from" in out and [r["step"] for r in records] == [2, 3]
    assert checkpoint.complete_steps(str(save)) == [1, 2, 3]
    assert (save / "step_latest").is_symlink() and (save / (step_1.name + ".bak") / "index.json").is_file()
    for inside in (step_1, step_1 / "more"):
        line = one_line_error(capsys, [*ARGV, "--steps", "3", "--load", str(step_1), "--save", str(inside)])
        assert f"is inside the checkpoint {step_1}" in line


def _signal_during(monkeypatch, module, name, signum, times=1):
    """Replace module.name by itself preceded, its first `times` calls, by a real signal
    to this process (delivered at once: the handler runs before the call goes on)."""
    real, calls = getattr(module, name), []

    def with_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, with_signal)


@pytest.mark.parametrize("phase,signum,expected", [
    ("load_data", signal.SIGTERM, "stopped by SIGTERM while setting up; nothing was saved"),
    ("sample_report", signal.SIGINT, "stopped by SIGINT while finishing; {save}/step_00000002 is saved"),
    ("summary", signal.SIGUSR1, "stopped by SIGUSR1 while finishing; {save}/step_00000002 is saved"),
])
def test_a_stop_signal_outside_the_loop_is_one_line_and_exit_0(monkeypatch, capsys, tmp_path, phase, signum,
                                                                expected):
    """Start-up, the summary and the end-of-run sample: a stop signal there ends the run
    cleanly (one line, status 0, the checkpoint saved before it intact), no traceback."""
    save = tmp_path / "ckpt"
    _signal_during(monkeypatch, train, phase, signum)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*ARGV, "--steps", "2", "--sample-tokens", "4", "--save", str(save)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 0 and err[-1] == expected.format(save=save), err
    assert not any("Traceback" in line for line in err)
    assert checkpoint.complete_steps(str(save)) == ([] if phase == "load_data" else [2])


def test_a_burst_of_stop_signals_stops_once(monkeypatch, capsys, tmp_path):
    """SIGTERM in a step, then again during the save it causes and while the run closes:
    one stop, saved, exit 0."""
    save = tmp_path / "ckpt"
    _signal_during(monkeypatch, train, "train_step", signal.SIGTERM)
    _signal_during(monkeypatch, checkpoint, "save", signal.SIGTERM)
    _signal_during(monkeypatch, metrics.Logger, "close", signal.SIGTERM)
    train.main([*ARGV, "--steps", "5", "--save", str(save)])
    out = capsys.readouterr()
    assert out.out.count("stopped by SIGTERM after step 1/5: saved") == 1 and "stopped" not in out.err
    assert checkpoint.complete_steps(str(save)) == [1]


def test_generation_stopped_by_a_signal_is_one_line(monkeypatch, capsys, tmp_path):
    save = tmp_path / "ckpt"
    train_job([*ARGV, "--steps", "1", "--save", str(save)])
    _signal_during(monkeypatch, generate, "generate", signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--load", str(save), "--prompt", "a", "--max-new-tokens", "3"])
    assert exit_info.value.code == 0 and capsys.readouterr().err.strip() == "stopped by SIGINT"


def test_workers_stop_when_their_torchrun_agent_is_killed(start, tmp_path):
    """kill -9 of the torchrun agent leaves its workers to init: they notice before their
    next step and stop (one line each), instead of training and saving on, orphaned."""
    metrics_file = tmp_path / "m.jsonl"
    proc, _, _ = start(["--model", "llama", *LAYOUT, "--steps", "100000", "--log-every", "100000",
                        "--metrics", str(metrics_file)], nproc=2)
    wait_for(lambda: steps_written(metrics_file) >= 1, what="the first step")
    workers = [worker(proc, rank) for rank in (0, 1)]
    os.kill(proc.pid, signal.SIGKILL)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in workers), timeout=30,
             what="the orphaned workers to stop")


def _alive(pid):
    """Running, not a zombie left for init to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(start, tmp_path):
    argv = ["--model", "llama", *LAYOUT, "--steps", "400", "--log-every", "1000"]
    save, metrics_file = tmp_path / "ckpt", tmp_path / "m.jsonl"
    job = [*argv, "--tp", "2", "--save", str(save), "--metrics", str(metrics_file)]
    proc, out, err = start(job, nproc=2)
    wait_for(lambda: steps_written(metrics_file) >= 1, what="the first step")
    os.kill(worker(proc, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns it from the agreement
    assert finish(proc) == 0, err.read_text()
    step = int(re.search(r"stopped by SIGTERM after step (\d+)/400: saved", out.read_text())[1])
    assert step < 400 and checkpoint.complete_steps(str(save)) == [step]  # both ranks' shards in it
    records, _ = train_job([*argv, "--steps", str(step + 2), "--load", str(save),
                            "--save", str(tmp_path / "again")])
    assert [r["step"] for r in records] == [step + 1, step + 2]
    assert [r["step"] for r in metrics.read_metrics(metrics_file)] == list(range(1, step + 1))


KILL_DURING_SAVE = """
import os, signal, sys
import checkpoint, train
real, saves = checkpoint._save_file, []
def save_file(tensors, path, sums):
    real(tensors, path, sums)
    if "step_00000004" in path:  # the second save: its first file is written, then kill -9
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint._save_file = save_file
train.main(sys.argv[1:])
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint(start, tmp_path, capsys):
    save, metrics_file = tmp_path / "ckpt", tmp_path / "m.jsonl"
    job = ["--model", "llama", *FAST, "--precision", "fp32", "--steps", "6", "--save", str(save),
           "--save-every", "2", "--metrics", str(metrics_file)]
    proc, _, err = start(job, python=("-c", KILL_DURING_SAVE))
    assert finish(proc) == -signal.SIGKILL, err.read_text()
    assert checkpoint.complete_steps(str(save)) == [2]
    assert os.path.isdir(save / ".tmp-step_00000004")  # what the killed save left
    assert [r["step"] for r in metrics.read_metrics(metrics_file)] == [1, 2, 3, 4]
    code, _ = main_job([*job, "--load", str(save)])  # the same command resumes at step 2
    assert code == 0
    assert "removed 2 record(s) after step 2" in capsys.readouterr().out
    assert checkpoint.complete_steps(str(save)) == [2, 4, 6]
    assert not os.path.exists(save / ".tmp-step_00000004")
    assert [r["step"] for r in metrics.read_metrics(metrics_file)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_stopped_or_killed_rank_ends_the_job_within_the_timeout(start, tmp_path, fault):
    timeout_s = 3
    metrics_file = tmp_path / "m.jsonl"
    job = ["--model", "llama", *LAYOUT, "--steps", "100000", "--tp", "2", "--metrics", str(metrics_file),
           "--distributed-timeout-minutes", str(timeout_s / 60), "--save", str(tmp_path / "ckpt"),
           "--save-every", "1"]
    proc, out, err = start(job, nproc=2)
    wait_for(lambda: steps_written(metrics_file) >= 2, what="two steps")
    rank1 = worker(proc, 1)
    os.kill(rank1, getattr(signal, fault))
    t0 = time.monotonic()
    wait_for(lambda: "error: rank 0" in err.read_text(), timeout=timeout_s + 30, what="rank 0's error")
    waited = time.monotonic() - t0
    if fault == "SIGSTOP":
        os.kill(rank1, signal.SIGCONT)  # (so that torchrun can end it)
    assert finish(proc) != 0
    line = next(x for x in err.read_text().splitlines() if x.startswith("error: rank 0"))
    expected = ("no answer from the other ranks within the timeout" if fault == "SIGSTOP"
                else "another rank closed its connection")
    assert expected in line and "--distributed-timeout-minutes 0.05" in line, line
    assert re.search(r"rank 0, (step \d+|saving step \d+): ", line), line
    assert "last checkpoint: " + str(tmp_path / "ckpt" / "step_") in line, line
    assert waited < (timeout_s + 10 if fault == "SIGSTOP" else 10), f"{fault}: {waited:.1f} s"
    print(f"{fault}: rank 0 exited {waited:.1f} s after the fault: {line}")


def test_a_requeued_command_starts_then_resumes(capsys, tmp_path):
    """`--load DIR --save DIR`: the same command starts a job (nothing in DIR yet) and
    resumes it after an interruption (here: a shorter first run)."""
    ckpt = str(tmp_path / "ckpt")
    argv = ["--model", "llama", *FAST, "--precision", "fp32", "--load", ckpt, "--save", ckpt]
    records, out = train_job([*argv, "--steps", "3"])
    assert [r["step"] for r in records] == [1, 2, 3] and "no checkpoint there yet" in out
    records, out = train_job([*argv, "--steps", "5"])
    assert [r["step"] for r in records] == [4, 5] and "resumed from" in out
    assert "at step 5 and --steps is 5: nothing to train" in one_line_error(capsys, [*argv, "--steps", "5"])


def test_metrics_of_a_resumed_run_hold_each_step_once(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [{"run": {"start_step": 0}}, *({"step": s} for s in (1, 2, 3)),  # an earlier run
             {"run": {"start_step": 0}}, *({"step": s} for s in (1, 2)),     # this run's start
             {"run": {"start_step": 2}}, *({"step": s} for s in (3, 4, 5))]  # resumed at 2
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo')  # cut short
    assert metrics.trim_metrics(path, 3) == 3  # 4, 5 and the cut line
    assert path.read_text().splitlines() == [json.dumps(r) for r in lines[:-2]]
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2, 3, 1, 2, 3]
    assert metrics.trim_metrics(path, 3) == 0


@pytest.mark.parametrize("message,reason", [
    ("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to "
     "complete", "within the timeout"),
    ("Application timeout caused pair closure", "within the timeout"),
    ("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:28847: Connection reset by peer",
     "closed its connection"),
    ("Connection closed by peer [127.0.0.1]:5423", "closed its connection"),
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)", None),
])
def test_what_gloo_says_when_a_peer_fails(message, reason):
    """Each text gloo was seen to raise when a peer died or stopped (the second, rarely,
    instead of the first: a stopped peer's collective, under load) means a peer failure;
    anything else stays the error it is."""
    got = parallel.peer_failure(RuntimeError(message))
    assert got is None if reason is None else reason in got
