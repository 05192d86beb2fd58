"""The `sweep` command: start, status, export, validate.

Heavy libraries (torch, ray, optuna, lm-eval) are imported inside the
subcommands, so `sweep --help` answers at once. Expected errors (a bad config,
a missing study, no GPU, an unusable --storage or --out) exit with status 2 and
one line on stderr; an unexpected one exits 1, also with one line. `sweep
--debug COMMAND` (or SWEEP_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Optional

from trainer.compat import CompatError

DEFAULT_STORAGE = "sqlite:///studies.db"


class CliError(Exception):
    """An error to report in one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep",
        description="QLoRA hyperparameter sweeps: Optuna proposes, Ray runs, lm-eval scores.",
        epilog="Errors print one line, `sweep COMMAND: error: ...`, and exit non-zero (2, or 1 when unexpected); "
               "`sweep --debug COMMAND ...` or SWEEP_DEBUG=1 prints the full traceback instead.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback instead of one line (before the command: "
                             "sweep --debug status; or set SWEEP_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = sub.add_parser("start", help="run trials of a study (the offline demo without --config)")
    start.add_argument("--config", help="sweep config YAML (default: the embedded demo config)")
    start.add_argument(
        "--gpu", choices=["cpu", "a100", "a100-80gb", "4090", "h100", "h200"],
        help="target GPU profile (default: the visible card's, or cpu)",
    )
    start.add_argument("--trials", type=_positive_int, help="trials to run now (default: study.n_trials)")
    start.add_argument("--study", help="study name (default: study.name of the config)")
    start.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default: {DEFAULT_STORAGE})")
    start.add_argument("--address", help="Ray cluster to join (auto, ray://host:10001); default: a local Ray")
    start.add_argument("--concurrency", type=_positive_int,
                       help="trials in flight at once (default: every GPU of the Ray cluster; 1 on cpu)")
    start.add_argument("--budget-hours", type=_positive_float, metavar="H",
                       help="GPU-hours (slot-hours on cpu) this start may use; no trial starts that would not fit")
    start.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                       help="start no trial that would not finish within SECONDS of the start")
    start.add_argument("--enqueue-best-from", metavar="STUDY",
                       help="warm start: run the best trials' parameters of STUDY (in --storage) first")
    start.add_argument("--top", type=_positive_int, metavar="N",
                       help="with --enqueue-best-from: how many of its best trials (default: 1)")
    start.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by dotted path, e.g. trainer.max_steps=50 (repeatable)")

    status = sub.add_parser("status", help="show the trials of a study")
    status.add_argument("--study", help="study name (default: the only study in the storage)")
    status.add_argument("--storage", default=DEFAULT_STORAGE)
    status.add_argument("--format", choices=["table", "json"], default="table")

    export = sub.add_parser("export", help="write a trial's submission: adapter, tokenizer, model card, scores "
                                           "and, with --merge, a merged 16-bit model")
    export.add_argument("--study", help="study name (default: the only study in the storage)")
    export.add_argument("--storage", default=DEFAULT_STORAGE)
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--pick", action="store_true",
                       help="export the submission: the best on the pick_by suite among the top-k on the objective")
    which.add_argument("--best", action="store_true", help="export the best trial on the objective")
    which.add_argument("--trial", type=int, help="export this trial number")
    export.add_argument("--out", required=True, help="destination directory (new or empty, unless --force)")
    export.add_argument("--force", action="store_true",
                        help="replace the contents of a non-empty --out directory")
    export.add_argument("--merge", nargs="?", const="dequantized", choices=["dequantized", "original"],
                        help="also write OUT/merged/: the adapter merged into a bf16 copy of the base, either the "
                             "dequantized 4-bit weights it was scored on (the default) or the original weights")

    contamination = sub.add_parser(
        "contamination", help="13-gram overlap between each training source and each evaluation task"
    )
    contamination.add_argument("--config", help="config file (default: the demo)")
    contamination.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    contamination.add_argument("--format", choices=["table", "json"], default="table")

    dashboard = sub.add_parser("dashboard", help="serve the Optuna dashboard for the study database (read-only)")
    dashboard.add_argument("--storage", default=DEFAULT_STORAGE)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    dashboard.add_argument("--port", type=int, default=8080, help="port to listen on, 0-65535 (0: a free one)")
    dashboard.add_argument("--artifacts", metavar="DIR",
                           help="the trials' artifact store (default: the one each study recorded)")
    dashboard.add_argument("--allow-writes", action="store_true",
                           help="let the dashboard change the database: notes, study deletion (default: read-only)")

    serve = sub.add_parser("serve", help="serve an export over the challenge's HTTP API (/process, /tokenize, "
                                         "/decode), as HELM's HTTP model client calls it")
    serve.add_argument("dir", help="the directory `sweep export --out` wrote")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080,
                       help="port, 0-65535 (default 8080, HELM's default base URL; 0: a free one)")
    serve.add_argument("--merged", action="store_true",
                       help="serve the export's merged model (DIR/merged, `sweep export --merge`) instead of the "
                            "adapter on its 4-bit base")
    serve.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU when there is one)")

    submission = sub.add_parser("submission", help="pack an export as the challenge's Docker submission: "
                                                   "Dockerfile, pinned requirements, the export, the server")
    submission.add_argument("dir", help="the directory `sweep export --out` wrote")
    submission.add_argument("--out", required=True, help="destination directory (new or empty, unless --force)")
    submission.add_argument("--merged", action="store_true", help="the image serves the merged model (DIR/merged)")
    submission.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")

    report = sub.add_parser("report", help="write a static HTML report of a study, with plots (opens offline)")
    report.add_argument("--study", help="study name (default: the only study in the storage)")
    report.add_argument("--storage", default=DEFAULT_STORAGE)
    report.add_argument("--out", default="sweep-report",
                        help="directory for index.html and its images (default: sweep-report)")

    validate = sub.add_parser(
        "validate", help="check a config file, and the model, tasks and data it names, without running anything"
    )
    validate.add_argument("file", help="sweep config YAML")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument("--storage", help="also check the search space against this storage's study")
    validate.add_argument("--study", help="the study to check against (default: study.name of the config)")
    validate.add_argument("--file-only", action="store_true",
                          help="check the file only: not the model, the tasks and the data it names")

    # Every argument after `lm-eval` goes to lm-eval's own CLI, unchanged (its --help included).
    sub.add_parser("lm-eval", add_help=False, prefix_chars="\0",
                   help="lm-eval's own CLI with this project's fast scoring registered as `--model sweep` "
                        "(e.g. sweep lm-eval --model sweep --model_args pretrained=DIR --tasks NAME)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "lm-eval":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "storage", None):
        args.storage = storage_url(args.storage)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    commands = {
        "start": cmd_start, "status": cmd_status, "export": cmd_export,
        "dashboard": cmd_dashboard, "validate": cmd_validate, "contamination": cmd_contamination,
        "report": cmd_report, "serve": cmd_serve, "submission": cmd_submission,
        "lm-eval": lambda _: cmd_lm_eval(rest),
    }
    debug = args.debug or os.environ.get("SWEEP_DEBUG", "").lower() not in ("", "0", "false", "no")
    args.debug = debug
    try:
        with _storage_errors(getattr(args, "storage", None)):
            return commands[args.command](args)
    except (CliError, CompatError) as e:  # CompatError: a hook met a library release it was not checked against
        if debug:
            _print_traceback(e)
        else:
            print(f"sweep {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        import signal

        from sweep.faults import stop_signal

        signum = stop_signal(e)
        if signum != signal.SIGINT:
            print(f"sweep {args.command}: terminated ({signal.Signals(signum).name})", file=sys.stderr)
        else:
            print(f"sweep {args.command}: interrupted", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # `sweep status | head`: the reader is gone, nothing to report
        with contextlib.suppress(OSError, ValueError):  # no flush error at exit either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - anything unexpected: one line, the traceback on --debug
        if debug:
            _print_traceback(e)
        else:
            print(f"sweep {args.command}: error: {type(e).__name__}: {_one_line(str(e))} "
                  f"(run with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    """`text` on one line (SQLAlchemy's messages, say, span several)."""
    return " ".join(text.split())


def _print_traceback(error: BaseException) -> None:
    """The full traceback; for a CliError raised `from None`, the original error's too."""
    import traceback

    if isinstance(error, CliError) and error.__cause__ is None and error.__context__ is not None:
        error.__suppress_context__ = False
    traceback.print_exception(error, file=sys.stderr)


def storage_url(text: str) -> str:
    """A storage URL as given, or a plain file path read as that SQLite file."""
    return text if "://" in text or text.startswith("sqlite:") else f"sqlite:///{text}"


@contextlib.contextmanager
def _storage_errors(url: Optional[str]):
    """A storage URL that cannot be parsed, or a file that is no database, is a one-line error.

    The commands check their storage first (`_check_storage`); this catches what shows up later
    (a database another program broke, a server that refuses the connection).
    """
    try:
        yield
    except CliError:
        raise
    except Exception as e:
        if url is None:  # a command without a storage (serve, submission): serving needs no SQLAlchemy at all
            raise
        from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError

        from sweep.faults import is_disk_full

        if isinstance(e, (ArgumentError, NoSuchModuleError)):
            raise CliError(f"--storage {url}: not a database URL (e.g. sqlite:///studies.db)") from None
        if isinstance(e, DatabaseError) and not is_disk_full(e):
            reason = " ".join(str(getattr(e, "orig", None) or e).split())
            if "readonly database" in reason:
                raise CliError(f"--storage {url}: the database is not writable ({reason}); copy it to a "
                               f"writable place and pass that as --storage") from None
            raise CliError(f"--storage {url}: cannot use the database ({reason}); check the database, "
                           f"or pass another --storage") from None
        raise


def _check_storage(url: str, write: bool) -> None:
    """A storage the command cannot use is a one-line error, found before anything is opened or written."""
    from sweep.store import database_problem

    problem = database_problem(url, write=write)
    if problem:
        raise CliError(f"--storage {url}: {problem}")


def cmd_start(args) -> int:
    from sweep.config import ConfigError, load_config
    from sweep.gpus import GpuError, resolve_profile

    flags = {"concurrency": args.concurrency, "budget_hours": args.budget_hours, "timeout_seconds": args.timeout}
    overrides = [*args.overrides, *(f"orchestration.{k}={v}" for k, v in flags.items() if v is not None)]
    try:
        config = load_config(args.config, overrides)
        address = args.address or config.orchestration.ray_address
        profile = resolve_profile(args.gpu, local_check=address is None)
    except (ConfigError, GpuError) as e:
        raise CliError(str(e)) from None

    from sweep.config import study_name_problem

    study_name = config.study.name if args.study is None else args.study
    problem = study_name_problem(study_name)
    if problem:
        raise CliError(f"--study {study_name!r}: {problem}")
    _check_storage(args.storage, write=True)  # before Ray, the data or the base model: a start that cannot write stops

    from sweep.driver import run_sweep
    from sweep.faults import SweepError, ignore_file_size_signal, stop_signals_raise
    from sweep.study import StudyError, best_params

    if args.top is not None and args.enqueue_best_from is None:
        raise CliError("--top: only with --enqueue-best-from STUDY")
    if args.enqueue_best_from is not None:
        if args.enqueue_best_from == study_name:
            raise CliError(f"--enqueue-best-from {study_name}: that is the study this start runs; name another")
        try:
            warm = best_params(args.storage, args.enqueue_best_from, args.top or 1, config.search_space)
        except StudyError as e:
            raise CliError(f"--enqueue-best-from {args.enqueue_best_from}: {e}") from None
        config = dataclasses.replace(config, enqueue=[*config.enqueue, *warm])

    n_trials = args.trials or config.study.n_trials
    ignore_file_size_signal()  # past a file-size limit: EFBIG, handled as a full disk, instead of a kill
    try:
        with stop_signals_raise():  # SIGTERM and SIGHUP stop the start as Ctrl-C does
            outcome = run_sweep(
                config, storage_url=args.storage, study_name=study_name, n_trials=n_trials,
                profile=profile, address=address,
            )
    except (StudyError, GpuError, SweepError) as e:
        raise CliError(str(e)) from None
    return _report_outcome(outcome, study_name, args.storage)


def _report_outcome(outcome, study_name: str, storage: str) -> int:
    """The last line of a start, about this start; 1 when it failed (its trials all failed, or it stopped)."""
    older = (f" (the study's best is still trial {outcome.best_number}, {outcome.best_value:.4f})"
             if outcome.best_number is not None else "")
    if outcome.failure is not None:
        print(f"sweep start: error: study {study_name!r}: {outcome.failure}; fix it and run `sweep start` "
              f"again{older}", file=sys.stderr)
        return 1
    if outcome.all_failed:
        print(f"sweep start: error: study {study_name!r}: all {outcome.failed} trial(s) of this start failed "
              f"(the last: {outcome.last_failure}){older}", file=sys.stderr)
        return 1
    if outcome.best_number is None:
        print(f"Study {study_name!r}: no trial completed.")
    elif outcome.pick_untuned:
        print(f"Study {study_name!r}: the pick is the untuned base: no trial beat it (the best is trial "
              f"{outcome.best_number}, {outcome.best_value:.4f}). See `sweep status`; export it with: "
              f"sweep export --study {study_name} --storage {storage} --pick --out DIR")
    else:
        print(f"Study {study_name!r}: best is trial {outcome.best_number} with value {outcome.best_value:.4f}. "
              f"See the pick with `sweep status`; export it with: "
              f"sweep export --study {study_name} --storage {storage} --pick --out DIR")
    return 0


def cmd_status(args) -> int:
    status = _load_status(args)
    if args.format == "json":
        print(json.dumps(status, indent=2))
    else:
        print(format_table(status))
    return 0


def cmd_export(args) -> int:
    from sweep.export import export_trial

    status = _load_status(args)
    try:
        # Library output (weight-loading bars, kernel notices) stays off the terminal unless --debug.
        out = export_trial(status, "pick" if args.pick else "best" if args.best else args.trial, args.out,
                           force=args.force, merge=args.merge, quiet=not args.debug,
                           announce=lambda line: print(line, flush=True))
    except ValueError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        from sweep.faults import is_disk_full

        if is_disk_full(e):
            raise CliError(f"no space left on device while writing {args.out}; nothing was exported") from None
        raise CliError(f"--out {args.out}: cannot write {e.filename or args.out} ({e.strerror or e}); nothing was "
                       f"exported: pass an --out in a writable place") from None
    merged = f"; merged into the {args.merge} base: {out / 'merged'}" if args.merge else ""
    exported = json.loads((out / "scores.json").read_text())
    if exported.get("untuned"):
        print(f"Exported the untuned base {status['baseline']['model']} (the pick: no trial beat it; no adapter) "
              f"to {out}")
    else:
        print(f"Exported trial {exported['trial']} to {out}{merged}")
    return 0


def cmd_contamination(args) -> int:
    import tempfile
    from pathlib import Path

    from sweep.contamination import format_report, format_shared, hub_unreachable, overlap_report, shared_datasets
    from sweep.tasks import prepare_tasks
    from sweep.worker import failure_reason

    config = _config(args.config, args.overrides)
    shared = shared_datasets(config)  # needs no data: shown even when the 13-gram check cannot run
    if shared and args.format == "table":
        print(format_shared(shared) + "\n", flush=True)
    rows, skipped = [], None
    try:
        with tempfile.TemporaryDirectory(prefix="sweep-contamination-") as work:
            rows, _ = overlap_report(config, prepare_tasks(config, Path(work)))
    except Exception as e:
        if not (shared and hub_unreachable(e)):  # nothing to show, or a real fault: the error, as any command's
            raise
        skipped = failure_reason(e)
    if args.format == "json":
        print(json.dumps({"shared_datasets": [r.as_record() for r in shared], "overlaps": [r.__dict__ for r in rows],
                          "overlaps_skipped": skipped}, indent=2))
    elif skipped:
        print(f"13-gram check skipped (it needs every source's rows and every task's documents): {skipped}")
    else:
        print(format_report(rows))
    return 0


def cmd_dashboard(args) -> int:
    import socket

    from sweep.dashboard import build_server
    from sweep.store import database_problem

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: must be between 0 and 65535 (0 picks a free port)")
    try:
        socket.getaddrinfo(args.host, args.port, socket.AF_INET, socket.SOCK_STREAM)  # the server is IPv4
    except (socket.gaierror, UnicodeError) as e:
        raise CliError(f"--host {args.host}: cannot resolve it to an IPv4 address ({getattr(e, 'strerror', e)}); "
                       f"pass an address of this machine, e.g. 127.0.0.1") from None
    _check_storage(args.storage, write=False)
    if args.artifacts is not None and not os.path.isdir(args.artifacts):
        raise CliError(f"--artifacts {args.artifacts}: no such directory (pass an artifact store's directory, e.g. "
                       f"sweep-runs/STUDY/artifact-store, or leave --artifacts out for the studies' own)")
    cannot_write = database_problem(args.storage, write=True)  # e.g. on read-only media: show, don't edit
    if args.allow_writes and cannot_write is not None:
        raise CliError(f"--allow-writes: {cannot_write}")
    read_only = cannot_write is not None
    try:
        server = build_server(args.storage, args.host, args.port, read_only=read_only,
                              allow_writes=args.allow_writes, artifacts=args.artifacts)
    except OSError as e:
        raise _listen_error(e, args.host, args.port) from None
    if read_only:
        note = " (read-only: this process may not write the database)"
    else:
        note = "" if args.allow_writes else " (read-only; --allow-writes lets it edit notes and delete studies)"
    print(f"Optuna dashboard for {args.storage}{note} at http://{args.host}:{server.server_port}/ "
          f"(Ctrl-C stops it)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _listen_error(error: OSError, host: str, port: int) -> CliError:
    """The one line for a server (dashboard, serve) that cannot listen on host:port."""
    import errno

    if error.errno == errno.EADDRINUSE:
        return CliError(f"--port {port}: {host}:{port} is in use ({error.strerror}); pass another --port, or "
                        f"--port 0 for a free one")
    if error.errno == errno.EADDRNOTAVAIL:
        return CliError(f"--host {host}: not an address of this machine ({error.strerror}); pass one, e.g. 127.0.0.1")
    return CliError(f"cannot listen on {host}:{port} ({error.strerror or error}); pass another --host or --port")


def cmd_serve(args) -> int:
    from pathlib import Path

    from sweep.serve import Engine, bind, export_problem, load_export, run

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: must be between 0 and 65535 (0 picks a free port)")
    problem = export_problem(Path(args.dir), args.merged)
    if problem:
        raise CliError(problem)
    if args.device and not (args.device == "cpu" or args.device.startswith("cuda")):
        raise CliError(f"--device {args.device}: expected cpu, cuda or cuda:N")
    try:
        sock = bind(args.host, args.port)  # a taken port fails now, not after the model has loaded
    except OSError as e:
        raise _listen_error(e, args.host, args.port) from None
    try:
        served = load_export(args.dir, merged=args.merged, device=args.device)
    except Exception as e:
        sock.close()
        if args.debug:
            raise
        raise CliError(f"{args.dir}: cannot load the model ({type(e).__name__}: {_one_line(str(e))})") from None
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"

    engine = Engine(served)
    dense = " (as a dense bf16 copy with the adapter merged in)" if engine.dense else ""

    def announce() -> None:
        print(f"Serving {served.description}{dense} on {served.device} at {url} (POST /process, /tokenize, "
              f"/decode; Ctrl-C stops it)", flush=True)

    try:
        run(engine, sock, announce)
    finally:
        engine.close()
    return 0


def cmd_submission(args) -> int:
    from pathlib import Path

    from sweep.docker import SubmissionError, write_submission
    from sweep.serve import export_problem

    problem = export_problem(Path(args.dir), args.merged)
    if problem:
        raise CliError(problem)
    try:
        out = write_submission(Path(args.dir), Path(args.out), merged=args.merged, force=args.force)
    except SubmissionError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"--out {args.out}: cannot write {e.filename or args.out} ({e.strerror or e}); pass an "
                       f"--out in a writable place") from None
    print(f"Wrote the Docker submission to {out}: docker build -t my-submission {out} && "
          f"docker run --gpus all -p 127.0.0.1:8080:80 my-submission")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from sweep.report import write_report

    study, status = _load_study(args)
    out = Path(args.out)
    try:
        index = write_report(status, study, out)
    except OSError as e:
        raise CliError(f"--out {args.out}: cannot write {e.filename or args.out} ({e.strerror or e}); pass an "
                       f"--out in a writable place") from None
    print(f"Report of study {study.study_name} ({len(status['trials'])} trial(s)): {index}")
    return 0


def cmd_lm_eval(argv: list[str]) -> int:
    """lm-eval's CLI, unchanged, with `--model sweep` registered (`evaluator.cli`); its errors are one line here
    too (the traceback on --debug)."""
    from evaluator.cli import main as lm_eval_main

    return lm_eval_main(argv)


def _config(path, overrides):
    """The loaded config; an invalid one is a one-line CLI error."""
    from sweep.config import ConfigError, load_config

    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise CliError(str(e)) from None


def cmd_validate(args) -> int:
    from sweep.preflight import PreflightError, check_config, check_study

    config = _config(args.file, args.overrides)
    try:
        if args.storage:
            check_study(config, args.storage, args.study or config.study.name)
        if not args.file_only:
            check_config(config)
    except PreflightError as e:
        raise CliError(str(e)) from None
    print(f"{args.file}: valid (study {config.study.name!r}, model {config.model.name_or_path}, "
          f"{len(config.search_space)} searched parameter(s), {len(config.evaluator.all_tasks())} task(s) "
          f"in suite(s) {', '.join(config.evaluator.suite_tasks())})")
    return 0


def _load_status(args) -> dict:
    return _load_study(args)[1]


def _load_study(args):
    """The study `--study` names in `--storage` (read-only), and its status (`sweep.export.study_status`)."""
    from sweep.export import study_status
    from sweep.store import Store
    from sweep.study import StudyError, load_existing_study, make_storage

    _check_storage(args.storage, write=False)
    # Read-only: reading never creates, converts or writes the database, and works on read-only media.
    try:
        study = load_existing_study(make_storage(args.storage, read_only=True), args.study)
    except StudyError as e:
        raise CliError(str(e)) from None
    return study, study_status(study, Store(args.storage, create=False, read_only=True))


def format_table(status: dict) -> str:
    lines = [f"Study {status['study']} ({status['direction']})"]
    base = status["baseline"]
    if base:
        lines.append(f"Baseline (untuned base): value={base['value']:.4f}"
                     + (f" ({_fmt_values(base['values'])})" if base.get("values") else ""))
    param_names = sorted({k for t in status["trials"] for k in t["params"]})
    others = [s for s in status.get("suites", []) if s != status.get("optimize")]
    header = ["#", "state", "value", *others, *[p.split(".")[-1] for p in param_names],
              "train s", "tok/s", "peak GiB", "full run h", "note"]
    rows = []
    pick = status.get("pick")
    if base and base.get("values"):  # the untuned base: a candidate for the pick, never a trial of the sampler
        rows.append(["base", "UNTUNED", f"{base['value']:.4f}", *[_number(base["values"].get(s), "{:.4f}")
                     for s in others], *[""] * len(param_names), "", "", "", "",
                     "<- pick (no adapter)" if pick and pick.get("untuned") else ""])
    for t in status["trials"]:
        note = t.get("fail_reason") or ("infeasible" if t.get("feasible") is False else "")
        if t["state"] == "PRUNED" and t.get("train_steps"):
            note = f"pruned at step {t['train_steps']}"
        if pick and pick["number"] == t["number"]:  # None when the base is the pick: no trial's
            note = "<- pick" + (f"; {note}" if note else "")
        rows.append([
            str(t["number"]), t["state"], "" if t["value"] is None else f"{t['value']:.4f}",
            *[_number(t.get("values", {}).get(s), "{:.4f}") for s in others],
            *[_cell(t["params"].get(p)) for p in param_names],
            _number(t.get("train_seconds"), "{:.1f}"), _number(t.get("tokens_per_second"), "{:.0f}"),
            _number(t.get("peak_memory_gib"), "{:.2f}"), _number(t.get("projected_full_run_hours"), "{:.2f}"),
            note[:60],
        ])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    best = status["best"]
    if best:
        on = f" on {status['optimize']}" if status.get("optimize") else ""
        lines.append(f"Best{on}: trial {best['number']} value={best['value']:.4f} adapter={best['adapter_dir']}")
    from sweep.export import pick_label

    if pick and pick.get("untuned") and not status.get("pick_by"):
        lines.append(f"Pick (best on {status.get('optimize')}, the untuned base included): the untuned base "
                     f"{_fmt_values(pick['values'])}: no trial beat it")
    elif pick and status.get("pick_by"):
        rho = status.get("rank_correlation")
        lines.append(
            f"Pick (best on {status['pick_by']} among the top {status['top_k']} on {status['optimize']}, the "
            f"untuned base included): {pick_label(pick)} {_fmt_values(pick['values'])}"
            + (f"; rank correlation {status['optimize']}/{status['pick_by']} = {rho:.2f}" if rho is not None else "")
        )
    return "\n".join(lines)


def _fmt_values(values: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def _number(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
