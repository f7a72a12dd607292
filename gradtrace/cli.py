"""The `gradtrace` command line: tasks, train, sweep, calibrate, stats, predict, report, info, export."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import gradtrace
from gradtrace import config as config_mod
from gradtrace.console import plain_text_where_unencodable
from gradtrace.files import disk_full, full_disk_words


def _config(args: argparse.Namespace):
    return config_mod.load(args.config, config_mod.parse_overrides(args.set or []))


def _experiment_dir(path: str) -> str:
    """An --out directory to train into, refused where it is a file or inside a Zarr store (`STUDY/store.zarr`
    nested a store in the study's, which every later command on it then warned of)."""
    if Path(path).exists() and not Path(path).is_dir():  # a dry run printed the plan; the sweep then failed
        raise argparse.ArgumentTypeError(f"{path} is a file, not a directory: give an experiment directory")
    inside = next((p for p in (Path(path), *Path(path).absolute().parents) if (p / "zarr.json").exists()), None)
    if inside is not None:
        raise argparse.ArgumentTypeError(f"{path} lies inside the Zarr store {inside}: give the experiment directory "
                                         "(the one that holds store.zarr), or a new one")
    return path


def _writable(path: Path, what_to_do: str) -> Path:
    """`path`, refused before anything is computed where this process cannot write into it (a study on read-only
    storage, or another user's), with what to do instead."""
    if path.is_dir() and not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable (read-only storage, or another user's): {what_to_do}")
    return path


def _analysis_dir(args: argparse.Namespace) -> Path:
    """Where stats, predict and report write: `--out` (made where missing), or else the experiment directory."""
    if args.out is None:
        return _writable(Path(args.dir), "write the analysis to a directory of your own with --out DIR (the study "
                                         "is only read)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return _writable(Path(args.out), "give --out a directory you can write to")


def _trainable_dir(path: str) -> Path:
    """An experiment directory to train, resume or extend runs in, refused where it cannot be written."""
    return _writable(Path(path), "a study is trained, resumed or extended only where it can be written: copy it to "
                     "a directory you can write to (`cp -a`, `rsync -a`) and run this there; `gradtrace stats`, "
                     "`predict` and `report` read it where it is, with --out DIR")


def cmd_tasks(args: argparse.Namespace) -> None:
    """List every registered split, in the order their items are drawn, with its description and one example; a
    split that cannot be drawn under the config is listed, and why after the table."""
    from gradtrace.tasks import REGISTRY, ArithmeticTask
    from gradtrace.tasks.shifts import drawing_order, import_split_modules

    cfg = config_mod.load(args.config, config_mod.parse_overrides(args.set or []))
    import_split_modules(cfg.task.modules)  # your own splits are listed too
    in_default = set(cfg.task.shifts)
    width, refused = max(14, *map(len, REGISTRY)), {}
    print(f"{'split':<{width}} {'in config':<9} {'example (prompt=answer, digits least-significant first)':<34} "
          "description")
    for name in drawing_order(list(REGISTRY)):
        mark = "yes" if name == "ID" or name in in_default else "-"
        try:  # each split alone
            task = ArithmeticTask(dataclasses.replace(cfg.task, shifts=[] if name == "ID" else [name], n_test=1,
                                                      n_probe=0))
            example = repr(task.example(name))
        except ValueError as err:
            example, refused[name] = "(cannot be drawn: below)", str(err)
        print(f"{name:<{width}} {mark:<9} {example:<34} {REGISTRY[name].describe(cfg.task.max_digits)}")
    if refused:
        print("", *(f"{name}: {why}" for name, why in refused.items()), sep="\n")


def cmd_train(args: argparse.Namespace) -> None:
    """Train one run with capture into OUT/store.zarr."""
    from gradtrace.models import check_model
    from gradtrace.train import train

    cfg = _config(args)
    check_model(cfg.model)  # a hub model's name, before anything is written
    out = _trainable_dir(args.out)
    if (out / "plan.json").exists():  # its config.yaml and reference runs are the sweep's
        raise ValueError(f"{out} holds a sweep (plan.json): train into another --out directory")
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and not _has_run(out, args.run_id):  # a mistyped --out or run id trains anew: say so at once
        print(f"--resume: {out / 'store.zarr'} holds no run {args.run_id!r}; training it from the start",
              file=sys.stderr)
    result = train(cfg, out, args.run_id, role="reference", resume=args.resume)
    if not (args.resume and (out / "config.yaml").exists()):  # a resumed run keeps the config it started with
        config_mod.dump(cfg, out / "config.yaml")
    print(f"run {result.run_id}: {result.steps} steps in {result.wall_time_s:.1f} s")
    width = max([14, *map(len, result.accuracy)])
    for split, acc in result.accuracy.items():
        train_acc = result.train_accuracy.get(split)
        print(f"  {split:<{width}} {acc:6.1%}" + ("" if train_acc is None else f"   (train {train_acc:6.1%})"))
    print(f"store: {out / 'store.zarr'}")


def _has_run(out: Path, run_id: str) -> bool:
    """Whether the experiment store in `out` holds a group for `run_id`."""
    from gradtrace import store

    return (out / "store.zarr" / "zarr.json").exists() and run_id in store.open_experiment(out / "store.zarr")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Run a sweep (resumable) and write OUT/results.csv."""
    from gradtrace.models import embedded_like, from_hub
    from gradtrace.sweep import check_config, check_directory, describe_plan, plan, run_sweep

    cfg = _config(args)
    if args.dry_run:
        runs = plan(cfg)
        check_config(cfg, contact_hub=False)  # what the sweep would refuse before training, a dry run refuses too
        if args.out:
            check_directory(cfg, Path(args.out))
        print(describe_plan(cfg, runs, Path(args.out) if args.out else None))
        if from_hub(cfg.model):
            close = None if cfg.model.pretrained else embedded_like(cfg.model.name)
            print(f"model {cfg.model.name!r} comes from the Hugging Face hub (not embedded"
                  f"{f': did you mean {close!r}?' if close else ', or pretrained weights'}): a dry run does not look "
                  "it up there; the sweep does, before any run trains")
        if args.scheduler:
            print(f"on the dask cluster at {args.scheduler} (not contacted by a dry run): its worker processes, not "
                  "sweep.workers, set how many jobs train at once, so the time above is not the cluster's")
        return
    out = _trainable_dir(args.out or f"storage/{Path(args.config).stem}")
    table = run_sweep(cfg, out, scheduler=args.scheduler)
    print(f"{len(table)} complete runs; results: {Path(out) / 'results.csv'}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Pilot sweep: per split mean, std, range, correlation with ID, reliability, usable or not."""
    from gradtrace.calibrate import calibrate, enough_usable

    cfg = _config(args)
    out = _trainable_dir(args.out or f"storage/calibrate-{Path(args.config).stem}")
    runs = max(12, 6 * cfg.sweep.bases) if args.runs is None else args.runs
    if args.bases:
        from gradtrace.calibrate import calibrate_bases

        table = calibrate_bases(cfg, out, args.bases, 12 if args.runs is None else args.runs)
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        print(f"written: {Path(out) / 'bases.csv'} (each pilot in {Path(out) / 'base-seed-N'}); "
              "train the study on a chosen base with --set train.init_seed=N")
        enough = enough_usable(len(cfg.task.shifts))
        seeds = table.init_seed[table.usable >= enough].tolist()
        print(f"bases with at least {enough} usable shifts: init_seed {', '.join(map(str, seeds))}" if seeds else
              f"no base with {enough} usable shifts: pilot other seeds (--bases), or more runs (--runs)")
        return
    result = calibrate(cfg, out, runs)
    print(result.format())
    print(f"written: {Path(out) / 'calibration.csv'}")
    shifts = result.splits[result.splits.split != "ID"]
    if cfg.sweep.bases == 1 and shifts.usable.sum() < enough_usable(len(shifts)):
        if cfg.sweep.pretrain_steps:
            how = "--bases 0 1 2 3` pilots four (bases.csv), then train the study on one with --set train.init_seed=N"
        elif cfg.model.init_from:  # the default's shipped base, fine-tuned by another machine's rounding, say
            how = ("--set model.init_from=null --set sweep.pretrain_steps=800 --bases 0 1 2 3` trains four bases by "
                   "the default's recipe and pilots them (bases.csv), then train the study on one with those settings "
                   "and --set train.init_seed=N")
        else:
            return
        print(f"{int(shifts.usable.sum())} of {len(shifts)} shifts usable on this base; another base may give more "
              f"(experiments/README.md: how far one base decides the study): `gradtrace calibrate {args.config} {how}")


def cmd_stats(args: argparse.Namespace) -> None:
    """Cross-shift partial correlations controlling for ID, with CIs; writes stats.csv/json."""
    from gradtrace import stats

    report = stats.stats_report(args.dir, residualize=args.residualize, out=_analysis_dir(args),
                                **({"shifts": args.shifts} if args.shifts else {}))
    print(stats.format_table(report.stats))
    if report.summary["within"]:
        print(f"within {report.summary['within']}: each pair correlated over the runs of one base, pooled over "
              "bases (base indicators among the covariates, so k counts them)")
    print("written: " + ", ".join(str(p) for p in report.paths.values()))


def cmd_predict(args: argparse.Namespace) -> None:
    """Predictors from reference-run stores, scored against the observed matrix."""
    from gradtrace import predict

    out = _analysis_dir(args)
    result = predict.run_predict(args.dir, out=out)
    print(predict.format_scores(result.scores))
    print(f"written: {out / 'predictions.csv'}, {out / 'predict_scores.csv'}, {out / 'predict.json'}")


def cmd_report(args: argparse.Namespace) -> None:
    """Figures and a self-contained HTML report of an experiment directory."""
    from gradtrace import report

    path = report.write_report(args.dir, out=_analysis_dir(args))
    print(f"report: {path}")


def cmd_info(args: argparse.Namespace) -> None:
    """Summarise a store: runs, steps, arrays, sizes, status, sketch; and a sweep's progress through its plan."""
    from gradtrace import store
    from gradtrace.results import plan_progress

    path = Path(args.store)
    print(store.summary(path / "store.zarr" if (path / "store.zarr").exists() else path))
    if (path / "plan.json").exists():
        print(plan_progress(path))


def cmd_export(args: argparse.Namespace) -> None:
    """Export a store to HDF5."""
    from gradtrace import store

    path = Path(args.store)
    src = path / "store.zarr" if (path / "store.zarr").exists() else path
    print(f"written: {store.export_hdf5(src, args.out, args.compression, progress=True)}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="gradtrace", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gradtrace {gradtrace.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("config", nargs=None if required else "?",
                       help="experiment YAML, or the name of one gradtrace ships (default, large, ...: "
                            "experiments/NAME.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=200 (repeatable)")

    p = sub.add_parser("tasks", help=cmd_tasks.__doc__)
    with_config(p, required=False)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    with_config(p)
    p.add_argument("--out", type=_experiment_dir, required=True, help="experiment directory")
    p.add_argument("--run-id", default="run", help="run group name (default: run)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last durable step")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help=cmd_sweep.__doc__)
    with_config(p)
    p.add_argument("--out", type=_experiment_dir, default=None,
                   help="experiment directory (default: storage/<config name>)")
    p.add_argument("--scheduler", default=None, help="the dask.distributed scheduler to run the runs on: its address "
                   "(tcp://HOST:8786) or the file it wrote that in (dask scheduler --scheduler-file PATH)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, steps, expected time) and exit")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("calibrate", help=cmd_calibrate.__doc__)
    with_config(p)
    p.add_argument("--out", type=_experiment_dir, default=None,
                   help="pilot directory (default: storage/calibrate-<config name>)")
    p.add_argument("--runs", type=int, default=None,
                   help="pilot runs (default: 12, or 6 per base run where sweep.bases > 1)")
    p.add_argument("--bases", type=int, nargs="+", default=None, metavar="SEED",
                   help="one pilot per candidate base run (train.init_seed), summarised in bases.csv")
    p.set_defaults(func=cmd_calibrate)

    def on_path(name: str, func, arg: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=func.__doc__)
        p.add_argument(arg, help=help_text)
        p.set_defaults(func=func)
        return p

    def with_out(p: argparse.ArgumentParser, written: str) -> None:
        p.add_argument("--out", type=_experiment_dir, default=None, help=f"write {written} into this directory "
                       "instead of the experiment directory, which is then only read (a read-only or shared study)")

    p = on_path("stats", cmd_stats, "dir", "experiment directory")
    with_out(p, "stats.csv, stats.json, gap.csv and reliability.csv")
    p.add_argument("--residualize", default="all", choices=["linear", "probit", "spline", "all"],
                   help="how ID accuracy is regressed out (default: all three, side by side)")
    p.add_argument("--shifts", nargs="+", metavar="SPLIT", help="the shifts to correlate (default: every one that "
                   "varies across runs)")
    with_out(on_path("predict", cmd_predict, "dir", "experiment directory"),
             "predictions.csv, predict_scores.csv and predict.json")
    with_out(on_path("report", cmd_report, "dir", "experiment directory"), "report/ (reading, or computing, the tables "
             "of stats and predict there)")
    on_path("info", cmd_info, "store", "experiment directory or .zarr store")
    p = on_path("export", cmd_export, "store", "experiment directory or .zarr store")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--compression", default="gzip", choices=["gzip", "none"],
                   help="gzip (level 1, shuffled; any HDF5 reader) or none (larger, faster on large stores: the "
                        "demo's 17.8 MB against 14.5 MB, each in ~2.6 s)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler cancelling or timing out the job, `kill`, `timeout`), handled as Ctrl-C is: the run
    in this process records that it stopped, a sweep stops its workers and rewrites results.csv."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within: SIGTERM raises `Terminated` in the main thread (elsewhere signals cannot be handled), and a SIGTERM or
    Ctrl-C whose exception Python dropped, raised inside a finalizer (`__del__`: "Exception ignored in"), is sent
    again, to land outside it (a sweep trained on to its end and exited 0)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated("SIGTERM")

    def send_again(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
            threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
        hook(unraisable)

    before, hook = signal.signal(signal.SIGTERM, terminate), sys.unraisablehook
    sys.unraisablehook = send_again
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        sys.unraisablehook = hook


@contextlib.contextmanager
def _warnings_in_words(command: str):
    """Within: gradtrace's own warnings print as `gradtrace COMMAND: warning: …`, as its errors do, not as Python's
    `/…/gradtrace/stats.py:875: UserWarning: …` and the source line; others (numpy's, say) keep Python's form. Only
    the printed form changes (`warnings.formatwarning`): a caller recording warnings still records them."""
    package = str(Path(gradtrace.__file__).parent)

    def in_words(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and str(filename).startswith(package):
            return f"gradtrace {command}: warning: {message}\n"
        return before(message, category, filename, lineno, line)

    before = warnings.formatwarning
    warnings.formatwarning = in_words
    try:
        yield
    finally:
        warnings.formatwarning = before


def _full_disk_advice(err: BaseException, args: argparse.Namespace) -> str:
    """After a full disk's error, what it was and what to do; nothing after any other error."""
    if not disk_full(err):
        return ""
    written = getattr(args, "out", None) or getattr(args, "dir", None)
    return (f": {full_disk_words(err, written)}. What was written whole is kept: free some space and run "
            f"{_run_again(args)} to go on")


def _run_again(args: argparse.Namespace) -> str:
    """What goes on from where a stopped command left off: the same command (`train` with --resume)."""
    return "the same command with --resume" if args.command == "train" else "the same command"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gradtrace` console script."""
    with plain_text_where_unencodable():
        return _main(build_parser().parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    """`main` after its arguments are parsed: the command, its errors in words and its exit status."""
    try:
        with _sigterm_as_interrupt(), _warnings_in_words(args.command):
            args.func(args)
    except BrokenPipeError:  # output piped into a reader that stopped (`gradtrace info DIR | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's final flush then goes nowhere
        return 1
    except (ValueError, OSError, KeyError) as err:  # OSError: a missing file, a full disk, a read-only directory, …
        print(f"gradtrace {args.command}: error: {err}{_full_disk_advice(err, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        cluster = (" Runs already started on the cluster train on there until they end; a re-run refuses them "
                   "or waits for them until then." if getattr(args, "scheduler", None) else "")
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"\ngradtrace {args.command}: {how}; what was complete is kept: run {_run_again(args)} to go on."
              f"{cluster}", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:
        from gradtrace.store import RunInUse  # imported only once something failed: these imports are heavy
        from gradtrace.sweep import SweepError

        if not isinstance(err, (SweepError, RunInUse)):
            raise
        print(f"gradtrace {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
