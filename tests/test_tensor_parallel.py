"""Tensor parallelism (+ sequence parallelism) and ZeRO-1 against the one-process run.

Each layout trains 10 steps: its loss and gradient norm at every step must equal the
one-process run's, and its checkpoint after step 1, loaded into a one-process model
(which reassembles every tp shard), must equal the one-process parameters."""
import pytest
import torch

import checkpoint
import models
import parallel
from conftest import LAYOUT, assert_same_run, one_line_error, one_process, run, train_job, train_on
from errors import UsageError


def parameters_after_step_1(ckpt, model):
    step_dir = ckpt / checkpoint.step_dir_name(1)
    meta = checkpoint.read_meta(step_dir)
    module = models.build(model, models.config_from_dict(model, meta["config"]), "cpu", seed=0)
    checkpoint.load(str(step_dir), module, None, parallel.Layout())
    return {n: p.detach().clone() for n, p in module.named_parameters()}


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
    # GQA; under tp 4 each of the 2 KV heads is held by 2 tp ranks (tp beyond the KV heads) ...
    ("llama", ["--set", "n_kv_heads=2"], [(2, ["--tp", "2"]), (4, ["--tp", "2", "--no-sp"]), (4, ["--tp", "4"])]),
    # ... and here with its bias and the shared K-norm.
    ("llama", ["--set", "n_kv_heads=1", "--set", "qkv_bias=true", "--set", "qk_norm=true"],
     [(2, ["--tp", "2"]), (4, ["--tp", "4", "--no-sp"]), (4, ["--tp", "2", "--no-zero1"])]),
    ("gpt", [], LAYOUTS[::2]),
])
def test_tensor_parallel_equals_one_process(ranks, tmp_path, model, overrides, layouts):
    argv = ["--model", model, *LAYOUT, *overrides, "--save-every", "1"]
    expected, _ = train_job(argv + ["--save", str(tmp_path / "reference")])
    expected_params = parameters_after_step_1(tmp_path / "reference", model)
    for i, (nproc, flags) in enumerate(layouts):
        got, _ = train_on(ranks, nproc, argv + flags + ["--save", str(tmp_path / str(i))])
        assert_same_run(got, expected)
        assert_same_params(parameters_after_step_1(tmp_path / str(i), model), expected_params)


def test_layout_that_does_not_divide_is_one_line():
    """End to end under torchrun: each rank stops with the same one-line message."""
    proc = run(["--model", "llama", *LAYOUT, "--tp", "2", "--set", "n_heads=3", "--set", "n_kv_heads=3",
                "--set", "head_dim=16"],
               nproc=2, expect_ok=False)
    assert proc.returncode != 0
    assert "error: n_heads=3 is not divisible by tp=2" in proc.stderr
    # torchrun reports the failed workers itself; our processes print no traceback.
    assert 'train.py", line' not in proc.stderr and 'parallel.py", line' not in proc.stderr


@pytest.mark.parametrize("model,overrides,message", [
    ("llama", dict(n_heads=6, n_kv_heads=6, head_dim=16), "n_heads=6 is not divisible by tp=4"),
    ("llama", dict(n_heads=12, n_kv_heads=3, head_dim=16), "n_kv_heads=3 and tp=4 do not divide one another"),
    ("llama", dict(n_kv_heads=4, ffn_dim=130), "ffn_dim=130 is not divisible by tp=4"),
    ("gpt", dict(n_heads=2), "n_heads=2 is not divisible by tp=4"),
])
def test_model_refuses_a_layout_that_does_not_divide(model, overrides, message):
    cfg = models.make_config(model, "test", [f"{k}={v}" for k, v in overrides.items()])
    with pytest.raises(UsageError, match=message):
        models.FAMILIES[model].model(cfg, parallel.Layout(tp=4))


def test_tp_larger_than_the_world_is_one_line(capsys):
    assert "not divisible by tp*cp*pp" in one_line_error(capsys, ["--model", "llama", *LAYOUT, "--tp", "2"])


def _train_with_an_obligation_undone(obligation, argv):
    """On a rank: train as a model file that forgot `obligation` would (parallel.linear_input
    before the column-parallel linears, or mark_partial_grad on a parameter that sees only
    this rank's heads); its records on rank 0, or the error it stops with."""
    real = getattr(parallel, obligation)
    undone = {"linear_input": lambda x, layout: parallel.autocast_input(x),
              "mark_partial_grad": lambda *params: None}[obligation]
    setattr(parallel, obligation, undone)
    try:
        result = train_job(argv)  # (records, stdout) on rank 0
        return result and result[0]
    except RuntimeError as e:
        return str(e)
    finally:
        setattr(parallel, obligation, real)


def test_a_model_file_that_forgets_linear_input_fails_loudly(ranks):
    """Under tp a column-parallel linear whose input did not come through
    parallel.linear_input stops the run at the first forward, saying so (without sp it
    would train on gradients not summed over tp; with sp on a shard of the sequence)."""
    argv = ["--model", "llama", *LAYOUT, "--steps", "2"]
    for flags in (["--tp", "2"], ["--tp", "2", "--no-sp"]):
        error = ranks(2).run(_train_with_an_obligation_undone, obligation="linear_input", argv=argv + flags)[0]
        assert error == ("tensor parallelism: a column-parallel linear's input must come through "
                         "parallel.linear_input (every tp rank needs the whole input, and its gradient "
                         "summed over tp)"), error
    assert_same_run(ranks(2).run(_train_with_an_obligation_undone, obligation="linear_input", argv=argv)[0],
                    one_process(argv))  # dp = 2: nothing to enter


@pytest.mark.parametrize("flags,loud", [(["--no-sp"], True),
                                        ([], False)])  # under sp, every parameter not split over tp is summed anyway
def test_a_model_file_that_forgets_mark_partial_grad_fails_loudly(ranks, flags, loud):
    """A parameter replicated over tp that sees only this rank's heads (Qwen 3's QK-norm)
    and is not marked: its gradient differs between the tp ranks. The first step checks
    (DataParallel.check_tp_replicas) and stops, naming it, instead of training on it."""
    argv = ["--model", "llama", *LAYOUT, "--steps", "2", "--set", "qk_norm=true", "--tp", "2", *flags]
    got = ranks(2).run(_train_with_an_obligation_undone, obligation="mark_partial_grad", argv=argv)[0]
    if loud:
        assert isinstance(got, str) and got.startswith("tensor parallelism: the gradient of "), got
        named = got.split("the gradient of ")[1].split(" differs")[0].split(", ")
        assert sorted(named) == [f"layers.{i}.attn.{n}_norm.weight" for i in (0, 1) for n in "kq"], got
    else:
        assert_same_run(got, one_process(argv[:-4 - len(flags)] + ["--set", "qk_norm=true"]))


def _linears_sharing_an_sp_input():
    """Three column-parallel linears reading one linear_input under tp = 2 with sp (LLaMA's
    q, k, v): their weights' gradients, and what the shared re-gather still holds after
    backward."""
    layout = parallel.init_distributed(tp=2, sp=True, device="cpu")
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 16, generator=g)
        weights = [torch.randn(6, 16, generator=g) for _ in range(3)]
        linears = []
        for w in weights:
            linear = parallel.ColumnParallelLinear(16, 6, layout)
            linear.weight.data.copy_(w.chunk(2)[layout.tp_rank])
            linears.append(linear)
        shard = x.chunk(2, dim=1)[layout.tp_rank].clone().requires_grad_()
        full = parallel.linear_input(shard, layout)
        sum(linear(full).square().sum() for linear in linears).backward()
        kept = full.regather.full, full.regather.pending, full.regather.readers
        return [linear.weight.grad for linear in linears], kept, x, weights
    finally:
        parallel.destroy_distributed(layout)


def test_linears_sharing_an_sp_input_gather_it_once_and_drop_it(ranks):
    """Under sp each linear saves the rank's shard; backward gathers the whole input again
    for the weights' gradients (which equal the one-process ones) and, once the last of
    the linears has read it, drops it: none of it outlives the backward."""
    for rank, (grads, kept, x, weights) in ranks(2).run(_linears_sharing_an_sp_input).items():
        assert kept == (None, None, 0), kept
        for grad, w in zip(grads, weights):
            expected = 2 * torch.einsum("bso,bsi->oi", x @ w.t(), x)  # d/dW of sum((x W^T)^2)
            torch.testing.assert_close(grad, expected.chunk(2)[rank])
