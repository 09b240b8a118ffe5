"""BERT: a bidirectional transformer encoder, pre-trained by masked language modeling.

    tokens -> word + learned position + token-type embeddings (-> LayerNorm)
           -> n_layers x Layer (every token attends to every real token: no causal mask)
           -> heads: masked-token prediction on every token, and on the first token
              ([CLS]) a pooler (dense + tanh) feeding a sentence-order head or a classifier

What distinguishes it from the decoders (gpt.py, llama.py):
  - bidirectional attention, with a key-padding mask: sequences have different lengths
    and padding must never be attended to;
  - token types (segment A or B of a sentence pair) embedded and added to the input;
  - the objective: predict the ~15% of tokens that the data replaced by [MASK] (or by a
    random token, or left as they were), plus a sentence-level task: whether the two
    segments are in order (Megatron's sentence order; BERT's next sentence has the same
    labels), or, when fine-tuning, a class per sequence.

Two layer forms, chosen by `pre_ln`:
  post-LN (original BERT, Hugging Face BertModel):
      x = LayerNorm(x + Attention(x));  x = LayerNorm(x + MLP(x)); an embedding LayerNorm
  pre-LN (Megatron's BERT, MegatronBertModel):
      x = x + Attention(LayerNorm(x));  x = x + MLP(LayerNorm(x)); a final LayerNorm
Megatron moved the norm inside the residual branch because post-LN BERT diverges when
made large (the BERT-large to 3.9B scaling study of Shoeybi et al., 2019).

Parallelism needs nothing new inside the layers (tp, sp, cp, pp as for GPT). The heads:
the masked-token head is per token (dense, GELU, LayerNorm) and then the output layer,
tied to the word embedding and with its own bias, evaluated only at the predicted
tokens; the sentence head reads the first token, which lives on one rank of a cp group
(and of a tp group under sp): parallel.first_token says how that stays exact.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import errors
import gpt
import kernels
import parallel

IGNORE = -100  # a label that is not a target (unmasked tokens, as in Hugging Face)
MASKED_FRACTION = 0.15  # BERT's share of predicted tokens (for the FLOP count only)


@dataclass
class Config:
    """BERT-base with both pre-training heads by default; the fields of HF's BertConfig."""
    vocab_size: int = 30522
    max_seq_len: int = 512         # learned positions: no longer sequence is possible
    type_vocab_size: int = 2
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    norm_eps: float = 1e-12
    pre_ln: bool = False           # Megatron's BERT: norms inside the residual branches
    mlm_head: bool = True          # masked-token prediction
    binary_head: bool = True       # sentence order (next sentence) on the pooled [CLS]
    n_classes: int = 0             # > 0: a sequence classifier on the pooled [CLS]
    init_std: float = 0.02

    def __post_init__(self):
        errors.check_config_fields(self)
        if self.dim % self.n_heads:
            raise errors.UsageError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_classes == 1 or self.n_classes < 0:
            raise errors.UsageError(f"n_classes={self.n_classes}: a classifier needs at least "
                                      f"2 classes (0: no classifier)")
        if not (self.mlm_head or self.binary_head or self.n_classes):
            raise errors.UsageError("a BERT needs a head: set mlm_head, binary_head or n_classes")

    @property
    def pooler(self):
        """The sentence-level heads read the pooled first token."""
        return self.binary_head or self.n_classes > 0


# Presets are keyword arguments of Config. The byte-level presets have 261 tokens: 256
# bytes, end-of-text and BERT's [CLS], [SEP], [MASK], [PAD] (see data.bert_special_tokens).
PRESETS = {
    "bert-base": dict(),
    "bert-large": dict(dim=1024, n_layers=24, n_heads=16, ffn_dim=4096),
    # Megatron's BERT-345M (nvidia/megatron-bert-uncased-345m): BERT's 30522 tokens padded
    # to a multiple of 128; 336M parameters counted, "345M" in its name.
    "megatron-bert-345m": dict(vocab_size=30592, dim=1024, n_layers=24, n_heads=16, ffn_dim=4096,
                               pre_ln=True),
    # Learns visibly in a few CPU minutes.
    "tiny": dict(vocab_size=261, dim=256, n_layers=4, n_heads=4, ffn_dim=1024, max_seq_len=512),
    # A unit-test model.
    "test": dict(vocab_size=261, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=256),
}


# Our parameter names -> Hugging Face's: modules outside the layers, modules of a layer,
# and a layer's two norms, which sit elsewhere (and are named otherwise) in each form.
HF_MODULES = {"embed": "bert.embeddings.word_embeddings", "pos_embed": "bert.embeddings.position_embeddings",
              "type_embed": "bert.embeddings.token_type_embeddings",
              "embed_norm": "bert.embeddings.LayerNorm", "norm": "bert.encoder.ln",
              "pooler": "bert.pooler.dense", "mlm_dense": "cls.predictions.transform.dense",
              "mlm_norm": "cls.predictions.transform.LayerNorm", "binary_head": "cls.seq_relationship",
              "classifier": "classifier"}
HF_LAYER_MODULES = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
                    "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
                    "mlp.fc": "intermediate.dense", "mlp.proj": "output.dense"}
HF_LAYER_NORMS = {False: {"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"},
                  True: {"attn_norm": "attention.ln", "mlp_norm": "ln"}}  # pre_ln: Megatron's


def hf_name(name, cfg):
    """Our parameter name -> Hugging Face's (BertFor*, or MegatronBertFor* when pre_ln)."""
    if name == "mlm_bias":
        return "cls.predictions.bias"
    module, _, param = name.rpartition(".")
    if module.startswith("layers."):
        _, index, module = module.split(".", 2)
        module = {**HF_LAYER_MODULES, **HF_LAYER_NORMS[cfg.pre_ln]}[module]
        return f"bert.encoder.layer.{index}.{module}.{param}"
    return f"{HF_MODULES[module]}.{param}"


def from_hf(name, tensor, cfg):
    """A Hugging Face tensor in our layout (the same: every tensor keeps its shape)."""
    return tensor


def to_hf(name, tensor, cfg):
    """Our tensor in Hugging Face's layout: the inverse of from_hf (the same)."""
    return tensor


class Attention(nn.Module):
    """Bidirectional self-attention over the real tokens; under tp each rank owns
    n_heads/tp heads (separate Q, K, V projections with biases, as BERT's)."""
    recompute_core = False  # set by parallel.apply_recompute (selective recomputation)

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.layout, self.head_dim = layout, cfg.dim // cfg.n_heads
        self.q_proj, self.k_proj, self.v_proj = (
            parallel.ColumnParallelLinear(cfg.dim, cfg.dim, layout, bias=True) for _ in range(3))
        self.o_proj = parallel.RowParallelLinear(cfg.dim, cfg.dim, layout, bias=True)

    def forward(self, x, positions, key_padding_mask):
        x = parallel.linear_input(x, self.layout)
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = parallel.context_attention(q, k, v, positions, self.layout, causal=False,
                                       key_padding_mask=key_padding_mask, recompute=self.recompute_core)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Layer(nn.Module):
    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn = Attention(cfg, layout)
        self.attn_norm = kernels.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = gpt.MLP(cfg, layout, gelu="none")  # GPT-2's MLP with the exact (erf) GELU
        self.mlp_norm = kernels.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, positions, key_padding_mask):
        if self.pre_ln:
            x = x + self.attn(self.attn_norm(x), positions, key_padding_mask)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, positions, key_padding_mask))
        return self.mlp_norm(x + self.mlp(x))


class Bert(nn.Module):
    """Embeddings, the layers, and the heads that the config asks for. Under pipeline
    parallelism one chunk of it (parallel.keep_chunk): the embeddings belong to the first
    chunk, the heads to the last, which also holds the word embedding (the tied output)."""

    def __init__(self, cfg: Config, layout=None, chunk=None):
        super().__init__()
        self.cfg = cfg
        self.layout = layout = layout or parallel.Layout()
        parallel.check_divisible(layout.tp, n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim)
        self.embed = parallel.VocabParallelEmbedding(cfg.vocab_size, cfg.dim, layout)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.embed_norm = None if cfg.pre_ln else kernels.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleDict({str(i): Layer(cfg, layout) for i in range(cfg.n_layers)})
        self.norm = kernels.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.pre_ln else None
        # Masked-token head: a per-token transform, then logits through the word embedding.
        self.mlm_dense = nn.Linear(cfg.dim, cfg.dim) if cfg.mlm_head else None
        self.mlm_norm = kernels.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.mlm_head else None
        self.mlm_bias = parallel.vocab_parallel_bias(cfg.vocab_size, layout) if cfg.mlm_head else None
        # Sentence-level heads on the pooled first token.
        self.pooler = nn.Linear(cfg.dim, cfg.dim) if cfg.pooler else None
        self.binary_head = nn.Linear(cfg.dim, 2) if cfg.binary_head else None
        self.classifier = nn.Linear(cfg.dim, cfg.n_classes) if cfg.n_classes else None
        # This pipeline chunk of the whole model; sets self.chunk (its layers, first, last).
        parallel.keep_chunk(self, chunk, first=["embed", "pos_embed", "type_embed", "embed_norm"],
                            last=["norm", "mlm_dense", "mlm_norm", "mlm_bias", "pooler",
                                  "binary_head", "classifier"],
                            tied_embedding="embed" if cfg.mlm_head else None)
        self.stats = {}  # figures of the heads since pop_stats, see _count

    def init_weights(self, seed):
        """Deterministic, layout-independent initialization (see parallel.init_parameters):
        normal(0, init_std) matrices and embeddings, zero biases, unit norm gains (BERT's)."""
        parallel.init_parameters(self, seed, lambda name: self.cfg.init_std)

    def forward(self, input_ids, labels=None, attention_mask=None, token_type_ids=None,
                sentence_order_labels=None, sentence_order_weight=1.0, hidden=None):
        """Called like Hugging Face's BertFor* (input_ids, attention_mask, token_type_ids).
        Without labels: a dict of the heads' logits, "mlm" (B, T, vocab), "sentence_order"
        (B, 2), "classes" (B, n_classes). With labels, the *sum* of the losses (the caller
        divides by the global number of targets, as for every model here):
          pre-training: labels (B, T), the original token where one is to be predicted,
            IGNORE elsewhere, and sentence_order_labels (B,); the sum of the masked-token
            losses + sentence_order_weight x the sum of the sentence-order losses;
          fine-tuning (n_classes > 0): labels (B,), the sum of the classification losses.
        A pipeline chunk after the first takes the previous chunk's output as `hidden`."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise errors.UsageError(f"sequence of {T} tokens exceeds max_seq_len="
                                      f"{self.cfg.max_seq_len} (learned positions)")
        layout = self.layout
        positions = parallel.zigzag_positions(T, layout, input_ids.device)
        real = None if attention_mask is None else attention_mask.bool()
        if hidden is None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = (self.embed(parallel.context_shard(input_ids, layout))
                 + parallel.sequence_shard(self.pos_embed(positions)[None]
                                           + self.type_embed(parallel.context_shard(types, layout)), layout))
            x = x if self.embed_norm is None else self.embed_norm(x)
        else:
            x = hidden
        for layer in self.layers.values():
            x = layer(x, positions, real)
        if not self.chunk.last:
            return x
        x = x if self.norm is None else self.norm(x)
        if labels is None:
            return self._logits(x)
        if self.cfg.n_classes:
            return self._sentence_loss(x, self.classifier, labels, "class")
        loss = self._masked_token_loss(x, labels) if self.cfg.mlm_head else 0.0
        if self.cfg.binary_head:
            loss = loss + sentence_order_weight * self._sentence_loss(
                x, self.binary_head, sentence_order_labels, "sentence_order")
        return loss

    def _mlm_hidden(self, x):
        return self.mlm_norm(F.gelu(self.mlm_dense(x)))

    def _pooled(self, x):
        return torch.tanh(self.pooler(parallel.first_token(x, self.layout)))

    def _logits(self, x):
        out = {}
        if self.cfg.mlm_head:
            out["mlm"] = parallel.output_layer(self._mlm_hidden(x), self.embed.weight, None, self.layout,
                                               self.cfg.vocab_size, self.mlm_bias)
        if self.cfg.pooler:
            pooled = self._pooled(x)
            if self.binary_head is not None:
                out["sentence_order"] = self.binary_head(pooled)
            if self.classifier is not None:
                out["classes"] = self.classifier(pooled)
        return out

    def _masked_token_loss(self, x, labels):
        """Summed loss of the predicted tokens. The transform runs on this rank's tokens
        (under sp a shard of them); the output layer only on the predicted ones, which
        every tp rank selects alike from the gathered sequence (~15% of the logits)."""
        h = parallel.enter_tp_region(self._mlm_hidden(x), self.layout)
        labels = parallel.context_shard(labels, self.layout)
        predicted = labels != IGNORE
        h, labels = h[predicted], labels[predicted]
        args = (self.embed.weight, labels, self.layout, self.cfg.vocab_size, self.mlm_bias)
        hits = parallel.vocab_parallel_hits(h.detach(), *args)
        self._count("mlm", torch.stack([hits, hits.new_tensor(len(labels))]))
        return parallel.vocab_parallel_cross_entropy(h, *args)

    def _sentence_loss(self, x, head, labels, what):
        """Summed loss of a head on the pooled first token, computed on the ranks holding
        that token and shared over tp (see parallel.first_token)."""
        logits = head(self._pooled(x)).float()
        labels = labels[:len(logits)]  # all of them, or none on a rank without the token
        hits = (logits.detach().argmax(-1) == labels).sum()
        self._count(what, parallel.share_first_token_sums(torch.stack([hits, hits.new_tensor(len(labels))]),
                                                          self.layout))
        return parallel.share_first_token_sums(F.cross_entropy(logits, labels, reduction="sum"), self.layout)

    def _count(self, what, counts):
        """Accumulate [top-1 hits, targets] of a head (train.py pops them: pop_stats)."""
        self.stats[what] = self.stats.get(what, 0) + counts.float()

    def pop_stats(self):
        """{head: tensor([top-1 hits, targets])} since the last call, this rank's share
        (every tp rank holds the same figures; sum over dp x cp and pp for the global ones)."""
        stats, self.stats = self.stats, {}
        return stats

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (3 x forward; 2 per weight of each matmul per token):
        the layers, attention's QK^T and AV over the whole sequence, the masked-token
        transform, and the output layer at the predicted 15% of tokens."""
        c = self.cfg
        matmul_weights = c.n_layers * (4 * c.dim * c.dim + 2 * c.dim * c.ffn_dim)
        if c.mlm_head:
            matmul_weights += c.dim * c.dim + MASKED_FRACTION * c.dim * c.vocab_size
        attention = c.n_layers * 2 * 2 * seq_len * c.dim
        return 3 * (2 * matmul_weights + attention)


# ----------------------------------------------------------------------------
# Hugging Face: config.json <-> Config (convert.py reads and writes the files; a setting
# this model cannot reproduce is refused, never ignored)
# ----------------------------------------------------------------------------

# The BertFor* classes converted -> the heads each holds: (mlm_head, binary_head, a
# classifier). MegatronBertFor* hold the same ones.
HF_HEADS = {"ForPreTraining": (True, True, False), "ForMaskedLM": (True, False, False),
              "ForSequenceClassification": (False, False, True)}


def config_from_hf(hf, model_type):
    """BERT (post-LN) and Megatron-BERT (pre-LN) -> bert.Config; the heads from
    `architectures`, the classes from id2label (config.json holds num_labels that way)."""
    prefix = "MegatronBert" if model_type == "megatron-bert" else "Bert"
    classes = [prefix + suffix for suffix in HF_HEADS]
    architecture = next((a for a in hf.get("architectures") or () if a in classes), None)
    if architecture is None:
        errors.unsupported_hf(model_type, f"architectures {hf.get('architectures')} (ours: {', '.join(classes)})")
    if hf.get("hidden_act", "gelu") != "gelu":
        errors.unsupported_hf(model_type, f"hidden_act={hf['hidden_act']!r} (ours: the exact, erf GELU)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        errors.unsupported_hf(model_type, f"position_embedding_type={hf['position_embedding_type']!r}")
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            errors.unsupported_hf(model_type, f"{key}=true")
    mlm_head, binary_head, classifier = HF_HEADS[architecture[len(prefix):]]
    if mlm_head and not hf.get("tie_word_embeddings", True):
        errors.unsupported_hf(model_type, "tie_word_embeddings=false (an MLM output layer of its own)")
    n_classes = (len(hf.get("id2label") or {}) or hf.get("num_labels", 2)) if classifier else 0
    problem = hf.get("problem_type")
    if classifier and (n_classes == 1 or problem not in (None, "single_label_classification")):
        errors.unsupported_hf(model_type, f"{architecture} with problem_type={problem!r}, {n_classes} label(s) "
                            f"(ours: single-label classification)")
    return Config(vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 512),
                       type_vocab_size=hf.get("type_vocab_size", 2), dim=hf["hidden_size"],
                       n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                       ffn_dim=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-12),
                       pre_ln=model_type == "megatron-bert", mlm_head=mlm_head, binary_head=binary_head,
                       n_classes=n_classes, init_std=hf.get("initializer_range", 0.02))


def config_to_hf(cfg):
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


def hf_architecture(cfg):
    """The BertFor* (MegatronBertFor* when pre_ln) class that holds exactly our heads."""
    heads = (cfg.mlm_head, cfg.binary_head, cfg.n_classes > 0)
    suffix = next((s for s, h in HF_HEADS.items() if h == heads), None)
    if suffix is None:
        raise errors.UsageError(f"no Hugging Face BERT class has the heads mlm_head={cfg.mlm_head}, "
                         f"binary_head={cfg.binary_head}, n_classes={cfg.n_classes}; cannot export "
                         f"(supported: MLM, MLM + binary head, or a classifier alone)")
    return ("MegatronBert" if cfg.pre_ln else "Bert") + suffix


def hf_copies(cfg):
    """HF ties the MLM decoder to the word embedding and to the MLM bias."""
    return ({"cls.predictions.decoder.weight": "embed.weight", "cls.predictions.decoder.bias": "mlm_bias"}
            if cfg.mlm_head else {})


def hf_absent_heads(cfg):
    """Published checkpoints hold every pre-training head whatever their class
    (bert-base-uncased is a BertForMaskedLM with a pooler and a next-sentence head):
    transformers skips those its class lacks, and so do we."""
    heads = {"cls.predictions.": cfg.mlm_head, "bert.pooler.": cfg.pooler,
             "cls.seq_relationship.": cfg.binary_head, "classifier.": cfg.n_classes > 0}
    return tuple(prefix for prefix, present in heads.items() if not present)
