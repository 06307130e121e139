"""Command line of the course: `python -m labutils run ...` executes the notebooks headless, `data` manages the
data sets, `exercises` writes the student copies of the notebooks, `diagnose` reads a training history,
`nightly` runs and compares the course, and `bench` times the training path.

Exit status: 0 when every notebook passed, 1 when a notebook failed or one of its claims did not hold, 2 for
invalid arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from labutils import data, exercises, manifest, nightly, runner, session
from labutils.data import DATASETS
from labutils.profiles import PROFILE_ENV_VAR, PROFILES
from labutils.training import DEVICES

EXIT_USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog="python -m labutils", description="Tools for the Siamese Plateau Lab.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(subparsers)
    _add_data_parser(subparsers)
    _add_exercises_parser(subparsers)
    _add_diagnose_parser(subparsers)
    _add_nightly_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def _add_bench_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="time the course's training path against a naive per-sample pipeline",
        description="Train the same encoder on the same pairs twice, each in its own process: once the naive way "
                    "(a Dataset of explicit pairs, per-sample torchvision transforms, a DataLoader) and once the "
                    "way the course does it (resident tensors, batched augmentation, one forward pass, each "
                    "distinct image embedded once when nothing random happens per image). Print the job's images "
                    "per second, the images the encoder actually processed per second (encoded/s), epoch time, "
                    "peak memory, the speed-up, and the fast path's GFLOP/s as a fraction of a matrix-multiply "
                    "peak measured in the same run. Run it on a quiet machine: other jobs change the speed-up "
                    "several-fold.")
    parser.add_argument("--capacity", choices=("small", "classic", "large"), default="small",
                        help="encoder to train (default: small, the one the lever notebooks train)")
    parser.add_argument("--pairs", type=int, default=2048, metavar="N", help="pairs per epoch (default: 2048)")
    parser.add_argument("--epochs", type=int, default=2, metavar="N", help="epochs per variant (default: 2)")
    parser.add_argument("--job", choices=("augmented", "few-images"), default="augmented",
                        help="augmented (the whole digits training split, randomly augmented) or few-images (the lever "
                             "notebooks' 5 images per class, no augmentation); default: augmented")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the measured numbers to PATH as JSON")
    parser.set_defaults(handler=_bench_command)


def _bench_command(args: argparse.Namespace) -> int:
    import json

    from labutils import bench

    if args.pairs < bench.BATCH_SIZE or args.epochs < 1:
        print(f"error: --pairs must be at least {bench.BATCH_SIZE} (one batch) and --epochs at least 1, got "
              f"--pairs {args.pairs} --epochs {args.epochs}.", file=sys.stderr)
        return EXIT_USAGE_ERROR
    figures = bench.benchmark(args.pairs, args.epochs, args.capacity, args.job)
    print(bench.format_benchmark(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"Figures: {args.json}")
    return 0


def _add_diagnose_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "diagnose", help="name the likely cause of a flat validation curve from a saved training history",
        description="Read a history saved by History.save (the per-epoch record that fit returns), print the "
                    "plateau doctor's findings, most likely first, and optionally save the plots behind them. "
                    "Exit status: 0 after a report, 2 when the file is missing, not valid JSON or not a history.")
    parser.add_argument("history", type=Path, metavar="HISTORY.json", help="history file written by History.save")
    parser.add_argument("--figure", type=Path, metavar="PATH",
                        help="also save the evidence plots to PATH, in the format its extension names (.png, .svg, "
                             ".pdf)")
    parser.set_defaults(handler=_diagnose_command)


def _diagnose_command(args: argparse.Namespace) -> int:
    # Imported here so that the other commands start without the plotting stack.
    import matplotlib.pyplot as plt

    from labutils import diagnose as plateau_doctor

    try:
        history = plateau_doctor.load_history(args.history)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    findings = plateau_doctor.diagnose(history)
    print(plateau_doctor.format_report(findings))
    if args.figure is not None:
        figure = plateau_doctor.plot_evidence(history, findings)
        try:
            figure.savefig(args.figure, dpi=120)
        except (OSError, ValueError) as error:
            print(f"error: the figure could not be saved to {args.figure}: {error}", file=sys.stderr)
            return EXIT_USAGE_ERROR
        finally:
            plt.close(figure)
        print(f"\nFigure: {args.figure}")
    return 0


def _add_exercises_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "exercises", help="write student copies of the notebooks, with the solutions replaced by exercises",
        description="Write a student copy of every course notebook into a folder. Each solution cell becomes a "
                    "stub that raises NotImplementedError with the exercise's hint, and the cells that need its "
                    "results skip with a note until the learner has written them. A file that already exists in "
                    "the folder is never overwritten, because it may hold a learner's work: only missing copies "
                    "are written.")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder for the student notebooks, created if missing")
    parser.add_argument("--notebooks-dir", type=Path, default=runner.NOTEBOOKS_DIR, metavar="DIR",
                        help=f"folder holding the NN_name.ipynb notebooks (default: {runner.NOTEBOOKS_DIR})")
    parser.set_defaults(handler=_exercises_command)


def _exercises_command(args: argparse.Namespace) -> int:
    try:
        report = exercises.build_student_notebooks(args.out, args.notebooks_dir)
    except (ValueError, SyntaxError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    for path in report.written:
        print(f"wrote {path}")
    for path in report.kept:
        print(f"kept {path}: the file exists and is never overwritten; delete or rename it to get a fresh copy")
    print(f"{len(report.written)} student notebooks written, {len(report.kept)} existing ones kept, in {args.out}")
    return 0


def _add_data_parser(subparsers: Any) -> None:
    data_parser = subparsers.add_parser("data", help="download data sets into the cache or list what is cached",
                                        description="Download data sets through torchvision into the data folder "
                                                    "(data/ in the repository, or $LABUTILS_DATA_DIR), list "
                                                    "what is there, or check copied files against the manifest.")
    actions = data_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = actions.add_parser("fetch", help="download data sets (needs network access)")
    fetch.add_argument("names", nargs="+", choices=[name for name in DATASETS if name != "digits"],
                       metavar="NAME", help=f"data sets to download: {', '.join(DATASETS[1:])}")
    fetch.set_defaults(handler=_data_fetch_command)
    listing = actions.add_parser("list", help="show which data sets load from the cache and their sizes")
    listing.set_defaults(handler=_data_list_command)
    verify = actions.add_parser(
        "verify", help="check the cached files against the manifest that fetch writes",
        description=f"Compare every file of the cached data sets with {manifest.MANIFEST_NAME}, which `data fetch` "
                    "writes, and report each missing, truncated or corrupted file with its fix. Exit status: 0 "
                    "when every file matches, 1 otherwise.")
    # No `choices` here: argparse rejects an empty list for nargs="*" with choices, so the handler checks names.
    verify.add_argument("names", nargs="*", metavar="NAME",
                        help=f"data sets to check, among {', '.join(DATASETS[1:])} (default: every recorded or "
                             "downloaded one)")
    verify.set_defaults(handler=_data_verify_command)


def _data_fetch_command(args: argparse.Namespace) -> int:
    status = 0
    for name in args.names:
        try:
            images, _ = data.load_dataset(name, download=True)
        except data.DatasetUnavailableError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}: {len(images)} images ready in {data.resolve_data_dir()}")
        try:
            path = manifest.record([name])
        except (ValueError, OSError) as error:
            print(f"error: {name} was not recorded in the manifest: {error}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}: {len(manifest.dataset_files(name))} files recorded in {path}")
    return status


def _data_list_command(args: argparse.Namespace) -> int:
    folder = data.resolve_data_dir()
    print(f"Data folder: {folder}")
    for name in DATASETS:
        on_disk = "ships with scikit-learn" if name == "digits" else \
            f"{manifest.format_bytes(manifest.disk_bytes(name))} on disk"
        try:
            images, labels = data.load_dataset(name)
        except data.CorruptDataError as error:
            print(f"{name:14s} damaged, {on_disk}: {error}")
            continue
        except data.DatasetUnavailableError:
            partial = f" ({on_disk}, incomplete)" if manifest.disk_bytes(name) else ""
            print(f"{name:14s} not downloaded{partial}")
            continue
        size_mb = images.numel() * images.element_size() / 1e6
        print(f"{name:14s} {len(images):6d} images, {len(labels.unique()):5d} classes, {size_mb:.0f} MB in memory, "
              f"{on_disk}")
    return 0


def _data_verify_command(args: argparse.Namespace) -> int:
    unknown = [name for name in args.names if name not in DATASETS[1:]]
    if unknown:
        print(f"error: unknown data set {', '.join(unknown)}: use {', '.join(DATASETS[1:])}.", file=sys.stderr)
        return EXIT_USAGE_ERROR
    print(f"Data folder: {data.resolve_data_dir()}")
    if not manifest.manifest_path().is_file():
        print(f"error: no {manifest.MANIFEST_NAME} in the data folder, so there is nothing to check against: run "
              "`python -m labutils data fetch NAME...` on the machine that has the data sets, then copy the whole "
              "data folder, manifest included.", file=sys.stderr)
        return 1
    try:
        problems = manifest.verify(names=args.names or None)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    recorded = manifest.load_manifest()["datasets"]
    for name in args.names or [name for name in DATASETS if name in recorded]:
        if name not in recorded:
            continue
        files = recorded[name]["files"]
        broken = sum(problem.dataset == name for problem in problems)
        total = manifest.format_bytes(sum(entry["size"] for entry in files))
        verdict = "all match the manifest" if not broken else f"{broken} do not match the manifest"
        print(f"{name:14s} {len(files)} files, {total}: {verdict}")
    for problem in problems:
        print(f"  {problem.describe()}")
    if problems:
        print(f"{len(problems)} {'problem' if len(problems) == 1 else 'problems'} found.")
        return 1
    print("Every recorded file matches the manifest.")
    return 0


def _add_run_parser(subparsers: Any) -> None:
    default_profile = os.environ.get(PROFILE_ENV_VAR) or "full"
    run = subparsers.add_parser(
        "run", help="execute the course notebooks and write a report",
        description="Execute the course notebooks with papermill, one kernel each, and write the executed "
                    "notebooks, results.json, report.md and report.html into a new run folder.")
    run.add_argument("--profile", choices=list(PROFILES), default=default_profile,
                     help=f"work size of each notebook: smoke runs in seconds and enforces no claims, quick and "
                          f"full enforce them (default: ${PROFILE_ENV_VAR} if set, otherwise full, "
                          f"which gives {default_profile} here)")
    run.add_argument("--dataset", choices=list(DATASETS), default="digits",
                     help="data set the notebooks load (default: digits, the only one that needs no download)")
    run.add_argument("--device", choices=list(DEVICES), default="auto",
                     help="device the notebooks train on, where auto picks cuda, then mps, then cpu (default: auto)")
    run.add_argument("--seed", type=int, default=0, help="random seed passed to every notebook as SEED (default: 0)")
    run.add_argument("--notebooks", nargs="+", metavar="NN",
                     help="number prefixes of the notebooks to run, for example 00 02 (default: all)")
    run.add_argument("--out", type=Path, metavar="DIR",
                     help="new or empty folder for this run (default: runs/<YYYYmmdd-HHMMSS> in the repository)")
    run.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="maximum execution time of each notebook in seconds, kernel start-up not included "
                          "(default: no limit)")
    run.add_argument("--notebooks-dir", type=Path, default=runner.NOTEBOOKS_DIR, metavar="DIR",
                     help=f"folder holding the NN_name.ipynb notebooks (default: {runner.NOTEBOOKS_DIR})")
    _add_jobs_argument(run)
    run.add_argument("--resume", type=Path, metavar="DIR",
                     help="finish the interrupted run in DIR: run only its notebooks without an entry in its "
                          "results.json, with the profile, data set, device, seed and notebooks it was started "
                          "with (only --jobs and --timeout apply)")
    run.set_defaults(handler=_run_command)


def _add_jobs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="number of notebooks executed at the same time, each in its own process and kernel; "
                             "results match a sequential run, but wall-clock times grow when the notebooks share "
                             "too few CPU cores (default: 1)")


def _run_command(args: argparse.Namespace) -> int:
    # Kernels inherit this process's environment, and PyTorch reads the variable when a kernel imports it.
    os.environ.setdefault(session.MPS_FALLBACK_ENV_VAR, "1")
    try:
        if args.resume is not None:
            results = runner.resume_course(args.resume, jobs=args.jobs, timeout=args.timeout)
        else:
            results = runner.run_course(profile=args.profile, dataset=args.dataset, device=args.device,
                                        seed=args.seed, notebooks=args.notebooks, out=args.out,
                                        timeout=args.timeout, notebooks_dir=args.notebooks_dir, jobs=args.jobs)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    _print_summary(results)
    return 0 if results["status"] == "passed" else 1


def _print_summary(results: dict[str, Any]) -> None:
    out_dir = Path(results["out_dir"])
    print()
    print(f"Executed notebooks: {out_dir / 'notebooks'}")
    print(f"Results: {out_dir / 'results.json'}")
    print(f"Report: {out_dir / 'report.md'} and {out_dir / 'report.html'}")
    width = max((len(entry["notebook"]) for entry in results["notebooks"]), default=0)
    for entry in results["notebooks"]:
        claims_held = sum(1 for claim in entry["claims"] if claim["holds"])
        line = f"{entry['notebook']:<{width}}  {entry['status']:<12}  {entry['seconds']:7.1f} s  " \
               f"claims {claims_held}/{len(entry['claims'])}"
        if entry["error"]:
            line += "  " + entry["error"].splitlines()[0]
        print(line)
    failed = sum(1 for entry in results["notebooks"] if entry["status"] != "passed")
    total = len(results["notebooks"])
    print(f"Run {results['status']}: {total - failed} of {total} notebooks passed in {results['seconds']:.1f} s.")


def _add_nightly_parser(subparsers: Any) -> None:
    nightly_parser = subparsers.add_parser(
        "nightly", help="run the course and compare it with a reference run (regression check)",
        description="Execute every notebook (digits, seed 0) into a new run folder, compare the results with a "
                    "reference, and write comparison.json, nightly.md and nightly.html next to the run's own "
                    "report. Exit status: 0 when every notebook passed and nothing regressed, 1 on any "
                    "regression (or, with --update-reference, when the run did not pass), 2 for invalid "
                    "arguments or a missing or mismatched reference.")
    nightly_parser.add_argument("--reference", type=Path, metavar="PATH",
                                help="earlier run folder or results file to compare with (default: "
                                     "reference/results-<profile>.json in the repository)")
    nightly_parser.add_argument("--profile", choices=list(PROFILES),
                                help=f"work size of each notebook (default: {nightly.DEFAULT_PROFILE}, or the "
                                     "resumed run's profile)")
    _add_jobs_argument(nightly_parser)
    nightly_parser.add_argument("--out", type=Path, metavar="DIR",
                                help="new or empty folder for this run (default: runs/<YYYYmmdd-HHMMSS>)")
    nightly_parser.add_argument("--timeout", type=float, metavar="SECONDS",
                                help="maximum execution time of each notebook in seconds (default: no limit)")
    nightly_parser.add_argument("--resume", type=Path, metavar="DIR",
                                help="finish the interrupted run in DIR (only its notebooks without an entry run), "
                                     "then compare it")
    nightly_parser.add_argument("--update-reference", action="store_true",
                                help="after the run, replace the reference file with this run's results.json, "
                                     "but only if every notebook passed; an old reference is still compared")
    nightly_parser.add_argument("--notebooks", nargs="+", metavar="NN",
                                help="number prefixes of the notebooks to run and compare, for example 02 "
                                     "(default: all)")
    nightly_parser.add_argument("--notebooks-dir", type=Path, metavar="DIR",
                                help=f"folder holding the NN_name.ipynb notebooks (default: {runner.NOTEBOOKS_DIR})")
    nightly_parser.set_defaults(handler=_nightly_command)


def _nightly_command(args: argparse.Namespace) -> int:
    # The same kernel environment as `run`: PyTorch reads the variable when a kernel imports it.
    os.environ.setdefault(session.MPS_FALLBACK_ENV_VAR, "1")
    try:
        outcome = nightly.run_nightly(reference=args.reference, profile=args.profile, jobs=args.jobs, out=args.out,
                                      timeout=args.timeout, resume=args.resume, notebooks_dir=args.notebooks_dir,
                                      notebooks=args.notebooks, update_reference=args.update_reference)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    _print_summary(outcome.results)
    if outcome.comparison is not None:
        _print_comparison(outcome.comparison, Path(outcome.results["out_dir"]))
    if args.update_reference:
        print(outcome.note)
        return 0 if outcome.reference_updated else 1
    return 0 if outcome.passed else 1


def _print_comparison(comparison: dict[str, Any], out_dir: Path) -> None:
    print()
    print(f"Nightly report: {out_dir / 'nightly.md'} and {out_dir / 'nightly.html'}")
    print(f"Comparison: {out_dir / 'comparison.json'}")
    for finding in comparison["regressions"]:
        print(f"REGRESSION {finding['reason']}")
    print(f"Comparison {comparison['status']}: {len(comparison['regressions'])} regressions, "
          f"{len(comparison['changes'])} other changes, against {comparison['reference']['path']}.")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # papermill logs every input and output path at INFO, which buries the runner's progress lines.
    logging.getLogger("papermill").setLevel(logging.WARNING)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
