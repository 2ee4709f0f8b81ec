"""Registry of defenses: each defense declares its identity once, in the `DefenseSpec` it registers.

A newcomer adds a defense by adding a folder whose `__init__.py` calls `register_defense`; an outside package does the
same through the `trl_safety.defenses` entry-point group (docs/design/adding_a_defense.md §8). Everything else (the
trainer's `defense_name` / `_paper` / `_tag_names`, `defense_config.json`, the CLI listing, the docs tables) is
derived from the spec.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import types
from dataclasses import dataclass, field


logger = logging.getLogger(__name__)

STAGES = ("alignment", "fine-tuning", "post-fine-tuning")
# Entry-point group through which an installed package registers its own defenses
ENTRY_POINT_GROUP = "trl_safety.defenses"
# Attributes `register_defense` writes onto a trainer class, derived from its spec; a class body must not set them
TRAINER_IDENTITY_ATTRIBUTES = (
    "defense_spec",
    "defense_name",
    "stage",
    "config_class",
    "_name",
    "_paper",
    "_tag_names",
    "licence_notes",
)
# Only `defense_spec` is written onto a config class; the others are refused there so no copy is kept on it either
CONFIG_IDENTITY_ATTRIBUTES = ("defense_spec", "defense_name", "_name", "_paper", "_tag_names", "licence_notes")


@dataclass(frozen=True)
class DefenseSpec:
    """The one declaration of a defense: what the trainer, the CLI, the bench, the model card and the docs know of it.

    Attributes:
        name: registry name (`"vaccine"`, `"lisa"`, …), also the `--defense` CLI value.
        stage: one of `alignment`, `fine-tuning`, `post-fine-tuning`.
        config_class: the `XConfig` dataclass.
        trainer_class: the `XTrainer` class, or None for post-hoc defenses.
        post_hoc: for post-fine-tuning defenses, a callable
            `(model, config, *, harmful_dataset=None, processing_class=None, base_model=None, aligned_model=None)`
            that repairs `model` in place and returns it (or the repaired model, when it is another object). It may
            also take `output_dir=` (where its statistics go) and `alignment_dataset=` (a safety set: harmful
            prompts → safe answers); callers pass those only when its signature has them.
        unsupported_backends: backends (`ddp`, `zero1`, `zero2`, `zero3`, `fsdp`) where the defense refuses to run.
            Derived from the trainer (`refused_backends()`, FSDP included until verified) for trainer defenses, so
            it is declared in one place; given here only for post-hoc defenses.
        title: human-readable name (model card title, `defense_config.json` `title`); defaults to `name`.
        paper: `{"title": …, "id": <arXiv id>, "citation": <BibTeX>}` of the defense's paper.
        description: one line for `--help` and the docs.
        licence_notes: licence caveats of the defense's own data or judge, shown on the model card.
        bench_overrides: config-field overrides the toy-world bench uses for this defense (its scale differs from a
            7B model's, e.g. a larger ρ); documented in the defense's docs page.
        paired_data: the trainer needs paired data: its `train_dataset` holds harmful prompts → refusals only, row i
            paired with row i of its `harmful_dataset` (the same prompt → a harmful answer), like RepNoise's
            paired-refusal file. The bench then trains it on such pairs instead of its mixed alignment set.
        neutral_overrides: config values that switch the defense off: the trainer is then bit for bit the plain
            `SFTTrainer`, and a post-hoc defense returns the model unchanged. None when the defense has no such
            setting (RepNoise: with α=β=0 it still trains only on the differing refusal tokens, docs/repnoise.md).
    """

    name: str
    stage: str
    config_class: type
    trainer_class: type | None = None
    post_hoc: object | None = None
    unsupported_backends: tuple[str, ...] | None = None
    title: str = ""
    paper: dict = field(default_factory=dict)
    description: str = ""
    licence_notes: tuple[str, ...] = ()
    bench_overrides: dict = field(default_factory=dict)
    paired_data: bool = False
    neutral_overrides: dict | None = None

    def __post_init__(self):
        if self.trainer_class is not None:
            # A trainer not built on `DefenseTrainerMixin` declares no refusals
            refused_backends = getattr(self.trainer_class, "refused_backends", dict)
            refused = tuple(refused_backends())
            # the derived value itself is accepted, so that `dataclasses.replace(spec, ...)` works
            if self.unsupported_backends is not None and tuple(self.unsupported_backends) != refused:
                raise ValueError(
                    f"Defense {self.name!r}: a trainer defense declares its backends on the trainer "
                    "(`unsupported_backends` class attribute), not in its DefenseSpec."
                )
        else:
            refused = tuple(self.unsupported_backends or ())
        # frozen dataclass: derived and normalised values are set once, here
        object.__setattr__(self, "unsupported_backends", refused)
        object.__setattr__(self, "title", self.title or self.name)
        object.__setattr__(self, "licence_notes", tuple(self.licence_notes))

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def tags(self) -> tuple[str, ...]:
        """Hub tags of a model it protects: TRL's `_tag_names` convention for trainers, plus the defense's name."""
        if self.trainer_class is not None:
            return ("trl", "sft", "trl-safety", self.name)
        return ("trl-safety", self.name)


_REGISTRY: dict[str, DefenseSpec] = {}
_LOADED = False


def _check_identity_not_declared(cls: type, attributes: tuple[str, ...], spec: DefenseSpec) -> None:
    """Refuse a class that states identity itself (it would be a second copy) or is bound to another defense."""
    bound = cls.__dict__.get("defense_spec")
    if bound is not None:
        if bound != spec:
            raise ValueError(
                f"{cls.__name__} already belongs to the defense {bound.name!r}; register {spec.name!r} with its own "
                "class (a subclass works)."
            )
        return
    declared = [name for name in attributes if name in cls.__dict__]
    if declared:
        raise ValueError(
            f"{cls.__name__} declares {', '.join(declared)} in its class body, but a defense's identity is declared "
            f"once, in its DefenseSpec: remove {'them' if len(declared) > 1 else 'it'} from {cls.__name__} "
            f"(register_defense writes them from the spec of {spec.name!r})."
        )


def _bind_identity(spec: DefenseSpec) -> None:
    trainer = spec.trainer_class
    if trainer is not None:
        trainer.defense_spec = spec
        trainer.defense_name = spec.name
        trainer.stage = spec.stage
        trainer.config_class = spec.config_class
        trainer._name = spec.title
        trainer._paper = dict(spec.paper)
        trainer._tag_names = list(spec.tags)
        trainer.licence_notes = list(spec.licence_notes)
    spec.config_class.defense_spec = spec


def register_defense(spec: DefenseSpec) -> DefenseSpec:
    """Register `spec` and write its identity onto its trainer class and config class.

    The trainer gets `defense_spec`, `defense_name`, `stage`, `config_class`, `_name` (the title), `_paper`,
    `_tag_names` and `licence_notes`; the config gets `defense_spec`. Registering the same spec again is a no-op; a
    different spec under a registered name, an unknown stage, or a class that sets any of these attributes itself
    raises `ValueError`.
    """
    if spec.stage not in STAGES:
        raise ValueError(f"Defense {spec.name!r} has unknown stage {spec.stage!r}; expected one of {STAGES}.")
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"A different defense is already registered as {spec.name!r}.")
    if spec.trainer_class is not None:
        _check_identity_not_declared(spec.trainer_class, TRAINER_IDENTITY_ATTRIBUTES, spec)
    _check_identity_not_declared(spec.config_class, CONFIG_IDENTITY_ATTRIBUTES, spec)
    _bind_identity(spec)
    _REGISTRY[spec.name] = spec
    return spec


def _load_plugin(entry_point) -> None:
    """An entry point names a module (importing it registers), a `DefenseSpec`, or a callable (called; a returned
    `DefenseSpec` is registered)."""
    target = entry_point.load()
    if isinstance(target, DefenseSpec):
        register_defense(target)
    elif callable(target) and not isinstance(target, types.ModuleType):
        result = target()
        if isinstance(result, DefenseSpec):
            register_defense(result)


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    seen = set()
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if (entry_point.name, entry_point.value) in seen:  # the same distribution found twice on the path
            continue
        seen.add((entry_point.name, entry_point.value))
        try:
            _load_plugin(entry_point)
        except Exception as error:  # a broken plugin must not take the built-in defenses down with it
            dist = getattr(entry_point, "dist", None)
            logger.warning(
                "Could not load the defense plugin %r (%s = %s, from the distribution %s): %s: %s. The other "
                "defenses are still available.",
                entry_point.name,
                ENTRY_POINT_GROUP,
                entry_point.value,
                dist.name if dist is not None else "unknown",
                type(error).__name__,
                error,
            )


def _load_defenses() -> None:
    """Import the built-in defense folders, then the `trl_safety.defenses` entry points; once per process."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True  # set first: a plugin that lists defenses while it loads must not load everything again
    try:
        import trl_safety.defenses as package

        for module in pkgutil.iter_modules(package.__path__):
            if module.ispkg:
                importlib.import_module(f"{package.__name__}.{module.name}")
    except BaseException:
        _LOADED = False  # a failed built-in import is an error of this package: raise it again on the next call
        raise
    _load_plugins()


def get_defense(name: str) -> DefenseSpec:
    _load_defenses()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown defense {name!r}. Available: {', '.join(sorted(_REGISTRY)) or 'none'}.")
    return _REGISTRY[name]


def list_defenses(stage: str | None = None) -> list[DefenseSpec]:
    _load_defenses()
    return [spec for name, spec in sorted(_REGISTRY.items()) if stage is None or spec.stage == stage]
