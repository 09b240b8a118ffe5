"""Mixtral (mixtral.py): published sizes, logits equal to transformers'
MixtralForCausalLM (in memory and through convert.py), the router losses and capacity,
and KV-cached decoding. Expert parallelism is tests/test_expert_parallel.py's."""
import math

import pytest
import torch

import convert
import generate
import mixtral
import models
import parallel
from conftest import assert_same_logits, check_fused_expert_files


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


@pytest.mark.parametrize("preset", ["test", "test-qwen2-moe", "test-qwen3-moe"])
def test_flops_count_the_active_matmul_weights(preset):
    """(shared experts and dense layers included)"""
    cfg = config() if preset == "test" else models.make_config("mixtral", preset)
    with torch.device("meta"):
        model = mixtral.Mixtral(cfg)
    lookups = model.embed.weight.numel() + sum(p.numel() for p in model.parameters() if p.dim() == 1)
    attention = cfg.n_layers * cfg.n_heads * 2 * 2 * 32 * cfg.head_dim
    assert model.flops_per_token(32) == pytest.approx(
        3 * (2 * (mixtral.active_parameters(cfg) - lookups) + attention), rel=1e-12)


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
            p.copy_(mixtral.from_hf(name, tensors[mixtral.hf_name(name, cfg)], cfg))
        assert_same_logits(ours(IDS), hf_logits(hf))


def test_convert_imports_and_exports(tmp_path):
    tf = pytest.importorskip("transformers")
    hf = random_hf(config(vocab_size=101, sliding_window=7))
    hf.save_pretrained(tmp_path / "hf")
    expected = hf_logits(hf)
    ours = convert.from_hf(str(tmp_path / "hf"))
    assert isinstance(ours, mixtral.Mixtral) and ours.cfg.sliding_window == 7
    with torch.no_grad():
        assert_same_logits(ours(IDS), expected)
    convert.export_model(ours, tmp_path / "out")
    back, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert_same_logits(hf_logits(back.eval()), expected)
    assert convert.read_hf_config(tmp_path / "out") == convert.read_hf_config(tmp_path / "hf")


def test_convert_reads_fused_experts_and_only_this_ranks_region(tmp_path):
    check_fused_expert_files(random_hf(config(vocab_size=101)).eval(), tmp_path, IDS)


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


def test_load_balancing_loss_of_a_skewed_router_by_hand():
    """A router that prefers experts 0 and 1: one MoE layer's balancing loss, computed here
    as Switch Transformer / Megatron define it (f_e: the share of the N * top_k choices that
    went to expert e, a count without gradient; P_e: expert e's mean probability), its value
    and its router gradient, and the z-loss."""
    cfg = config(aux_loss_coef=0.1, z_loss_coef=0.01)
    moe = models.build("mixtral", cfg, "cpu", seed=0).layers["0"].mlp
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(cfg.dim, generator=g), dim=0)
    x = torch.randn(3, 10, cfg.dim, generator=g) + 3 * u  # inputs sharing a direction ...
    with torch.no_grad():  # ... that the router's rows for experts 0 and 1 follow
        moe.router.weight.mul_(0.1).add_(torch.tensor([[2.0], [1.5], [0.0], [-1.0]]) * u)
    moe(x)
    grad, = torch.autograd.grad(moe.aux_loss, moe.router.weight)
    n, k, e = x.shape[0] * x.shape[1], cfg.top_k, cfg.n_experts
    w = moe.router.weight.detach().clone().requires_grad_()
    logits = x.reshape(n, cfg.dim) @ w.t()
    probs = torch.exp(logits - logits.max(1, keepdim=True).values)
    probs = probs / probs.sum(1, keepdim=True)
    chosen = probs.detach().argsort(1, descending=True)[:, :k]
    f = torch.stack([(chosen == expert).sum() for expert in range(e)]) / (n * k)
    balance = e * (f * probs.mean(0)).sum()
    assert balance > 1.5  # far from a uniform router's 1: the counts matter
    (0.1 * n * balance).backward()
    torch.testing.assert_close(moe.aux_loss, 0.1 * n * balance.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, w.grad, rtol=1e-4, atol=1e-6 * w.grad.abs().max().item())
    z = 0.01 * (logits.exp().sum(1).log() ** 2).sum()
    torch.testing.assert_close(moe.z_loss, z.detach(), rtol=1e-5, atol=0)


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


@pytest.mark.parametrize("preset", ["test", "test-qwen2-moe", "test-qwen3-moe"])
def test_kv_cached_decoding_equals_full_forward(preset):
    cfg = config(sliding_window=6) if preset == "test" else models.make_config("mixtral", preset)
    model = models.build("mixtral", cfg, "cpu", seed=3).eval()
    prompt = torch.randint(0, 256, (2, 5))
    out = generate.sample(model, prompt, max_new_tokens=8, temperature=0)
    with torch.no_grad():
        full = model(out[:, :-1])
        caches = model.new_kv_caches(out.shape[1])
        stepwise = torch.cat([model(out[:, i:i + 1], kv_caches=caches) for i in range(out.shape[1] - 1)], 1)
    assert torch.equal(full[:, prompt.shape[1] - 1:].argmax(-1), out[:, prompt.shape[1]:])
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_experts_equal_the_loop(autocast):
    """mixtral.Experts: one grouped matmul per projection over rows sorted by expert = the
    reference loop of one matmul per expert, forward and every gradient, with uneven loads
    and an expert given no row (its gradients zeros); under bf16 autocast too."""
    cfg = models.make_config("mixtral", "test")
    experts = models.build("mixtral", cfg, "cpu", seed=0).layers["0"].mlp.experts
    counts = torch.tensor([7, 0, 19, 4])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(int(counts.sum()), cfg.dim, generator=g, requires_grad=True)
    dy = torch.randn(x.shape[0], cfg.dim, generator=g)
    inputs = [x, *experts.parameters()]
    results = []
    for run in (experts, experts.loop):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = run(x, counts)
        results.append((y, torch.autograd.grad((y.float() * dy).sum(), inputs)))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    names = ["x"] + [n for n, _ in experts.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert all(p.abs().sum() == 0 for n, p in zip(names, grads) if n.startswith("1."))
    assert all(p.abs().sum() > 0 for n, p in zip(names, grads) if n.startswith("2."))
