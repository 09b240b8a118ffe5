"""Mixtral (mixtral.py) and expert parallelism (parallel.py, section 9): published sizes,
logits equal to transformers' MixtralForCausalLM (in memory and through convert.py), the
router losses and capacity, and expert-parallel layouts against one process holding every
expert: the same losses, gradients and dropped tokens, in a step and through train.py."""
import dataclasses
import json
import math

import pytest
import torch

import convert
import generate
import mixtral
import models
import parallel
from bench import run_ranks
from test_train import FAST, one_line_error, run


def config(**overrides):
    return mixtral.Config(**{**mixtral.PRESETS["test"], "z_loss_coef": 1e-3, **overrides})


# ----------------------------------------------------------------------------
# Sizes, FLOPs, initialization
# ----------------------------------------------------------------------------

def rounds_to(count, published):
    """`count` equals `published` ("46.7e9") to the digits shown."""
    mantissa, exponent = published.split("e")
    decimals = len(mantissa.partition(".")[2])
    return abs(count - float(published)) <= 0.5 * 10 ** (int(exponent) - decimals)


@pytest.mark.parametrize("preset,total,active", [
    ("mixtral-8x7b", "46.7e9", "12.9e9"), ("mixtral-8x22b", "141e9", "39e9")])
def test_published_parameter_counts(preset, total, active):
    cfg = models.make_config("mixtral", preset)
    with torch.device("meta"):
        model = mixtral.Mixtral(cfg)
    assert rounds_to(sum(p.numel() for p in model.parameters()), total)
    assert rounds_to(mixtral.active_parameters(cfg), active)


def test_flops_count_the_active_matmul_weights():
    cfg = config()
    with torch.device("meta"):
        model = mixtral.Mixtral(cfg)
    lookups = model.embed.weight.numel() + sum(p.numel() for p in model.parameters() if p.dim() == 1)
    attention = cfg.n_layers * cfg.n_heads * 2 * 2 * 32 * cfg.head_dim
    assert model.flops_per_token(32) == 3 * (2 * (mixtral.active_parameters(cfg) - lookups) + attention)


def test_experts_keep_their_global_names_and_weights_under_ep():
    cfg = config()
    whole = dict(models.build("mixtral", cfg, "cpu", seed=5).named_parameters())
    for rank, held in ((0, {"0", "1"}), (1, {"2", "3"})):
        part = models.build("mixtral", cfg, "cpu", seed=5, layout=parallel.Layout(dp=2, ep=2, rank=rank))
        params = dict(part.named_parameters())
        assert {n.split(".")[4] for n in params if ".experts." in n} == held
        assert all(torch.equal(p, whole[n]) for n, p in params.items())
    # Every expert has its own random stream.
    assert not torch.equal(whole["layers.0.mlp.experts.0.gate_proj.weight"],
                           whole["layers.0.mlp.experts.1.gate_proj.weight"])


# ----------------------------------------------------------------------------
# Equality with transformers
# ----------------------------------------------------------------------------

IDS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))


def random_hf(cfg):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, sliding_window=cfg.sliding_window or None)).eval()
    with torch.no_grad():  # norm gains too, which start at one and would hide a mapping error
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def hf_file_tensors(model):
    """The tensors under the names save_pretrained writes: transformers 5 fuses each layer's
    experts in memory (and converts back when saving); 4.x keeps them apart throughout."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return model.state_dict()
    return revert_weight_conversion(model, model.state_dict())


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 5, "top_k": 1}])
def test_logits_match_transformers(overrides):
    cfg = config(vocab_size=101, **overrides)
    hf = random_hf(cfg)
    ours = models.build("mixtral", cfg, "cpu", seed=0).eval()
    tensors = hf_file_tensors(hf)
    assert len(tensors) == len(dict(ours.named_parameters()))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(mixtral.from_hf(name, tensors[mixtral.hf_name(name)]))
        assert (ours(IDS) - hf_logits(hf)).abs().max() <= 1e-4


def test_convert_imports_and_exports(tmp_path):
    tf = pytest.importorskip("transformers")
    hf = random_hf(config(vocab_size=101, sliding_window=7))
    hf.save_pretrained(tmp_path / "hf")
    expected = hf_logits(hf)
    ours = convert.from_hf(str(tmp_path / "hf"))
    assert isinstance(ours, mixtral.Mixtral) and ours.cfg.sliding_window == 7
    assert (ours(IDS) - expected).abs().max() <= 1e-4
    convert.export_model(ours, tmp_path / "out")
    back, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert (hf_logits(back.eval()) - expected).abs().max() <= 1e-4
    assert convert.read_hf_config(tmp_path / "out") == convert.read_hf_config(tmp_path / "hf")


def test_convert_reads_fused_experts_and_only_this_ranks_region(tmp_path):
    """transformers 5 writes fused expert tensors when asked (save_original_format=False);
    a tp=2 x ep=2 rank reads its experts' slices out of them."""
    hf = random_hf(config(vocab_size=101))
    try:
        hf.save_pretrained(tmp_path, save_original_format=False)
    except TypeError:
        pytest.skip("this transformers version writes experts one by one only")
    with torch.no_grad():
        whole = convert.from_hf(str(tmp_path))
        assert (whole(IDS) - hf_logits(hf)).abs().max() <= 1e-4
    whole, cfg = dict(whole.named_parameters()), whole.cfg
    for rank in range(4):
        part = models.build("mixtral", cfg, "cpu", 0, parallel.Layout(tp=2, dp=2, ep=2, rank=rank))
        convert.load_hf_weights(part, str(tmp_path))
        for name, p in part.named_parameters():
            _, offset, extent = parallel.global_region(p)
            mine = p[tuple(slice(0, n) for n in extent)]  # beyond: vocabulary padding
            assert torch.equal(mine, whole[name][tuple(slice(o, o + n) for o, n in zip(offset, extent))])


# ----------------------------------------------------------------------------
# Router losses, capacity, decoding
# ----------------------------------------------------------------------------

def test_router_losses_of_a_uniform_router():
    """A zero router gives every expert probability 1/n: balance = 1 whatever the top-k
    choices are, logsumexp = log(n); each stored as coefficient x tokens, summed over layers."""
    cfg = config(aux_loss_coef=0.1, z_loss_coef=0.01)
    model = models.build("mixtral", cfg, "cpu", seed=0)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.mlp.router.weight.zero_()
    ids = torch.randint(0, 257, (3, 10))
    model(ids, labels=ids)
    n = ids.numel()
    torch.testing.assert_close(model.aux_loss, torch.tensor(0.1 * cfg.n_layers * n))
    torch.testing.assert_close(model.z_loss, torch.tensor(0.01 * cfg.n_layers * n * math.log(4) ** 2))
    stats = model.pop_router_stats()  # what train.py logs
    assert stats["tokens_per_expert"].shape == (cfg.n_layers, 4)
    assert (stats["tokens_per_expert"].sum(1) == n * cfg.top_k).all()
    assert stats["aux_loss"] == model.aux_loss and stats["dropped"] == 0
    assert model.pop_router_stats() == {}


def test_capacity_keeps_the_first_choices_in_token_order():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    kept = mixtral.capacity_mask(ids, n_experts=3, capacity=2)
    assert kept.tolist() == [[True, True], [True, True], [False, True], [False, False]]


def test_dropped_tokens_pass_through():
    cfg = config(capacity_factor=0.25)
    moe = models.build("mixtral", cfg, "cpu", seed=0).layers["0"].mlp
    x = torch.randn(2, 16, cfg.dim)
    with torch.no_grad():
        y = moe(x)
    # Each expert keeps at most its capacity; a token with no choice kept gets 0.
    capacity = math.ceil(0.25 * 32 * cfg.top_k / cfg.n_experts)
    _, top_e = moe.router(x.reshape(-1, cfg.dim)).topk(cfg.top_k)
    assert torch.bincount(top_e[moe.kept], minlength=4).max() <= capacity
    dropped = ~moe.kept.any(1)
    assert dropped.any() and not dropped.all()
    y = y.reshape(-1, cfg.dim)
    assert (y[dropped] == 0).all() and (y[~dropped] != 0).any(1).all()


def test_kv_cached_decoding_equals_full_forward():
    model = models.build("mixtral", config(sliding_window=6), "cpu", seed=3).eval()
    prompt = torch.randint(0, 256, (2, 5))
    out = generate.sample(model, prompt, max_new_tokens=8, temperature=0)
    with torch.no_grad():
        full = model(out[:, :-1])
        caches = model.new_kv_caches(out.shape[1])
        stepwise = torch.cat([model(out[:, i:i + 1], kv_caches=caches) for i in range(out.shape[1] - 1)], 1)
    assert torch.equal(full[:, prompt.shape[1] - 1:].argmax(-1), out[:, prompt.shape[1]:])
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Expert-parallel layouts
# ----------------------------------------------------------------------------

def test_ep_groups_are_consecutive_data_parallel_ranks():
    layout = parallel.Layout(tp=2, dp=4, ep=2)
    assert parallel.ep_groups(layout) == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert parallel.expert_dp_groups(layout) == [[0, 4], [2, 6], [1, 5], [3, 7]]
    layout = parallel.Layout(cp=2, dp=2, pp=2, ep=4)  # cp ranks count as data ranks (cp fastest)
    assert parallel.ep_groups(layout) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [dataclasses.replace(layout, rank=r).ep_rank for r in range(8)] == [0, 1, 2, 3] * 2
    layout = parallel.Layout(dp=4, ep=2)
    assert [dataclasses.replace(layout, rank=r).expert_dp_rank for r in range(4)] == [0, 0, 1, 1]
    assert parallel.expert_dp_groups(layout) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("layout,message", [
    (parallel.Layout(dp=3, ep=3), "n_experts=4 is not divisible by --ep 3"),
    (parallel.Layout(dp=2, ep=4), r"--ep 4 must divide dp\*cp = 2\*1 = 2"),
])
def test_ep_that_does_not_divide_is_a_usage_error(layout, message):
    with pytest.raises(parallel.UsageError, match=message):
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
    base = parallel.init_distributed(tp=tp, cp=cp, device="cpu", timeout_minutes=1)
    for ep, overrides in scenarios:  # the same processes, regrouped for each ep
        layout = parallel.init_expert_groups(dataclasses.replace(base, ep=ep))
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
        results.append((torch.cat([main, router]).tolist(), grads, kept, layout.dp_rank))
    parallel.destroy_distributed()
    return results


def relative(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("world,tp,cp,scenarios", [
    (2, 1, 1, [(2, {}), (2, {"capacity_factor": 1.0}), (2, {"zero_router": True})]),
    (4, 1, 1, [(2, {}), (4, {})]),       # ep=2: expert-dp groups of 2 ranks; ep=4: one expert each
    (4, 2, 2, [(2, {})]),                # tp=2 (sp) x cp=2, ep=2 over the cp ranks
])
def test_expert_parallel_step_equals_one_process(world, tp, cp, scenarios):
    """Losses, every gradient (reduced over the right groups) and the dropped choices."""
    results = run_ranks(world, _ep_worker, tp=tp, cp=cp, scenarios=scenarios)
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
MOE = ["--model", "mixtral", *FAST, "--micro-batch-size", "2", "--set", "z_loss_coef=1e-3"]
ROUTER_FIGURES = ["loss", "aux_loss", "z_loss", "grad_norm", "tokens_per_expert_min",
                  "tokens_per_expert_max", "dropped_fraction"]


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_same_records(got, expected, keys=ROUTER_FIGURES):
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        for key in keys:
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (a["step"], key, a[key], b[key])


def test_expert_parallel_training_equals_one_process(tmp_path):
    """10 steps of ep=2, ep=4, ep=2 x tp=2, ep=2 x pp=2 (ZeRO-1 on) follow the one-process
    run: main loss, aux loss, z-loss, gradient norm, tokens per expert. A checkpoint of
    ep=2 resumes under ep=4."""
    run([*MOE, "--metrics", str(tmp_path / "ref.jsonl")])
    expected = records(tmp_path / "ref.jsonl")
    assert expected[0]["aux_loss"] > 0 and expected[0]["z_loss"] > 0
    for name, nproc, flags in [("ep2", 2, ["--ep", "2", "--save", str(tmp_path / "ck"), "--save-every", "5"]),
                               ("ep4", 4, ["--ep", "4"]), ("ep2tp2", 4, ["--ep", "2", "--tp", "2"]),
                               ("ep2pp2", 4, ["--ep", "2", "--pp", "2"])]:
        proc = run([*MOE, *flags, "--metrics", str(tmp_path / f"{name}.jsonl")], nproc=nproc)
        assert_same_records(records(tmp_path / f"{name}.jsonl"), expected)
        assert "tokens/expert" in proc.stdout and "aux" in proc.stdout
        assert records(tmp_path / f"{name}.jsonl")[0]["all_to_all_bytes"] > 0
    run([*MOE, "--ep", "4", "--load", str(tmp_path / "ck" / "step_00000005"),
         "--metrics", str(tmp_path / "resumed.jsonl")], nproc=4)
    assert_same_records(records(tmp_path / "resumed.jsonl"), expected[5:], ["loss", "aux_loss"])


def test_capacity_drops_the_same_tokens_under_expert_and_context_parallelism(tmp_path):
    """--moe-capacity-factor: each expert keeps the first choices of a micro-batch's whole
    sequences, so ep=2 x cp=2 drops what the one process drops (and trains the same)."""
    flags = [*MOE, "--moe-capacity-factor", "1.0"]
    run([*flags, "--metrics", str(tmp_path / "ref.jsonl")])
    run([*flags, "--ep", "2", "--cp", "2", "--metrics", str(tmp_path / "ep2cp2.jsonl")], nproc=4)
    expected = records(tmp_path / "ref.jsonl")
    assert all(r["dropped_fraction"] > 0.05 for r in expected)
    assert_same_records(records(tmp_path / "ep2cp2.jsonl"), expected)


@pytest.mark.parametrize("argv,message", [
    (["--model", "mixtral", "--ep", "3"], "--ep 3 must divide dp*cp = 1*1 = 1"),
    (["--model", "llama", "--ep", "2"], "needs a mixture-of-experts model"),
    (["--model", "llama", "--moe-capacity-factor", "1.5"], "apply to mixture-of-experts models"),
    (["--model", "mixtral", "--moe-capacity-factor", "-1"], "must be >= 0"),
])
def test_bad_expert_flags_are_one_line(capsys, argv, message):
    assert message in one_line_error(capsys, argv + ["--config", "test"])


def test_ep_not_dividing_the_experts_is_named_under_torchrun():
    proc = run(["--model", "mixtral", *FAST, "--ep", "2", "--set", "n_experts=3"], nproc=2,
               expect_ok=False)
    assert proc.returncode != 0
    assert "error: n_experts=3 is not divisible by --ep 2; choose an --ep that divides it" in proc.stderr
