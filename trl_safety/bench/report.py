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
CURVES_PLOT = "curves.png"


def results_document(
    config: BenchConfig, description: dict, calibration: dict, rows: list[dict], errors: dict, setup_seconds: float
) -> dict:
    """The `results.json` content from the run's settings, its calibration (`EvalResult`s of the base and the
    SFT-aligned model before fine-tuning, the SFT rows over the calibration ratios, and their wall time) and its rows."""
    base, aligned, sft_by_p = calibration["base"], calibration["aligned"], calibration["sft_by_p"]
    main = [r for r in rows if r["p"] == config.p]
    sft_row = next(r for r in main if r["name"] == "sft")
    fas = [r["finetune_accuracy"] for r in main if r["finetune_accuracy"] is not None]
    clean = sft_by_p.get(0.0, {})
    document_calibration = {
        "base_hs": base.harmful_score,
        "aligned_hs": aligned.harmful_score,
        "sft_clean_hs": clean.get("harmful_score"),
        "sft_hs": sft_row["harmful_score"],
        "sft_hs_by_p": {str(p): r["harmful_score"] for p, r in sft_by_p.items()},
        "sft_hs_std_by_p": {str(p): r["harmful_score_std"] for p, r in sft_by_p.items()},
        "base_fa": base.finetune_accuracy,
        "sft_fa": sft_row["finetune_accuracy"],
        "min_fa": min(fas) if fas else None,
    }
    document_config = dataclasses.asdict(config)
    document_config.update(
        description,
        seeds=config.seed_list,
        ratios=config.ratios,
        base_fa=base.finetune_accuracy,
        aligned_fa=aligned.finetune_accuracy,
        sft_clean_fa=clean.get("finetune_accuracy"),
        setup_seconds=round(setup_seconds, 2),
        calibration_seconds=round(calibration["seconds"], 2),
    )
    if not config.sweep:
        rows = [{k: v for k, v in row.items() if k != "p"} for row in rows]
    return {"config": document_config, "calibration": document_calibration, "rows": rows, "errors": errors}


def write_outputs(results: dict, output_dir: str) -> dict:
    """Write `results.json`, `tradeoff.png` and `curves.png` into `output_dir`; returns `results` with `plot` and
    `curves_plot` (the plots' paths, or None without matplotlib)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2, default=str)
    results["plot"] = write_tradeoff_plot(results, os.path.join(output_dir, TRADEOFF_PLOT))
    results["curves_plot"] = (
        write_curves_plot(results, os.path.join(output_dir, CURVES_PLOT)) if results["plot"] else None
    )
    return results


def _pyplot(path: str):
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
    return plt


def _label(row: dict) -> str:
    return row["name"] if "p" not in row else f"{row['name']} (p={row['p']})"


def _title_ratio(results: dict) -> str:
    ratios = results["config"].get("ratios") or [results["config"].get("p")]
    return f"p={ratios[0]}" if len(ratios) == 1 else "p=" + ", ".join(str(p) for p in ratios)


def write_curves_plot(results: dict, path: str) -> str | None:
    """HS (y) over fine-tuning steps (x), one line per row with a ±1 std band over the seeds."""
    plt = _pyplot(path)
    if plt is None:
        return None
    rows = [r for r in results["rows"] if r.get("curve")]
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    for i, row in enumerate(rows):
        steps = [point["step"] for point in row["curve"]]
        mean = [point["harmful_score"] for point in row["curve"]]
        std = [point["harmful_score_std"] or 0.0 for point in row["curve"]]
        baseline = row["defense"] is None
        color = ("black" if row["name"] == "sft" else "gray") if baseline else f"C{i % 10}"
        style = ("-" if row["name"] == "sft" else "--") if baseline else styles[(i // 10) % len(styles)]
        ax.plot(steps, mean, style, color=color, label=_label(row), marker=".")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                        alpha=0.12)  # fmt: skip
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("harmful score (%) →  worse")
    seeds = len(results["config"].get("seeds") or [0])
    ax.set_title(f"Harmful score during fine-tuning ({_title_ratio(results)}, mean ± std over {seeds} seeds)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_tradeoff_plot(results: dict, path: str) -> str | None:
    """HS (y) against FA (x), one labelled point per row with ±1 std error bars over the seeds. Returns the path, or
    None when matplotlib is missing."""
    plt = _pyplot(path)
    if plt is None:
        return None
    rows = [r for r in results["rows"] if r.get("harmful_score") is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    # rows at the same point share one label (stacked names) instead of overprinting each other
    points: dict[tuple, list[str]] = {}
    for row in rows:
        label = _label(row)
        color = "black" if row["defense"] is None else f"C{STAGE_ORDER.get(row['stage'], 0)}"
        ax.errorbar(
            row["finetune_accuracy"],
            row["harmful_score"],
            xerr=row.get("finetune_accuracy_std") or 0.0,
            yerr=row.get("harmful_score_std") or 0.0,
            color=color,
            fmt="o",
            markersize=4,
            capsize=2,
            elinewidth=0.8,
        )
        points.setdefault((round(row["finetune_accuracy"], 1), round(row["harmful_score"], 1)), []).append(label)
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
    seeds = len(results["config"].get("seeds") or [0])
    ax.set_title(
        f"Harmful score vs fine-tune accuracy ({_title_ratio(results)}, n={results['config'].get('n')}, "
        f"mean ± std over {seeds} seeds)",
        fontsize=9,
    )
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
    """The results as a fixed-width table: HS, FA (mean ± std over the seeds), harmful loss and wall time per stage."""
    sweep = any("p" in r for r in results["rows"])
    header = ["name", "stage"] + (["p"] if sweep else [])
    header += ["HS %", "FA %", "harm loss", "align s", "ft s", "post s", "eval s"]
    lines = []

    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    def pm(r, key, fmt="{:.1f}"):
        v, std = r.get(key), r.get(f"{key}_std")
        return num(v, fmt) if std is None else f"{num(v, fmt)} ± {num(std, fmt)}"

    for r in results["rows"]:
        s = r.get("seconds", {})
        cells = [r["name"], r["stage"] or "baseline"] + ([str(r["p"])] if sweep else [])
        cells += [pm(r, "harmful_score"), pm(r, "finetune_accuracy"), pm(r, "harmful_loss", "{:.2f}")]
        cells += [num(s.get(k)) for k in ("align", "finetune", "post", "eval")]
        if r.get("error"):
            cells[-1] += f"  ERROR: {r['error'][:80]}"
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(cells, widths)) for cells in lines]
    cal = results["calibration"]
    out.append("")
    seeds = results["config"].get("seeds")
    out.append(f"mean ± std over seeds {seeds}; align s: once per row (shared by its seeds)")
    scalars = {k: v for k, v in cal.items() if not isinstance(v, dict)}
    out.append("calibration: " + ", ".join(f"{k}={'-' if v is None else round(v, 1)}" for k, v in scalars.items()))
    by_p = cal.get("sft_hs_by_p") or {}
    out.append("SFT HS by p: " + ", ".join(f"{p}: {'-' if v is None else round(v, 1)}" for p, v in by_p.items()))
    return "\n".join(out)
