"""The results table (results.csv) as the analyses load it, and per-item correctness from the store."""
import warnings

import numpy as np
import pandas as pd
import pytest

from gradtrace import results, store


@pytest.fixture
def study(tmp_path):
    """A study's results.csv and store of three complete sweep runs and a reference run, no training."""
    root = store.open_experiment(tmp_path / "store.zarr", mode="a")
    rows = []
    for i, (rid, role) in enumerate([("ref-000", "reference"), ("run-000", "sweep"), ("run-001", "sweep"),
                                     ("run-002", "sweep")]):
        group = store.create_run(root, rid, {"role": role})
        store.write_correct(group, {"ID": np.arange(4) < i, "length": np.arange(4) < 4 - i})
        store.set_status(group, "complete", accuracy={"ID": i / 4, "length": 1 - i / 4})
        rows.append({"run_id": rid, "role": role, "acc_ID": i / 4, "acc_length": 1 - i / 4})
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    return tmp_path


@pytest.mark.parametrize("waiting", [float("inf"), 0.0], ids=["one-run-after-another", "on-threads"])
def test_item_correctness_stacks_the_sweep_runs(study, monkeypatch, waiting):
    monkeypatch.setattr(store, "WAITING", waiting)  # threads past the first run where reads wait (a network disk)
    monkeypatch.setattr(store, "SAMPLE", 1)
    correct = results.load_item_correctness(study)
    np.testing.assert_array_equal(correct["ID"].sum(axis=1), [1, 2, 3])


def test_a_role_no_run_has_is_refused_naming_the_roles(study):
    """role='sweeps' gave an empty table (and no per-item correctness) as if the sweep had no run yet."""
    for load in (results.load_results, results.load_item_correctness):
        with pytest.raises(ValueError, match=r"role 'sweeps': gradtrace's runs have roles sweep, reference, base "
                                             r"\(this table's: reference, sweep\)"):
            load(study, role="sweeps")
    assert results.load_results(study, role="base").empty  # a role of gradtrace's that no run has yet


def test_item_correctness_is_empty_where_a_run_lacks_it_or_there_is_no_run(study):
    """A run without per-item correctness empties the whole (skipping it left fewer rows than the table's, each row
    then another run's), and so does a table of no runs (np.stack of nothing raised)."""
    root = store.open_experiment(study / "store.zarr", mode="a")
    store.set_status(store.create_run(root, "run-003", {"role": "sweep"}), "complete", accuracy={"ID": 0.5,
                                                                                                 "length": 0.5})
    table = pd.read_csv(study / "results.csv")
    table = pd.concat([table, pd.DataFrame([{"run_id": "run-003", "role": "sweep", "acc_ID": 0.5, "acc_length": 0.5}])])
    table.to_csv(study / "results.csv", index=False)
    assert results.load_item_correctness(study) == {}
    assert results.load_item_correctness(study, table=table.iloc[:0]) == {}


def test_a_results_row_is_its_runs_attributes(tmp_path):
    """Each complete run is one row, in run order, of its seeds (init and data apart), hyper-parameters, steps, wall
    time to the hundredth, base and accuracies; a run still running is none."""
    root = store.open_experiment(tmp_path / "store.zarr", mode="a")
    for rid, init, data in (("run-010", 3, 11), ("run-002", 4, 12), ("run-005", 5, 13)):
        group = store.create_run(root, rid, {"role": "sweep", "seeds": {"init": init, "data": data},
                                             "hparams": {"lr": 0.002, "weight_decay": 0.1}, "steps": 40,
                                             "config": {"model": {"init_from": "/s/weights/base-1/final.safetensors"}}})
        if rid != "run-005":
            group.update_attributes({"wall_time_s": 12.3456})
            store.set_status(group, "complete", accuracy={"ID": 0.75, "length": 0.25}, train_accuracy={"ID": 0.8})
    table = results.results_table(tmp_path)
    assert table.to_dict("records") == [
        {"run_id": run_id, "role": "sweep", "base": "base-1", "init_seed": init, "data_seed": data, "lr": 0.002,
         "weight_decay": 0.1, "steps": 40, "wall_time_s": 12.35, "acc_ID": 0.75, "acc_length": 0.25,
         "train_acc_ID": 0.8} for run_id, init, data in (("run-002", 4, 12), ("run-010", 3, 11))]


def test_runs_are_taken_within_base_only_where_there_are_several_bases():
    assert results.base_groups(pd.DataFrame({"base": ["base-0", "base-1", "base-0"]})) == "base"
    assert results.base_groups(pd.DataFrame({"base": ["base", "base"]})) is None  # one base: nothing to group by
    assert results.base_groups(pd.DataFrame({"run_id": ["run-000"]})) is None


@pytest.mark.parametrize("role", ["sweep", "reference", None])
def test_runs_the_store_does_not_hold_are_named(study, role):
    """stats said only `error: 'run-099'` (a KeyError); predict and calibrate took the row as one of the study's."""
    table = pd.read_csv(study / "results.csv")
    pd.concat([table, table.iloc[[1]].assign(run_id="run-099")]).to_csv(study / "results.csv", index=False)
    lacks = r"lists 1 run\(s\) that store.zarr does not hold \(run-099\).*run the sweep again"
    with pytest.raises(ValueError, match=lacks):
        results.load_results(study, role=role)
    with pytest.raises(ValueError, match=lacks):
        results.load_item_correctness(study, table=table.assign(run_id=table.run_id.replace("run-001", "run-099")))


def test_a_table_without_run_ids_is_refused(study):
    """stats said only `error: 'run_id'`."""
    pd.read_csv(study / "results.csv").drop(columns="run_id").to_csv(study / "results.csv", index=False)
    with pytest.raises(ValueError, match="has no run_id column: it is not the table gradtrace writes. Rewrite it"):
        results.load_results(study)


def test_a_table_without_roles_is_refused(study):
    """Every row was kept: the reference runs joined the sweep's statistics (n = 12 for 10 sweep runs), silently."""
    assert list(results.load_results(study).run_id) == ["run-000", "run-001", "run-002"]
    pd.read_csv(study / "results.csv").drop(columns="role").to_csv(study / "results.csv", index=False)
    with pytest.raises(ValueError, match="has no role column: it is not the table gradtrace writes. Rewrite it"):
        results.load_results(study)


def test_a_directory_of_runs_trained_outside_a_sweep_is_named_as_such(tmp_path):
    """`gradtrace stats storage/one` (a `gradtrace train` run) said to run a sweep into it, which a sweep refuses."""
    store.create_run(store.open_experiment(tmp_path / "store.zarr", mode="a"), "run", {})
    with pytest.raises(FileNotFoundError, match="holds runs of `gradtrace train` or of a loop of your own"):
        results.load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="results.csv not found; run `gradtrace sweep CONFIG --out"):
        results.load_results(tmp_path / "nothing")


def test_a_sweeps_directory_before_its_first_run_ends_says_so(tmp_path):
    """`gradtrace stats` beside a sweep that had finished no run yet said to run the sweep, which is running."""
    store.create_run(store.open_experiment(tmp_path / "store.zarr", mode="a"), "run-000", {})
    (tmp_path / "plan.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="the sweep planned there has finished no run yet; wait for its first"):
        results.load_results(tmp_path)


def test_runs_of_one_role_that_trained_otherwise_are_warned_of(study):
    """A study extended or resumed under another torch (or kernels, threads, device, code) mixed runs of two
    roundings into one table, and no analysis said so; a base's threads apart from its fine-tuning runs' are no mix."""
    from gradtrace import kernels

    groups = store.run_groups(store.open_experiment(study / "store.zarr", mode="a"))
    alike = {"torch_version": "2.13.0", "cpu_kernels": "AVX2", "cpu_threads": 1}
    for rid, group in groups.items():
        group.update_attributes({**alike, "cpu_threads": 2} if rid == "ref-000" else alike)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.OtherArithmetic)
        results.load_results(study, role=None)
    groups["run-002"].update_attributes({"torch_version": "2.14.1", "resumed_with": [{"step": 8, "cpu_threads": 4}]})
    assert results.mixed_arithmetic(groups, ["run-000", "run-002"]) == (
        "sweep runs' torch_version: 2.13.0 (run-000), 2.14.1 (run-002); resumed with other arithmetic than they "
        "started with: run-002")
    with pytest.warns(kernels.OtherArithmetic, match=r"did not all train alike \(sweep runs' torch_version: 2.13.0 "
                                                     r"\(run-000, run-001\), 2.14.1 \(run-002\).*train.threads"):
        results.load_results(study)


@pytest.mark.parametrize("attrs, diverged", [
    ({}, False), ({"nonfinite_steps": 0, "train_loss": {"first": 0.5, "last": 4.9}}, False),
    ({"nonfinite_steps": 1}, True), ({"train_loss": {"first": 0.5, "last": 5.0}}, True),
    ({"train_loss": {"first": 0.5, "last": "NaN"}}, True), ({"train_loss": {"first": 0.5, "last": "Infinity"}}, True),
    ({"train_loss": {"first": 0.0, "last": 0.0}}, False), ({"train_loss": {"first": 0.001, "last": 0.5}}, False),
    ({"train_loss": {"first": 0.001, "last": 1.0}}, True), ({"train_loss": {"first": None, "last": None}}, False),
    ({"train_loss": 0.42}, False), ({"train_loss": {"first": None, "last": 1.0}}, False),  # the user's own
    ({"train_loss": {"first": 0.0, "last": 1.2}}, False), ({"train_loss": {"first": -0.3, "last": 4.0}}, False),
    ({"train_loss": {"first": 0.0, "last": "NaN"}}, True)])  # GRPO's loss begins at 0: no scale to rise from
def test_a_run_diverged_where_its_gradients_or_its_loss_say_so(attrs, diverged):
    """NaN or Inf gradients, or a training loss that ended non-finite or, begun above 0, at 10× or more where it began
    and at 1 or more; a run written before `train_loss` was recorded (or holding a value of the user's under that
    name), by its gradients alone."""
    assert results.diverged_run(attrs) is diverged


def test_runs_that_diverged_are_named_with_their_learning_rates(study):
    groups = store.run_groups(store.open_experiment(study / "store.zarr", mode="a"))
    table = pd.DataFrame({"run_id": ["run-000", "run-001", "run-002"], "lr": [1e-3, 0.5, 2.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results.warn_of_divergence(groups, table, stacklevel=1)
    groups["run-001"].update_attributes({"nonfinite_steps": 3})
    groups["run-002"].update_attributes({"train_loss": {"first": 0.4, "last": 40.0}})
    with pytest.warns(UserWarning, match=r"^2 of 3 run\(s\) diverged \(run-001, run-002; lr 0.5 to 2\)"):
        results.warn_of_divergence(groups, table, stacklevel=1)
    with pytest.warns(UserWarning, match=r"^1 of 2 run\(s\) diverged \(run-001\): NaN"):
        results.warn_of_divergence(groups, table.iloc[:2].drop(columns="lr"), stacklevel=1)


def test_a_runs_base_is_named_by_the_weights_it_fine_tuned():
    """The shipped base of the default, `experiments/default_base.safetensors`, was named `experiments`, its folder."""
    assert results.started_from("/study/weights/base-2/final.safetensors") == "base-2"  # a base run of the study
    assert results.started_from("/site-packages/gradtrace/experiments/default_base.safetensors") == "default_base"
    assert results.started_from(None) == results.started_from("") == ""  # from scratch
