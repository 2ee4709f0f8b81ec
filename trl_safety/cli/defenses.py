"""`trl-safety defenses`: list the registered defenses (built-in and from plugins), from their specs.

Grouped by stage in pipeline order (alignment, fine-tuning, post-fine-tuning: `registry.STAGES`), names sorted within
a stage; one heading line per stage, then one indented line per defense.
"""

from __future__ import annotations

from trl_safety.cli.checks import OneLineArgumentParser


def run(argv: list[str], prog: str, command: str) -> int:
    parser = OneLineArgumentParser(
        prog=prog, description="List the registered defenses, grouped by stage in pipeline order."
    )
    from trl_safety.registry import STAGES, list_defenses

    parser.add_argument("--stage", choices=STAGES, default=None, help="List only the defenses of this stage.")
    args = parser.parse_args(argv)

    specs = list_defenses(args.stage)
    if not specs:
        print("No defense registered.")
        return 0
    unsupported = {spec.name: ", ".join(spec.unsupported_backends) or "-" for spec in specs}
    width = max(len(spec.name) for spec in specs)
    backends_width = max(len(value) for value in unsupported.values())
    first = True
    for stage in STAGES:
        members = sorted((spec for spec in specs if spec.stage == stage), key=lambda spec: spec.name)
        if not members:
            continue
        if not first:
            print()
        first = False
        print(f"{stage}:")
        for spec in members:
            backends = unsupported[spec.name].ljust(backends_width)
            print(f"  {spec.name.ljust(width)}  unsupported: {backends}  {spec.description}")
    return 0
