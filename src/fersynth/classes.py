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
}
# Numbered class folders are never guessed (an AffectNet re-pack's folder 1 is happy in the
# original numbering and contempt in the alphabetical one): `ingest.folder.class_map` names
# them, directly or by one of these presets. EXCLUDE marks a class outside the 7-class task.
EXCLUDE = "exclude"
_ALPHABETICAL_8 = ("angry", EXCLUDE, "disgust", "fear", "happy", "neutral", "sad", "surprise")
CLASS_MAP_PRESETS: dict[str, dict[str, str]] = {
    # RAF-DB basic, labels 1..7.
    "rafdb": {str(i): name for i, name in RAFDB_LABELS.items()},
    # FER2013's emotion codes 0..6.
    "fer2013": {str(i): name for i, name in FER2013_LABELS.items()},
    # AffectNet's own expression codes 0..10 (7 contempt, 8..10 none/uncertain/non-face).
    "affectnet": {
        **{str(i): name for i, name in AFFECTNET_LABELS.items()},
        **{str(i): EXCLUDE for i in AFFECTNET_EXCLUDED},
    },
    # AffectNet-8 re-packs numbered in alphabetical class order (an ImageFolder's indices):
    # 0 anger, 1 contempt, 2 disgust, 3 fear, 4 happy, 5 neutral, 6 sad, 7 surprise.
    "affectnet-alphabetical": {str(i): name for i, name in enumerate(_ALPHABETICAL_8)},
    # 7-class re-packs in alphabetical order (FER2013 and RAF-DB folder exports, ImageFolder).
    "alphabetical": {str(i): name for i, name in enumerate(sorted(CLASSES))},
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
