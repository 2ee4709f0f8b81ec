"""The benchmark pipeline behind `trl-safety bench`: align → poisoned fine-tuning → repair → evaluate, per defense.

- `config`: `BenchConfig` (shared, toy-world and real-model fields) and `real_defaults`;
- `data`: the data sources, the toy world's and the papers' (`BenchData`);
- `runner`: `BenchRunner` and `run_bench`;
- `report`: `results.json`, `tradeoff.png`, `curves.png` and the table (docs/design/architecture.md §10.1).

```python
from trl_safety.bench import BenchConfig, format_table, run_bench

results = run_bench(BenchConfig(defenses=["lisa"], output_dir="bench-out"))
print(format_table(results))
```

See `docs/toy_world.md`.
"""

from .config import BASELINES, STAGE_ORDER, BenchConfig, real_defaults
from .data import BenchData, load_bench_data, toy_recipe
from .report import format_table, results_document, write_curves_plot, write_outputs, write_tradeoff_plot
from .runner import BenchRunner, aggregate_seeds, harmful_loss, run_bench


__all__ = [
    "BASELINES",
    "STAGE_ORDER",
    "BenchConfig",
    "BenchData",
    "BenchRunner",
    "aggregate_seeds",
    "format_table",
    "harmful_loss",
    "load_bench_data",
    "real_defaults",
    "results_document",
    "run_bench",
    "toy_recipe",
    "write_curves_plot",
    "write_outputs",
    "write_tradeoff_plot",
]
