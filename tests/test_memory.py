"""memory.py's planner against measurement.

Parameters and optimizer state: the planner's exact byte counts against the real model
and optimizer built on the CPU. Activations: the planner's bytes for one micro-batch
against what autograd saves during that micro-batch's forward and still holds at its
end, measured as memory.py defines it: each saved storage once, at its full size,
parameters and views/casts of parameters left out (bench.ActivationMeter counts every
saved tensor, those included).
Each within 1% (the contract is 10%).
"""
import re

import pytest
import torch

import memory
import models
import parallel
from conftest import one_line_error

# Autograd nodes that only view or cast their one input: a saved tensor reached from a
# parameter through these alone is that parameter (or autocast's copy of it).
_VIEWS = {"ToCopyBackward0", "TBackward0", "ViewBackward0", "TransposeBackward0",
          "PermuteBackward0", "ExpandBackward0", "UnsafeViewBackward0", "SliceBackward0",
          "AliasBackward0",  # a full slice, weight[:, 0:n]
          "UnsqueezeBackward0"}  # Mamba-2's D[heads, None]


def _is_parameter(t, param_storages):
    if t.untyped_storage().data_ptr() in param_storages:
        return True
    node = t.grad_fn
    while node is not None and type(node).__name__ in _VIEWS:
        nxt = [f for f, _ in node.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        node = nxt[0]
        if type(node).__name__ == "AccumulateGrad":
            return True
    return False


def batch(model_name, cfg, b, s):
    """A training micro-batch of each family's form: BERT with padding, token types and 15%
    of the tokens to predict; T5 with padding and span corruption's decoder length."""
    import data
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones_like(ids)
    mask[0, s - 5:] = 0
    if model_name == "bert":
        labels = torch.where(torch.rand(b, s) < 0.15, ids, -100)
        return dict(input_ids=ids, labels=labels, attention_mask=mask,
                    token_type_ids=(torch.arange(s) >= s // 2).long().repeat(b, 1),
                    sentence_order_labels=torch.zeros(b, dtype=torch.long))
    if model_name == "t5":
        dec = data.span_corruption_lengths(s)[1]
        return dict(input_ids=ids, labels=torch.randint(0, cfg.vocab_size, (b, dec)), attention_mask=mask)
    return dict(input_ids=ids, labels=ids)


class _Token:
    """A saved tensor's stand-in (see LiveSaved)."""

    def __init__(self, tracker, t):
        self.tracker, self.tensor, self.key = tracker, t, t.untyped_storage().data_ptr()
        n = tracker.refs.get(self.key, 0)
        if n == 0:
            tracker.live += t.untyped_storage().nbytes()
            tracker.peak = max(tracker.peak, tracker.live)
        tracker.refs[self.key] = n + 1

    def __del__(self):
        self.tracker.refs[self.key] -= 1
        if self.tracker.refs[self.key] == 0:
            self.tracker.live -= self.tensor.untyped_storage().nbytes()


class LiveSaved:
    """The live bytes of what autograd holds for backward, as memory.py defines them: each
    storage once at its full size, parameters and their views/casts left out; `live` is
    what is alive now, `peak` the most alive at once. Each saved tensor is wrapped in a
    token; a storage counts while any token of it lives (autograd drops the tokens as
    backward frees the graph, and as a forward drops a branch it does not use, such as
    the final state of Mamba's scan). A parameter: a tensor in `param_storages`, or a
    view/cast of a leaf that requires grad; without `param_storages` also such a leaf
    itself (stage 0 receives no such activation)."""

    def __init__(self, param_storages=None):
        self.param_storages = param_storages
        self.refs, self.live, self.peak = {}, 0, 0

    def hold(self, t):
        """A token keeping `t`'s storage counted while the token lives."""
        return _Token(self, t)

    def pack(self, t):
        if self.param_storages is None and t.grad_fn is None and t.requires_grad:
            return t
        if _is_parameter(t, self.param_storages or ()):
            return t
        return self.hold(t)

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(
            self.pack, lambda p: p.tensor if isinstance(p, _Token) else p)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def measure(model_name, preset, tp=1, cp=1, pp=1, ep=1, sp=True, b=2, s=32, precision="fp32",
            sets=(), recompute="none", recompute_n=1, method="uniform", etp=None):
    """On this rank (one of LocalRanks, or the test process): (saved activation bytes of one
    micro-batch's forward on pipeline stage 0, weights, gradients and optimizer bytes)."""
    cfg = models.make_config(model_name, preset, sets)
    layout = parallel.init_distributed(tp, cp, pp, ep, sp, device="cpu", etp=etp)
    try:
        chunks = parallel.rank_chunks(layout, cfg.n_layers)
        module = models.build(model_name, cfg, layout.device, 0, layout, chunks[0])
        if precision == "bf16":  # mixed precision: the parameters bf16, as DataParallel makes them
            module.to(torch.bfloat16)
            if models.FAMILIES[model_name].fp32_residual(cfg):  # (as train.py sets it up)
                parallel.set_residual_dtype([module], torch.float32)
        parallel.apply_recompute([module], recompute, recompute_n, method)
        state = static_bytes_by_hand(module, layout, precision=precision)
        tracker = LiveSaved({p.untyped_storage().data_ptr() for p in module.parameters()})
        inputs = batch(model_name, cfg, b, s)
        if not chunks[0].first:
            inputs["hidden"] = torch.randn(b, s // cp // (tp if sp and tp > 1 else 1), cfg.dim,
                                           requires_grad=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        # Under recomputation a checkpoint keeps its tensor arguments for the recompute
        # (outside autograd's saved tensors, which it replaces): count them as saved.
        plain = torch.utils.checkpoint.checkpoint
        held = []

        def checkpoint(fn, *args, **kwargs):
            held.extend(tracker.pack(t) for t in [*args, *kwargs.values()]
                        if isinstance(t, torch.Tensor) and t.is_floating_point())
            return plain(fn, *args, **kwargs)
        torch.utils.checkpoint.checkpoint = checkpoint
        try:
            with tracker, autocast:
                output = module(**inputs)
            live = tracker.live  # while `output` holds the graph, and with it what was saved
            del output
            return live, state
        finally:
            torch.utils.checkpoint.checkpoint = plain
    finally:
        parallel.destroy_distributed(layout)


def static_bytes_by_hand(module, layout, zero1=True, precision="fp32"):
    """(weights, gradients, optimizer) bytes of a rank holding `module`, written out: fp32
    gradients, 4 bytes a parameter; weights fp32 (4), or bf16 (2) under mixed precision;
    AdamW's two fp32 moments (8 bytes), and under mixed precision its fp32 main weights (4),
    of the parameters the rank updates: all of them, or under ZeRO-1 with r replicas 1/r of
    them (r = dp * cp, or for an expert tp * dp * cp / (etp * ep); their reduced gradient lands in the
    gradient buffer itself). The planner's count also holds the padding of each ZeRO bucket
    to a multiple of r elements."""
    weights = grads = optimizer = 0
    state = 8 if precision == "fp32" else 12
    for p in module.parameters():
        replicas = layout.expert_dp if parallel.tags(p).expert else layout.dp * layout.cp
        weights += (4 if precision == "fp32" else 2) * p.numel()
        grads += 4 * p.numel()
        optimizer += state * p.numel() / (replicas if zero1 else 1)
    return weights, grads, optimizer


def predict(model_name, preset, tp=1, cp=1, pp=1, ep=1, sp=True, b=2, s=32, precision="fp32",
            sets=(), world=None, recompute="none", recompute_n=1, method="uniform", etp=None):
    cfg = models.make_config(model_name, preset, sets)
    world = world or tp * cp * pp * max(1, ep // cp)
    st = memory.plan(models.FAMILIES[model_name], cfg, world=world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, sp=sp,
                     micro_batch=b, seq_len=s, precision=precision, recompute=recompute,
                     recompute_n=recompute_n, recompute_method=method, torch_kernels=True)[0]
    return sum(st.activations_per_micro.values()), (st.weights, st.gradients, st.optimizer)


ONE_PROCESS = [
    ("llama", "test", {}),
    ("llama", "test", {"precision": "bf16"}),
    ("llama", "test", {"s": 64, "b": 1}),
    ("llama", "test", {"precision": "bf16", "sets": ("qk_norm=true",)}),
    ("gpt", "test", {}),
    ("gpt", "test", {"precision": "bf16"}),
    ("mixtral", "test", {}),
    ("mixtral", "test", {"precision": "bf16"}),
    ("mixtral", "test-qwen2-moe", {}),
    ("mixtral", "test-qwen2-moe", {"precision": "bf16"}),
    ("mixtral", "test-qwen3-moe", {}),
    ("mixtral", "test", {"sets": ("router_score=sigmoid", "router_groups=2", "router_group_topk=1",
                                  "expert_bias_rate=0.01", "balance_loss=sequence")}),
    ("mixtral", "test-qwen3-moe", {"precision": "bf16"}),
    ("bert", "test", {}),
    ("bert", "test", {"precision": "bf16", "sets": ("pre_ln=true",)}),
    ("t5", "test", {}),
    ("t5", "test", {"precision": "bf16", "sets": ("gated_gelu=false",)}),
    ("llama", "test", {"recompute": "full"}),
    ("llama", "test", {"recompute": "full", "recompute_n": 2}),
    ("llama", "test", {"recompute": "full", "precision": "bf16"}),
    ("llama", "test", {"recompute": "full", "method": "block", "sets": ("n_layers=3",)}),
    ("llama", "test", {"recompute": "selective"}),
    ("bert", "test", {"recompute": "selective"}),
    ("t5", "test", {"recompute": "selective"}),
    ("t5", "test", {"recompute": "full"}),
    ("mamba", "test", {}),
    ("mamba", "test", {"precision": "bf16"}),
    ("mamba", "test-mamba1", {}),
    ("mamba", "test-mamba1", {"precision": "bf16"}),
    ("mamba", "test-hybrid", {}),
    ("mamba", "test", {"recompute": "full"}),
]

RESULTS = []  # (combination, predicted, measured) for the report


def _check(name, predicted, measured):
    (p_act, p_state), (m_act, m_state) = predicted, measured
    RESULTS.append((name, p_act, m_act))
    assert all(0 <= p - m <= 64 for p, m in zip(p_state, m_state)), (name, p_state, m_state)  # padding
    # 10% is the contract; the formulas match to 1% (measured: most cases exact, cp = 2 off
    # by 0.51%, full recomputation by <= 0.19%; Mixtral too: dropless routing saves n k routed
    # rows whatever the experts' shares), so a missing term of a few percent shows. Under ep
    # the all-to-all's re-sorting indices depend on how many rows each rank gets (measured 1.03%).
    tolerance = 0.02 if "'ep'" in name else 0.01
    assert abs(p_act - m_act) <= tolerance * m_act, (name, p_act, m_act, f"{(p_act - m_act) / m_act:+.1%}")


@pytest.mark.parametrize("model_name,preset,kw", ONE_PROCESS, ids=lambda v: str(v))
def test_one_process(model_name, preset, kw):
    _check(f"{model_name}/{preset} {kw}", predict(model_name, preset, **kw),
           measure(model_name, preset, **kw))


TWO_RANKS = [
    ("llama", "test", {"tp": 2}),
    ("llama", "test", {"tp": 2, "sp": False}),
    ("llama", "test", {"cp": 2}),
    ("llama", "test", {"pp": 2}),
    ("gpt", "test", {"tp": 2}),
    ("mixtral", "test", {"ep": 2}),
    ("mixtral", "test-qwen2-moe", {"tp": 2, "precision": "bf16"}),
    ("mixtral", "test-qwen3-moe", {"tp": 2}),  # its one KV head on both tp ranks
    ("mixtral", "test-qwen3-moe", {"tp": 2, "etp": 1, "ep": 2}),  # ep over the tp ranks
    ("mixtral", "test-qwen2-moe", {"tp": 2, "etp": 1, "precision": "bf16"}),  # experts on both
    ("t5", "test", {"tp": 2, "precision": "bf16"}),
    ("bert", "test", {"tp": 2}),
    ("mamba", "test", {"tp": 2, "precision": "bf16"}),
]


@pytest.mark.parametrize("model_name,preset,kw", TWO_RANKS, ids=lambda v: str(v))
def test_two_ranks(ranks, model_name, preset, kw):
    measured = ranks(2).run(measure, model_name=model_name, preset=preset, **kw)[0]
    _check(f"{model_name}/{preset} {kw}", predict(model_name, preset, world=2, **kw), measured)


def test_plan_bad_layout_is_one_line(capsys):
    err = one_line_error(capsys, ["--model", "llama", "--config", "llama3-70b", "--tp", "8",
                                  "--pp", "4", "--world-size", "48", "--plan"])
    assert "world size 48" in err


def plan_text(capsys, argv):
    import train
    train.main(["--plan", "--precision", "bf16", *argv])
    return capsys.readouterr().out


def largest_peak(text):
    return max(float(v) for v in re.findall(r"  peak +([\d.]+) GiB", text))


@pytest.mark.parametrize("argv,at_most", [
    # Korthikanti et al.'s GPT-3 175B layout (sp; Megatron's count: 56.5 GiB on stage 0)
    (["--model", "gpt", "--config", "gpt3-175b", "--tp", "8", "--pp", "8", "--world-size", "64", "--seq-len",
      "2048", "--global-batch-size", "64", "--micro-batch-size", "1"], 62),
    # llama3-70b at tp 8 x pp 4 x dp 2 (Megatron's count: 45.4 GiB)
    (["--model", "llama", "--config", "llama3-70b", "--tp", "8", "--pp", "4", "--world-size", "64", "--seq-len",
      "8192", "--global-batch-size", "64", "--micro-batch-size", "1"], 50),
])
def test_megatrons_own_layouts_fit_as_they_do_in_megatron(capsys, argv, at_most):
    """bf16 mixed precision, sp saving its shard, the residual stream in bf16: the largest
    stage within 1.1x of Megatron's formula (bench.py megatron-memory prints both)."""
    text = plan_text(capsys, [*argv, "--device-memory-gb", "80"])
    assert largest_peak(text) <= at_most and "\nfits: peak" in text, text


def test_plan_prints_what_it_planned_and_what_would_fit(capsys):
    argv = ["--model", "llama", "--config", "llama3-70b", "--tp", "8", "--pp", "4", "--world-size", "64",
            "--seq-len", "8192", "--global-batch-size", "64", "--micro-batch-size", "1"]
    text = plan_text(capsys, [*argv, "--device-memory-gb", "25"])
    assert text.startswith("plan of llama (llama3-70b) on 64 ranks: tp 8 (sp) x cp 1 x pp 4 x dp 2, ZeRO-1 | "
                           "micro-batch 1 x 8192 tokens, 32 per step and rank | bf16 (fp32 gradients) | "
                           "recompute none\n"), text
    assert "does not fit: peak 46.37 GiB > 23.28 GiB (--device-memory-gb 25)" in text, text
    # No single change fits 25 GB: the fewest that do, the smallest peak of those, which
    # is what planning that layout says.
    advice = re.findall(r"would fit with (.*): peak ([\d.]+) GiB", text)
    assert advice == [("--pp x2 --recompute full", advice[0][1])], text
    advised = plan_text(capsys, [*argv[:7], "8", *argv[8:], "--recompute", "full"])
    assert largest_peak(advised) == float(advice[0][1]) <= 23.28, advised
    # One GPU of 1 GB cannot hold llama3-8b however it is set (tp and pp need more GPUs).
    text = plan_text(capsys, ["--model", "llama", "--config", "llama3-8b", "--world-size", "1",
                              "--device-memory-gb", "1"])
    assert "no combination of up to three of --tp x2, --pp x2" in text, text


def test_plan_optimizer_state_with_and_without_zero1(capsys):
    """llama3-8b (8,030,261,248 parameters: its published count) on 8 data-parallel ranks.
    Without ZeRO-1 every rank holds AdamW's two fp32 moments of every parameter, 8 bytes
    each, and under bf16 its fp32 main weights, 4 more; with it, 1/8 of them (the reduced
    gradient slice they update lands in the gradient buffer itself)."""
    import train
    n = 8_030_261_248
    for precision, state in (("fp32", 8), ("bf16", 12)):  # (bf16: the fp32 main weights too)
        for flag, expected in (("--no-zero1", state * n), ("--zero1", state * n / 8)):
            train.main(["--model", "llama", "--config", "llama3-8b", "--world-size", "8", "--plan", flag,
                        "--precision", precision])
            out = capsys.readouterr().out
            got = float(re.search(r"optimizer state +([\d.]+) GiB", out).group(1))
            assert got == pytest.approx(expected / 2**30, abs=0.006), (precision, flag, out)


# ----------------------------------------------------------------------------
# The peak of a real training step
# ----------------------------------------------------------------------------

def traced_step(argv):
    """One training step of train.py on this rank: the live peak of saved bytes."""
    from conftest import train_job
    with LiveSaved() as tracker:
        train_job(argv)
    return tracker.peak


# (flags, plan keywords): one process with 2 micro-batches of accumulation; pp=2 1F1B with
# 4 micro-batches (stage 0 keeps 2 in flight).
PEAK_CASES = [
    (["--model", "llama", "--global-batch-size", "4", "--micro-batch-size", "2"],
     dict(model="llama", micro_batch=2, n_micro=2)),
    (["--model", "llama", "--pp", "2", "--global-batch-size", "8", "--micro-batch-size", "2"],
     dict(model="llama", pp=2, micro_batch=2, n_micro=4)),
    (["--model", "mamba", "--global-batch-size", "4", "--micro-batch-size", "2"],
     dict(model="mamba", micro_batch=2, n_micro=2)),
    (["--model", "mamba", "--config", "test-hybrid", "--global-batch-size", "4", "--micro-batch-size", "2"],
     dict(model="mamba", preset="test-hybrid", micro_batch=2, n_micro=2)),
    # bf16 mixed precision: bf16 weights, fp32 gradients and main weights
    (["--model", "llama", "--global-batch-size", "4", "--micro-batch-size", "2", "--precision", "bf16"],
     dict(model="llama", micro_batch=2, n_micro=2, precision="bf16")),
    (["--model", "llama", "--pp", "2", "--global-batch-size", "8", "--micro-batch-size", "2", "--precision", "bf16"],
     dict(model="llama", pp=2, micro_batch=2, n_micro=4, precision="bf16")),
    (["--model", "mamba", "--global-batch-size", "4", "--micro-batch-size", "2", "--precision", "bf16"],
     dict(model="mamba", micro_batch=2, n_micro=2, precision="bf16")),
    (["--model", "gpt", "--global-batch-size", "4", "--micro-batch-size", "2", "--precision", "bf16"],
     dict(model="gpt", micro_batch=2, n_micro=2, precision="bf16")),
]
PEAKS = []  # (case, predicted, measured) for the report


@pytest.mark.parametrize("flags,kw", PEAK_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_peak_of_a_training_step(ranks, flags, kw):
    """The planner's peak (stage 0) against a real step's: the static state written out
    from stage 0's parameters (static_bytes_by_hand), plus the live peak of saved bytes
    while the step's micro-batches run forward and backward. The loss's logits chunk is a
    transient, not a saved tensor: left out of both. Within 1%, as one micro-batch's
    activations are (measured: exact)."""
    import conftest
    pp = kw.get("pp", 1)
    argv = [*conftest.FAST, "--precision", "fp32", "--steps", "1", "--warmup-steps", "0", *flags]
    live = ranks(pp).run(traced_step, argv=argv)[0] if pp > 1 else traced_step(argv)
    kw = dict(kw)
    model = kw.pop("model")
    cfg = models.make_config(model, kw.pop("preset", "test"), ())
    st = memory.plan(models.FAMILIES[model], cfg, world=pp, seq_len=32, torch_kernels=True, **kw)[0]
    layout = parallel.Layout(pp=pp)
    with torch.device("meta"):
        stage0 = models.FAMILIES[model].model(cfg, layout, parallel.rank_chunks(layout, cfg.n_layers)[0])
    static = sum(static_bytes_by_hand(stage0, layout, precision=kw.get("precision", "fp32")))
    predicted, measured = st.peak - st.logits_chunk, static + live
    PEAKS.append((" ".join(flags), predicted, measured))
    assert abs(predicted - measured) <= 0.01 * measured, (flags, predicted, measured,
                                                          f"{(predicted - measured) / measured:+.1%}")
    # the activations alone, so that the static part cannot hide a missing micro-batch
    act = st.activations + st.recompute_transient
    assert abs(act - live) <= 0.01 * live, (flags, act, live, f"{(act - live) / live:+.1%}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plan_matches_cuda_max_memory_allocated():
    """On a GPU: a 2-layer llama3-8b in bf16 with the Triton kernels, 2 micro-batches of 1 x
    4096 tokens: the planner's peak against torch.cuda.max_memory_allocated over two
    training steps (the numbers are printed for BENCHMARKS.md), within 10%. The allocator's
    own overhead (cuBLAS workspaces, fragmentation) is inside the measurement only."""
    from conftest import train_job
    flags = ["--model", "llama", "--config", "llama3-8b", "--set", "n_layers=2", "--seq-len", "4096",
             "--global-batch-size", "2", "--micro-batch-size", "1", "--precision", "bf16"]
    torch.cuda.reset_peak_memory_stats()
    train_job([*flags, "--steps", "2", "--warmup-steps", "1", "--eval-every", "0", "--eval-batches", "1",
               "--sample-tokens", "0", "--device", "cuda", "--peak-tflops", "1"])
    measured = torch.cuda.max_memory_allocated()
    cfg = models.make_config("llama", "llama3-8b", ("n_layers=2",))
    predicted = memory.peak_bytes(memory.plan(models.FAMILIES["llama"], cfg, world=1, micro_batch=1, n_micro=2,
                                              seq_len=4096, precision="bf16"))
    print(f"llama3-8b x 2 layers, bf16, 2 x 4096 tokens: planned {predicted / 2**30:.2f} GiB, "
          f"max_memory_allocated {measured / 2**30:.2f} GiB ({(predicted - measured) / measured:+.1%})")
    assert abs(predicted - measured) <= 0.1 * measured


def test_plan_step_time_counts_recompute_and_the_pipeline_bubble(capsys):
    """The planned step time is the FLOPs at --plan-mfu of the peak, 4/3 of them under full
    recomputation, divided by the pipeline's busy share (1F1B: (pp - 1) / (m + pp - 1) idle)."""
    base = ["--model", "llama", "--config", "llama3-8b", "--world-size", "8", "--seq-len", "4096",
            "--global-batch-size", "32"]

    def seconds(*extra):
        return float(re.search(r"step time at .*: ([\d.]+) s", plan_text(capsys, [*base, *extra]))[1])
    flat = seconds()
    assert seconds("--recompute", "full") == pytest.approx(4 / 3 * flat, rel=0.01)
    # pp 2 over 8 ranks: dp 4, 8 rows per rank in micro-batches of 1: 8 in flight, 1/9 idle
    assert seconds("--pp", "2", "--micro-batch-size", "1") == pytest.approx(flat * 9 / 8, rel=0.01)
