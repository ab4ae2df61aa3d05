"""Results -> markdown tables and one PNG of loss curves (matplotlib, off-screen)."""
from __future__ import annotations

from pathlib import Path

from .train import LABELS


def pm(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def signed_pm(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f}"


def variant_table(summary: dict, variants, baseline_label: str = "standard") -> list[str]:
    lines = ["| variant | final val loss (mean ± std) | Δ vs " + baseline_label + ", paired by seed (mean ± std)"
             " | seeds better | wins beyond seed spread | tokens/s (training) |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        s = summary[v]
        if "paired_diff" in s:
            diff, better = signed_pm(s["paired_diff"]), f"{s['seeds_better']}/{s['paired_diff']['n']}"
            wins = "yes" if s["wins_beyond_seed_spread"] else "no"
        else:
            diff = better = wins = "—"
        lines.append(f"| {LABELS[v]} | {pm(s['final_val'])} | {diff} | {better} | {wins} | {s['tokens_per_s']['mean']:.0f} |")
    return lines


def compare_md(res: dict, mcfg: dict, ocfg: dict) -> list[str]:
    n = len(res["seeds"])
    tokens = res["runs"][0]["tokens"]
    return [f"### From scratch: {mcfg['layers']} layers ({2 * mcfg['layers']} sublayers), width {mcfg['width']}, "
            f"{res['steps']} steps ({tokens:,} tokens) per run, {n} seeds", "",
            *variant_table(res["summary"], res["variants"]), ""]


def finetune_md(res: dict) -> list[str]:
    ex = res["exactness"]
    worst = max(ex, key=lambda e: e["abs_diff"])
    worst_val = max(e["val_abs_diff"] for e in ex)
    tokens = res["runs"][0]["tokens"]
    return [f"### Fine-tuning: {res['pre_steps']} standard steps, then {res['cont_steps']} more "
            f"({tokens:,} tokens) continued as it is or converted in place, {len(res['seeds'])} seeds", "",
            *variant_table(res["summary"], res["variants"], "continuing the baseline"), "",
            f"Exactness at the conversion point: the first converted step's training loss differs from the "
            f"baseline's on the same batch by at most {worst['abs_diff']:.1e} "
            f"({LABELS[worst['variant']]}, seed {worst['seed']}: {worst['first_step_loss']:.6f} vs "
            f"{worst['baseline_first_step_loss']:.6f}); the validation loss right after converting by at most "
            f"{worst_val:.1e}.", ""]


def sweep_md(res: dict) -> list[str]:
    lines = [f"### Learning-rate screen ({res['screen_shape'][0]} layers, width {res['screen_shape'][1]}, "
             f"{res['screen_steps']} steps, seed {res['seeds'][0]})", "",
             "| variant | lr | query lr | val loss |", "|---|---|---|---|"]
    for s in res["screen"]:
        mark = " **(chosen)**" if s == res["chosen"][s["variant"]] else ""
        lines.append(f"| {LABELS[s['variant']]} | {s['lr']:g} | {s['query_lr']:g} | {s['final_val']:.4f}{mark} |")
    lines += ["", f"### Depth at roughly fixed compute ({res['steps']} steps, {len(res['seeds'])} seeds, "
              "each variant at its chosen learning rates)", "",
              "| layers × width | sublayers | params | variant | final val loss | Δ vs standard (paired) | seeds better"
              " | wins beyond seed spread | tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    for sh in res["shapes"]:
        for v in sh["variants"]:
            s = sh["summary"][v]
            diff = signed_pm(s["paired_diff"]) if "paired_diff" in s else "—"
            better = f"{s['seeds_better']}/{s['paired_diff']['n']}" if "paired_diff" in s else "—"
            wins = ("yes" if s["wins_beyond_seed_spread"] else "no") if "paired_diff" in s else "—"
            lines.append(f"| {sh['layers']} × {sh['width']} | {sh['sublayers']} | {sh['params']:,} | {LABELS[v]} | "
                         f"{pm(s['final_val'])} | {diff} | {better} | {wins} | {s['tokens_per_s']['mean']:.0f} |")
    lines.append("")
    return lines


# ---- pictures -------------------------------------------------------------------------------------

COLOURS = {"standard": "#444444", "block": "#1f77b4", "full": "#d62728", "pretrain": "#999999"}


def _curves(runs, variant):
    import numpy as np

    rs = [r for r in runs if r["variant"] == variant]
    steps = np.array([s for s, _ in rs[0]["val"]])
    vals = np.array([[v for _, v in r["val"]] for r in rs])
    return steps, vals


def _band(ax, steps, vals, variant, label):
    ax.plot(steps, vals.mean(0), color=COLOURS[variant], label=label, lw=1.4)
    if len(vals) > 1:
        ax.fill_between(steps, vals.min(0), vals.max(0), color=COLOURS[variant], alpha=0.15, lw=0)


def _zoom(ax, arrays, start_frac=0.3):
    import numpy as np

    tails = np.concatenate([a[:, int(a.shape[1] * start_frac):].ravel() for a in arrays])
    lo, hi = tails.min(), tails.max()
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))


def plot(path: Path, compare: dict | None, finetune: dict | None, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p in (compare, finetune) if p]
    fig = Figure(figsize=(5.2 * (len(panels) + 1), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    k = 0
    diffs = []
    if compare:
        ax = axes[k]; k += 1
        arrays = []
        for v in compare["variants"]:
            steps, vals = _curves(compare["runs"], v)
            arrays.append(vals)
            _band(ax, steps, vals, v, LABELS[v])
        _zoom(ax, arrays)
        ax.set(title=f"from scratch ({len(compare['seeds'])} seeds; band: min-max)", xlabel="step",
               ylabel="validation loss (nats/byte)")
        ax.legend(fontsize=8)
        diffs.append(("from scratch", compare, "-"))
    if finetune:
        ax = axes[k]; k += 1
        arrays = []
        for v in finetune["variants"]:
            steps, vals = _curves(finetune["runs"], v)
            arrays.append(vals)
            _band(ax, steps, vals, v, ("continue: " if v == "standard" else "convert: ") + LABELS[v])
        ax.axvline(finetune["pre_steps"], color="#999999", lw=0.8, ls=":")
        _zoom(ax, arrays, 0.0)
        ax.set(title=f"fine-tuning after {finetune['pre_steps']} standard steps", xlabel="step",
               ylabel="validation loss (nats/byte)")
        ax.legend(fontsize=8)
        diffs.append(("fine-tuning", finetune, "--"))
    ax = axes[k]
    for name, res, ls in diffs:
        _, base = _curves(res["runs"], "standard")
        for v in res["variants"][1:]:
            steps, vals = _curves(res["runs"], v)
            d = vals - base
            ax.plot(steps, d.mean(0), color=COLOURS[v], ls=ls, label=f"{LABELS[v]}, {name}")
            if len(d) > 1:
                ax.fill_between(steps, d.min(0), d.max(0), color=COLOURS[v], alpha=0.1, lw=0)
    ax.axhline(0, color="#444444", lw=0.8)
    ax.set(title="paired difference vs standard (per seed; band: min-max)", xlabel="step",
           ylabel="Δ validation loss (negative: AttnRes better)")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_sweep(path: Path, res: dict) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [sh["sublayers"] for sh in res["shapes"]]
    for v in ("block", "full"):
        pts = [(sh["sublayers"], sh["summary"][v]) for sh in res["shapes"] if v in sh["summary"]]
        if not pts:
            continue
        x = [p[0] for p in pts]
        ax.errorbar(x, [p[1]["paired_diff"]["mean"] for p in pts], yerr=[p[1]["paired_diff"]["std"] for p in pts],
                    color=COLOURS[v], marker="o", capsize=3, label=f"{LABELS[v]} − standard (paired, ± std)")
    spread = [sh["summary"]["standard"]["final_val"]["std"] for sh in res["shapes"]]
    ax.fill_between(xs, [-s for s in spread], spread, color="#444444", alpha=0.12, lw=0,
                    label="± standard's seed std")
    ax.axhline(0, color="#444444", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{sh['sublayers']}\n({sh['layers']}×{sh['width']})" for sh in res["shapes"]])
    ax.set(xlabel="sublayers (layers × width), roughly equal parameters", ylabel="Δ final validation loss",
           title=f"Where does AttnRes win? {res['steps']} steps, {len(res['seeds'])} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
