"""Packed batches: the same items, losses and gradients as padded batches, in fewer tokens."""
import numpy as np
import pytest
import torch

from gradtrace.config import ModelConfig, TaskConfig
from gradtrace.models import build_model
from gradtrace.tasks import ArithmeticTask, answer_cross_entropy, item_lengths
from gradtrace.tasks.packing import pack, stack


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(TaskConfig(n_test=50, n_probe=16, pool_size=8192))


def test_packed_rows_hold_every_item_once_with_its_own_positions(task):
    padded, packed = task.train_batches(3, [7], 64, pack=False)[0], task.train_batches(3, [7], 64)[0]
    width = task.pack_width
    assert packed.tokens.shape[1] == width and packed.tokens.numel() < 0.85 * padded.tokens.numel()
    lengths = item_lengths(padded.mask.numpy())
    assert int(packed.mask.sum()) == int(padded.mask.sum())
    assert sorted(packed.tokens[packed.tokens != 0].tolist()) == sorted(padded.tokens[padded.tokens != 0].tolist())
    starts = packed.position_ids == 0
    bos = packed.tokens == task.tokenizer.bos_id
    assert int(bos.sum()) == len(lengths) and bool(starts[bos].all())  # every item starts at position 0
    allowed = packed.attention_mask[:, 0] == 0
    assert bool(torch.tril(torch.ones(width, width, dtype=torch.bool)).ge(allowed).all())  # causal
    first = packed.tokens[0].tolist()
    ends = [i for i, t in enumerate(first) if t == task.tokenizer.eos_id]
    if len(ends) > 1:  # a second item in row 0 does not see the first
        assert not bool(allowed[0, ends[0] + 1, : ends[0] + 1].any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_gradient_equal_the_padded_ones(task, attn, dtype):
    model = build_model(ModelConfig(name="micro", attn_implementation=attn), task.tokenizer.vocab_size, seed=0)
    model.to(dtype)
    params = list(model.parameters())
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for step in range(3):
        padded, packed = task.train_batches(step, [1], 48, pack=False)[0], task.train_batches(step, [1], 48)[0]
        losses, grads = [], []
        for b in (padded, packed):
            loss = answer_cross_entropy(model(**b.inputs(dtype), use_cache=False).logits, b.tokens, b.mask)
            losses.append(loss)
            grads.append(torch.autograd.grad(loss, params))
        torch.testing.assert_close(losses[1], losses[0], **tol)
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=100 * tol["rtol"], atol=tol["atol"])


def test_batches_of_several_seeds_share_a_row_count_and_padding_rows_add_nothing(task):
    batches = task.train_batches(0, [1, 2, 3], 32)
    assert len({b.tokens.shape for b in batches}) == 1
    stacked = stack(batches)
    assert stacked.tokens.shape[0] == 3 and stacked.attention_mask.shape[:2] == (3, batches[0].tokens.shape[0])
    alone = pack([(task.train_pool.tokens[task._batch_items(0, 2, 32)],
                   task.train_pool.answer_mask[task._batch_items(0, 2, 32)])], task.pack_width)[0]
    model = build_model(ModelConfig(name="micro"), task.tokenizer.vocab_size, seed=0)
    loss = [answer_cross_entropy(model(**b.inputs(), use_cache=False).logits, b.tokens, b.mask)
            for b in (alone, batches[1])]
    torch.testing.assert_close(loss[1], loss[0], rtol=1e-6, atol=1e-6)


def test_an_item_longer_than_a_row_is_refused():
    tokens = np.ones((2, 10), dtype=np.int64)
    mask = np.zeros((2, 10), dtype=bool)
    mask[:, 6:] = True
    with pytest.raises(ValueError, match="does not fit a packed row of 8"):
        pack([(tokens, mask)], 8)


def test_packed_and_padded_training_end_alike(tmp_path):
    from conftest import tiny_config
    from safetensors.torch import load_file

    from gradtrace.train import train

    final = {}
    for pack_rows in (True, False):
        cfg = tiny_config(train__steps=12, train__pack=pack_rows, capture__sketch="identity", capture__probe_every=0)
        train(cfg, tmp_path / str(pack_rows), "r", progress=False)
        final[pack_rows] = load_file(str(tmp_path / str(pack_rows) / "weights" / "r" / "final.safetensors"))
    for name, value in final[True].items():
        torch.testing.assert_close(value, final[False][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def flex_attention():
    """Skip where transformers has no flex attention for GPT-NeoX (4.46 refuses the model itself)."""
    try:
        build_model(ModelConfig(name="micro", attn_implementation="flex_attention"), 20, seed=0)
    except ValueError as err:
        pytest.skip(f"this transformers release builds no GPT-NeoX with flex attention: {err}")


def test_packing_with_an_attention_that_takes_no_4d_mask_is_refused(tmp_path, flex_attention):
    from conftest import tiny_config

    from gradtrace.train import train

    cfg = tiny_config(model__attn_implementation="flex_attention", capture__enabled=False)
    with pytest.raises(ValueError, match="set train.pack=false"):
        train(cfg, tmp_path, "r", progress=False)


def test_an_ensemble_refuses_packing_with_such_an_attention_too(tmp_path, flex_attention):
    from conftest import tiny_config

    from gradtrace.ensemble import train_ensemble

    cfgs = [tiny_config(model__attn_implementation="flex_attention", capture__enabled=False, train__seed=s)
            for s in (0, 1)]
    with pytest.raises(ValueError, match="set train.pack=false"):
        train_ensemble(cfgs, tmp_path, ["a", "b"])
