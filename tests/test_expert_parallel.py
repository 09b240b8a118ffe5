"""Expert parallelism (parallel.py, "Expert parallelism") against one process holding
every expert: the same losses, gradients and dropped tokens, in one step and through
train.py, and expert-parallel layouts that do not divide."""
import dataclasses

import pytest
import torch

import mixtral
import models
import parallel
from conftest import LAYOUT, ROUTER_FIGURES, assert_same_run, main_job, one_line_error, one_process, train_on
from errors import UsageError


def config(**overrides):
    return mixtral.Config(**{**mixtral.PRESETS["test"], "z_loss_coef": 1e-3, **overrides})


def test_ep_groups_are_consecutive_data_parallel_ranks():
    layout = parallel.Layout(tp=2, dp=4, ep=2)
    assert sorted(parallel.expert_groups(layout, "ep")) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(parallel.expert_groups(layout, "expert_dp")) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    layout = parallel.Layout(cp=2, dp=2, pp=2, ep=4)  # cp ranks count as data ranks (cp fastest)
    assert parallel.expert_groups(layout, "ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [dataclasses.replace(layout, rank=r).ep_rank for r in range(8)] == [0, 1, 2, 3] * 2
    layout = parallel.Layout(dp=4, ep=2)
    assert [dataclasses.replace(layout, rank=r).expert_dp_rank for r in range(4)] == [0, 0, 1, 1]
    assert parallel.expert_groups(layout, "expert_dp") == [[0, 2], [1, 3]]


def test_etp_below_tp_lends_the_spare_tp_ranks_to_ep():
    """Megatron's expert grid: each stage's ranks in tp-fastest order, cut etp x ep x replicas."""
    layout = parallel.Layout(tp=2, dp=2, ep=2, etp=1)  # ep spans the two tp ranks
    assert parallel.expert_groups(layout, "ep") == [[0, 1], [2, 3]]
    assert parallel.expert_groups(layout, "expert_dp") == [[0, 2], [1, 3]]
    assert [dataclasses.replace(layout, rank=r).ep_rank for r in range(4)] == [0, 1, 0, 1]
    layout = parallel.Layout(tp=4, dp=2, ep=4, etp=2, pp=2)
    assert parallel.expert_groups(layout, "etp") == [[2 * i, 2 * i + 1] for i in range(8)]
    assert parallel.expert_groups(layout, "ep")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [dataclasses.replace(layout, rank=r).etp_rank for r in range(4)] == [0, 1, 0, 1]
    assert [parallel.expert_tokens(8, dataclasses.replace(layout, rank=r)) for r in range(4)] == \
        [slice(0, 4), slice(0, 4), slice(4, 8), slice(4, 8)]


@pytest.mark.parametrize("layout,message", [
    (parallel.Layout(dp=3, ep=3), "n_experts=4 is not divisible by --ep 3"),
    (parallel.Layout(dp=2, ep=4), r"--ep 4 must divide dp\*cp = 2\*1 = 2"),
    (parallel.Layout(tp=2, ep=4, etp=1), r"--ep 4 must divide tp/etp\*dp\*cp = 2\*1\*1 = 2"),
    (parallel.Layout(tp=4, etp=3), "--etp 3 must divide --tp 4"),
])
def test_ep_that_does_not_divide_is_a_usage_error(layout, message):
    with pytest.raises(UsageError, match=message):
        mixtral.Mixtral(config(), layout)


ROWS, SEQ = 8, 16


def global_batch():
    ids = torch.randint(0, 257, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def train_step(model, ids, labels):
    """Forward + backward of one rank's rows, the objective of the module docstring;
    returns (main loss sum, aux share, z share)."""
    loss = model(ids, labels=labels)
    ((loss + model.extra_loss) / (ROWS * SEQ)).backward()
    return torch.stack([loss.detach(), model.aux_loss.detach(), model.z_loss.detach()])


def build(overrides, layout=None):
    """The test model with config overrides. zero_router=True: all router probabilities
    tie, so every token goes to the same top_k experts (topk breaks the tie), and under ep
    a rank may send or receive no token at all (its experts then run on nothing)."""
    overrides = dict(overrides)
    zero_router = overrides.pop("zero_router", False)
    model = models.build("mixtral", config(**overrides), "cpu", seed=0, layout=layout)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.mlp.router.weight.mul_(0.0 if zero_router else 1.0)
    return model


def reference(dp, overrides):
    """dp data-parallel ranks' work in one process holding every expert: each rank's rows
    run as its own micro-batch; loss sums add up and gradients accumulate."""
    model = build(overrides)
    ids, labels = global_batch()
    losses, kept = torch.zeros(3), []
    for r in range(dp):
        rows = slice(r * ROWS // dp, (r + 1) * ROWS // dp)
        losses += train_step(model, ids[rows], labels[rows])
        kept.append([layer.mlp.kept.clone() for layer in model.layers.values()])
    return losses, {n: p.grad for n, p in model.named_parameters()}, kept


def _ep_worker(tp, scenarios, cp=1):
    """One rank of dp = world / (tp * cp): for each (ep, config overrides), a step on its
    rows with gradients reduced by DataParallel; returns per scenario the global loss sums,
    this rank's gradients with their regions, and the capacity masks."""
    ids, labels = global_batch()
    results = []
    for ep, overrides in scenarios:  # the same processes, regrouped for each ep
        layout = parallel.init_distributed(tp=tp, cp=cp, ep=ep, device="cpu")
        per_rank = ROWS // layout.dp
        rows = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
        model = build(overrides, layout)
        ddp = parallel.DataParallel(model, layout)
        losses = train_step(model, ids[rows], labels[rows])
        ddp.finish()
        main, router = losses[:1].clone(), losses[1:].clone()
        parallel.all_reduce(main, layout.dp_cp_group)  # the same on every tp rank
        parallel.all_reduce(router, None if layout.world == 1 else torch.distributed.group.WORLD)
        grads = {}
        for name, p in model.named_parameters():
            shape, offset, extent = parallel.global_region(p)  # beyond extent: vocabulary padding
            grads[name] = (p.grad[tuple(slice(0, n) for n in extent)].numpy().copy(), offset)
        kept = [layer.mlp.kept.numpy().copy() for layer in model.layers.values()]
        ddp.close()
        parallel.destroy_distributed(layout)
        results.append((torch.cat([main, router]).tolist(), grads, kept, layout.dp_rank))
    return results


def relative(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("world,tp,cp,scenarios", [
    (2, 1, 1, [(2, {}), (2, {"capacity_factor": 1.0}), (2, {"zero_router": True})]),
    (4, 1, 1, [(2, {}), (4, {})]),       # ep=2: expert-dp groups of 2 ranks; ep=4: one expert each
    (4, 2, 2, [(2, {}), (2, {"zero_router": True})]),  # tp=2 (sp) x cp=2, ep=2 over the cp ranks;
    # with a zero router, experts 2 and 3 receive no token at all under tp > 1
])
def test_expert_parallel_step_equals_one_process(ranks, world, tp, cp, scenarios):
    """Losses, every gradient (reduced over the right groups) and the dropped choices."""
    results = ranks(world).run(_ep_worker, tp=tp, cp=cp, scenarios=scenarios)
    for i, (ep, overrides) in enumerate(scenarios):
        expected_losses, expected_grads, expected_kept = reference(world // tp // cp, overrides)
        seen = set()
        for rank, per_scenario in results.items():
            losses, grads, kept, dp_rank = per_scenario[i]
            where = f"ep={ep} {overrides} rank {rank}"
            assert relative(losses, expected_losses) < 1e-5, (where, losses, expected_losses)
            for name, (grad, offset) in grads.items():
                region = tuple(slice(o, o + n) for o, n in zip(offset, grad.shape))
                assert relative(grad, expected_grads[name][region]) < 1e-5, (where, name)
                seen.add(name)
            if "capacity_factor" in overrides:  # the same choices were dropped
                assert all((k == e.numpy()).all() for k, e in zip(kept, expected_kept[dp_rank])), where
        assert seen == set(expected_grads)  # every expert lives on some rank
    kept = torch.cat([k.reshape(-1) for ks in reference(2, {"capacity_factor": 1.0})[2] for k in ks])
    assert 0 < (~kept).sum() < len(kept) / 4  # the capacity test does drop choices


# ----------------------------------------------------------------------------
# Through train.py
# ----------------------------------------------------------------------------

# Router losses are taken per micro-batch of a data-parallel rank, so every run uses the
# same micro-batches: 2 rows (the one process runs 4 of them, dp=2 two each, dp=4 one).
MOE = ["--model", "mixtral", *LAYOUT, "--micro-batch-size", "2", "--set", "z_loss_coef=1e-3"]
def test_expert_parallel_training_equals_one_process(ranks, tmp_path):
    """10 steps of ep=2, ep=4, ep=2 x tp=2, ep=2 x pp=2 (ZeRO-1 on) follow the one-process
    run: main loss, gradient norm, validation loss, aux loss, z-loss, tokens per expert.
    A checkpoint of ep=2 resumes under ep=4."""
    expected = one_process(MOE)
    assert expected[0]["aux_loss"] > 0 and expected[0]["z_loss"] > 0
    for nproc, flags in [(2, ["--ep", "2", "--save", str(tmp_path / "ck"), "--save-every", "5"]),
                         (4, ["--ep", "4"]), (4, ["--ep", "2", "--tp", "2"]),
                         (4, ["--ep", "2", "--pp", "2"])]:
        got, stdout = train_on(ranks, nproc, MOE + flags)
        assert_same_run(got, expected, keys=ROUTER_FIGURES)
        assert "tokens/expert" in stdout and "aux" in stdout
        assert got[0]["all_to_all_bytes"] > 0
    resumed, _ = train_on(ranks, 4, MOE + ["--ep", "4", "--load", str(tmp_path / "ck" / "step_00000005")])
    assert_same_run(resumed, expected[5:], keys=ROUTER_FIGURES)


def test_capacity_drops_the_same_tokens_under_expert_and_context_parallelism(ranks):
    """--moe-capacity-factor: each expert keeps the first choices of a micro-batch's whole
    sequences, so ep=2 x cp=2 drops what the one process drops (and trains the same)."""
    argv = MOE + ["--moe-capacity-factor", "1.0"]
    expected = one_process(argv)
    assert all(r["dropped_fraction"] > 0.05 for r in expected)
    got, _ = train_on(ranks, 4, argv + ["--ep", "2", "--cp", "2"])
    assert_same_run(got, expected, keys=ROUTER_FIGURES)


@pytest.mark.parametrize("argv,message", [
    (["--model", "mixtral", "--ep", "3"], "--ep 3 must divide dp*cp = 1*1 = 1"),
    (["--model", "llama", "--ep", "2"], "needs a mixture-of-experts model"),
    (["--model", "llama", "--moe-capacity-factor", "1.5"], "apply to mixture-of-experts models"),
    (["--model", "mixtral", "--moe-capacity-factor", "-1"], "must be >= 0"),
    (["--model", "mixtral", "--tp", "2", "--etp", "3", "--world-size", "2"], "--etp 3 must divide --tp 2"),
    (["--model", "llama", "--etp", "1"], "needs a mixture-of-experts model"),
    (["--model", "mixtral", "--tp", "2", "--etp", "1", "--precision", "fp8", "--world-size", "2"],
     "--precision fp8 with --etp 1 below --tp 2 is not supported yet"),
])
def test_bad_expert_flags_are_one_line(capsys, argv, message):
    assert message in one_line_error(capsys, argv + ["--config", "test"])


def test_ep_not_dividing_the_experts_is_one_line_on_every_rank(ranks):
    """Found by the model on each rank, after the process groups exist: every rank stops
    with the same message and status 2 (rank 0 prints it)."""
    results = ranks(2).run(main_job, argv=["--model", "mixtral", *LAYOUT, "--ep", "2",
                                           "--set", "n_experts=3"])
    assert [code for code, _ in results.values()] == [2, 2]
    assert results[0][1].strip() == "error: n_experts=3 is not divisible by --ep 2; choose an " \
                                    "--ep that divides it"
