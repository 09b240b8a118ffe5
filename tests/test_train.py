"""train.py end to end: learning, resume, precision (bf16, fp16 and its loss scaler),
the pieces every layout test relies on checked against independent oracles (AdamW,
the learning-rate schedule, clipping), and damaged checkpoints (the table of bad input is
tests/test_bad_input.py)."""
import gc
import math
import os
import re
import types

import pytest
import torch
from safetensors import safe_open

import checkpoint
import flags
import metrics
import models
import parallel
import train
from conftest import (FAST, FP16_GRAD_NORM, FP16_LOSS, LAYOUT, assert_same_run, assert_within_bf16, one_line_error,
                      one_process, run, train_job, train_on, without_flags)


def test_loss_falls_on_builtin_corpus(tmp_path):
    metrics_file = tmp_path / "m.jsonl"
    proc = run(["--model", "llama", *FAST, "--steps", "40", "--metrics", str(metrics_file),
                "--sample-tokens", "20"])
    records = metrics.read_metrics(metrics_file)
    assert records[-1]["loss"] < 0.75 * records[0]["loss"]
    assert "---- sample ----" in proc.stdout
    record = records[-1]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "val_loss"} <= set(record)
    # The summary's speed leaves out step 1 (on a GPU: compiling and autotuning), shown apart.
    done = re.search(r"^done: .*\| ([\d,]+) tok/s, mfu [\d.]+% of cpu matmul \(after step 1, which "
                     r"took ([\d.]+) s\)", proc.stdout, re.M)
    assert done, proc.stdout[-1000:]
    timed = records[1:]
    tokens_per_s = timed[0]["tokens_per_s"] * timed[0]["step_time"] * len(timed) / sum(r["step_time"] for r in timed)
    assert int(done[1].replace(",", "")) == round(tokens_per_s)
    assert float(done[2]) == round(records[0]["step_time"], 2)


def test_torchrun_equals_one_process(tmp_path):
    """The way users launch it: torchrun, two ranks (tp=2), the process group made by
    train.py from torchrun's environment and torn down at the end."""
    argv = ["--model", "llama", *LAYOUT, "--tp", "2", "--metrics", str(tmp_path / "m.jsonl")]
    proc = run(argv, nproc=2)
    assert "done: 10 steps in" in proc.stdout
    records = metrics.read_metrics(tmp_path / "m.jsonl")
    assert_same_run(records, one_process(["--model", "llama", *LAYOUT]))


def test_training_lets_go_of_the_model():
    """DataParallel's gradient hooks form a cycle the garbage collector may not see (autograd
    holds them in C++); train() closes it, so the model and, under torchrun, its process
    groups are torn down while the interpreter still runs, not during its exit."""
    def alive():  # other tests in this process may hold their own models
        gc.collect()
        return sum(isinstance(o, (parallel.DataParallel, torch.nn.Parameter)) for o in gc.get_objects())
    before = alive()
    train.train(flags.parse_args(["--model", "llama", *FAST, "--steps", "2"]))
    assert alive() == before


def test_training_lets_go_of_the_model_after_an_exception(monkeypatch, tmp_path):
    """An exception in the loop still removes the gradient hooks and closes the metrics
    file (its lines so far are on disk)."""
    def alive():
        gc.collect()
        return sum(isinstance(o, parallel.DataParallel) for o in gc.get_objects())
    before, real_step = alive(), train.train_step

    def failing_step(run, step):
        if step == 1:
            raise RuntimeError("boom")
        return real_step(run, step)
    monkeypatch.setattr(train, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        train.train(flags.parse_args(["--model", "llama", *FAST, "--metrics", str(tmp_path / "m.jsonl")]))
    assert alive() == before
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "m.jsonl")] == [1]


def test_resume_equals_uninterrupted_run(ranks, tmp_path):
    argv = ["--model", "llama", *LAYOUT]
    full = one_process(argv)
    ckpt = tmp_path / "ckpt"
    train_job(argv + ["--save", str(ckpt), "--save-every", "4"])
    # Resume from step 4 (not the newest) into a new save root.
    resumed, _ = train_job(argv + ["--load", str(ckpt / "step_00000004"), "--save", str(tmp_path / "ckpt2")])
    assert_same_run(resumed, full[4:], rel=1e-6)
    # Resume under dp=2 from the dp=1 checkpoint: the layout-free index at work.
    resumed, _ = train_on(ranks, 2, argv + ["--load", str(ckpt / "step_00000008")])
    assert_same_run(resumed, full[8:])


def test_resume_with_more_steps_keeps_the_saved_schedule(tmp_path):
    """A run of 10 steps (--lr 3e-3, warmup 2, cosine over its 10 steps to min_lr_ratio 0.1)
    resumed with --steps 14 trains on at the schedule's final rate, 0.1 x 3e-3, instead of
    stretching the cosine over 14 steps (which would raise the rate again); a flag given
    on resume changes the schedule from there."""
    argv = ["--model", "llama", *FAST, "--min-lr-ratio", "0.1"]  # FAST: 10 steps, warmup 2, lr 3e-3
    train_job(argv + ["--save", str(tmp_path / "ckpt")])
    resumed, out = train_job(argv + ["--steps", "14", "--load", str(tmp_path / "ckpt")])
    assert [r["step"] for r in resumed] == [11, 12, 13, 14]
    assert [r["lr"] for r in resumed] == pytest.approx([3e-4] * 4, rel=1e-12)
    assert "learning-rate schedule kept from the checkpoint: --lr-decay-steps 10" in out
    # Given, --lr-decay-steps 20 continues the cosine of a 20-step decay from step 10 on.
    changed, out = train_job(argv + ["--steps", "14", "--lr-decay-steps", "20", "--load", str(tmp_path / "ckpt")])
    cosine = [3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 18)) for s in range(10, 14)]
    assert [r["lr"] for r in changed] == pytest.approx(cosine, rel=1e-12)
    assert "learning-rate schedule changed: --lr-decay-steps 20 (was 10)" in out


def test_resume_keeps_the_saved_seed_and_its_own_metrics_lineage(tmp_path):
    """The batches of a step depend on the seed: a resume without --seed continues the
    saved run's order (given, another seed is said, not silent). Resuming trims from the
    --metrics file only the records of its own run after the checkpoint, not those of
    another run appended to the same file since."""
    metrics_file = str(tmp_path / "m.jsonl")
    argv = ["--model", "llama", *FAST, "--steps", "4", "--metrics", metrics_file]
    full, _ = train_job(argv + ["--seed", "5", "--save", str(tmp_path / "a"), "--save-every", "2"])
    other, _ = train_job(argv + ["--steps", "3"])  # another run, appended
    resumed, out = train_job(argv + ["--load", str(tmp_path / "a" / "step_00000002")])
    assert_same_run(resumed, full[2:], rel=1e-6)
    assert "--seed 5 kept from the checkpoint" in out
    steps = [r["step"] for r in metrics.read_metrics(metrics_file)]
    assert steps == [1, 2, 1, 2, 3, 3, 4]  # run a's 3 and 4 trained again; the other run's kept
    reseeded, out = train_job(argv + ["--seed", "7", "--load", str(tmp_path / "a" / "step_00000002")])
    assert "--seed 7 (was 5): the batches from here follow another order" in out
    assert reseeded[0]["loss"] != resumed[0]["loss"]


# ----------------------------------------------------------------------------
# Independent oracles for what every layout test shares on both sides
# ----------------------------------------------------------------------------

def test_learning_rate_schedule_closed_form():
    """Linear warmup to the peak, then a half cosine down to min_lr_ratio x peak, then flat."""
    args = flags.parse_args(["--model", "llama", "--lr", "2.0", "--warmup-steps", "10",
                             "--steps", "200", "--lr-decay-steps", "110", "--min-lr-ratio", "0.1"])
    expected = {0: 0.2, 4: 1.0, 9: 2.0, 10: 2.0, 60: 0.2 + 1.8 * 0.5, 35: 0.2 + 1.8 * (2 + 2 ** 0.5) / 4,
                85: 0.2 + 1.8 * (2 - 2 ** 0.5) / 4, 110: 0.2, 199: 0.2}
    for step, lr in expected.items():
        assert train.lr_at(step, args) == pytest.approx(lr, rel=1e-12, abs=1e-12), step


def _model_with_gradients(data_parallel=False):
    """The test llama after one backward; with data_parallel, wrapped (one process) first."""
    model = models.build("llama", models.make_config("llama", "test"), "cpu", seed=0)
    ddp = parallel.DataParallel(model, parallel.Layout()) if data_parallel else None
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    (model(ids, labels=ids) / ids.numel()).backward()
    return model, ddp


# Weight decay applies to the weight matrices of attention, MLP and the output layer; not
# to the embedding, the norms' gains or biases (written out here, not derived).
DECAYED = re.compile(r"layers\.\d+\.(attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight|lm_head\.weight")


def test_adamw_matches_torch():
    """Five steps of our AdamW (flat buffers) against torch.optim.AdamW with the decayed
    parameters listed by hand: the same parameters."""
    (ours, ddp), (theirs, _) = _model_with_gradients(data_parallel=True), _model_with_gradients()
    names = [n for n, _ in theirs.named_parameters()]
    assert {n for n in names if DECAYED.fullmatch(n)} >= {"lm_head.weight", "layers.0.attn.q_proj.weight"}
    optimizer = parallel.AdamW(ddp, lr=1e-2, weight_decay=0.1, eps=1e-6)
    params = dict(theirs.named_parameters())
    reference = torch.optim.AdamW(
        [{"params": [params[n] for n in names if DECAYED.fullmatch(n)], "weight_decay": 0.1},
         {"params": [params[n] for n in names if not DECAYED.fullmatch(n)], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    for step in range(5):
        for model in (ours, theirs):
            for p in model.parameters():
                p.grad.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        optimizer.step()
        reference.step()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, params[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    ddp.close()


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clipping_matches_torch(max_norm):
    (ours, ddp), (theirs, _) = _model_with_gradients(data_parallel=True), _model_with_gradients()
    norm = parallel.clip_grad_norm(ddp, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    ddp.close()


# ----------------------------------------------------------------------------
# bf16 and fp16 on the CPU
# ----------------------------------------------------------------------------

def test_bf16_trains_like_fp32_and_the_same_under_dp(ranks):
    """bf16 autocast: the curve stays within bf16 rounding of fp32's (conftest.BF16_LOSS)
    and still learns; dp=2 equals one process running the same micro-batches (4 rows: bf16
    rounding depends on the shapes a matmul sees, so the comparison keeps them) up to bf16
    rounding: mostly bit-equal, but a CPU's kernels may split a matmul's sum by its thread
    count (measured: 1.3e-4 in the gradient norm at OMP_NUM_THREADS=1 with oneDNN's AVX2)."""
    argv = ["--model", "llama", *FAST, "--precision", "bf16"]
    bf16, fp32 = one_process(argv), one_process(["--model", "llama", *FAST])
    assert_within_bf16(bf16, fp32, keys=("loss", "val_loss"))
    assert bf16[-1]["loss"] < 0.8 * bf16[0]["loss"]
    got, _ = train_on(ranks, 2, argv)
    assert_within_bf16(got, one_process(argv + ["--micro-batch-size", "4"]))


# bf16 layouts: (flags of both runs, flags of the two-process run only). dp and pp run the
# one-process reference's micro-batches (4 rows: bf16 rounding depends on a matmul's shape).
BF16 = ["--model", "llama", *FAST, "--precision", "bf16", "--clip-grad", "0"]
BF16_LAYOUTS = [
    (BF16, ["--tp", "2"]),
    (BF16, ["--tp", "2", "--no-sp"]),
    (BF16 + ["--micro-batch-size", "4"], ["--pp", "2"]),
    (BF16 + ["--micro-batch-size", "4"], []),  # dp = 2, ZeRO-1
    (BF16 + ["--micro-batch-size", "4"], ["--no-zero1"]),
    (BF16, ["--cp", "2"]),
    ([a if a != "llama" else "mixtral" for a in BF16] + ["--micro-batch-size", "4"], ["--ep", "2"]),
    (BF16 + ["--micro-batch-size", "4", "--grad-dtype", "model"], []),  # gradients reduced in bf16
    (BF16 + ["--micro-batch-size", "4", "--fp32-residual"], ["--pp", "2"]),
]


def test_bf16_layouts_stay_within_bf16_rounding_of_one_process(ranks):
    """Mixed precision (bf16 parameters, fp32 main weights in the optimizer) under tp (sp and
    not: the linears' inputs cast once, the gather moving bf16), pp (stages sending bf16, or
    fp32 with --fp32-residual), dp with and without ZeRO-1, cp and Mixtral's ep: within bf16
    rounding of one process (conftest.BF16_LOSS, BF16_GRAD_NORM), in the loss and the gradient
    norm."""
    for argv, layout in BF16_LAYOUTS:
        got, _ = train_on(ranks, 2, argv + layout)
        assert_within_bf16(got, one_process(argv))


def test_bf16_resume_is_exact_and_checkpoints_keep_the_fp32_main_weights(tmp_path):
    """A bf16 run saves the optimizer's fp32 main weights (not its bf16 parameters), so a
    resumed run equals the uninterrupted one; its checkpoint resumes under fp32 training,
    and an fp32 checkpoint under bf16."""
    full = one_process(BF16)
    train_job(BF16 + ["--save", str(tmp_path / "bf16"), "--save-every", "5"])
    resumed, _ = train_job(BF16 + ["--load", str(tmp_path / "bf16" / "step_00000005")])
    assert_same_run(resumed, full[5:], rel=1e-6)
    step = checkpoint.resolve(str(tmp_path / "bf16" / "step_00000005"))
    with safe_open(os.path.join(step, "shard-00000.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.0.attn.q_proj.weight")
    assert weight.dtype == torch.float32 and not torch.equal(weight, weight.bfloat16().float())
    fp32 = [a if a != "bf16" else "fp32" for a in BF16]
    as_fp32, _ = train_job(fp32 + ["--load", str(tmp_path / "bf16" / "step_00000005")])
    assert_within_bf16(as_fp32, full[5:], keys=("loss",))
    train_job(fp32 + ["--save", str(tmp_path / "fp32"), "--save-every", "5"])
    as_bf16, _ = train_job(BF16 + ["--load", str(tmp_path / "fp32" / "step_00000005")])
    assert_within_bf16(as_bf16, one_process(fp32)[5:], keys=("loss",))


FP16 = ["--model", "llama", *FAST, "--steps", "12", "--precision", "fp16",
        "--initial-loss-scale", "1e6", "--loss-scale-window", "3"]


def test_cpu_mfu_never_reads_above_one(monkeypatch):
    """A CPU's reference matmul measured while something else held the cores is too slow:
    a step that runs faster raises it, so MFU stays at most 100% (and a GPU's datasheet or
    --peak-tflops stays as given)."""
    monkeypatch.setattr(metrics, "peak_flops", lambda device, args: 1.0)  # (a hopelessly slow reference)
    records, _ = train_job(["--model", "llama", *without_flags(FAST, "--peak-tflops"), "--steps", "3"])
    assert all(0 < r["mfu"] <= 1.0 for r in records) and records[0]["mfu"] == 1.0
    args = types.SimpleNamespace(peak_tflops=2.0)
    assert metrics.cpu_peak_seen(2e12, 5e12, torch.device("cpu"), args) == 2e12


def test_fp16_loss_scaler_skips_halves_and_grows(ranks, tmp_path):
    """Started too high, the scale overflows: those steps are skipped and halve it; then
    every 3 clean steps double it (until it overflows again: the fp16 parameters' gradients
    are fp16). The scale is saved and restored on resume, and dp=2 skips the same steps."""
    records = one_process(FP16)
    skipped = [r["skipped"] for r in records]
    assert skipped[:2] == [True, True] and not all(skipped), skipped
    scale, clean = 1e6, 0
    for r in records:
        if r["skipped"]:
            scale, clean = scale / 2, 0
            assert not math.isfinite(r["grad_norm"])
        else:
            clean += 1
            scale *= 2 if clean % 3 == 0 else 1
        assert r["loss_scale"] == scale, r["step"]
    assert any(b["loss_scale"] > a["loss_scale"] for a, b in zip(records, records[1:]))  # grown back
    assert records[-1]["loss"] < records[0]["loss"]
    ckpt = tmp_path / "ckpt"
    train_job(FP16 + ["--save", str(ckpt), "--save-every", "5"])
    resumed, _ = train_job(FP16 + ["--load", str(ckpt / "step_00000005")])
    assert [r["loss_scale"] for r in resumed] == [r["loss_scale"] for r in records[5:]]
    assert_same_run(resumed, records[5:], keys=("loss",))
    # An overflow depends on the micro-batch (fp16 sums over its tokens), so dp=2 is
    # compared with one process running the same micro-batches of 4 rows.
    got, _ = train_on(ranks, 2, FP16)
    expected = one_process(FP16 + ["--micro-batch-size", "4"])
    assert any(r["skipped"] for r in got)
    assert [(r["skipped"], r["loss_scale"]) for r in got] == [(r["skipped"], r["loss_scale"]) for r in expected]
    assert_same_run(got, expected, rel=FP16_LOSS, keys=("loss", "val_loss"))
    assert_same_run([r for r in got if not r["skipped"]], [r for r in expected if not r["skipped"]],
                    rel=FP16_GRAD_NORM, keys=("grad_norm",))


# ----------------------------------------------------------------------------
# Damaged checkpoints: one line naming the problem, exit status 2 (more in test_bad_input.py)
# ----------------------------------------------------------------------------

def test_checkpoints_are_never_overwritten_or_silently_loaded_when_damaged(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    argv = ["--model", "gpt", *FAST, "--steps", "2", "--save", str(ckpt)]
    train.main(argv)
    saved = (ckpt / "step_00000002" / "shard-00000.safetensors").read_bytes()
    assert "already holds checkpoints" in one_line_error(capsys, argv)
    assert (ckpt / "step_00000002" / "shard-00000.safetensors").read_bytes() == saved
    assert "holds a gpt model; pass --model gpt" in one_line_error(capsys, ["--model", "llama", *FAST, "--load", str(ckpt)])
    shard = ckpt / "step_00000002" / "shard-00000.safetensors"
    shard.write_bytes(saved[: len(saved) // 2])  # truncated, as by a full disk
    assert "damaged" in one_line_error(capsys, ["--model", "gpt", *FAST, "--load", str(ckpt),
                                                "--steps", "3"])


def test_validation_loss_is_measured_on_the_validation_split_alone(tmp_path):
    """A file whose training part is one letter repeated and whose validation part (its
    last 5%) another: after learning to continue the first, the model's loss on the
    validation text is far above its training loss. (Drawn from the training split, the
    validation loss would equal it.)"""
    text = tmp_path / "two-letters.txt"
    text.write_text("a" * 19000 + "b" * 1000)
    records, _ = train_job(["--model", "llama", *FAST, "--steps", "20", "--lr", "1e-2", "--data", str(text)])
    assert records[-1]["loss"] < 0.5
    assert records[-1]["val_loss"] > records[-1]["loss"] + 3
