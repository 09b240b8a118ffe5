"""Tensor parallelism (+ sequence parallelism) and ZeRO-1 against the one-process run.

Each layout trains 10 steps under torchrun (gloo); its per-step losses must equal the
one-process losses, and its checkpoint after step 1, loaded into a one-process model
(which reassembles every tp shard), must equal the one-process parameters."""
import pytest
import torch

import checkpoint
import models
import parallel
from test_train import FAST, assert_same_curve, losses, one_line_error, run


def trained(tmp_path, model, extra, nproc, tag):
    """Run 10 steps, checkpointing each; return (losses, parameters after step 1)."""
    metrics, ckpt = tmp_path / f"{tag}.jsonl", tmp_path / tag
    # A larger Adam eps: the first update, lr * g / (|g| + eps), is then no longer the sign
    # of g, which would turn rounding-level differences in tiny gradients into lr-sized ones.
    run(["--model", model, *FAST, *extra, "--metrics", str(metrics), "--save", str(ckpt),
         "--save-every", "1", "--adam-eps", "1e-4"], nproc=nproc)
    step_dir = ckpt / checkpoint.step_dir_name(1)
    meta = checkpoint.read_meta(step_dir)
    module = models.build(model, models.config_from_dict(model, meta["config"]), "cpu", seed=0)
    checkpoint.load(str(step_dir), module, None, parallel.Layout())
    return losses(metrics), {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_same_params(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


LAYOUTS = [  # (processes, train.py flags)
    (2, ["--tp", "2"]),
    (2, ["--tp", "2", "--no-sp"]),
    (4, ["--tp", "4"]),
    (4, ["--tp", "4", "--no-sp", "--no-zero1"]),
    (4, ["--tp", "2"]),                               # tp=2 x dp=2, sp, ZeRO-1
    (4, ["--tp", "2", "--no-sp", "--no-zero1"]),
    (4, ["--tp", "2", "--no-zero1"]),
    (4, ["--tp", "2", "--no-sp"]),
]


@pytest.mark.parametrize("model,overrides,layouts", [
    # 4 KV heads so that tp=4 divides them; tied embeddings + QKV bias + QK-norm exercise
    # every sharded and partial-gradient parameter kind of llama.py.
    ("llama", ["--set", "n_kv_heads=4", "--set", "tie_embeddings=true", "--set", "qkv_bias=true",
               "--set", "qk_norm=true"], LAYOUTS),
    ("llama", ["--set", "n_kv_heads=2"], [(2, ["--tp", "2"]), (4, ["--tp", "2", "--no-sp"])]),  # GQA
    ("gpt", [], LAYOUTS[::2]),
])
def test_tensor_parallel_equals_one_process(tmp_path, model, overrides, layouts):
    expected_losses, expected_params = trained(tmp_path, model, overrides, 1, "reference")
    for nproc, flags in layouts:
        tag = "-".join([str(nproc), *flags]).replace("--", "")
        got_losses, got_params = trained(tmp_path, model, overrides + flags, nproc, tag)
        assert_same_curve(got_losses, expected_losses)
        assert_same_params(got_params, expected_params)


def test_zero1_with_plain_data_parallel(tmp_path):
    expected_losses, expected_params = trained(tmp_path, "llama", [], 1, "reference")
    got_losses, got_params = trained(tmp_path, "llama", ["--zero1"], 2, "zero1-dp2")
    assert_same_curve(got_losses, expected_losses)
    assert_same_params(got_params, expected_params)


def test_layout_that_does_not_divide_is_one_line():
    """End to end under torchrun: each rank stops with the same one-line message."""
    proc = run(["--model", "llama", *FAST, "--tp", "2", "--set", "n_heads=3", "--set", "n_kv_heads=3"],
                nproc=2, expect_ok=False)
    assert proc.returncode != 0
    assert "error: n_heads=3 is not divisible by tp=2" in proc.stderr
    # torchrun reports the failed workers itself; our processes print no traceback.
    assert 'train.py", line' not in proc.stderr and 'parallel.py", line' not in proc.stderr


@pytest.mark.parametrize("model,overrides,message", [
    ("llama", dict(n_heads=6, n_kv_heads=6), "n_heads=6 is not divisible by tp=4"),
    ("llama", dict(n_kv_heads=2), "n_kv_heads=2 is not divisible by tp=4"),
    ("llama", dict(n_kv_heads=4, ffn_dim=130), "ffn_dim=130 is not divisible by tp=4"),
    ("gpt", dict(n_heads=2), "n_heads=2 is not divisible by tp=4"),
])
def test_model_refuses_a_layout_that_does_not_divide(model, overrides, message):
    cfg = models.make_config(model, "test", [f"{k}={v}" for k, v in overrides.items()])
    with pytest.raises(parallel.UsageError, match=message):
        models.MODELS[model][2](cfg, parallel.Layout(tp=4))


def test_sequence_not_divisible_by_tp_is_one_line(capsys):
    # One process cannot run tp=2; the layout check comes first, so check that message.
    assert "not divisible by tp*cp*pp" in one_line_error(capsys, ["--model", "llama", *FAST, "--tp", "2"])
