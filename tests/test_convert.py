"""convert.py: Hugging Face import/export against transformers, tensor-parallel import
(each rank reads only its slice), checkpoints, the hf: tokenizer, and bad input.

Every HF model is built from a small config with random weights and saved locally:
nothing is downloaded."""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import bert
import checkpoint
import convert
import data
import flags
import generate
import gpt
import llama
import metrics
import models
import parallel
import train
from conftest import ROOT, assert_same_logits, byte_level_bpe
from errors import UsageError

tf = pytest.importorskip("transformers")
COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GPT2 = dict(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4)
MAMBA = dict(vocab_size=101, hidden_size=64, state_size=8, num_hidden_layers=2)
# name -> (transformers model class, config)
VARIANTS = {
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(**GPT2)),
    "gpt2-untied": (tf.GPT2LMHeadModel, tf.GPT2Config(**GPT2, tie_word_embeddings=False)),
    "llama-gqa": (tf.LlamaForCausalLM, tf.LlamaConfig(**COMMON)),
    "llama-tied": (tf.LlamaForCausalLM, tf.LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "llama3.1-rope-scaling": (tf.LlamaForCausalLM, tf.LlamaConfig(
        **COMMON, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})),
    "mistral-window": (tf.MistralForCausalLM, tf.MistralConfig(**COMMON, sliding_window=5)),
    "qwen2-bias-tied": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**{**COMMON, "num_key_value_heads": 1},
                                                            tie_word_embeddings=True)),
    "qwen2-window": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**COMMON, use_sliding_window=True,
                                                         sliding_window=6, max_window_layers=0)),
    "qwen3-qknorm": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**COMMON, head_dim=32)),
    "mamba": (tf.MambaForCausalLM, tf.MambaConfig(**MAMBA)),
    "mamba-untied-bias": (tf.MambaForCausalLM, tf.MambaConfig(**MAMBA, tie_word_embeddings=False,
                                                              use_bias=True)),
    # 24 tokens in chunks of 16: the last chunk is partial. 2 groups of 4 heads.
    "mamba2-groups": (tf.Mamba2ForCausalLM, tf.Mamba2Config(**MAMBA, num_heads=8, head_dim=16,
                                                            n_groups=2, chunk_size=16)),
    "mamba2-tied-bias": (tf.Mamba2ForCausalLM, tf.Mamba2Config(**MAMBA, num_heads=4, head_dim=32,
                                                               n_groups=1, chunk_size=16, use_bias=True,
                                                               tie_word_embeddings=True)),
}
IDS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))  # longer than the windows
BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32)
# Encoders, compared on BERT_IDS by bert_logits. name -> (transformers model class, config)
BERT_VARIANTS = {
    "bert-mlm": (tf.BertForMaskedLM, tf.BertConfig(**BERT)),
    "bert-pretraining": (tf.BertForPreTraining, tf.BertConfig(**BERT)),
    "bert-classifier": (tf.BertForSequenceClassification, tf.BertConfig(**BERT, num_labels=3)),
    "megatron-bert-mlm": (tf.MegatronBertForMaskedLM, tf.MegatronBertConfig(**BERT)),
    "megatron-bert-pretraining": (tf.MegatronBertForPreTraining, tf.MegatronBertConfig(**BERT)),
    "megatron-bert-classifier": (tf.MegatronBertForSequenceClassification,
                                 tf.MegatronBertConfig(**BERT, num_labels=3)),
}
# Two sentence pairs (token types 0 then 1), the second right-padded.
BERT_IDS = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(0))
BERT_MASK = torch.tensor([[1] * 12, [1] * 8 + [0] * 4])
BERT_TYPES = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 5 + [0] * 4])


def random_hf(variant, **config_overrides):
    """A transformers model with every parameter random (biases and norm gains too, which
    HF initializes to constants that would hide a mapping error)."""
    cls, config = {**VARIANTS, **BERT_VARIANTS}[variant]
    config = type(config).from_dict({**config.to_dict(), **config_overrides})
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """variant -> (saved HF folder, the HF model): each built once for the module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            model = random_hf(variant)
            path = tmp_path_factory.mktemp(variant)
            model.save_pretrained(path, safe_serialization=True)
            cache[variant] = (str(path), model)
        return cache[variant]
    return get


def hf_logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def bert_logits(model):
    """Our BERT's or a transformers BERT's logits on the padded batch, under our names
    (bert.Bert.forward); the masked-token logits at the real tokens only."""
    with torch.no_grad():
        out = model(input_ids=BERT_IDS, attention_mask=BERT_MASK, token_type_ids=BERT_TYPES)
    name = type(model).__name__
    if name.endswith("ForPreTraining"):
        out = {"mlm": out.prediction_logits, "sentence_order": out.seq_relationship_logits}
    elif name != "Bert":
        out = {"classes" if name.endswith("Classification") else "mlm": out.logits}
    return {head: logits[BERT_MASK.bool()] if head == "mlm" else logits for head, logits in out.items()}


def assert_same_heads(got, expected):
    assert got.keys() == expected.keys()
    for head in expected:
        assert_same_logits(got[head], expected[head])


# ----------------------------------------------------------------------------
# Logits equal transformers', importing and exporting
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_import_and_export_match_transformers(variant, hf_dirs, tmp_path):
    hf_dir, hf = hf_dirs(variant)
    expected = hf_logits(hf)
    ours = convert.from_hf(hf_dir)
    with torch.no_grad():
        assert_same_logits(ours(IDS), expected)
    convert.export_model(ours, tmp_path / "out")
    back, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert back.config.model_type == hf.config.model_type
    assert_same_logits(hf_logits(back.eval()), expected)
    # The config survives the round trip exactly.
    assert convert.read_hf_config(tmp_path / "out") == convert.read_hf_config(hf_dir)


def test_attention_mask_like_transformers(hf_dirs):
    hf_dir, hf = hf_dirs("qwen2-bias-tied")
    mask = torch.ones_like(IDS)
    mask[1, :5] = 0  # left padding
    expected = hf_logits(hf, attention_mask=mask)
    with torch.no_grad():
        got = convert.from_hf(hf_dir)(IDS, attention_mask=mask)
    assert_same_logits(got[mask.bool()], expected[mask.bool()])


def test_sharded_checkpoint(tmp_path):
    hf = random_hf("llama-gqa")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    with torch.no_grad():
        assert_same_logits(convert.from_hf(str(tmp_path))(IDS), hf_logits(hf))


@pytest.mark.parametrize("variant", ["llama-gqa", "gpt2"])
def test_bf16_checkpoint_is_read_into_fp32(variant, tmp_path):
    """Published checkpoints are mostly bf16: read, then upcast to our fp32 parameters."""
    random_hf(variant).to(torch.bfloat16).save_pretrained(tmp_path)
    ours = convert.from_hf(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    # transformers reading the same file into fp32 (a bf16 model cast to fp32 would keep
    # its RoPE frequencies rounded to bf16).
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_same_logits(ours(IDS), hf_logits(hf))


def test_names_without_the_base_model_prefix(hf_dirs, tmp_path):
    """GPT-2's own checkpoint was saved from GPT2Model: wte.weight, not transformer.wte.weight."""
    hf_dir, hf = hf_dirs("gpt2")
    shutil.copy(os.path.join(hf_dir, "config.json"), tmp_path)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        assert_same_logits(convert.from_hf(str(tmp_path))(IDS), hf_logits(hf))


@pytest.mark.parametrize("model_name,variant", [("llama", "qwen3-qknorm"), ("gpt", "gpt2-untied"),
                                                ("mamba", "mamba-untied-bias"),
                                                ("mamba", "mamba2-groups")])
def test_to_hf_inverts_from_hf(model_name, variant, hf_dirs):
    """to_hf(from_hf(t)) == t for every tensor, and to_hf gives HF's shapes."""
    hf_dir, hf = hf_dirs(variant)
    module = models.FAMILIES[model_name].file
    hf_state = hf.state_dict()
    model = convert.from_hf(hf_dir)
    for name, p in model.named_parameters():
        theirs = hf_state[module.hf_name(name, model.cfg)]
        ours = module.from_hf(name, theirs, model.cfg)
        assert ours.shape == p.shape and torch.equal(ours, p)
        assert torch.equal(module.to_hf(name, ours, model.cfg), theirs)
        assert torch.equal(module.from_hf(name, module.to_hf(name, p, model.cfg), model.cfg), p)


# ----------------------------------------------------------------------------
# BERT: the heads of each class, token types, padding
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", BERT_VARIANTS)
def test_bert_import_and_export_match_transformers(variant, hf_dirs, tmp_path):
    hf_dir, hf = hf_dirs(variant)
    expected = bert_logits(hf)
    ours = convert.from_hf(hf_dir)
    assert_same_heads(bert_logits(ours), expected)
    assert convert.export_model(ours, tmp_path / "out") == type(hf).__name__  # the class with our heads
    back, info = type(hf).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert_same_heads(bert_logits(back.eval()), expected)
    assert convert.read_hf_config(tmp_path / "out") == convert.read_hf_config(hf_dir)


def test_bert_checkpoint_with_unused_heads_and_old_names(hf_dirs, tmp_path):
    """bert-base-uncased's file: a BertForMaskedLM in config.json, but a file with the
    pooler and the next-sentence head, TensorFlow's LayerNorm names (gamma, beta), the
    position_ids buffer and a copy of the tied decoder."""
    hf_dir, hf = hf_dirs("bert-pretraining")
    config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    tensors = {k.replace("Norm.weight", "Norm.gamma").replace("Norm.bias", "Norm.beta"): t  # LayerNorm's
               for k, t in tensors.items()}
    assert {"bert.embeddings.LayerNorm.gamma", "bert.pooler.dense.weight",
            "cls.seq_relationship.weight"} <= tensors.keys()
    embed, bias = tensors["bert.embeddings.word_embeddings.weight"], tensors["cls.predictions.bias"]
    tensors.update({"bert.embeddings.position_ids": torch.arange(32)[None],
                    "cls.predictions.decoder.weight": embed.clone(),
                    "cls.predictions.decoder.bias": bias.clone()})

    def load(**changed):
        save_file({**tensors, **changed}, tmp_path / "model.safetensors", metadata={"format": "pt"})
        return convert.from_hf(str(tmp_path))
    ours = load()
    assert not ours.cfg.binary_head and ours.pooler is None
    assert_same_heads(bert_logits(ours), {"mlm": bert_logits(hf)["mlm"]})
    for copy, original in (("cls.predictions.decoder.weight", embed), ("cls.predictions.decoder.bias", bias)):
        with pytest.raises(UsageError, match=f"{copy} differs"):
            load(**{copy: original + 1e-3})
    with pytest.raises(UsageError, match="has no place for .*layer.2.output.dense.bias"):
        load(**{"bert.encoder.layer.2.output.dense.bias": torch.zeros(32)})


# ----------------------------------------------------------------------------
# Tensor-parallel import: each rank holds, and reads, only its slice
# ----------------------------------------------------------------------------

class SpyFile:
    """Wraps safe_open's handle and records how many elements each read returned."""

    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        raise AssertionError("load_hf_weights must read through get_slice")

    def get_slice(self, key):
        spy = self

        class Slice:
            def get_shape(self):
                return spy.handle.get_slice(key).get_shape()

            def __getitem__(self, index):
                t = spy.handle.get_slice(key)[index]
                spy.reads.setdefault(key, []).append(t.numel())
                return t
        return Slice()


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen3-qknorm", "gpt2", "mamba", "mamba2-groups",
                                     "bert-pretraining"])
def test_tensor_parallel_import_reads_only_its_slice(variant, hf_dirs, monkeypatch):
    hf_dir, hf = hf_dirs(variant)
    name, cfg = convert.read_hf_config(hf_dir)
    family, hf_state = models.FAMILIES[name], hf.state_dict()
    module = family.file
    real_open = convert.safe_open
    for rank in (0, 1):
        reads = {}
        monkeypatch.setattr(convert, "safe_open", lambda *a, **k: SpyFile(real_open(*a, **k), reads))
        model = convert.load_hf_weights(models.build(name, cfg, "cpu", 0, parallel.Layout(tp=2, rank=rank)),
                                        hf_dir)
        sharded = 0
        for ours, p in model.named_parameters():
            shape, offset, extent = parallel.global_region(p)
            full = module.from_hf(ours, hf_state[module.hf_name(ours, cfg)], cfg)
            mine = p[tuple(slice(0, n) for n in extent)]
            assert torch.equal(mine, full[tuple(slice(o, o + n) for o, n in zip(offset, extent))]), ours
            padding = p.detach().clone()
            padding[tuple(slice(0, n) for n in extent)] = 0
            assert not padding.any()  # vocabulary padding past the global tensor is zero
            (numel,) = reads[module.hf_name(ours, cfg)]
            if family.hf_reads_slices:  # LLaMA: exactly this rank's region came off disk
                assert numel == math.prod(extent)
            else:  # GPT-2 and Mamba reorder on the way in: each tensor is read whole
                assert numel == full.numel()
            sharded += parallel.tags(p).tp_sharded and math.prod(extent) < full.numel()
        assert sharded >= 6 * cfg.n_layers + 1  # each layer's matrices, and the embedding


# ----------------------------------------------------------------------------
# Our checkpoints: import -> train.py / generate.py, export back
# ----------------------------------------------------------------------------

def test_import_then_generate_and_export(hf_dirs, tmp_path):
    hf_dir, hf = hf_dirs("qwen2-bias-tied")
    step_dir, _ = convert.import_hf(hf_dir, tmp_path / "ckpt")
    assert step_dir == str(tmp_path / "ckpt" / checkpoint.step_dir_name(0))
    meta = checkpoint.read_meta(step_dir)
    assert meta["tokenizer"] == "byte" and meta["optimizer_steps"] == 0
    model, tokenizer = generate.load_model(str(tmp_path / "ckpt"))
    with torch.no_grad():
        assert_same_logits(model(IDS), hf_logits(hf))
    model, _ = generate.load_model(hf_dir)  # a HF folder loads directly too
    with torch.no_grad():
        assert_same_logits(model(IDS), hf_logits(hf))
    convert.export(str(tmp_path / "ckpt"), tmp_path / "back")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert_same_logits(hf_logits(back), hf_logits(hf))


def test_import_then_train_resumes_from_hf_weights(tmp_path):
    """train.py --load on an imported checkpoint: its first loss is the HF model's loss."""
    hf = random_hf("llama-gqa", vocab_size=300)  # room for the byte tokenizer's 257 tokens
    hf.save_pretrained(tmp_path / "hf")
    step_dir, model = convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    train.main(["--load", str(tmp_path / "ckpt"), "--data", str(text), "--steps", "2",
                        "--seq-len", "16", "--global-batch-size", "2", "--warmup-steps", "1",
                        "--seed", "5", "--sample-tokens", "0", "--peak-tflops", "1",
                        "--eval-every", "0", "--eval-batches", "1", "--metrics", str(tmp_path / "m.jsonl")])
    first = metrics.read_metrics(tmp_path / "m.jsonl")[0]
    train_data, _ = data.load_dataset(str(text), "byte", 16)
    x, y = train_data.batch(0, 5, 2, 16)
    expected = F.cross_entropy(hf_logits(hf, x).flatten(0, 1), y.flatten()).item()
    assert first["step"] == 1 and abs(first["loss"] - expected) <= 1e-5 * expected


# ----------------------------------------------------------------------------
# Hugging Face tokenizers
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE trained here on a few sentences, saved as tokenizer.json."""
    return byte_level_bpe(tmp_path_factory.mktemp("tokenizer"),
                          ["the quick brown fox jumps over the lazy dog"] * 10 + ["def main():\n    return 0\n"] * 10,
                          300, ["<pad>", "<|endoftext|>"], {"eos_token": "<|endoftext|>"})


def test_hf_tokenizer(hf_tokenizer_dir, tmp_path):
    enc = data.get_tokenizer("hf:" + hf_tokenizer_dir)
    assert enc.name == "hf:" + hf_tokenizer_dir and enc.eot_token == 1 and enc.n_vocab == 300
    text = "the quick brown fox\n\tnaïve café 日本語 🎉 <|endoftext|>"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert enc.eot_token not in ids  # special-token text is ordinary text, as in tiktoken
    assert len(enc.encode_ordinary("the quick brown fox")) < len("the quick brown fox")  # merges
    # Training data through it: in memory and prepared shards.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def main():\n    return 0\n" * 100)
    ids = enc.encode_ordinary(corpus.read_text())
    train_data, val = data.load_dataset(str(corpus), enc.name, 8)
    assert train_data.n_tokens + val.n_tokens == len(ids) + 1  # + end-of-text
    data.prepare(str(corpus), str(tmp_path / "prepared"), enc.name, val_fraction=0.1)
    prepared, _ = data.load_dataset(str(tmp_path / "prepared"), enc.name, 8)
    assert list(prepared.shards[0][:10]) == ids[:10]


def test_hf_tokenizer_needs_the_package(hf_tokenizer_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(UsageError, match="pip install tokenizers"):
        data.get_tokenizer("hf:" + hf_tokenizer_dir)


def test_import_with_tokenizer_samples_and_exports_it(hf_dirs, hf_tokenizer_dir, tmp_path):
    hf_dir = tmp_path / "hf"
    hf = random_hf("llama-gqa", vocab_size=300)
    hf.save_pretrained(hf_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_tokenizer_dir, f), hf_dir)
    convert.import_hf(str(hf_dir), str(tmp_path / "ckpt"))
    model, name = generate.load_model(str(tmp_path / "ckpt"))
    assert name == "hf:" + str(hf_dir)
    text = generate.sample_text(model, data.get_tokenizer(name), "def main", 5, seed=0)
    assert text.startswith("def main") and len(text) > len("def main")
    convert.export(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    assert os.path.isfile(tmp_path / "back" / "tokenizer.json")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == 1


# ----------------------------------------------------------------------------
# Configs and bad input: one-line UsageErrors, targets untouched
# ----------------------------------------------------------------------------

LLAMA_JSON = dict(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def config_of(tmp_path, **fields):
    """read_hf_config of LLAMA_JSON with `fields` changed (None: removed)."""
    config = {k: v for k, v in {**LLAMA_JSON, **fields}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return convert.read_hf_config(str(tmp_path))


def test_config_details(tmp_path):
    # transformers 4.x style: rope_theta and rope_scaling at the top level.
    _, cfg = config_of(tmp_path, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_original_max_seq_len) == (500000.0, 8.0, 8192)
    assert cfg.n_kv_heads == 4 and cfg.head_dim == 16 and not cfg.tie_embeddings
    # Qwen configs carry a sliding_window that is off unless use_sliding_window.
    _, cfg = config_of(tmp_path, model_type="qwen2", use_sliding_window=False, sliding_window=4096)
    assert cfg.sliding_window == 0 and cfg.qkv_bias
    _, cfg = config_of(tmp_path, model_type="qwen3", use_sliding_window=True, sliding_window=8,
                       max_window_layers=0)
    assert cfg.sliding_window == 8 and cfg.qk_norm
    with pytest.raises(UsageError, match="QK-norm with a bias"):
        llama.config_to_hf(llama.Config(**llama.PRESETS["test"], qk_norm=True, qkv_bias=True))
    assert gpt.config_from_hf(gpt.config_to_hf(gpt.Config())[1], "gpt2") == gpt.Config()
    # BERT: the heads from architectures, the number of classes from id2label.
    _, cfg = config_of(tmp_path, model_type="megatron-bert",
                       architectures=["MegatronBertForSequenceClassification"],
                       id2label={"0": "negative", "1": "neutral", "2": "positive"})
    assert cfg.pre_ln and cfg.n_classes == 3 and not cfg.mlm_head and not cfg.binary_head
    with pytest.raises(UsageError, match="no Hugging Face BERT class has the heads"):
        bert.hf_architecture(bert.Config(**bert.PRESETS["test"], mlm_head=False))  # binary head only


BERT_JSON = dict(model_type="bert", architectures=["BertForMaskedLM"])
CLASSIFIER_JSON = dict(model_type="bert", architectures=["BertForSequenceClassification"])


@pytest.mark.parametrize("fields,message", [
    (dict(model_type="gpt_neox"), "model_type 'gpt_neox' is not supported; supported: bert, gpt2, llama, mamba, mamba2, megatron-bert"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling of type 'yarn'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
     "some layers only"),
    (dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, activation_function="relu"),
     "activation_function"),
    (dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx"),
    (dict(hidden_size=None), "no 'hidden_size'"),
    (dict(BERT_JSON, architectures=["BertModel"]), r"architectures \['BertModel'\]"),
    (dict(BERT_JSON, architectures=None), "architectures None"),
    (dict(BERT_JSON, model_type="megatron-bert"), "ours: MegatronBertForPreTraining"),
    (dict(BERT_JSON, hidden_act="gelu_new"), "hidden_act='gelu_new'"),
    (dict(BERT_JSON, position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (dict(BERT_JSON, is_decoder=True), "is_decoder"),
    (dict(BERT_JSON, add_cross_attention=True), "add_cross_attention"),
    (dict(BERT_JSON, tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(CLASSIFIER_JSON, problem_type="regression"), "problem_type='regression'"),
    (dict(CLASSIFIER_JSON, id2label={"0": "score"}), "1 label"),
    (dict(CLASSIFIER_JSON, problem_type="multi_label_classification"), "multi_label"),
])
def test_unsupported_configs_are_refused(tmp_path, fields, message):
    with pytest.raises(UsageError, match=message):
        config_of(tmp_path, **fields)


def copy_of(hf_dirs, tmp_path, variant="llama-gqa"):
    path = tmp_path / "hf"
    shutil.copytree(hf_dirs(variant)[0], path)
    return path


def untouched(target, tmp_path):
    """The target does not exist and no temporary sibling was left behind."""
    return not os.path.exists(target) and not any(".tmp-" in f for f in os.listdir(tmp_path))


def test_truncated_safetensors(hf_dirs, tmp_path):
    path = copy_of(hf_dirs, tmp_path)
    weights = path / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(UsageError, match="truncated or damaged"):
        convert.import_hf(str(path), str(tmp_path / "ckpt"))
    assert untouched(tmp_path / "ckpt", tmp_path)


def test_missing_shard(tmp_path):
    random_hf("llama-gqa").save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / "hf" / shard)
    with pytest.raises(UsageError, match=f"{shard} is missing"):
        convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert untouched(tmp_path / "ckpt", tmp_path)


def test_weights_that_do_not_match_the_config(hf_dirs, tmp_path):
    path = copy_of(hf_dirs, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 102}))
    with pytest.raises(UsageError, match=r"model.embed_tokens.weight has shape \[101, 64\]"):
        convert.from_hf(str(path))
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(UsageError, match="lm_head.weight differs"):  # transformers won't tie it either
        convert.from_hf(str(path))
    tensors = load_file(path / "model.safetensors")  # a true copy is fine (older tied checkpoints)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
              path / "model.safetensors", metadata={"format": "pt"})
    assert convert.from_hf(str(path)).cfg.tie_embeddings
    random_hf("llama-gqa", attention_bias=True).save_pretrained(tmp_path / "bias")
    config = json.loads((tmp_path / "bias" / "config.json").read_text())
    (tmp_path / "bias" / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    with pytest.raises(UsageError, match="has no place for .*o_proj.bias"):
        convert.from_hf(str(tmp_path / "bias"))
    os.remove(path / "model.safetensors")
    with pytest.raises(UsageError, match="no model.safetensors"):
        convert.from_hf(str(path))


def test_existing_targets_are_never_overwritten(hf_dirs, tmp_path):
    hf_dir, _ = hf_dirs("llama-gqa")
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        convert.import_hf(hf_dir, str(target))
    convert.import_hf(hf_dir, str(tmp_path / "ckpt"))
    with pytest.raises(UsageError, match="not empty"):
        convert.export(str(tmp_path / "ckpt"), str(target))
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    convert.export(str(tmp_path / "ckpt"), str(tmp_path / "empty"))
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]  # (the byte tokenizer, written out)


def test_cli(hf_dirs, tmp_path, capsys):
    hf_dir, hf = hf_dirs("mistral-window")
    proc = subprocess.run([sys.executable, "convert.py", "import", hf_dir, str(tmp_path / "ckpt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.endswith(
        f"train with: python train.py --load {tmp_path / 'ckpt'}\n")  # (the checkpoint says the rest)
    convert.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back")])
    assert "exported" in capsys.readouterr().out
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert_same_logits(hf_logits(back), hf_logits(hf))
    capsys.readouterr()
    for argv in (["import", str(tmp_path / "nothing"), str(tmp_path / "x")],
                 ["export", str(tmp_path / "ckpt"), str(tmp_path / "back")]):
        with pytest.raises(SystemExit) as exit_info:
            convert.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_import_a_bert_then_fine_tune_a_classifier(tmp_path):
    """The README's path from a Hugging Face BERT to a classifier: convert.py import, then
    train.py --task with the printed flags and --load: the encoder starts from HF's weights."""
    hf = random_hf("bert-mlm", vocab_size=261)  # the byte tokenizer's BERT vocabulary
    hf.save_pretrained(tmp_path / "hf")
    _, model = convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    for name in ("a", "b"):
        os.makedirs(tmp_path / "task" / name)
        (tmp_path / "task" / name / "t.txt").write_text((name * 7 + "\n") * 300)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.main(["--task", str(tmp_path / "task"), "--load", str(tmp_path / "ckpt"),
                            "--steps", "1", "--seq-len", "16", "--global-batch-size", "2",
                            "--lr", "0", "--save", str(tmp_path / "tuned"), "--eval-batches", "1",
                            "--peak-tflops", "1"])
    # A BertForMaskedLM has no pooler: it starts fresh with the classifier, as in transformers.
    assert "new parameters: pooler.weight, pooler.bias, classifier.weight, classifier.bias" in out.getvalue()
    tuned = checkpoint.resolve(str(tmp_path / "tuned"))
    cfg = models.config_from_dict("bert", checkpoint.read_meta(tuned)["config"])
    assert (cfg.n_classes, cfg.mlm_head) == (2, False)
    tuned_model = models.build("bert", cfg, "cpu", 1)
    checkpoint.load(tuned, tuned_model, None, parallel.Layout())
    word = tuned_model.embed.weight
    assert torch.equal(word[:261], hf.bert.embeddings.word_embeddings.weight)  # lr 0: HF's own


# ----------------------------------------------------------------------------
# The tokenizer travels with the model
# ----------------------------------------------------------------------------

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TEXTS = ["the quick thing", "  the  end\n\nthe", "café éé", "x<|endoftext|>y", "thethe quickly", "日本語 ok",
         "a" * 100, "\tquick\r\n"]


def toy_tiktoken():
    """A tiktoken encoding built here (the published ones need a download): bytes, then
    merged tokens whose parts rank before them, GPT-2's pattern, an end-of-text."""
    import tiktoken
    ranks = {bytes([i]): i for i in range(256)}
    for token in [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" q", b"qu", b"ick", b"er", b"  ",
                  b"\n\n", "é".encode(), b"ui", b"uick", b" quick"]:
        ranks[token] = len(ranks)
    return tiktoken.Encoding("toy", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


@pytest.mark.parametrize("encoding", ["toy", "byte"])
def test_a_tiktoken_encoding_exports_as_a_tokenizer_json_that_encodes_the_same(encoding, tmp_path, monkeypatch):
    """Exporting a model trained with a tiktoken encoding (or our byte one) writes a
    tokenizer.json: transformers loads it, and every text encodes to the same ids (special
    tokens written in a text: as text with split_special_tokens, as the token without) and
    decodes back; config.json carries the end-of-text id; importing the export records it."""
    enc = toy_tiktoken() if encoding == "toy" else data.get_tokenizer("byte")
    monkeypatch.setattr(data, "get_tokenizer", lambda name, real=data.get_tokenizer: enc if name == "toy" else real(name))
    model = models.build("llama", models.make_config("llama", "test", [f"vocab_size={enc.n_vocab}"]), "cpu", 0)
    convert.export_model(model, tmp_path / "out", encoding)
    theirs = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == enc.encode_ordinary(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == enc.encode(text, allowed_special="all")
        assert theirs.decode(enc.encode_ordinary(text)) == text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == enc.eot_token
    imported = convert.tokenizer_name(str(tmp_path / "out"))
    assert [data.get_tokenizer(imported).encode_ordinary(t) for t in TEXTS] == [enc.encode_ordinary(t) for t in TEXTS]


def test_no_tokenizer_is_never_a_silent_byte_tokenizer(hf_dirs, tmp_path, capsys):
    """generate.py on a folder without tokenizer.json: one line asking for --tokenizer, which
    then works. A checkpoint trained with a tokenizer folder carries its files: once the
    folder moved (or changed, or the copy is damaged) it reads with its own copy."""
    hf_dir, _ = hf_dirs("llama-gqa")  # (saved by transformers without a tokenizer)
    with pytest.raises(SystemExit):
        generate.main(["--load", hf_dir, "--prompt", "a", "--max-new-tokens", "2"])
    assert "holds no tokenizer (tokenizer.json): pass --tokenizer" in capsys.readouterr().err
    generate.main(["--load", hf_dir, "--prompt", "a", "--max-new-tokens", "2", "--tokenizer", "byte"])
    assert capsys.readouterr().out.startswith("a")
    tokenizer_dir = tmp_path / "tok"
    shutil.copytree(hf_tokenizer_files(tmp_path), tokenizer_dir)
    ckpt = tmp_path / "ckpt"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--model", "llama", "--config", "test", "--set", "vocab_size=300", "--steps", "1",
                    "--seq-len", "16", "--global-batch-size", "2", "--sample-tokens", "0", "--peak-tflops", "1",
                    "--eval-batches", "1", "--tokenizer", f"hf:{tokenizer_dir}", "--save", str(ckpt)])
    original = data.tokenizer_fingerprint(f"hf:{tokenizer_dir}")
    step_dir = ckpt / checkpoint.step_dir_name(1)
    shutil.move(tokenizer_dir, tmp_path / "moved")
    assert checkpoint.tokenizer(str(step_dir), checkpoint.read_meta(str(step_dir))) == f"hf:{step_dir}"
    convert.export(str(ckpt), str(tmp_path / "out"))  # (the copy's files, exported)
    assert data.tokenizer_fingerprint(f"hf:{tmp_path / 'out'}") == original
    generate.main(["--load", str(ckpt), "--prompt", "the", "--max-new-tokens", "2", "--temperature", "0"])
    by_copy = capsys.readouterr().out
    generate.main(["--load", str(ckpt), "--prompt", "the", "--max-new-tokens", "2", "--temperature", "0",
                   "--tokenizer", f"hf:{tmp_path / 'moved'}"])
    assert capsys.readouterr().out == by_copy
    # A resume reads with the copy; --tokenizer points it at the moved folder (checked by
    # what it encodes); another tokenizer is refused.
    resume = ["--load", str(ckpt), "--steps", "2", "--seq-len", "16", "--global-batch-size", "2",
              "--sample-tokens", "0", "--peak-tflops", "1", "--eval-batches", "1"]
    for tokenizer in ([], ["--tokenizer", f"hf:{tmp_path / 'moved'}"]):
        with contextlib.redirect_stdout(io.StringIO()):
            records = train.train(flags.parse_args([*resume, *tokenizer]))
        assert [r["step"] for r in records] == [2]
    with pytest.raises(UsageError, match="does not encode as"):
        train.train(flags.parse_args([*resume, "--tokenizer", "byte"]))
    # A folder changed in place since: the copy, which the checkpoint was trained with.
    os.makedirs(tmp_path / "other")
    shutil.copytree(byte_level_bpe(tmp_path / "other", ["a b c d"] * 10, 280, ["<|endoftext|>"],
                                   {"eos_token": "<|endoftext|>"}), tokenizer_dir)
    assert checkpoint.tokenizer(str(step_dir), checkpoint.read_meta(str(step_dir))) == f"hf:{step_dir}"
    with open(step_dir / "tokenizer.json", "a") as f:  # a damaged copy: one line
        f.write(" ")
    with pytest.raises(UsageError, match="tokenizer.json"):
        convert.export(str(ckpt), str(tmp_path / "out2"))


def test_a_checkpoint_copy_keeps_an_end_of_text_named_in_config_json(tmp_path):
    """A folder naming its end-of-text only in config.json (eos_token_id): the copy a
    checkpoint carries (without config.json) names it in tokenizer_config.json."""
    folder = tmp_path / "tok"
    shutil.copytree(hf_tokenizer_files(tmp_path), folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, content in data.tokenizer_files(f"hf:{folder}").items():
        (copy / name).write_bytes(content)
    assert data.get_tokenizer(f"hf:{copy}").eot_token == 5
    assert data.tokenizer_fingerprint(f"hf:{copy}") == data.tokenizer_fingerprint(f"hf:{folder}")


def hf_tokenizer_files(tmp_path):
    os.makedirs(tmp_path / "bpe")
    return byte_level_bpe(tmp_path / "bpe", ["the quick brown fox"] * 10, 300, ["<|endoftext|>"],
                          {"eos_token": "<|endoftext|>"})
