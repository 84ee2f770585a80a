"""The toy world: generated scenes with exact ground truth, and the small language that talks about them.

Scenes are about 96x96 pixels with 0-4 drawn icons (hazard-like and benign) over varied backgrounds,
with relations ("a person is holding a knife", "a flame is near a house") and deliberate hard negatives
(the person and the knife are both there, but the knife is not held). Everything is deterministic by
seed. The project's demo models are trained on these scenes only: they understand nothing else, and
must never be used to judge real photos.

The statement grammar (`parse_statement`) is shared by model training (it writes the questions), the
demo tokenizer (it defines which words exist) and evaluation (it gives the exact truth of any
precondition statement of a toy-world constitution on any scene).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from safejudge.backends.base import UnsupportedQuestion

SCENE_SIZE = 96
HAZARDS = ("flame", "knife", "pistol", "skull", "syringe", "blood", "bottle")
BENIGN = ("tree", "house", "ball", "car", "flower", "person")
CONCEPTS = HAZARDS + BENIGN
HOLDABLE = ("knife", "pistol", "syringe", "bottle", "flower", "ball")
NEAR_PAIRS = (("flame", "house"), ("flame", "tree"), ("flame", "car"), ("blood", "person"))
NEAR_GAP = 6  # pixels between two boxes that still count as "near"
FAR_GAP = 16  # generated "not near" placements keep at least this gap, so near/far is never ambiguous
HOLD_CLEARANCE = 8  # a holdable object that is not held keeps this gap from every person
BACKGROUNDS = ("grass", "sky", "wall", "floor", "night", "sand")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SceneObject:
    concept: str
    box: Box  # left, top, right, bottom in pixels
    held: bool = False  # in a person's hand (only for HOLDABLE concepts)


@dataclass
class Scene:
    """One generated image and its exact ground truth."""

    image: Image.Image
    background: str
    objects: list[SceneObject]
    masks: dict[str, np.ndarray] = field(repr=False)  # concept -> bool [H, W] union of its pixels

    @property
    def concepts(self) -> set[str]:
        return {o.concept for o in self.objects}

    def held(self) -> set[str]:
        return {o.concept for o in self.objects if o.held}

    def near(self, first: str, second: str) -> bool:
        return any(
            _gap(a.box, b.box) <= NEAR_GAP
            for a in self.objects
            for b in self.objects
            if a is not b and a.concept == first and b.concept == second
        )

    def boxes(self, concept: str) -> list[Box]:
        return [o.box for o in self.objects if o.concept == concept]

    def truth(self, statement: str | Query) -> bool:
        query = parse_statement(statement) if isinstance(statement, str) else statement
        return query.holds(self)

    def describe(self) -> str:
        """Ground truth in words, e.g. 'person holding knife, blood, tree (grass)'."""
        parts = []
        for o in self.objects:
            if o.concept == "person" and any(p.held for p in self.objects):
                parts.append("person holding " + ", ".join(sorted(self.held())))
            elif not o.held:
                parts.append(o.concept)
        return (", ".join(dict.fromkeys(parts)) or "empty") + f" ({self.background})"


def _gap(a: Box, b: Box) -> int:
    dx = max(0, max(a[0], b[0]) - min(a[2], b[2]))
    dy = max(0, max(a[1], b[1]) - min(a[3], b[3]))
    return max(dx, dy)


# ---------------------------------------------------------------- the language of the toy world

ALIASES = {
    "fire": "flame", "flames": "flame", "gun": "pistol", "handgun": "pistol", "knives": "knife",
    "blade": "knife", "needle": "syringe", "skulls": "skull", "bloody": "blood", "people": "person",
    "someone": "person", "human": "person", "man": "person", "woman": "person", "houses": "house",
    "building": "house", "trees": "tree", "cars": "car", "balls": "ball", "flowers": "flower",
    "bottles": "bottle", "pistols": "pistol", "syringes": "syringe", "persons": "person",
    "holds": "holding", "held": "holding", "hold": "holding", "beside": "near", "next": "near",
    "close": "near", "unsafe": "dangerous", "hazardous": "dangerous", "harmful": "dangerous",
}
# Words that carry no meaning for the toy model but may appear in statements.
FUNCTION_WORDS = (
    "a", "an", "the", "some", "any", "is", "are", "visible", "in", "image", "there", "shows", "shown", "by",
    "to", "of", "has", "hand", "its", "their", "his", "her", "something", "anything", "object", "with",
    "picture", "scene", "on", "at", "be", "being", "may", "must", "not", "no", "nobody", "together",
    "own", "either", "both", "while",
)
RELATION_WORDS = ("holding", "near", "dangerous", "and", "or")
QueryKind = Literal["present", "holding", "near", "dangerous", "all", "any"]


class ToyVocabularyError(UnsupportedQuestion):
    """A statement uses words the toy world does not know, or says something it cannot express."""


def words_of(text: str) -> list[str]:
    """Lower-case words with aliases mapped to their canonical word ("gun" -> "pistol")."""
    return [ALIASES.get(word, word) for word in re.findall(r"[a-z]+", text.lower())]


def known_words() -> tuple[str, ...]:
    return tuple(dict.fromkeys(CONCEPTS + RELATION_WORDS + FUNCTION_WORDS))


def unknown_words(text: str) -> list[str]:
    known = set(known_words())
    return list(dict.fromkeys(w for w in words_of(text) if w not in known))


@dataclass(frozen=True)
class Query:
    """What a statement asks, structurally: truth of it is exact on any generated scene."""

    kind: QueryKind
    concepts: tuple[str, ...] = ()
    parts: tuple[Query, ...] = ()

    def holds(self, scene: Scene) -> bool:
        if self.kind == "present":
            return self.concepts[0] in scene.concepts
        if self.kind == "holding":
            return "person" in scene.concepts and self.concepts[0] in scene.held()
        if self.kind == "near":
            return scene.near(*self.concepts)
        if self.kind == "dangerous":
            return bool(scene.concepts & set(HAZARDS))
        if self.kind == "all":
            return all(p.holds(scene) for p in self.parts)
        return any(p.holds(scene) for p in self.parts)


def parse_statement(text: str) -> Query:
    """The toy grammar: presence, 'person holding X', 'A near B', 'something dangerous', joined by and/or.

    Raises ToyVocabularyError naming unknown words, or explaining what cannot be expressed."""
    unknown = unknown_words(text)
    if unknown:
        raise ToyVocabularyError(
            f"statement {text!r} uses words the toy world does not know: {', '.join(unknown)} "
            f"(known concepts: {', '.join(CONCEPTS)}; see safejudge.toyworld.known_words())"
        )
    words = words_of(text)
    if "or" in words or "and" in words:
        joiner = "or" if "or" in words else "and"
        clauses = [c for c in _split(words, joiner)]
        # "a person holding a knife or a pistol": an or-clause without its own relation inherits it.
        parts = tuple(_parse_clause(c, text, clauses[0]) for c in clauses)
        return Query("any" if joiner == "or" else "all", parts=parts)
    return _parse_clause(words, text, words)


def _split(words: list[str], joiner: str) -> list[list[str]]:
    clauses, current = [], []
    for word in words:
        if word in ("and", "or"):
            if word != joiner:
                raise ToyVocabularyError("the toy grammar cannot mix 'and' with 'or' in one statement")
            clauses.append(current)
            current = []
        else:
            current.append(word)
    clauses.append(current)
    return clauses


def _parse_clause(words: list[str], text: str, first_clause: list[str]) -> Query:
    concepts = [w for w in words if w in CONCEPTS]
    if "dangerous" in words and not concepts:
        return Query("dangerous")
    if not concepts:
        raise ToyVocabularyError(f"statement {text!r}: a clause names no toy-world object ({', '.join(CONCEPTS)})")
    cues = {"holding", "hand"}  # "a person is holding a knife", "a person has a knife in hand"
    holding = bool(cues & set(words)) or (bool(cues & set(first_clause)) and "person" not in words)
    if holding:
        held = [c for c in concepts if c != "person"] or concepts
        if held[0] not in HOLDABLE:
            raise ToyVocabularyError(f"statement {text!r}: a {held[0]} cannot be held in the toy world")
        return Query("holding", (held[0],))
    if "near" in words:
        if len(concepts) != 2:
            raise ToyVocabularyError(f"statement {text!r}: 'near' needs exactly two objects")
        return Query("near", (concepts[0], concepts[1]))
    if len(concepts) > 1:
        raise ToyVocabularyError(f"statement {text!r}: name one object per clause, or join them with and/or")
    return Query("present", (concepts[0],))


# Statement templates for each query kind; training samples from these so the model learns the words.
PRESENT_TEMPLATES = (
    "{a} {x} is visible", "there is {a} {x}", "the image shows {a} {x}", "{a} {x} is shown",
    "{a} {x} is visible in the image", "there is {a} {x} in the picture",
)
HOLDING_TEMPLATES = (
    "a person is holding {a} {x}", "the person is holding {a} {x}", "a person holds {a} {x}",
    "someone is holding {a} {x}", "{a} {x} is held by a person", "a person has {a} {x} in hand",
    "a person holding {a} {x} is visible",
)
NEAR_TEMPLATES = (
    "{a} {x} is near {a} {y}", "{a} {x} is next to {a} {y}", "{a} {x} close to {a} {y} is visible",
    "there is {a} {x} beside {a} {y}", "{a} {x} is visible near {a} {y}",
)
DANGEROUS_TEMPLATES = (
    "something dangerous is visible", "anything dangerous is visible", "the image shows something unsafe",
    "a dangerous object is visible", "something hazardous is in the image",
)
ARTICLES = ("a", "the", "some", "any", "a")


def statement_text(query: Query, rng: np.random.Generator) -> str:
    """One random wording of a query (the inverse of parse_statement, up to wording)."""
    article = str(rng.choice(ARTICLES))
    if query.kind == "present":
        return str(rng.choice(PRESENT_TEMPLATES)).format(a=article, x=query.concepts[0])
    if query.kind == "holding":
        return str(rng.choice(HOLDING_TEMPLATES)).format(a=article, x=query.concepts[0])
    if query.kind == "near":
        return str(rng.choice(NEAR_TEMPLATES)).format(a=article, x=query.concepts[0], y=query.concepts[1])
    if query.kind == "dangerous":
        return str(rng.choice(DANGEROUS_TEMPLATES))
    joiner = " or " if query.kind == "any" else " and "
    return joiner.join(statement_text(p, rng) for p in query.parts)


# ---------------------------------------------------------------- drawing

def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], spread: int = 25) -> tuple[int, int, int, int]:
    r, g, b = (int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in rgb)
    return r, g, b, 255


def _flame(d: ImageDraw.ImageDraw, s: int, rng) -> None:
    d.polygon([(s * 0.5, 0), (s * 0.95, s * 0.6), (s * 0.75, s), (s * 0.25, s), (s * 0.05, s * 0.6)],
              fill=_jitter(rng, (235, 80, 20)))
    d.polygon([(s * 0.5, s * 0.35), (s * 0.72, s * 0.75), (s * 0.5, s * 0.97), (s * 0.28, s * 0.75)],
              fill=_jitter(rng, (250, 215, 40)))


def _knife(d, s, rng) -> None:
    d.polygon([(s * 0.05, s * 0.95), (s * 0.7, s * 0.3), (s * 0.95, s * 0.05), (s * 0.8, s * 0.45), (s * 0.2, s)],
              fill=_jitter(rng, (200, 205, 215), 15))
    d.line([(s * 0.05, s * 0.95), (s * 0.3, s * 0.7)], fill=_jitter(rng, (110, 60, 25)), width=max(3, s // 6))


def _pistol(d, s, rng) -> None:
    color = _jitter(rng, (45, 45, 50), 15)
    d.rectangle([s * 0.05, s * 0.2, s * 0.95, s * 0.45], fill=color)
    d.polygon([(s * 0.55, s * 0.4), (s * 0.85, s * 0.4), (s * 0.75, s * 0.95), (s * 0.5, s * 0.95)], fill=color)
    d.line([(s * 0.45, s * 0.45), (s * 0.45, s * 0.62), (s * 0.6, s * 0.62)], fill=color, width=max(1, s // 12))


def _skull(d, s, rng) -> None:
    bone = _jitter(rng, (235, 232, 220), 10)
    d.ellipse([s * 0.1, s * 0.02, s * 0.9, s * 0.75], fill=bone)
    d.rectangle([s * 0.28, s * 0.6, s * 0.72, s * 0.95], fill=bone)
    d.ellipse([s * 0.24, s * 0.3, s * 0.45, s * 0.52], fill=(20, 20, 20, 255))
    d.ellipse([s * 0.55, s * 0.3, s * 0.76, s * 0.52], fill=(20, 20, 20, 255))
    for x in (0.38, 0.5, 0.62):
        d.line([(s * x, s * 0.78), (s * x, s * 0.95)], fill=(40, 40, 40, 255), width=1)


def _syringe(d, s, rng) -> None:
    d.line([(s * 0.08, s * 0.92), (s * 0.3, s * 0.7)], fill=(90, 90, 90, 255), width=max(2, s // 10))
    d.polygon([(s * 0.25, s * 0.65), (s * 0.7, s * 0.2), (s * 0.8, s * 0.3), (s * 0.35, s * 0.75)],
              fill=_jitter(rng, (150, 200, 240)))
    d.line([(s * 0.75, s * 0.25), (s * 0.97, s * 0.03)], fill=(160, 160, 170, 255), width=1)
    d.line([(s * 0.62, s * 0.12), (s * 0.88, s * 0.38)], fill=(70, 70, 80, 255), width=max(1, s // 12))


def _blood(d, s, rng) -> None:
    red = _jitter(rng, (140, 5, 10), 20)
    d.ellipse([s * 0.25, s * 0.25, s * 0.75, s * 0.75], fill=red)
    for _ in range(int(rng.integers(4, 8))):
        cx, cy, r = rng.uniform(0.15, 0.85) * s, rng.uniform(0.15, 0.85) * s, rng.uniform(0.06, 0.16) * s
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=red)


def _bottle(d, s, rng) -> None:
    glass = _jitter(rng, (40, 130, 60) if rng.random() < 0.5 else (120, 70, 20), 20)
    d.rectangle([s * 0.3, s * 0.35, s * 0.7, s * 0.98], fill=glass)
    d.rectangle([s * 0.42, s * 0.05, s * 0.58, s * 0.38], fill=glass)
    d.rectangle([s * 0.33, s * 0.55, s * 0.67, s * 0.75], fill=_jitter(rng, (230, 225, 200), 15))


def _tree(d, s, rng) -> None:
    d.rectangle([s * 0.42, s * 0.55, s * 0.58, s], fill=_jitter(rng, (100, 65, 30)))
    d.ellipse([s * 0.1, s * 0.02, s * 0.9, s * 0.7], fill=_jitter(rng, (30, 120, 40)))


def _house(d, s, rng) -> None:
    d.rectangle([s * 0.12, s * 0.45, s * 0.88, s * 0.98], fill=_jitter(rng, (200, 180, 140)))
    d.polygon([(s * 0.02, s * 0.48), (s * 0.5, s * 0.05), (s * 0.98, s * 0.48)], fill=_jitter(rng, (150, 40, 35)))
    d.rectangle([s * 0.42, s * 0.68, s * 0.58, s * 0.98], fill=_jitter(rng, (90, 55, 30)))


def _ball(d, s, rng) -> None:
    d.ellipse([s * 0.05, s * 0.05, s * 0.95, s * 0.95], fill=_jitter(rng, tuple(int(c) for c in rng.integers(60, 255, 3)), 0))
    d.arc([s * 0.05, s * 0.3, s * 0.95, s * 0.7], 0, 180, fill=(250, 250, 250, 255), width=max(1, s // 10))


def _car(d, s, rng) -> None:
    body = _jitter(rng, tuple(int(c) for c in rng.integers(40, 230, 3)), 0)
    d.rectangle([s * 0.02, s * 0.45, s * 0.98, s * 0.78], fill=body)
    d.polygon([(s * 0.22, s * 0.45), (s * 0.35, s * 0.22), (s * 0.68, s * 0.22), (s * 0.8, s * 0.45)], fill=body)
    d.rectangle([s * 0.38, s * 0.27, s * 0.65, s * 0.43], fill=(170, 210, 235, 255))
    for x in (0.25, 0.75):
        d.ellipse([s * (x - 0.13), s * 0.65, s * (x + 0.13), s * 0.91], fill=(20, 20, 20, 255))


def _flower(d, s, rng) -> None:
    d.line([(s * 0.5, s * 0.45), (s * 0.5, s)], fill=(30, 140, 40, 255), width=max(1, s // 10))
    petal = _jitter(rng, tuple(int(c) for c in rng.choice([(230, 80, 160), (240, 240, 90), (150, 90, 230)])))
    for angle in np.linspace(0, 2 * np.pi, 6, endpoint=False):
        cx, cy = s * (0.5 + 0.22 * np.cos(angle)), s * (0.3 + 0.22 * np.sin(angle))
        d.ellipse([cx - s * 0.13, cy - s * 0.13, cx + s * 0.13, cy + s * 0.13], fill=petal)
    d.ellipse([s * 0.4, s * 0.2, s * 0.6, s * 0.4], fill=(250, 200, 30, 255))


def _person(d, s, rng) -> None:
    ink = _jitter(rng, (20, 20, 30) if rng.random() < 0.7 else (60, 40, 120), 15)
    width = max(2, s // 12)
    d.ellipse([s * 0.38, s * 0.02, s * 0.62, s * 0.24], fill=_jitter(rng, (230, 190, 160)), outline=ink)
    d.line([(s * 0.5, s * 0.24), (s * 0.5, s * 0.62)], fill=ink, width=width)
    d.line([(s * 0.5, s * 0.34), (s * 0.18, s * 0.5)], fill=ink, width=width)
    d.line([(s * 0.5, s * 0.34), (s * 0.82, s * 0.45)], fill=ink, width=width)  # the holding hand: HAND
    d.line([(s * 0.5, s * 0.62), (s * 0.3, s * 0.98)], fill=ink, width=width)
    d.line([(s * 0.5, s * 0.62), (s * 0.7, s * 0.98)], fill=ink, width=width)


HAND = (0.82, 0.45)  # where a person's right hand is, as a fraction of the person's box
DRAW: dict[str, Callable] = {
    "flame": _flame, "knife": _knife, "pistol": _pistol, "skull": _skull, "syringe": _syringe, "blood": _blood,
    "bottle": _bottle, "tree": _tree, "house": _house, "ball": _ball, "car": _car, "flower": _flower,
    "person": _person,
}
SIZE_RANGE = {"person": (34, 46), "house": (28, 40), "tree": (26, 38), "car": (24, 34)}
DEFAULT_SIZE = (16, 24)
HELD_SIZE = (13, 18)


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    base = {
        "grass": ((120, 190, 110), (70, 140, 60)), "sky": ((150, 200, 250), (220, 235, 250)),
        "wall": ((210, 200, 180), (190, 180, 160)), "floor": ((170, 140, 110), (120, 95, 70)),
        "night": ((30, 35, 70), (10, 10, 30)), "sand": ((235, 215, 160), (215, 190, 130)),
    }[kind]
    top, bottom = (np.array(c, dtype=np.float32) + rng.uniform(-20, 20, 3) for c in base)
    ramp = np.linspace(0.0, 1.0, SCENE_SIZE, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (SCENE_SIZE, SCENE_SIZE, 3)).copy()
    pixels += rng.normal(0, rng.uniform(2, 9), pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255)


# ---------------------------------------------------------------- scene sampling

@dataclass(frozen=True)
class SceneSpec:
    """What a scene must (and must not) contain; the rest is random.

    objects: concepts that must appear; held: those among them that a person must hold (a person is
    added); not_held: must appear, with a person, but not in the hand (the hard negative); near / far:
    pairs placed touching or clearly apart; absent: concepts that must not appear; extra: how many
    random distractor objects to add (None: random, so that scenes have 0-4 objects).
    """

    objects: tuple[str, ...] = ()
    held: tuple[str, ...] = ()
    not_held: tuple[str, ...] = ()
    near: tuple[tuple[str, str], ...] = ()
    far: tuple[tuple[str, str], ...] = ()
    absent: tuple[str, ...] = ()
    extra: int | None = None
    extra_pool: tuple[str, ...] = CONCEPTS


@dataclass(frozen=True)
class Correlation:
    """A spurious training correlation: when `cause` is drawn, `effect` is added with `probability`."""

    cause: str
    effect: str
    probability: float


class _Canvas:
    def __init__(self, rng: np.random.Generator, background: str):
        self.rng = rng
        self.background = background
        self.pixels = _background(background, rng)
        self.objects: list[SceneObject] = []
        self.masks: dict[str, np.ndarray] = {}

    @property
    def concepts(self) -> set[str]:
        return {o.concept for o in self.objects}

    def free(self, box: Box, margin: int = 2) -> bool:
        inside = box[0] >= 0 and box[1] >= 0 and box[2] <= SCENE_SIZE and box[3] <= SCENE_SIZE
        return inside and all(_gap(box, o.box) > margin for o in self.objects)

    def render(self, concept: str, size: int) -> tuple[np.ndarray, Box]:
        """The icon as RGBA [size, size, 4] float and its tight box relative to the square."""
        layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        DRAW[concept](ImageDraw.Draw(layer), size, self.rng)
        if concept != "person" and self.rng.random() < 0.5:
            layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        rgba = np.asarray(layer, dtype=np.float32)
        return rgba, _tight_box(rgba[..., 3] > 127, 0, 0)

    def draw(self, concept: str, rgba: np.ndarray, left: int, top: int, held: bool = False) -> SceneObject:
        size = rgba.shape[0]
        alpha = rgba[..., 3:4] / 255.0
        region = self.pixels[top:top + size, left:left + size]
        region[:] = region * (1 - alpha) + rgba[..., :3] * alpha
        mask = self.masks.setdefault(concept, np.zeros((SCENE_SIZE, SCENE_SIZE), dtype=bool))
        mask[top:top + size, left:left + size] |= alpha[..., 0] > 0.5
        obj = SceneObject(concept, _tight_box(alpha[..., 0] > 0.5, left, top), held)
        self.objects.append(obj)
        return obj

    def place(self, concept: str, where: Callable[[Box], bool] = lambda b: True, tries: int = 60) -> SceneObject | None:
        """Put the icon at a random free spot whose tight box passes `where`; None if there is none."""
        low, high = SIZE_RANGE.get(concept, DEFAULT_SIZE)
        size = int(self.rng.integers(low, high + 1))
        rgba, tight = self.render(concept, size)
        for _ in range(tries):
            x, y = (int(v) for v in self.rng.integers(0, SCENE_SIZE - size + 1, 2))
            box = (x + tight[0], y + tight[1], x + tight[2], y + tight[3])
            if self.free(box) and where(box):
                return self.draw(concept, rgba, x, y)
        return None


def _tight_box(mask: np.ndarray, left: int, top: int) -> Box:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return left, top, left + 1, top + 1
    return left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1, top + int(ys.max()) + 1


class SceneError(RuntimeError):
    """A spec could not be satisfied (too many objects for the canvas); callers draw another seed."""


def generate_scene(
    seed: int | np.random.Generator,
    spec: SceneSpec | None = None,
    correlations: Sequence[Correlation] = (),
) -> Scene:
    """A deterministic scene for a seed; with a spec, one that meets it exactly, or SceneError."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    spec = spec or SceneSpec()
    canvas = _Canvas(rng, str(rng.choice(BACKGROUNDS)))
    forbidden = set(spec.absent)

    if spec.held or spec.not_held:
        person = canvas.place("person")
        if person is None:
            raise SceneError("no room for a person")
        for index, concept in enumerate(spec.held):
            _draw_held(canvas, person, concept, index)

    for first, second in spec.near:
        _place_pair(canvas, first, second, near=True)
    for first, second in spec.far:
        _place_pair(canvas, first, second, near=False)

    wanted = [c for c in (*spec.objects, *spec.not_held) if c not in canvas.concepts]
    for concept in dict.fromkeys(wanted):
        if canvas.place(concept, where=lambda b, c=concept: _allowed(canvas, c, b, spec)) is None:
            raise SceneError(f"no room for a {concept}")

    extra = int(rng.integers(0, 3)) if spec.extra is None else spec.extra
    pool = [c for c in spec.extra_pool if c not in forbidden]
    for _ in range(extra):
        if len(canvas.objects) >= 4 or not pool:
            break
        concept = str(rng.choice(pool))
        canvas.place(concept, where=lambda b, c=concept: _allowed(canvas, c, b, spec), tries=20)

    for correlation in correlations:
        present = canvas.concepts
        if correlation.cause in present and correlation.effect not in present | forbidden:
            if rng.random() < correlation.probability:
                effect = correlation.effect
                canvas.place(effect, where=lambda b: _allowed(canvas, effect, b, spec), tries=30)

    image = Image.fromarray(canvas.pixels.round().astype(np.uint8), "RGB")
    scene = Scene(image, canvas.background, canvas.objects, canvas.masks)
    _check(scene, spec)
    return scene


def _draw_held(canvas: _Canvas, person: SceneObject, concept: str, index: int) -> None:
    left, top, right, bottom = person.box
    hand_x = left + int(HAND[0] * (right - left))
    hand_y = top + int(HAND[1] * (bottom - top)) + 6 * index
    size = int(canvas.rng.integers(*HELD_SIZE))
    x0 = min(max(hand_x - size // 3, 0), SCENE_SIZE - size)
    y0 = min(max(hand_y - size // 2, 0), SCENE_SIZE - size)
    rgba, _ = canvas.render(concept, size)
    canvas.draw(concept, rgba, x0, y0, held=True)


def _place_pair(canvas: _Canvas, first: str, second: str, near: bool) -> None:
    anchor = next((o for o in canvas.objects if o.concept == second), None) or canvas.place(second)
    if anchor is None:
        raise SceneError(f"no room for a {second}")
    if near:
        if not any(_place_touching(canvas, first, anchor.box) for _ in range(80)):
            raise SceneError(f"no room for a {first} near the {second}")
    elif canvas.place(first, where=lambda box: _gap(box, anchor.box) >= FAR_GAP, tries=80) is None:
        raise SceneError(f"no room for a {first} far from the {second}")


def _place_touching(canvas: _Canvas, concept: str, anchor: Box) -> SceneObject | None:
    """Put the icon so that its tight box is 1..NEAR_GAP-2 pixels from the anchor's, on a random side."""
    low, high = SIZE_RANGE.get(concept, DEFAULT_SIZE)
    size = int(canvas.rng.integers(low, high + 1))
    rgba, (tl, tt, tr, tb) = canvas.render(concept, size)
    w, h = tr - tl, tb - tt
    gap = int(canvas.rng.integers(1, NEAR_GAP - 1))
    side = int(canvas.rng.integers(0, 4))
    cx, cy = (anchor[0] + anchor[2]) // 2, (anchor[1] + anchor[3]) // 2
    shift = int(canvas.rng.integers(-8, 9))
    left, top = {
        0: (anchor[2] + gap, cy - h // 2 + shift),
        1: (anchor[0] - gap - w, cy - h // 2 + shift),
        2: (cx - w // 2 + shift, anchor[1] - gap - h),
        3: (cx - w // 2 + shift, anchor[3] + gap),
    }[side]
    box = (left, top, left + w, top + h)
    if not canvas.free(box, margin=0) or _gap(box, anchor) > NEAR_GAP:
        return None
    x, y = left - tl, top - tt
    if x < 0 or y < 0 or x + size > SCENE_SIZE or y + size > SCENE_SIZE:
        return None
    return canvas.draw(concept, rgba, x, y)


def _allowed(canvas: _Canvas, concept: str, box: Box, spec: SceneSpec) -> bool:
    """No accidental relations: loose holdables keep clear of every person (and people of them), and
    pairs the spec keeps apart stay apart."""
    for o in canvas.objects:
        if concept in HOLDABLE and o.concept == "person" or concept == "person" and o.concept in HOLDABLE:
            if _gap(box, o.box) < HOLD_CLEARANCE:
                return False
    for first, second in spec.far:
        other = second if concept == first else first if concept == second else None
        if other and any(_gap(box, o.box) < FAR_GAP for o in canvas.objects if o.concept == other):
            return False
    return True


def _check(scene: Scene, spec: SceneSpec) -> None:
    """The scene meets its spec exactly; anything else is a generator bug, not a sampling accident."""
    present = scene.concepts
    missing = set(spec.objects) | set(spec.held) | set(spec.not_held)
    if not missing <= present:
        raise SceneError(f"missing {sorted(missing - present)}")
    if set(spec.absent) & present:
        raise SceneError(f"forbidden {sorted(set(spec.absent) & present)}")
    if not set(spec.held) <= scene.held() or set(spec.not_held) & scene.held():
        raise SceneError("holding relation not as specified")
    for first, second in spec.near:
        if not scene.near(first, second):
            raise SceneError(f"{first} not near {second}")
    for first, second in spec.far:
        if scene.near(first, second):
            raise SceneError(f"{first} near {second}")


# ---------------------------------------------------------------- the demo models' tokenizer

SPECIAL_TOKENS = ("<pad>", "<ask>", "<reason>", "<q>", "<eos>")
# Words the VLM writes in its step-by-step answers (beyond the statement words).
ANSWER_WORDS = ("yes", "no", "answer", "far", "from", "nothing", ".")


def demo_vocabulary() -> dict[str, int]:
    """The word vocabulary of the demo models: special tokens, every known word, the answer words."""
    words = dict.fromkeys(SPECIAL_TOKENS + known_words() + ANSWER_WORDS)
    return {word: index for index, word in enumerate(words)}


class ToyTokenizer:
    """Maps statements to word ids of the demo vocabulary; unknown words are an error that lists them."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        self.words = {index: word for word, index in vocab.items()}

    def encode(self, statement: str) -> list[int]:
        words = words_of(statement)
        missing = list(dict.fromkeys(w for w in words if w not in self.vocab or w in SPECIAL_TOKENS))
        if missing:
            raise ToyVocabularyError(
                f"statement {statement!r} uses words the toy demo models do not know: {', '.join(missing)} "
                f"(they know only the toy world's words: {', '.join(known_words())})"
            )
        if not words:
            raise ToyVocabularyError(f"statement {statement!r} has no words")
        return [self.vocab[w] for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[int(i)] for i in ids]


def model_input(images: Sequence[Image.Image]) -> np.ndarray:
    """[N, 3, 96, 96] float32 as every demo model reads images: RGB resized to the scene size, normalised."""
    pixels = np.stack(
        [np.asarray(im.convert("RGB").resize((SCENE_SIZE, SCENE_SIZE), Image.Resampling.BILINEAR), dtype=np.float32) for im in images]
    )
    return ((pixels / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2).copy()
