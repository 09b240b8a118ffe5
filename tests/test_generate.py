"""Decoding: the rolling KV cache of sliding-window models, batched generation of prompts
of different lengths, stop strings and streaming, the CLI, and tensor parallelism.

Every decoding path is checked against a slower one that is obviously right: the
rolling cache against the full cache and the full forward, a padded batch against each
prompt alone, tp = 2 against one process."""
import contextlib
import io
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import convert
import data
import generate
import kernels
import models
import train
from conftest import FAST, ROOT, assert_same_logits


def build(name, preset="test", **overrides):
    cfg = models.make_config(name, preset, [f"{k}={v}" for k, v in overrides.items()])
    return models.build(name, cfg, torch.device("cpu"), seed=0).eval()


def random_ids(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------
# The rolling cache: bounded by the window, and the same logits at every step
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_rolling_cache_equals_full_cache_and_full_forward(name):
    window, prompt_len, steps = 8, 20, 20  # a prompt longer than the window and the buffer (2 x 8)
    model = build(name, sliding_window=window)
    ids = torch.tensor(random_ids(prompt_len + steps))
    with torch.no_grad():
        full_forward = model(ids)
        rolling = model.new_kv_caches(prompt_len + steps)
        full = [kernels.KVCache(prompt_len + steps) for _ in model.layers]
        for caches in (rolling, full):
            logits = [model(ids[:, :prompt_len], kv_caches=caches)]
            for t in range(prompt_len, prompt_len + steps):  # the buffer wraps every ~window tokens
                logits.append(model(ids[:, t:t + 1], kv_caches=caches))
                assert_same_logits(logits[-1][:, -1], full_forward[:, t])
            assert_same_logits(torch.cat(logits, 1), full_forward)
    assert rolling[0].k.shape[2] == 2 * window and rolling[0].length == prompt_len + steps
    assert full[0].k.shape[2] == prompt_len + steps


def test_rolling_cache_memory_is_bounded_by_the_window():
    cache = kernels.KVCache(max_len=10_000, window=4)
    for t in range(100):  # keys numbered by position: the kept ones must be the last ones
        k, _, mask = cache.update(*[torch.full((1, 1, 1, 2), float(t))] * 2)
        assert k[0, 0, :, 0].tolist() == [float(p) for p in range(max(0, t - cache.filled + 1), t + 1)]
        assert k.shape[2] >= min(t + 1, 4) and mask is None
    assert cache.nbytes() == 2 * 8 * 2 * 4  # 2 x window slots of k and v, whatever the length


# ----------------------------------------------------------------------------
# Batched generation: a padded batch equals each prompt alone
# ----------------------------------------------------------------------------

def logits_of_each_call(model):
    """A forward hook collecting the last position's logits of every call."""
    calls = []
    return calls, model.register_forward_hook(lambda m, args, out: calls.append(out[:, -1].clone()))


@pytest.mark.parametrize("name,preset,overrides", [
    ("gpt", "test", {}), ("llama", "test", {}), ("llama", "test", {"sliding_window": 4}),
    ("mixtral", "test", {}), ("mamba", "test", {}), ("mamba", "test-mamba1", {}),
    ("mamba", "test-hybrid", {}),
], ids=["gpt", "llama", "mistral", "mixtral", "mamba2", "mamba1", "mamba-hybrid"])
def test_batch_equals_one_prompt_at_a_time(name, preset, overrides):
    model = build(name, preset, **overrides)
    prompts, steps = random_ids(5, 11, 1, 8), 6
    calls, hook = logits_of_each_call(model)
    batch = generate.sample_batch(model, prompts, steps, temperature=0)
    batch_logits = torch.stack(calls)  # (steps, rows, vocab): no row finished, none left
    alone = []
    for i, prompt in enumerate(prompts):
        calls.clear()
        alone.append(generate.sample_batch(model, [prompt], steps, temperature=0)[0])
        torch.testing.assert_close(batch_logits[:, i], torch.cat(calls), rtol=1e-4, atol=1e-5)
    hook.remove()
    assert batch == alone
    # Row 1 ends after 2 tokens and leaves the batch (and the caches): the others go on alike.
    dropped = generate.sample_batch(model, prompts, steps, temperature=0,
                                    finished=lambda i, new: i == 1 and len(new) == 2)
    assert dropped == [alone[0], alone[1][:2], *alone[2:]]


# ----------------------------------------------------------------------------
# Stop strings, end-of-text, streaming: a scripted model over the byte tokenizer
# ----------------------------------------------------------------------------

class Script:
    """ScriptModel's cache: which script each row of the batch plays, and the step."""

    def __init__(self):
        self.rows, self.step = None, 0

    def keep_rows(self, rows):
        self.rows = [self.rows[r] for r in rows.tolist()]


class ScriptModel(nn.Module):
    """Emits the token ids of its scripts (one per prompt), whatever the prompts: a model
    whose text the test knows. Records the batch size of every call."""

    def __init__(self, *texts):
        super().__init__()
        self.cfg = models.make_config("llama", "test")
        self.scripts = [list(t.encode()) if isinstance(t, str) else t for t in texts]
        self.weight = nn.Parameter(torch.zeros(1))
        self.batch_sizes = []

    def new_kv_caches(self, max_len):
        return [Script()]

    def forward(self, input_ids, attention_mask=None, kv_caches=None, positions=None):
        script = kv_caches[0]
        script.rows = list(range(input_ids.shape[0])) if script.rows is None else script.rows
        self.batch_sizes.append(input_ids.shape[0])
        tokens = torch.tensor([self.scripts[r][script.step] for r in script.rows])
        script.step += 1
        return nn.functional.one_hot(tokens, 257).float()[:, None]


EOT = [256]


def test_sampling_draws_from_the_tempered_top_k_distribution():
    """100,000 seeded draws from one row of logits: each token's share is its probability
    under exp(logit / temperature), renormalized over the top_k largest logits (written out
    here, not taken from generate.py), within 5 standard deviations; a token outside the
    top k is never drawn; temperature 0 is the argmax."""
    row = [2.0, 1.0, 0.5, 0.0, -1.0, 3.0]
    n = 100_000
    generator = torch.Generator().manual_seed(0)
    for temperature, top_k in ((1.0, 0), (0.5, 3), (2.0, 2), (0.7, 5), (1.0, 1)):
        draws = generate.next_token(torch.tensor([row]).expand(n, -1), temperature, top_k, generator)
        counts = torch.bincount(draws.view(-1), minlength=len(row)).double()
        kept = sorted(range(len(row)), key=lambda i: -row[i])[:top_k or len(row)]
        weights = torch.tensor([math.exp(v / temperature) if i in kept else 0.0 for i, v in enumerate(row)],
                               dtype=torch.float64)
        p = weights / weights.sum()
        assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt()).all(), (temperature, top_k, counts)
    assert generate.next_token(torch.tensor([row, row[::-1]]), 0, 2).view(-1).tolist() == [5, 0]
    # A temperature so small that logit / temperature overflows: the limit, greedy (no NaN).
    assert generate.next_token(torch.tensor([row, row[::-1]]), 1e-40, 0, generator).view(-1).tolist() == [5, 0]


def test_no_new_tokens_is_the_empty_continuation():
    """--max-new-tokens 0: nothing added, for a decoder and for T5's spans alike."""
    t5 = models.build("t5", models.make_config("t5", "test"), "cpu", seed=0)
    assert generate.fill_spans_text(t5, "byte", "hi <extra_id_0>", 0) == ""
    llama = models.build("llama", models.make_config("llama", "test"), "cpu", seed=0)
    assert generate.generate(llama, data.get_tokenizer("byte"), ["hi"], 0) == ["hi"]


def test_stop_strings_and_end_of_text_end_each_row_and_leave_the_batch():
    tokenizer = data.get_tokenizer("byte")
    model = ScriptModel(": one, two. three", list(b"= four") + EOT + list(b"x"), "; five, six.")
    texts = generate.generate(model, tokenizer, ["A", "B", "C"], 40, temperature=0, stop=[".", "ix"])
    assert texts == ["A: one, two", "B= four", "C; five, s"]  # ".", end-of-text, "ix"
    assert model.batch_sizes == [3] * 7 + [2] * 4  # B ends after 7 tokens, A and C after 11
    model = ScriptModel("; five, six.")
    assert generate.generate(model, tokenizer, ["C"], 40, temperature=0, stop=["ix", "v"]) == ["C; fi"]
    model = ScriptModel("; five, six.")
    assert generate.generate(model, tokenizer, ["C"], 5, temperature=0) == ["C; fiv"]


def test_streaming_prints_complete_characters_only():
    tokenizer = data.get_tokenizer("byte")
    pieces = []
    text = generate.generate(ScriptModel(list("é🙂 ok".encode()) + EOT), tokenizer, ["A"], 40,
                             temperature=0, stream=pieces.append)[0]
    assert pieces == ["é", "🙂", " ", "o", "k"] and text == "A" + "".join(pieces)
    pieces.clear()  # a stop string is never shown, not even its first characters
    text = generate.generate(ScriptModel("é🙂 ok"), tokenizer, ["A"], 40, 0, stop=[" o"],
                             stream=pieces.append)[0]
    assert "".join(pieces) == "é🙂" and text == "Aé🙂"


# ----------------------------------------------------------------------------
# The CLI, one process and tensor-parallel
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-step checkpoint of the test llama and its Hugging Face export."""
    root = tmp_path_factory.mktemp("generate")
    ckpt, hf = str(root / "ckpt"), str(root / "hf")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--model", "llama", *FAST, "--steps", "1", "--save", ckpt])
        convert.main(["export", ckpt, hf])
    return {"ckpt": ckpt, "hf": hf, "root": root}


def test_cli_several_prompts_and_a_prompts_file(capsys, saved):
    prompts_file = saved["root"] / "prompts.txt"
    prompts_file.write_text("def main(\n\nimport os\n")
    generate.main(["--load", saved["ckpt"], "--prompt", "Hello", "--prompts-file", str(prompts_file),
                   "--max-new-tokens", "8", "--seed", "3", "--stop", "zz"])
    out, err = capsys.readouterr()
    model, name = generate.load_model(saved["ckpt"])
    expected = generate.generate(model, data.get_tokenizer(name), ["Hello", "def main(", "import os"], 8,
                                 stop=["zz"], seed=3)
    assert out == "\n----------------\n".join(expected) + "\n"
    assert "tokens/s (3 prompt(s)" in err


def test_stop_strings_take_the_escapes_people_type(capsys, saved, monkeypatch):
    """`--stop "\\n"` in a shell passes a backslash and an n: it means a newline, as the
    README and --help write it (and \\t a tab, \\\\ a backslash; anything else as written)."""
    assert generate.unescape(r"\n\n") == "\n\n" and generate.unescape(r"a\tb\\n") == "a\tb\\n"
    assert generate.unescape("é\\x") == "é\\x"
    seen = []
    def fake(model, tokenizer, prompts, max_new_tokens, temperature, top_k, stop, seed, stream, stats):
        seen.append(stop)
        stats["new_tokens"] = 0
        return ["text"] * len(prompts)
    monkeypatch.setattr(generate, "generate", fake)
    generate.main(["--load", saved["ckpt"], "--prompt", "a", "--prompt", "b", "--stop", r"\n\n", "--stop", "x"])
    assert seen == [["\n\n", "x"]]


def test_help_says_each_default_once(capsys):
    for main in (train.main, generate.main, lambda argv: data.main(["prepare", *argv])):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        assert "(default: None)" not in out and not re.search(r"\(default[^)]*\)\s*\(default", out), out


def test_cli_streams_one_prompt_and_loads_hf_folders(capsys, saved):
    outs = []
    for load in (saved["ckpt"], saved["hf"], "hf:" + saved["hf"]):
        generate.main(["--load", load, "--prompt", "Hello", "--max-new-tokens", "12", "--seed", "1"])
        outs.append(capsys.readouterr().out)
    model, name = generate.load_model(saved["ckpt"])
    expected = generate.sample_text(model, data.get_tokenizer(name), "Hello", 12, seed=1)
    assert outs == [expected + "\n"] * 3


def cli_job(argv):
    """generate.main(argv) on a rank: its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate.main(argv)
    return out.getvalue()


def greedy_by_full_forward(load, prompts, n):
    """What the CLI must print for these prompts at temperature 0, from the obviously right
    decoder: the whole sequence through the model at every step (no cache, no batch, none
    of generate.py's sampling), its last position's argmax appended, up to end-of-text."""
    model, name = generate.load_model(load)
    tokenizer = data.get_tokenizer(name)
    texts = []
    for prompt in prompts:
        ids, new = tokenizer.encode_ordinary(prompt), []
        with torch.no_grad():
            while len(new) < n and (token := int(model(torch.tensor([ids + new]))[0, -1].argmax())) != \
                    tokenizer.eot_token:
                new.append(token)
        texts.append(prompt + tokenizer.decode([t for t in new if t < tokenizer.n_vocab]))
    return "\n----------------\n".join(texts) + "\n"


@pytest.mark.parametrize("source", ["ckpt", "hf"])
def test_tensor_parallel_text_equals_one_process(ranks, saved, source):
    for flags in (["--temperature", "0"], ["--temperature", "1", "--seed", "5"]):
        argv = ["--load", saved[source], "--prompt", "Hello", "--prompt", "a", "--max-new-tokens", "10",
                "--device", "cpu", *flags]
        expected = cli_job(argv)
        got = ranks(2).run(cli_job, argv=argv + ["--tp", "2"])
        assert got == {0: expected, 1: ""}  # the same text, printed by rank 0 only
        if flags[1] == "0":
            assert expected == greedy_by_full_forward(saved[source], ["Hello", "a"], 10)


def test_expert_parallel_text_equals_one_process(ranks, tmp_path):
    """ep 2, and tp 2 of a Qwen3-MoE with one KV head (on both tp ranks)."""
    ckpt = str(tmp_path / "mixtral")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--model", "mixtral", *FAST, "--config", "test-qwen3-moe", "--steps", "1", "--save", ckpt])
    for flags in (["--seed", "2"], ["--temperature", "0"]):
        argv = ["--load", ckpt, "--prompt", "Hi", "--max-new-tokens", "6", "--device", "cpu", *flags]
        expected = cli_job(argv)
        for layout in (["--ep", "2"], ["--tp", "2"]):
            assert ranks(2).run(cli_job, argv=argv + layout) == {0: expected, 1: ""}
    assert expected == greedy_by_full_forward(ckpt, ["Hi"], 6)


def test_torchrun_tp2_launch(saved):
    argv = ["--load", saved["ckpt"], "--prompt", "Hi", "--max-new-tokens", "6", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "generate.py", *argv, "--tp", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == cli_job(argv) and "2 process(es)" in proc.stderr
