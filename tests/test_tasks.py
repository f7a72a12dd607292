"""The arithmetic task: determinism, disjointness, one token per digit, losses on answers only."""
import warnings

import numpy as np
import pytest
import torch

from conftest import tiny_config
from gradtrace.config import ModelConfig, TaskConfig
from gradtrace.evaluate import correctness, length_batches, train_accuracy
from gradtrace.models import build_model
from gradtrace.train import train
from gradtrace.tasks import REGISTRY, ArithmeticTask, answer_cross_entropy, exact_match, task_for, worst_margin_loss


def small(**kw) -> TaskConfig:
    return TaskConfig(**{"n_test": 300, "n_probe": 40, "pool_size": 8192, **kw})


def test_registry_has_id_and_at_least_eight_described_shifts():
    shifts = [n for n in REGISTRY if n != "ID"]
    assert "ID" in REGISTRY and len(shifts) >= 8
    assert all(len(s.description) > 20 for s in REGISTRY.values())


def test_a_split_too_long_for_max_digits_is_refused_by_name():
    with pytest.raises(ValueError, match="split 'carry' cannot be drawn at task.max_digits=2"):
        ArithmeticTask(small(max_digits=2))


@pytest.mark.parametrize("max_digits, shift, advice", [(1, "carry", "raise task.max_digits to 3"),
                                                      (18, "length", "lower task.max_digits to 17")])
def test_a_split_that_cannot_be_drawn_is_refused_saying_where_it_can(max_digits, shift, advice):
    """At task.max_digits=18 `length` draws 19-digit operands, past 64-bit integers: the advice was to raise it."""
    with pytest.raises(ValueError, match=rf"split '{shift}' cannot be drawn at task.max_digits={max_digits} \(.+\): "
                                         f"{advice} or drop it from task.shifts$"):
        ArithmeticTask(small(max_digits=max_digits, shifts=[shift]))


def test_max_digits_past_64_bit_operands_is_refused_saying_why(monkeypatch):
    from gradtrace.tasks import Split

    with pytest.raises(ValueError, match="task.max_digits must be <= 18, got 19: operands are drawn as 64-bit"):
        small(max_digits=19)
    ArithmeticTask(small(max_digits=18, shifts=["space"], n_test=50, n_probe=0))  # ID draws 18 digits
    monkeypatch.setitem(REGISTRY, "never", Split("never", "a shift of one's own that draws at no max_digits",
                                                 test=lambda rng, d: rng.integers(1, 0), train=lambda rng, d: None))
    with pytest.raises(ValueError, match=r"drop it from task.shifts \(it draws at no task.max_digits from 1 to 18\)"):
        ArithmeticTask(small(shifts=["never"]))


def test_a_registered_split_whose_sampler_returns_no_problem_is_refused_by_name(monkeypatch, capsys):
    from gradtrace.cli import main
    from gradtrace.tasks import Problem, Split

    monkeypatch.setitem(REGISTRY, "mine", Split("mine", "a researcher's own shift, its test sampler unfinished",
                                                test=lambda rng, d: None, train=lambda rng, d: Problem((1, 2))))
    with pytest.raises(ValueError, match="split 'mine': its test sampler returned NoneType"):
        ArithmeticTask(small(shifts=["mine"]))
    # the CLI says so in one line (a TypeError came out as a traceback)
    assert main(["sweep", "experiments/default.yaml", "--set", "task.shifts=[mine]", "--dry-run"]) == 2
    assert "its test sampler returned NoneType" in capsys.readouterr().err
    ArithmeticTask(small(max_digits=2, shifts=["length", "space", "order"]))  # these are


def test_default_has_2000_test_items_per_split():
    assert TaskConfig().n_test >= 2000


def test_task_for_builds_each_task_config_once_per_process():
    model = ModelConfig()
    a, b, c = task_for(small(), model), task_for(small(), model), task_for(small(seed=99), model)
    assert a is b and a is not c
    assert a.test_set("ID").prompts == ArithmeticTask(small()).test_set("ID").prompts
    assert a.test_set("ID") is a.test_set("ID")  # encoded once


def test_sets_are_deterministic_given_the_seed():
    a, b, c = ArithmeticTask(small()), ArithmeticTask(small()), ArithmeticTask(small(seed=99))
    for split in a.splits:
        assert a.test_set(split).prompts == b.test_set(split).prompts
        assert a.test_set(split).prompts != c.test_set(split).prompts
    assert np.array_equal(a.train_batch(7, 3, 32)[0], b.train_batch(7, 3, 32)[0])
    assert not np.array_equal(a.train_batch(7, 3, 32)[0], a.train_batch(7, 4, 32)[0])


def test_train_test_and_probe_items_are_disjoint():
    task = ArithmeticTask(small(shifts=[n for n in REGISTRY if n != "ID"], pool_size=TaskConfig().pool_size))
    held = [set(task.test_set(s).prompts) for s in task.splits] + [set(task.probe_set(s).prompts) for s in task.splits]
    union = set().union(*held)
    assert sum(map(len, held)) == len(union)  # no prompt in two held-out sets
    train = set(task.train_pool.prompts)
    assert len(task.train_pool) == task.cfg.pool_size and not train & union


def test_one_token_per_digit_and_answer_mask_covers_answer_and_eos():
    task = ArithmeticTask(small())
    data = task.test_set("ID")
    tok = task.tokenizer
    for row, mask, prompt in list(zip(data.tokens, data.answer_mask, data.prompts))[:50]:
        text = tok.decode(row)
        assert text.startswith(prompt)
        answer = text[len(prompt):]
        assert mask.sum() == len(answer) + 1  # every answer character is one token, plus <eos>
        assert row[mask][-1] == tok.eos_id
        a, b = (int(x[::-1]) for x in prompt.rstrip("=").split("+"))
        assert int(answer[::-1]) == a + b  # least-significant digit first


def test_shift_mix_lands_in_training_pool():
    task = ArithmeticTask(small())
    prompts = task.train_pool.prompts
    share_space = np.mean([p.startswith(" ") for p in prompts])
    assert 0.005 < share_space < 0.03


def test_train_eval_sets_are_each_splits_training_items_from_the_pool():
    task = ArithmeticTask(small(shifts=["length", "base8", "space", "spaced_ops", "order"], order_share=0.0,
                                n_train_eval=100))
    pool = set(task.train_pool.prompts)
    sets = {split: task.train_eval_set(split).prompts for split in task.splits}
    assert {s: len(p) for s, p in sets.items()} == {"ID": 100, "length": 100, "base8": 100, "space": 100,
                                                     "spaced_ops": 100, "order": 0}  # order: no share of the mix
    assert all(set(prompts) <= pool for prompts in sets.values())
    operands = [p.rstrip("=").split("+") for p in sets["ID"]]
    assert all(len(a) <= 3 and int(a[::-1]) >= int(b[::-1]) for a, b in operands)  # ID's form: a >= b, <= 3 digits
    assert all(len(p.split("+")[0]) == 4 for p in sets["length"])
    assert all(p.startswith("#") for p in sets["base8"]) and all(p.startswith(" ") for p in sets["space"])
    assert all(" + " in p for p in sets["spaced_ops"])
    none = ArithmeticTask(small(n_train_eval=0))
    assert all(len(none.train_eval_set(s)) == 0 for s in none.splits)


def test_no_probe_items_makes_a_task_without_probes(tiny, tmp_path):
    task = ArithmeticTask(small(n_probe=0))
    assert len(task.probe_set("ID")) == 0 and len(task.test_set("ID")) == 300
    with pytest.raises(ValueError, match="set capture.probe_every=0"):
        tiny(task__n_probe=0)  # probes every 20 steps, of no items
    result = train(tiny(task__n_probe=0, capture__probe_every=0, train__steps=4), tmp_path, progress=False)
    assert set(result.accuracy) == set(result.train_accuracy) == {"ID", *TaskConfig().shifts}


@pytest.fixture(scope="module")
def trained():
    """A micro model trained a little on a small task, so that some answers are right and some wrong."""
    task = ArithmeticTask(small())
    model = build_model(ModelConfig(name="micro"), task.tokenizer.vocab_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        x, m = task.train_batch(step, 0, 64)
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return task, model


def test_exact_match_equals_greedy_decoding(trained):
    task, model = trained
    data = task.test_set("ID")
    x, m = data.torch(slice(0, 100))
    with torch.no_grad():
        em = exact_match(model(input_ids=x).logits, x, m)
        for i in range(100):
            start = int(m[i].nonzero()[0])
            seq = x[i, :start].tolist()
            for _ in range(int(m[i].sum())):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            greedy = seq[start:] == x[i, start: start + int(m[i].sum())].tolist()
            assert greedy == bool(em[i])


def test_length_batched_evaluation_equals_full_width_exact_match_in_item_order(trained):
    task, model = trained
    model.gpt_neox.layers[0].eval()  # a part the loop keeps in eval mode while the rest trains
    correct = correctness(model, task, batch_size=32)
    assert model.training and not any(module.training for module in model.gpt_neox.layers[0].modules())
    model.train()  # as the fixture left it
    for split in task.splits:
        data = task.test_set(split)
        batches = length_batches(data, 32)
        idx = np.concatenate([i for i, _ in batches])
        assert sorted(idx.tolist()) == list(range(len(data)))  # every item once
        ends = data.tokens.shape[1] - data.answer_mask[:, ::-1].argmax(1)
        assert all(width >= ends[i].max() for i, width in batches)  # no answer token cut off
        widths = [width for _, width in batches]
        assert widths == sorted(widths)  # items sorted by length: each batch cut to its own longest
        assert (data.tokens[np.arange(len(data)), ends - 1] == task.tokenizer.eos_id).all()
        with torch.no_grad():
            x, m = data.torch()
            full = exact_match(model(input_ids=x).logits, x, m).numpy()
        np.testing.assert_array_equal(correct[split], full)
    assert 0 < np.mean(np.concatenate(list(correct.values()))) < 1  # some right, some wrong: the test can fail


def test_train_accuracy_is_exact_match_on_each_splits_training_items(trained):
    task, model = trained
    with torch.no_grad():
        expected = {}
        for split in task.splits:
            x, m = task.train_eval_set(split).torch()
            expected[split] = exact_match(model(input_ids=x).logits, x, m).numpy().mean()
    got = train_accuracy(model, task, batch_size=32)
    assert got.keys() == expected.keys() and model.training
    np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=0, atol=1e-12)
    assert 0 < np.mean(list(got.values())) < 1


def test_train_accuracy_leaves_out_a_split_with_no_training_items():
    """A split with no share of the training mix has no train accuracy (a NaN of no items, with numpy's warning of an
    empty mean, was the alternative), while the others keep theirs."""
    import warnings

    task = ArithmeticTask(small(shifts=["length", "order"], order_share=0.0, n_train_eval=20))
    model = build_model(ModelConfig(name="micro"), task.tokenizer.vocab_size, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = train_accuracy(model, task, batch_size=32)
    assert set(got) == {"ID", "length"} and all(0 <= a <= 1 for a in got.values())


def test_answer_cross_entropy_is_the_mean_over_answer_tokens_only():
    """The training and probe loss: cross-entropy of each answer token given the tokens before it, averaged over
    every answer token of the batch (items of different answer lengths weigh by their tokens), prompts and padding
    left out. Dividing by every position instead passed every other test (AdamW hardly sees a gradient's scale)."""
    torch.manual_seed(1)
    logits, tokens = torch.randn(3, 7, 11, dtype=torch.float64), torch.randint(0, 11, (3, 7))
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 4:], mask[1, 2:6], mask[2, 6] = True, True, True  # answers of 3, 4 and 1 tokens; padding after item 1's
    log_p = torch.log_softmax(logits, -1)
    per_token = [-log_p[i, j - 1, tokens[i, j]] for i in range(3) for j in range(7) if mask[i, j]]
    assert answer_cross_entropy(logits, tokens, mask).item() == pytest.approx(torch.stack(per_token).mean().item())


def test_worst_margin_loss_is_small_only_when_every_answer_token_is_right():
    tokens = torch.tensor([[1, 3, 4, 5, 2]])
    mask = torch.tensor([[False, False, False, True, True]])
    logits = torch.full((1, 5, 8), -5.0)
    logits[0, 2, 5] = 5.0  # predicts token 5 at position 3: right
    logits[0, 3, 2] = 5.0  # predicts <eos> at position 4: right
    good = worst_margin_loss(logits, tokens, mask)
    logits[0, 3, 2], logits[0, 3, 6] = -5.0, 5.0  # last answer token wrong
    assert exact_match(logits, tokens, mask).item() is False
    assert worst_margin_loss(logits, tokens, mask) > 10 * good


def test_the_losses_take_a_bf16_models_logits_in_float32():
    """As transformers' own losses do: a bf16 model's probe losses and gradients were 2–6e-3 off the float32 ones."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11).to(torch.bfloat16).requires_grad_()
    tokens, mask = torch.randint(0, 11, (3, 6)), torch.zeros(3, 6, dtype=torch.bool)
    mask[:, 3:] = True
    for loss_fn in (answer_cross_entropy, worst_margin_loss):
        loss = loss_fn(logits, tokens, mask)
        reference = loss_fn(logits.detach().double(), tokens, mask)  # float64 kept as it is
        assert loss.dtype == torch.float32 and reference.dtype == torch.float64
        assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.dtype == torch.bfloat16  # back to the model's dtype


def test_pretrained_tokenizer_gives_one_known_id_per_character(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gradtrace.tasks import CharTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["12+34=46", "# 7-5 = 2", "9080 + 123"] * 50,
                            trainers.BpeTrainer(special_tokens=["<|endoftext|>"], vocab_size=300))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    tok = CharTokenizer.from_pretrained(str(tmp_path))
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert tok.encode("12+3") == [hf.encode(c)[0] for c in "12+3"]
    assert tok.eos_id == hf.eos_token_id and tok.vocab_size == len(hf)
    assert tok.decode(tok.encode(" 90+1=19")) == " 90+1=19"


def test_a_tokenizer_giving_characters_one_shared_id_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from gradtrace.tasks import CharTokenizer

    vocab = {**{str(d): d for d in range(10)}, "+": 10, " ": 11, "[UNK]": 12, "<eos>": 13}
    word = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))  # '#', '-' and '=' are all [UNK]
    PreTrainedTokenizerFast(tokenizer_object=word, eos_token="<eos>", unk_token="[UNK]").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"gives '#-=' the same id"):
        CharTokenizer.from_pretrained(str(tmp_path))


def test_a_training_form_the_held_out_sets_use_up_is_refused_by_name():
    task = ArithmeticTask(TaskConfig(max_digits=2, shifts=["zeropad"]))  # 55 zero-padded training prompts, all held out
    with pytest.raises(ValueError, match="every prompt of split 'zeropad'"):
        task.train_pool
    with pytest.raises(ValueError, match="distinct test and probe items of split 'ID'.*task.n_probe"):
        ArithmeticTask(TaskConfig(max_digits=1, shifts=[], n_test=60)).test_set("ID")


@pytest.mark.parametrize("source", ["python", "numpy"])
def test_a_split_that_draws_from_another_source_than_its_rng_is_refused(monkeypatch, source):
    """A sampler drawing from Python's random module (or numpy's global generator) gave each of a sweep's workers test
    items of its own: runs scored on different items were compared as one study, nothing said."""
    import random

    from gradtrace.tasks import Problem, Split

    draw = (lambda: random.randint(1, 99)) if source == "python" else (lambda: int(np.random.randint(1, 99)))
    monkeypatch.setitem(REGISTRY, "mine", Split("mine", "a+a from the process's own randomness",
                                                test=lambda rng, d: Problem((draw(),) * 2),
                                                train=lambda rng, d: Problem((int(rng.integers(1, 99)),) * 2)))
    with pytest.raises(ValueError, match="split 'mine' draws other problems each time from the same rng: a sampler "
                                         "must draw only from the rng it is given"):
        ArithmeticTask(small(shifts=["mine"]))
    monkeypatch.setitem(REGISTRY, "mine", Split("mine", "a+a from its rng", test=lambda rng, d: Problem((
        int(rng.integers(1, 99)),) * 2), train=lambda rng, d: Problem((int(rng.integers(1, 99)),) * 2)))
    ArithmeticTask(small(shifts=["mine"]))


def test_register_split_refuses_built_in_and_unusable_names(split_registry):
    from gradtrace.tasks import Problem, Split, register_split

    mine = Split("carry", "my carry", test=lambda r, d: Problem((9, 1)), train=lambda r, d: Problem((9, 1)))
    with pytest.raises(ValueError, match="split 'carry' is built in"):
        register_split(mine)  # a plain dict assignment replaced the built-in one silently
    for name in ("acc b", "2x", "", "a/b", "x" * 41, "größe"):  # 41 characters covered half of the heatmap
        with pytest.raises(ValueError, match="must start with an ASCII letter"):
            register_split(Split(name, "", mine.test, mine.train))
    for name in ("NA", "nan", "None", "null", "True", "false", "inf"):  # stats.csv named them; pandas read them back
        with pytest.raises(ValueError, match="reads as a missing value, a bool or a number"):  # as NaN, bool, float
            register_split(Split(name, "", mine.test, mine.train))
    assert register_split(Split("x" * 40, "", mine.test, mine.train)).name == "x" * 40
    with pytest.raises(TypeError, match="takes a gradtrace.tasks.Split"):
        register_split("nine_one")
    register_split(Split("nine_one", "9+1", mine.test, mine.train))
    assert register_split(Split("nine_one", "9+1 again", mine.test, mine.train)).description == "9+1 again"


def test_a_problem_the_task_cannot_write_or_a_split_it_cannot_use_is_refused_by_name(monkeypatch, split_registry):
    """Base 5 drew prompts that read as base 10 (the same prompt with two answers in training: 108 of 12,504 pool
    prompts), base 16 and `*` passed the dry run and failed the sweep naming no split; a negative share came out as
    numpy's "Probabilities are not non-negative", braces in a description broke `gradtrace tasks`, a sampler failing
    now and then as numpy's "low >= high" and one raising IndexError as a traceback."""
    from gradtrace.tasks import Problem, Split
    from gradtrace.tasks.shifts import ProblemError

    for bad in ({"op": "*"}, {"base": 5}, {"base": 16}):
        with pytest.raises(ProblemError, match="op must be one of '\\+', '-'|base must be 10 or 8"):
            Problem((1, 2), **bad)
    assert Problem((7, 1), base=8).render() == ("#7+1=", "01") and Problem((3, 5), op="-").answer == -2

    def mine(test, share=1.0, description="mine, 1-{d} digits"):
        monkeypatch.setitem(REGISTRY, "mine", Split("mine", description, test=test,
                                                    train=lambda r, d: Problem((int(r.integers(1, 9)),) * 2),
                                                    share=share))
        return small(shifts=["mine"])

    with pytest.raises(ValueError, match=r"split 'mine': Problem\(base=5\): base must be 10 or 8"):
        ArithmeticTask(mine(lambda r, d: Problem((int(r.integers(1, 9)), 1), base=5)))
    drawn = iter(range(10**6))
    with pytest.raises(ValueError, match=r"split 'mine': its sampler failed \(ValueError: low >= high\)"):
        ArithmeticTask(mine(lambda r, d: Problem((int(r.integers(1, 1 if next(drawn) == 40 else 99)),) * 2))).test_set(
            "mine")
    with pytest.raises(ValueError, match=r"split 'mine' cannot be drawn at task.max_digits=3 \(IndexError: .*drop it"):
        ArithmeticTask(mine(lambda r, d: Problem(([1, 10, 100][d],) * 2)))
    for share in (-0.5, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="split 'mine': share must be a number >= 0"):
            mine(lambda r, d: Problem((1, 1)), share=share)
    with pytest.raises(ValueError, match=r"split 'mine': its description .* does not format \(KeyError: '1,3'\): it "
                                         r"may name \{d\}, \{d1\} and \{dm\}; write other braces twice"):
        mine(lambda r, d: Problem((1, 1)), description="units in {1,3}, 1-{d} digits")
    assert REGISTRY["mine"].describe(3) == "mine, 1-3 digits"  # the last one taken
    assert Split("x", "units in {{1,3}}, {d1} digits", None, None).describe(3) == "units in {1,3}, 4 digits"


def test_a_split_registered_by_a_script_is_warned_of_before_the_sweep(split_registry):
    """A split registered by a notebook or script trained (its spawned workers run the script again), but the
    study's config.yaml named no module that registers it: resuming or extending it met "unknown split"."""
    from gradtrace.sweep import check_config

    code = ("from gradtrace.tasks import Problem, Split, register_split\n"
            "register_split(Split('scripted', 'a+a', test=lambda r, d: Problem((int(r.integers(1, 99)),) * 2),\n"
            "                     train=lambda r, d: Problem((int(r.integers(1, 99)),) * 2)))\n")
    exec(code, {"__name__": "__main__"})
    cfg = tiny_config(task__shifts=["scripted", "space", "order"])
    with pytest.warns(UserWarning, match=r"split\(s\) scripted are registered by this script or notebook, not by a "
                                         r"module that task.modules names"):
        check_config(cfg, contact_hub=False)
    exec(code, {"__name__": "my_splits"})  # a module's registration: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_config(cfg, contact_hub=False)


def test_task_modules_that_cannot_be_imported_are_named(tmp_path, monkeypatch, split_registry):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"task.modules: cannot import 'no_such_splits' \(No module named"):
        ArithmeticTask(small(modules=["no_such_splits"]))
    with pytest.raises(ValueError, match=r"task.modules: no file .*missing.py \('missing.py', relative to the "
                                         r"directory the command runs in\); name the file where it lies now \(--set "
                                         r"task.modules=\[PATH\]"):
        ArithmeticTask(small(modules=["missing.py"]))
    with pytest.raises(ValueError, match=r"no file /gone/missing.py; name the file"):  # absolute: said once
        ArithmeticTask(small(modules=["/gone/missing.py"]))
    (tmp_path / "broken.py").write_text("raise RuntimeError('half written')\n")
    for _ in range(2):  # a file that failed is run again, not taken as imported
        with pytest.raises(RuntimeError, match="half written"):
            ArithmeticTask(small(modules=["broken.py"]))


def test_task_modules_register_the_splits_of_the_files_named_now(tmp_path, monkeypatch, split_registry):
    """Two files of task.modules each registering a split `twin`: the one imported last replaced the other's,
    silently. In a process that lives on (a notebook, a dask worker serving study after study), a file was run once:
    edited since, or its split registered over by another study's file, it trained on the split as it was. A package
    whose submodule registers its split is held to the same."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name, operand):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(
            "from gradtrace.tasks import Problem, Split, register_split\n"
            f"twin = lambda r, d: Problem(({operand}, int(r.integers(1, 10**d))))\n"
            "register_split(Split('twin', 'a sum', test=twin, train=twin))\n")

    def first_operand(modules):
        ArithmeticTask(small(shifts=["twin"], modules=modules))
        return split_registry["twin"].test(np.random.default_rng(0), 3).operands[0]

    write("mine.py", 1)
    write("theirs.py", 2)
    assert first_operand(["mine.py"]) == 1
    assert first_operand(["theirs.py"]) == 2  # another study's file in the same process
    assert first_operand(["mine.py"]) == 1  # the first again: run again, not the split as theirs.py left it
    cfg = small(shifts=["twin"], modules=["mine.py"])
    built = task_for(cfg, ModelConfig()).items_digest
    write("mine.py", 3)
    assert first_operand(["mine.py"]) == 3  # edited: run again
    assert task_for(cfg, ModelConfig()).items_digest != built  # the task of its text, not the one built before
    with pytest.raises(ValueError, match=r"task.modules: mine.py and theirs.py both register split 'twin' \(the one "
                                         r"imported last would replace the other's, silently\): give one of them"):
        ArithmeticTask(small(shifts=["twin"], modules=["mine.py", "theirs.py"]))
    assert first_operand(["mine.py", "./mine.py"]) == 3  # one file, named twice
    write("twinpkg/splits.py", 4)
    (tmp_path / "twinpkg" / "__init__.py").write_text("from . import splits\n")
    assert first_operand(["twinpkg"]) == 4
    assert first_operand(["theirs.py"]) == 2
    assert first_operand(["twinpkg"]) == 4  # its submodule's split, taken back
    with pytest.raises(ValueError, match=r"task.modules: twinpkg and theirs.py both register split 'twin'"):
        ArithmeticTask(small(shifts=["twin"], modules=["twinpkg", "theirs.py"]))


def test_a_split_whose_sampler_draws_on_and_on_is_warned_of(monkeypatch, split_registry):
    """A sampler drawing until a condition no item at task.max_digits meets (all digits distinct, say), or only rare
    draws meet (when its check's few items passed), hung every command that builds the task, saying nothing."""
    import time

    from gradtrace.tasks import Problem, Split, register_split, shifts

    def slow(r, d):
        time.sleep(0.05)  # as a sampler looping for long
        return Problem((int(r.integers(1, 1000)), 1))

    register_split(Split("slow", "a slow sampler", test=slow, train=slow))
    monkeypatch.setattr(shifts, "SLOW_SAMPLER_S", 0.3)
    with pytest.warns(UserWarning, match=r"split 'slow': its samplers have drawn for 0.3 s without returning the few "
                                         r"items the task's check asks for at task.max_digits=3: one that draws until"):
        shifts.check_splits(small(shifts=["slow", "carry"]))
    with pytest.warns(UserWarning, match=r"split 'slow': its samplers have drawn for 0.3 s without returning its 24 "
                                         r"test and probe items at task.max_digits=3"):
        shifts.draw_held_out(small(shifts=["slow"], n_test=20, n_probe=4))  # one looping on rare draws hung it

    def quick(r, d):
        return Problem((int(r.integers(1, 1000)), 2))

    def stuck_now_and_then(r, d):  # as a training form looping for long on one draw in eight
        time.sleep(0.6 if r.integers(0, 8) == 0 else 0)
        return quick(r, d)

    def held_out_drawn(shift: str) -> ArithmeticTask:
        with warnings.catch_warnings():  # its check's and test set's warnings, as above
            warnings.simplefilter("ignore")
            task = ArithmeticTask(small(shifts=[shift], n_test=20, n_probe=4, pool_size=64, train_share=0.5))
            task.test_set(shift)
        return task

    register_split(Split("stuck", "a sampler stuck on rare draws", test=quick, train=stuck_now_and_then))
    stuck = held_out_drawn("stuck")
    with pytest.warns(UserWarning, match=r"split 'stuck': its samplers have drawn for 0.3 s without returning another "
                                         r"of the training pool's 64 items \(task.pool_size\) at task.max_digits=3"):
        stuck.train_pool
    slow_pool = held_out_drawn("slow")
    monkeypatch.setattr(shifts, "SLOW_SAMPLER_S", 1.0)  # 20 times an item's time, under 1.6 s for them all
    with warnings.catch_warnings():  # a pool drawing on, item after item, is not warned of however long it takes
        warnings.simplefilter("error")
        slow_pool.train_pool
    with warnings.catch_warnings():  # the built-in ones draw at once
        warnings.simplefilter("error")
        shifts.check_splits(small(shifts=["length", "carry"]))
        shifts.draw_held_out(small(shifts=["length", "carry"], n_test=20, n_probe=4))
        ArithmeticTask(small(shifts=["length", "carry"], n_test=20, n_probe=4, pool_size=64)).train_pool


def test_the_config_accepts_exactly_the_probe_losses_there_are():
    from gradtrace.config import PROBE_LOSS_NAMES
    from gradtrace.tasks import PROBE_LOSSES

    assert set(PROBE_LOSS_NAMES) == set(PROBE_LOSSES)


def test_a_task_draws_the_same_items_whatever_order_it_lists_its_shifts_in(split_registry):
    """Test sets were drawn in task.shifts order, each avoiding the prompts before it: listing the same shifts in
    another order gave other test items, and another study."""
    from gradtrace.tasks import Problem, Split, register_split

    def tens(r, d):
        return Problem((10 * int(r.integers(1, 10)), int(r.integers(0, 10))))

    register_split(Split("zz_tens", "a multiple of ten plus a digit", test=tens, train=tens))
    register_split(Split("aa_tens", "the same items, registered second", test=tens, train=tens))
    listed = (["space", "order", "zz_tens", "aa_tens", "zeropad"], ["aa_tens", "zeropad", "zz_tens", "order", "space"])
    one, other = (ArithmeticTask(small(shifts=shifts, n_test=20, n_probe=4, pool_size=512)) for shifts in listed)
    assert one.splits[1:] == ["space", "order", "zz_tens", "aa_tens", "zeropad"]  # the results keep the config's order
    for split in one.splits:
        for a, b in ((one.test_set(split), other.test_set(split)), (one.probe_set(split), other.probe_set(split)),
                     (one.train_eval_set(split), other.train_eval_set(split))):
            np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(one.train_pool.tokens, other.train_pool.tokens)
