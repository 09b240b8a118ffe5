"""Qwen's mixtures of experts (mixtral.py's presets with hf_type qwen2_moe / qwen3_moe):
published sizes against transformers' own count, logits equal to Qwen2MoeForCausalLM's and
Qwen3MoeForCausalLM's both ways (shared expert and its gate, dense layers by step and by
list, the top-k renormalized or not, biases on Q, K, V, QK-norm), fused expert files, and
every layout equal to one process."""
import pytest
import torch

import convert
import errors
import mixtral
import models
import parallel
from conftest import (LAYOUT, ROUTER_FIGURES, assert_gradient_part, assert_same_logits, assert_same_run,
                      check_fused_expert_files, check_layouts, local_gradients, one_process, train_on)

tf = pytest.importorskip("transformers")

HF = {"qwen2_moe": (tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig),
      "qwen3_moe": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig)}


def hf_model(model_type, config, meta=False):
    cls, config_cls = HF[model_type]
    if meta:
        with torch.device("meta"):
            return cls(config_cls(**config))
    torch.manual_seed(0)
    model = cls(config_cls(**config)).eval()
    with torch.no_grad():  # biases, norm gains and the router (HF starts it at zero) random too
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("preset,active", [("qwen1.5-moe-a2.7b", "2.7e9"), ("qwen2-57b-a14b", "14e9"),
                                           ("qwen3-30b-a3b", "3.3e9"), ("qwen3-235b-a22b", "22e9")])
def test_published_sizes_equal_transformers_count(preset, active):
    """The total is transformers' own count of the same config (built on the meta device);
    the active count (all but the experts, and top_k of each layer's) is transformers' and
    the published one."""
    cfg = models.make_config("mixtral", preset)
    with torch.device("meta"):
        ours = mixtral.Mixtral(cfg)
    theirs = hf_model(*mixtral.config_to_hf(cfg), meta=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    experts = sum(p.numel() for n, p in theirs.named_parameters() if ".mlp.experts." in n)
    hf_active = sum(p.numel() for p in theirs.parameters()) - experts + experts * cfg.top_k // cfg.n_experts
    assert mixtral.active_parameters(cfg) == hf_active
    mantissa, exponent = active.split("e")  # (published rounded or cut: within a unit of its last digit)
    assert abs(hf_active - float(active)) < 10 ** (int(exponent) - len(mantissa.partition(".")[2]))


SMALL = dict(vocab_size=101, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             moe_intermediate_size=32, intermediate_size=96, num_experts=4, num_experts_per_tok=2,
             max_position_embeddings=64)
VARIANTS = {
    # shared expert, every other layer dense, the top-k weights as the softmax gave them
    "qwen2-moe-step": ("qwen2_moe", dict(SMALL, num_hidden_layers=4, decoder_sparse_step=2,
                                         shared_expert_intermediate_size=48, norm_topk_prob=False)),
    # renormalized, layer 1 dense by list, tied embeddings
    "qwen2-moe-listed": ("qwen2_moe", dict(SMALL, num_hidden_layers=3, mlp_only_layers=[1],
                                           shared_expert_intermediate_size=40, norm_topk_prob=True,
                                           tie_word_embeddings=True)),
    "qwen3-moe": ("qwen3_moe", dict(SMALL, num_hidden_layers=3, head_dim=32, mlp_only_layers=[0],
                                    norm_topk_prob=True)),
    "qwen3-moe-unnormalized": ("qwen3_moe", dict(SMALL, num_hidden_layers=2, head_dim=16, num_key_value_heads=1,
                                                 norm_topk_prob=False)),
}
IDS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))


def hf_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_and_export_match_transformers(variant, tmp_path):
    model_type, config = VARIANTS[variant]
    hf = hf_model(model_type, config)
    hf.save_pretrained(tmp_path / "hf")
    expected = hf_logits(hf)
    ours = convert.from_hf(str(tmp_path / "hf"))
    assert isinstance(ours, mixtral.Mixtral) and ours.cfg.hf_type == model_type
    with torch.no_grad():
        assert_same_logits(ours(IDS), expected)
    convert.export_model(ours, tmp_path / "out")
    back, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert type(back) is type(hf)
    assert_same_logits(hf_logits(back.eval()), expected)
    assert convert.read_hf_config(tmp_path / "out") == convert.read_hf_config(tmp_path / "hf")


def test_fused_expert_files_read_to_the_same_model(tmp_path):
    check_fused_expert_files(hf_model(*VARIANTS["qwen2-moe-step"]), tmp_path, IDS)


def test_the_router_runs_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the router still runs in fp32: the choices are those of fp32
    logits (bf16 logits would choose differently on this input)."""
    cfg = models.make_config("mixtral", "test-qwen2-moe", ["n_experts=64", "top_k=8"])
    moe = models.build("mixtral", cfg, "cpu", seed=0).layers["1"].mlp
    x = torch.randn(4, 64, cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
        bf16_choices = torch.nn.functional.linear(x, moe.router.weight).topk(cfg.top_k).indices
    fp32_choices = torch.nn.functional.linear(x, moe.router.weight).topk(cfg.top_k).indices
    count = torch.bincount(fp32_choices.flatten(), minlength=cfg.n_experts)
    assert torch.equal(moe.tokens_per_expert, count)
    assert not torch.equal(torch.bincount(bf16_choices.flatten(), minlength=cfg.n_experts), count)


MOE = [*LAYOUT, "--micro-batch-size", "2", "--steps", "4"]


@pytest.mark.parametrize("preset,layouts", [
    ("test-qwen2-moe", [(2, ["--tp", "2"]), (2, ["--ep", "2"]), (2, ["--pp", "2"]), (4, ["--ep", "2", "--tp", "2"]),
                        (2, ["--cp", "2"])]),
    # pp 2: the first stage holds only the dense layer 0 (no router: no router loss there);
    # tp 2: its one KV head on both tp ranks.
    ("test-qwen3-moe", [(2, ["--ep", "2"]), (2, ["--pp", "2", "--pp-layers", "1,2"]), (2, ["--tp", "2"]),
                        (4, ["--cp", "2", "--ep", "2"]), (4, ["--ep", "2", "--pp", "2", "--pp-layers", "1,2"])]),
])
def test_layouts_equal_one_process(ranks, preset, layouts):
    """Loss, gradient norm and the router's figures (losses, loads) at every step."""
    check_layouts(ranks, ["--model", "mixtral", *MOE, "--config", preset], layouts, keys=ROUTER_FIGURES)


ETP_1 = ["--tp", "2", "--etp", "1", "--ep", "2"]


@pytest.mark.parametrize("preset,flags,layouts", [
    # etp 1: each tp rank routes half the tokens to whole experts; ep over the tp ranks, or
    # none (the experts then replicated over them), or over tp and dp; etp 2 of tp 4.
    ("test-qwen3-moe", [], [(2, ["--tp", "2", "--etp", "1", "--ep", "2"]), (2, ["--tp", "2", "--etp", "1"]),
                        (2, ["--tp", "2", "--etp", "1", "--no-sp"]),
                        (4, ["--tp", "2", "--etp", "1", "--ep", "4"]), (4, ["--tp", "4", "--etp", "2", "--ep", "2"])]),
    ("test-qwen2-moe", [], [(4, [*ETP_1, "--pp", "2"]), (4, [*ETP_1, "--cp", "2"])]),
    # capacity counts the whole micro-batch's choices in token order; the balance losses
    # count every token's choices (the sequence loss: tokens of a sequence on both tp ranks)
    ("test-qwen3-moe", ["--moe-capacity-factor", "1.0"], [(2, ETP_1), (4, [*ETP_1, "--cp", "2"])]),
    ("test-qwen3-moe", ["--set", "balance_loss=global"], [(2, ETP_1), (2, [*ETP_1, "--no-sp"])]),
    ("test-qwen3-moe", ["--set", "balance_loss=sequence"], [(2, ETP_1)]),
])
def test_expert_tensor_parallelism_equals_one_process(ranks, preset, flags, layouts):
    """Loss, gradient norm and the router's figures (losses, loads, drops) at every step."""
    check_layouts(ranks, ["--model", "mixtral", *MOE, "--config", preset, *flags], layouts, keys=ROUTER_FIGURES)


def test_hugging_face_weights_train_under_tp_ep_and_etp(ranks, tmp_path):
    """--load hf:DIR of a Qwen3-MoE with one KV head: each rank reads its shards (the KV
    head on both tp ranks; experts over ep, over etp, or over ep spanning the tp ranks)
    and trains as one process does."""
    hf_model("qwen3_moe", dict(VARIANTS["qwen3-moe-unnormalized"][1], vocab_size=257)).save_pretrained(tmp_path)
    argv = ["--model", "mixtral", *MOE, "--load", f"hf:{tmp_path}"]
    check_layouts(ranks, argv, [(2, ["--tp", "2"]), (2, ["--ep", "2"]), (2, ETP_1), (4, ["--tp", "2", "--ep", "2"])])


def test_expert_tensor_parallel_checkpoints_reshard(ranks, tmp_path):
    """Saved under etp 1 (ep over the tp ranks, or experts replicated over them), a run
    resumes in one process exactly; saved in one process, it resumes under etp 1."""
    argv = ["--model", "mixtral", *MOE, "--config", "test-qwen3-moe", "--save-every", "2"]
    one = str(tmp_path / "one")
    full = one_process(argv + ["--save", one])
    for i, flags in enumerate([["--tp", "2", "--etp", "1", "--ep", "2"], ["--tp", "2", "--etp", "1"]]):
        train_on(ranks, 2, argv + flags + ["--save", str(tmp_path / str(i))])
        assert_same_run(one_process(argv + ["--load", f"{tmp_path / str(i)}/step_00000002"]), full[2:])
        assert_same_run(train_on(ranks, 2, argv + flags + ["--load", f"{one}/step_00000002"])[0], full[2:])


def _gradients(preset, tp=1, sp=True, etp=None):
    """Every parameter's gradient (reduced as DataParallel does) for one batch, the router
    losses included; tp = 1: one process."""
    layout = parallel.init_distributed(tp=tp, sp=sp, device="cpu", etp=etp) if tp > 1 else parallel.Layout()
    try:
        model = models.build("mixtral", models.make_config("mixtral", preset), "cpu", 0, layout)
        ddp = parallel.DataParallel(model, layout)
        ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
        (model(ids, labels=ids) + model.extra_loss).backward()
        ddp.finish()
        grads = local_gradients(model)
        ddp.close()
        return grads
    finally:
        if tp > 1:
            parallel.destroy_distributed(layout)


@pytest.mark.parametrize("sp,etp", [(True, None), (False, None), (True, 1)])
def test_every_gradient_equals_one_process_under_tp(ranks, sp, etp):
    """Each parameter's gradient against its own size (the shared expert's gate, a (1, dim)
    matrix replicated over tp and weighting partial outputs, is far too small for the
    gradient norm to show it)."""
    expected = {name: grad for name, _, grad in _gradients("test-qwen2-moe")}
    for rank, grads in ranks(2).run(_gradients, preset="test-qwen2-moe", tp=2, sp=sp, etp=etp).items():
        for name, offset, grad in grads:
            assert_gradient_part(grad, offset, expected[name], f"rank {rank} {name}")


# ----------------------------------------------------------------------------
# Routing options: sigmoid scores, group-limited top-k, the expert bias, per-sequence balance
# ----------------------------------------------------------------------------

def reference_choice(scores, bias, top_k, groups, group_topk):
    """Token by token, as DeepSeek-V3 describes its routing: add the bias, score each group
    by the sum of its top_k / group_topk best biased scores, keep the group_topk best groups,
    take the top_k biased scores among their experts; the weights are the unbiased scores."""
    chosen = []
    for row in scores + bias:
        per_group = row.view(groups, -1)
        group_score = torch.stack([g.sort(descending=True).values[:top_k // group_topk].sum() for g in per_group])
        kept = group_score.sort(descending=True).indices[:group_topk].tolist()
        candidates = [(row[e].item(), e) for e in range(len(row)) if e // per_group.shape[1] in kept]
        chosen.append(sorted(e for _, e in sorted(candidates, reverse=True)[:top_k]))
    return chosen


@pytest.mark.parametrize("groups,group_topk", [(0, 0), (4, 2), (4, 1), (8, 2)])
def test_group_limited_biased_choice_matches_the_description(groups, group_topk):
    cfg = models.make_config("mixtral", "test", ["n_experts=16", "top_k=4", "router_score=sigmoid",
                                                 f"router_groups={groups}", f"router_group_topk={group_topk}",
                                                 "expert_bias_rate=0.001"])
    moe = models.build("mixtral", cfg, "cpu", seed=0).layers["0"].mlp
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(64, 16, generator=g)
    moe.expert_bias.copy_(0.3 * torch.randn(16, generator=g))
    got = moe.choose(scores).sort(dim=1).values.tolist()
    assert got == reference_choice(scores, moe.expert_bias, 4, groups or 1, group_topk or 1)
    assert got != reference_choice(scores, torch.zeros(16), 4, groups or 1, group_topk or 1)  # the bias counts


def test_groups_that_cannot_hold_top_k_are_refused():
    with pytest.raises(errors.UsageError, match="hold at least top_k experts"):
        models.make_config("mixtral", "test", ["n_experts=16", "top_k=4", "router_groups=8", "router_group_topk=1"])


def test_sequence_balance_loss_by_hand():
    """balance_loss=sequence: E * sum_e f_e P_e within each sequence, averaged over the
    sequences (stored times the micro-batch's tokens, as the micro-batch loss is)."""
    cfg = models.make_config("mixtral", "test", ["balance_loss=sequence", "aux_loss_coef=1.0"])
    moe = models.build("mixtral", cfg, "cpu", seed=0).layers["0"].mlp
    x = torch.randn(3, 10, cfg.dim, generator=torch.Generator().manual_seed(0))
    moe(x)
    probs = torch.softmax(x.reshape(-1, cfg.dim) @ moe.router.weight.T, -1).view(3, 10, -1)
    chosen = probs.topk(cfg.top_k, dim=-1).indices
    per_sequence = []
    for s in range(3):
        f = torch.bincount(chosen[s].flatten(), minlength=cfg.n_experts) / (cfg.top_k * 10)
        per_sequence.append(cfg.n_experts * (f * probs[s].mean(0)).sum())
    torch.testing.assert_close(moe.aux_loss, torch.stack(per_sequence).mean() * 30)


def test_global_balance_loss_by_hand():
    """balance_loss=global: f from the mean of the step's micro-batches' counts so far
    (constants: the gradient flows through P only), P from this micro-batch; a new step
    starts from nothing."""
    cfg = models.make_config("mixtral", "test", ["balance_loss=global", "aux_loss_coef=1.0"])
    model = models.build("mixtral", cfg, "cpu", seed=0)
    moe = model.layers["0"].mlp
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 10, cfg.dim, generator=g) for _ in range(3)]
    counts, expected = [], []
    for i, x in enumerate(batches):
        weight = moe.router.weight.detach().clone().requires_grad_()
        probs = torch.softmax(x.reshape(-1, cfg.dim) @ weight.T, -1)
        counts.append(torch.bincount(probs.topk(cfg.top_k).indices.flatten(), minlength=cfg.n_experts).float())
        f = torch.stack(counts).mean(0) / (cfg.top_k * 20)
        loss = cfg.n_experts * (f * probs.mean(0)).sum() * 20
        expected.append((loss, torch.autograd.grad(loss, weight)[0]))
    for step in range(2):
        for x, (loss, grad) in zip(batches, expected):
            moe.router.weight.grad = None
            moe(x)
            moe.aux_loss.backward()
            torch.testing.assert_close(moe.aux_loss, loss)
            torch.testing.assert_close(moe.router.weight.grad, grad)
        model.pop_router_stats()


GLOBAL = ["--model", "mixtral", *LAYOUT, "--steps", "4", "--config", "test-qwen3-moe", "--set", "n_experts=8",
          "--set", "top_k=2", "--set", "balance_loss=global", "--set", "aux_loss_coef=0.1"]


def test_global_balance_loss_equals_one_process(ranks):
    """Four micro-batches a step: tp 2, cp 2, pp 2 and full recomputation (whose recomputed
    forwards must see the counts of the micro-batches before them, not after) follow one
    process. Across dp the global counts pool the ranks' micro-batches: dp 2 and ep 2 with
    one micro-batch each are one process with both in one."""
    four = GLOBAL + ["--micro-batch-size", "2"]
    check_layouts(ranks, four, [(2, ["--tp", "2"]), (2, ["--cp", "2"]), (2, ["--pp", "2", "--pp-layers", "1,2"])])
    assert_same_run(one_process(four + ["--recompute", "full"]), one_process(four))
    check_layouts(ranks, GLOBAL + ["--micro-batch-size", "8"],
                  [(2, ["--micro-batch-size", "4"]), (2, ["--micro-batch-size", "4", "--ep", "2"])])
    per_micro_batch = one_process(GLOBAL + ["--micro-batch-size", "2", "--set", "balance_loss=micro_batch"])
    assert [r["aux_loss"] for r in one_process(four)] != [r["aux_loss"] for r in per_micro_batch]


def test_expert_bias_step_moves_towards_the_mean_load():
    table = torch.zeros(2, 4)
    mixtral.Mixtral.expert_bias_step(table, torch.tensor([[10., 2., 4., 0.], [0., 0., 0., 0.]]), 0.01)
    torch.testing.assert_close(table, torch.tensor([[-0.01, 0.01, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]]))


ROUTING = [*MOE, "--steps", "10", "--config", "test-qwen3-moe", "--set", "router_score=sigmoid",
           "--set", "expert_bias_rate=0.01", "--set", "router_groups=2", "--set", "router_group_topk=1",
           "--set", "n_experts=8", "--set", "top_k=2", "--set", "balance_loss=sequence"]


def test_routing_options_equal_one_process_and_resume(ranks, tmp_path):
    """Sigmoid scores, group-limited choice, the expert bias (updated from every rank's
    counts) and the per-sequence balance loss: dp 2, ep 2, cp 2 and pp 2 follow one process
    for 10 steps; the bias is saved and a resumed run continues exactly; it moves the run."""
    argv = ["--model", "mixtral", *ROUTING]
    check_layouts(ranks, argv, [(2, []), (2, ["--ep", "2"]), (2, ["--cp", "2"]), (2, ["--pp", "2", "--pp-layers", "1,2"])])
    full = one_process(argv)
    ckpt = str(tmp_path / "ckpt")
    train_on(ranks, 2, argv + ["--save", ckpt, "--save-every", "5"])
    resumed, _ = train_on(ranks, 2, argv + ["--load", f"{ckpt}/step_00000005"])
    assert_same_run(resumed, full[5:])
    without = one_process([a if a != "expert_bias_rate=0.01" else "expert_bias_rate=0" for a in argv])
    balance = [(r["tokens_per_expert_min"], r["tokens_per_expert_max"]) for r in full]
    assert balance != [(r["tokens_per_expert_min"], r["tokens_per_expert_max"]) for r in without]


def test_megatrons_router_flags_set_the_config():
    flags = ["--moe-router-score-function", "sigmoid", "--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
             "--moe-router-bias-update-rate", "0.01", "--moe-router-load-balancing-type", "seq_aux_loss"]
    sets = ["--set", "router_score=sigmoid", "--set", "router_groups=2", "--set", "router_group_topk=1",
            "--set", "expert_bias_rate=0.01", "--set", "balance_loss=sequence"]
    argv = ["--model", "mixtral", *MOE, "--config", "test", "--steps", "3"]
    assert_same_run(one_process(argv + flags), one_process(argv + sets), rel=0)
