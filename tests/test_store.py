"""The trajectory store: documented schema readable with plain zarr, bf16, errors, resume cuts, HDF5, dask."""
import json
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import zarr

from gradtrace import store
from gradtrace.subspace import STREAMING_METHODS, top_span_streaming
from gradtrace.train import train

PLAIN_READER = r"""
import json, sys
import numpy as np, zarr
assert "gradtrace" not in sys.modules
root = zarr.open_group(sys.argv[1], mode="r")
run = root["r0"]
a = dict(run.attrs)
out = {"status": a["status"], "sketch": a["sketch"], "splits": a["splits"], "probe_losses": a["probe_losses"],
       "layout_len": len(a["layout"]), "last_durable_step": a["last_durable_step"], "accuracy": a["accuracy"]}
for name in ["step", "loss", "lr", "grad_norm", "grad_norm_unclipped", "nonfinite", "grad", "update", "adam_m",
             "layer_grad_norm", "layer_lr",
             "layer_update_norm", "layer_v_mean", "layer_v_quantile", "probe/step", "probe/loss",
             "probe/accuracy", "probe/grad", "probe/grad_adam", "eval/correct"]:
    arr = run[name]
    out[name] = {"shape": list(arr.shape), "dims": list(arr.metadata.dimension_names)}
out["steps"] = run["step"][:].tolist()
print(json.dumps(out))
assert "gradtrace" not in sys.modules
"""


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    from conftest import tiny_config

    exp = tmp_path_factory.mktemp("exp")
    cfg = tiny_config()
    train(cfg, exp, "r0", progress=False)
    return exp, cfg


def test_store_round_trip_with_plain_zarr(captured):
    exp, cfg = captured
    out = subprocess.run([sys.executable, "-c", PLAIN_READER, str(exp / "store.zarr")],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    T, k, S, L = cfg.train.steps, cfg.capture.dim, len(info["splits"]), info["layout_len"]
    assert info["status"] == "complete" and info["last_durable_step"] == T
    assert info["sketch"]["kind"] == "countsketch" and info["sketch"]["dim"] == k
    assert info["steps"] == list(range(T))
    assert info["grad"] == {"shape": [T, k], "dims": ["step", "sketch"]}
    assert info["layer_v_quantile"]["shape"] == [T, L, 3]
    assert info["layer_lr"] == {"shape": [T, L], "dims": ["step", "param"]}
    R = T // cfg.capture.probe_every + 1  # step 0, every probe_every, and the final step
    assert info["probe/step"]["shape"] == [R]
    assert info["probe/grad"] == {"shape": [R, S, 2, k], "dims": ["probe", "split", "probe_loss", "sketch"]}
    assert info["eval/correct"]["shape"] == [S, cfg.task.n_test]
    assert set(info["accuracy"]) == set(info["splits"])


def test_bfloat16_round_trip():
    import torch

    x = np.array([1.0, -2.5, 3.14159, 1e-20, 65504.0, np.nan], dtype=np.float32)
    y = store.decode(store.encode(x, store.BF16), store.BF16)
    assert np.allclose(y[:5], x[:5], rtol=1 / 128) and np.isnan(y[5])
    nans = np.array([0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)
    assert np.isnan(store.decode(store.encode(nans, store.BF16), store.BF16)).all()  # no NaN rounds to inf or 0
    finite = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * np.float32(1e3)
    ties = (np.arange(2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # halfway between two: to the even
    for values in (finite, ties[np.isfinite(ties)]):  # the bits torch's round-to-nearest-even gives, to the last one
        expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(store.encode(values, store.BF16), expected)
    half = store.decode(x.astype(np.float16), "float16")
    assert half.dtype == np.float32 and np.allclose(half[:3], x[:3], rtol=1e-3)  # summed as float32, not float16


def test_writer_buffers_whole_chunks_and_checkpoint_makes_rows_durable(tmp_path):
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    group = store.create_run(root, "r", {})
    w = store.RunWriter(group, chunk=4)
    w.declare("x", (3,), "float32", dims=("k",))
    for i in range(6):
        w.append({"x": np.full(3, i, np.float32)})
    assert group["x"].shape == (4, 3)  # one whole chunk written, two rows still buffered
    w.checkpoint(6)
    assert group["x"].shape == (6, 3) and group.attrs["last_durable_step"] == 6
    np.testing.assert_array_equal(group["x"][:, 0], np.arange(6))
    with pytest.raises(ValueError, match=r"holds rows of shape \(3,\), not \(4,\)"):  # zarr would cut them to fit
        store.RunWriter(group, chunk=4).declare("x", (4,), "float32", dims=("k",))


@pytest.mark.parametrize("thread", [False, True])
def test_checkpoint_syncs_every_written_file_before_recording_the_durable_step(tmp_path, monkeypatch, thread):
    synced = []  # what a power cut could otherwise take from the page cache: rows a resumed run would miss

    def record(*paths):
        synced.extend(paths)
        real_sync(*paths)

    real_sync = store.sync_to_disk
    monkeypatch.setattr(store, "sync_to_disk", record)
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    group = store.create_run(root, "r", {})
    w = store.RunWriter(group, chunk=4, thread=thread)
    w.declare("x", (3,), "float32", dims=("k",))
    w.declare("probe/y", (2,), "float32")
    for i in range(1, 11):
        w.append({"x": np.full(3, i, np.float32), "probe/y": np.full(2, i, np.float32)})
    synced.clear()
    w.checkpoint(10)
    run = tmp_path / "s.zarr" / "r"
    written = {p for p in run.rglob("*") if p != run / "zarr.json"}
    assert len([p for p in written if p.is_file()]) == 2 * 3 + 3  # three chunks each, arrays' and probe's metadata
    assert written <= set(synced[:-1]) and synced[-1] == run / "zarr.json"  # the durable step after the rows
    assert zarr.open_group(run, mode="r").attrs["last_durable_step"] == 10
    synced.clear()
    w.checkpoint(10)
    assert synced == [run / "zarr.json"]  # nothing written since: only the attribute is synced again


def test_background_writer_matches_synchronous(tmp_path):
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    for name, thread in (("sync", False), ("thread", True)):
        w = store.RunWriter(store.create_run(root, name, {}), chunk=8, thread=thread, queue_size=2)
        w.declare("x", (5,), "float32")
        for i in range(37):
            w.append({"x": np.arange(5, dtype=np.float32) * i})
        w.close()
    np.testing.assert_array_equal(root["sync"]["x"][:], root["thread"]["x"][:])


def test_writer_takes_tensor_rows_beside_python_and_numpy_values(tmp_path):
    import torch

    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    group = store.create_run(root, "r", {})
    w = store.RunWriter(group, chunk=2)
    w.declare("loss", (), "float32")
    w.declare("flag", (), "bool")
    w.declare("v", (2,), "float32")
    rows = [(torch.tensor(1.5, dtype=torch.bfloat16), torch.tensor(True), torch.tensor([1.0, 2.0])),
            (float("nan"), False, np.array([3.0, np.nan], np.float32)),  # e.g. no loss logged; NaN v statistics
            (torch.tensor(0.25), torch.tensor(False), torch.tensor([5.0, 6.0]))]
    for loss, flag, v in rows:
        w.append({"loss": loss, "flag": flag, "v": v})
    w.close()
    loss, flag, v = group["loss"][:], group["flag"][:], group["v"][:]
    assert loss.dtype == np.float32 and flag.dtype == bool
    np.testing.assert_array_equal(loss, [1.5, np.nan, 0.25])
    np.testing.assert_array_equal(flag, [True, False, False])
    np.testing.assert_array_equal(v, [[1.0, 2.0], [3.0, np.nan], [5.0, 6.0]])


def test_truncate_to_cuts_rows_past_the_resume_point(captured, tmp_path):
    exp, cfg = captured
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(exp / "store.zarr", copy)
    group = zarr.open_group(copy / "r0", mode="a")
    store.truncate_to(group, 16)
    assert group["step"][:].tolist() == list(range(16))
    assert group["grad"].shape[0] == 16 and group["layer_v_quantile"].shape[0] == 16
    assert group["probe/step"][:].tolist() == [0]


def test_truncate_to_drops_rows_a_kill_left_unwritten(captured, tmp_path):
    """A kill between an array's resize and its chunk's write leaves rows of fill value (step 0) past the
    durable ones: a resume must cut them, not count them as early steps."""
    exp, cfg = captured
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(exp / "store.zarr", copy)
    group = zarr.open_group(copy / "r0", mode="a")
    T, probe_steps = group["step"].shape[0], group["probe/step"][:].tolist()
    for name in ("step", "grad", "loss", "probe/step", "probe/grad"):
        group[name].resize((group[name].shape[0] + 8, *group[name].shape[1:]))
    store.truncate_to(group, T)
    assert group["step"][:].tolist() == list(range(T))
    assert group["grad"].shape[0] == T and group["loss"].shape[0] == T
    assert group["probe/step"][:].tolist() == probe_steps
    assert group["probe/grad"].shape[0] == group["probe/step"].shape[0]
    store.truncate_to(group, 1)  # one durable row, of step 0: the fill rows after it repeat its step, not increase it
    for name in ("step", "grad", "probe/step", "probe/grad"):
        group[name].resize((group[name].shape[0] + 8, *group[name].shape[1:]))
    store.truncate_to(group, 1)
    assert group["step"][:].tolist() == [0] and group["grad"].shape[0] == 1
    assert group["probe/step"][:].tolist() == [0] and group["probe/grad"].shape[0] == 1


def test_clear_errors_on_missing_or_corrupt_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a gradtrace store"):
        store.open_experiment(tmp_path / "nothing")
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{ not json")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        store.open_experiment(bad)


def test_a_group_that_is_not_an_experiment_store_is_refused(tmp_path):
    """A run group's path was taken for a store: `info` listed its eval and probe groups as runs, `export` wrote
    them alone."""
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    w = store.RunWriter(store.create_run(root, "r", {}), chunk=2)
    w.declare("probe/step", (), "int64")
    w.append({"probe/step": 0})
    w.close()
    for path, what in ((tmp_path / "s.zarr" / "r", "a run group"), (tmp_path / "s.zarr" / "r" / "probe", "a group")):
        for mode in ("r", "a"):
            with pytest.raises(ValueError, match=f"is {what} inside the experiment store .*s.zarr, not a store"):
                store.open_experiment(path, mode=mode)
    zarr.open_group(tmp_path / "plain.zarr", mode="w").attrs["x"] = 1
    with pytest.raises(ValueError, match="not a gradtrace experiment store"):
        store.open_experiment(tmp_path / "plain.zarr")
    assert store.runs(store.open_experiment(tmp_path / "s.zarr")) == ["r"]


def test_a_run_groups_store_is_named_as_its_relative_path_was_given(tmp_path, monkeypatch):
    store.create_run(store.open_experiment(tmp_path / "s.zarr", mode="a"), "r", {})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ValueError) as refused:
        store.open_experiment("../s.zarr/r")
    assert str(refused.value) == ("../s.zarr/r is a run group inside the experiment store ../s.zarr, not a store: "
                                  "pass ../s.zarr")


def test_a_new_store_is_created_with_its_attributes_in_one_write(tmp_path, monkeypatch):
    """Two sweep workers opening a new store at once: one saw the other's group bare (created, its attributes not
    yet written) beside a run, and refused it as no gradtrace store (the run failed)."""
    monkeypatch.setattr(zarr.Group, "update_attributes", lambda self, *a, **k: pytest.fail("a second write"))
    assert store.open_experiment(tmp_path / "s.zarr", mode="a").attrs["kind"] == store.EXPERIMENT
    assert store.open_experiment(tmp_path / "s.zarr", mode="a").attrs["kind"] == store.EXPERIMENT  # as it was


def test_newer_schema_refused(tmp_path):
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    root.attrs["schema_version"] = store.SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="Upgrade gradtrace"):
        store.open_experiment(tmp_path / "s.zarr")


def test_summary_and_hdf5_export(captured, tmp_path):
    import h5py

    exp, cfg = captured
    text = store.summary(exp / "store.zarr")
    assert "1 complete" in text and "countsketch:128" in text and "probe/grad" in text
    path = store.export_hdf5(exp / "store.zarr", tmp_path / "out.h5")
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["r0/grad"][:], zarr.open_group(exp / "store.zarr")["r0/grad"][:])
        assert json.loads(h5["r0"].attrs["gradtrace"])["status"] == "complete"
        assert json.loads(h5["r0/grad"].attrs["dimension_names"]) == ["step", "sketch"]
        correct = zarr.open_group(exp / "store.zarr")["r0/eval/correct"]  # its rows' labels travel with it
        assert json.loads(h5["r0/eval/correct"].attrs["gradtrace"]) == dict(correct.attrs) and "splits" in correct.attrs
        assert h5["r0/grad"].compression == "gzip" and h5["r0/grad"].shuffle  # level 1, shuffled: 1.6× faster
    plain = store.export_hdf5(exp / "store.zarr", tmp_path / "plain.h5", compression="none")
    with h5py.File(plain, "r") as h5:
        assert h5["r0/grad"].compression is None
        np.testing.assert_array_equal(h5["r0/grad"][:], zarr.open_group(exp / "store.zarr")["r0/grad"][:])
    with pytest.raises(ValueError, match="compression 'lzf': choose one of gzip, none"):
        store.export_hdf5(exp / "store.zarr", tmp_path / "x.h5", compression="lzf")


def test_summary_lists_each_array_as_zarr_reads_it(captured, monkeypatch):
    """`gradtrace info` reads a local run's array metadata as JSON and sums an array's files itself (zarr's array
    objects took 14 of its 16 s at 3,000 runs, its `nbytes_stored` half of the rest): the listing is zarr's."""
    exp, _ = captured
    run = zarr.open_group(exp / "store.zarr", mode="r")["r0"]
    arrays = {name: arr for name, arr in run.arrays()} | {f"probe/{name}": arr for name, arr in run["probe"].arrays()}
    arrays |= {f"eval/{name}": arr for name, arr in run["eval"].arrays()}
    listed = {array.name: array for array in store._listed_arrays(run)}
    assert {"grad", "probe/grad", "eval/correct"} <= set(listed) and set(listed) == set(arrays)
    for name, arr in arrays.items():
        assert listed[name] == store._ListedArray(name, arr.shape, str(arr.attrs.get("storage_dtype", arr.dtype)),
                                                  arr.metadata.dimension_names, arr.nbytes_stored()), name
    monkeypatch.setattr(store, "local_path", lambda node: None)  # a store elsewhere: through zarr
    assert store._listed_arrays(run) == sorted(listed.values(), key=lambda array: array.name)


def test_map_reads_keeps_the_order_one_call_after_another_and_on_threads(monkeypatch) -> None:
    """On a network filesystem (sshfs: 121 s for `gradtrace info` at 3,000 runs, against 4 s on a local disk) the
    reads go on threads; the results come in order either way."""
    monkeypatch.setattr(store, "SAMPLE", 2)
    for waiting, threaded in ((float("inf"), False), (0.0, True)):
        monkeypatch.setattr(store, "WAITING", waiting)
        threads = set()
        assert store.map_reads(lambda i: threads.add(threading.get_ident()) or i * i, range(50)) == [
            i * i for i in range(50)]
        assert (threads != {threading.get_ident()}) == threaded


def test_summary_is_the_same_read_on_threads(tmp_path, monkeypatch) -> None:
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    for i in range(12):
        run = store.create_run(root, f"r{i}", {"steps": 3})
        run.create_array("loss", shape=(i % 3 + 1,), dtype="f4")[:] = 1.0
        store.set_status(run, "complete" if i % 5 else "failed")
    monkeypatch.setattr(store, "SAMPLE", 1)
    alone = store.summary(tmp_path / "s.zarr")
    monkeypatch.setattr(store, "WAITING", 0.0)
    assert store.summary(tmp_path / "s.zarr") == alone and alone.count("status=") == 12


def test_hdf5_export_replaces_an_earlier_export_but_no_other_file(captured, tmp_path, monkeypatch):
    import h5py

    exp, _ = captured
    out = tmp_path / "out.h5"
    store.export_hdf5(exp / "store.zarr", out)
    store.export_hdf5(exp / "store.zarr", out)  # a re-export replaces the earlier one
    (tmp_path / "notes.txt").write_text("mine")
    for other in (tmp_path / "notes.txt", tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(FileExistsError, match="not an HDF5 file"):
            store.export_hdf5(exp / "store.zarr", other)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with h5py.File(tmp_path / "theirs.h5", "w") as h5:  # HDF5, but no export: replaced, it was lost
        h5["weights"] = np.arange(3)
    with pytest.raises(FileExistsError, match="not a gradtrace export"):
        store.export_hdf5(exp / "store.zarr", tmp_path / "theirs.h5")
    with h5py.File(tmp_path / "theirs.h5", "r") as h5:
        assert list(h5) == ["weights"]
    with pytest.raises(FileNotFoundError, match="notes.txt is not a directory"):  # was NotADirectoryError, from the
        store.export_hdf5(exp / "store.zarr", tmp_path / "notes.txt" / "x.h5")  # cleanup of the partial file

    def killed(source, path, *how):  # an export that dies mid-write leaves the earlier export whole and no partial file
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_write_hdf5_apart", killed)
    with pytest.raises(KeyboardInterrupt):
        store.export_hdf5(exp / "store.zarr", out)
    with h5py.File(out, "r") as h5:
        assert "r0" in h5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out.h5"]


def test_summary_of_a_store_with_no_run_yet_says_so(tmp_path):
    """A sweep's store before its first run starts: `gradtrace info` printed "status: " and nothing after it."""
    store.open_experiment(tmp_path / "s.zarr", mode="a")
    assert store.summary(tmp_path / "s.zarr").splitlines()[1] == "status: no run recorded yet"


def test_summary_names_a_failed_runs_error(tmp_path):
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    store.set_status(store.create_run(root, "r1", {"steps": 4}), "failed", error="MemoryError: out of memory")
    assert "[r1] status=failed" in store.summary(tmp_path / "s.zarr")
    assert "  error: MemoryError: out of memory" in store.summary(tmp_path / "s.zarr")


def test_summary_says_which_runs_diverged(tmp_path):
    """A run whose loss ended non-finite or at 10× where it began is said to have diverged, and counted only among
    runs that diverged too."""
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    for rid, last in (("run-000", 0.4), ("run-001", 30.0), ("run-002", float("nan")), ("run-003", 0.5)):
        store.set_status(store.create_run(root, rid, {"steps": 4}), "complete",
                         train_loss={"first": 0.5, "last": last})
    text = store.summary(tmp_path / "s.zarr")
    assert "[run-000] status=complete" in text and "[run-001] status=complete" in text
    assert "  WARNING: diverged: training loss 0.5 at the start, 30 at the end" in text
    assert "[run-002] 1 more run(s) like run-001:" in text and "[run-003] status=complete" in text
    assert text.count("diverged") == 1


def test_summary_counts_runs_alike_instead_of_listing_them(tmp_path):
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    for rid, steps in (("ref-000", 8), ("run-000", 4), ("run-001", 4), ("run-002", 4), ("run-003", 6)):
        group = store.create_run(root, rid, {"steps": steps, "sketch": {"kind": "countsketch", "dim": 64, "seed": 0},
                                             "splits": ["ID"]})
        group.create_array("loss", shape=(steps,), dtype="float32", dimension_names=["step"])[:] = 1.0
        if rid == "ref-000":  # the sweep's runs record scalars only
            group.create_array("grad", shape=(steps, 64), dtype="float32", dimension_names=["step", "sketch"])
        store.set_status(group, "complete")
    text = store.summary(tmp_path / "s.zarr")
    assert "[run-000]" in text and "[run-001]" not in text and "[run-003]" in text  # shapes differ: listed
    assert "[run-001 … run-002] 2 more run(s) like run-000:" in text
    assert text.count("  loss ") == 3
    assert "[ref-000] status=complete" in text and "sketch=countsketch:64 seed=0" in text
    assert "sketch=none" in text.split("[run-000]")[1]  # where nothing is sketched


def test_lazy_dask_read_matches_eager(captured):
    exp, _ = captured
    group = zarr.open_group(exp / "store.zarr")["r0"]
    lazy = store.read_lazy(group, "update")
    assert lazy.chunks[0][0] == group["update"].chunks[0]
    np.testing.assert_array_equal(lazy.compute(), store.read(group, "update"))
    with pytest.raises(KeyError, match="it holds: .*update"):
        store.read_lazy(group, "nope")



def test_status_takes_numpy_scalars(tmp_path):
    group = store.create_run(store.open_experiment(tmp_path / "s.zarr", mode="w"), "r", {"steps": 2})
    store.set_status(group, "complete", nonfinite_steps=np.int64(0), wall_time_s=np.float32(1.5))
    assert group.attrs["nonfinite_steps"] == 0 and group.attrs["wall_time_s"] == 1.5


def test_xarray_dataset_names_every_axis_and_reads_lazily(captured):
    exp, cfg = captured
    group = zarr.open_group(exp / "store.zarr")["r0"]
    ds = store.dataset(group)
    assert ds["grad"].dims == ("step", "sketch") and ds["probe/grad"].dims == ("probe", "split", "probe_loss",
                                                                               "sketch")
    assert ds["update"].chunks is not None  # dask-backed: nothing read until asked
    assert ds["step"].values.tolist() == list(range(cfg.train.steps))
    assert ds["split"].values.tolist() == group.attrs["splits"]
    assert ds["param"].values.tolist() == [p["name"] for p in group.attrs["layout"]]
    assert ds.attrs["sketch"]["dim"] == cfg.capture.dim
    np.testing.assert_array_equal(ds["probe/grad"].sel(split="ID", probe_loss="ce").values,
                                  group["probe/grad"][:, 0, 0])
    np.testing.assert_array_equal(ds["update"].sel(step=slice(5, 9)).values, store.read(group, "update")[5:10])


def test_xarray_dataset_refuses_an_inconsistent_run(captured, tmp_path):
    import shutil

    exp, _ = captured
    shutil.copytree(exp / "store.zarr", tmp_path / "copy.zarr")
    group = zarr.open_group(tmp_path / "copy.zarr" / "r0", mode="a")
    group["grad"].resize((3, group["grad"].shape[1]))  # as if a chunk of `grad` alone were lost
    with pytest.raises(ValueError, match="truncated or corrupt"):
        store.dataset(group)


EXPORT_UNDER_A_LIMIT = """
import resource, signal, sys
from gradtrace import store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as one past a full disk or quota
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
try:
    store.export_hdf5(sys.argv[1], sys.argv[2])
except OSError as err:
    print(err.errno, err.filename)
"""


def test_an_export_whose_write_fails_raises_its_error_and_leaves_the_earlier_export_whole(captured, tmp_path):
    """HDF5, once one of its writes had failed (a disk full, a quota used up: shown here by a file size limit), could
    no longer close its file: the process crashed (a segmentation fault, h5py/h5py#914; a notebook's kernel too),
    leaving the partial file and no error in words."""
    import errno
    import os

    import h5py

    exp, _ = captured
    out = tmp_path / "out.h5"
    size = store.export_hdf5(exp / "store.zarr", out).stat().st_size
    for limit in (size // 100, size // 3, size * 2 // 3, size * 9 // 10):
        ended = subprocess.run([sys.executable, "-c", EXPORT_UNDER_A_LIMIT, str(exp / "store.zarr"), str(out),
                                str(limit)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert (ended.returncode, ended.stdout) == (0, f"{errno.EFBIG} {tmp_path / 'out.partial.h5'}\n"), ended.stderr
        assert ended.stderr == ""  # h5py's objects failing to close after the failed write are not told of one by one
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    with h5py.File(out, "r") as h5:
        assert "r0" in h5


def test_hdf5_export_decodes_bfloat16_chunk_by_chunk(tmp_path):
    import h5py

    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    w = store.RunWriter(store.create_run(root, "r", {}), chunk=4)
    w.declare("x", (3,), storage=store.BF16)
    w.declare("empty", (2,), "float32")
    rows = np.arange(30, dtype=np.float32).reshape(10, 3) / 7
    for row in rows:
        w.append({"x": row})
    w.close()
    path = store.export_hdf5(tmp_path / "s.zarr", tmp_path / "out.h5")
    with h5py.File(path, "r") as h5:
        assert h5["r/x"].dtype == np.float32 and h5["r/empty"].shape == (0, 2)
        assert h5["r/x"].chunks == (4, 3)  # the store's: each block written fills whole HDF5 chunks
        np.testing.assert_array_equal(h5["r/x"][:], store.read(root["r"], "x"))
        np.testing.assert_allclose(h5["r/x"][:], rows, rtol=1 / 128)
        # array attributes travel too: the decoded floats say they were stored as bfloat16
        assert json.loads(h5["r/x"].attrs["gradtrace"]) == dict(root["r/x"].attrs) == {"storage_dtype": store.BF16}


def test_a_chunk_that_cannot_be_decoded_is_named_as_damage(tmp_path):
    """Garbage in a chunk file gave zarr's bare `RuntimeError: Zstd decompression error` (a traceback)."""
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    w = store.RunWriter(store.create_run(root, "r", {}), chunk=4)
    w.declare("x", (3,), "float32")
    for i in range(10):
        w.append({"x": np.full(3, i, np.float32)})
    w.close()
    (tmp_path / "s.zarr" / "r" / "x" / "c" / "1" / "0").write_bytes(b"not zstd at all")
    damaged = r"array 'r/x': rows 4–7 \(chunk file r/x/c/1/0\) cannot be decoded \(RuntimeError: .*store is damaged"
    with pytest.raises(ValueError, match=damaged):
        store.read(root["r"], "x")
    with pytest.raises(ValueError, match=damaged):
        store.export_hdf5(tmp_path / "s.zarr", tmp_path / "out.h5")
    with pytest.raises(ValueError, match=damaged):  # lazily: when the dask array is computed
        store.read_lazy(root["r"], "x").sum().compute()
    for method in STREAMING_METHODS:  # spans streamed from the store (zarr's bare codec error before)
        with pytest.raises(ValueError, match=damaged):
            top_span_streaming(root["r/x"], 1, method=method, block_rows=4)
    w = store.RunWriter(root["r"], chunk=4)
    w.declare("step", (), "int64")
    for i in range(10):
        w.append({"step": i})
    w.close()
    (tmp_path / "s.zarr" / "r" / "step" / "c" / "0").write_bytes(b"not zstd either")
    with pytest.raises(ValueError, match=r"array 'r/step': rows 0–3 \(chunk file r/step/c/0\) cannot be decoded"):
        store.truncate_to(root["r"], 8)  # a resume
    np.testing.assert_array_equal(store.stored(root["r/x"], slice(8, 10))[:, 0], [8, 9])  # the chunks whole read


def test_metadata_that_cannot_be_read_is_named_as_damage(tmp_path):
    """A truncated zarr.json of a run or an array gave only the JSON parser's "Unterminated string …", naming no file,
    from every command (info too)."""
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    for run_id in ("r0", "r1"):
        w = store.RunWriter(store.create_run(root, run_id, {}), chunk=2)
        w.declare("probe/x", (), "float32")
        w.append({"probe/x": 1.0})
        w.close()
    for damaged in ("r1/probe/x", "r1/probe", "r1"):
        meta = tmp_path / "s.zarr" / damaged / "zarr.json"
        text = meta.read_text()
        meta.write_text(text[:len(text) // 2])
        message = f"{meta} cannot be read \\(JSONDecodeError: .*the store's metadata is damaged"
        with pytest.raises(ValueError, match=message):
            store.summary(tmp_path / "s.zarr")
        if damaged == "r1/probe/x":
            with pytest.raises(ValueError, match=message):
                store.read(root["r1"], "probe/x")
        meta.write_text(text)
    meta = tmp_path / "s.zarr" / "r1" / "probe" / "x" / "zarr.json"
    text = meta.read_text()
    meta.write_text(json.dumps({**json.loads(text), "shape": "4"}))  # JSON, but no array's metadata
    with pytest.raises(ValueError, match=f"{meta} cannot be read \\(ValueError: not a group's or an array's: "
                                         "node_type 'array', shape '4'\\): the store's metadata is damaged"):
        store.summary(tmp_path / "s.zarr")
    meta.write_text(text)
    np.testing.assert_array_equal(store.read(root["r1"], "probe/x"), [1.0])


@pytest.mark.parametrize("storage", ["float32", "float16", store.BF16])
def test_a_lost_chunk_file_reads_as_nan_not_zeros(tmp_path, storage):
    """A chunk file lost (a partial copy) read back as rows of zeros: different predictor scores, no sign of it."""
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    w = store.RunWriter(store.create_run(root, "r", {}), chunk=2)
    w.declare("x", (3,), storage=storage)
    w.declare("step", (), "int64")
    for i in range(6):
        w.append({"x": np.full(3, i + 1, np.float32), "step": i})
    w.close()
    (tmp_path / "s.zarr" / "r" / "x" / "c" / "1" / "0").unlink()  # rows 2 and 3
    (tmp_path / "s.zarr" / "r" / "step" / "c" / "1").unlink()
    x = store.read(root["r"], "x")
    assert np.isnan(x[2:4]).all() and x[[0, 1, 4, 5], 0].tolist() == [1, 2, 5, 6]
    assert store.read(root["r"], "step").tolist() == [0, 1, 0, 0, 4, 5]  # integers keep 0 (steps that do not increase)


def test_runs_are_listed_in_run_order_numbers_as_numbers(tmp_path):
    """Sorted as text, run-1000 came between run-100 and run-101 (in results.csv and `gradtrace info`)."""
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    for run_id in ("run-1000", "run-101", "run-100", "base-10", "base-2", "ref-000"):
        store.create_run(root, run_id, {})
    assert store.runs(root) == ["base-2", "base-10", "ref-000", "run-100", "run-101", "run-1000"]


def test_temporary_files_a_kill_left_are_removed_on_resume_and_not_warned_of(captured, tmp_path):
    """zarr writes each file beside its place (`*.partial`) and renames it there: a kill mid-write left the file for
    good, and every later listing of the store warned of it in zarr's words."""
    exp, cfg = captured
    import shutil
    import warnings

    copy = tmp_path / "copy.zarr"
    shutil.copytree(exp / "store.zarr", copy)
    leftovers = [copy / "r0" / "zarr.0a1b.partial", copy / "r0" / "grad" / "c" / "0" / "0.2c3d.partial",
                 copy / "r0" / "probe" / "zarr.4e5f.partial"]
    for path in leftovers:
        path.write_bytes(b"half a write")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.runs(store.open_experiment(copy)) == ["r0"]
        store.summary(copy)
    store.truncate_to(zarr.open_group(copy / "r0", mode="a"), cfg.train.steps)
    assert not any(path.exists() for path in leftovers) and not list(copy.rglob("*.partial"))


def test_a_run_folder_without_its_metadata_is_left_out_with_a_warning_that_says_so(captured, tmp_path):
    exp, cfg = captured
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(exp / "store.zarr", copy)
    (copy / "r0" / "zarr.json").unlink()
    with pytest.warns(UserWarning, match=r"copy.zarr/r0 is left out: it is no Zarr group or array \(a folder without "):
        assert store.runs(store.open_experiment(copy)) == []


def test_a_run_is_read_by_its_folders_path_and_the_store_given_for_a_run_is_refused_naming_its_runs(captured):
    """`store.read(path, name)` raised AttributeError ('str' object has no attribute 'name'); the store's root given
    for a run said "run '/' did not capture 'update'"."""
    from gradtrace import subspace

    exp, _ = captured
    root = store.open_experiment(exp / "store.zarr")
    folder = exp / "store.zarr" / "r0"
    np.testing.assert_array_equal(store.read(str(folder), "grad"), store.read(root["r0"], "grad"))
    np.testing.assert_array_equal(store.read_lazy(folder, "probe/grad").compute(), store.read(root["r0"], "probe/grad"))
    assert store.dataset(folder)["grad"].shape == root["r0"]["grad"].shape
    np.testing.assert_allclose(subspace.run_span(folder, "update", rank=2).singular_values,
                               subspace.run_span(root["r0"], "update", rank=2).singular_values)
    for given in (root, exp / "store.zarr", exp):
        with pytest.raises(ValueError, match=r"store.zarr is the experiment store, not one of its runs: .*runs: r0"):
            store.read(given, "grad")
    np.testing.assert_array_equal(store.read(root, "r0/probe/grad"), store.read(root["r0"], "probe/grad"))  # as before
    assert store.read_lazy(root, "r0/grad").shape == root["r0"]["grad"].shape
    with pytest.raises(ValueError, match=r"store.zarr/r0/probe lies inside the run .*/r0: .*'probe' or 'probe/…'"):
        store.read(folder / "probe", "grad")
    with pytest.raises(KeyError, match=r"holds no run 'r9'; its runs: r0"):
        subspace.run_span(exp / "store.zarr" / "r9")


def test_the_exports_helper_is_followed_and_what_a_library_prints_there_is_printed_here(capsys):
    """A line the helper did not write as its own (a library printing to stdout) stopped the export (JSONDecodeError,
    the helper killed)."""
    class Bar:  # what the export's progress bar is told
        total, n = None, 0

        def reset(self, total):
            self.total = total

        def update(self):
            self.n += 1

    lines = ["a library's notice\n", '{"runs": 2}\n', "42\n", '{"done": "r0"}\n', '{"done": "r1"}\n',
             '{"warnings": []}\n']
    bar = Bar()
    assert store._followed(iter(lines), bar) == {"warnings": []}
    assert (bar.total, bar.n) == (2, 2)
    assert capsys.readouterr().out == "a library's notice\n42\n"
    assert store._followed(iter(['{"runs": 2}\n']), Bar()) is None  # it ended before telling its outcome


def test_a_folder_without_metadata_is_warned_of_once_a_process(tmp_path):
    """Each listing of the store warned again (a sweep run again said it four times, `info` of a sweep twice):
    the listing's `catch_warnings` clears what Python's once-a-place filter remembers."""
    root = store.open_experiment(tmp_path / "store.zarr", mode="a")
    store.create_run(root, "r0", {})
    (tmp_path / "store.zarr" / "lost").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert list(store.run_groups(root)) == ["r0"]
    assert [str(w.message).split(" is left out")[0] for w in caught] == [str(tmp_path / "store.zarr" / "lost")]
