"""`trl-safety defenses`: list registered defenses."""

from __future__ import annotations

import argparse


def run(argv: list[str], prog: str, command: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="List the registered defenses.")
    parser.add_argument("--stage", choices=["alignment", "fine-tuning", "post-fine-tuning"], default=None)
    args = parser.parse_args(argv)

    from trl_safety.registry import list_defenses

    specs = list_defenses(args.stage)
    if not specs:
        print("No defense registered.")
        return 0
    width = max(len(spec.name) for spec in specs)
    for spec in specs:
        unsupported = ", ".join(spec.unsupported_backends) or "-"
        print(f"{spec.name.ljust(width)}  {spec.stage:<17} unsupported: {unsupported:<12} {spec.description}")
    return 0
