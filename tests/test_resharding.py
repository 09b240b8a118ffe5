"""Checkpoints and Hugging Face weights load under any parallel layout.

A run saved at (tp=2, pp=2) continues at other layouts (with dp=2 and ZeRO-1, so the
optimizer state reshards too) on the same loss trajectory; a Hugging Face folder is
fine-tuned under tp x pp from the same starting loss as in one process."""
import pytest
import torch

from test_train import FAST, assert_same_curve, losses, run

LAYERS = [*FAST, "--set", "n_layers=4", "--set", "n_kv_heads=4", "--micro-batch-size", "2"]


def test_checkpoint_reshards_across_layouts(tmp_path):
    ckpt, original = tmp_path / "ckpt", tmp_path / "original.jsonl"
    run(["--model", "llama", *LAYERS, "--tp", "2", "--pp", "2", "--save", str(ckpt),
         "--save-every", "5", "--metrics", str(original)], nproc=4)
    expected = losses(original)[5:]
    for nproc, flags in [(2, []), (8, ["--tp", "4"]), (4, ["--pp", "2"])]:  # dp=2 each
        metrics = tmp_path / f"{nproc}{''.join(flags)}.jsonl"
        run(["--model", "llama", *LAYERS, *flags, "--zero1", "--load", str(ckpt / "step_00000005"),
             "--metrics", str(metrics)], nproc=nproc)
        assert_same_curve(losses(metrics), expected)


@pytest.fixture
def hf_llama(tmp_path):
    import transformers as tf
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_finetune_from_hugging_face_under_tp_and_pp(tmp_path, hf_llama):
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    args = ["--model", "llama", *FAST, "--load", f"hf:{hf_llama}", "--steps", "3"]
    run([*args, "--metrics", str(one)])
    run([*args, "--tp", "2", "--pp", "2", "--micro-batch-size", "2", "--metrics", str(many)], nproc=4)
    assert_same_curve(losses(many), losses(one))
