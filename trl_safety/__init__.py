"""trl_safety: defenses against harmful fine-tuning attacks as drop-in TRL trainers, callbacks and evaluation.

Public names are imported lazily (importing TRL takes seconds). Defense classes (`VaccineTrainer`, `LisaConfig`, …)
are found in the defense folders under `trl_safety.defenses`, callbacks in `trl_safety.callbacks`, evaluation and data
helpers in `trl_safety.eval` / `trl_safety.data`; the rest comes from the table below.
"""

from __future__ import annotations

import importlib
import pkgutil


__version__ = "0.1.0.dev0"

# public name -> module that defines it (non-defense API)
_import_structure: dict[str, str] = {
    "DefenseSpec": "trl_safety.registry",
    "get_defense": "trl_safety.registry",
    "list_defenses": "trl_safety.registry",
    "register_defense": "trl_safety.registry",
    "DefenseTrainerMixin": "trl_safety.core.trainer",
}


def _defense_exports() -> dict[str, str]:
    import trl_safety.callbacks as callbacks
    import trl_safety.defenses as package

    exports = dict(callbacks._import_structure)
    for module_name in ("trl_safety.eval", "trl_safety.data"):
        exports.update(dict.fromkeys(getattr(importlib.import_module(module_name), "__all__", []), module_name))
    for module in pkgutil.iter_modules(package.__path__):
        if module.ispkg:
            name = f"{package.__name__}.{module.name}"
            for export in getattr(importlib.import_module(name), "__all__", []):
                exports[export] = name
    return exports


def __getattr__(name: str):
    if name in _import_structure:
        return getattr(importlib.import_module(_import_structure[name]), name)
    if not name.startswith("_"):
        exports = _defense_exports()
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
    raise AttributeError(f"module 'trl_safety' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_import_structure, *_defense_exports()])
