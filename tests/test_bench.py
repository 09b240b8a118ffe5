import json

import pytest

import bench
import metrics


def test_train_vs_hf_runs_and_checks_logits(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["train-vs-hf", "--config", "test", "--seq-len", "64", "--batch-size", "2",
                "--steps", "2", "--warmup", "1", "--block", "1", "--device", "cpu",
                "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["mode"] == "train-vs-hf" and report["threads"] >= 1
    results = report["results"]
    assert results["logits_check"] == "passed" and results["logits_max_abs_diff"] <= 1e-4
    for name in ("ours", "hf"):
        assert results[name]["tokens_per_s"] > 0
    assert results["ours"]["params_m"] == results["hf"]["params_m"]
    assert "train-vs-hf: ours" in capsys.readouterr().out


def test_moe_ep_counts_all_to_all_bytes(tmp_path, capsys):
    out = tmp_path / "moe.json"
    bench.main(["moe-ep", "--config", "test", "--world", "1", "2", "--seq-len", "32",
                "--global-batch", "4", "--steps", "1", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [(r["world"], r["ep"]) for r in rows] == [(1, 1), (2, 1), (2, 2)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["a2a_mb"] == rows[1]["a2a_mb"] == 0 < rows[2]["a2a_mb"]
    # Counted at the all_to_all calls = the model's own count + the exchanged expert
    # counts: 2 ranks x 2 layers x 2 int64 counts sent to the other rank.
    assert abs((rows[2]["a2a_mb"] - rows[2]["model_mb"]) * 2**20 - 2 * 2 * 2 * 8) < 1e-6
    assert "tokens/s vs one process" in capsys.readouterr().out


def test_kernels_runs_on_cpu(tmp_path, capsys):
    """On a CPU `bench.py kernels` times the reference paths at small shapes, so the
    command a GPU machine runs is exercised everywhere."""
    out = tmp_path / "kernels.json"
    bench.main(["kernels", "--device", "cpu", "--seq-lens", "64", "--reps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert {r["kernel"] for r in rows} == {"attention", "attention-t5", "rmsnorm", "swiglu", "linear_cross_entropy"}
    assert all(r["ms"] > 0 for r in rows)
    chunked, reference = (next(r for r in rows if r.get("impl") == name) for name in ("chunked", "reference"))
    assert chunked["kept_mib"] < reference["kept_mib"] / 4  # dx and dW instead of every logit
    assert "linear_cross_entropy" in capsys.readouterr().out


def test_a_failing_part_keeps_the_others_and_a_killed_run_keeps_its_rows(tmp_path, monkeypatch, capsys):
    """A GPU is lent for minutes: each row is printed and written to --json as it is
    measured, a part that raises is recorded and the next part runs (exit status 1), and a
    run stopped mid-way (here Ctrl-C in the loss's part) leaves the rows measured before."""
    out = tmp_path / "kernels.json"
    argv = ["kernels", "--device", "cpu", "--seq-lens", "64", "--reps", "1", "--json", str(out)]

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(bench, "bench_attention_t5", broken)
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 1
    record = json.loads(out.read_text())
    assert record["complete"] and record["failed"] == ["attention-t5"]
    kinds = [r.get("kernel") or r["section"] for r in record["results"]]
    assert set(kinds) == {"attention", "attention-t5", "rmsnorm", "swiglu", "linear_cross_entropy"}
    assert "an illegal memory access" in next(r["error"] for r in record["results"] if "error" in r)
    printed = capsys.readouterr()
    assert "row: kernel=attention, pass=fwd" in printed.out and "1 part(s) failed: attention-t5" in printed.err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "bench_cross_entropy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    record = json.loads(out.read_text())
    assert not record["complete"]
    assert {r.get("kernel") for r in record["rows"]} == {"attention", None, "rmsnorm", "swiglu"}


def test_long_context_measures_both_models(tmp_path, capsys):
    out = tmp_path / "long.json"
    bench.main(["long-context", "--device", "cpu", "--seq-lens", "64", "128", "--reps", "1",
                "--mamba-config", "test", "--mamba-set", "--llama-config", "test", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [(r["model"].split()[0], r["seq_len"]) for r in rows] == [
        ("mamba", 64), ("mamba", 128), ("llama", 64), ("llama", 128)]
    assert all(r["ms"] > 0 and r["kb_per_token"] > 0 for r in rows)
    assert "summary: from seq 64 to 128" in capsys.readouterr().out


def test_fp8_gemm_reports_the_emulation_cost_on_cpu(tmp_path, capsys):
    """On a CPU `bench.py fp8-gemm` times what the emulation costs (quantize + the reference)
    against an fp32 matmul; on a GPU the same command times the Triton GEMM."""
    out = tmp_path / "fp8.json"
    bench.main(["fp8-gemm", "--device", "cpu", "--shapes", "64x32x48", "32x16x16", "--reps", "1",
                "--json", str(out)])
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [(r["M"], r["N"], r["K"]) for r in rows] == [(64, 32, 48), (32, 16, 16)]
    assert all(r["quantize_ms"] > 0 and r["emulated_matmul_ms"] > 0 and r["fp32_ms"] > 0 for r in rows)
    assert all(r["emulation_vs_fp32"] > 0 for r in rows)
    assert "the time of the fp32 matmul it stands for" in capsys.readouterr().out


def test_fp8_curve_compares_each_recipe_with_fp32(tmp_path, capsys):
    out = tmp_path / "curve.json"
    bench.main(["fp8-curve", "--config", "test", "--steps", "3", "--warmup", "1", "--seq-len", "32",
                "--batch-size", "4", "--skip-bf16", "--recipes", "tensorwise", "rowwise",
                "--device", "cpu", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["run"] for r in results["rows"]] == [
        "fp32", "fp8 tensorwise: every layer, rest fp32", "fp8 rowwise: every layer, rest fp32"]
    fp32 = results["curves"]["fp32"]
    for row in results["rows"][1:]:
        curve = results["curves"][row["run"]]
        assert curve != fp32 and 0 < row["max_rel"] < 0.05
    assert "fp8-curve: llama/test, 3 steps" in capsys.readouterr().out


def test_plot_draws_the_curves_of_several_runs(tmp_path, capsys):
    """Two --metrics files (a header record, then steps; validation every other step) ->
    one PNG; a file without steps is one line."""
    pytest.importorskip("matplotlib")
    files = []
    for name, scale in (("a", 1.0), ("b", 1.1)):
        header = {"start_step": 0, "args": {"model": "llama"}, "precision": "bf16",
                  "layout": f"world=2 tp={1 + (name == 'b')} cp=1 dp={2 - (name == 'b')} pp=1 ep=1 device=cpu"}
        records = [{"run": header}] + [
            {"step": s, "loss": scale * 5 / s, "lr": 1e-3, "tokens_per_s": 1000.0 * scale,
             "tokens_seen": 256 * s, **({"val_loss": scale * 5.5 / s} if s % 2 == 0 else {})}
            for s in range(1, 11)]
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "curves.png"
    bench.main(["plot", *map(str, files), "-o", str(out), "--x", "tokens"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
    # The legend says what each file ran (its header), not only its name.
    assert [metrics.describe_run(f) for f in files] == ["llama dp=2 bf16", "llama tp=2 bf16"]
    (tmp_path / "empty.jsonl").write_text('{"run": {}}\n')
    with pytest.raises(SystemExit):
        bench.main(["plot", str(tmp_path / "empty.jsonl"), "-o", str(out)])
    assert "holds no step records" in capsys.readouterr().err


def test_mfu_runs_on_cpu_eager_and_compiled(tmp_path, capsys):
    """On a CPU `bench.py mfu` trains the test llama at a tiny shape, eager and compiled,
    and says that its MFU is a CPU figure."""
    out = tmp_path / "mfu.json"
    # (the shape of tests/test_compile.py's runs: torch.compile's cache holds its graphs)
    bench.main(["mfu", "--device", "cpu", "--steps", "1", "--warmup", "1", "--seq-len", "32",
                "--batch-size", "8", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["kernels"], r["compile"]) for r in results["rows"]] == [("torch", "no"), ("torch", "yes")]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in results["rows"])
    eager, compiled = results["rows"]
    assert abs(eager["loss"] - compiled["loss"]) <= 1e-5 * abs(eager["loss"])
    assert "CPU figure" in capsys.readouterr().out


def test_train_vs_hf_compile_and_moe_grouped_vs_loop(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["train-vs-hf", "--config", "test", "--seq-len", "32", "--batch-size", "8", "--steps", "1",
                "--warmup", "1", "--block", "1", "--device", "cpu", "--compile", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert results["compiled"]["tokens_per_s"] > 0 and results["compiled_vs_eager"] > 0
    assert abs(results["compiled"]["loss_last"] - results["ours"]["loss_last"]) <= 1e-5 * results["ours"]["loss_last"]
    bench.main(["moe-ep", "--config", "test", "--world", "1", "--seq-len", "32", "--global-batch", "4",
                "--steps", "1", "--device", "cpu", "--json", str(out)])
    (row,) = json.loads(out.read_text())["results"]["rows"]
    assert row["loop_step_s"] > 0 and row["grouped_speedup"] > 0
    assert "grouped matmuls (mixtral.Experts) vs their reference loop" in capsys.readouterr().out


def test_megatron_memory_reproduces_megatrons_count_and_the_planner_is_within_it(tmp_path, capsys):
    """The formula as written in bench.py gives Megatron's own numbers for stage 0
    (weights + gradients + optimizer, activations; GiB, as its theoretical_memory_usage.py
    prints them for Korthikanti et al.'s layouts and llama3-70b), and the planner's stage
    0 on each layout is within 1.1x of it."""
    out = tmp_path / "megatron.json"
    bench.main(["megatron-memory", "--json", str(out)])
    rows = {r["layout"]: r for r in json.loads(out.read_text())["results"]["rows"]}
    published = {"gpt3-22b": (46.2, 9.8), "gpt3-175b": (46.9, 9.6), "llama3-70b": (25.4, 20.0)}
    for layout, (static, acts) in published.items():
        assert round(rows[layout]["megatron_static"], 1) == static, rows[layout]
        assert round(rows[layout]["megatron_acts"], 1) == acts, rows[layout]
    assert set(rows) == {*published, "llama3-8b"}
    assert all(r["ratio"] <= 1.1 for r in rows.values()), rows
    assert "summary: the planner's stage 0 is" in capsys.readouterr().out
