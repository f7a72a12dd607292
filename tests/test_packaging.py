"""gradtrace installed from its wheel, outside the checkout: what it reads at run time ships with it, the sdist holds
what its tests need, and every package it imports is a declared dependency."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import gradtrace
from gradtrace import config

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHIPPED = sorted(p.name for p in (ROOT / "experiments").glob("*.*") if p.suffix in (".yaml", ".safetensors"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[list[str], list[str], str]:
    """The file lists of the wheel and the sdist built from a copy of the source tree (setuptools, no isolation), and
    what the build printed to stderr."""
    pytest.importorskip("setuptools", minversion="77")
    tmp = tmp_path_factory.mktemp("build")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "storage", "artifacts", "build",
                                                                "*.egg-info", "__pycache__", ".pytest_cache"))
    (source / "storage").mkdir()
    shutil.copy(ROOT / "storage" / "README.md", source / "storage" / "README.md")
    log = ""
    for hook in ("build_sdist", "build_wheel"):  # one process each: setuptools keeps state between the two
        done = subprocess.run([sys.executable, "-c", f"import sys, setuptools.build_meta as b; b.{hook}(sys.argv[1])",
                               str(tmp / "dist")], cwd=source, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        log += done.stderr
    (wheel,), (sdist,) = (tmp / "dist").glob("*.whl"), (tmp / "dist").glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as whl, tarfile.open(sdist) as tar:
        return whl.namelist(), [name.split("/", 1)[1] for name in tar.getnames() if "/" in name], log


@pytest.mark.slow
def test_the_wheel_ships_every_experiment_config_and_no_tests(built) -> None:
    """The wheel held only the Python modules: `gradtrace sweep experiments/default.yaml`, the README's first
    command, had no config to read outside a checkout."""
    wheel, _, _ = built
    assert {f"gradtrace/experiments/{name}" for name in SHIPPED} | {"gradtrace/experiments/README.md"} <= set(wheel)
    assert not [name for name in wheel if name.startswith(("tests/", "storage/", "benchmarks/", "paper/"))
                or "__pycache__" in name]
    metadata = next(name for name in wheel if name.endswith(".dist-info/METADATA"))
    assert metadata == f"gradtrace-{gradtrace.__version__}.dist-info/METADATA"
    assert f"gradtrace-{gradtrace.__version__}.dist-info/licenses/LICENSE" in wheel  # MIT's text goes with copies


@pytest.mark.slow
def test_the_sdist_holds_what_its_tests_read(built) -> None:
    """The sdist held the test files but not conftest.py, the experiment configs, the paper or storage/README.md,
    so its test suite could not run."""
    _, sdist, _ = built
    needed = ["LICENSE", "tests/conftest.py", "Makefile", "storage/README.md", "paper/build.py", "paper/paper.md",
              "paper/Makefile", "experiments/README.md", *(f"experiments/{name}" for name in SHIPPED)]
    assert not [name for name in needed if name not in sdist]
    assert not [name for name in sdist if "__pycache__" in name or name.startswith(("storage/default", ".venv"))]


@pytest.mark.slow
def test_the_build_uses_nothing_setuptools_deprecates(built) -> None:
    """`license = { text = "MIT" }`, a TOML table, is deprecated: setuptools refuses it from 2027-02-18."""
    assert "deprecated" not in built[2].lower(), built[2]


@pytest.mark.parametrize("name", ["default", "default.yaml", "experiments/default.yaml", "./experiments/large.yaml"])
def test_a_shipped_config_is_found_by_name_outside_the_checkout(name: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stem = Path(name).stem
    assert config.load(name) == config.load(ROOT / "experiments" / f"{stem}.yaml")
    assert config.shipped_configs()[stem].read_bytes() == (ROOT / "experiments" / f"{stem}.yaml").read_bytes()


@pytest.mark.parametrize("name", ["default_base.safetensors", "experiments/default_base.safetensors"])
def test_the_defaults_shipped_base_is_found_outside_the_checkout(name: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The default fine-tunes weights gradtrace ships: named relative to the checkout's root, they are found from
    any directory, as the configs are, and made absolute in the study's config.yaml."""
    monkeypatch.chdir(tmp_path)
    shipped = config.shipped_weights()["default_base.safetensors"]
    assert shipped.read_bytes() == (ROOT / "experiments" / "default_base.safetensors").read_bytes()
    assert config.load("default").model.init_from == str(shipped)
    assert config.load(None, {"model.init_from": name}).model.init_from == str(shipped)
    assert config.load("default", {"model.init_from": None}).model.init_from is None  # a random init instead
    mine = config.load(None, {"model.init_from": "mine.safetensors"}).model.init_from
    assert mine == str(tmp_path / "mine.safetensors")  # a name gradtrace does not ship: the path as given


def test_a_file_of_ones_own_comes_before_shipped_weights_of_its_name(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "default_base.safetensors").write_bytes(b"mine")
    assert config.load("default").model.init_from == str(tmp_path / "experiments" / "default_base.safetensors")


def test_a_file_of_ones_own_comes_before_a_shipped_config_of_its_name(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "default.yaml").write_text("train:\n  steps: 7\n")
    assert config.load("experiments/default.yaml").train.steps == 7


def test_a_config_not_found_names_the_shipped_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config experiments/defualt.yaml not found.*default, frontier, "
                                                r"large, scratch, seed_recipe"):
        config.load("experiments/defualt.yaml")
    with pytest.raises(FileNotFoundError, match="mine/default.yaml not found"):
        config.load("mine/default.yaml")  # a path into a folder of one's own is never taken for a shipped config


def test_python_dash_m_gradtrace_runs_the_command_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gradtrace", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert (done.returncode, done.stdout.strip()) == (0, f"gradtrace {gradtrace.__version__}"), done.stderr


def _imported_packages() -> set[str]:
    """The top-level names gradtrace's modules import, the standard library and gradtrace itself left out."""
    names = set()
    for path in (ROOT / "gradtrace").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"gradtrace"}


def test_every_package_gradtrace_imports_is_a_declared_dependency() -> None:
    """figures.py imported `cycler`, which only matplotlib asked for."""
    declared = {re.match(r"[A-Za-z0-9_.\-]+", req).group().lower().replace("_", "-")
                for req in PYPROJECT["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {name: distributions.get(name) for name in _imported_packages()
                  if not {d.lower().replace("_", "-") for d in distributions.get(name, [name])} & declared}
    assert not undeclared


def test_pyproject_lists_every_package() -> None:
    """pyproject.toml lists the packages by hand (the experiment configs are mapped into one): a new subpackage
    must join the list or the wheel leaves it out."""
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gradtrace").rglob("__init__.py")}
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == on_disk | {"gradtrace.experiments"}
