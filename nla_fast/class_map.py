"""Classes of two datasets matched by meaning, for evaluating a checkpoint on another dataset.

RAF-DB, FERPlus and AffectNet name and order the same basic expressions differently
(``Happiness`` / ``happiness`` / ``Happy``, RAF-DB starting with Surprise, the others with
neutral). ``map_classes`` pairs each class of the evaluated data with the checkpoint's class of
the same meaning. A data class the checkpoint has no class for (FERPlus's and AffectNet's
contempt, for a 7-class checkpoint) cannot be predicted: its samples are reported apart, with
what the checkpoint predicted for them, never silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

# meaning -> the names datasets give it (compared in lower case)
MEANINGS = {
    "surprise": ("surprise", "surprised"),
    "fear": ("fear", "fearful", "afraid"),
    "disgust": ("disgust", "disgusted"),
    "happiness": ("happiness", "happy", "joy"),
    "sadness": ("sadness", "sad"),
    "anger": ("anger", "angry"),
    "neutral": ("neutral",),
    "contempt": ("contempt",),
}
_MEANING_OF = {name: meaning for meaning, names in MEANINGS.items() for name in names}


def meaning(name: str) -> str | None:
    """The expression a class name means (``"Happy"`` -> ``"happiness"``), or None when unknown."""
    return _MEANING_OF.get(str(name).strip().lower())


@dataclass(frozen=True)
class ClassMap:
    data_classes: tuple  # the evaluated dataset's classes, in its order
    model_classes: tuple  # the checkpoint's classes, in its order
    to_model: tuple  # for each data class, the index of the checkpoint's class of the same meaning, or None

    @property
    def unpredictable(self) -> list[str]:
        """Data classes the checkpoint has no class for."""
        return [name for name, index in zip(self.data_classes, self.to_model) if index is None]

    @property
    def model_only(self) -> list[str]:
        """Checkpoint classes no data class maps to (never right on this data)."""
        mapped = set(self.to_model)
        return [name for index, name in enumerate(self.model_classes) if index not in mapped]

    def table(self) -> str:
        """The pairing as a plain-text table, one row per class of the data."""
        width = max(len(name) for name in self.data_classes + ("data class",))
        lines = [f"{'data class':<{width}}  checkpoint class"]
        for name, index in zip(self.data_classes, self.to_model):
            paired = self.model_classes[index] if index is not None else "- (cannot be predicted)"
            lines.append(f"{name:<{width}}  {paired}")
        for name in self.model_only:
            lines.append(f"{'-':<{width}}  {name} (no such class in the data)")
        return "\n".join(lines)


class ClassMapError(ValueError):
    """Two class lists that cannot be paired by meaning; the message names the class."""


def map_classes(data_classes, model_classes) -> ClassMap:
    """Pair ``data_classes`` with ``model_classes`` by meaning (:class:`ClassMapError` for a name
    whose meaning is unknown, or two classes of one meaning)."""
    data_classes, model_classes = tuple(data_classes), tuple(model_classes)
    by_meaning = {}
    for index, name in enumerate(model_classes):
        known = meaning(name)
        if known is None:
            raise ClassMapError(f"the checkpoint's class {name!r} has no known meaning (known: {', '.join(MEANINGS)}); "
                                "classes can only be matched by meaning between the FER datasets' expressions")
        if known in by_meaning:
            raise ClassMapError(f"the checkpoint has two classes meaning {known}: {model_classes[by_meaning[known]]!r} "
                                f"and {name!r}")
        by_meaning[known] = index
    to_model = []
    for name in data_classes:
        known = meaning(name)
        if known is None:
            raise ClassMapError(f"the data's class {name!r} has no known meaning (known: {', '.join(MEANINGS)})")
        to_model.append(by_meaning.get(known))
    return ClassMap(data_classes, model_classes, tuple(to_model))
