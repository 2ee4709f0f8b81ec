"""`trl-safety defenses`: list the registered defenses (built-in and from plugins), from their specs."""

from __future__ import annotations

import argparse


def run(argv: list[str], prog: str, command: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="List the registered defenses.")
    from trl_safety.registry import STAGES, list_defenses

    parser.add_argument("--stage", choices=STAGES, default=None)
    args = parser.parse_args(argv)

    specs = list_defenses(args.stage)
    if not specs:
        print("No defense registered.")
        return 0
    unsupported = {spec.name: ", ".join(spec.unsupported_backends) or "-" for spec in specs}
    width = max(len(spec.name) for spec in specs)
    backends_width = max(len(value) for value in unsupported.values())
    for spec in specs:
        backends = unsupported[spec.name].ljust(backends_width)
        print(f"{spec.name.ljust(width)}  {spec.stage:<17} unsupported: {backends}  {spec.description}")
    return 0
