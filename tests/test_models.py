"""Model files: published sizes, equality with Hugging Face transformers, KV-cached
decoding, and layout-independent initialization."""
import pytest
import torch

import generate
import gpt
import llama
import models
from conftest import assert_same_logits


def count_params(model_name, preset):
    """Parameters of a preset, built on the meta device: no memory is allocated."""
    cfg = models.make_config(model_name, preset)
    with torch.device("meta"):
        module = models.FAMILIES[model_name].model(cfg)
    return sum(p.numel() for p in module.parameters())


# Published sizes as printed (model cards / papers): equal after rounding to the digits shown.
@pytest.mark.parametrize("model_name,preset,published", [
    ("llama", "llama2-7b", "6.74e9"), ("llama", "llama3-8b", "8.03e9"),
    ("llama", "llama3.1-8b", "8.03e9"), ("llama", "llama3-70b", "70.6e9"),
    ("llama", "mistral-7b", "7.24e9"), ("llama", "qwen2.5-0.5b", "0.49e9"),
    ("llama", "qwen2.5-7b", "7.62e9"), ("llama", "qwen3-8b", "8.19e9"),
    ("gpt", "gpt2", "124e6"), ("gpt", "gpt2-medium", "355e6"), ("gpt", "gpt2-large", "774e6"),
    ("gpt", "gpt2-xl", "1.56e9"), ("gpt", "gpt3-175b", "175e9"),
    ("mamba", "mamba-130m", "129e6"), ("mamba", "mamba-370m", "372e6"),
    ("mamba", "mamba-1.4b", "1.37e9"), ("mamba", "mamba-2.8b", "2.77e9"),
    ("mamba", "mamba2-130m", "0.13e9"), ("mamba", "mamba2-2.7b", "2.7e9"),
    ("mamba", "nemotron-h-8b", "8.1e9"),
    # BERT with its pre-training heads (the paper's 110M and 340M; Megatron's 345M is 336M)
    ("bert", "bert-base", "110e6"), ("bert", "bert-large", "0.34e9"),
    ("bert", "megatron-bert-345m", "0.34e9"),
])
def test_published_parameter_counts(model_name, preset, published):
    mantissa, exponent = published.split("e")
    decimals = len(mantissa.partition(".")[2])
    half_unit = 0.5 * 10 ** (int(exponent) - decimals)
    assert abs(count_params(model_name, preset) - float(published)) <= half_unit


def test_gpt2_exact_count():
    assert count_params("gpt", "gpt2") == 124_439_808


# ----------------------------------------------------------------------------
# Equality with transformers: random HF model -> copy weights by name -> same logits
# ----------------------------------------------------------------------------

def hf_llama_family(cfg, family):
    import transformers as tf
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
                  tie_word_embeddings=cfg.tie_embeddings, head_dim=cfg.head_dim)
    if family == "llama":
        scaling = None if not cfg.rope_scaling_factor else {
            "rope_type": "llama3", "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
            "rope_theta": cfg.rope_theta}
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_scaling=scaling))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=cfg.sliding_window))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if family == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common))
    raise ValueError(family)


LLAMA_VARIANTS = {
    "llama": ("llama", {}),
    "llama3.1-rope-scaling": ("llama", dict(rope_scaling_factor=8.0, rope_theta=500000.0,
                                            rope_original_max_seq_len=16)),
    "mistral-window": ("mistral", dict(sliding_window=5)),
    "qwen2-bias-tied": ("qwen2", dict(qkv_bias=True, tie_embeddings=True, n_kv_heads=1)),
    "qwen3-qknorm": ("qwen3", dict(qk_norm=True, head_dim=32)),
}


def copy_from_hf(ours, hf_model, family):
    hf_params = dict(hf_model.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(family.from_hf(name, hf_params[family.hf_name(name, ours.cfg)], ours.cfg))


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_llama_family_matches_transformers(variant):
    family, overrides = LLAMA_VARIANTS[variant]
    cfg = llama.Config(**{**llama.PRESETS["test"], "vocab_size": 101, **overrides})
    torch.manual_seed(0)
    hf = hf_llama_family(cfg, family).eval()
    ours = models.build("llama", cfg, "cpu", seed=0).eval()
    copy_from_hf(ours, hf, llama)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert_same_logits(ours(ids), expected)


def test_gpt2_matches_transformers():
    import transformers as tf
    cfg = gpt.Config(**{**gpt.PRESETS["test"], "vocab_size": 101})
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len,
                                          n_embd=cfg.dim, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                                          layer_norm_epsilon=cfg.norm_eps)).eval()
    ours = models.build("gpt", cfg, "cpu", seed=0).eval()
    copy_from_hf(ours, hf, gpt)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert_same_logits(ours(ids), hf(input_ids=ids).logits)


def test_attention_mask_matches_transformers():
    """HF-style attention_mask (left padding) gives HF's logits on the real tokens."""
    cfg = llama.Config(**{**llama.PRESETS["test"], "vocab_size": 101})
    torch.manual_seed(0)
    hf = hf_llama_family(cfg, "llama").eval()
    ours = models.build("llama", cfg, "cpu", seed=0).eval()
    copy_from_hf(ours, hf, llama)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    # Rows of fully padded queries are undefined in both; compare the real tokens.
    assert_same_logits(got[mask.bool()], expected[mask.bool()])


# ----------------------------------------------------------------------------
# Decoding and initialization
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("model_name,overrides", [
    ("llama", {"sliding_window": 6, "qk_norm": True, "qkv_bias": True}),
    ("gpt", {}),
])
def test_kv_cached_decoding_equals_full_forward(model_name, overrides):
    cfg = models.make_config(model_name, "test", [f"{k}={v}" for k, v in overrides.items()])
    model = models.build(model_name, cfg, "cpu", seed=3).eval()
    prompt = torch.randint(0, 256, (2, 5))
    out = generate.sample(model, prompt, max_new_tokens=10, temperature=0)
    with torch.no_grad():
        full = model(out[:, :-1])
    # Greedy decoding with the cache must pick the argmax of the uncached logits.
    assert torch.equal(full[:, prompt.shape[1] - 1:].argmax(-1), out[:, prompt.shape[1]:])
    caches = model.new_kv_caches(out.shape[1])
    with torch.no_grad():
        stepwise = torch.cat([model(out[:, i:i + 1], kv_caches=caches) for i in range(out.shape[1] - 1)], 1)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)


def test_initialization_depends_only_on_seed_and_name():
    cfg = models.make_config("llama", "test")
    a = models.build("llama", cfg, "cpu", seed=7).state_dict()
    torch.manual_seed(123)  # the global RNG must not matter
    b = models.build("llama", cfg, "cpu", seed=7).state_dict()
    c = models.build("llama", cfg, "cpu", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.q_proj.weight"], c["layers.0.attn.q_proj.weight"])
    # Layer 1 is not a copy of layer 0: every parameter has its own stream.
    assert not torch.equal(a["layers.0.attn.q_proj.weight"], a["layers.1.attn.q_proj.weight"])


def test_bad_config_is_a_usage_error():
    with pytest.raises(models.UsageError, match="n_kv_heads"):
        models.make_config("llama", "test", ["n_kv_heads=3"])
    with pytest.raises(models.UsageError, match="unknown --config"):
        models.make_config("llama", "nope")
    with pytest.raises(models.UsageError, match="not a config field"):
        models.make_config("gpt", "test", ["heads=3"])


# ----------------------------------------------------------------------------
# A new family: its model file and one record
# ----------------------------------------------------------------------------

def test_a_new_family_is_its_model_file_and_one_record(monkeypatch, tmp_path, capsys):
    """A family that no file of the machinery knows by name: a LLaMA whose feed-forward
    network is GPT's GELU MLP (its "model file" written here), registered by one record.
    It trains, saves, resumes, plans and generates."""
    import dataclasses
    import types

    import flags
    import memory
    import train
    from conftest import FAST

    toy = types.ModuleType("toy")  # the model file

    @dataclasses.dataclass
    class Config(llama.Config):
        pass

    class Toy(llama.Llama):
        @staticmethod
        def feed_forward(cfg, layout, layer):
            return gpt.MLP(cfg, layout)
    toy.Config, toy.PRESETS, toy.Toy = Config, {"test": llama.PRESETS["test"]}, Toy
    monkeypatch.setitem(models.FAMILIES, "toy", models.Family("toy", toy, Toy, memory.LLAMA))

    argv = ["--model", "toy", *FAST, "--save", str(tmp_path / "ckpt"), "--save-every", "5"]
    records = train.train(flags.parse_args(argv))
    assert records[-1]["loss"] < 0.9 * records[0]["loss"]
    assert any("fc" in name for name, _ in models.build("toy", Config(**toy.PRESETS["test"]), "cpu", 0)
               .named_parameters())
    resumed = train.train(flags.parse_args([*argv[:-4], "--load", str(tmp_path / "ckpt" / "step_00000005")]))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in records[5:]], rel=1e-6)
    train.main(["--model", "toy", "--config", "test", "--plan"])
    assert "peak" in capsys.readouterr().out
    model, tokenizer = generate.load_model(str(tmp_path / "ckpt"))
    assert isinstance(model, Toy) and tokenizer == "byte"
