import json

import bench


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
