"""Pipeline parallelism: the schedules on paper (dependencies, memory, and the order of
messages between every pair of ranks), then training against the one-process run."""
import pytest

import memory
import parallel
from conftest import LAYOUT, assert_same_run, check_layouts, one_line_error, one_process, train_on
from errors import UsageError

FOUR_LAYERS = [*LAYOUT, "--set", "n_layers=4", "--micro-batch-size", "1", "--steps", "5"]


def simulate(schedule, pp, vpp, n_micro):
    """Run every rank's action list against the pipeline's data dependencies, as
    run_schedule would (sends never block, receives wait); return the largest number of
    micro-batches whose activations each rank holds at once. Fails on a deadlock, and
    when a rank sends a peer its messages in another order than the peer receives them
    (NCCL ignores tags and matches a pair's messages in order)."""
    layouts = [parallel.Layout(pp=pp, vpp=vpp, rank=r) for r in range(pp)]
    actions = [parallel.SCHEDULES[schedule](n_micro, lay) for lay in layouts]
    n_chunks = pp * vpp
    for rank, acts in enumerate(actions):  # each (kind, micro, chunk) exactly once
        expected = {(k, m, c) for k in "FB" for m in range(n_micro) for c in range(vpp)}
        assert sorted(acts) == sorted(expected), f"rank {rank}"
    done, position = set(), [0] * pp
    alive, peak = [0] * pp, [0] * pp
    sent, received = {}, {}  # (from rank, to rank) -> messages in issue order
    while any(position[r] < len(actions[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if position[r] == len(actions[r]):
                continue
            kind, micro, local = actions[r][position[r]]
            chunk = local * pp + r
            if kind == "F":
                ready = chunk == 0 or ("F", micro, chunk - 1) in done
            else:
                ready = ("F", micro, chunk) in done and (
                    chunk == n_chunks - 1 or ("B", micro, chunk + 1) in done)
            if not ready:
                continue
            # What run_schedule receives first and sends after this action's compute.
            forward = kind == "F"
            source = chunk - 1 if forward else chunk + 1
            if 0 <= source < n_chunks:
                received.setdefault((source % pp, r), []).append((kind, micro, source))
            target = chunk + 1 if forward else chunk - 1
            if 0 <= target < n_chunks:
                sent.setdefault((r, target % pp), []).append((kind, micro, chunk))
            done.add((kind, micro, chunk))
            alive[r] += 1 if forward else -1
            peak[r] = max(peak[r], alive[r])
            position[r] += 1
            progressed = True
        assert progressed, f"deadlock: {schedule} pp={pp} vpp={vpp} micro={n_micro}"
    assert sent.keys() == received.keys()
    for pair in sent:
        assert sent[pair] == received[pair], f"{schedule} pp={pp} vpp={vpp}: ranks {pair} " \
                                             f"send and receive in different orders"
    return peak


@pytest.mark.parametrize("pp,n_micro", [(2, 1), (2, 3), (4, 4), (4, 8), (3, 7)])
def test_1f1b_and_gpipe_run_and_1f1b_bounds_memory(pp, n_micro):
    peak_1f1b = simulate("1f1b", pp, 1, n_micro)
    peak_gpipe = simulate("gpipe", pp, 1, n_micro)
    assert peak_gpipe == [n_micro] * pp  # GPipe holds every micro-batch
    assert peak_1f1b == [min(pp - r, n_micro) for r in range(pp)]
    # The memory planner's count of micro-batches in flight is the simulated peak.
    for schedule, peak in (("1f1b", peak_1f1b), ("gpipe", peak_gpipe)):
        assert [memory.in_flight(schedule, pp, 1, r, n_micro) for r in range(pp)] == peak


@pytest.mark.parametrize("pp,vpp,n_micro", [(2, 2, 2), (2, 2, 6), (4, 2, 8), (2, 3, 4), (4, 3, 4),
                                            (4, 2, 4), (3, 2, 9)])
def test_interleaved_schedule_runs_and_the_planner_counts_its_peak(pp, vpp, n_micro):
    """Chunk forwards alive at once on each rank = the planner's micro-batches in flight."""
    peak = simulate("interleaved", pp, vpp, n_micro)
    assert [memory.in_flight("interleaved", pp, vpp, r, n_micro) for r in range(pp)] == peak


def test_simulation_sees_messages_out_of_order(monkeypatch):
    """The order check can fail: swap rank 0's forwards of micro-batches 0 and 1 on its
    second chunk (its sends to rank 1 then cross rank 1's receives) and it does."""
    schedule = parallel.SCHEDULES["interleaved"]

    def swapped(n_micro, layout):
        actions = schedule(n_micro, layout)
        if layout.pp_rank == 0:
            i = actions.index(("F", 0, 1))
            j = actions.index(("F", 1, 1))
            actions[i], actions[j] = actions[j], actions[i]
        return actions
    monkeypatch.setitem(parallel.SCHEDULES, "interleaved", swapped)
    with pytest.raises(AssertionError, match="different orders"):
        simulate("interleaved", 2, 2, 4)


def test_interleaved_needs_micro_batches_in_multiples_of_pp():
    with pytest.raises(UsageError, match="multiple of pp=4"):
        parallel.schedule_interleaved_1f1b(6, parallel.Layout(pp=4, vpp=2))


def test_stage_split_messages_and_uneven_split():
    with pytest.raises(UsageError, match="not divisible by pp\\*vpp = 4"):
        parallel.pipeline_chunks(6, pp=2, vpp=2)
    assert parallel.pipeline_chunks(6, pp=2, layers_per_chunk=[2, 4]) == [[0, 1], [2, 3, 4, 5]]
    with pytest.raises(UsageError, match="add up to n_layers=6"):
        parallel.pipeline_chunks(6, pp=2, layers_per_chunk=[2, 3])


@pytest.mark.parametrize("model,overrides,layouts", [
    ("llama", [], [(2, ["--pp", "2"]), (4, ["--pp", "4"]), (2, ["--pp", "2", "--vpp", "2"]),
                   (2, ["--pp", "2", "--pp-schedule", "gpipe"]),
                   (2, ["--pp", "2", "--pp-layers", "1,3"]),
                   (8, ["--pp", "2", "--tp", "2"])]),              # pp=2 x tp=2 x dp=2
    ("llama", ["--set", "tie_embeddings=true"], [(2, ["--pp", "2", "--vpp", "2"]),
                                                 (4, ["--pp", "2", "--tp", "2", "--no-sp"])]),
    ("gpt", [], [(2, ["--pp", "2"]), (4, ["--pp", "2", "--no-zero1"])]),   # tied; pp=2 x dp=2
])
def test_pipeline_parallel_equals_one_process(ranks, model, overrides, layouts):
    """Loss, gradient norm every step, and the validation loss (forward only) at the end."""
    argv = ["--model", model, *FOUR_LAYERS, *overrides]
    check_layouts(ranks, argv, layouts)


@pytest.mark.parametrize("overrides", [[], ["--no-sp", "--set", "qk_norm=true"]], ids=["sp", "qk-norm"])
def test_interleaved_pipeline_times_tensor_parallel(ranks, overrides):
    """vpp x tp: the last backward of a step touches one local chunk only, yet each
    partial gradient (sequence-parallel norms, QK-norms) is summed over tp exactly once.
    (Summed twice, the gradient norm differed from one process at step 1.)"""
    argv = ["--model", "llama", *FOUR_LAYERS, *overrides]
    got, _ = train_on(ranks, 4, argv + ["--pp", "2", "--vpp", "2", "--tp", "2"])
    assert_same_run(got, one_process(argv))


def test_resume_under_pipeline_parallelism(ranks, tmp_path):
    argv = ["--model", "gpt", *FOUR_LAYERS, "--pp", "2", "--steps", "8"]
    full, _ = train_on(ranks, 2, argv)
    train_on(ranks, 2, argv + ["--save", str(tmp_path / "ckpt"), "--save-every", "5"])
    resumed, _ = train_on(ranks, 2, argv + ["--load", str(tmp_path / "ckpt" / "step_00000005")])
    assert [r["step"] for r in resumed] == [6, 7, 8]
    assert_same_run(resumed, full[5:], rel=1e-6)


def test_vpp_without_pp_is_one_line(capsys):
    assert "--vpp needs pipeline parallelism" in one_line_error(
        capsys, ["--model", "llama", *FOUR_LAYERS, "--vpp", "2"])
