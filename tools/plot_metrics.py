"""Plot a run's metrics.jsonl: training loss and validation loss (with and without memory) by step.

    python tools/plot_metrics.py runs/tiny-warmup/metrics.jsonl [more runs...] --out loss.png
Needs matplotlib (`pip install -e '.[plot]'`).
"""
import argparse
from pathlib import Path

from memory3.train.metrics import read_metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files or run directories")
    parser.add_argument("--out", default="loss.png")
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for path in map(Path, args.metrics):
        path = path / "metrics.jsonl" if path.is_dir() else path
        records = read_metrics(path)
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{path.parent.name} train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                    label=f"{path.parent.name} valid")
        # Continual runs also score the same validation batches without memory.
        plain = [r for r in evals if "val_loss_no_memory" in r]
        if plain:
            ax.plot([r["step"] for r in plain], [r["val_loss_no_memory"] for r in plain], "s--",
                    label=f"{path.parent.name} valid, no memory")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
