"""The bench's outputs: the `results.json` document, `tradeoff.png` and the printed table.

File names, keys and columns are the output contract of docs/design/architecture.md §10.1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from .config import STAGE_ORDER, BenchConfig


logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
TRADEOFF_PLOT = "tradeoff.png"


def results_document(
    config: BenchConfig, description: dict, calibration: dict, rows: list[dict], errors: dict, setup_seconds: float
) -> dict:
    """The `results.json` content from the run's settings, its calibration results (`EvalResult`s of the base, the
    SFT-aligned model and clean SFT, and their wall time) and its rows."""
    base, aligned, clean = calibration["base"], calibration["aligned"], calibration["clean"]
    main = [r for r in rows if r["p"] == config.p]
    sft_row = next(r for r in main if r["name"] == "sft")
    fas = [r["finetune_accuracy"] for r in main if r["finetune_accuracy"] is not None]
    document_calibration = {
        "base_hs": base.harmful_score,
        "aligned_hs": aligned.harmful_score,
        "sft_clean_hs": clean.harmful_score,
        "sft_hs": sft_row["harmful_score"],
        "min_fa": min(fas) if fas else None,
    }
    document_config = dataclasses.asdict(config)
    document_config.update(
        description,
        ratios=config.ratios,
        base_fa=base.finetune_accuracy,
        aligned_fa=aligned.finetune_accuracy,
        sft_clean_fa=clean.finetune_accuracy,
        setup_seconds=round(setup_seconds, 2),
        calibration_seconds=round(calibration["seconds"], 2),
    )
    if not config.sweep:
        rows = [{k: v for k, v in row.items() if k != "p"} for row in rows]
    return {"config": document_config, "calibration": document_calibration, "rows": rows, "errors": errors}


def write_outputs(results: dict, output_dir: str) -> dict:
    """Write `results.json` and `tradeoff.png` into `output_dir`; returns `results` with `plot` (the plot's path, or
    None without matplotlib)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2, default=str)
    results["plot"] = write_tradeoff_plot(results, os.path.join(output_dir, TRADEOFF_PLOT))
    return results


def write_tradeoff_plot(results: dict, path: str) -> str | None:
    """HS (y) against FA (x), one labelled point per row. Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            "matplotlib is not installed, so %s was not written. Install it with `pip install trl-safety[plot]`.",
            path,
        )
        return None
    rows = [r for r in results["rows"] if r.get("harmful_score") is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    # rows at the same point share one label (stacked names) instead of overprinting each other
    points: dict[tuple, list[str]] = {}
    for row in rows:
        label = row["name"] if "p" not in row else f"{row['name']} (p={row['p']})"
        color = "black" if row["defense"] is None else f"C{STAGE_ORDER.get(row['stage'], 0)}"
        ax.scatter(row["finetune_accuracy"], row["harmful_score"], color=color)
        points.setdefault((row["finetune_accuracy"], row["harmful_score"]), []).append(label)
    for (x, y), labels in points.items():
        ax.annotate(
            "\n".join(", ".join(labels[i : i + 3]) for i in range(0, len(labels), 3)),
            (x, y),
            fontsize=7,
            xytext=(-4, -4),
            textcoords="offset points",
            va="top",
            ha="right",
        )
    for stage, index in STAGE_ORDER.items():
        ax.scatter([], [], color=f"C{index}", label=f"{stage} defense")
    ax.scatter([], [], color="black", label="baseline")
    ax.set_xlabel("fine-tune accuracy (%) →  better")
    ax.set_ylabel("harmful score (%) →  worse")
    p = results["config"].get("p")
    ax.set_title(f"Harmful score vs fine-tune accuracy (p={p}, n={results['config'].get('n')})")
    ax.set_ylim(-5, 105)
    low = min((r["finetune_accuracy"] for r in rows), default=0.0)
    ax.set_xlim(max(-2.0, low - 30.0), 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(results: dict) -> str:
    """The results as a fixed-width table: HS, FA and wall time per stage."""
    sweep = any("p" in r for r in results["rows"])
    header = ["name", "stage"] + (["p"] if sweep else []) + ["HS %", "FA %", "align s", "ft s", "post s", "eval s"]
    lines = []
    for r in results["rows"]:
        s = r.get("seconds", {})

        def num(v, fmt="{:.1f}"):
            return "-" if v is None else fmt.format(v)

        cells = [r["name"], r["stage"] or "baseline"] + ([str(r["p"])] if sweep else [])
        cells += [num(r.get("harmful_score")), num(r.get("finetune_accuracy"))]
        cells += [num(s.get(k)) for k in ("align", "finetune", "post", "eval")]
        if r.get("error"):
            cells[-1] += f"  ERROR: {r['error'][:80]}"
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(cells, widths)) for cells in lines]
    cal = results["calibration"]
    out.append("")
    out.append("calibration: " + ", ".join(f"{k}={'-' if v is None else round(v, 1)}" for k, v in cal.items()))
    return "\n".join(out)
