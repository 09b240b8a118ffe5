"""convert.py for T5 (T5ForConditionalGeneration, v1.0 and v1.1): logits and loss equal to
transformers' on padded encoder inputs, importing and exporting; exact round trips through
our checkpoints and the CLI; how transformers 5 ties (or not) the output layer; the
tensor-parallel import; bad input as one line.

Every HF model is built from a small config with random weights and saved locally:
nothing is downloaded. The configs use another number of decoder than encoder layers, 16
buckets and max_distance 20, and sequences longer than it (40 encoder tokens, 24 decoder
tokens), so that every kind of bucket is used.

transformers 5 and T5's output layer: T5Config turns tie_word_embeddings into
`scale_decoder_outputs` (v1.0: scaled by d_model^-0.5; v1.1: not) and always ties lm_head
to `shared`, unless the file holds both, different (as real v1.1 files do). A v1.1 model
built from a config is thus tied; the untied case is a saved file with an lm_head of its own.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
import models
import parallel
import t5
from errors import UsageError

tf = pytest.importorskip("transformers")

T5_SMALL = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=20)
VARIANTS = {  # name -> T5Config fields
    "v1.0": dict(T5_SMALL, feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0),
    "v1.1": dict(T5_SMALL, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 decoder_start_token_id=5, pad_token_id=5),  # a start token other than 0
}
TOL = 1e-4  # max |our logit - HF's logit| (fp32, CPU)

_gen = torch.Generator().manual_seed(0)
IDS = torch.randint(2, 99, (3, 40), generator=_gen)   # 40 > max_distance
MASK = torch.ones_like(IDS)
MASK[1, 31:] = 0                                      # right-padded rows
MASK[2, 9:] = 0
DECODER_IDS = torch.randint(2, 99, (3, 24), generator=_gen)
LABELS = torch.randint(2, 99, (3, 24), generator=_gen)
LABELS[0, 20:] = -100                                 # padded targets
LABELS[2, 7:] = -100


def randomize(model, seed):
    """Every parameter random, ours or transformers' (the defaults would hide a mapping
    error): norm gains around 1, embeddings N(0, 1) (T5's initialization), bias tables
    N(0, 0.5), matrices N(0, 0.1), so that scores stay in a range where softmax is smooth."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                std = (1.0 if any(k in name for k in ("embed", "shared", "lm_head")) else
                       0.5 if any(k in name for k in ("position_bias", "relative_attention_bias")) else 0.1)
                p.copy_(std * noise)
    return model


def hf_model(variant):
    """The HF model of `variant` built from its config (tied: lm_head is shared), random."""
    torch.manual_seed(0)
    return randomize(tf.T5ForConditionalGeneration(tf.T5Config(**VARIANTS[variant])).eval(), 1)


def save_hf(model, path, lm_head=None):
    """save_pretrained, then (untied) add a different lm_head.weight to the file: transformers
    5 writes a tied model's `shared` only."""
    model.save_pretrained(path)
    if lm_head is not None:
        file = os.path.join(path, "model.safetensors")
        tensors = load_file(file)
        assert "lm_head.weight" not in tensors
        save_file({**tensors, "lm_head.weight": lm_head}, file, metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """variant -> (saved folder, transformers' model loaded from it, the model built from
    the config that was saved): built once. The v1.1 file holds an lm_head of its own,
    which transformers keeps apart from `shared` (the built model's is `shared`)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            model = hf_model(variant)
            lm_head = None
            if not VARIANTS[variant]["tie_word_embeddings"]:
                lm_head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(2))
            path = save_hf(model, tmp_path_factory.mktemp(variant.replace(".", "_")), lm_head)
            loaded = tf.T5ForConditionalGeneration.from_pretrained(path).eval()
            cache[variant] = (path, loaded, model)
        return cache[variant]
    return get


def logits(model):
    """Logits of ours or transformers' on the padded batch (decoder inputs given)."""
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DECODER_IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_close(got, expected, what):
    diff = (got - expected).abs().max().item()
    print(f"{what}: max |logit difference| {diff:.3g} (logits up to {expected.abs().max().item():.3g})")
    assert got.shape == expected.shape and diff < TOL, (what, diff)


def assert_same_loss(ours, hf):
    """Ours: the sum of the token losses (labels only: the decoder's inputs are the labels
    shifted right, -100 -> the start token); transformers': their mean."""
    with torch.no_grad():
        got = ours(input_ids=IDS, attention_mask=MASK, labels=LABELS).item()
        expected = hf(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss.item()
    n_targets = (LABELS != -100).sum().item()
    assert abs(got - expected * n_targets) <= 1e-5 * abs(got), (got, expected * n_targets)


# ----------------------------------------------------------------------------
# Logits and loss equal transformers', importing and exporting
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_import_matches_transformers(variant, hf_dirs):
    hf_dir, hf, built = hf_dirs(variant)
    ours = convert.from_hf(hf_dir)
    v1_1 = variant == "v1.1"
    assert (ours.cfg.gated_gelu, ours.cfg.tie_embeddings) == (v1_1, not v1_1)
    assert (ours.cfg.n_encoder_layers, ours.cfg.n_decoder_layers, ours.cfg.num_buckets,
            ours.cfg.max_distance, ours.cfg.decoder_start_token_id) == (2, 3, 16, 20, 5 if v1_1 else 0)
    expected = logits(hf)
    if v1_1:  # transformers uses the file's own lm_head: not the tied model's logits
        assert hf.lm_head.weight is not hf.shared.weight and not hf.config.scale_decoder_outputs
        assert (logits(built) - expected).abs().max() > 1.0
    assert_close(logits(ours), expected, f"import {variant}")
    assert_same_loss(ours, hf)


def test_untied_model_saved_by_transformers_5(hf_dirs, tmp_path):
    """A v1.1 model built from a config and saved by transformers 5: config.json says
    tie_word_embeddings true and scale_decoder_outputs false, the file holds no lm_head
    (transformers ties it to shared). Ours: untied, unscaled, lm_head a copy of shared."""
    hf = hf_model("v1.1")
    hf_dir = save_hf(hf, tmp_path)
    config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
    assert config["tie_word_embeddings"] is True and config["scale_decoder_outputs"] is False
    ours = convert.from_hf(hf_dir)
    assert not ours.cfg.tie_embeddings and torch.equal(ours.lm_head.weight, ours.embed.weight)
    assert_close(logits(ours), logits(hf), "import v1.1 saved tied")


@pytest.mark.parametrize("tied", [True, False], ids=["v1.0", "v1.1"])
def test_export_matches_transformers(tied, tmp_path):
    """Our `test` preset (v1.1) and its v1.0 form, randomized -> HF folder -> transformers."""
    overrides = dict(gated_gelu=False, tie_embeddings=True) if tied else {}
    cfg = models.make_config("t5", "test", [f"{k}={v}" for k, v in overrides.items()])
    ours = randomize(models.build("t5", cfg, "cpu", 0), 3).eval()
    assert convert.export_model(ours, tmp_path / "out") == "T5ForConditionalGeneration"
    hf, info = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    hf.eval()
    assert hf.config.scale_decoder_outputs == tied
    assert (hf.lm_head.weight is hf.shared.weight) == tied
    assert hf.config.decoder_start_token_id == hf.config.pad_token_id == cfg.decoder_start_token_id
    ids = IDS + 200  # the test preset's vocabulary of 358 tokens
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=MASK, decoder_input_ids=DECODER_IDS)
        expected = hf(input_ids=ids, attention_mask=MASK, decoder_input_ids=DECODER_IDS).logits
    assert_close(got, expected, f"export {'v1.0' if tied else 'v1.1'}")
    # The labels-only path: the start (= pad) token, -100 at padded targets.
    with torch.no_grad():
        loss = ours(input_ids=ids, attention_mask=MASK, labels=LABELS).item()
        hf_loss = hf(input_ids=ids, attention_mask=MASK, labels=LABELS).loss.item()
    assert abs(loss - hf_loss * (LABELS != -100).sum().item()) <= 1e-5 * loss
    assert convert.read_hf_config(tmp_path / "out") == ("t5", cfg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_through_a_checkpoint_and_the_cli(variant, hf_dirs, tmp_path, capsys):
    """convert.py import, then export: transformers loads the export with the same logits;
    importing the export gives exactly the same tensors and config. (The CLI as a process:
    test_convert.py's test_cli.)"""
    hf_dir, hf, _ = hf_dirs(variant)
    convert.main(["import", hf_dir, str(tmp_path / "ckpt")])
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and out.endswith(f"train with: python train.py --load {tmp_path / 'ckpt'}\n")
    first = convert.from_hf(hf_dir)
    convert.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back")])
    out = capsys.readouterr().out
    assert "exported" in out and "T5ForConditionalGeneration" in out
    back, info = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    assert_close(logits(back.eval()), logits(hf), f"export of the import {variant}")
    again = convert.from_hf(str(tmp_path / "back"))
    assert again.cfg == first.cfg
    params = dict(again.named_parameters())
    for name, p in first.named_parameters():
        assert torch.equal(params.pop(name), p), name
    assert not params
    # The exported file holds the original file's tensors, bit for bit.
    original, exported = (load_file(os.path.join(d, "model.safetensors")) for d in (hf_dir, tmp_path / "back"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_tensor_parallel_import(hf_dirs):
    """Under tp = 2 each rank holds its heads' columns of the bias tables, its slices of the
    matrices and of the vocabulary: the regions of HF's tensors."""
    hf_dir, hf, _ = hf_dirs("v1.1")
    name, cfg = convert.read_hf_config(hf_dir)
    state = hf.state_dict()
    for rank in (0, 1):
        model = convert.load_hf_weights(models.build(name, cfg, "cpu", 0, parallel.Layout(tp=2, rank=rank)),
                                        hf_dir)
        sharded = 0
        for ours, p in model.named_parameters():
            full = state[t5.hf_name(ours, cfg)]
            _, offset, extent = parallel.global_region(p)
            region = tuple(slice(o, o + n) for o, n in zip(offset, extent))
            assert torch.equal(p[tuple(slice(0, n) for n in extent)], full[region]), ours
            sharded += p.numel() < full.numel()
        assert sharded > 10 * cfg.n_layers


# ----------------------------------------------------------------------------
# Configs, older files, bad input
# ----------------------------------------------------------------------------

def read_config(tmp_path, **fields):
    config = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], **T5_SMALL, **fields}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return convert.read_hf_config(str(tmp_path))[1]


def test_config_details(tmp_path):
    cfg = read_config(tmp_path, num_decoder_layers=None, pad_token_id=3)
    assert cfg.n_decoder_layers == cfg.n_encoder_layers == 2
    assert cfg.decoder_start_token_id == 3  # no decoder_start_token_id: the pad token
    assert read_config(tmp_path, pad_token_id=None).decoder_start_token_id == 0
    assert read_config(tmp_path, decoder_start_token_id=7, pad_token_id=3).decoder_start_token_id == 7
    # The output layer: tied and scaled (v1.0) or not, from transformers 4.x's and 5's configs.
    for fields, tied in ((dict(), True), (dict(tie_word_embeddings=False), False),
                         (dict(tie_word_embeddings=True, scale_decoder_outputs=False), False),
                         (dict(tie_word_embeddings=True, scale_decoder_outputs=True), True)):
        assert read_config(tmp_path, feed_forward_proj="gated-gelu", **fields).tie_embeddings == tied
    # The FFN as transformers derives it (dense_act_fn and is_gated_act as saved take precedence).
    assert read_config(tmp_path, feed_forward_proj="gated-gelu_new").gated_gelu
    assert read_config(tmp_path, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True).gated_gelu
    assert not read_config(tmp_path, feed_forward_proj="relu", dense_act_fn="relu", is_gated_act=False).gated_gelu
    # The original t5-small's class name.
    assert not read_config(tmp_path, architectures=["T5WithLMHeadModel"]).gated_gelu
    cfg = read_config(tmp_path, layer_norm_epsilon=1e-5, d_kv=16)
    assert (cfg.norm_eps, cfg.head_dim, cfg.dim, cfg.ffn_dim, cfg.vocab_size) == (1e-5, 16, 32, 48, 99)
    for preset in t5.PRESETS:  # every preset survives config.json
        cfg = models.make_config("t5", preset)
        assert t5.config_from_hf({**t5.config_to_hf(cfg)[1],
                                          "architectures": ["T5ForConditionalGeneration"]}, "t5") == cfg


@pytest.mark.parametrize("fields,message", [
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj='gated-silu'"),
    (dict(feed_forward_proj="gelu"), "feed_forward_proj='gelu'"),
    (dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu"), r"feed_forward_proj='gated-gelu' \(gated gelu;"),
    (dict(feed_forward_proj="relu", is_gated_act=True), r"\(gated relu;"),
    (dict(architectures=["T5EncoderModel"]), r"architectures \['T5EncoderModel'\]"),
    (dict(is_decoder=True), "decoder-only"),
    (dict(d_kv=None), "no 'd_kv'"),
    (dict(relative_attention_num_buckets=2), "num_buckets=2"),
])
def test_unsupported_configs_are_refused(tmp_path, fields, message):
    with pytest.raises(UsageError, match=message):
        read_config(tmp_path, **fields)


def test_older_files_and_weights_that_do_not_match(hf_dirs, tmp_path):
    """Older files hold copies of `shared` (both stacks' embed_tokens, a tied lm_head) and an
    unused bias table of the first cross-attention: read. Copies that differ, a missing
    tensor, an extra one: refused."""
    hf_dir, hf, _ = hf_dirs("v1.0")
    shutil.copy(os.path.join(hf_dir, "config.json"), tmp_path)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    shared = tensors["shared.weight"]
    unused = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    tensors.update({"encoder.embed_tokens.weight": shared.clone(), "decoder.embed_tokens.weight": shared.clone(),
                    "lm_head.weight": shared.clone(), unused: torch.randn(16, 4)})

    def load(**changed):
        save_file({k: v for k, v in {**tensors, **changed}.items() if v is not None},
                  tmp_path / "model.safetensors", metadata={"format": "pt"})
        return convert.from_hf(str(tmp_path))
    assert_close(logits(load()), logits(hf), "import v1.0 with copies")
    for copy in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        with pytest.raises(UsageError, match=f"{copy} differs"):  # v1.0's lm_head is scaled: no own one
            load(**{copy: shared + 1e-3})
    with pytest.raises(UsageError, match="has no tensor decoder.block.2.layer.2.DenseReluDense.wo.weight"):
        load(**{"decoder.block.2.layer.2.DenseReluDense.wo.weight": None})
    with pytest.raises(UsageError, match=r"has no place for \(decoder.block.3"):
        load(**{"decoder.block.3.layer.0.layer_norm.weight": torch.ones(32)})


def test_cli_errors_are_one_line(hf_dirs, tmp_path, capsys):
    hf_dir, _, _ = hf_dirs("v1.1")
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-silu", "dense_act_fn": "silu"}))
    nofile = tmp_path / "nofile"
    nofile.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), nofile)
    capsys.readouterr()  # (what building the folders printed)
    for argv, message in ((["import", str(bad), str(tmp_path / "c1")], "feed_forward_proj='gated-silu'"),
                          (["import", str(nofile), str(tmp_path / "c2")], "no model.safetensors"),
                          (["export", str(tmp_path / "nothing"), str(tmp_path / "out")], "")):
        with pytest.raises(SystemExit) as exit_info:
            convert.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not any(n.startswith(("c1", "c2", "out")) for n in os.listdir(tmp_path))
