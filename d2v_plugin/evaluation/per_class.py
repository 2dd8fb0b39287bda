"""Per-class results of an evaluation: the confusion matrix (true class x predicted class, counts summed
over the ranks), each class's top-1 and the class it is most often taken for, written as CSV files and a
picture (``cli.evaluate --per-class DIR``)."""
from __future__ import annotations

import csv
import os

import torch

from d2v_plugin.atomic import atomic_path


class Confusion:
    """Counts of (true class, top-1 prediction) over the batches it is shown."""

    def __init__(self, num_classes: int, device):
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits.argmax(dim=-1)
        keep = (target >= 0) & (target < self.num_classes)
        self.counts += torch.bincount(target[keep] * self.num_classes + pred[keep],
                                      minlength=self.num_classes ** 2)

    def matrix(self, runtime) -> torch.Tensor:
        """[true, predicted] counts of every rank's images, on the CPU."""
        counts = self.counts
        if runtime.distributed:
            counts = counts.to(runtime._collective_device())
            torch.distributed.all_reduce(counts)
        return counts.cpu().view(self.num_classes, self.num_classes)


def per_class_rows(matrix: torch.Tensor, classes: list[str]) -> list[dict]:
    """Per class: its images, those classified right, top-1 (a fraction; None for a class without
    images) and the other class it is most often predicted as, with how often."""
    rows = []
    for c, name in enumerate(classes):
        row = matrix[c]
        images, right = int(row.sum()), int(row[c])
        wrong = row.clone()
        wrong[c] = -1
        confused = int(wrong.argmax()) if images > right else None
        rows.append({"class_index": c, "class": name, "images": images, "correct": right,
                     "top1": round(right / images, 6) if images else None,
                     "most_confused_with": classes[confused] if confused is not None else "",
                     "confused_count": int(row[confused]) if confused is not None else 0})
    return rows


def write_per_class(out_dir: str, matrix: torch.Tensor, classes: list[str]) -> dict:
    """``per_class.csv``, ``confusion.csv`` (rows: true class, columns: predicted) and ``confusion.png``
    (each row as a fraction of the class's images) in ``out_dir``; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rows = per_class_rows(matrix, classes)
    paths = {name: os.path.join(out_dir, name) for name in ("per_class.csv", "confusion.csv", "confusion.png")}
    with atomic_path(paths["per_class.csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(paths["confusion.csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, matrix.tolist()):
            writer.writerow([name, *row])
    plot_confusion(paths["confusion.png"], matrix, classes)
    worst = sorted((r for r in rows if r["top1"] is not None), key=lambda r: r["top1"])[:5]
    return {"per_class_dir": out_dir, "worst_classes": [{"class": r["class"], "top1": r["top1"]} for r in worst]}


def plot_confusion(path: str, matrix: torch.Tensor, classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = matrix.sum(dim=1, keepdim=True).clamp(min=1)
    share = (matrix.double() / images).numpy()
    n = len(classes)
    side = min(12.0, max(4.0, 0.35 * n))
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    shown = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="share of the true class's images")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 40:  # names readable; ImageNet's 1000 are a picture of the structure only
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_title(f"confusion of {n} classes")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
