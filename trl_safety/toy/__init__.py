"""The embedded toy safety world: a synthetic world and its cached tiny base model (the bench is `trl_safety.bench`).

```python
from trl_safety.toy import ToyWorld, load_base_model

world = ToyWorld()
model, tokenizer, path = load_base_model()  # pretrained once, then read from the cache
alignment = world.alignment_dataset()
poisoned = world.poisoned_dataset(n=1000, p=0.1)
```

See `docs/toy_world.md`.
"""

from .model import BaseModelRecipe, base_model_path, default_cache_dir, load_base_model, toy_sft_config
from .world import (
    PROMPT_FORMAT,
    WORLD_VERSION,
    Request,
    ToyWorld,
    build_tokenizer,
    format_prompt,
    vocabulary,
    world_fingerprint,
)


__all__ = [
    "PROMPT_FORMAT",
    "WORLD_VERSION",
    "BaseModelRecipe",
    "Request",
    "ToyWorld",
    "base_model_path",
    "build_tokenizer",
    "default_cache_dir",
    "format_prompt",
    "load_base_model",
    "toy_sft_config",
    "vocabulary",
    "world_fingerprint",
]
