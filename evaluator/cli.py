"""lm-eval's own command line with the evaluator's model registered: `--model sweep`.

    python -m evaluator.cli --model sweep --model_args pretrained=PATH --tasks NAME [lm-eval's other options]

lm-eval 0.4.13 discovers no plugins, so a backend outside lm-eval is known to its CLI only when the process
that runs the CLI has registered it: this entry point imports `evaluator.lm` (which registers `SweepLM` as
`sweep`) and hands the arguments, unchanged, to what the `lm-eval` command runs (its console entry point).
`--model_args` takes HFLM's arguments (`pretrained`, `dtype`, `device`, ...) and `SweepLM`'s own
(`generation_batch_size`, `memory_budget_gib`, `token_budget`).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Runs lm-eval's CLI on `argv` (None: this process's arguments) with `--model sweep` available; returns
    its exit status."""
    from importlib.metadata import entry_points

    import evaluator.lm  # noqa: F401  (registers `sweep` with lm-eval)

    (command,) = entry_points(group="console_scripts", name="lm-eval")
    cli_evaluate = command.load()
    # lm-eval's CLI reads sys.argv itself (and inserts its `run` subcommand there).
    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
