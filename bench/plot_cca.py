"""Plot bench/results/cca_*.json: time and speed-up of CCA against cuDNN full attention.

    python bench/plot_cca.py bench/results/cca_h100.json docs/img/cca_h100.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(src).read_text())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for hkv, style in ((32, "-"), (8, "--")):
        rows = [r for r in data["rows"] if r.get("Hkv") == hkv and "speedup_fwd" in r]
        t = [r["T"] // 1024 for r in rows]
        label = "MHA 32/32" if hkv == 32 else "GQA 32/8"
        for key, name in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
            axes[0].plot(t, [r["cudnn"][key] for r in rows], "k" + style, marker="o",
                         label=f"cuDNN full {name}, {label}" if name == "fwd" else None,
                         alpha=0.5 if name != "fwd" else 1)
            axes[0].plot(t, [r["cca"][key] for r in rows], style, marker="s",
                         label=f"CCA {name}, {label}")
        axes[1].plot(t, [r["speedup_fwd"] for r in rows], style, marker="o", label=f"fwd, {label}")
        axes[1].plot(t, [r["speedup_fwd_bwd"] for r in rows], style, marker="s",
                     label=f"fwd+bwd, {label}")
    axes[0].set(xscale="log", yscale="log", xlabel="tokens (K)", ylabel="ms",
                title="attention time (B=1, 32 heads, d=128, bf16)")
    axes[1].set(xscale="log", xlabel="tokens (K)", ylabel="speed-up over cuDNN",
                title="CCA (g=16, w=1024) speed-up")
    for ax in axes:
        ax.set_xticks([8, 16, 32, 64, 128], ["8", "16", "32", "64", "128"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    env = data["env"]
    fig.suptitle(f"{env['device']}, jax {env['jax']}, {env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
