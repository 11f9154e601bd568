"""``quantkit report OUT``: plots of a calibrated run's ``quantize_report.json`` (matplotlib, optional extra).

  expert_coverage.png   tokens routed to each expert (heatmap, layer x expert, log colour scale),
                        experts that fell back to RTN marked with x
  layer_error.png       relative output error per layer (mean over modules; routed experts averaged)
"""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.errors import QuantkitError, UsageError


CATEGORIES = ("attention", "dense MLP", "shared experts", "routed experts")


def _category(module: str) -> str:
    if module.startswith("self_attn."):
        return "attention"
    if ".shared_experts." in module:
        return "shared experts"
    return "routed experts" if ".experts." in module else "dense MLP"


def _mean(v):
    return sum(v) / len(v) if isinstance(v, list) else v


def render_report(out: str | Path, dest: str | Path | None = None) -> list[Path]:
    out = Path(out)
    f = out / "quantize_report.json"
    if not f.is_file():
        raise UsageError(f"{out}: no quantize_report.json (not a quantkit output directory)")
    rep = json.loads(f.read_text())
    layers = rep.get("layers") or []
    if not layers:
        raise UsageError(f"{out}: the run was not calibrated (method {rep.get('method')}); nothing to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        raise QuantkitError("quantkit report needs matplotlib: pip install 'quantkit[report]'") from None
    dest = Path(dest) if dest else out
    dest.mkdir(parents=True, exist_ok=True)
    written = []

    moe = [l for l in layers if l.get("expert_tokens")]
    if moe:
        import numpy as np

        grid = np.array([l["expert_tokens"] for l in moe], dtype=float)
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * grid.shape[1] + 2), max(3, 0.3 * len(moe) + 1.5)))
        im = ax.imshow(np.maximum(grid, 0.5), aspect="auto", cmap="viridis", norm=LogNorm(vmin=0.5, vmax=max(grid.max(), 1)))
        for row, l in enumerate(moe):
            for e in l.get("rtn_fallback_experts") or []:
                ax.text(e, row, "x", ha="center", va="center", color="red", fontsize=9)
        ax.set_yticks(range(len(moe)), [str(l["layer"]) for l in moe])
        ax.set_xlabel("routed expert")
        ax.set_ylabel("layer")
        cal = rep.get("calibration") or {}
        ax.set_title(f"calibration tokens per routed expert\n({cal.get('expert_calibration', '?')} capture, "
                     f"{cal.get('tokens', '?')} tokens; x = fell back to RTN)", fontsize=10)
        fig.colorbar(im, ax=ax, label="tokens routed")
        fig.tight_layout()
        written.append(dest / "expert_coverage.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind in CATEGORIES:
        xs, ys = [], []
        for l in layers:
            vals = [_mean(v) for k, v in l["errors"].items() if _category(k) == kind]
            if vals:
                xs.append(l["layer"])
                ys.append(sum(vals) / len(vals))
        if xs:
            ax.plot(xs, ys, marker="o", label=kind)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative output error")
    ax.set_title(f"{rep.get('recipe')} {'+'.join(rep.get('method', []))}: error on calibration inputs")
    ax.legend()
    fig.tight_layout()
    written.append(dest / "layer_error.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
