"""YAML `--config` files of the `trl-safety` commands, read as `trl sft --config` reads them, with checked keys.

Every key is a flag name without its dashes (`learning_rate: 1.0e-5`); the command line overrides the file. The keys
a command handles before its argument parser (`defense`, and for `align`/`sft` the `accelerate launch` options such as
`num_processes` or `accelerate_config`) are taken out first; any other key the parser does not know is a typo and a
one-line `UsageError` naming the closest valid key, where TRL would forward it to `accelerate launch`, whose usage
text hides the mistake.
"""

from __future__ import annotations

import dataclasses
import os

from trl_safety.cli.checks import UsageError, check_config_file, did_you_mean


def pop_config_path(argv: list[str], flag: str = "--config") -> tuple[str | None, list[str]]:
    """Take `--config FILE` (or `--config=FILE`) out of argv; the file must exist."""
    check_config_file(argv, flag)
    for index, arg in enumerate(argv):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1], argv[:index] + argv[index + 1 :]
        if arg == flag:
            return argv[index + 1], argv[:index] + argv[index + 2 :]
    return None, list(argv)


def load_config_file(path: str | None) -> dict:
    """The mapping in a YAML config file (empty without one); its `env:` block is exported, as TRL's parser does."""
    if path is None:
        return {}
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UsageError(f"--config {path!r} must hold a YAML mapping of option names to values.")
    env = config.pop("env", {}) or {}
    if not isinstance(env, dict):
        raise UsageError(f"--config {path!r}: `env` must be a mapping of variable names to values.")
    for key, value in env.items():
        os.environ[key] = str(value)
    return config


def parser_field_names(parser) -> list[str]:
    """The option names (dataclass fields) an `HfArgumentParser` parses."""
    return [f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init]


def apply_config(parser, config: dict, path: str, also_valid: tuple[str, ...] = ()) -> None:
    """Make `config`'s values the parser's defaults (`TrlParser.set_defaults_with_config`); an unknown key is a
    `UsageError` naming the closest option. `also_valid` names keys the caller took out already (for the hint)."""
    remaining = parser.set_defaults_with_config(**config)
    unknown = [item[2:] for item in remaining[::2]]
    if unknown:
        key = unknown[0]
        hint = did_you_mean(key, [*parser_field_names(parser), *also_valid])
        raise UsageError(f"--config {path!r}: unknown key {key!r}{hint or '.'}")


def trl_parser(dataclass_types, **kwargs):
    """TRL's `TrlParser` with one-line errors (`checks.OneLineErrors`): a missing required option or a bad value is
    `<prog>: error: ...` without argparse's usage block, which runs to hundreds of lines for the training options."""
    from trl import TrlParser

    from trl_safety.cli.checks import OneLineErrors

    class Parser(OneLineErrors, TrlParser):
        pass

    return Parser(dataclass_types, **kwargs)


def check_flags(argv: list[str], parser, also_valid: tuple[str, ...] = ()) -> None:
    """Every `--flag` of argv is an option of `parser` (or an unambiguous prefix of one, as argparse accepts) or one
    of `also_valid` (names without dashes): checked before parsing, so a typo is reported as such, with the closest
    option, and not as the required option it misses."""
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    allowed = {f"--{name}" for name in also_valid}
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") or flag in allowed or any(o.startswith(flag) for o in options):
            continue
        hint = did_you_mean(flag, [*options, *allowed]).replace("'", "")
        raise UsageError(f"unrecognized argument {flag}{hint}")


def reject_unknown_flags(remaining: list[str], parser, also_valid: tuple[str, ...] = ()) -> None:
    """The first flag an `HfArgumentParser` left over (`return_remaining_strings=True`) as one line, with the closest
    option (argparse's own message for it lists no candidates); any other leftover token is a stray value."""
    names = [*parser_field_names(parser), *also_valid]
    for arg in remaining:
        flag = arg.split("=", 1)[0]
        if flag.startswith("-"):
            hint = did_you_mean(flag.lstrip("-"), names, prefix="--").replace("'", "")
            raise UsageError(f"unrecognized argument {flag}{hint}")
    if remaining:
        raise UsageError(f"unrecognized argument {remaining[0]!r} (a value without its flag)")


def parse_args_with_config(parser, argv: list[str]):
    """`parser.parse_args(argv)` for a plain `argparse` parser, with `--config FILE`: each key is an option name
    without dashes (`output_dir: out`, `no_progress: true`; a positional by its name), its value becomes the option's
    default (a required option is then satisfied), and flags on the command line override the file."""
    config_path, rest = pop_config_path(argv)
    values = load_config_file(config_path)
    by_name = {}
    for action in parser._actions:
        names = [option[2:] for option in action.option_strings if option.startswith("--")]
        for name in names or ([action.dest] if not action.option_strings else []):
            by_name.setdefault(name, action)
    by_name.pop("help", None)
    by_name.pop("config", None)
    for key, value in values.items():
        action = by_name.get(key)
        if action is None:
            hint = did_you_mean(key, list(by_name))
            raise UsageError(f"--config {config_path!r}: unknown key {key!r}{hint or '.'}")
        # A switch (`store_true` / `store_false`): the key says whether the flag is given
        action.default = (not value) if action.const is False and action.nargs == 0 else value
        action.required = False
        if not action.option_strings:  # a positional: optional once the file names it
            action.nargs = "?"
    return parser.parse_args(rest)
