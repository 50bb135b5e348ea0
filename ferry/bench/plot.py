"""PNG plots for the benchmarks: one log-size x-axis, one line per series (matplotlib, headless)."""

from __future__ import annotations


def size_plot(series: dict[str, list[tuple[float, float]]], path, xlabel: str, ylabel: str, title: str,
              log_y: bool = False) -> None:
    """`series`: label -> [(size, value)], drawn against a log2 size axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
