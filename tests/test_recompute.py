"""Activation recomputation (parallel.apply_recompute, train.py --recompute): the same
losses, gradients and router statistics as without it, in every family; the layers the
method names are the ones recomputed; a pipeline and tensor parallelism still equal one
process; activations really drop; bad flags are one line."""
import pytest
import torch

import bench
import data
import models
import parallel
from conftest import LAYOUT, assert_same_run, one_line_error, one_process, train_on

# (family, preset, overrides): the test presets; Mamba's hybrid has attention, an MLP and
# Mamba layers; Mixtral drops choices (capacity) and has both router losses.
FAMILIES = [("llama", "test", ()), ("gpt", "test", ()), ("bert", "test", ()), ("t5", "test", ()),
            ("mamba", "test-hybrid", ()),
            ("mixtral", "test", ("capacity_factor=1.0", "z_loss_coef=0.001"))]

# (mode, N, method) -> which of the chunk's layers run their forward twice.
RECOMPUTE = [("selective", 1, "uniform"), ("full", 1, "uniform"), ("full", 2, "uniform"),
             ("full", 1, "block")]


def _batch(family):
    g = torch.Generator().manual_seed(3)
    if family == "bert":
        train, _ = data.load_dataset("stdlib", "byte", 32)
        batch = data.MaskedLMData(train, "byte").batch(0, 3, 2, 32)
        batch["attention_mask"][1, 20:] = 0
        return batch
    ids = torch.randint(0, 256, (2, 32), generator=g)
    if family == "t5":
        mask = torch.ones_like(ids)
        mask[1, 25:] = 0
        return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 256, (2, 16), generator=g))
    return dict(input_ids=ids, labels=ids)


def _run(family, preset, overrides, mode="none", n=1, method="uniform"):
    """One forward + backward: (loss, gradients, router figures, forward calls per layer)."""
    model = models.build(family, models.make_config(family, preset, overrides), "cpu", 0)
    parallel.apply_recompute([model], mode, n, method)
    calls = {}
    for i, layer in model.layers.items():  # a recomputed layer's submodules run twice
        for sub in layer.children():
            sub.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    loss = model(**_batch(family))
    extra = getattr(model, "extra_loss", None)
    moe = [layer.mlp for layer in model.layers.values()] if family == "mixtral" else []
    after_forward = [(m.aux_loss, m.kept, m.traffic) for m in moe]
    (loss if extra is None else loss + extra).backward()
    # What the layers left on their modules is the forward's, not the recompute's.
    assert all(a is b for before, m in zip(after_forward, moe)
               for a, b in zip(before, (m.aux_loss, m.kept, m.traffic)))
    router = {}
    if family == "mixtral":
        router = {"aux": model.aux_loss.detach(), "z": model.z_loss.detach(), **model.pop_router_stats()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), grads, router, calls


@pytest.mark.parametrize("family,preset,overrides", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_recompute_changes_no_loss_gradient_or_statistic(family, preset, overrides):
    loss, grads, router, calls = _run(family, preset, overrides)
    n_layers = len(calls)
    for mode, n, method in RECOMPUTE:
        got_loss, got_grads, got_router, got_calls = _run(family, preset, overrides, mode, n, method)
        what = f"{family} {mode} {method} {n}"
        assert torch.equal(got_loss, loss), what
        assert got_grads.keys() == grads.keys()
        for name, g in grads.items():
            assert torch.equal(got_grads[name], g), f"{what}: {name}"
        assert got_router.keys() == router.keys()
        for key, value in router.items():
            assert torch.equal(torch.as_tensor(got_router[key]), torch.as_tensor(value)), f"{what}: {key}"
        recomputed = [i for i in calls if got_calls[i] > calls[i]]
        expected = [] if mode == "selective" else list(calls)[:n] if method == "block" else list(calls)
        assert recomputed == expected, what
        assert n_layers == len(got_calls)


def test_units_never_cross_a_change_of_layer_class():
    """T5's encoder and decoder layers: uniform units stop at the boundary."""
    model = models.build("t5", models.make_config("t5", "test", ["n_encoder_layers=3"]), "cpu", 0)
    units = parallel.recompute_units(model.layers, 2)
    assert [len(u) for u in units] == [2, 1, 2]
    assert [len(u) for u in parallel.recompute_units(model.layers, 2, "block")] == [1, 1]


def test_activations_drop_full_below_selective_below_none():
    """One micro-batch of the test llama, with a padding mask (the torch path then stores
    a (T x T) mask per layer; SDPA's CPU kernel stores no probabilities): checkpoint
    inputs counted."""
    peaks = {}
    ids = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(0))
    for mode in ("none", "selective", "full"):
        model = models.build("llama", models.make_config("llama", "test"), "cpu", 0)
        parallel.apply_recompute([model], mode)
        with bench.ActivationMeter([model], checkpoint_inputs=True) as meter:
            model(ids, labels=ids, attention_mask=torch.ones_like(ids))
        peaks[mode] = meter.peak
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks
    assert peaks["full"] < peaks["none"] / 4


LLAMA = ["--model", "llama", *LAYOUT, "--steps", "3"]


@pytest.mark.parametrize("flags", [["--pp", "2", "--recompute", "full"],
                                   ["--tp", "2", "--recompute", "selective"]], ids=["pp2-full", "tp2-selective"])
def test_training_with_recompute_equals_one_process(ranks, flags):
    got, _ = train_on(ranks, 2, LLAMA + flags)
    assert_same_run(got, one_process(LLAMA))


def test_mixtral_training_with_full_recompute_equals_without():
    argv = ["--model", "mixtral", *LAYOUT, "--steps", "2", "--micro-batch-size", "4"]
    assert_same_run(one_process(argv + ["--recompute", "full", "--recompute-layers", "2"]), one_process(argv))


@pytest.mark.parametrize("flags,message", [
    (["--recompute", "full", "--recompute-layers", "3"], "exceeds the 2 layer(s) of a pipeline chunk"),
    (["--recompute-method", "block"], "--recompute-method applies to --recompute full only"),
    (["--recompute", "selective", "--recompute-layers", "1"], "--recompute-layers applies to --recompute full"),
    (["--recompute", "full", "--recompute-layers", "0"], "--recompute-layers must be >= 1"),
])
def test_bad_input_is_one_line(capsys, flags, message):
    assert message in one_line_error(capsys, ["--model", "llama", *LAYOUT, *flags])


def test_bench_recompute_runs_on_cpu(tmp_path, capsys):
    import json
    out = tmp_path / "recompute.json"
    bench.main(["recompute", "--config", "test", "--seq-len", "256", "--reps", "1", "--padding-mask",
                "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [r["recompute"] for r in rows] == ["none", "selective", "full"]
    assert rows[2]["activation_mb"] < rows[1]["activation_mb"] < rows[0]["activation_mb"]
    assert all(r["step_ms"] > 0 for r in rows)
    assert "summary: full keeps" in capsys.readouterr().out
