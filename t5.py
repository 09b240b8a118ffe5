"""T5: the text-to-text encoder-decoder transformer (Raffel et al., 2020).

    input tokens  -> shared embedding -> n_encoder_layers x EncoderLayer -> RMSNorm = memory
    target tokens -> shared embedding -> n_decoder_layers x DecoderLayer -> RMSNorm -> logits
                     (shifted right)            (each reads the memory by cross-attention)

    EncoderLayer: x + SelfAttention(RMSNorm(x)) [bidirectional, relative position bias]
                  x + FFN(RMSNorm(x))
    DecoderLayer: x + SelfAttention(RMSNorm(x)) [causal, relative position bias]
                  x + CrossAttention(RMSNorm(x), memory) [no position bias]
                  x + FFN(RMSNorm(x))

What distinguishes it from the decoders (gpt.py, llama.py):
  - positions enter only as a learned bias on the attention scores: the key-minus-query
    distance falls into one of `num_buckets` buckets (exact for small distances,
    logarithmic up to `max_distance`, one bucket beyond), and each bucket has a learned
    number per head. One table per stack (bidirectional in the encoder, past-only in the
    decoder), shared by every layer of it; kernels.attention adds it inside the kernel;
  - no 1/sqrt(head_dim) scaling of the scores (the initialization absorbs it), no biases
    anywhere, RMSNorm without mean subtraction ("T5 LayerNorm");
  - FFN: ReLU (T5 v1.0) or gated GELU, GELU(x W0) * (x W1) (v1.1, FLAN-T5);
  - output layer: tied to the shared embedding with the decoder output scaled by
    dim^-0.5 (v1.0), or a separate matrix, unscaled (v1.1);
  - the objective: span corruption (data.SpanCorruptionData): the encoder reads text with
    spans replaced by sentinels, the decoder writes the spans back after their sentinels.

Pipeline parallelism: the layers are numbered encoder first, then decoder (`layers.0` ..
`layers.{n_encoder_layers + n_decoder_layers - 1}`), and cut into chunks like any model's.
The first chunk embeds both the inputs and the decoder's inputs; what a chunk passes on is
the two side by side, [encoder states ; decoder states] along the sequence: encoder chunks
transform the first part and carry the second, decoder chunks carry the (final) encoder
output along for their cross-attention and transform the second. The bias tables are tiny
and every chunk holds both (parallel.keep_chunk's `shared`). Context parallelism is not
supported (train.py refuses it): cross-attention would need a ring over keys of another
length than the queries, for sequences that are short in T5's use.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import errors
import kernels
import parallel


@dataclass
class Config:
    """T5-base (v1.0) by default; the fields of Hugging Face's T5Config."""
    vocab_size: int = 32128
    dim: int = 768                 # d_model
    n_heads: int = 12
    head_dim: int = 64             # d_kv: n_heads * head_dim need not equal dim
    ffn_dim: int = 3072            # d_ff
    n_encoder_layers: int = 12     # num_layers
    n_decoder_layers: int = 12
    num_buckets: int = 32          # relative_attention_num_buckets
    max_distance: int = 128        # relative_attention_max_distance
    norm_eps: float = 1e-6
    gated_gelu: bool = False       # v1.1: GELU(x W0) * (x W1); v1.0: ReLU(x W)
    tie_embeddings: bool = True    # v1.0: output layer = embedding, scaled by dim^-0.5
    decoder_start_token_id: int = 0  # the decoder's first input (T5: the pad token)
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_encoder_layers == 0 or self.n_decoder_layers == 0:  # said plainly, before the field checks
            raise errors.UsageError("T5 needs at least one encoder and one decoder layer")
        errors.check_config_fields(self)
        if self.num_buckets < 4 or self.max_distance < self.num_buckets // 2:
            raise errors.UsageError(f"num_buckets={self.num_buckets}, max_distance="
                                      f"{self.max_distance}: need num_buckets >= 4 and "
                                      f"max_distance >= num_buckets / 2")

    @property
    def n_layers(self):
        """Layers in the pipeline: the encoder's, then the decoder's."""
        return self.n_encoder_layers + self.n_decoder_layers


_V1_1 = dict(gated_gelu=True, tie_embeddings=False)
# Presets are keyword arguments of Config. The byte-level presets have 358 tokens: 256
# bytes, end-of-text, the pad token (the decoder's start) and 100 sentinels (see
# data.t5_special_tokens).
PRESETS = {
    "t5-small": dict(dim=512, n_heads=8, ffn_dim=2048, n_encoder_layers=6, n_decoder_layers=6),
    "t5-base": dict(),
    "t5-large": dict(dim=1024, n_heads=16, ffn_dim=4096, n_encoder_layers=24, n_decoder_layers=24),
    "t5-v1_1-base": dict(ffn_dim=2048, **_V1_1),
    "flan-t5-base": dict(ffn_dim=2048, **_V1_1),  # T5 v1.1 fine-tuned on instructions
    # Learns visibly in a few CPU minutes.
    "tiny": dict(vocab_size=358, dim=128, n_heads=4, head_dim=32, ffn_dim=512, n_encoder_layers=4,
                 n_decoder_layers=4, decoder_start_token_id=257, **_V1_1),
    # A unit-test model (few buckets and a short max_distance, so far buckets are used).
    "test": dict(vocab_size=358, dim=64, n_heads=4, head_dim=16, ffn_dim=128, n_encoder_layers=2,
                 n_decoder_layers=2, num_buckets=8, max_distance=20, decoder_start_token_id=257,
                 **_V1_1),
}


# Our parameter names -> Hugging Face T5ForConditionalGeneration's.
HF_TOP = {"embed.weight": "shared.weight", "lm_head.weight": "lm_head.weight",
          "enc_norm.weight": "encoder.final_layer_norm.weight",
          "norm.weight": "decoder.final_layer_norm.weight",
          "enc_position_bias": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
          "dec_position_bias": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
HF_PROJ = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
           "fc": "wi", "gate": "wi_0", "up": "wi_1", "proj": "wo"}
# (sub-layer index, module) of each of our modules, in the encoder and the decoder block
HF_ENCODER = {"attn": "0.SelfAttention", "attn_norm": "0.layer_norm",
              "mlp": "1.DenseReluDense", "mlp_norm": "1.layer_norm"}
HF_DECODER = {"attn": "0.SelfAttention", "attn_norm": "0.layer_norm",
              "cross_attn": "1.EncDecAttention", "cross_norm": "1.layer_norm",
              "mlp": "2.DenseReluDense", "mlp_norm": "2.layer_norm"}


def hf_name(name, cfg):
    """Our parameter name -> Hugging Face's."""
    if name in HF_TOP:
        return HF_TOP[name]
    _, index, module, rest = name.split(".", 3)  # layers.{i}.{module}.{...}
    index = int(index)
    stack, table = ("encoder", HF_ENCODER) if index < cfg.n_encoder_layers else ("decoder", HF_DECODER)
    index -= 0 if stack == "encoder" else cfg.n_encoder_layers
    if module in ("attn", "cross_attn", "mlp"):
        proj, _, param = rest.partition(".")
        rest = f"{HF_PROJ[proj]}.{param}"
    return f"{stack}.block.{index}.layer.{table[module]}.{rest}"


def from_hf(name, tensor, cfg):
    """A Hugging Face tensor in our layout (the same: every tensor keeps its shape)."""
    return tensor


def to_hf(name, tensor, cfg):
    """Our tensor in Hugging Face's layout: the inverse of from_hf (the same)."""
    return tensor


def shift_right(labels, start_token_id):
    """The decoder's inputs for `labels`: the start token, then the labels but the last
    (teacher forcing); ignored positions (-100) become the start (pad) token, as in T5."""
    shifted = torch.full_like(labels, start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, start_token_id)


class Attention(nn.Module):
    """Self- or cross-attention without biases and without score scaling; under tp each
    rank owns n_heads/tp heads (and, for self-attention, those columns of the bias table)."""
    recompute_core = False  # set by parallel.apply_recompute (selective recomputation)

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.layout, self.head_dim = layout, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = (
            parallel.ColumnParallelLinear(cfg.dim, inner, layout, name="n_heads * head_dim")
            for _ in range(3))
        self.o_proj = parallel.RowParallelLinear(inner, cfg.dim, layout, name="n_heads * head_dim")

    def heads(self, proj, x):
        B, T, _ = x.shape
        return proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, x, key_padding_mask, causal, position_bias, kv_cache=None):
        """Self-attention over x; `kv_cache` (a kernels.KVCache) when decoding."""
        x = parallel.linear_input(x, self.layout)
        k, v = self.heads(self.k_proj, x), self.heads(self.v_proj, x)
        if kv_cache is not None:
            k, v, _ = kv_cache.update(k, v)  # (T5 decodes without padding)
        return self._attend(x, k, v, key_padding_mask, causal, position_bias)

    def cross(self, x, memory, memory_mask, cache=None):
        """Cross-attention from x to `memory`, the encoder output as this rank holds it
        (a sequence shard under sp: every tp rank needs all of it). With a CrossCache the
        keys and values are computed at the first call only."""
        x = parallel.linear_input(x, self.layout)
        if cache is not None and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            memory = parallel.linear_input(memory, self.layout)
            k, v = self.heads(self.k_proj, memory), self.heads(self.v_proj, memory)
            if cache is not None:
                cache.k, cache.v = k, v
        return self._attend(x, k, v, memory_mask, False, None)

    def _attend(self, x, k, v, key_padding_mask, causal, position_bias):
        q = self.heads(self.q_proj, x)
        y = kernels.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=1.0,
                              position_bias=position_bias, recompute=self.recompute_core)
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class CrossCache:
    """Cross-attention keys and values of one decoder layer, computed from the encoder
    output at the first decoding step and reused at every later one."""
    k = v = None


class FFN(nn.Module):
    """ReLU(x W) or GELU(x W0) * (x W1), then the output projection; under tp each rank
    owns ffn_dim/tp hidden features."""

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.layout = layout
        if cfg.gated_gelu:
            self.gate = parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, layout, name="ffn_dim")
            self.up = parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, layout, name="ffn_dim")
        else:
            self.fc = parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, layout, name="ffn_dim")
        self.proj = parallel.RowParallelLinear(cfg.ffn_dim, cfg.dim, layout, name="ffn_dim")

    def forward(self, x):
        x = parallel.linear_input(x, self.layout)
        if hasattr(self, "gate"):  # T5 v1.1's "gelu_new" is GELU's tanh approximation
            return self.proj(F.gelu(self.gate(x), approximate="tanh") * self.up(x))
        return self.proj(F.relu(self.fc(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.attn_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layout)
        self.mlp_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FFN(cfg, layout)

    def forward(self, x, key_padding_mask, position_bias):
        x = x + self.attn(self.attn_norm(x), key_padding_mask, False, position_bias)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.attn_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layout)
        self.cross_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.cross_attn = Attention(cfg, layout)
        self.mlp_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FFN(cfg, layout)

    def forward(self, x, memory, memory_mask, position_bias, cache=None):
        """`memory`: the encoder output as this rank holds it (a sequence shard under sp);
        `cache`: (KVCache, CrossCache) when decoding."""
        self_cache, cross_cache = cache or (None, None)
        x = x + self.attn(self.attn_norm(x), None, True, position_bias, self_cache)
        x = x + self.cross_attn.cross(self.cross_norm(x), memory, memory_mask, cross_cache)
        return x + self.mlp(self.mlp_norm(x))


class T5(nn.Module):
    """The shared embedding, both stacks, their bias tables and norms, and the output
    layer. Under pipeline parallelism one chunk of it (see the module docstring)."""

    def __init__(self, cfg: Config, layout=None, chunk=None):
        super().__init__()
        self.cfg = cfg
        self.layout = layout = layout or parallel.Layout()
        parallel.check_divisible(layout.tp, n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim)
        self.embed = parallel.VocabParallelEmbedding(cfg.vocab_size, cfg.dim, layout)
        self.enc_position_bias = parallel.tp_sharded_parameter((cfg.num_buckets, cfg.n_heads), 1,
                                                               layout, "n_heads")
        self.dec_position_bias = parallel.tp_sharded_parameter((cfg.num_buckets, cfg.n_heads), 1,
                                                               layout, "n_heads")
        n_enc = cfg.n_encoder_layers
        self.layers = nn.ModuleDict({str(i): EncoderLayer(cfg, layout) if i < n_enc else
                                     DecoderLayer(cfg, layout) for i in range(cfg.n_layers)})
        self.enc_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = (None if cfg.tie_embeddings else
                        parallel.VocabParallelOutput(cfg.vocab_size, cfg.dim, layout))
        # This pipeline chunk of the whole model; sets self.chunk (its layers, first, last).
        parallel.keep_chunk(self, chunk, first=["embed"], last=["norm", "lm_head"],
                            tied_embedding="embed" if cfg.tie_embeddings else None,
                            shared=["enc_position_bias", "dec_position_bias"])
        if str(n_enc - 1) not in self.layers:  # the encoder's final norm: with its last layer
            self.enc_norm = None

    def init_weights(self, seed):
        """Deterministic, layout-independent initialization (see parallel.init_parameters):
        normal(0, init_std) matrices, embeddings and bias tables, unit norm gains."""
        parallel.init_parameters(self, seed, lambda name: self.cfg.init_std)

    def position_biases(self):
        """The (encoder, decoder) self-attention biases for kernels.attention."""
        return (kernels.RelativePositionBias(self.enc_position_bias, True, self.cfg.max_distance),
                kernels.RelativePositionBias(self.dec_position_bias, False, self.cfg.max_distance))

    def forward(self, input_ids, labels=None, attention_mask=None, decoder_input_ids=None, hidden=None):
        """Called like Hugging Face's T5ForConditionalGeneration: input_ids (B, T) and
        attention_mask (B, T) for the encoder (1 = real token, 0 = padding), and
        decoder_input_ids (B, T_dec) (default: `labels` shifted right). Returns the
        logits (B, T_dec, vocab), or with labels (-100: not a target) the sum of the token
        losses. A pipeline chunk after the first takes the previous chunk's output as
        `hidden`; a chunk before the last returns [encoder states ; decoder states]."""
        cfg, layout = self.cfg, self.layout
        if decoder_input_ids is None:
            if labels is None:
                raise errors.UsageError("T5's decoder needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, cfg.decoder_start_token_id)
        shard = layout.tp if layout.sp else 1
        lengths = input_ids.shape[1], decoder_input_ids.shape[1]
        if any(n % shard for n in lengths):
            raise errors.UsageError(f"encoder and decoder lengths {lengths} must be divisible by "
                                      f"tp={layout.tp} under sequence parallelism; pass --no-sp")
        memory_mask = None if attention_mask is None else attention_mask.bool()
        if hidden is None:
            enc, dec = self.embed(input_ids), self.embed(decoder_input_ids)
        else:
            enc, dec = hidden.split([n // shard for n in lengths], dim=1)
        enc_bias, dec_bias = self.position_biases()
        for i, layer in self.layers.items():
            if int(i) < cfg.n_encoder_layers:
                enc = layer(enc, memory_mask, enc_bias)
                if int(i) == cfg.n_encoder_layers - 1:
                    enc = self.enc_norm(enc)
            else:
                dec = layer(dec, enc, memory_mask, dec_bias)
        if not self.chunk.last:
            return torch.cat([enc, dec], dim=1)
        return self._output(dec, labels)

    def _output(self, x, labels):
        # v1.0 rescales before reusing the embedding matrix
        return parallel.language_model_output(self, x, labels, self.cfg.dim ** -0.5 if self.cfg.tie_embeddings
                                              else None)

    # Decoding (generate.py): the encoder runs once; then each step runs the decoder over
    # the new token only, with its self-attention keys and values cached and the
    # cross-attention keys and values computed from the encoder output once.

    def encode(self, input_ids, attention_mask=None):
        """The encoder output (B, T, dim) of the whole model (no pipeline, tp = 1 or no sp)."""
        mask = None if attention_mask is None else attention_mask.bool()
        x = self.embed(input_ids)
        enc_bias, _ = self.position_biases()
        for i in range(self.cfg.n_encoder_layers):
            x = self.layers[str(i)](x, mask, enc_bias)
        return self.enc_norm(x)

    def new_caches(self, max_len):
        """Per decoder layer: a self-attention KV cache of max_len positions and a cross cache."""
        return [(kernels.KVCache(max_len), CrossCache()) for _ in range(self.cfg.n_decoder_layers)]

    def decode(self, decoder_input_ids, memory, attention_mask, caches):
        """Logits (B, T_new, vocab) of the new decoder tokens, appended to the caches."""
        mask = None if attention_mask is None else attention_mask.bool()
        x = self.embed(decoder_input_ids)
        _, dec_bias = self.position_biases()
        for j, cache in enumerate(caches):
            x = self.layers[str(self.cfg.n_encoder_layers + j)](x, memory, mask, dec_bias, cache)
        return self._output(x, None)

    def flops_per_token(self, seq_len, decoder_len):
        """Training FLOPs per encoder token (3 x forward; 2 per weight of each matmul per
        token) for sequences of seq_len encoder and decoder_len decoder tokens: encoder
        layers, decoder layers (self- and cross-attention projections, the FFN), attention
        scores and weighted sums (the cross-attention's over the encoder's tokens), and the
        output layer on the decoder tokens."""
        c = self.cfg
        inner, ffn = c.n_heads * c.head_dim, (3 if c.gated_gelu else 2) * c.dim * c.ffn_dim
        encoder = c.n_encoder_layers * (2 * (4 * c.dim * inner + ffn) + 2 * 2 * seq_len * inner)
        decoder = (c.n_decoder_layers * (2 * (8 * c.dim * inner + ffn) + 2 * 2 * (decoder_len + seq_len) * inner)
                   + 2 * c.dim * c.vocab_size)
        return 3 * (encoder * seq_len + decoder * decoder_len) / seq_len


# ----------------------------------------------------------------------------
# Hugging Face: config.json <-> Config (convert.py reads and writes the files; a setting
# this model cannot reproduce is refused, never ignored)
# ----------------------------------------------------------------------------

# T5ForConditionalGeneration under its older name (the original t5-small/base/large configs).
HF_CLASSES = ("T5ForConditionalGeneration", "T5WithLMHeadModel")


# (gated, activation) of T5's FFN -> t5.Config.gated_gelu: ReLU, or GELU's tanh approximation, gated
HF_FFN = {(False, "relu"): False, (True, "gelu_new"): True, (True, "gelu_pytorch_tanh"): True}


def _hf_scaled(hf):
    """Whether T5's decoder output is scaled by d_model^-0.5 before the output layer, as
    transformers decides it: `scale_decoder_outputs` where config.json has it (transformers
    5 writes it, with tie_word_embeddings always true), else tie_word_embeddings not false."""
    return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings") is not False))


def config_from_hf(hf, model_type):
    """T5 v1.0 (ReLU, output layer = the shared embedding, decoder output scaled) and v1.1 /
    FLAN-T5 (gated GELU, an output layer of its own, unscaled) -> t5.Config.

    Ours ties the output layer exactly when it scales (tie_embeddings does both). transformers
    5 keeps the two apart: it ties lm_head to `shared` unless the file holds both tensors,
    different, and scales as _hf_scaled says. So tie_embeddings is the scaling; a scaled
    model whose file holds an lm_head of its own is refused at load (config.json ties it),
    and an unscaled model whose file lacks lm_head.weight (transformers 5 saves a v1.1 model
    built from a config that way) gets a copy of `shared` (hf_stand_ins)."""
    if not set(hf.get("architectures") or ()) & set(HF_CLASSES):
        errors.unsupported_hf(model_type, f"architectures {hf.get('architectures')} (ours: {HF_CLASSES[0]})")
    # The FFN as T5Config derives it from feed_forward_proj ("relu", "gated-gelu" -> gelu_new,
    # "gated-ACT"); dense_act_fn and is_gated_act in config.json take precedence, as there.
    ffn = hf.get("feed_forward_proj", "relu")
    gated = hf.get("is_gated_act", ffn.startswith("gated-"))
    act = hf.get("dense_act_fn", "gelu_new" if ffn == "gated-gelu" else ffn.split("-")[-1])
    if (gated, act) not in HF_FFN:
        errors.unsupported_hf(model_type, f"feed_forward_proj={ffn!r} ({'gated ' if gated else ''}{act}; ours: "
                            f"'relu' or 'gated-gelu', the tanh approximation)")
    if hf.get("is_encoder_decoder") is False or hf.get("is_decoder"):
        errors.unsupported_hf(model_type, "a decoder-only T5 (is_decoder / is_encoder_decoder=false)")
    start = hf.get("decoder_start_token_id")
    if start is None:  # T5's decoder starts with the pad token
        start = hf.get("pad_token_id")
    return Config(vocab_size=hf["vocab_size"], dim=hf["d_model"], n_heads=hf["num_heads"],
                     head_dim=hf["d_kv"], ffn_dim=hf["d_ff"], n_encoder_layers=hf["num_layers"],
                     n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
                     num_buckets=hf.get("relative_attention_num_buckets", 32),
                     max_distance=hf.get("relative_attention_max_distance", 128),
                     norm_eps=hf.get("layer_norm_epsilon", 1e-6), gated_gelu=HF_FFN[gated, act],
                     tie_embeddings=_hf_scaled(hf), decoder_start_token_id=0 if start is None else start)


def config_to_hf(cfg):
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


def hf_copies(cfg):
    """The shared embedding's copies that files hold (both stacks', and a tied lm_head)."""
    return {"encoder.embed_tokens.weight": "embed.weight", "decoder.embed_tokens.weight": "embed.weight",
            **({"lm_head.weight": "embed.weight"} if cfg.tie_embeddings else {})}


def hf_absent_heads(cfg):
    """Older checkpoints hold a relative-attention bias for the first cross-attention,
    which T5 never uses (transformers skips it too)."""
    return ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.",)


def hf_stand_ins(cfg):
    """An untied (unscaled) T5 file without lm_head.weight: transformers ties it to shared."""
    return {} if cfg.tie_embeddings else {"lm_head.weight": "shared.weight"}
