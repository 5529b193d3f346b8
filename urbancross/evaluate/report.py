"""The cross-domain table (trained-on x tested-on) as JSON, Markdown and a PNG heatmap.

Pure functions of the evaluation records, so the report can be rebuilt from a saved
`cross_domain.json` without re-running any model. A record is one (model, test domain):
`model`, `trained_on`, `adapted_to` (None for a source model), `tested_on`, the keys of
`retrieval_metrics` (`i2t_r1` ... `mR`) and the same under `smr` (after re-ranking) and, for a
model that fuses segments, under `image_only` (the tile's embedding without its segments).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from urbancross import atomic

Record = dict[str, Any]


def model_label(record: Record) -> str:
    """`source (Finland)` / `adapted (Finland→Spain)`: what a table row was trained on."""
    where = record["trained_on"] if not record.get("adapted_to") else f"{record['trained_on']}→{record['adapted_to']}"
    return f"{record['model']} ({where})"


def pivot(
    records: Sequence[Record], metric: str = "mR", smr: bool = False, scoring: str = ""
) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Rows (model labels, in first-seen order) x columns (test domains) of one metric, plain or
    of one `scoring` (`smr`, `image_only`; `smr=True` = `scoring="smr"`); rows without it are left out."""
    scoring = "smr" if smr else scoring
    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], float] = {}
    for r in records:
        if scoring and scoring not in r:
            continue
        row, col = model_label(r), r["tested_on"]
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cells[row, col] = float((r[scoring] if scoring else r)[metric])
    return rows, cols, [[cells.get((row, col)) for col in cols] for row in rows]


def to_markdown(records: Sequence[Record], metric: str = "mR") -> str:
    """One table per scoring (plain, SMR re-ranked, image only): trained-on rows x tested-on columns.

    A model that fuses segments is scored plain (fused) and image-only, both in the report; a
    CMPAGL model also after matching-head re-scoring, without and with SMR."""
    parts = []
    titles = {"": metric, "smr": f"{metric} with SMR re-ranking", "image_only": f"{metric}, image only (without segments)",
              "stage_itm": f"{metric}, CMPAGL: top k re-scored by the matching head",
              "stage_itm_smr": f"{metric}, CMPAGL: top k re-scored by the matching head, then SMR"}
    # CMPAGL's `stages`: prealign = the plain table, prealign_smr = the SMR one; the other two get their own
    records = [{**r, **{f"stage_{k}": v for k, v in r.get("stages", {}).items()}} for r in records]
    for scoring, title in titles.items():
        if scoring and not any(scoring in r for r in records):
            continue
        if scoring == "smr" and not all("smr" in r for r in records):
            continue
        rows, cols, values = pivot(records, metric, scoring=scoring)
        lines = [f"### {title}", "", "| model \\ tested on | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for row, vals in zip(rows, values):
            lines.append(f"| {row} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in vals) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot_heatmap(records: Sequence[Record], path: str | os.PathLike, metric: str = "mR") -> None:
    """Heatmaps (plain | SMR) of `metric`, one cell per (model, test domain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [False] + ([True] if all("smr" in r for r in records) else [])
    rows, cols, _ = pivot(records, metric)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(cols) * len(panels) + 3, 0.6 * len(rows) + 2), squeeze=False)
    for ax, smr in zip(axes[0], panels):
        _, _, values = pivot(records, metric, smr)
        grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(100.0, float(np.nanmax(grid))), aspect="auto")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("tested on")
        ax.set_title(f"{metric} (SMR)" if smr else metric)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black")
    fig.tight_layout()
    atomic.write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_report(records: Sequence[Record], out_dir: str | os.PathLike, stem: str = "cross_domain") -> dict[str, str]:
    """Write `<stem>.json`, `.md`, `.png` under `out_dir` (each atomically); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: str(out / f"{stem}.{kind}") for kind in ("json", "md", "png")}
    atomic.write_json(paths["json"], list(records), indent=2, sort_keys=True)
    atomic.write_text(paths["md"], to_markdown(records))
    plot_heatmap(records, paths["png"])
    return paths


