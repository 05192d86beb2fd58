"""The `sweep` command line: help, quick answers, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sweep.cli import build_parser


def run_cli(*args, cwd=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("start", "status", "export", "dashboard", "validate", "contamination", "report", "serve",
                    "submission", "lm-eval"):
        assert command in result.stdout


def test_lm_eval_takes_lm_evals_own_arguments_and_other_commands_still_refuse_unknown_ones(capsys):
    """`sweep lm-eval ...` hands every argument to lm-eval's CLI, its own --help included (the scoring through it
    is tests/evaluator/test_cli.py's); the other commands still refuse arguments they do not know."""
    from sweep.cli import main

    assert main(["lm-eval", "--help"]) == 0
    assert "usage: lm-eval" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["status", "--model", "sweep"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --model sweep" in capsys.readouterr().err


@pytest.mark.parametrize("command,flags", [
    ("start", ["--config", "--gpu", "--trials", "--study", "--storage", "--set", "--address", "--concurrency",
               "--budget-hours", "--timeout"]),
    ("status", ["--study", "--storage", "--format"]),
    ("export", ["--study", "--storage", "--pick", "--best", "--trial", "--out"]),
    ("contamination", ["--config", "--set", "--format"]),
    ("dashboard", ["--storage", "--host", "--port", "--artifacts", "--allow-writes"]),
    ("report", ["--study", "--storage", "--out"]),
    ("serve", ["--host", "--port", "--merged", "--device"]),
    ("submission", ["--out", "--merged", "--force"]),
])
def test_subcommand_help_names_the_contract_flags(command, flags):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    for flag in flags:
        assert flag in result.stdout


def test_parser_defaults():
    args = build_parser().parse_args(["start"])
    assert args.config is None and args.gpu is None and args.trials is None
    assert args.storage == "sqlite:///studies.db"
    args = build_parser().parse_args(["status"])
    assert args.format == "table"


def test_cli_module_imports_no_heavy_library():
    code = (
        "import sys, sweep.cli; sweep.cli.build_parser(); "
        "heavy = [m for m in ('torch', 'ray', 'optuna', 'lm_eval', 'transformers') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_status_without_database_is_a_one_line_error(tmp_path):
    result = run_cli("status", cwd=tmp_path)
    assert result.returncode == 2
    assert "no database" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "studies.db").exists()


def test_export_needs_best_or_trial(tmp_path):
    result = run_cli("export", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode != 0
    assert "--best" in result.stderr


@pytest.mark.parametrize("args, needle", [
    (["validate", "bin.yaml"], "bin.yaml: not a text file"),
    (["validate", "broken.yaml"], "not valid YAML (expected the node content, but found '<stream end>' at line 2"),
    (["status", "--storage", "missing/x.db"], "no database at missing/x.db"),
    (["status", "--storage", "sqlite:///bin.yaml"], "cannot use the database (file is not a database)"),
    (["status", "--storage", "bin.yaml"], "cannot use the database (file is not a database)"),
    (["status", "--storage", "nosuch://x"], "not a database URL"),
    (["start", "--storage", "sqlite:///bin.yaml", "--trials", "1"], "cannot use the database"),
])
def test_bad_files_and_storages_are_one_line_errors(tmp_path, args, needle):
    binary = bytes(range(256)) * 4
    (tmp_path / "bin.yaml").write_bytes(binary)
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sweep ")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "bin.yaml").read_bytes() == binary  # the file named as a database is left alone
    assert not (tmp_path / "missing").exists()
