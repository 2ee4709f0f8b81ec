"""`trl-safety` console script: dispatches to the subcommand modules in `trl_safety.cli`."""

from __future__ import annotations

import importlib
import importlib.util
import sys

from trl_safety.cli.checks import UsageError


# subcommand -> (module, help). A module exposes `run(argv, prog, command) -> int`; absent modules are not offered.
COMMANDS = {
    "align": ("trl_safety.cli.train", "Run an alignment-stage defense (Vaccine, Booster, …) on alignment data"),
    "sft": ("trl_safety.cli.train", "Fine-tune with plain SFT or a fine-tuning-stage defense (Lisa, Antibody, …)"),
    "merge": ("trl_safety.cli.merge", "Merge a LoRA adapter (e.g. the alignment stage's) into its base model"),
    "prune": ("trl_safety.cli.prune", "Repair a fine-tuned model with a post-fine-tuning defense (Antidote, …)"),
    "eval": ("trl_safety.cli.eval", "Evaluate harmful score and fine-tune accuracy of a model or adapter"),
    "bench": ("trl_safety.cli.bench", "Run the align → attack → defend → evaluate benchmark (toy world by default)"),
    "push": ("trl_safety.cli.push", "Push a saved defended model or adapter to the Hub with its card"),
    "defenses": ("trl_safety.cli.defenses", "List the registered defenses with their stage and backends"),
}


def available_commands() -> dict[str, tuple[str, str]]:
    return {name: entry for name, entry in COMMANDS.items() if importlib.util.find_spec(entry[0]) is not None}


def _usage(commands) -> str:
    width = max(len(name) for name in commands)
    lines = ["usage: trl-safety <command> [<args>]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_text}" for name, (_, help_text) in commands.items()]
    lines += ["", "Run `trl-safety <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available_commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(commands))
        return 0
    command = argv[0]
    if command not in commands:
        print(f"trl-safety: unknown command {command!r}.\n\n{_usage(commands)}", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[command][0])
    return run_command(module.run, argv[1:], prog=f"trl-safety {command}", command=command)


def run_command(run, argv: list[str], prog: str, command: str | None) -> int:
    """Call a subcommand's `run`. The one place that reports command-line mistakes: a `UsageError` (raised by the
    checks in `trl_safety.cli.checks` before any expensive work) is printed as one `<prog>: error: <message>` line on
    stderr, shaped like argparse's own errors, and exits with code 2. Any other exception keeps its traceback."""
    try:
        return int(run(argv, prog=prog, command=command) or 0)
    except UsageError as exc:
        message = " ".join(str(exc).splitlines())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
