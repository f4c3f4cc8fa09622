"""fersynth: FER with generated training data."""

__version__ = "0.1.0"
