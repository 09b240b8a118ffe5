"""Pipeline parallelism: the schedules on paper, then training under torchrun against
the one-process run."""
import pytest

import parallel
from test_train import FAST, assert_same_curve, losses, one_line_error, run

FOUR_LAYERS = [*FAST, "--set", "n_layers=4", "--micro-batch-size", "1"]


def simulate(schedule, pp, vpp, n_micro):
    """Run every rank's action list against the pipeline's data dependencies, as the
    real runner would (sends never block, receives wait); return the largest number of
    micro-batches whose activations each rank holds at once. Fails on a deadlock."""
    layouts = [parallel.Layout(pp=pp, vpp=vpp, rank=r) for r in range(pp)]
    actions = [parallel.SCHEDULES[schedule](n_micro, lay) for lay in layouts]
    n_chunks = pp * vpp
    for rank, acts in enumerate(actions):  # each (kind, micro, chunk) exactly once
        expected = {(k, m, c) for k in "FB" for m in range(n_micro) for c in range(vpp)}
        assert sorted(acts) == sorted(expected), f"rank {rank}"
    done, position = set(), [0] * pp
    alive, peak = [0] * pp, [0] * pp
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
            if ready:
                done.add((kind, micro, chunk))
                alive[r] += 1 if kind == "F" else -1
                peak[r] = max(peak[r], alive[r])
                position[r] += 1
                progressed = True
        assert progressed, f"deadlock: {schedule} pp={pp} vpp={vpp} micro={n_micro}"
    return peak


@pytest.mark.parametrize("pp,n_micro", [(2, 1), (2, 3), (4, 4), (4, 8), (3, 7)])
def test_1f1b_and_gpipe_run_and_1f1b_bounds_memory(pp, n_micro):
    peak_1f1b = simulate("1f1b", pp, 1, n_micro)
    peak_gpipe = simulate("gpipe", pp, 1, n_micro)
    assert peak_gpipe == [n_micro] * pp  # GPipe holds every micro-batch
    assert all(peak_1f1b[r] <= min(pp - r, n_micro) for r in range(pp))


@pytest.mark.parametrize("pp,vpp,n_micro", [(2, 2, 2), (2, 2, 6), (4, 2, 8), (2, 3, 4), (4, 3, 4)])
def test_interleaved_schedule_runs(pp, vpp, n_micro):
    simulate("interleaved", pp, vpp, n_micro)


def test_interleaved_needs_micro_batches_in_multiples_of_pp():
    with pytest.raises(parallel.UsageError, match="multiple of pp=4"):
        parallel.schedule_interleaved_1f1b(6, parallel.Layout(pp=4, vpp=2))


def test_stage_split_messages_and_uneven_split():
    with pytest.raises(parallel.UsageError, match="not divisible by pp\\*vpp = 4"):
        parallel.pipeline_chunks(6, pp=2, vpp=2)
    assert parallel.pipeline_chunks(6, pp=2, layers_per_chunk=[2, 4]) == [[0, 1], [2, 3, 4, 5]]
    with pytest.raises(parallel.UsageError, match="add up to n_layers=6"):
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
def test_pipeline_parallel_equals_one_process(tmp_path, model, overrides, layouts):
    reference = tmp_path / "reference.jsonl"
    run(["--model", model, *FOUR_LAYERS, *overrides, "--metrics", str(reference)])
    expected = losses(reference)
    for nproc, flags in layouts:
        metrics = tmp_path / ("-".join([str(nproc), *flags]).replace("--", "") + ".jsonl")
        run(["--model", model, *FOUR_LAYERS, *overrides, *flags, "--metrics", str(metrics)], nproc=nproc)
        assert_same_curve(losses(metrics), expected)


def test_resume_under_pipeline_parallelism(tmp_path):
    full = tmp_path / "full.jsonl"
    run(["--model", "gpt", *FOUR_LAYERS, "--pp", "2", "--metrics", str(full)], nproc=2)
    ckpt = tmp_path / "ckpt"
    run(["--model", "gpt", *FOUR_LAYERS, "--pp", "2", "--save", str(ckpt), "--save-every", "5"], nproc=2)
    resumed = tmp_path / "resumed.jsonl"
    run(["--model", "gpt", *FOUR_LAYERS, "--pp", "2", "--load", str(ckpt / "step_00000005"),
         "--metrics", str(resumed)], nproc=2)
    assert_same_curve(losses(resumed), losses(full)[5:], rel=1e-6)


def test_vpp_without_pp_is_one_line(capsys):
    assert "--vpp needs pipeline parallelism" in one_line_error(
        capsys, ["--model", "llama", *FOUR_LAYERS, "--vpp", "2"])
