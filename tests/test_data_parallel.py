"""Data parallelism and ZeRO-1 against one process: dp ranks with and without gradient
accumulation, many gradient buckets whose reductions overlap backward, and accumulation
micro-steps that send nothing."""
import pytest
import torch
import torch.distributed as dist

import models
import parallel
from conftest import LAYOUT, assert_same_run, one_process, train_on


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_data_parallel_equals_one_process(ranks, model):
    """dp=2 and dp=4, ZeRO-1 on and off, with and without gradient accumulation, follow
    the one-process run (and so does one process accumulating two micro-batches)."""
    argv = ["--model", model, *LAYOUT]
    expected = one_process(argv)
    assert_same_run(one_process(argv + ["--micro-batch-size", "2"]), expected)
    for nproc, flags in [(2, ["--micro-batch-size", "4"]), (2, ["--micro-batch-size", "1"]),
                         (4, ["--micro-batch-size", "2"]), (4, ["--micro-batch-size", "1", "--no-zero1"])]:
        got, _ = train_on(ranks, nproc, argv + flags)
        assert_same_run(got, expected)


def test_clipping_under_zero1(ranks):
    """With clipping acting at every step (norms 2-3 against 1.0), each ZeRO-1 slice is
    scaled by the same global factor: the losses still follow one process."""
    argv = ["--model", "llama", *LAYOUT, "--clip-grad", "1.0"]
    expected = one_process(argv)
    assert min(r["grad_norm"] for r in expected) > 1.0
    got, _ = train_on(ranks, 2, argv + ["--zero1"])
    assert_same_run(got, expected)


@pytest.mark.parametrize("zero1", ["--zero1", "--no-zero1"])
def test_many_buckets_equal_one_process(ranks, zero1):
    """Buckets of 20 KB: the test llama's 0.11M parameters fill about 20 of them."""
    argv = ["--model", "llama", *LAYOUT]
    got, _ = train_on(ranks, 2, argv + ["--ddp-bucket-mb", "0.02", zero1])
    assert_same_run(got, one_process(argv))


def _backward_events(bucket_mb, micro_batches):
    """One step of the test llama on this data-parallel rank through run_schedule, with
    every collective call and every forward and gradient logged in order."""
    layout = parallel.init_distributed(device="cpu")
    model = models.build("llama", models.make_config("llama", "test"), "cpu", 0, layout)
    ddp = parallel.DataParallel(model, layout, zero1=True, bucket_mb=bucket_mb)
    events = []
    model.register_forward_pre_hook(lambda *_: events.append("forward"))
    for name, p in model.named_parameters():  # after DataParallel's own hooks
        p.register_post_accumulate_grad_hook(lambda p, name=name: events.append("grad"))
    # (parallel calls reduce_scatter_single through its own name: torch 2.11 has another)
    home = {"all_reduce": dist, "reduce_scatter_single": parallel, "all_gather": dist}
    real = {name: getattr(module, name) for name, module in home.items()}

    def logged(name):
        def call(*args, **kwargs):
            events.append(f"{name} async" if kwargs.get("async_op") else name)
            return real[name](*args, **kwargs)
        return call
    g = torch.Generator().manual_seed(layout.rank)
    batches = [dict.fromkeys(("input_ids", "labels"), torch.randint(0, 257, (1, 16), generator=g))
               for _ in range(micro_batches)]
    actions = parallel.SCHEDULES["1f1b"](micro_batches, layout)
    try:
        for name in real:
            setattr(home[name], name, logged(name))
        parallel.run_schedule(actions, [model.chunk], [model], batches, layout, (1, 16, 64), ddp)
        ddp.finish()
    finally:
        for name, fn in real.items():
            setattr(home[name], name, fn)
    ddp.close()
    parallel.destroy_distributed(layout)
    return events, len(ddp.buckets)


def test_buckets_reduce_during_backward(ranks):
    """With buckets of 20 KB, each bucket's reduce-scatter starts (asynchronously) as soon
    as its gradients are final, while backward still produces others: overlap."""
    events, n_buckets = ranks(2).run(_backward_events, bucket_mb=0.02, micro_batches=1)[0]
    launches = [i for i, e in enumerate(events) if e == "reduce_scatter_single async"]
    last_grad = max(i for i, e in enumerate(events) if e == "grad")
    assert n_buckets >= 5 and len(launches) == n_buckets
    assert sum(i < last_grad for i in launches) >= n_buckets - 1


def test_accumulation_micro_steps_send_nothing(ranks):
    """Four micro-batches: no collective before the last micro-batch's forward; the
    gradients are reduced in its backward only."""
    events, _ = ranks(2).run(_backward_events, bucket_mb=25.0, micro_batches=4)[0]
    last_forward = max(i for i, e in enumerate(events) if e == "forward")
    collectives = [i for i, e in enumerate(events) if e not in ("forward", "grad")]
    assert events.count("forward") == 4 and collectives
    assert min(collectives) > last_forward, events


def _unused_parameter_step():
    """tp=2: two parameters tagged partial over tp, one of which gets no gradient in the
    backward (an unused branch): its bucket cannot complete during backward, so finish()
    reduces it. Returns both gradients."""
    layout = parallel.init_distributed(tp=2, device="cpu")
    module = torch.nn.ParameterDict({"used": torch.nn.Parameter(torch.ones(3)),
                                     "unused": torch.nn.Parameter(torch.ones(3))})
    parallel.mark_partial_grad(module["used"], module["unused"])
    ddp = parallel.DataParallel(module, layout)
    (module["used"] * (layout.tp_rank + 1)).sum().backward()  # rank r's part: r + 1
    ddp.finish()
    grads = module["used"].grad.tolist(), module["unused"].grad.tolist()
    ddp.close()
    parallel.destroy_distributed(layout)
    return grads


def test_a_parameter_without_gradient_leaves_the_others_summed_once(ranks):
    """The used parameter's gradient is summed over tp exactly once (1 + 2), whether its
    hook or finish() does it; the unused one stays zero."""
    for used, unused in ranks(2).run(_unused_parameter_step).values():
        assert used == [3.0] * 3 and unused == [0.0] * 3
