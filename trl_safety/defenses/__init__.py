"""One folder per defense. Each folder's `__init__.py` registers its defense with `trl_safety.registry`."""
