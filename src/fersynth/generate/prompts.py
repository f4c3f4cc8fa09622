"""Expression prompts per class, with GIF-style domain and adjective variants."""

from __future__ import annotations

import numpy as np

CLASS_WORDS = {
    "surprise": "surprised",
    "fear": "fearful",
    "disgust": "disgusted",
    "happy": "happy",
    "sad": "sad",
    "angry": "angry",
    "neutral": "neutral",
}
# GIF's prompt set (its domain and adjective lists), phrased for faces.
DOMAINS = ("a photo of", "a real-world photo of", "a close-up photo of", "a portrait of", "an image of")
ADJECTIVES = ("", "colorful", "high-contrast", "low-contrast", "bright", "dark")


def prompt(label: str, rng: np.random.Generator | None = None) -> str:
    """`a photo of a fearful face`, or a random style variant when an rng is given."""
    if rng is None:
        word = CLASS_WORDS[label]
        return f"a photo of {'an' if word[0] in 'aeiou' else 'a'} {word} face"
    domain = DOMAINS[int(rng.integers(len(DOMAINS)))]
    adjective = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
    described = " ".join(w for w in (adjective, CLASS_WORDS[label], "face") if w)
    article = "an" if described[0] in "aeiou" else "a"
    return f"{domain} {article} {described}"
