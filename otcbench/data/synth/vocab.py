"""The synthetic world's words: class names, colours, sizes, backgrounds, their synonyms, the zero-shot
prompt templates and the web noise captions are drawn from."""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "heart",
    "moon",
    "arrow",
    "bar",
    "hourglass",
)

#: Words a web caption may use instead of the class name. Also the thesaurus the synthetic world
#: offers to caption augmentation (EDA) so that it works offline.
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "round shape", "dot"),
    "square": ("box", "block", "tile"),
    "triangle": ("pyramid shape", "wedge"),
    "star": ("starburst", "five-pointed shape"),
    "cross": ("plus sign", "plus"),
    "ring": ("hoop", "donut", "loop"),
    "diamond": ("rhombus", "lozenge"),
    "heart": ("love heart", "valentine shape"),
    "moon": ("crescent", "crescent moon"),
    "arrow": ("pointer", "arrowhead"),
    "bar": ("stripe", "strip", "stick"),
    "hourglass": ("bowtie shape", "sand timer"),
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "orange": (250, 140, 20),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 190),
}

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("lime", "emerald"),
    "blue": ("navy", "cobalt"),
    "yellow": ("golden", "lemon"),
    "orange": ("amber", "tangerine"),
    "purple": ("violet", "lilac"),
    "white": ("snowy", "ivory"),
    "cyan": ("turquoise", "aqua"),
    "pink": ("rose", "magenta"),
}

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}

BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "noisy", "gradient", "dotted")
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("a plain background", "a plain backdrop", "a blank background"),
    "striped": ("a striped background", "stripes", "a lined background"),
    "checkered": ("a checkered background", "a checkerboard", "a grid pattern"),
    "noisy": ("a noisy background", "a grainy background", "static"),
    "gradient": ("a gradient background", "a fading background", "a smooth gradient"),
    "dotted": ("a dotted background", "polka dots", "a spotted background"),
}

#: Zero-shot prompt templates written with the eval set (open_clip format strings).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of the {}.",
    "a drawing of a {}.",
    "a small {}.",
    "a large {}.",
    "a {} on a plain background.",
    "a {} on a striped background.",
)

COUNT_WORDS = {2: ("two", "2", "a pair of"), 3: ("three", "3")}
PLURALS = {"cross": "crosses", "hourglass": "hourglasses", "box": "boxes", "plus": "pluses"}

WEB_JUNK = (
    "click to enlarge",
    "untitled",
    "image not available",
    "free shipping on orders over $50",
    "thumbnail",
    "photo by admin",
    "see more",
    "placeholder image",
    "best price guaranteed",
    "home decor ideas",
)


def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) noun phrase; only the last word changes."""
    head, _, last = noun.rpartition(" ")
    p = PLURALS.get(last, last + "es" if last.endswith(("s", "x", "sh", "ch")) else last + "s")
    return f"{head} {p}" if head else p
