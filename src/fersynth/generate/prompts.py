"""Expression prompts per class: GIF-style domain and adjective variants for seed expansion,
and face descriptions varied over age, gender, ethnicity, lighting, pose and accessories for
new identities (SynFace / SynFER style)."""

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

# New identities: who is shown and how (each drawn uniformly and independently per image).
AGES = ("child", "teenage", "young adult", "middle-aged", "elderly")
GENDERS = ("woman", "man")
ETHNICITIES = (
    "African",
    "East Asian",
    "South Asian",
    "Southeast Asian",
    "Middle Eastern",
    "Hispanic",
    "White",
)
LIGHTING = ("soft daylight", "studio lighting", "dim indoor light", "harsh side light", "backlight")
POSES = (
    "frontal view",
    "slightly turned to the left",
    "slightly turned to the right",
    "head tilted",
    "looking up",
)
ACCESSORIES = ("", "", "", "wearing glasses", "wearing a hat", "wearing earrings", "with a beard")


def _article(text: str) -> str:
    return "an" if text[0].lower() in "aeiou" else "a"


def prompt(label: str, rng: np.random.Generator | None = None) -> str:
    """`a photo of a fearful face`, or a random style variant when an rng is given."""
    if rng is None:
        word = CLASS_WORDS[label]
        return f"a photo of {_article(word)} {word} face"
    domain = DOMAINS[int(rng.integers(len(DOMAINS)))]
    adjective = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
    described = " ".join(w for w in (adjective, CLASS_WORDS[label], "face") if w)
    return f"{domain} {_article(described)} {described}"


def identity_prompt(label: str, rng: np.random.Generator) -> str:
    """A new face showing `label`'s expression, e.g. `a close-up photo of an elderly East Asian
    woman with a fearful expression, soft daylight, frontal view, wearing glasses`."""

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    person = f"{pick(AGES)} {pick(ETHNICITIES)} {pick(GENDERS)}"
    parts = [f"a close-up photo of {_article(person)} {person} with a {CLASS_WORDS[label]} expression"]
    parts += [pick(LIGHTING), pick(POSES), pick(ACCESSORIES)]
    return ", ".join(p for p in parts if p)
