"""Registry of defenses: a newcomer adds a defense by adding a folder that calls `register_defense`."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field


STAGES = ("alignment", "fine-tuning", "post-fine-tuning")


@dataclass(frozen=True)
class DefenseSpec:
    """What the CLI, the bench and the docs need to know about a defense.

    Attributes:
        name: registry name (`"vaccine"`, `"lisa"`, …), also the `--defense` CLI value.
        stage: one of `alignment`, `fine-tuning`, `post-fine-tuning`.
        config_class: the `XConfig` dataclass.
        trainer_class: the `XTrainer` class, or None for post-hoc defenses.
        post_hoc: for post-fine-tuning defenses, a callable
            `(model, config, *, harmful_dataset=None, processing_class=None, base_model=None, aligned_model=None)`
            that repairs `model` in place and returns it.
        unsupported_backends: backends (`ddp`, `zero1`, `zero2`, `zero3`, `fsdp`) where the defense refuses to run.
            Derived from the trainer (`refused_backends()`, FSDP included until verified) for trainer defenses, so
            it is declared in one place; given here only for post-hoc defenses.
        description: one line for `--help` and the docs.
        bench_overrides: config-field overrides the toy-world bench uses for this defense (its scale differs from a
            7B model's, e.g. a larger ρ); documented in the defense's docs page.
        paired_data: the trainer needs paired data: its `train_dataset` holds harmful prompts → refusals only, row i
            paired with row i of its `harmful_dataset` (the same prompt → a harmful answer), like RepNoise's
            paired-refusal file. The bench then trains it on such pairs instead of its mixed alignment set.
    """

    name: str
    stage: str
    config_class: type
    trainer_class: type | None = None
    post_hoc: object | None = None
    unsupported_backends: tuple[str, ...] | None = None
    description: str = ""
    bench_overrides: dict = field(default_factory=dict)
    paired_data: bool = False

    def __post_init__(self):
        if self.trainer_class is not None:
            if self.unsupported_backends is not None:
                raise ValueError(
                    f"Defense {self.name!r}: a trainer defense declares its backends on the trainer "
                    "(`unsupported_backends` class attribute), not in its DefenseSpec."
                )
            # A trainer not built on `DefenseTrainerMixin` declares no refusals
            refused_backends = getattr(self.trainer_class, "refused_backends", dict)
            refused = tuple(refused_backends())
        else:
            refused = tuple(self.unsupported_backends or ())
        object.__setattr__(self, "unsupported_backends", refused)  # frozen dataclass: set once, here

    def __hash__(self) -> int:
        return hash(self.name)


_REGISTRY: dict[str, DefenseSpec] = {}


def register_defense(spec: DefenseSpec) -> DefenseSpec:
    if spec.stage not in STAGES:
        raise ValueError(f"Defense {spec.name!r} has unknown stage {spec.stage!r}; expected one of {STAGES}.")
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"A different defense is already registered as {spec.name!r}.")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin_defenses() -> None:
    import trl_safety.defenses as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.ispkg:
            importlib.import_module(f"{package.__name__}.{module.name}")


def get_defense(name: str) -> DefenseSpec:
    _load_builtin_defenses()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown defense {name!r}. Available: {', '.join(sorted(_REGISTRY)) or 'none'}.")
    return _REGISTRY[name]


def list_defenses(stage: str | None = None) -> list[DefenseSpec]:
    _load_builtin_defenses()
    return [spec for name, spec in sorted(_REGISTRY.items()) if stage is None or spec.stage == stage]
