"""t5.py: span-corruption training under every parallel layout T5 supports, equal to one
process (loss, gradient norm and validation loss per step, on padded encoder batches);
every parameter's gradient under tp, the position-bias tables included; pipelines that
cut the encoder, the boundary and the decoder (the encoder output carried along);
decoding with caches equal to the full forward; resuming; bad input as one line.
(Parity with transformers' T5ForConditionalGeneration is in test_t5_convert.py, the data
in test_t5_data.py, the biased attention kernel in test_relative_attention.py.)"""
import pytest
import torch

import generate
import models
import parallel
import t5
from conftest import (LAYOUT, assert_gradient_part, assert_same_run, local_gradients, one_line_error,
                      one_process, train_job, train_on)
from errors import UsageError

T5 = ["--model", "t5", *LAYOUT, "--eval-every", "5"]


def _batch():
    """4 sequences of 40 encoder tokens (beyond the test preset's max_distance of 20, so the
    far buckets are used), two of them padded, and 16 decoder tokens with ignored targets."""
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 256, (4, 40), generator=g)
    attention_mask = torch.ones(4, 40, dtype=torch.long)
    attention_mask[1, 25:] = 0
    attention_mask[3, 33:] = 0
    labels = torch.randint(0, 256, (4, 16), generator=g)
    labels[2, 12:] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _gradients(tp=1, sp=True, overrides=()):
    """This rank's loss and every parameter's gradient (summed over ranks as DataParallel
    does) for one batch (conftest.local_gradients)."""
    layout = parallel.init_distributed(tp=tp, sp=sp, device="cpu")
    try:
        model = models.build("t5", models.make_config("t5", "test", overrides), "cpu", 0, layout)
        ddp = parallel.DataParallel(model, layout)
        loss = model(**_batch())
        loss.backward()
        ddp.finish()
        grads = local_gradients(model)
        ddp.close()
        return loss.detach(), grads
    finally:
        parallel.destroy_distributed(layout)


@pytest.mark.parametrize("world,layout", [(2, dict(tp=2)), (2, dict(tp=2, sp=False))])
@pytest.mark.parametrize("overrides", [(), ("gated_gelu=false", "tie_embeddings=true")],
                         ids=["v1_1", "v1_0"])
def test_every_gradient_equals_one_process(ranks, world, layout, overrides):
    """Each parameter's gradient against its own size: the bias tables (split by heads)
    and the norms (partial under sp) count as much as the embedding."""
    model = models.build("t5", models.make_config("t5", "test", overrides), "cpu", 0)
    loss = model(**_batch())
    loss.backward()
    expected = dict(model.named_parameters())
    for rank, (got_loss, grads) in ranks(world).run(_gradients, overrides=overrides, **layout).items():
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-5, atol=0)
        assert [name for name, _, _ in grads] == list(expected)
        for name, offset, grad in grads:
            assert_gradient_part(grad, offset, expected[name].grad, f"rank {rank} {name}")


def test_decoding_with_caches_equals_the_full_forward():
    """Token by token, with the self-attention cache and the cross-attention keys computed
    once, the logits are the full forward's at every position (padded encoder rows too),
    and greedy decoding picks their argmax."""
    model = models.build("t5", models.make_config("t5", "test"), "cpu", 0).eval()
    batch = _batch()
    decoder_input_ids = t5.shift_right(batch["labels"].clamp(min=0), model.cfg.decoder_start_token_id)
    with torch.no_grad():
        full = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=decoder_input_ids)
        memory = model.encode(batch["input_ids"], batch["attention_mask"])
        caches = model.new_caches(16)
        steps = [model.decode(decoder_input_ids[:, i:i + 1], memory, batch["attention_mask"], caches)
                 for i in range(16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    greedy = generate.sample_seq2seq(model, batch["input_ids"], batch["attention_mask"], 6, temperature=0)
    with torch.no_grad():
        teacher = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=t5.shift_right(greedy, model.cfg.decoder_start_token_id))
    assert torch.equal(teacher.argmax(-1), greedy)


def _pipeline_gradients(pp, vpp=1, pp_layers=None, overrides=()):
    """The step's loss (summed over the pipeline), the gradient norm and every gradient of
    this rank's chunks (conftest.local_gradients: a name once per copy, the bias tables on
    every chunk, a tied embedding on two stages) after a pipeline schedule over two padded
    micro-batches."""
    layout = parallel.init_distributed(pp=pp, vpp=vpp, device="cpu")
    try:
        cfg = models.make_config("t5", "test", overrides)
        chunks = parallel.rank_chunks(layout, cfg.n_layers, pp_layers)
        modules = [models.build("t5", cfg, "cpu", 0, layout, c) for c in chunks]
        ddp = parallel.DataParallel(modules, layout)
        batch = _batch()
        micro_batches = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
        actions = parallel.SCHEDULES["interleaved" if vpp > 1 else "1f1b"](2, layout)
        hidden_shape = (2, batch["input_ids"].shape[1] + batch["labels"].shape[1], cfg.dim)
        loss = parallel.run_schedule(actions, chunks, modules, micro_batches, layout, hidden_shape, ddp=ddp)
        ddp.finish()
        parallel.all_reduce(loss, layout.pp_group)
        norm = parallel.clip_grad_norm(ddp, 0.0)  # each copy counted once
        grads = local_gradients(modules)
        ddp.close()
        return loss, norm, grads
    finally:
        parallel.destroy_distributed(layout)


@pytest.mark.parametrize("pipeline", [
    dict(pp=2),                        # encoder stage | decoder stage
    dict(pp=2, pp_layers=[1, 3]),      # a cut inside the encoder
    dict(pp=2, pp_layers=[3, 1]),      # a cut inside the decoder
    dict(pp=2, vpp=2),                 # interleaved: each rank holds an encoder and a decoder chunk
], ids=["boundary", "in-encoder", "in-decoder", "interleaved"])
@pytest.mark.parametrize("overrides", [(), ("gated_gelu=false", "tie_embeddings=true")],
                         ids=["v1_1", "v1_0"])
def test_pipeline_gradients_equal_one_process(ranks, pipeline, overrides):
    """Every parameter's gradient, each copy of the tables and of a tied embedding included
    (summed over the chunks that read them), on padded encoder batches; the gradient norm
    counts each copied parameter once (the tables are small: a tight tolerance)."""
    model = models.build("t5", models.make_config("t5", "test", overrides), "cpu", 0)
    loss = model(**_batch())
    loss.backward()
    expected = dict(model.named_parameters())
    norm = torch.stack([p.grad.norm() for p in expected.values()]).norm()
    seen = set()
    for rank, (got_loss, got_norm, grads) in ranks(2).run(_pipeline_gradients, overrides=overrides,
                                                          **pipeline).items():
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(got_norm, norm, rtol=1e-6, atol=0)
        for name, offset, grad in grads:
            assert_gradient_part(grad, offset, expected[name].grad, f"rank {rank} {name}")
            seen.add(name)
    assert seen == expected.keys()


# ----------------------------------------------------------------------------
# Training: every layout follows the one-process run
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("layouts", [
    [(2, ["--tp", "2"]), (2, ["--tp", "2", "--no-sp"]), (2, ["--pp", "2"]),
     (2, ["--pp", "2", "--vpp", "2", "--micro-batch-size", "2"])],
    [(2, []), (4, ["--tp", "2", "--pp", "2", "--micro-batch-size", "2"]),
     (4, ["--no-zero1", "--micro-batch-size", "1"])],  # dp = 2, 4; accumulation
], ids=["tp-pp", "dp-combined"])
def test_training_layouts_equal_one_process(ranks, layouts):
    expected = one_process(T5)
    for nproc, flags in layouts:
        got, _ = train_on(ranks, nproc, T5 + flags)
        assert_same_run(got, expected)


def test_resumed_pipeline_run_equals_an_uninterrupted_run(ranks, tmp_path):
    """Saved under an interleaved pipeline (each rank holds two copies of the bias tables:
    one is saved, both are loaded), resumed in one process: the same steps."""
    argv = [*T5, "--steps", "4", "--eval-every", "0"]
    whole, _ = train_job(argv)
    train_on(ranks, 2, [*T5, "--steps", "2", "--lr-decay-steps", "4", "--save", str(tmp_path),
                        "--pp", "2", "--vpp", "2", "--micro-batch-size", "2"])
    resumed, _ = train_on(ranks, 2, [*argv, "--load", str(tmp_path), "--pp", "2", "--vpp", "2",
                                     "--micro-batch-size", "2"])
    assert_same_run(resumed, whole[2:], rel=1e-5)


def test_t5_learns_and_fills_spans():
    """A few dozen steps: the loss falls well below its start, and the end-of-run report
    shows a validation example, its true spans and the model's."""
    records, out = train_job([*T5, "--steps", "40", "--lr", "1e-2", "--sample-tokens", "20"])
    assert records[-1]["loss"] < records[0]["loss"] - 1.5
    assert "---- true ----" in out and "<extra_id_0>" in out


# ----------------------------------------------------------------------------
# Bad input: one line naming the fix
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--cp", "2"], "T5 does not support context parallelism"),
    (["--tokenizer", "gpt2"], "has no <extra_id_0> sentinel"),
    (["--set", "decoder_start_token_id=0"], "pass --set decoder_start_token_id=257"),
    (["--set", "n_decoder_layers=0"], "at least one encoder and one decoder layer"),
    (["--seq-len", "2"], "--seq-len 3 or more"),
])
def test_bad_input_is_one_line(capsys, flags, message):
    assert message in one_line_error(capsys, T5 + flags)


def test_model_refuses_a_layout_that_does_not_divide():
    with pytest.raises(UsageError, match="n_heads=4 is not divisible by tp=3"):
        models.FAMILIES["t5"].model(models.make_config("t5", "test"), parallel.Layout(tp=3))


@pytest.mark.parametrize("preset,hf_fields", [
    ("t5-small", dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8)),
    ("t5-base", dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12)),
    ("t5-large", dict(d_model=1024, d_ff=4096, num_layers=24, num_heads=16)),
    ("t5-v1_1-base", dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    ("flan-t5-base", dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
])
def test_presets_have_the_published_sizes(preset, hf_fields):
    """Parameters of the preset = transformers' T5ForConditionalGeneration with the published
    checkpoint's config (t5-small 60.5M, t5-base 222.9M, t5-large 737.7M, v1.1/FLAN base
    247.6M; built on the meta device), an untied output layer counted separately."""
    from transformers import T5Config, T5ForConditionalGeneration
    with torch.device("meta"):
        ours = models.FAMILIES["t5"].model(models.make_config("t5", preset))
        hf = T5ForConditionalGeneration(T5Config(vocab_size=32128, d_kv=64, **hf_fields))
    expected = sum(p.numel() for p in hf.parameters())  # tied: shared once
    if not hf_fields.get("tie_word_embeddings", True):  # transformers 5 ties a model built
        expected += hf.lm_head.weight.numel()           # from a config; v1.1 files do not
    assert sum(p.numel() for p in ours.parameters()) == expected
