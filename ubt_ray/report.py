"""What the commands show and save as results, in one place: the tables they print (Markdown, plain), the
charts (PNG) and the report files (Markdown, CSV, JSON, PNG) written through `storage` (local or s3://)."""

from __future__ import annotations

import csv
import io
import math
from typing import Sequence

import numpy as np

from . import storage
from .config import Config
from .core.search import Dimension


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()


def csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    """`rows` as CSV with a header of `columns` (other keys left out, missing ones empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_report_files(output: str, stem: str, cfg: Config, rows: list[dict], columns: Sequence[str],
                       markdown: str, png: bytes | None = None, extra: dict | None = None) -> None:
    """<output>/<stem>.md, .csv, .json ({"rows": rows, **extra}) and, when given, .png."""
    storage.write_bytes(storage.join(output, f"{stem}.md"), markdown.encode(), cfg.storage)
    storage.write_bytes(storage.join(output, f"{stem}.csv"), csv_text(rows, columns).encode(), cfg.storage)
    storage.write_json(storage.join(output, f"{stem}.json"), {"rows": rows, **(extra or {})}, cfg.storage)
    if png is not None:
        storage.write_bytes(storage.join(output, f"{stem}.png"), png, cfg.storage)


# Display names of the defenses in comparison tables and charts.
LABELS = {"none": "no defense", "ft": "FT", "cleanclip": "CleanCLIP", "ubt": "UBT"}


def percent(x: float | None) -> str:
    """A rate as a percentage with one decimal, or n/a."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def plain_table(summary: dict) -> str:
    """A summary's plain (non-nested) values, one `key  value` a line."""
    items = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))]
    width = max((len(k) for k, _ in items), default=0)
    return "\n".join(f"{k:<{width}}  {'-' if v is None else v}" for k, v in items)


def before_after_table(report: dict) -> str:
    """CA (training prompts and held-out prompts), ASR and ASR's floor (clean non-target images called the
    target) of θ₀ and of the cleaned model."""
    rows = [(name, report[part] or {}) for name, part in (("before (θ₀)", "before"), ("after UBT", "after"))]
    return "\n".join(["| model | CA | CA (held-out prompts) | ASR | ASR floor (no trigger) |",
                      "|---|---|---|---|---|"] + [
        f"| {name} | {percent(m.get('clean_accuracy'))} | {percent(m.get('clean_accuracy_heldout'))} | "
        f"{percent(m.get('attack_success_rate'))} | {percent(m.get('clean_target_rate'))} |" for name, m in rows])


def format_report(report: dict) -> str:
    """The report as Markdown: before/after table, detection, and every phase's rows and time."""
    lines = [f"# UBT defense report: {report['run']}", "",
             f"Model: `{report['model']}`  ", f"Data: `{report['data']}`  ",
             f"Cleaned model: `{report['cleaned_model']}`", "", before_after_table(report), ""]
    det = report.get("detection")
    if det and "auroc" in det:
        pk = ", ".join(f"{k.split('@')[0]}@{k.split('@')[1]} {v:.2f}" for k, v in det.items() if "@" in k)
        lines += [f"Detection ({det['poisons']} poisons in {det['rows']} rows): AUROC {det['auroc']:.3f}; {pk}", ""]
    sel = report["selection"]
    if "forget_precision" in sel:
        lines += [f"Forget set: {sel['num_forget']} rows, {sel['forget_poisons']} poisoned "
                  f"({percent(sel['forget_precision'])}); retain set: {sel['num_retain']} rows, "
                  f"{sel['retain_poisons']} poisoned.", ""]
    lines += ["| phase | rows | wall time | forward / backward passes | reserved CPU-s | reserved GPU-s |",
              "|---|---|---|---|---|---|"]
    for name, p in report["phases"].items():
        lines.append(f"| {name} | {p.get('rows', '')} | {p['wall_time_s']:.1f} s | {_cost_cells(p.get('cost'))}")
    lines += [f"| **defense total** | | **{report['defense_wall_time_s']:.1f} s** | "
              f"{_cost_cells(report.get('cost'))}", ""]
    return "\n".join(lines)


def _cost_cells(cost: dict | None) -> str:
    """The cost columns of a report row (cost.py's block), blank without one."""
    if not cost:
        return " | | |"
    return (f"{cost['forward_sample_passes']:,} / {cost['backward_sample_passes']:,} | "
            f"{cost['reserved_cpu_seconds']:,.0f} | {cost['reserved_gpu_seconds']:,.0f} |")


def selection_cutoff(scores: np.ndarray, k: int) -> float | None:
    """The k-th largest score, the lowest that select can still put in the forget set (None without rows)."""
    if not len(scores) or k < 1:
        return None
    return float(np.partition(scores, len(scores) - min(k, len(scores)))[len(scores) - min(k, len(scores))])


def histogram_png(scores: np.ndarray, truth: np.ndarray, method: str, cutoff: float | None = None) -> bytes:
    """Score histogram of clean and poisoned rows (counts on a log axis, shared bins) as PNG bytes, with the
    selection's cut-off and how many clean and poisoned rows lie above it: the forget set's make-up at a glance."""
    fig, ax = pyplot().subplots(figsize=(6, 3.5), dpi=100)
    bins = np.histogram_bin_edges(scores, bins=60)
    ax.hist(scores[~truth], bins=bins, alpha=0.6, label=f"clean ({int((~truth).sum())})")
    if truth.any():
        ax.hist(scores[truth], bins=bins, alpha=0.6, label=f"poison ({int(truth.sum())})")
    if cutoff is not None:
        above = scores >= cutoff
        ax.axvline(cutoff, color="black", linestyle="--", linewidth=1,
                   label=f"selection cut-off: {int((above & ~truth).sum())} clean, {int((above & truth).sum())} "
                         f"poison above")
    ax.set_yscale("log")
    ax.set_xlabel(f"{method} score")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def comparison_markdown(rows: list[dict]) -> str:
    """One Markdown table per attack: rows no defense / FT / CleanCLIP / UBT."""
    lines = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        lines += [f"### {attack}", "",
                  "| defense | CA | CA (held-out prompts) | ASR | clean samples | wall time "
                  "| forward / backward passes | reserved CPU-s | reserved GPU-s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["attack"] == attack):
            lines.append(f"| {LABELS[r['defense']]} | {percent(r['clean_accuracy'])} "
                         f"| {percent(r.get('clean_accuracy_heldout'))} | {percent(r['attack_success_rate'])} "
                         f"| {r['clean_samples']:,} | {r['wall_time_s']:.0f} s "
                         f"| {r['forward_passes']:,} / {r['backward_passes']:,} | {r['reserved_cpu_s']:,.0f} "
                         f"| {r['reserved_gpu_s']:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def comparison_png(rows: list[dict]) -> bytes:
    """Grouped bars: CA (left) and ASR (right) of each defense, grouped by attack."""
    import numpy as np
    plt = pyplot()
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 2.2 * len(attacks) * 2), 3.8), dpi=100)
    width = 0.8 / len(defenses)
    for ax, metric, title in zip(axes, ("clean_accuracy", "attack_success_rate"), ("CA", "ASR")):
        for j, d in enumerate(defenses):
            values = [next((100 * (r[metric] or 0) for r in rows if r["attack"] == a and r["defense"] == d), 0)
                      for a in attacks]
            ax.bar(np.arange(len(attacks)) + (j - (len(defenses) - 1) / 2) * width, values, width, label=LABELS[d])
        ax.set_xticks(np.arange(len(attacks)), attacks)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def results_markdown(rows: list[dict], dims: list[Dimension], base: Config, best: dict, metric: str) -> str:
    """The sweep's trials as a Markdown table, best first (`metric`: the column of the objective's value), with the
    objective and the best setting named above it."""
    sw = base.sweep
    goal = {"ca_subject_to_asr": f"the highest CA with ASR <= {percent(sw.asr_threshold)} (trials over it rank "
                                 f"below, lowest ASR first)",
            "ca": "the highest CA", "asr": "the lowest ASR", "ca_minus_asr": "the highest CA - ASR"}[sw.objective]
    setting = ", ".join(f"{d.key}={_value(best[d.key])}" for d in dims)
    lines = [f"# Sweep: {base.run.name}", "", f"Objective: {goal}. Best: {setting} (CA "
             f"{percent(best['clean_accuracy'])}, ASR {percent(best['attack_success_rate'])}).", "",
             "| rank | " + " | ".join(d.key for d in dims) + " | CA | CA (held-out prompts) | ASR | objective | status |",
             "|---|" + "---|" * (len(dims) + 5)]
    for r in rows:
        status = r["status"] if r["status"] != "stopped" else f"stopped at step {r['steps']} (probe figures)"
        lines.append(f"| {r['rank']} | " + " | ".join(_value(r[d.key]) for d in dims) +
                     f" | {percent(r['clean_accuracy'])} | {percent(r.get('clean_accuracy_heldout'))} "
                     f"| {percent(r['attack_success_rate'])} "
                     f"| {_value(r[metric])} | {status} |")
    return "\n".join(lines) + "\n"


def heatmap_png(rows: list[dict], base: Config, keys: tuple[str, str]) -> bytes:
    """A sweep's ASR (left) and CA (right) over the two keys (k, ρ), each cell the best trial of that pair."""
    k_key, rho_key = keys
    ks = sorted({r[k_key] for r in rows})
    rhos = sorted({r[rho_key] for r in rows})
    cells: dict[tuple, dict] = {}
    for r in rows:  # best first, so the first row of a pair is its best trial
        if r["clean_accuracy"] is not None:
            cells.setdefault((r[k_key], r[rho_key]), r)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rhos), 1.5 + 0.7 * len(ks)), dpi=100)
    for ax, metric, title, cmap in ((axes[0], "attack_success_rate", "ASR (%)", "Reds"),
                                    (axes[1], "clean_accuracy", "CA (%)", "Greens")):
        values = np.full((len(ks), len(rhos)), np.nan)
        for (k, rho), r in cells.items():
            if r[metric] is not None:
                values[ks.index(k), rhos.index(rho)] = 100 * r[metric]
        # Absolute 0-100% colours, so that two sweeps' maps read alike; the numbers give the detail.
        ax.imshow(values, cmap=cmap, origin="lower", aspect="auto", vmin=0, vmax=100)
        for i in range(len(ks)):
            for j in range(len(rhos)):
                if math.isfinite(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=9,
                            color="white" if values[i, j] > 60 else "black")
        ax.set_xticks(range(len(rhos)), [f"{rho:.4g}" for rho in rhos])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("unlearn.token_portion (ρ)")
        ax.set_ylabel("unlearn.num_samples (k)")
        ax.set_title(title)
    fig.suptitle(f"{base.run.name}: best trial per cell", fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)
