"""Plots and tables a person looks at: training curves (loss + LR), comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on these machines
import matplotlib.pyplot as plt  # noqa: E402

from lmprune.atomic import atomic_file, write_text  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int) -> None:
    """A PNG written atomically (a reader never sees half an image)."""
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    from lmprune.run_dir import read_rows  # a torn last line (killed run) is dropped with a warning

    return read_rows(path)


def plot_training(metrics_path: Path, png_path: Path) -> Path | None:
    """Train/val loss over steps with the learning rate underneath; None when nothing was logged."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    train = [r for r in rows if "loss" in r]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", lw=1.5)
    marks = [r["step"] for r in rows if r.get("mask_update")]
    for step in marks:
        ax_loss.axvline(step, color="grey", alpha=0.15, lw=0.8)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in rows if "lr" in r], [r["lr"] for r in rows if "lr" in r], color="tab:green")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png_path, dpi=110)
    plt.close(fig)
    return png_path


def mean_curve(runs: list[list[dict]], metric: str) -> tuple[list[int], list[float], list[float]]:
    """(tokens, mean, std over seeds) of `metric` at the steps every seed's run logged it."""
    by_seed = [{r["step"]: r for r in rows if metric in r} for rows in runs]
    steps = sorted(set.intersection(*(set(rows) for rows in by_seed))) if by_seed else []
    tokens, means, stds = [], [], []
    for step in steps:
        values = [rows[step][metric] for rows in by_seed]
        mean = sum(values) / len(values)
        tokens.append(by_seed[0][step]["tokens"])
        means.append(mean)
        stds.append((sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0)
    return tokens, means, stds


def plot_metric(ax, runs: dict[str, list[list[dict]]], metric: str) -> dict[str, str]:
    """One line per run (the mean over seeds, a +-1 std band when there are several); {name: colour}."""
    colours = {}
    for name, seeds in runs.items():
        tokens, means, stds = mean_curve(seeds, metric)
        if not tokens:
            continue
        line, = ax.plot(tokens, means, "o-", ms=3, lw=1.4, label=name)
        colours[name] = line.get_color()
        if len(seeds) > 1:
            ax.fill_between(tokens, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.2, lw=0)
    return colours


def plot_compare(out_dir: Path, run_dirs: Mapping[str, Sequence[Path]]) -> None:
    """val_loss.png: val loss of every run over tokens (mean +- std over seeds), LR underneath;
    retention.png: the retention probe's loss, when the runs have one; width.png: FFN width over tokens."""
    runs = {name: [read_metrics(Path(d) / "metrics.jsonl") for d in dirs] for name, dirs in run_dirs.items()}
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 1.2])
    colours = plot_metric(ax_loss, runs, "val_loss")
    for name, seeds in runs.items():
        lr_rows = [r for r in seeds[0] if "lr" in r]  # the step-0 evaluation row has no LR
        ax_lr.plot([r["tokens"] for r in lr_rows], [r["lr"] for r in lr_rows], lw=1, color=colours.get(name),
                   label=name)
    seeds = max((len(s) for s in runs.values()), default=1)
    ax_loss.set_ylabel("val loss")
    ax_loss.set_title("validation loss (same data order and seed)" if seeds == 1 else
                      f"validation loss, mean and +-1 std over {seeds} seeds")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("training tokens")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_dir / "val_loss.png", dpi=110)
    plt.close(fig)

    if any("retention_loss" in r for seeds in runs.values() for rows in seeds for r in rows):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        plot_metric(ax, runs, "retention_loss")
        ax.set_ylabel("retention loss")
        ax.set_xlabel("training tokens")
        ax.set_title("retention probe: training windows seen only before prune start")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, out_dir / "retention.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, seeds in runs.items():
        width_rows = [r for r in seeds[0] if "ffn_width" in r]
        if width_rows:
            ax.step([r["tokens"] for r in width_rows], [r["ffn_width"] for r in width_rows], where="post", label=name)
    ax.set_ylabel("FFN width (mean kept neurons per layer)")
    ax.set_xlabel("training tokens")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out_dir / "width.png", dpi=110)
    plt.close(fig)


def with_spread(row: Mapping[str, Any], metric: str = "val_ppl") -> str:
    """'12.345 +- 0.067' over seeds, '12.345' with one seed, '-' without the metric."""
    if metric not in row:
        return "-"
    std = row.get(f"{metric}_std")
    return f"{row[metric]:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def compare_pair(a: str, op: str, b: str, runs: Mapping[str, Mapping[str, Any]]) -> str:
    """One expected-direction line: holds / does NOT hold, or 'within noise' when |difference| < 2 std
    (std: the larger of the two runs' spread over seeds)."""
    pa, pb = runs[a]["val_ppl"], runs[b]["val_ppl"]
    holds = pa <= pb if op == "<=" else pa < pb
    stds = [runs[n].get("val_ppl_std") for n in (a, b)]
    verdict = "holds" if holds else "does NOT hold"
    if all(s is not None for s in stds):
        noise = 2 * max(stds)
        if abs(pa - pb) < noise:
            verdict = f"within noise (|difference| {abs(pa - pb):.3f} < 2 std = {noise:.3f})"
        else:
            verdict += f" (|difference| {abs(pa - pb):.3f} >= 2 std = {noise:.3f})"
    return f"- {a} ({with_spread(runs[a])}) {op} {b} ({with_spread(runs[b])}): {verdict}"


def format_flops(flops: float) -> str:
    if flops <= 0:
        return "0"
    exponent = len(str(int(flops))) - 1
    return f"{flops / 10 ** exponent:.2f}e{exponent}"


def two_views(runs: Mapping[str, Mapping[str, Any]], reference: str) -> list[str]:
    """One sentence: who wins at equal training tokens (reference vs scratch) and at equal compute
    (reference vs the equal-FLOPs scratch run)."""
    if not {reference, "scratch", "scratch_equal_flops"} <= runs.keys():
        return []

    def winner(other: str) -> str:
        a, b = runs[reference], runs[other]
        best = reference if a["val_ppl"] < b["val_ppl"] else other
        stds = [a.get("val_ppl_std"), b.get("val_ppl_std")]
        noisy = all(s is not None for s in stds) and abs(a["val_ppl"] - b["val_ppl"]) < 2 * max(stds)
        return f"{best} wins ({with_spread(a)} vs {with_spread(b)}{', within noise' if noisy else ''})"

    return ["", f"At equal training tokens {winner('scratch')}; at equal training compute {winner('scratch_equal_flops')}."]


def seeds_note(summary: Mapping[str, Any], compare) -> list[str]:
    """What the runs share and how many seeds the numbers average."""
    seeds = summary.get("seeds")
    lines = ["All runs share data, data order, seed and token budget (except the equal-FLOPs scratch run, "
             "which trains the target model for the training FLOPs of "
             f"`{compare.compute_reference}`)."]
    if seeds:
        lines[0] = lines[0].replace("data order, seed", "data order and seed per seed")
        lines += ["", f"Every run was trained once per seed {seeds} (init and data order); val ppl is the mean "
                  "± sample std over seeds, and a difference smaller than 2 std is reported as within noise."]
    else:
        lines += ["", "One seed: no spread was measured, so no difference below is known to exceed the noise."]
    for trunk, members in (summary.get("shared_trunks") or {}).items():
        lines += ["", f"{', '.join(members)} share one trunk (`{trunk}`): trained once up to prune start, "
                  "each branched from its checkpoint there."]
    for item in summary.get("unfinished") or []:
        lines += ["", f"Not finished (left out): {item}."]
    return lines


def write_compare_report(out_dir: Path, summary: dict, compare) -> Path:
    """report.md: the table, the plots, and the observed order against the expected one."""
    runs = summary["pipelines"]
    lines = ["# lmprune compare", "", *seeds_note(summary, compare), "",
             "| run | pipeline | val ppl | retention ppl | params | FFN width | train tokens | train FLOPs | "
             "train tok/s | infer tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(runs.items(), key=lambda item: item[1]["val_ppl"]):
        lines.append(f"| {name} | {r['pipeline']} | {with_spread(r)} | {with_spread(r, 'retention_ppl')} | "
                     f"{r['params']:,} | {r['ffn_width']} | {r['train_tokens']:,} | {format_flops(r['train_flops'])} | "
                     f"{r['train_tok_per_s']:,.0f} | {r.get('infer_tok_per_s', float('nan')):,.0f} |")
    lines += mixture_section(runs)
    lines += ["", "![validation loss](val_loss.png)", ""]
    if (out_dir / "retention.png").is_file():
        lines += ["Retention probe: loss on training windows seen only before prune start (t_w) — what the run "
                  "still knows of what its enlarged phase learned.", "", "![retention](retention.png)", ""]
    lines += ["![FFN width](width.png)", ""]
    sparse = {name: r for name, r in runs.items() if r.get("family") == "unstructured"}
    if sparse:
        lines += sparse_section(out_dir, sparse)
    lines += ["## Expected direction (observed numbers are shown as they are)", ""]
    if "idea" in runs:
        lines += ["The IDEA paper expects idea <= oneshot (resumed schedule) <= naive, and idea < scratch, in val ppl.",
                  ""]
    if sparse:
        lines += ["The MGPP paper expects mgpp <= gmp at high (80-90%) sparsity.", ""]
    checks = [("idea", "<=", "oneshot"), ("oneshot", "<=", "naive"), ("idea", "<", "scratch"),
              ("idea", "<", "scratch_restarted"), ("oneshot_restarted", "<", "scratch_restarted"),
              ("idea", "<", "scratch_equal_flops")]
    for a, op, b in checks:
        if a in runs and b in runs:
            lines.append(compare_pair(a, op, b, runs))
    lines += two_views(runs, compare.compute_reference)
    for level in sorted({r["level"] for r in sparse.values() if r.get("level") and r["level"] >= 0.8}):
        at = {r["method"]: r for r in sparse.values() if r.get("level") == level}
        if "mgpp" in at and "gmp" in at:
            pm, pg = at["mgpp"]["val_ppl"], at["gmp"]["val_ppl"]
            lines.append(f"- at {level:.0%} sparsity: mgpp ({pm:.3f}) <= gmp ({pg:.3f}): "
                         f"{'holds' if pm <= pg else 'does NOT hold'}")
    for name, control in sorted(sparse.items()):  # the no-prior control NAME_noprior next to NAME
        base = sparse.get(name.replace("_noprior", ""))
        if control["method"] == "mgpp_noprior" and base is not None and base["method"] == "mgpp":
            pm, pn = base["val_ppl"], control["val_ppl"]
            lines.append(f"- at {control['level']:.0%} sparsity, the prior's own effect (same schedule): "
                         f"{name.replace('_noprior', '')} ({pm:.3f}) vs {name} ({pn:.3f}): "
                         f"the prior {'helps' if pm < pn else 'does NOT help'}")
    path = out_dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def mixture_section(runs: dict[str, dict]) -> list[str]:
    """With data.sources: the mixture's name and each run's val ppl per source (val ppl above is their
    weighted mean: exp of the weighted mean loss). Empty without a mixture."""
    found = {key.removeprefix("val_ppl/") for r in runs.values() for key in r if key.startswith("val_ppl/")}
    if not found:
        return []
    mixtures = sorted({str(r.get("mixture")) for r in runs.values() if r.get("mixture")})
    in_config_order = [part.rsplit(":", 1)[0] for m in mixtures for part in m.split("+")]  # "a:0.7+b:0.3"
    names = [n for n in dict.fromkeys(in_config_order) if n in found] + sorted(found - set(in_config_order))
    lines = ["", f"Data: weighted mixture {', '.join(f'`{m}`' for m in mixtures)}; val ppl above is "
             "exp(weighted mean of the per-source val losses).", "",
             "| run | val ppl (mixture) | " + " | ".join(f"val ppl {name}" for name in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for run, r in sorted(runs.items(), key=lambda item: item[1]["val_ppl"]):
        cells = [f"{r[f'val_ppl/{name}']:.3f}" if f"val_ppl/{name}" in r else "-" for name in names]
        lines.append(f"| {run} | {r['val_ppl']:.3f} | " + " | ".join(cells) + " |")
    return lines


def sparse_section(out_dir: Path, sparse: dict[str, dict]) -> list[str]:
    """ppl_vs_sparsity.png (one line per method) and a table with exact sparsity and sizes on disk."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in sparse.values()}):
        points = sorted((r["sparsity"], r["val_ppl"]) for r in sparse.values() if r["method"] == method)
        ax.plot([100 * s for s, _ in points], [p for _, p in points], "o-", label=method)
    ax.set_xlabel("exact sparsity of prunable weights (%)")
    ax.set_ylabel("val perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_dir / "ppl_vs_sparsity.png", dpi=110)
    plt.close(fig)
    lines = ["## Unstructured sparsity", "",
             "| run | method | target | exact sparsity | val ppl | dense size | compact size |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in sorted(sparse.items(), key=lambda item: (item[1]["method"], item[1]["level"] or 0)):
        compact = f"{r['final_sparse_bytes']:,}" if "final_sparse_bytes" in r else "-"
        lines.append(f"| {name} | {r['method']} | {r['level']:.2f} | {r['sparsity']:.4f} | {r['val_ppl']:.3f} | "
                     f"{r['final_bytes']:,} | {compact} |")
    lines += ["", "![ppl vs sparsity](ppl_vs_sparsity.png)", "",
              "Unstructured sparsity gives no speed-up to dense matmuls: the dense export runs exactly as fast "
              "as the unpruned model. Use structured pruning (FFN neurons, heads, layers) for speed.", ""]
    return lines


def write_sparsity_curve(out_dir: Path) -> None:
    """Iterative magnitude pruning: sparsity.md (ppl per round) and ppl_vs_sparsity.png from metrics.jsonl."""
    rows = [{"round": r.get("round", 0), "target_sparsity": r.get("target_sparsity", 0.0),
             "exact_sparsity": r.get("sparsity", 0.0), "val_ppl": r["val_ppl"], "step": r["step"]}
            for r in read_metrics(out_dir / "metrics.jsonl") if "val_ppl" in r]
    if not rows:
        return
    plot_ppl_vs_sparsity(rows, out_dir / "ppl_vs_sparsity.png", metric="val_ppl")
    write_text(out_dir / "sparsity.md", "# perplexity vs sparsity\n\n" + rows_to_markdown(rows) + "\n")


def plot_ppl_vs_sparsity(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "ppl") -> Path:
    """PNG of `metric` (log scale when all > 0) against exact sparsity, one point per row."""
    missing = [r.get("round", i) for i, r in enumerate(rows) if metric not in r]
    if missing:
        raise ValueError(f"rows {missing} have no {metric!r} value to plot")
    xs = [100.0 * float(r["exact_sparsity"]) for r in rows]
    ys = [float(r[metric]) for r in rows]
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    ax.plot(xs, ys, marker="o")
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("sparsity of prunable weights (%)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def rows_to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the rows (columns in first-seen order; floats to 4 significant digits)."""
    columns: list[str] = []
    for r in rows:
        columns += [key for key in r if key not in columns]

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
