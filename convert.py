"""Hugging Face import and export.

    python convert.py import HF_DIR CKPT_DIR     # a HF model folder -> one of our checkpoints
    python convert.py export CKPT_DIR HF_DIR     # one of our checkpoints -> a HF model folder

In Python, `convert.from_hf(path)` returns a model whose forward, called like the HF
model's (`input_ids`, optional `attention_mask`; BERT also `token_type_ids`), returns the
same logits (BERT: a dict of its heads' logits, see bert.Bert.forward; T5 also takes
`decoder_input_ids`, or `labels` to shift right, as T5ForConditionalGeneration does).

A Hugging Face folder is config.json plus safetensors weights (one `model.safetensors`,
or shards listed in `model.safetensors.index.json`). Conversion is two translations:

  1. the config (section 1): HF's config.json <-> our Config, one small function per
     family and direction. A setting our model cannot reproduce (a bias on o_proj, a
     RoPE scaling other than LLaMA 3.1's, another activation) is refused, never ignored;
  2. the tensors: each model file's `hf_name(name, cfg)` names our parameter's HF tensor,
     `from_hf(name, tensor, cfg)` puts it in our layout and `to_hf(name, tensor, cfg)` back.

Each family is one record in FAMILIES (section 2): the model file, its two config
translations, the HF model types it covers and the class written for each, the tensors
a file may hold as copies of others (tied), and the heads a file may hold that the config
does not use. Adding a family touches that table, plus the model file's three functions.

Import streams (section 3). The model is built first, only this rank's part of it (its
tensor-parallel shards; a pipeline stage would simply have fewer parameters); then each
parameter is filled with exactly the region of the global tensor it holds
(`parallel.global_region`). safetensors reads a region without reading the rest
(`get_slice`), so a tp rank of a LLaMA reads 1/tp of each sharded matrix. GPT-2's
tensors are transposed on the way in, so there a rank reads that one tensor whole and
keeps its slice. Nothing is ever unpickled (no `torch.load`).

Both directions write into a temporary sibling of the target and rename it into place
last (section 4): a failure leaves the target as it was, and a non-empty target is never
overwritten.
"""
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import bert
import checkpoint
import data
import errors
import gpt
import llama
import mamba
import mixtral
import models
import parallel
import t5
from errors import UsageError

# ----------------------------------------------------------------------------
# 1. Configs: Hugging Face config.json <-> our Config, per family
# ----------------------------------------------------------------------------


def _refuse(model_type, what):
    raise UsageError(f"{model_type} config: {what} is not supported by our model; refusing to "
                     f"convert rather than compute something else")


def _rope_from_hf(hf, model_type):
    """RoPE fields. transformers 5 writes `rope_parameters`; 4.x `rope_theta` + `rope_scaling`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        _refuse(model_type, "RoPE parameters that differ per layer type")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse(model_type, "partial_rotary_factor != 1")
    out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3":
        out.update(rope_scaling_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_seq_len=int(rope.get("original_max_position_embeddings",
                                                          hf["max_position_embeddings"])))
    elif kind != "default":
        _refuse(model_type, f"rope_scaling of type {kind!r} (only llama3 is)")
    return out


def _qwen_window(hf, model_type):
    """Qwen configs carry sliding_window even when it is off: it applies only with
    use_sliding_window, and then to the layers that layer_types (or, in older configs,
    i >= max_window_layers) mark as sliding. Ours is all layers or none."""
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return 0
    n = hf["num_hidden_layers"]
    kinds = set(hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                          else "full_attention" for i in range(n)])
    if kinds == {"full_attention"}:
        return 0
    if kinds != {"sliding_attention"}:
        _refuse(model_type, "sliding-window attention on some layers only")
    return int(hf["sliding_window"])


def llama_config_from_hf(hf, model_type):
    """LLaMA 2/3/3.1, Mistral, Qwen 2/2.5, Qwen 3 -> llama.Config."""
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        _refuse(model_type, f"hidden_act={hf['hidden_act']!r}")
    if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
        _refuse(model_type, "attention_bias (a bias on o_proj as well as Q, K, V)")
    if model_type == "llama" and hf.get("mlp_bias"):
        _refuse(model_type, "mlp_bias")
    window = 0
    if model_type == "mistral":
        window = hf.get("sliding_window") or 0
    elif model_type in ("qwen2", "qwen3"):
        window = _qwen_window(hf, model_type)
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    return llama.Config(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or dim // heads, ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 2048),
        sliding_window=int(window), qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_from_hf(hf, model_type))


def llama_config_to_hf(cfg):
    """llama.Config -> (model_type, config.json fields): the plainest HF family that has
    every feature used (QK-norm: Qwen 3; Q/K/V bias: Qwen 2; sliding window: Mistral)."""
    if cfg.qk_norm and cfg.qkv_bias:
        raise UsageError("no Hugging Face family has QK-norm with a bias on Q, K, V only; "
                         "cannot export")
    model_type = ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else
                  "mistral" if cfg.sliding_window else "llama")
    scaling = None
    if cfg.rope_scaling_factor:
        scaling = dict(rope_type="llama3", factor=cfg.rope_scaling_factor,
                       low_freq_factor=cfg.rope_low_freq_factor,
                       high_freq_factor=cfg.rope_high_freq_factor,
                       original_max_position_embeddings=cfg.rope_original_max_seq_len)
    hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
              rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
              tie_word_embeddings=cfg.tie_embeddings,
              # transformers 5 reads rope_parameters; 4.x rope_theta and rope_scaling.
              rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta},
              rope_theta=cfg.rope_theta, rope_scaling=scaling)
    if model_type in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if model_type == "llama":
        hf["mlp_bias"] = False
    if model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3"):
        window = cfg.sliding_window
        hf.update(use_sliding_window=bool(window), sliding_window=window or None, max_window_layers=0,
                  layer_types=[("sliding" if window else "full") + "_attention"] * cfg.n_layers)
    return model_type, hf


def gpt2_config_from_hf(hf, model_type):
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        _refuse(model_type, f"activation_function={hf['activation_function']!r} (ours: tanh GELU)")
    for key, ours in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, ours) != ours:
            _refuse(model_type, f"{key}={hf[key]}")
    return gpt.Config(vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"],
                      n_heads=hf["n_head"], ffn_dim=hf.get("n_inner") or 0,
                      max_seq_len=hf.get("n_positions", 1024),
                      norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def gpt2_config_to_hf(cfg):
    return "gpt2", dict(vocab_size=cfg.vocab_size, n_embd=cfg.dim, n_layer=cfg.n_layers,
                        n_head=cfg.n_heads, n_inner=cfg.ffn_dim, n_positions=cfg.max_seq_len,
                        n_ctx=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                        activation_function="gelu_new", tie_word_embeddings=cfg.tie_embeddings,
                        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)


def mixtral_config_from_hf(hf, model_type):
    """Mixtral -> mixtral.Config. The router's training settings (router_aux_loss_coef,
    whose loss is normalized differently from ours) are not architecture and are not read."""
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        _refuse(model_type, f"hidden_act={hf['hidden_act']!r}")
    if hf.get("router_jitter_noise"):
        _refuse(model_type, f"router_jitter_noise={hf['router_jitter_noise']}")
    rope = _rope_from_hf(hf, model_type)
    if set(rope) != {"rope_theta"}:
        _refuse(model_type, "RoPE scaling")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    return mixtral.Config(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or dim // heads, ffn_dim=hf["intermediate_size"],
        n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        norm_eps=hf.get("rms_norm_eps", 1e-5), max_seq_len=hf.get("max_position_embeddings", 4096),
        sliding_window=int(hf.get("sliding_window") or 0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=rope["rope_theta"])


def mixtral_config_to_hf(cfg):
    for field, what in (("qkv_bias", "a bias on Q, K, V"), ("qk_norm", "QK-norm"),
                        ("rope_scaling_factor", "RoPE scaling")):
        if getattr(cfg, field):
            raise UsageError(f"Hugging Face's Mixtral has no {what} ({field}); cannot export")
    return "mixtral", dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, sliding_window=cfg.sliding_window or None,
        tie_word_embeddings=cfg.tie_embeddings, router_jitter_noise=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_theta=cfg.rope_theta)

def mamba_config_from_hf(hf, model_type):
    """Mamba (MambaForCausalLM) and Mamba-2 (Mamba2ForCausalLM) -> mamba.Config."""
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        _refuse(model_type, f"hidden_act={hf['hidden_act']!r}")
    rank = hf.get("time_step_rank", "auto")
    fields = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  d_state=hf["state_size"], d_conv=hf.get("conv_kernel", 4), expand=hf.get("expand", 2),
                  conv_bias=bool(hf.get("use_conv_bias", True)), proj_bias=bool(hf.get("use_bias", False)),
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "mamba")),
                  dt_min=hf.get("time_step_min", 0.001), dt_max=hf.get("time_step_max", 0.1),
                  dt_init_floor=hf.get("time_step_floor", 1e-4))
    if model_type == "mamba":
        return mamba.Config(version=1, dt_rank=0 if rank == "auto" else int(rank), **fields)
    # transformers 5 writes infinity as {"__float__": "Infinity"}; json writes Infinity.
    low, high = (float(v["__float__"] if isinstance(v, dict) else v)
                 for v in hf.get("time_step_limit", (0.0, math.inf)))
    return mamba.Config(version=2, n_heads=hf["num_heads"], head_dim=hf["head_dim"],
                        n_groups=hf.get("n_groups", 1), chunk_size=hf.get("chunk_size", 256),
                        dt_limit_min=low, dt_limit_max=high, **fields)


def mamba_config_to_hf(cfg):
    if cfg.pattern != "M" * cfg.n_layers:
        raise UsageError(f"pattern {cfg.pattern!r}: Hugging Face's Mamba classes hold Mamba layers "
                         f"only; a hybrid cannot be exported")
    fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                  state_size=cfg.d_state, conv_kernel=cfg.d_conv, expand=cfg.expand,
                  use_conv_bias=cfg.conv_bias, use_bias=cfg.proj_bias, hidden_act="silu",
                  layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32,
                  tie_word_embeddings=cfg.tie_embeddings, time_step_min=cfg.dt_min,
                  time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor)
    if cfg.version == 1:
        return "mamba", dict(fields, time_step_rank=cfg.dt_rank)
    return "mamba2", dict(fields, num_heads=cfg.n_heads, head_dim=cfg.head_dim, n_groups=cfg.n_groups,
                          chunk_size=cfg.chunk_size,
                          time_step_limit=[cfg.dt_limit_min, cfg.dt_limit_max])


# The BertFor* classes converted -> the heads each holds: (mlm_head, binary_head, a
# classifier). MegatronBertFor* hold the same ones.
BERT_HEADS = {"ForPreTraining": (True, True, False), "ForMaskedLM": (True, False, False),
              "ForSequenceClassification": (False, False, True)}


def bert_config_from_hf(hf, model_type):
    """BERT (post-LN) and Megatron-BERT (pre-LN) -> bert.Config; the heads from
    `architectures`, the classes from id2label (config.json holds num_labels that way)."""
    prefix = "MegatronBert" if model_type == "megatron-bert" else "Bert"
    classes = [prefix + suffix for suffix in BERT_HEADS]
    architecture = next((a for a in hf.get("architectures") or () if a in classes), None)
    if architecture is None:
        _refuse(model_type, f"architectures {hf.get('architectures')} (ours: {', '.join(classes)})")
    if hf.get("hidden_act", "gelu") != "gelu":
        _refuse(model_type, f"hidden_act={hf['hidden_act']!r} (ours: the exact, erf GELU)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        _refuse(model_type, f"position_embedding_type={hf['position_embedding_type']!r}")
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            _refuse(model_type, f"{key}=true")
    mlm_head, binary_head, classifier = BERT_HEADS[architecture[len(prefix):]]
    if mlm_head and not hf.get("tie_word_embeddings", True):
        _refuse(model_type, "tie_word_embeddings=false (an MLM output layer of its own)")
    n_classes = (len(hf.get("id2label") or {}) or hf.get("num_labels", 2)) if classifier else 0
    problem = hf.get("problem_type")
    if classifier and (n_classes == 1 or problem not in (None, "single_label_classification")):
        _refuse(model_type, f"{architecture} with problem_type={problem!r}, {n_classes} label(s) "
                            f"(ours: single-label classification)")
    return bert.Config(vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 512),
                       type_vocab_size=hf.get("type_vocab_size", 2), dim=hf["hidden_size"],
                       n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                       ffn_dim=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-12),
                       pre_ln=model_type == "megatron-bert", mlm_head=mlm_head, binary_head=binary_head,
                       n_classes=n_classes, init_std=hf.get("initializer_range", 0.02))


def bert_config_to_hf(cfg):
    """bert.Config -> (model_type, config.json fields): Megatron-BERT's when pre_ln."""
    model_type = "megatron-bert" if cfg.pre_ln else "bert"
    fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_dim, hidden_act="gelu",
                  max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
                  layer_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
                  position_embedding_type="absolute", is_decoder=False, add_cross_attention=False,
                  tie_word_embeddings=True)
    if cfg.n_classes:
        labels = [f"LABEL_{i}" for i in range(cfg.n_classes)]
        fields.update(id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                      problem_type="single_label_classification")
    return model_type, fields


def bert_architecture(cfg):
    """The BertFor* (MegatronBertFor* when pre_ln) class that holds exactly our heads."""
    heads = (cfg.mlm_head, cfg.binary_head, cfg.n_classes > 0)
    suffix = next((s for s, h in BERT_HEADS.items() if h == heads), None)
    if suffix is None:
        raise UsageError(f"no Hugging Face BERT class has the heads mlm_head={cfg.mlm_head}, "
                         f"binary_head={cfg.binary_head}, n_classes={cfg.n_classes}; cannot export "
                         f"(supported: MLM, MLM + binary head, or a classifier alone)")
    return ("MegatronBert" if cfg.pre_ln else "Bert") + suffix


def bert_copies(cfg):
    """HF ties the MLM decoder to the word embedding and to the MLM bias."""
    return ({"cls.predictions.decoder.weight": "embed.weight", "cls.predictions.decoder.bias": "mlm_bias"}
            if cfg.mlm_head else {})


def bert_absent_heads(cfg):
    """Published checkpoints hold every pre-training head whatever their class
    (bert-base-uncased is a BertForMaskedLM with a pooler and a next-sentence head):
    transformers skips those its class lacks, and so do we."""
    heads = {"cls.predictions.": cfg.mlm_head, "bert.pooler.": cfg.pooler,
             "cls.seq_relationship.": cfg.binary_head, "classifier.": cfg.n_classes > 0}
    return tuple(prefix for prefix, present in heads.items() if not present)


# T5ForConditionalGeneration under its older name (the original t5-small/base/large configs).
T5_CLASSES = ("T5ForConditionalGeneration", "T5WithLMHeadModel")
# (gated, activation) of T5's FFN -> t5.Config.gated_gelu: ReLU, or GELU's tanh approximation, gated
T5_FFN = {(False, "relu"): False, (True, "gelu_new"): True, (True, "gelu_pytorch_tanh"): True}


def _t5_scaled(hf):
    """Whether T5's decoder output is scaled by d_model^-0.5 before the output layer, as
    transformers decides it: `scale_decoder_outputs` where config.json has it (transformers
    5 writes it, with tie_word_embeddings always true), else tie_word_embeddings not false."""
    return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings") is not False))


def t5_config_from_hf(hf, model_type):
    """T5 v1.0 (ReLU, output layer = the shared embedding, decoder output scaled) and v1.1 /
    FLAN-T5 (gated GELU, an output layer of its own, unscaled) -> t5.Config.

    Ours ties the output layer exactly when it scales (tie_embeddings does both). transformers
    5 keeps the two apart: it ties lm_head to `shared` unless the file holds both tensors,
    different, and scales as _t5_scaled says. So tie_embeddings is the scaling; a scaled
    model whose file holds an lm_head of its own is refused at load (config.json ties it),
    and an unscaled model whose file lacks lm_head.weight (transformers 5 saves a v1.1 model
    built from a config that way) gets a copy of `shared` (Family.stand_ins)."""
    if not set(hf.get("architectures") or ()) & set(T5_CLASSES):
        _refuse(model_type, f"architectures {hf.get('architectures')} (ours: {T5_CLASSES[0]})")
    # The FFN as T5Config derives it from feed_forward_proj ("relu", "gated-gelu" -> gelu_new,
    # "gated-ACT"); dense_act_fn and is_gated_act in config.json take precedence, as there.
    ffn = hf.get("feed_forward_proj", "relu")
    gated = hf.get("is_gated_act", ffn.startswith("gated-"))
    act = hf.get("dense_act_fn", "gelu_new" if ffn == "gated-gelu" else ffn.split("-")[-1])
    if (gated, act) not in T5_FFN:
        _refuse(model_type, f"feed_forward_proj={ffn!r} ({'gated ' if gated else ''}{act}; ours: "
                            f"'relu' or 'gated-gelu', the tanh approximation)")
    if hf.get("is_encoder_decoder") is False or hf.get("is_decoder"):
        _refuse(model_type, "a decoder-only T5 (is_decoder / is_encoder_decoder=false)")
    start = hf.get("decoder_start_token_id")
    if start is None:  # T5's decoder starts with the pad token
        start = hf.get("pad_token_id")
    return t5.Config(vocab_size=hf["vocab_size"], dim=hf["d_model"], n_heads=hf["num_heads"],
                     head_dim=hf["d_kv"], ffn_dim=hf["d_ff"], n_encoder_layers=hf["num_layers"],
                     n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
                     num_buckets=hf.get("relative_attention_num_buckets", 32),
                     max_distance=hf.get("relative_attention_max_distance", 128),
                     norm_eps=hf.get("layer_norm_epsilon", 1e-6), gated_gelu=T5_FFN[gated, act],
                     tie_embeddings=_t5_scaled(hf), decoder_start_token_id=0 if start is None else start)


def t5_config_to_hf(cfg):
    """t5.Config -> T5Config fields. Both tie_word_embeddings (which transformers 4.x reads)
    and scale_decoder_outputs (transformers 5) are ours; an untied model's file holds both
    `shared` and `lm_head`, which transformers 5 then keeps apart. The pad token is the
    decoder's start token, as in T5: transformers' labels-only path (and ours) turns ignored
    labels (-100) into it."""
    return "t5", dict(vocab_size=cfg.vocab_size, d_model=cfg.dim, num_heads=cfg.n_heads, d_kv=cfg.head_dim,
                      d_ff=cfg.ffn_dim, num_layers=cfg.n_encoder_layers,
                      num_decoder_layers=cfg.n_decoder_layers,
                      relative_attention_num_buckets=cfg.num_buckets,
                      relative_attention_max_distance=cfg.max_distance, layer_norm_epsilon=cfg.norm_eps,
                      feed_forward_proj="gated-gelu" if cfg.gated_gelu else "relu",
                      tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.tie_embeddings,
                      is_encoder_decoder=True, decoder_start_token_id=cfg.decoder_start_token_id,
                      pad_token_id=cfg.decoder_start_token_id)


def t5_copies(cfg):
    """The shared embedding's copies that files hold (both stacks', and a tied lm_head)."""
    return {"encoder.embed_tokens.weight": "embed.weight", "decoder.embed_tokens.weight": "embed.weight",
            **_tied_lm_head(cfg)}


def t5_absent_heads(cfg):
    """Older checkpoints hold a relative-attention bias for the first cross-attention,
    which T5 never uses (transformers skips it too)."""
    return ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.",)


def t5_stand_ins(cfg):
    """An untied (unscaled) T5 file without lm_head.weight: transformers ties it to shared."""
    return {} if cfg.tie_embeddings else {"lm_head.weight": "shared.weight"}

# ----------------------------------------------------------------------------
# 2. Families: one record each
# ----------------------------------------------------------------------------

def _tied_lm_head(cfg):
    """A tied decoder's file may still hold its output layer (older checkpoints do)."""
    return {"lm_head.weight": "embed.weight"} if cfg.tie_embeddings else {}


@dataclasses.dataclass
class Family:
    """One model file and its Hugging Face counterparts."""
    model: str           # our registry name (models.MODELS)
    module: object       # the model file: hf_name, from_hf and to_hf of each parameter
    config_from_hf: object  # (config.json dict, model_type) -> our Config
    config_to_hf: object    # our Config -> (model_type, config.json fields)
    architectures: dict  # HF model_type -> the transformers class written into config.json, or a
                         # function of our Config choosing it (BERT's class depends on its heads)
    reads_slices: bool   # from_hf is the identity, so a rank reads only its region from disk
    preset: str          # train_flags writes a config as overrides of this preset
    # our Config -> {HF tensor that a file may hold as a tied copy: our parameter it must equal}
    copies: object = _tied_lm_head
    # our Config -> name prefixes of the HF heads it lacks, whose tensors import skips
    absent_heads: object = lambda cfg: ()
    # our Config -> {HF tensor a file may lack: the HF tensor transformers uses in its place}
    stand_ins: object = lambda cfg: {}

    def architecture(self, model_type, cfg):
        """The transformers class that export writes into config.json."""
        chosen = self.architectures[model_type]
        return chosen if isinstance(chosen, str) else chosen(cfg)


FAMILIES = {f.model: f for f in (
    Family("gpt", gpt, gpt2_config_from_hf, gpt2_config_to_hf, {"gpt2": "GPT2LMHeadModel"},
           reads_slices=False, preset="gpt2"),  # GPT-2's Conv1D weights are transposed
    Family("llama", llama, llama_config_from_hf, llama_config_to_hf,
           {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"},
           reads_slices=True, preset="llama2-7b"),
    Family("mixtral", mixtral, mixtral_config_from_hf, mixtral_config_to_hf,
           {"mixtral": "MixtralForCausalLM"}, reads_slices=True, preset="mixtral-8x7b"),
    Family("mamba", mamba, mamba_config_from_hf, mamba_config_to_hf,
           {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"},
           reads_slices=False, preset="mamba2-130m"),  # in_proj and conv1d are reordered
    Family("bert", bert, bert_config_from_hf, bert_config_to_hf,
           {"bert": bert_architecture, "megatron-bert": bert_architecture}, reads_slices=True,
           preset="bert-base", copies=bert_copies, absent_heads=bert_absent_heads),
    Family("t5", t5, t5_config_from_hf, t5_config_to_hf, {"t5": "T5ForConditionalGeneration"},
           reads_slices=True, preset="t5-base", copies=t5_copies, absent_heads=t5_absent_heads,
           stand_ins=t5_stand_ins),
)}
BY_HF_TYPE = {model_type: f for f in FAMILIES.values() for model_type in f.architectures}


def family_of(model):
    """The Family of a model built by models.build."""
    name = models.name_of(model)
    if name not in FAMILIES:
        raise UsageError(f"{type(model).__name__} has no Hugging Face conversion")
    return FAMILIES[name]

# ----------------------------------------------------------------------------
# 3. Import: read config.json, stream each parameter's region from safetensors
# ----------------------------------------------------------------------------

# Buffers that old transformers versions saved with the weights: not parameters.
OLD_BUFFERS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", "embeddings.position_ids")


class _HFTensors:
    """The tensors of a HF folder by name, across one or several safetensors files.
    Every file is opened up front, so a missing or truncated shard fails before any work."""

    def __init__(self, hf_dir):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.where = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"cannot read {index} ({e!r}); the folder is damaged") from None
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            self.where = None
        else:
            raise UsageError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json "
                             f"(only safetensors weights are read; pickled .bin files never are)")
        self.files = {}
        names = ["model.safetensors"] if self.where is None else sorted(set(self.where.values()))
        for name in names:
            path = os.path.join(hf_dir, name)
            if not os.path.isfile(path):
                raise UsageError(f"{path} is missing (listed in {os.path.basename(index)})")
            try:
                self.files[name] = safe_open(path, framework="pt")
            except (OSError, SafetensorError) as e:
                raise UsageError(f"cannot read {path} ({e}); is it truncated or damaged?") from None
        if self.where is None:
            self.where = {key: "model.safetensors" for key in self.files["model.safetensors"].keys()}
        self.views = {}
        self._split_fused_experts()

    def _split_fused_experts(self):
        """Mixtral files name one tensor per expert (`block_sparse_moe.experts.5.w1.weight`);
        transformers 5 holds them fused in memory and writes them fused only when asked
        (save_original_format=False): `mlp.experts.gate_up_proj` (experts, 2 * ffn, dim, w1
        rows then w3 rows), `mlp.experts.down_proj` (experts, dim, ffn), `mlp.gate.weight`.
        Such tensors are listed under the file names: {name: (fused name, expert, rows)}."""
        fused = [k for k in self.where
                 if k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))]
        if not fused:
            return
        for key in fused + [k for k in self.where if k.endswith(".mlp.gate.weight")]:
            layer, _, kind = key.partition(".mlp.")
            moe = layer + ".block_sparse_moe."
            shape = self.files[self.where[key]].get_slice(key).get_shape()
            if kind == "gate.weight":
                views = {moe + kind: (key, None, None)}
            elif kind == "experts.down_proj":
                views = {f"{moe}experts.{e}.w2.weight": (key, e, None) for e in range(shape[0])}
            else:
                ffn = shape[1] // 2
                views = {f"{moe}experts.{e}.{w}.weight": (key, e, rows) for e in range(shape[0])
                         for w, rows in (("w1", (0, ffn)), ("w3", (ffn, 2 * ffn)))}
            for name, view in views.items():
                self.views[name], self.where[name] = view, self.where[key]
            del self.where[key]

    def find(self, key):
        """`key`, or the older names that transformers also reads: without the base-model
        prefix ("transformer.", "model.", "bert."; files saved from the base model, GPT-2's
        own), and LayerNorm's TensorFlow names gamma and beta (BERT's own files)."""
        old = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        names = (key, key.partition(".")[2], old, old.partition(".")[2])
        return next((k for k in names if k in self.where), None)

    def get_slice(self, key):
        try:
            if key in self.views:
                return _ExpertView(self.files[self.where[key]].get_slice(self.views[key][0]),
                                   *self.views[key][1:])
            return self.files[self.where[key]].get_slice(key)
        except SafetensorError as e:
            raise UsageError(f"cannot read tensor {key} from {self.where[key]} ({e})") from None


class _ExpertView:
    """One expert's tensor (and rows) inside a fused tensor, read like a safetensors slice."""

    def __init__(self, fused, expert, rows):
        self.fused, self.expert, self.rows = fused, expert, rows

    def get_shape(self):
        shape = self.fused.get_shape()[0 if self.expert is None else 1:]
        return [self.rows[1] - self.rows[0], *shape[1:]] if self.rows else shape

    def __getitem__(self, region):
        if self.expert is None:
            return self.fused[region]
        rows, *rest = region if isinstance(region, tuple) else (region,)
        if self.rows:  # a region of w1 or w3: the same rows shifted within gate_up_proj
            start, stop, _ = rows.indices(self.rows[1] - self.rows[0])
            rows = slice(self.rows[0] + start, self.rows[0] + stop)
        return self.fused[(slice(self.expert, self.expert + 1), rows, *rest)][0]


# config.json keys that are sizes in some family (a positive integer where present, or null),
# checked before a translation computes with them (hidden_size // num_attention_heads).
HF_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "n_embd", "n_layer", "n_head", "d_model", "num_heads", "d_kv",
            "d_ff", "num_layers", "state_size", "max_position_embeddings", "n_positions")


def read_hf_config(hf_dir):
    """(our model name, Config) from HF_DIR/config.json."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except OSError:
        raise UsageError(f"{hf_dir} has no config.json: not a Hugging Face model folder") from None
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise UsageError(f"{path} is not a JSON object of config fields")
    model_type = hf.get("model_type")
    if model_type not in BY_HF_TYPE:
        raise UsageError(f"{path}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(BY_HF_TYPE)}")
    for key in HF_SIZES:  # before a translation divides by one
        value = hf.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{path}: {key}={value!r} must be a positive integer; the folder's "
                             f"config.json is damaged")
    family = BY_HF_TYPE[model_type]
    try:
        return family.model, family.config_from_hf(hf, model_type)
    except KeyError as e:
        raise UsageError(f"{path} has no {e.args[0]!r}, which a {model_type} config needs") from None
    except UsageError as e:  # our Config refused a value, named by our field's name
        raise UsageError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # e.g. float("fast") for a RoPE field
        raise UsageError(f"{path}: a value has the wrong type ({e}); the folder's config.json is "
                         f"damaged") from None


@torch.no_grad()
def load_hf_weights(model, hf_dir):
    """Fill every parameter of `model` (from models.build, under any layout) with its
    region of the HF folder's tensors. Returns the model."""
    family, tensors = family_of(model), _HFTensors(hf_dir)
    module, used, stand_ins = family.module, set(), family.stand_ins(model.cfg)
    for ours, param in model.named_parameters():
        name = module.hf_name(ours, model.cfg)
        key = tensors.find(name)
        if key is None and name in stand_ins:
            key = tensors.find(stand_ins[name])
        if key is None:
            raise UsageError(f"{hf_dir} has no tensor {name} (our {ours}); the "
                             f"weights do not match config.json")
        shape, offset, extent = parallel.global_region(param)
        expected = list(module.to_hf(ours, torch.empty(shape, device="meta"), model.cfg).shape)
        hf_slice = tensors.get_slice(key)
        if list(hf_slice.get_shape()) != expected:
            raise UsageError(f"{key} has shape {list(hf_slice.get_shape())} in {hf_dir}, but "
                             f"config.json implies {expected}")
        region = tuple(slice(o, o + n) for o, n in zip(offset, extent))
        if family.reads_slices:
            piece = hf_slice[region]  # reads this rank's region only
        else:
            piece = module.from_hf(ours, hf_slice[:], model.cfg)[region]
        param.zero_()  # vocabulary padding past the global tensor stays zero
        param[tuple(slice(0, n) for n in extent)] = piece.to(param.dtype)
        used.add(key)
    # The whole model (no pipeline stage, no expert shard): every tensor must find a place,
    # but for tied copies and the heads the config does not use.
    if getattr(model.layout, "pp", 1) == 1 and getattr(model.layout, "ep", 1) == 1:
        copies, absent = family.copies(model.cfg), family.absent_heads(model.cfg)
        extra = sorted(k for k in tensors.where if k not in used and k not in copies
                       and not k.endswith(OLD_BUFFERS) and not k.startswith(absent))
        if extra:
            raise UsageError(f"{hf_dir} holds {len(extra)} tensor(s) our {family.model} model has no place "
                             f"for ({', '.join(extra[:3])}...); config.json does not describe them")
        params = dict(model.named_parameters())
        for copy in (c for c in copies if c in tensors.where):  # a stored copy must be a copy (as in HF)
            param = params[copies[copy]]
            _, offset, extent = parallel.global_region(param)
            stored = tensors.get_slice(copy)[tuple(slice(o, o + n) for o, n in zip(offset, extent))]
            if not torch.equal(stored.to(param.dtype), param[tuple(slice(0, n) for n in extent)]):
                raise UsageError(f"{hf_dir}: config.json ties {copy} to "
                                 f"{module.hf_name(copies[copy], model.cfg)}, but {copy} differs from "
                                 f"it; set tie_word_embeddings false")
    return model


def from_hf(path, device="cpu"):
    """A one-process model (eval mode) with the weights of the HF folder `path`."""
    name, cfg = read_hf_config(path)
    model = models.build(name, cfg, torch.device(device), seed=0)
    return load_hf_weights(model, path).eval()


def tokenizer_name(hf_dir):
    """The data.get_tokenizer name for a HF folder: its tokenizer.json, else bytes."""
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return data.HF_PREFIX + os.path.abspath(hf_dir)
    return data.BYTE_TOKENIZER


def train_flags(name, cfg, tokenizer):
    """train.py flags that rebuild exactly `cfg` (overrides of the family's default preset)."""
    preset = FAMILIES[name].preset
    base, flags = models.make_config(name, preset), ["--model", name, "--config", preset]
    for field in dataclasses.fields(cfg):
        if getattr(cfg, field.name) != getattr(base, field.name):
            flags += ["--set", f"{field.name}={getattr(cfg, field.name)}"]
    return flags + (["--tokenizer", tokenizer] if tokenizer != data.BYTE_TOKENIZER else [])

# ----------------------------------------------------------------------------
# 4. Writing: atomic target directories, import into a checkpoint, export
# ----------------------------------------------------------------------------


def _check_target(target):
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise UsageError(f"{target} already exists and is not empty: refusing to overwrite it; "
                         f"choose another directory")


def _write_atomically(target, write):
    """write(tmp) into a temporary sibling of `target`, then rename it to `target`."""
    _check_target(target)
    tmp = f"{os.path.abspath(target).rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise UsageError(f"{target}: cannot create it ({e.strerror}); choose another directory") from None
    try:
        write(tmp)
        os.replace(tmp, target)  # also replaces an empty directory
    except OSError as e:  # a full disk, ...: the target is as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot write {target} ({e.strerror}); nothing was written; free space "
                         f"or choose another directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_hf(hf_dir, ckpt_dir):
    """HF folder -> a checkpoint root that `train.py --load CKPT_DIR` resumes (step 0, fresh
    AdamW moments). Returns (its step directory, the model)."""
    _check_target(ckpt_dir)
    model = from_hf(hf_dir).train()
    layout = parallel.Layout()
    ddp = parallel.DataParallel(model, layout)
    optimizer = parallel.AdamW(ddp, lr=0.0, weight_decay=0.0)
    meta = {"model": family_of(model).model, "config": dataclasses.asdict(model.cfg),
            "tokenizer": tokenizer_name(hf_dir), "tokens_seen": 0, "optimizer_steps": 0, "seed": 0,
            "loss_scale": 65536.0, "loss_scale_clean_steps": 0}  # as train.py writes them
    _write_atomically(ckpt_dir, lambda tmp: checkpoint.save(tmp, 0, model, optimizer, layout, meta))
    ddp.close()  # the model goes back to the caller without gradient hooks
    return os.path.join(ckpt_dir, checkpoint.step_dir_name(0)), model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_model(model, hf_dir, eos_token_id=None, tokenizer_dir=None):
    """Write a one-process model as a HF folder: config.json + model.safetensors (fp32),
    plus the tokenizer files of `tokenizer_dir` if given. Returns the transformers class."""
    family = family_of(model)
    if model.layout.tp > 1 or model.layout.pp > 1 or model.layout.ep > 1:
        raise UsageError("export needs the whole model: build it with parallel.Layout() "
                         "(checkpoint.load reassembles the shards)")
    model_type, fields = family.config_to_hf(model.cfg)
    architecture = family.architecture(model_type, model.cfg)
    if eos_token_id is not None and not 0 <= eos_token_id < model.cfg.vocab_size:
        eos_token_id = None
    config = {"architectures": [architecture], "model_type": model_type,
              "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
              **fields, "torch_dtype": "float32", "dtype": "float32"}  # fields may set a pad token
    # Copies (contiguous, unshared): parameters may be views of one flat training buffer.
    # A tied model has no parameter for its output layer (lm_head, BERT's decoder): none is written.
    module = family.module
    tensors = {module.hf_name(n, model.cfg): module.to_hf(n, p.detach().cpu().float(), model.cfg)
               .contiguous().clone() for n, p in model.named_parameters()}

    def write(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for file in TOKENIZER_FILES if tokenizer_dir else ():
            if os.path.isfile(os.path.join(tokenizer_dir, file)):
                shutil.copy(os.path.join(tokenizer_dir, file), tmp)
    _write_atomically(hf_dir, write)
    return architecture


def export(ckpt, hf_dir):
    """One of our checkpoints (a save root or a step directory) -> a HF folder."""
    step_dir = checkpoint.resolve(ckpt)
    meta = checkpoint.read_meta(step_dir)
    _check_target(hf_dir)
    cfg = models.config_from_dict(meta["model"], meta["config"])
    model = models.build(meta["model"], cfg, "cpu", 0)
    checkpoint.load(step_dir, model, None, parallel.Layout())  # reassembles tp shards
    tok = meta.get("tokenizer", data.BYTE_TOKENIZER)
    tokenizer_dir = tok[len(data.HF_PREFIX):] if tok.startswith(data.HF_PREFIX) else None
    eos = None
    if tok == data.BYTE_TOKENIZER or tokenizer_dir:  # at hand without a download
        try:
            eos = data.get_tokenizer(tok).eot_token
        except UsageError:  # e.g. the tokenizer's folder has moved
            pass
    return step_dir, export_model(model, hf_dir, eos, tokenizer_dir)


def main(argv=None):
    p = errors.ArgumentParser(description="Hugging Face import/export.")
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("import", help="HF model folder -> checkpoint root for train.py --load")
    c.add_argument("hf_dir", help="a Hugging Face model folder (config.json, safetensors)")
    c.add_argument("ckpt_dir", help="the checkpoint root to write (must not exist, or be empty)")
    c = commands.add_parser("export", help="checkpoint (save root or step dir) -> HF model folder")
    c.add_argument("ckpt_dir", help="one of our checkpoints: a save root (its newest step) or a step")
    c.add_argument("hf_dir", help="the Hugging Face folder to write (must not exist, or be empty)")
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            step_dir, model = import_hf(args.hf_dir, args.ckpt_dir)
            name, n = family_of(model).model, sum(p.numel() for p in model.parameters())
            flags = train_flags(name, model.cfg, tokenizer_name(args.hf_dir))
            print(f"imported {args.hf_dir} ({name}, {n / 1e6:.2f}M parameters) into {step_dir}; "
                  f"train with: python train.py {shlex.join(flags + ['--load', args.ckpt_dir])}")
        else:
            step_dir, architecture = export(args.ckpt_dir, args.hf_dir)
            print(f"exported {step_dir} to {args.hf_dir} ({architecture}: "
                  f"config.json + model.safetensors)")
    except UsageError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
