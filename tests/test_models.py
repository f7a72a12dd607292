"""The embedded models are the shapes they name, whichever transformers release (4 or 5) builds them."""
import pytest
import torch
from safetensors.torch import save_file

from gradtrace import config
from gradtrace.config import ModelConfig
from gradtrace.models import EMBEDDED, OUTPUT_LAYER_NAMES, NeoXShape, build_model, check_init_from


@pytest.mark.parametrize("name", ["micro", "tiny", "pythia-70m"])
def test_embedded_models_have_the_shape_they_name(name):
    shape = EMBEDDED[name]
    model = build_model(ModelConfig(name=name), vocab_size=20, seed=0)
    head = shape.hidden // shape.heads
    rotary = int(head * shape.rotary_fraction)  # transformers 4 and 5 read the fraction from differently named keys
    assert len(model.gpt_neox.layers) == shape.layers
    for layer in model.gpt_neox.layers:
        assert layer.attention.rotary_ndims == rotary
        assert layer.attention.query_key_value.out_features == 3 * shape.hidden
        assert layer.mlp.dense_h_to_4h.out_features == shape.ffn
    assert model.gpt_neox.rotary_emb.inv_freq.numel() == rotary // 2
    assert model.config.num_attention_heads == shape.heads and model.config.use_parallel_residual


def test_init_from_weights_saved_under_the_other_releases_names(tmp_path):
    """transformers 4 names GPT-NeoX's output layer `embed_out`, 5 `lm_head`: a base saved by either loads in both."""
    source = build_model(ModelConfig(name="micro"), vocab_size=20, seed=1)
    weights = source.state_dict()
    ours = next(p for p in OUTPUT_LAYER_NAMES if any(n.startswith(p) for n in weights))
    theirs = next(p for p in OUTPUT_LAYER_NAMES if p != ours)
    renamed = {theirs + k.removeprefix(ours) if k.startswith(ours) else k: v.contiguous() for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    save_file(renamed, tmp_path / "base.safetensors")
    loaded = build_model(ModelConfig(name="micro", init_from=str(tmp_path / "base.safetensors")), vocab_size=20, seed=0)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_init_from_weights_of_a_model_with_tied_embeddings(tmp_path):
    """A tied output layer is one tensor under two names, which gradtrace saves once (safetensors refuses it
    twice): every run starting from such a base failed, the output layer's name "missing"."""
    from transformers import GPTNeoXConfig

    from gradtrace.checkpoint import save_weights

    GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    source = build_model(ModelConfig(name=str(tmp_path / "tied")), vocab_size=20, seed=1)
    save_weights(source, tmp_path / "base.safetensors")
    loaded = build_model(ModelConfig(name=str(tmp_path / "tied"), init_from=str(tmp_path / "base.safetensors")),
                         vocab_size=20, seed=0)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    with pytest.raises(ValueError, match=r"other shapes than model 'tiny''s: gpt_neox.embed_in.weight \(32, 16\), "
                                         r"not \(20, 96\)"):  # torch's RuntimeError, every tensor listed
        build_model(ModelConfig(name="tiny", init_from=str(tmp_path / "base.safetensors")), vocab_size=20, seed=0)


@pytest.mark.parametrize("sizes", [dict(hidden=90, heads=4), dict(hidden=96, heads=0), dict(layers=0),
                                   dict(rotary_fraction=0.0)])
def test_a_shape_that_cannot_be_built_is_refused_where_it_is_written(sizes):
    with pytest.raises(ValueError, match="NeoXShape"):
        NeoXShape(**{"hidden": 96, "layers": 3, "heads": 4, "ffn": 384, **sizes})


def test_the_default_fine_tunes_its_shipped_base_as_its_base_run_scored_it():
    """experiments/default_base.safetensors is the default's base run's final weights (800 steps from scratch on an
    AMD CPU): it scores what that run recorded on the default's test sets, to an item or two of another CPU's
    rounding."""
    from gradtrace.evaluate import accuracy, correctness
    from gradtrace.tasks import ArithmeticTask

    cfg = config.load("experiments/default.yaml")
    assert cfg.model.init_from == str(config.shipped_weights()["default_base.safetensors"])
    task = ArithmeticTask(cfg.task)
    got = accuracy(correctness(build_model(cfg.model, task.tokenizer.vocab_size, seed=0), task))
    recorded = {"ID": 0.7095, "length": 0.0355, "carry": 0.0765, "zeropad": 0.029, "base8": 0.009, "space": 0.2715,
                "spaced_ops": 0.0405, "order": 0.078}
    assert got == pytest.approx(recorded, abs=2 / cfg.task.n_test)


def test_weights_another_model_cannot_take_are_refused_before_a_sweep_trains(tmp_path):
    """The default fine-tunes the tiny model's base: with another model every run failed at its start, one by one."""
    from gradtrace.cli import main

    out = tmp_path / "study"
    assert main(["sweep", "experiments/default.yaml", "--out", str(out), "--set", "model.name=micro",
                 "--set", "sweep.runs=3"]) == 2
    assert not (out / "store.zarr").exists() and not (out / "plan.json").exists()
    with pytest.raises(ValueError, match="other shapes than model 'micro''s.*set model.init_from=null"):
        check_init_from(config.load("experiments/default.yaml", {"model.name": "micro"}).model)
    generator = torch.get_rng_state()
    check_init_from(config.load("experiments/default.yaml").model)  # the tiny model takes them
    assert torch.equal(torch.get_rng_state(), generator)  # the model built to check them left no trace
