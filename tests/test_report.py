"""The HTML report: self-contained, every image a decodable PNG, sections present, tolerant of missing inputs,
and rendered by headless Chromium with every image loaded."""
from __future__ import annotations

import base64
import hashlib
import html
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

import gradtrace
from gradtrace import report, store
from test_figures import PNG_MAGIC, SPLITS, make_experiment

ARTIFACTS = Path(__file__).parent / "artifacts"  # git-ignored: the browser screenshot lands here
SECTION_IDS = [key for key, _ in report.SECTIONS]
FIGURES = ["accuracy_on_the_line", "partial_correlations", "predicted_vs_observed", "generalisation_gap",
           "training_curves", "span_energy", "dominant_bulk", "principal_angles", "benchmarks"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


class _Links(HTMLParser):
    """Every src/href attribute, the ids, and the tags of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.ids: set[str] = set()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href"):
                self.refs.append((tag, name, value or ""))
            if name == "id":
                self.ids.add(value or "")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    exp = make_experiment(tmp_path_factory.mktemp("exp"))
    path = report.write_report(exp)
    return path, path.read_text(encoding="utf-8")


def test_report_is_self_contained(written: tuple[Path, str]) -> None:
    path, page = written
    assert path == path.parent.parent / "report" / "index.html"
    links = _Links()
    links.feed(page)
    assert "link" not in links.tags and "iframe" not in links.tags
    for tag, name, value in links.refs:
        assert value.startswith("#") or value.startswith("data:"), f"external {name} on <{tag}>: {value[:80]}"
    images = [value for tag, name, value in links.refs if tag == "img"]
    assert len(images) == len(FIGURES)
    for uri in images:
        assert uri.startswith("data:image/png;base64,")
        data = base64.b64decode(uri.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_MAGIC)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    for key in SECTION_IDS:
        assert key in links.ids and f'href="#{key}"' in page  # each section and its table-of-contents entry
    assert {f"fig-{name}" for name in FIGURES} <= links.ids
    assert page.count("<figcaption>") == len(FIGURES)
    for name in FIGURES:
        for suffix in (".pdf", ".png"):
            assert (path.parent / "figures" / f"{name}{suffix}").stat().st_size > 0


def test_report_tables_config_and_provenance(written: tuple[Path, str]) -> None:
    _, page = written
    for text in ("Accuracy per split over 14 sweep runs", "Summary per residualisation", "All 9 rows of stats.csv",
                 "Predictor scores", "Per split (means over runs; band counts)", "sweep:\n  runs: 14",
                 f"<td class=\"mono\">{gradtrace.__version__}</td>", "code commit", "sha256 results.csv",
                 "sha256 store.zarr metadata", "CPU count", "source of stats",
                 "torch 2.13.0+cpu, transformers 5.24.0, AVX2 on 1 thread(s) (14 runs); not recorded (1 run)",
                 "14 sweep run(s), 1 reference run(s)", "N = 2000", "<h3>The splits</h3>",
                 "first operand one digit longer than the ID range"):
        assert text in page, text
    assert re.search(r"code commit</th><td class=\"mono\">([0-9a-f]{40}( \(modified\))?|unknown)</td>", page)


@pytest.mark.parametrize("waiting", [float("inf"), 0.0], ids=["one-folder-after-another", "on-threads"])
def test_the_store_digest_covers_every_zarr_json_as_a_plain_glob_finds_them(tmp_path: Path, monkeypatch,
                                                                            waiting: float) -> None:
    """Read one folder after another (a local disk) or, past the first, on threads (reads waiting as a network
    filesystem's do), the same files."""
    monkeypatch.setattr(store, "WAITING", waiting)
    monkeypatch.setattr(store, "SAMPLE", 1)
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    root.create_array("x", shape=(4, 3), chunks=(1, 3), dtype="f4")[:] = 1.0  # chunks in folders below the array
    root.create_group("c").create_group("deeper").create_array("y", shape=(2,), dtype="i4")[:] = 2  # a group as a
    root.create_group("run-000").attrs["status"] = "complete"  # chunk folder is named, and groups within groups
    (tmp_path / "s.zarr" / "lost").mkdir()  # no zarr.json, but one below it
    (tmp_path / "s.zarr" / "lost" / "zarr.json").write_text('{"node_type": "gro')  # cut by a kill
    (tmp_path / "s.zarr" / "lost" / "inner").mkdir()
    (tmp_path / "s.zarr" / "lost" / "inner" / "zarr.json").write_text('{"node_type": "group"}')
    files = sorted((tmp_path / "s.zarr").rglob("zarr.json"))
    expected = hashlib.sha256(b"".join(f.relative_to(tmp_path / "s.zarr").as_posix().encode() + b"\0" + f.read_bytes()
                                       for f in files)).hexdigest()
    assert len(files) == 8
    assert report.store_metadata_digest(tmp_path / "s.zarr") == (expected, 8)


def test_the_report_lists_the_stores_run_groups_once(tmp_path: Path, monkeypatch) -> None:
    """Four listings of the run groups took ~6.5 s of a 3,000-run study's 21 s report (each ~1.6 s)."""
    listed = []
    read_groups = store.run_groups
    monkeypatch.setattr(store, "run_groups", lambda root: listed.append(root) or read_groups(root))
    report.write_report(make_experiment(tmp_path / "exp"))
    assert len(listed) == 1


def test_the_report_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    """A laptop that only reads studies needs neither (torch alone cost the report a second and ~200 MB)."""
    exp = make_experiment(tmp_path / "exp", n_runs=6)
    code = ("import sys; from gradtrace import report; report.write_report(sys.argv[1]); "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code, str(exp)], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"
    assert f"<th>torch</th><td class=\"mono\">{importlib.metadata.version('torch')}</td>" in (
        exp / "report" / "index.html").read_text(encoding="utf-8")


def test_the_splits_table_describes_a_studys_own_splits_or_says_why_not(tmp_path: Path, split_registry) -> None:
    """The report named the shifts but said nothing of what each is, nor how much of the training mix it holds (a
    split's own share applied), built-in or a researcher's own."""
    from gradtrace.report import _section_tables, splits_table
    from gradtrace.tasks.shifts import REGISTRY

    (tmp_path / "mine.py").write_text(
        "from gradtrace.tasks import Problem, Split, register_split\n"
        "register_split(Split('double', 'a+a, 1-{d} digits', test=lambda r, d: Problem((int(r.integers(1, 9)),) * 2),"
        " train=lambda r, d: Problem((int(r.integers(1, 9)),) * 2), share=3.0))\n")
    task = {"shifts": ["double", "carry"], "modules": [str(tmp_path / "mine.py")], "max_digits": 4,
            "train_share": 0.02}
    table = splits_table(task)
    assert table.to_dict("list") == {"split": ["ID", "double", "carry"], "training mix": ["92.0%", "6.0%", "2.0%"],
                                     "description": [REGISTRY["ID"].describe(4), "a+a, 1-4 digits",
                                                                     REGISTRY["carry"].describe(4)]}
    inputs = types.SimpleNamespace(config={"task": {**task, "modules": [str(tmp_path / "gone.py")]}}, sweep=None,
                                   reliability=None)
    assert "The splits are not described here (ModuleNotThere: task.modules: no file" in "".join(
        _section_tables("results", inputs))


def test_provenance_holds_the_digest_of_each_file_of_task_modules(tmp_path: Path, monkeypatch) -> None:
    """The report named the versions and commit of gradtrace but not the code of a study's own splits: which file
    drew its items was nowhere in it."""
    (tmp_path / "mine.py").write_text("# a split file\n")
    (tmp_path / "needs_a_gpu").mkdir()
    (tmp_path / "needs_a_gpu" / "__init__.py").write_text("raise RuntimeError('no GPU driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"task": {"modules": [str(tmp_path / "mine.py"), str(tmp_path / "gone.py"), "json", "no_such_module",
                                   "needs_a_gpu.splits"]}}
    assert report.task_module_digests(config) == {
        f"sha256 task.modules {tmp_path / 'mine.py'}": hashlib.sha256(b"# a split file\n").hexdigest(),
        f"sha256 task.modules {tmp_path / 'gone.py'}": f"not read here (FileNotFoundError: [Errno 2] No such file or "
                                                        f"directory: '{tmp_path / 'gone.py'}')",
        "sha256 task.modules json": (hashlib.sha256(Path(json.__file__).read_bytes()).hexdigest()
                                     + f" ({json.__file__})"),
        "sha256 task.modules no_such_module": "not read here (ImportError: no module file for 'no_such_module' on "
                                              "this Python path)",
        "sha256 task.modules needs_a_gpu.splits": "not read here (RuntimeError: no GPU driver)"}  # the report stands
    assert report.task_module_digests({"task": {"modules": None}}) == report.task_module_digests({}) == {}


def test_header_counts_runs_by_role_and_the_probit_clip_takes_the_item_count() -> None:
    results = pd.DataFrame({"role": ["base", "reference", "sweep", "sweep"], "acc_ID": 0.5, "acc_x": 0.2})
    assert "2 sweep run(s), 1 reference run(s), 1 base run(s)" in report._header(report.Inputs(Path("x"), results))
    assert report.Inputs(Path("x"), config_text="task:\n  n_test: 200\n").n_items == 200
    assert report.Inputs(Path("x")).n_items == 2000  # no config: the default's
    for broken in ("model: [tiny\n  name: : x\n", "just a string\n", "task:\n  n_test:\n"):  # crashed the report
        assert report.Inputs(Path("x"), config_text=broken).n_items == 2000
        assert "gradtrace report" in report._header(report.Inputs(Path("x"), results, config_text=broken))


def test_results_summary() -> None:
    table = pd.DataFrame({"acc_ID": [0.5, 0.7], "acc_x": [0.1, 0.3], "lr": [1, 2]})
    summary = report.results_summary(table)
    assert summary["split"].tolist() == ["ID", "x"]
    np.testing.assert_allclose(summary["mean %"], [60.0, 20.0])
    np.testing.assert_allclose(summary["max %"], [70.0, 30.0])


def test_correlations_caption_says_when_they_are_within_base() -> None:
    one = pd.DataFrame({"base": ["base"] * 4, "acc_ID": [0.5, 0.6, 0.7, 0.8]})
    assert report._within_note(one) == "" and report._within_note(None) == ""
    two = one.assign(base=["base-0", "base-1"] * 2)
    assert "fine-tuned 2 base runs" in report._within_note(two)


def test_span_analysis(written: tuple[Path, str]) -> None:
    path, _ = written
    run = zarr.open_group(path.parent.parent / "store.zarr", mode="r")["ref-000"]
    a = report.span_analysis(run)
    assert a.splits == SPLITS and a.dominant.shape == (len(a.probe_steps), len(SPLITS))
    assert np.all((a.dominant >= 0) & (a.dominant <= 1))
    np.testing.assert_allclose(a.angles, a.angles.T, atol=1e-6)
    assert np.all(np.diag(a.angles) == 0) and np.all((a.angles >= 0) & (a.angles <= 90))
    assert np.sum(a.singular_values[:3] ** 2) / a.total_energy > 0.9  # the fixture's 3-dim dominant span


def test_report_notes_missing_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = make_experiment(tmp_path / "full", n_runs=6)
    exp = tmp_path / "partial"
    exp.mkdir()
    shutil.copy(full / "results.csv", exp / "results.csv")
    monkeypatch.setitem(sys.modules, "gradtrace.stats", None)  # the stages cannot be imported
    monkeypatch.setitem(sys.modules, "gradtrace.predict", None)
    page = report.write_report(exp, benchmarks_dir=tmp_path / "no-benchmarks").read_text()
    assert page.count("<img ") == 1  # only accuracy on the line can be drawn
    for text in ("gradtrace.stats is not available", "gradtrace.predict is not available",
                 "config.yaml not found", "is not a gradtrace store", "No benchmark outputs found"):
        assert text in page, text
    assert ("Generalisation gap: stats.csv / gap.csv missing or older than results.csv and gradtrace.stats is not "
            "available") in page


def test_report_computes_missing_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    full = make_experiment(tmp_path / "full", n_runs=6)
    exp = tmp_path / "partial"
    shutil.copytree(full, exp)
    (exp / "stats.csv").unlink()
    calls = []

    def stats_report(exp_dir: Path, out: Path) -> None:
        calls.append(Path(exp_dir))
        shutil.copy(full / "stats.csv", Path(out) / "stats.csv")

    monkeypatch.setitem(sys.modules, "gradtrace.stats", types.SimpleNamespace(stats_report=stats_report))
    assert report.load_inputs(exp, compute_missing=False).notes["stats"].startswith("stats.csv not found")
    assert calls == []
    inputs = report.load_inputs(exp)
    assert calls == [exp] and inputs.stats is not None and "stats" not in inputs.notes
    assert f"stats.csv / gap.csv missing or older than results.csv: running `gradtrace stats {exp}`" in (
        capsys.readouterr().err)  # a minute's silence on a large study otherwise
    assert inputs.origins["stats"].startswith("computed for this report by gradtrace.stats.stats_report")
    assert inputs.origins["results"] == "read results.csv"
    later = (exp / "stats.csv").stat().st_mtime + 10
    os.utime(exp / "results.csv", (later, later))  # the sweep extended since stats ran
    report.load_inputs(exp)
    assert calls == [exp, exp]  # computed again, not shown stale


def test_tables_of_another_results_csv_are_computed_again_whatever_their_times(tmp_path: Path, capsys) -> None:
    """A study copied without -p (`cp -r`, `scp -r`) has new modification times in the order of the copy: stats.csv
    computed before the sweep was extended passed as fresh where it was copied after results.csv."""
    exp = make_experiment(tmp_path / "exp", n_runs=12)
    (exp / "stats.csv").unlink()
    report.load_inputs(exp)
    stamp = json.loads((exp / "stats.json").read_text(encoding="utf-8"))["summary"]["results_sha256"]
    assert stamp == hashlib.sha256((exp / "results.csv").read_bytes()).hexdigest()
    computed = (exp / "stats.csv").read_bytes()
    results = pd.read_csv(exp / "results.csv")
    results["acc_length"] = results["acc_length"].sample(frac=1, random_state=0).to_numpy()  # the sweep extended
    results.to_csv(exp / "results.csv", index=False)
    later = (exp / "results.csv").stat().st_mtime + 10
    for name in ("stats.csv", "stats.json", "gap.csv", "reliability.csv"):  # copied after results.csv
        if (exp / name).exists():
            os.utime(exp / name, (later, later))
    capsys.readouterr()
    inputs = report.load_inputs(exp)
    assert "stats.csv / gap.csv computed from another results.csv (by the sha256 stats.json records)" in (
        capsys.readouterr().err)
    assert (exp / "stats.csv").read_bytes() != computed and inputs.origins["stats"].startswith("computed for this")
    os.utime(exp / "results.csv", (later + 10, later + 10))  # rewritten as it was (a finished sweep run again)
    inputs = report.load_inputs(exp)
    assert inputs.origins["stats"] == "read stats.csv" and "stats.csv" not in capsys.readouterr().err


def test_load_inputs_rejects_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make demo"):
        report.load_inputs(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="holds no experiment"):  # a typo'd path to an existing folder
        report.load_inputs(tmp_path)


def _chromium() -> str:
    """Debian's chromium, installed with apt-get when missing and running as root; otherwise skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("headless Chromium is not installed and cannot be installed here (needs root and apt-get): "
                    "`apt-get install chromium` to run the browser test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:  # stale or absent package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    found = shutil.which("chromium")
    if done.returncode != 0 or found is None:
        pytest.skip(f"`apt-get install chromium` failed (offline?): {done.stderr.strip()[-300:]}")
    return found


def test_report_renders_in_chromium(written: tuple[Path, str], tmp_path: Path) -> None:
    chromium = _chromium()
    _, page = written
    marker = ("<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
              "const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length; "
              "document.body.setAttribute('data-images', ok + '/' + imgs.length); });</script>")
    probe = tmp_path / "probe.html"  # a test-only copy of the page with the marker script
    probe.write_text(page.replace("</body>", marker + "</body>"), encoding="utf-8")
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert found, "the page's load handler did not run"
    assert found.group(1) == found.group(2) == str(len(FIGURES)), f"images loaded: {found.group(0)}"

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    done = subprocess.run([*base, "--window-size=1100,6000", f"--screenshot={shot}", written[0].as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.read_bytes().startswith(PNG_MAGIC), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1100, 6000) and len(im.convert("L").getcolors(1 << 16) or []) > 10  # not blank


def _paper_build():
    """paper/build.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("paper_build", Path(__file__).parents[1] / "paper" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_build(written: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    build = _paper_build()
    exp = written[0].parent.parent
    assert build.main(["--store", str(exp), "--out", str(tmp_path)]) == 0
    paper = (tmp_path / "build" / "paper.md").read_text()
    assert "{{" not in paper and "}}" not in paper
    assert re.search(r"partial r = −?\d\.\d\d\[\^stats\]", paper)
    assert "Spearman ρ = −0.50[^scores]" in paper and "[^stats]: `stats.csv` of store" in paper
    assert "![Figure 1. Accuracy on the line](../figures/accuracy_on_the_line.png)" in paper
    assert "**[missing: config.yaml has no 'task.n_test']**" in paper  # the fixture's config omits it
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} == {f"{name}.png" for name in FIGURES}
    monkeypatch.setattr(build.figures, "save", lambda fig, path: None)  # figures were checked above
    assert build.main(["--store", str(exp), "--out", str(tmp_path / "strict"), "--strict"]) == 1
    assert build.main(["--store", str(tmp_path / "absent")]) == 2
    assert "make demo" in capsys.readouterr().err


def test_a_paper_of_a_study_analysed_elsewhere_reads_the_tables_there(written: tuple[Path, str], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A study one cannot write to is analysed with --out DIR: the paper takes its numbers from DIR (--analysis),
    and its footnotes hash the tables there and give the command that wrote them."""
    build = _paper_build()
    exp, mine = tmp_path / "study", tmp_path / "mine"
    shutil.copytree(written[0].parent.parent, exp, ignore=shutil.ignore_patterns("report"))
    mine.mkdir()
    for name in report.ANALYSIS_FILES:  # as `gradtrace stats/predict --out mine` left them
        if (exp / name).exists():
            shutil.move(exp / name, mine / name)
    monkeypatch.setattr(build.figures, "save", lambda fig, path: None)
    assert build.main(["--store", str(exp), "--analysis", str(mine), "--out", str(tmp_path / "paper")]) == 0
    paper = (tmp_path / "paper" / "build" / "paper.md").read_text()
    assert all(why.startswith("config.yaml has no") for why in re.findall(r"\*\*\[missing: ([^]]*)\]", paper))
    assert "[^scores]" in paper and "[^stats]" in paper  # numbers of both tables, read in mine/
    digest = hashlib.sha256((mine / "stats.csv").read_bytes()).hexdigest()[:12]
    assert f"[^stats]: `stats.csv` of store `{exp}` (sha256 {digest}…), written by `gradtrace stats {exp} --out " \
           f"{mine}`." in paper
    assert not (exp / "stats.csv").exists()


def test_paper_counts_runs_by_role_and_only_the_shifts_stats_correlates(written: tuple[Path, str], tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    build = _paper_build()
    exp = tmp_path / "exp"
    shutil.copytree(written[0].parent.parent, exp, ignore=shutil.ignore_patterns("report"))
    results = pd.read_csv(exp / "results.csv")
    results.loc[results["role"] == "sweep", "acc_zeropad"] = 0.5  # the same in every run: stats leaves it out
    base = store.create_run(zarr.open_group(exp / "store.zarr", mode="a"), "base", {"role": "base"})
    store.set_status(base, "complete", accuracy={"ID": 0.5})
    pd.concat([results.iloc[:1].assign(run_id="base", role="base"), results]).to_csv(exp / "results.csv", index=False)
    later = (exp / "results.csv").stat().st_mtime + 1
    for name in ("stats.csv", "stats.json", "gap.csv", "reliability.csv", "predictions.csv", "predict_scores.csv"):
        if (exp / name).exists():
            os.utime(exp / name, (later, later))  # newer than results.csv: the report does not recompute them
    monkeypatch.setattr(build.figures, "save", lambda fig, path: None)
    assert build.main(["--store", str(exp), "--out", str(tmp_path / "out")]) == 0
    paper = (tmp_path / "out" / "build" / "paper.md").read_text()
    sweep = int((results["role"] == "sweep").sum())
    assert f"{sweep}[^count] sweep runs and 1[^count] reference run(s)" in paper  # the base row is neither
    assert "the 2[^count] whose accuracy varied across runs give 1[^count] shift pairs" in paper


def test_the_paper_says_what_the_runs_fine_tuned() -> None:
    """The default fine-tunes its shipped base: the paper said "from 1 base run(s) of 0 steps"."""
    start = _paper_build()._start
    shipped = {"model": {"init_from": "/x/gradtrace/experiments/default_base.safetensors"},
               "sweep": {"pretrain_steps": 0, "bases": 1}}
    assert start(shipped) == "the weights in `default_base.safetensors`"
    assert start({"model": {"init_from": None}, "sweep": {"pretrain_steps": 800, "bases": 4}}) == \
        "4 base run(s) of 800 steps trained by the study from a random init"
    assert start({"model": {}, "sweep": {"pretrain_steps": 0}}) == "a random init (no base)"


def test_a_strict_paper_fails_on_braces_no_placeholder_reads_and_on_a_nan(written: tuple[Path, str], tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """`{{count}}` or a stray `}}` was copied into the paper, and a std over one run printed as "NaN%", both
    passing --strict."""
    build = _paper_build()
    monkeypatch.setattr(build.figures, "save", lambda fig, path: None)
    exp = tmp_path / "exp"
    shutil.copytree(written[0].parent.parent, exp, ignore=shutil.ignore_patterns("report"))
    (tmp_path / "braces.md").write_text("{{count:runs}} runs, {{count}} and {{ count : runs }}}\n")
    assert build.main(["--store", str(exp), "--out", str(tmp_path / "a"), "--template", str(tmp_path / "braces.md"),
                       "--strict"]) == 1
    assert "braces no placeholder reads" in capsys.readouterr().err
    results = pd.read_csv(exp / "results.csv")
    one_sweep_run = pd.concat([results[results["role"] != "sweep"], results[results["role"] == "sweep"].head(1)])
    one_sweep_run.to_csv(exp / "results.csv", index=False)
    (tmp_path / "nan.md").write_text("ID {{results:ID:mean}} ± {{results:ID:std}}\n")
    assert build.main(["--store", str(exp), "--out", str(tmp_path / "b"), "--template", str(tmp_path / "nan.md"),
                       "--strict"]) == 1
    assert "**[missing: the std of acc_ID over 1 sweep run(s) is NaN]**" in (tmp_path / "b/build/paper.md").read_text()


def test_the_training_curves_caption_names_what_the_figure_draws(tmp_path: Path) -> None:
    run = zarr.open_group(tmp_path / "s.zarr", mode="w").create_group("r")
    run["step"], run["loss"], run["grad_norm"] = np.arange(20), np.linspace(2.0, 1.0, 20), np.ones(20)
    caption = report._training_caption(run)
    assert "the gradient norm after clipping over optimizer steps." in caption and "below" not in caption
    run["grad_norm_unclipped"] = np.linspace(3.0, 1.5, 20)  # drawn instead, with the clip threshold
    probe = run.create_group("probe")
    probe["step"], probe["accuracy"] = np.arange(2), np.zeros((2, 1))
    caption = report._training_caption(run)
    assert "before clipping over" in caption and "after clipping" not in caption  # a run of your own loop: no clip
    assert "on the fixed probe batches." in caption and "evaluation checkpoints" not in caption  # no evals/
    run.update_attributes({"config": {"train": {"clip": 1.0}}})  # gradtrace's runs: the dashed threshold is drawn
    assert "before clipping (dashed: the clip threshold)" in report._training_caption(run)


def test_no_reference_run_to_draw_names_those_not_complete(tmp_path: Path) -> None:
    root = store.open_experiment(tmp_path / "store.zarr", mode="a")
    for rid, status in (("mine", "failed"), ("other", "complete")):
        group = store.create_run(root, rid, {"role": "reference" if rid == "mine" else "sweep"})
        group["update"] = np.zeros((2, 3), np.float32)
        store.set_status(group, status)
    with pytest.raises(LookupError, match=r"reference runs \['mine'\] are not complete"):
        report._reference_run(report.Inputs(tmp_path))



def test_the_reference_run_drawn_is_one_with_probes_where_any_has_them(tmp_path: Path) -> None:
    """Every run `attach` records is a reference run: the report drew the first, one recorded without probes (no
    dominant/bulk or principal-angle figure), while predict read those with probes."""
    root = store.open_experiment(tmp_path / "store.zarr", mode="a")
    for rid in ("a-without", "b-with"):
        group = store.create_run(root, rid, {"role": "reference"})
        group["update"] = np.zeros((2, 3), np.float32)
        if rid == "b-with":
            group["probe/grad"] = np.zeros((2, 1, 1, 3), np.float32)
        store.set_status(group, "complete")
    assert report._reference_run(report.Inputs(tmp_path)).basename == "b-with"
    del root["b-with"]
    assert report._reference_run(report.Inputs(tmp_path)).basename == "a-without"  # none with probes: any


def test_a_directory_of_runs_trained_outside_a_sweep_is_reported_without_asking_for_a_sweep_there(tmp_path: Path
                                                                                                 ) -> None:
    """A report of `gradtrace train`'s directory (the tour's `storage/one`) asked for `gradtrace sweep CONFIG --out` and
    `gradtrace stats` there, both of which refuse such a directory; one of a sweep that had finished no run yet, for
    the sweep running there."""
    root = store.open_experiment(tmp_path / "store.zarr", mode="a")
    group = store.create_run(root, "run", {"role": "reference"})
    group["update"] = np.zeros((2, 3), np.float32)
    store.set_status(group, "complete")
    inputs = report.load_inputs(tmp_path, compute_missing=False)
    assert inputs.results is None and inputs.notes["results"].startswith("no results across runs: ")
    assert "(no plan.json)" in inputs.notes["results"] and "a results.csv of your own" in inputs.notes["results"]
    assert inputs.stats is None and inputs.notes["stats"] == "not shown: no results across runs (above)."
    assert "gradtrace sweep CONFIG --out" not in inputs.notes["stats"]
    (tmp_path / "plan.json").write_text("[]")  # a sweep's, before its first run ends
    inputs = report.load_inputs(tmp_path, compute_missing=False)
    assert "the sweep planned there has finished no run yet" in inputs.notes["results"]
    assert inputs.notes["predictions"] == "not shown: no results across runs (above)."


def test_the_header_says_whose_runs_it_reports(tmp_path: Path) -> None:
    """A directory of runs of your own (no config.yaml) was described as fine-tuning runs on gradtrace's task."""
    ours = report._header(report.Inputs(tmp_path, config_text="task:\n  n_test: 2000\n"))
    theirs = report._header(report.Inputs(tmp_path))
    assert "synthetic arithmetic task" in ours and "synthetic arithmetic" not in theirs and "training runs" in theirs


def test_a_study_whose_predictors_read_its_base_run_draws_the_base_runs_dynamics(written: tuple[Path, str],
                                                                                 tmp_path: Path) -> None:
    """With `predict.reference_role: base` (frontier.yaml) the report looked for a reference run only: every training
    and span figure was missing, its note asking for reference runs the study does not have by design."""
    exp = tmp_path / "exp"
    shutil.copytree(written[0].parent.parent, exp, ignore=shutil.ignore_patterns("report"))
    root = zarr.open_group(exp / "store.zarr", mode="a")
    root["ref-000"].attrs["role"] = "base"  # the captured run is the study's base
    (exp / "config.yaml").write_text((exp / "config.yaml").read_text() + "predict:\n  reference_role: base\n")
    inputs = report.load_inputs(exp, compute_missing=False)
    assert inputs.reference is not None and inputs.reference.basename == "ref-000" and "reference" not in inputs.notes
    (exp / "config.yaml").write_text((exp / "config.yaml").read_text().replace("role: base", "role: reference"))
    assert report.load_inputs(exp, compute_missing=False).notes["reference"].startswith("no complete reference run")
    root["ref-000"].attrs["role"] = "reference"
    (exp / "config.yaml").write_text((exp / "config.yaml").read_text().replace("role: reference", "role: base"))
    assert ("the study's predict.reference_role is 'base': its base run must be captured" in
            report.load_inputs(exp, compute_missing=False).notes["reference"])


def test_a_failed_stats_stage_leaves_no_stale_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = make_experiment(tmp_path / "exp", n_runs=6)
    later = max(p.stat().st_mtime for p in exp.iterdir()) + 10
    os.utime(exp / "results.csv", (later, later))  # newer than everything stats wrote

    def failing(exp_dir: Path, out: Path) -> None:
        raise ValueError("a blank accuracy")

    monkeypatch.setitem(sys.modules, "gradtrace.stats", types.SimpleNamespace(stats_report=failing))
    monkeypatch.setitem(sys.modules, "gradtrace.predict", None)
    inputs = report.load_inputs(exp)
    assert inputs.stats is None and inputs.gap is None and inputs.reliability is None
    assert "failed: ValueError: a blank accuracy" in inputs.notes["reliability"]
    page = report.write_report(exp, benchmarks_dir=tmp_path / "none").read_text()
    assert "Summary per residualisation" not in page and "Per split (means over runs" not in page


def test_a_sweep_of_one_shift_still_has_its_gap(tmp_path: Path) -> None:
    """The pair statistics need two shifts; the generalisation gap does not (it was lost with them)."""
    exp = make_experiment(tmp_path / "exp", n_runs=12)
    results = pd.read_csv(exp / "results.csv")
    results.drop(columns=[c for c in results if c.endswith(("_carry", "_zeropad"))]).to_csv(exp / "results.csv",
                                                                                          index=False)
    for name in ("stats.csv", "gap.csv"):
        (exp / name).unlink()
    inputs = report.load_inputs(exp)
    assert "need at least two shifts" in inputs.notes["stats"] and "gap" not in inputs.notes
    assert set(inputs.gap["split"]) == {"ID", "length"}


def test_gap_table_gives_its_units_and_leaves_out_seed_columns_no_run_shares() -> None:
    gap = pd.DataFrame({"run_id": ["a", "b"], "split": "ID", "test_acc": [0.8, 0.9], "train_acc": [0.85, 0.9],
                        "gap_pts": [5.0, 0.0], "band": ["watch", "healthy"], "seed_sd_pts": np.nan, "n_seeds": 1})
    table = report._gap_summary(gap)
    assert list(table.columns[:4]) == ["split", "mean test %", "mean train %", "mean train − test (points)"]
    assert table[["mean test %", "mean train %", "mean train − test (points)"]].iloc[0].tolist() == [85.0, 87.5, 2.5]
    assert {"healthy", "watch"} <= set(table.columns) and not any("seed" in c for c in table.columns)


def test_correlations_caption_names_the_panels_drawn() -> None:
    probit = pd.DataFrame({"a": ["x"], "b": ["y"], "residualize": ["probit"], "r": [0.3]})
    one = report._correlations_caption(report.Inputs(Path("x"), stats=probit))
    assert "ID accuracy removed by a line on probit axes." in one and "panel per way" not in one
    three = pd.concat([probit.assign(residualize=w) for w in ("linear", "probit", "spline")])
    assert "one panel per way of removing ID accuracy" in report._correlations_caption(
        report.Inputs(Path("x"), stats=three))


def test_header_gives_the_base_runs_own_steps() -> None:
    results = pd.DataFrame({"role": ["base", "sweep", "sweep"], "acc_ID": [0.7, 0.8, 0.9]})
    config = "train:\n  steps: 150\nsweep:\n  pretrain_steps: 800\n"
    assert "150 optimizer steps per run (base runs: 800)" in report._header(
        report.Inputs(Path("x"), results, config_text=config))


def test_the_code_commit_says_when_the_package_was_modified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "repo" / "gradtrace"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", "-C", str(tmp_path / "repo"), *args], check=True, capture_output=True)
    monkeypatch.setattr(gradtrace, "__file__", str(package / "__init__.py"))
    clean = report._git_commit()
    assert len(clean) == 40
    (package / "__init__.py").write_text("x = 2\n")
    assert report._git_commit() == clean + " (modified)"


def test_an_installed_package_inside_another_git_repository_gives_no_commit(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """gradtrace installed into a venv inside a project of one's own gave that project's commit as its code's."""
    package = tmp_path / "project" / ".venv" / "lib" / "site-packages" / "gradtrace"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    (tmp_path / "project" / ".gitignore").write_text(".venv/\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", "-C", str(tmp_path / "project"), *args], check=True, capture_output=True)
    monkeypatch.setattr(gradtrace, "__file__", str(package / "__init__.py"))
    assert report._git_commit() == "unknown"


def test_an_unfinished_sweep_is_said_in_the_report_and_fails_a_strict_paper(written: tuple[Path, str], tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep with failed or unfinished runs gave a report and a paper of its complete runs, saying nothing."""
    exp = tmp_path / "exp"
    shutil.copytree(written[0].parent.parent, exp, ignore=shutil.ignore_patterns("report"))
    assert "unfinished" not in report.load_inputs(exp, compute_missing=False).notes  # every run it plans complete
    store.set_status(zarr.open_group(exp / "store.zarr", mode="a")["run-001"], "failed", error="MemoryError")
    plan = [{"run_id": rid, "role": role, "overrides": {}}
            for rid, role in (("ref-000", "reference"), *((f"run-0{i}", "sweep") for i in ("00", "01", "14")))]
    (exp / "plan.json").write_text(json.dumps(plan))
    note = ("The sweep is not finished: of its planned runs, 1 failed (run-001), 1 not started (run-014); every table "
            "and figure here covers the complete runs in results.csv only.")
    assert report.load_inputs(exp, compute_missing=False).notes["unfinished"] == note
    assert html.escape(note) in report.write_report(exp).read_text(encoding="utf-8")
    build = _paper_build()
    monkeypatch.setattr(build.figures, "save", lambda fig, path: None)
    assert build.main(["--store", str(exp), "--out", str(tmp_path / "out")]) == 0
    assert f"warning: {note}" in capsys.readouterr().err
    assert build.main(["--store", str(exp), "--out", str(tmp_path / "strict"), "--strict"]) == 1
    # a failed reference run, and a complete run results.csv lacks (a kill before the sweep rewrote it): said too
    store.set_status(zarr.open_group(exp / "store.zarr", mode="a")["ref-000"], "failed", error="MemoryError")
    results = pd.read_csv(exp / "results.csv")
    results[results["run_id"] != "run-000"].to_csv(exp / "results.csv", index=False)
    assert report.load_inputs(exp, compute_missing=False).notes["unfinished"].startswith(
        "The sweep is not finished: of its planned runs, 2 failed (ref-000, run-001), 1 not started (run-014), 1 "
        "complete but not yet in results.csv (run-000; the sweep run again lists them);")


def test_runs_that_diverged_are_said_in_the_report_and_the_paper(written: tuple[Path, str], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run its learning rate blew up is complete at 0%: the figures plotted it among the others, saying nothing."""
    exp = tmp_path / "exp"
    shutil.copytree(written[0].parent.parent, exp, ignore=shutil.ignore_patterns("report"))
    assert "diverged" not in report.load_inputs(exp, compute_missing=False).notes
    zarr.open_group(exp / "store.zarr", mode="a")["run-003"].update_attributes({"nonfinite_steps": 2})
    note = report.load_inputs(exp, compute_missing=False).notes["diverged"]
    assert note.startswith("1 of 15 run(s) diverged (run-003; lr 0.00171): NaN")
    assert note.endswith("train.clip) for a study.")
    assert html.escape(note) in report.write_report(exp).read_text(encoding="utf-8")
    build = _paper_build()
    monkeypatch.setattr(build.figures, "save", lambda fig, path: None)
    assert build.main(["--store", str(exp), "--out", str(tmp_path / "out")]) == 0
    assert f"warning: {note}" in capsys.readouterr().err


def test_numbers_round_halves_up_as_a_reader_rounds_the_csv() -> None:
    """format() rounded exact binary halves to even: an accuracy of 125 of 2000 items (6.25%) printed as 6.2%."""
    assert [report.rounded(v, d) for v, d in ((6.25, 1), (0.125, 2), (-0.125, 2), (0.1235, 3), (2.0, 1))] == \
        ["6.3", "0.13", "-0.13", "0.124", "2.0"]
    assert "<td>0.063</td>" in report._table(pd.DataFrame({"acc": [0.0625], "p": [0.0625]}))
    nullable = pd.DataFrame({"acc": pd.array([0.5, None], dtype="Float64"), "runs": pd.array([3, None], dtype="Int64"),
                             "split": pd.array(["ID", None], dtype="string"), "r": [0.25, np.nan]})
    cells = re.findall(r"<td>(.*?)</td>", report._table(nullable))
    assert cells == ["0.500", "3", "ID", "0.250", "–", "–", "–", "–"]  # `<NA>` before, in nullable columns
    assert re.findall(r"<td>(.*?)</td>", report._table(pd.DataFrame({0: pd.array([0.5, None], dtype="Float64")}))) \
        == ["0.500", "–"]  # a column not named by a string
    build = _paper_build()
    assert build._fmt(0.125, "r") == "0.13" and build._fmt(-0.125, "r") == "−0.13"


def test_a_paper_without_a_reference_run_says_why_its_training_figure_is_missing(
        written: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a complete reference run the report drew no training curves, and the paper's placeholder for them
    raised "unknown figure" instead of writing why it is missing."""
    exp = tmp_path / "exp"
    shutil.copytree(written[0].parent.parent, exp, ignore=shutil.ignore_patterns("report"))
    store.set_status(zarr.open_group(exp / "store.zarr", mode="a")["ref-000"], "running")  # stopped mid-way
    build = _paper_build()
    monkeypatch.setattr(build.figures, "save", lambda fig, path: None)
    assert build.main(["--store", str(exp), "--out", str(tmp_path / "out")]) == 0
    paper = (tmp_path / "out" / "build" / "paper.md").read_text()
    assert "**[missing: figure training_curves: no complete reference run" in paper


def test_paper_numbers_never_print_minus_zero_and_an_infinity_is_missing() -> None:
    build = _paper_build()
    assert [build._fmt(-0.001, "r"), build._fmt(-0.25, "r"), build._fmt(0.0042, "p")] == ["0.00", "−0.25", "0.0042"]
    with pytest.raises(build.Missing, match="r is inf"):  # decimal.InvalidOperation crashed the build
        build._fmt(float("inf"), "r")


def test_the_provenance_of_a_damaged_store_says_so(tmp_path):
    """A truncated root zarr.json gave the report only the JSON parser's message (info and stats said what it was)."""
    store.open_experiment(tmp_path / "store.zarr", mode="a")
    meta = tmp_path / "store.zarr" / "zarr.json"
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(ValueError, match="could not be opened as a Zarr v3 group .*truncated or corrupt"):
        report.provenance(report.Inputs(tmp_path))


@pytest.mark.parametrize("damage", ["no role", "runs the store lacks"])
def test_a_results_table_the_analyses_refuse_is_noted_not_drawn(written: tuple[Path, str], tmp_path: Path,
                                                                damage: str) -> None:
    """The report read results.csv itself: without role it drew the reference runs among the sweep's, and it drew
    rows of runs its store lacks, beside statistics of the store's own (stats refuses both tables)."""
    exp = tmp_path / "exp"
    shutil.copytree(written[0].parent.parent, exp, ignore=shutil.ignore_patterns("report"))
    results = pd.read_csv(exp / "results.csv")
    bad = results.drop(columns="role") if damage == "no role" else results.assign(run_id=results.run_id + "x")
    bad.to_csv(exp / "results.csv", index=False)
    inputs = report.load_inputs(exp, compute_missing=False)
    assert inputs.results is None and inputs.notes["results"].startswith("results.csv cannot be used: ")
    assert ("has no role column" if damage == "no role" else "that store.zarr does not hold") in inputs.notes["results"]
    assert inputs.stats is None and inputs.notes["stats"] == "not shown: results.csv cannot be used (above)."
    page = report.write_report(exp).read_text(encoding="utf-8")
    assert "results.csv cannot be used" in page and "<img " in page  # the spans of the store's reference still drawn


def test_the_reports_header_says_which_weights_the_runs_started_from(tmp_path: Path) -> None:
    """The default fine-tunes a shipped base: the header said only "model: tiny"."""
    config = {"task": {}, "model": {"name": "tiny", "init_from": "/x/experiments/default_base.safetensors"},
              "train": {"steps": 150}, "sweep": {"pretrain_steps": 0}}
    inputs = types.SimpleNamespace(results=None, config=config, exp_dir=tmp_path)
    assert "model: tiny, from the weights in default_base.safetensors; 150 optimizer steps per run<" in \
        report._header(inputs)
    inputs.config = {**config, "model": {"name": "tiny", "init_from": None}}
    assert "model: tiny; 150" in report._header(inputs)
