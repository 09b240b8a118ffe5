"""Non-finite training (issue #14): a step whose loss or gradient norm is inf/nan stops
the run (exit 1, one line naming the step and the last good checkpoint, nothing of the bad
state saved) or, with --on-nonfinite skip, is skipped without touching the weights, until
--max-skipped-steps in a row stop it; fp16's scaler stops when its scale falls below the
minimum; a checkpoint is never written with a non-finite value. NaN is injected where a
real fault would put it: into the reduced gradients, the loss, or a weight."""
import math

import torch

import checkpoint
import parallel
import train
from conftest import FAST, main_job, train_job

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
    assert [r["lr"] for r in records] == [train.lr_at(s, train.parse_args(ARGV)) for s in range(10)]


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
