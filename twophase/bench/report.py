"""Write a BenchResult as CSV, a Markdown report and PNG plots (matplotlib, Agg backend).

    write_report(result, out_dir) -> {"csv": ..., "markdown": ..., "plots": [...]}

results.csv    one row per (artifact, phase, batch, context): tok/s median/min/max, speedup vs the
               model's fp32 baseline, and (with --roofline) the bound and the fraction reached
results.md     per phase, a table artifact x (batch, context) of tok/s (speedup), then the machine, the
               roofline and what each column means
speedup_vs_batch_{phase}.png    speedup vs fp32 against batch size (at the smallest context), a line per artifact
speedup_vs_context_{phase}.png  speedup vs fp32 against context length (at batch 1)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from twophase.bench.runner import BenchResult, BenchRow

CSV_FIELDS = [
    "model", "artifact", "prefill_scheme", "decode_scheme", "kv_binding", "phase", "batch", "context",
    "tok_s", "tok_s_min", "tok_s_max", "speedup", "baseline", "bound_tok_s", "roofline_fraction",
    "bytes_per_token", "macs_per_token",
]


def write_report(result: BenchResult, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in _sorted(result.rows):
            d = r.to_dict()
            w.writerow({k: _fmt(d[k]) for k in CSV_FIELDS})
    md_path = out / "results.md"
    md_path.write_text(markdown(result))
    (out / "machine.json").write_text(json.dumps(result.machine, indent=2, default=str))
    plots = _plots(result, out)
    return {"csv": csv_path, "markdown": md_path, "plots": plots}


def read_rows(csv_path: str | Path) -> list[BenchRow]:
    """The rows of a results.csv written by write_report (to re-plot or compare runs)."""
    ints, floats = {"batch", "context"}, {"tok_s", "tok_s_min", "tok_s_max", "speedup", "bound_tok_s",
                                           "bytes_per_token", "macs_per_token"}
    rows = []
    with open(csv_path) as f:
        for d in csv.DictReader(f):
            kw = {k: (int(v) if k in ints else float(v) if k in floats and v != "" else v or None)
                  for k, v in d.items() if k != "roofline_fraction"}
            rows.append(BenchRow(**kw))
    return rows


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else v)


def _sorted(rows: list[BenchRow]) -> list[BenchRow]:
    return sorted(rows, key=lambda r: (r.model, r.phase != "prefill", r.artifact, r.batch, r.context))


def _artifact_label(r: BenchRow) -> str:
    return f"{r.artifact} ({r.prefill_scheme}/{r.decode_scheme}, {r.kv_binding})"


def markdown(result: BenchResult) -> str:
    c = result.config
    m = result.machine
    lines = [
        "# twophase bench",
        "",
        f"{m.get('cpu', 'CPU ?')}, {c.threads} threads; median of {c.reps} interleaved repetitions; "
        f"decode: {c.decode_steps} steps after the context. Cells: tokens/s (speedup vs the model's fp32 "
        "artifact in the same run).",
        "",
    ]
    if result.synthetic_models:
        lines += [f"**{', '.join(result.synthetic_models)}: random weights.** Speed does not depend on trained "
                  "values; their text is meaningless.", ""]
    for model in sorted({r.model for r in result.rows}):
        for phase in c.phases:
            rows = [r for r in result.rows if r.model == model and r.phase == phase]
            if not rows:
                continue
            cells = sorted({(r.batch, r.context) for r in rows})
            unit = "prompt tokens/s" if phase == "prefill" else "generated tokens/s, summed over the batch"
            lines += [f"## {model}: {phase} ({unit})", ""]
            lines.append("| artifact | " + " | ".join(f"b{b} c{ctx}" for b, ctx in cells) + " |")
            lines.append("|---" * (len(cells) + 1) + "|")
            for artifact in sorted({r.artifact for r in rows}):
                by_cell = {(r.batch, r.context): r for r in rows if r.artifact == artifact}
                first = next(iter(by_cell.values()))
                out = []
                for cell in cells:
                    r = by_cell.get(cell)
                    out.append("-" if r is None else f"{r.tok_s:.1f}" + (f" ({r.speedup:.2f}x)" if r.speedup else ""))
                lines.append(f"| {_artifact_label(first)} | " + " | ".join(out) + " |")
            lines.append("")
            if any(r.bound_tok_s for r in rows):
                lines += [f"Roofline, {phase}: fraction of the bound reached (bound tok/s in brackets)", ""]
                lines.append("| artifact | " + " | ".join(f"b{b} c{ctx}" for b, ctx in cells) + " |")
                lines.append("|---" * (len(cells) + 1) + "|")
                for artifact in sorted({r.artifact for r in rows}):
                    by_cell = {(r.batch, r.context): r for r in rows if r.artifact == artifact}
                    out = [("-" if r is None or not r.bound_tok_s else f"{r.roofline_fraction:.0%} ({r.bound_tok_s:.0f})")
                           for r in (by_cell.get(cell) for cell in cells)]
                    lines.append(f"| {artifact} | " + " | ".join(out) + " |")
                lines.append("")
    if "read_bandwidth_gbs" in m:
        peaks = m["gemm_peak_gops"]
        lines += [
            "## Machine roofline",
            "",
            f"STREAM-style read bandwidth {m['read_bandwidth_gbs']:.1f} GB/s; GEMM peaks (1024^3, ORT) fp32 "
            f"{peaks['fp32']:.0f} GFLOP/s, int8 (u8 x s8) {peaks['int8']:.0f} GOP/s.",
            "Decode bound = bandwidth / bytes per token, bytes = (decode weights read once per step + each row's "
            "K/V of the context) / batch. Prefill bound = GEMM peak (int8 for w8a8, else fp32) / (2 x "
            "multiply-adds per token: projections + causal attention).",
            "",
        ]
    if result.skipped:
        lines += ["Skipped (beyond the artifact's max_len): " + "; ".join(result.skipped), ""]
    lines += [
        "Columns: `bB cC` = batch B, context C. Prefill: B prompts of C tokens in one batched (chunked) prefill. "
        "Decode: B rows whose caches hold C positions (filled directly: decode speed does not depend on the "
        "cached values), tokens/s summed over the rows.",
        "",
    ]
    return "\n".join(lines)


def _plots(result: BenchResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    c = result.config
    for phase in c.phases:
        for axis, fixed, fixed_value in (("batch", "context", min(c.contexts)), ("context", "batch", min(c.batches))):
            rows = [r for r in result.rows if r.phase == phase and getattr(r, fixed) == fixed_value and r.speedup]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
            for key in sorted({(r.model, r.artifact) for r in rows}):
                pts = sorted((getattr(r, axis), r.speedup) for r in rows if (r.model, r.artifact) == key)
                sample = next(r for r in rows if (r.model, r.artifact) == key)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{key[1]} ({sample.prefill_scheme}/{sample.decode_scheme})")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({getattr(r, axis) for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel(f"{axis} ({fixed} {fixed_value})")
            ax.set_ylabel(f"{phase} speedup vs fp32")
            ax.set_title(f"{phase}: speedup vs {axis}, {c.threads} threads")
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"speedup_vs_{axis}_{phase}.png"
            fig.savefig(path)
            plt.close(fig)
            paths.append(path)
    return paths
