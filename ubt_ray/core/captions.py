"""Class names and caption templates of the embedded Fashion-MNIST default, and caption validation."""

from __future__ import annotations

import numpy as np

# Each name carries its article so that every template reads as English.
FASHION_MNIST_CLASSES = (
    "a t-shirt", "trousers", "a pullover", "a dress", "a coat",
    "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot",
)

TEMPLATES = (
    "a photo of {}.",
    "a picture of {}.",
    "an image of {}.",
    "a product photo of {}.",
    "a black and white photo of {}.",
    "a low resolution photo of {}.",
    "a close-up photo of {}.",
    "a catalogue photo of {}.",
)

# A zero-shot prompt set that the captions above never use, to measure what the model knows beyond its training
# words: the dataset's official label names and CLIP's ImageNet-style templates absent from TEMPLATES.
FASHION_MNIST_HELDOUT_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

HELDOUT_TEMPLATES = (
    "a photo of the {}.",
    "a good photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "itap of a {}.",
    "a rendition of the {}.",
)


def template_captions(labels: np.ndarray, class_names: tuple[str, ...], seed: int,
                      templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """One caption per label, each from a template drawn with a generator seeded by `seed`."""
    choice = np.random.default_rng(seed).integers(0, len(templates), size=len(labels))
    return [templates[t].format(class_names[int(y)]) for t, y in zip(choice, labels)]


def caption_rejection(caption: object) -> str | None:
    """The reason a caption is unusable, or None."""
    if caption is None or (isinstance(caption, float) and np.isnan(caption)):
        return "caption missing"
    if not isinstance(caption, str):
        return "caption not text"
    if not caption.strip():
        return "caption empty"
    return None
