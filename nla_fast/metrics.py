"""Classification metrics of SPEC 1.2 from logits: overall, mean-class, per-class and top-2
accuracy and the confusion matrix. Counting happens on the logits' device; ``summarise``
turns the counts into plain Python numbers (one host transfer)."""
from __future__ import annotations

import math

import torch


class MetricCounts:
    """Running counts over evaluation batches, kept on the device: confusion matrix and top-2 hits."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.top2_correct = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # cross-entropy, summed

    @torch.no_grad()
    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``scores`` (B, C) logits or probabilities, ``target`` (B,) labels."""
        c = self.num_classes
        predicted = scores.argmax(dim=1)
        # index_add_ instead of bincount: bincount reads its size back from the GPU
        self.confusion.view(-1).index_add_(0, target * c + predicted, torch.ones_like(target))
        k = min(2, c)
        top = scores.topk(k, dim=1).indices
        self.top2_correct += (top == target[:, None]).any(dim=1).sum()
        # the cross-entropy, summed (log_softmax + gather: F.cross_entropy's value, in a form that
        # code wrapping F.cross_entropy for the training step does not see)
        self.loss_sum -= scores.float().log_softmax(dim=1).gather(1, target[:, None]).double().sum()

    def all_reduce(self) -> None:
        """Sum the counts over the ranks of a distributed run (each counted its own slice of the
        split); afterwards every rank holds the counts of the whole split."""
        from .distributed import all_reduce_

        packed = all_reduce_(torch.cat([self.confusion.view(-1), self.top2_correct.view(1)]))
        self.confusion.view(-1).copy_(packed[:-1])
        self.top2_correct.copy_(packed[-1])
        all_reduce_(self.loss_sum)

    def summarise(self, class_names: list[str] | None = None) -> dict:
        return summarise_confusion(self.confusion.cpu(), int(self.top2_correct), class_names, float(self.loss_sum))


def summarise_confusion(confusion: torch.Tensor, top2_correct: int, class_names=None,
                        loss_sum: float | None = None) -> dict:
    """Metrics from a confusion matrix (rows: true class, columns: predicted class).

    Per-class accuracy is the recall of each class; a class with no test sample has ``None``
    and is left out of the mean class accuracy. Per-class F1 is ``2 tp / (support + predicted)``;
    a class neither present nor predicted has ``None`` and is left out of the macro F1 (as
    scikit-learn's ``f1_score(average="macro")`` leaves out labels absent from both).
    ``loss_sum``: the summed cross-entropy of the scores, reported as a mean (``loss``).
    """
    confusion = confusion.to(torch.int64)
    total = int(confusion.sum())
    support = confusion.sum(dim=1).tolist()
    hits = confusion.diagonal().tolist()
    per_class = [h / s if s else None for h, s in zip(hits, support)]
    present = [a for a in per_class if a is not None]
    predicted = confusion.sum(dim=0).tolist()
    f1 = [2 * h / (s + p) if s + p else None for h, s, p in zip(hits, support, predicted)]
    scored = [value for value in f1 if value is not None]
    return {
        "acc": sum(hits) / total if total else math.nan,
        "mean_acc": sum(present) / len(present) if present else math.nan,
        "macro_f1": sum(scored) / len(scored) if scored else math.nan,
        "per_class_f1": f1,
        "loss": loss_sum / total if loss_sum is not None and total else math.nan,
        "per_class_acc": per_class,
        "top2_acc": top2_correct / total if total else math.nan,
        "num_samples": total,
        "support": support,
        "confusion": confusion.tolist(),
        "classes": list(class_names) if class_names is not None else None,
    }


def compute_metrics(scores: torch.Tensor, target: torch.Tensor, num_classes: int, class_names=None) -> dict:
    """All metrics for one tensor of scores (B, C) and labels (B,)."""
    counts = MetricCounts(num_classes, scores.device)
    counts.update(scores, target)
    return counts.summarise(class_names)


def format_table(metrics: dict, class_names: list[str]) -> str:
    """A plain-text table: the headline numbers, then per-class accuracy and support."""
    def pct(value):
        return "   -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:6.2f}"

    width = max([len(n) for n in class_names] + [len("mean class accuracy")])
    lines = [
        f"{'overall accuracy':<{width}}  {pct(metrics['acc'])} %",
        f"{'mean class accuracy':<{width}}  {pct(metrics['mean_acc'])} %",
        f"{'macro F1':<{width}}  {pct(metrics.get('macro_f1'))} %",
        f"{'top-2 accuracy':<{width}}  {pct(metrics['top2_acc'])} %",
        f"{'samples':<{width}}  {metrics['num_samples']:6d}",
        "",
        f"{'class':<{width}}  {'acc %':>6}  {'F1 %':>6}  {'support':>7}",
    ]
    f1 = metrics.get("per_class_f1") or [None] * len(class_names)
    for name, acc, class_f1, support in zip(class_names, metrics["per_class_acc"], f1, metrics["support"]):
        lines.append(f"{name:<{width}}  {pct(acc)}  {pct(class_f1)}  {support:7d}")
    return "\n".join(lines)


def as_record(metrics: dict, class_names: list[str], prefix: str = "") -> dict:
    """A split's metrics in the shape ``metrics.jsonl`` and ``evaluate --json`` share: numbers
    under ``<prefix>acc``, ``<prefix>mean_acc``, ``<prefix>macro_f1``, ``<prefix>loss``, per-class
    values as ``{class name: value}`` (``per_class_acc``, ``per_class_f1``, ``support``), the
    confusion matrix as rows of counts (true class) by column (predicted class)."""
    names = list(class_names)
    return {
        f"{prefix}acc": metrics["acc"],
        f"{prefix}mean_acc": metrics["mean_acc"],
        f"{prefix}macro_f1": metrics["macro_f1"],
        f"{prefix}loss": metrics["loss"],
        f"{prefix}top2_acc": metrics["top2_acc"],
        f"{prefix}per_class_acc": dict(zip(names, metrics["per_class_acc"])),
        f"{prefix}per_class_f1": dict(zip(names, metrics["per_class_f1"])),
        f"{prefix}support": dict(zip(names, metrics["support"])),
        f"{prefix}samples": metrics["num_samples"],
        f"{prefix}confusion": metrics["confusion"],
    }


def json_safe(value):
    """``value`` with NaN and infinities replaced by None (JSON has neither), in nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
