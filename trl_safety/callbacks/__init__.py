"""`TrainerCallback`s that bring parts of the defenses to any TRL or transformers trainer.

Names are imported lazily, so `import trl_safety.callbacks` stays cheap and a callback whose module is missing does
not break the others. Each callback adds one line to `_import_structure` (public name -> defining module).
"""

from __future__ import annotations

import importlib


_import_structure: dict[str, str] = {
    "HarmfulScoreCallback": "trl_safety.callbacks.harmful_score",
    "ProximalCallback": "trl_safety.callbacks.proximal",
    "LisaCallback": "trl_safety.callbacks.lisa",
    "AntidoteCallback": "trl_safety.defenses.antidote",
    "SafeLoRACallback": "trl_safety.defenses.safelora",
    "LoXCallback": "trl_safety.defenses.lox",
    "SafeMERGECallback": "trl_safety.defenses.safemerge",
    "SafeDeltaCallback": "trl_safety.defenses.safe_delta",
    "EmbeddingDriftCallback": "trl_safety.callbacks.drift",
    "VaccineCallback": "trl_safety.callbacks.vaccine",
    "AntibodyWeighting": "trl_safety.callbacks.antibody",
}

__all__ = sorted(_import_structure)


def __getattr__(name: str):
    if name in _import_structure:
        return getattr(importlib.import_module(_import_structure[name]), name)
    raise AttributeError(f"module 'trl_safety.callbacks' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_import_structure])
