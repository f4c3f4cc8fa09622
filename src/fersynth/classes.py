"""The canonical class order and every source's mapping to it.

This module is the only place that knows class names, their order and how each dataset
numbers them. The canonical order is RAF-DB's (labels 1..7 there).
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")
NUM_CLASSES = len(CLASSES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

# RAF-DB basic: EmoLabel/list_patition_label.txt, labels 1..7.
RAFDB_LABELS: dict[int, str] = {i + 1: name for i, name in enumerate(CLASSES)}

# FER2013 (Kaggle CSV `emotion` column).
FER2013_LABELS: dict[int, str] = {
    0: "angry",
    1: "disgust",
    2: "fear",
    3: "happy",
    4: "sad",
    5: "surprise",
    6: "neutral",
}

# AffectNet `expression`: 7 = contempt and 8..10 = none / uncertain / non-face are not
# part of the 7-class task; readers exclude and count them.
AFFECTNET_LABELS: dict[int, str] = {
    0: "neutral",
    1: "happy",
    2: "sad",
    3: "surprise",
    4: "fear",
    5: "disgust",
    6: "angry",
}
AFFECTNET_EXCLUDED: dict[int, str] = {7: "contempt", 8: "none", 9: "uncertain", 10: "non-face"}

# FER+ (Microsoft fer2013new.csv): vote columns in file order. The last two are not
# expressions; contempt has no canonical class.
FERPLUS_VOTE_COLUMNS: tuple[str, ...] = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
)
FERPLUS_LABELS: dict[str, str] = {
    "neutral": "neutral",
    "happiness": "happy",
    "surprise": "surprise",
    "sadness": "sad",
    "anger": "angry",
    "disgust": "disgust",
    "fear": "fear",
}

# Folder names users give their class folders, lower-cased, mapped to canonical names.
FOLDER_ALIASES: dict[str, str] = {
    **{name: name for name in CLASSES},
    "surprised": "surprise",
    "fearful": "fear",
    "afraid": "fear",
    "disgusted": "disgust",
    "happiness": "happy",
    "sadness": "sad",
    "anger": "angry",
    "neutrality": "neutral",
    **{str(i): name for i, name in RAFDB_LABELS.items()},
}


def class_index(name: str) -> int:
    """Index of a canonical class name; raises KeyError naming the valid names."""
    try:
        return CLASS_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown class {name!r}; expected one of {', '.join(CLASSES)}") from None


def folder_class(folder_name: str) -> str | None:
    """Canonical class for a class folder name, or None when it names no class."""
    return FOLDER_ALIASES.get(folder_name.strip().lower())
