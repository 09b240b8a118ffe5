"""train.py --compile (parallel.apply_compile): each layer compiled, the run the eager one.

Compiled and eager runs of the same flags agree to fp32 rounding: measured on the test
presets, the losses and gradient norms differ by at most 1e-7 relative over 3 steps (llama,
gpt, mixtral, mamba, bert, t5; most steps bit-identical), so 1e-5, the layouts' tolerance,
holds with a margin. Compilation is slow on a CPU (40 s for the test llama's layer graph
on 2 cores with a cold cache; each layout and family compiles graphs of its own, 20-60 s
more each): the suite runs llama in one process (and with recomputation, which reuses its
graph) and Mixtral (whose experts stay eager); the layouts and the other families run with
TEST_COMPILE_ALL=1.
"""
import os

import pytest
import torch

from conftest import LAYOUT, assert_same_run, one_line_error, one_process, train_job, train_on

LLAMA = ["--model", "llama", *LAYOUT, "--steps", "4"]
SLOW = pytest.mark.skipif(not os.environ.get("TEST_COMPILE_ALL"),
                          reason="a graph of its own: 20-60 s to compile on 2 CPU cores; "
                                 "TEST_COMPILE_ALL=1 runs it")


@pytest.fixture(scope="module")
def compiled_llama():
    torch._dynamo.reset()  # (so that this run compiles, whatever compiled the same layer before)
    return train_job(LLAMA + ["--compile"])


def test_compiled_llama_equals_eager(compiled_llama):
    records, out = compiled_llama
    assert_same_run(records, one_process(LLAMA))
    # The first step compiles: its time is reported apart, not in the step's time.
    assert "compile_s" in records[0] and all("compile_s" not in r for r in records[1:])
    assert records[0]["step_time"] < records[0]["compile_s"]
    assert out.count("compile: ") == 1


def test_compiled_with_full_recompute_equals_eager():
    """Compiled around the checkpointed unit (apply_recompute first): the recompute in
    backward runs the compiled code again, and the run is still the eager one."""
    flags = ["--recompute", "full", "--recompute-layers", "2"]
    records, _ = train_job(LLAMA + flags + ["--compile"])
    assert_same_run(records, one_process(LLAMA))


@SLOW
def test_compiled_under_tp_equals_one_process(ranks):
    """Tensor parallelism's collectives inside each compiled layer (a graph break at each,
    run eagerly); the same graph shapes as one process (tp = 2 without sp halves the
    heads and features, so this compiles its own)."""
    got, _ = train_on(ranks, 2, LLAMA + ["--tp", "2", "--compile"])
    assert_same_run(got, one_process(LLAMA))


@SLOW
def test_compiled_pipeline_equals_one_process(ranks):
    """Under pp each rank compiles its own chunk's layers, never the whole model: the
    schedule, the sends and receives stay eager."""
    got, _ = train_on(ranks, 2, LLAMA + ["--pp", "2", "--compile"])
    assert_same_run(got, one_process(LLAMA))


def test_compile_with_triton_interpreter_is_one_line(capsys, monkeypatch):
    import kernels
    monkeypatch.setattr(kernels, "_INTERPRET", True)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    err = one_line_error(capsys, LLAMA + ["--compile"])
    assert "--compile" in err and "TRITON_INTERPRET" in err


def test_compile_with_fp8_is_one_line(capsys):
    err = one_line_error(capsys, LLAMA + ["--compile", "--precision", "fp8"])
    assert "--compile" in err and "fp8" in err


@pytest.mark.parametrize("model", [
    "mixtral",  # (in the suite: its experts run eagerly between graph breaks, see mixtral.Experts)
    *(pytest.param(m, marks=SLOW) for m in ("gpt", "mamba", "bert", "t5"))])
def test_each_family_compiles_to_the_eager_run(model):
    argv = ["--model", model, *LAYOUT, "--steps", "2"]
    records, _ = train_job(argv + ["--compile"])
    assert_same_run(records, one_process(argv))


def test_compile_covers_the_layers_and_the_final_norm_only_where_held():
    """What apply_compile compiles: every layer of each chunk, and the final norm of the
    chunk that holds it (pipeline chunks before the last have none)."""
    import models
    import parallel
    cfg = models.make_config("llama", "test", [])
    whole = models.build("llama", cfg, torch.device("cpu"), 0)
    parallel.apply_compile([whole])
    assert all(layer._compiled_call_impl is not None for layer in whole.layers.values())
    assert whole.norm._compiled_call_impl is not None
    assert whole.embed._compiled_call_impl is None  # the model around the layers stays eager
    first = models.build("llama", cfg, torch.device("cpu"), 0, chunk=parallel.Chunk(0, [0], True, False))
    parallel.apply_compile([first])
    assert first.norm is None and first.layers["0"]._compiled_call_impl is not None
