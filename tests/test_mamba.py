"""mamba.py: Mamba-1, Mamba-2 and hybrids. Decoding with constant-size state equals the
full forward; every parallel layout equals one process (loss, gradient norm and
validation loss per step); bad configurations are one line. (Parity with transformers'
MambaForCausalLM and Mamba2ForCausalLM is in test_convert.py; the scans against their
sequential references in test_ssm_kernels.py.)"""
import pytest
import torch

import generate
import mamba
import models
import parallel
from conftest import LAYOUT, assert_gradient_part, check_layouts, local_gradients, one_line_error
from errors import UsageError

PRESETS = ["test", "test-mamba1", "test-hybrid"]


@pytest.mark.parametrize("preset", PRESETS)
def test_decoding_with_caches_equals_the_full_forward(preset):
    """A prompt of 13 tokens (prefill through the chunked scan, whose chunk is 16), then one
    token at a time through the recurrence: the same logits as one pass over all 29."""
    model = models.build("mamba", models.make_config("mamba", preset), "cpu", seed=0).eval()
    ids = torch.randint(0, 257, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_kv_caches(64)
        steps = [model(ids[:, :13], kv_caches=caches)]
        steps += [model(ids[:, t:t + 1], kv_caches=caches) for t in range(13, 29)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=2e-5)
    ssm = [c for c in caches if isinstance(c, mamba.SSMCache)]
    assert ssm and all(c.length == 29 for c in ssm)


def test_the_decoding_state_does_not_grow():
    model = models.build("mamba", models.make_config("mamba", "test"), "cpu", seed=0).eval()
    caches = model.new_kv_caches(256)
    sizes = []
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), kv_caches=caches)
        for _ in range(2):
            model(torch.zeros(1, 1, dtype=torch.long), kv_caches=caches)
            sizes.append(sum(c.conv.numel() + c.ssm.numel() for c in caches))
    assert sizes[0] == sizes[1]


def test_generate_samples_from_a_mamba_model():
    model = models.build("mamba", models.make_config("mamba", "test"), "cpu", seed=0)
    prompt = torch.randint(0, 257, (2, 3), generator=torch.Generator().manual_seed(0))
    out = generate.sample(model, prompt, max_new_tokens=6, temperature=0)
    # Greedy decoding through the caches picks what the full forward picks at each step.
    with torch.no_grad():
        assert torch.equal(model(out[:, :-1]).argmax(-1)[:, 2:], out[:, 3:])


# ----------------------------------------------------------------------------
# Every parallel layout equals one process
# ----------------------------------------------------------------------------

VPP = ["--pp", "2", "--vpp", "2", "--micro-batch-size", "2"]


@pytest.mark.parametrize("preset,layouts", [
    # Mamba-2, 8 heads in 2 groups: tp keeps whole groups; under cp=2 x tp=2 the two cp
    # ranks scan 2 heads each of a group both of them read.
    # (tp without sp, and dp, are in the every-gradient test below and in the llama tests.)
    ("test", [(2, ["--tp", "2"]), (2, ["--cp", "2"]), (4, ["--tp", "2", "--cp", "2"]),
              (2, ["--pp", "2"])]),
    # Mamba-1: x_proj's partial sums over tp and cp.
    ("test-mamba1", [(2, ["--tp", "2"]), (4, ["--tp", "4", "--no-sp"]), (2, ["--cp", "2"]),
                     (4, ["--tp", "2", "--cp", "2"]), (2, ["--pp", "2"])]),
    # M * - M: Mamba, attention (RoPE, ring attention under cp) and an MLP; pp=2 puts a
    # Mamba and an attention layer on one stage, the MLP and a Mamba on the other.
    ("test-hybrid", [(2, ["--cp", "2"]), (2, ["--pp", "2"]), (4, VPP), (4, ["--tp", "2", "--cp", "2"])]),
])
def test_layouts_equal_one_process(ranks, preset, layouts):
    check_layouts(ranks, ["--model", "mamba", *LAYOUT, "--config", preset, "--eval-every", "5"],
                  layouts)


def _gradients(preset, tp=1, cp=1, sp=True):
    """Every parameter's gradient (summed over ranks as DataParallel does) for one batch
    (conftest.local_gradients)."""
    layout = parallel.init_distributed(tp=tp, cp=cp, sp=sp, device="cpu")
    try:
        model = models.build("mamba", models.make_config("mamba", preset), "cpu", 0, layout)
        ddp = parallel.DataParallel(model, layout)
        ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).backward()
        ddp.finish()
        grads = local_gradients(model)
        ddp.close()
        return grads
    finally:
        parallel.destroy_distributed(layout)


@pytest.mark.parametrize("preset", ["test", "test-mamba1"])
@pytest.mark.parametrize("world,layout", [(2, dict(tp=2)), (2, dict(tp=2, sp=False)), (2, dict(cp=2)),
                                          (4, dict(tp=2, cp=2))])
def test_every_gradient_equals_one_process(ranks, preset, world, layout):
    """Each parameter's gradient against its own size: x_proj's and the convolutions' are
    thousands of times smaller than the embedding's, so the gradient norm alone (and Adam's
    update, at these sizes) would not show an error in them."""
    expected = {name: p.grad for name, p in _one_process_gradients(preset).items()}
    for rank, grads in ranks(world).run(_gradients, preset=preset, **layout).items():
        for name, offset, grad in grads:
            assert_gradient_part(grad, offset, expected[name], f"rank {rank} {name}")


def _one_process_gradients(preset):
    model = models.build("mamba", models.make_config("mamba", preset), "cpu", 0)
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).backward()
    return dict(model.named_parameters())


# ----------------------------------------------------------------------------
# Bad configurations: one line naming the fix
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["n_heads=3"], "n_heads * head_dim = 3 * 16 != expand * dim = 128"),
    (["pattern=MX"], "unknown symbol(s) 'X'"),
    (["pattern=M*-"], "has 3 symbols but n_layers=2"),
    (["version=3"], "Mamba has versions 1 and 2"),
    (["n_groups=3"], "n_heads=8 is not divisible by n_groups=3"),
])
def test_bad_config_is_one_line(capsys, overrides, message):
    argv = ["--model", "mamba", *LAYOUT] + [a for o in overrides for a in ("--set", o)]
    assert message in one_line_error(capsys, argv)


@pytest.mark.parametrize("preset,layout,message", [
    ("test", dict(tp=4), "n_groups=2 is not divisible by tp=4"),
    ("test", dict(tp=2, cp=8), "heads per tp rank (4) are not divisible by cp=8"),
    ("test-mamba1", dict(tp=3), "expand * dim=128 is not divisible by tp=3"),
    ("test-hybrid", dict(tp=8), "attn_heads=4 is not divisible by tp=8"),
])
def test_model_refuses_a_layout_that_does_not_divide(preset, layout, message):
    cfg = models.make_config("mamba", preset)
    with pytest.raises(UsageError, match=message.replace("*", r"\*").replace("(", r"\(")
                       .replace(")", r"\)")):
        models.FAMILIES["mamba"].model(cfg, parallel.Layout(**layout))


def test_padding_mask_is_refused():
    model = models.build("mamba", models.make_config("mamba", "test"), "cpu", seed=0)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(UsageError, match="no padding mask"):
        model(torch.zeros(1, 8, dtype=torch.long), attention_mask=mask)
