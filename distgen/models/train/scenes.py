"""Procedural shape scenes with captions, reproducible from a seed (issue 17 part 1).

A scene is one or two flat shapes from :data:`SHAPES` in colours of the closed :data:`PALETTE`, small or
large, placed on the left / right / top / bottom / center or relative to each other, over a plain or a
gradient background. :func:`sample_scene` draws one from ``(seed, index)`` (numpy's seeded generator:
the same scene on every machine); :func:`render` draws it anti-aliased (4x supersampled with Pillow,
then box-filtered down) at any resolution, since positions and sizes are fractions of the side.
Captions are generated from the scene (:func:`caption_of`) and parsed back by :func:`parse_caption`,
which is what the checker reads. Attributes a caption leaves out (the size, the position, sometimes
the background) are still drawn at random, so the model learns what an unsaid attribute looks like.

Clips (:func:`sample_clip`, :func:`render_clip`): one shape moving from one side to the other,
bouncing from left to right, growing, shrinking or turning another colour over ``frames`` frames,
the motion in the caption ("a red ball bouncing from left to right on a white background").

Every word of every caption is in :data:`VOCABULARY`; :func:`build_tokenizer` makes a ``CLIPTokenizer``
(byte-level BPE files, as Stable Diffusion ships) whose merges turn each vocabulary word into exactly one
token, so ``from_pretrained`` loads it like any SD tokenizer and the encoding is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

# Colours far apart in RGB (every pair >= 85 apart), so the nearest palette entry names a pixel.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 40),
    "orange": (245, 125, 15),
    "purple": (140, 40, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star")
SYNONYMS = {"ball": "circle"}  # caption word -> shape
SIZES = {"small": 0.10, "large": 0.17}  # half the shape's extent, as a fraction of the image side
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "center": "in the center"}
POSITION_XY = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
RELATIONS = ("above", "below", "left of", "right of", "and")
RELATION_PHRASE = {"above": "above", "below": "below", "left of": "to the left of", "right of": "to the right of",
                   "and": "and"}
ARRANGEMENTS = {"row": "side by side", "column": "one above the other"}  # two of the same object
MOTIONS = ("left to right", "right to left", "top to bottom", "bottom to top", "bounce left to right",
           "bounce right to left", "growing", "shrinking", "turning")
# A gradient background runs from its colour to (colour mixed with ``towards`` by ``amount``): chosen so
# that every pixel's nearest palette entry is still the background colour, the next nearest at least 1.6x
# as far (tests/test_scenes.py checks it).
_BLACK, _GRAY, _WHITE = (0, 0, 0), (128, 128, 128), (255, 255, 255)
GRADIENT: dict[str, tuple[tuple[int, int, int], float]] = {
    "red": (_BLACK, 0.3), "green": (_BLACK, 0.3), "blue": (_BLACK, 0.3), "yellow": (_WHITE, 0.3),
    "orange": (_GRAY, 0.3), "purple": (_WHITE, 0.3), "white": (_BLACK, 0.2), "black": (_GRAY, 0.3),
}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    cx: float  # centre, fractions of the width / height
    cy: float
    radius: float  # half the extent, fraction of the side

    def scaled(self, radius: float) -> "Shape":
        return replace(self, radius=radius)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: str
    gradient: str | None = None  # None, "horizontal", "vertical"
    # What the caption says (None: the caption leaves it out).
    kind: str = "single"  # "single", "two" (two of the same object), "pair" (two objects and a relation)
    position: str | None = None  # single: where the object is
    relation: str | None = None  # pair: A <relation> B
    arrangement: str | None = None  # two: "row" / "column"
    say_size: tuple[bool, ...] = ()
    say_background: bool = True
    caption: str = ""


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a parsed caption; None: not said."""

    shape: str
    colour: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    objects: tuple[ObjectSpec, ...]
    background: str | None = None
    gradient: bool = False
    kind: str = "single"
    relation: str | None = None  # pair: objects[0] <relation> objects[1]
    arrangement: str | None = None  # two
    motion: str | None = None  # clips
    motion_colour: str | None = None  # "turning": the colour it ends as


@dataclass(frozen=True)
class Clip:
    frames: tuple[Scene, ...]
    motion: str
    caption: str = ""
    end_colour: str | None = None
    fills: tuple = ()  # per frame: the object's RGB fill when it differs from its colour (turning), else None


def _words() -> tuple[str, ...]:
    words = {"a", "an", "two", "on", "the", "at", "in", "of", "to", "and", "by", "one", "other", "side", "from",
             "background", "gradient", "moving", "bouncing", "growing", "shrinking", "turning", "above", "below",
             "left", "right", "top", "bottom", "center"}
    words |= set(COLOURS) | set(SIZES)
    for shape in (*SHAPES, *SYNONYMS):
        words |= {shape, shape + "s"}
    return tuple(sorted(words))


VOCABULARY = _words()


# --------------------------------------------------------------------------------------- sampling
def _rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(stream)])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _background(rng, exclude: set[str]) -> str:
    return _pick(rng, [c for c in COLOURS if c not in exclude])


def sample_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of the data set of ``seed`` (the same on every machine and Python version)."""
    rng = _rng(seed, index)
    kind = _pick(rng, ("single", "single", "two", "pair", "pair"))
    gradient = _pick(rng, (None, None, "horizontal", "vertical"))
    jitter = lambda: float(rng.uniform(-0.04, 0.04))  # noqa: E731
    if kind == "single":
        shape, colour, size = _pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, tuple(SIZES))
        position = _pick(rng, (*POSITIONS, None))
        r = SIZES[size]
        if position is None:
            cx, cy = (float(rng.uniform(r + 0.06, 1 - r - 0.06)) for _ in range(2))
        else:
            x, y = POSITION_XY[position]
            cx, cy = x + jitter(), y + jitter()
        objects = (Shape(shape, colour, size, cx, cy, r),)
        say_size = (bool(rng.random() < 0.6),)
        scene = Scene(objects, _background(rng, {colour}), gradient, kind, position=position, say_size=say_size)
    elif kind == "two":
        shape, colour, size = _pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, tuple(SIZES))
        arrangement = _pick(rng, ("row", "column"))
        r = SIZES[size]
        a, b, off = 0.27 + jitter(), 0.73 + jitter(), 0.5 + jitter()
        xy = ((a, off), (b, off)) if arrangement == "row" else ((off, a), (off, b))
        objects = tuple(Shape(shape, colour, size, x, y, r) for x, y in xy)
        say_size = (bool(rng.random() < 0.6),)
        said = arrangement if rng.random() < 0.5 else None
        scene = Scene(objects, _background(rng, {colour}), gradient, kind, arrangement=said, say_size=say_size)
    else:
        first = (_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, tuple(SIZES)))
        while True:
            second = (_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, tuple(SIZES)))
            if second[:2] != first[:2]:
                break
        relation = _pick(rng, RELATIONS)
        axis = relation if relation != "and" else _pick(rng, ("left of", "right of", "above", "below"))
        a, b, off = 0.27 + jitter(), 0.73 + jitter(), 0.5 + jitter()
        pos = {"left of": ((a, off), (b, off)), "right of": ((b, off), (a, off)),
               "above": ((off, a), (off, b)), "below": ((off, b), (off, a))}[axis]
        objects = tuple(Shape(s, c, z, x, y, SIZES[z]) for (s, c, z), (x, y) in zip((first, second), pos))
        say_size = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        scene = Scene(objects, _background(rng, {first[1], second[1]}), gradient, kind, relation=relation,
                      say_size=say_size)
    scene = replace(scene, say_background=bool(rng.random() < 0.9))
    return replace(scene, caption=caption_of(scene))


def _noun(shape: str, plural: bool = False) -> str:
    return shape + ("s" if plural else "")


def _object_phrase(obj: Shape, say_size: bool, article: str = "a", plural: bool = False, word: str | None = None) -> str:
    parts = ([obj.size] if say_size else []) + [obj.colour, _noun(word or obj.shape, plural)]
    return " ".join([_article(article, parts[0])] + parts)


def _article(article: str, word: str) -> str:
    return "an" if article == "a" and word[0] in "aeiou" else article


def _background_phrase(scene: Scene) -> str:
    if not scene.say_background:
        return ""
    return f" on {_article('a', scene.background)} {scene.background}{' gradient' if scene.gradient else ''} background"


def caption_of(scene: Scene) -> str:
    o = scene.objects
    if scene.kind == "single":
        text = _object_phrase(o[0], scene.say_size[0])
        if scene.position:
            text += " " + POSITION_PHRASE[scene.position]
    elif scene.kind == "two":
        text = _object_phrase(o[0], scene.say_size[0], "two", plural=True)
        if scene.arrangement:
            text += " " + ARRANGEMENTS[scene.arrangement]
    else:
        text = f"{_object_phrase(o[0], scene.say_size[0])} {RELATION_PHRASE[scene.relation]} " \
               f"{_object_phrase(o[1], scene.say_size[1])}"
    return text + _background_phrase(scene)


# ----------------------------------------------------------------------------------------- parsing
def _read_object(words: list[str], i: int) -> tuple[dict, int]:
    """``[size] colour shape`` at ``words[i]`` (after the article) -> (fields, next index)."""
    size = None
    if words[i] in SIZES:
        size, i = words[i], i + 1
    if i >= len(words) or words[i] not in PALETTE:
        raise ValueError(f"expected a colour at word {i + 1}: {' '.join(words)!r}")
    colour, i = words[i], i + 1
    noun = words[i] if i < len(words) else ""
    base = noun[:-1] if noun.endswith("s") and noun[:-1] in (*SHAPES, *SYNONYMS) else noun
    if base not in SHAPES and base not in SYNONYMS:
        raise ValueError(f"expected a shape at word {i + 1}: {' '.join(words)!r}")
    return dict(shape=SYNONYMS.get(base, base), colour=colour, size=size), i + 1


def _match(words: list[str], i: int, phrase: str) -> bool:
    p = phrase.split()
    return words[i:i + len(p)] == p


def parse_caption(caption: str) -> CaptionSpec:
    """The objects, relation, background and motion a caption of this grammar asks for.

    Raises ValueError on text outside the grammar (the checker cannot score what it cannot read)."""
    words = caption.lower().replace(",", " ").split()
    if not words:
        raise ValueError("empty caption")
    words = ["a" if w == "an" else w for w in words]
    if words[0] not in ("a", "two"):
        raise ValueError(f"a caption starts with 'a', 'an' or 'two': {caption!r}")
    kind = "two" if words[0] == "two" else "single"
    first, i = _read_object(words, 1)
    objects = [first]
    relation = arrangement = motion = motion_colour = None
    background, gradient = None, False
    while i < len(words):
        if _match(words, i, "on a") and "background" in words[i:]:
            j = i + 2
            if words[j] not in PALETTE:
                raise ValueError(f"expected a background colour: {caption!r}")
            background = words[j]
            gradient = words[j + 1] == "gradient"
            i = j + (3 if gradient else 2)
            continue
        for name, phrase in POSITION_PHRASE.items():
            if _match(words, i, phrase):
                objects[0]["position"] = name
                i += len(phrase.split())
                break
        else:
            for name, phrase in ARRANGEMENTS.items():
                if _match(words, i, phrase):
                    arrangement, i = name, i + len(phrase.split())
                    break
            else:
                for name in ("left of", "right of", "above", "below", "and"):
                    phrase = RELATION_PHRASE[name]
                    if _match(words, i, phrase) and i + len(phrase.split()) < len(words) \
                            and words[i + len(phrase.split())] == "a":
                        relation = name
                        second, i = _read_object(words, i + len(phrase.split()) + 1)
                        objects.append(second)
                        kind = "pair"
                        break
                else:
                    motion, i, motion_colour = _read_motion(words, i, caption)
    specs = tuple(ObjectSpec(**o) for o in objects)
    if kind == "two":
        specs = (specs[0], specs[0])
    return CaptionSpec(specs, background, gradient, kind, relation, arrangement, motion, motion_colour)


def _read_motion(words: list[str], i: int, caption: str) -> tuple[str, int, str | None]:
    w = words[i]
    if w in ("moving", "bouncing") and _match(words, i + 1, "from") and i + 4 < len(words) + 1:
        a, to, b = words[i + 2:i + 5]
        if to == "to" and {a, b} in ({"left", "right"}, {"top", "bottom"}):
            name = f"{a} to {b}"
            if w == "bouncing":
                if a not in ("left", "right"):
                    raise ValueError(f"bouncing goes left to right or right to left: {caption!r}")
                name = "bounce " + name
            return name, i + 5, None
    if w in ("growing", "shrinking"):
        return w, i + 1, None
    if w == "turning" and i + 1 < len(words) and words[i + 1] in PALETTE:
        return "turning", i + 2, words[i + 1]
    raise ValueError(f"cannot read {' '.join(words[i:])!r} in {caption!r}")


# --------------------------------------------------------------------------------------- rendering
def _shape_points(shape: Shape, side: float) -> list[tuple[float, float]] | None:
    cx, cy, r = shape.cx * side, shape.cy * side, shape.radius * side
    if shape.shape == "square":
        h = 0.9 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape.shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rad * math.cos(angle), cy + 0.05 * r + rad * math.sin(angle)))
        return points
    return None  # circle


def _background_array(scene: Scene, side: int) -> np.ndarray:
    colour = np.array(PALETTE[scene.background], dtype=np.float32)
    if not scene.gradient:
        return np.broadcast_to(colour, (side, side, 3)).copy()
    towards, amount = GRADIENT[scene.background]
    towards = np.array(towards, dtype=np.float32)
    t = np.linspace(0.0, amount, side, dtype=np.float32)
    ramp = t[None, :, None] if scene.gradient == "horizontal" else t[:, None, None]
    return colour * (1 - ramp) + towards * ramp + np.zeros((side, side, 1), np.float32)


def _rgb(colour) -> tuple[int, int, int]:
    return PALETTE[colour] if isinstance(colour, str) else tuple(int(round(c)) for c in colour)


def render(scene: Scene, size: int = 64, colours: dict[int, tuple] | None = None) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` px, anti-aliased (drawn at 4x, box-filtered down).

    ``colours`` overrides object ``k``'s fill with an RGB triple (clips that turn colour)."""
    big = size * SUPERSAMPLE
    image = Image.fromarray(_background_array(scene, big).round().clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for k, obj in enumerate(scene.objects):
        fill = _rgb((colours or {}).get(k, obj.colour))
        points = _shape_points(obj, big)
        if points is None:
            r = obj.radius * big
            draw.ellipse((obj.cx * big - r, obj.cy * big - r, obj.cx * big + r, obj.cy * big + r), fill=fill)
        else:
            draw.polygon(points, fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    return np.asarray(render(scene, size))


def dataset(seed: int, count: int, size: int = 64, start: int = 0) -> tuple[np.ndarray, list[str]]:
    """Scenes ``start .. start+count-1`` of ``seed``: (uint8 array (count, size, size, 3), captions)."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    captions = []
    for k in range(count):
        scene = sample_scene(seed, start + k)
        images[k] = render_array(scene, size)
        captions.append(scene.caption)
    return images, captions


# ------------------------------------------------------------------------------------------- clips
def _motion_phrase(motion: str, end_colour: str | None) -> str:
    if motion.startswith("bounce "):
        return "bouncing from " + motion[len("bounce "):]
    if motion in ("growing", "shrinking"):
        return motion
    if motion == "turning":
        return f"turning {end_colour}"
    return "moving from " + motion


def sample_clip(seed: int, index: int, frames: int = 16) -> Clip:
    """Clip ``index`` of ``seed``: one shape and its motion over ``frames`` frames, with its caption."""
    rng = _rng(seed, index, stream=1)
    motion = _pick(rng, MOTIONS)
    shape, colour, size = _pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, tuple(SIZES))
    if motion.startswith("bounce") and rng.random() < 0.7:
        shape = "circle"
    word = "ball" if shape == "circle" and rng.random() < 0.5 else shape
    end_colour = None
    exclude = {colour}
    if motion == "turning":
        end_colour = _pick(rng, [c for c in COLOURS if c != colour])
        exclude.add(end_colour)
    background = _background(rng, exclude)
    gradient = _pick(rng, (None, None, "horizontal", "vertical"))
    r = SIZES[size]
    lane = float(rng.uniform(0.3, 0.7))
    start, end = 0.12 + r, 0.88 - r
    scenes = []
    colour_of = {}
    for f in range(frames):
        t = f / max(frames - 1, 1)
        cx, cy, radius = lane, lane, r
        if motion in ("left to right", "right to left", "bounce left to right", "bounce right to left"):
            forward = "left to right" in motion
            cx = start + (end - start) * (t if forward else 1 - t)
            if motion.startswith("bounce"):
                floor, height = 0.88 - r, 0.5
                cy = floor - height * abs(math.sin(2 * math.pi * t))
        elif motion in ("top to bottom", "bottom to top"):
            cy = start + (end - start) * (t if motion == "top to bottom" else 1 - t)
        elif motion in ("growing", "shrinking"):
            cx = cy = 0.5
            a, b = 0.06, 0.22
            radius = a + (b - a) * (t if motion == "growing" else 1 - t)
        else:
            cx = cy = 0.5
            mix = np.array(PALETTE[colour]) * (1 - t) + np.array(PALETTE[end_colour]) * t
            colour_of[f] = tuple(mix)
        scenes.append(Scene((Shape(shape, colour, size, cx, cy, radius),), background, gradient, "single",
                            say_size=(False,)))
    say_size = bool(rng.random() < 0.5) and motion not in ("growing", "shrinking")
    text = _object_phrase(scenes[0].objects[0], say_size, word=word) + " " + _motion_phrase(motion, end_colour)
    if rng.random() < 0.8:
        text += _background_phrase(scenes[0])
    fills = tuple(colour_of.get(f) for f in range(frames))
    return Clip(tuple(scenes), motion, text, end_colour, fills)


def render_clip(clip: Clip, size: int = 64) -> np.ndarray:
    """uint8 array (frames, size, size, 3)."""
    fills = clip.fills or (None,) * len(clip.frames)
    out = [np.asarray(render(s, size, None if fill is None else {0: fill})) for s, fill in zip(clip.frames, fills)]
    return np.stack(out)


# --------------------------------------------------------------------------------------- tokenizer
def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Rank-ordered BPE of one word, as the tokenizers library applies merges."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def tokenizer_files(words=VOCABULARY) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a CLIP BPE where each of ``words`` is one token ``word</w>``.

    A merge is only ever appended (lowest priority), so words already reduced to one token stay so; each
    word gets merges until it reduces to one symbol."""
    letters = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    merges: list[str] = []
    for word in words:
        start = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols := _bpe(start, ranks)) > 1:
            a, b = symbols[0], symbols[1]
            ranks[(a, b)] = len(merges)
            merges.append(f"{a} {b}")
            vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_tokenizer(max_length: int = 77):
    """The exact word-level tokenizer of :data:`VOCABULARY`, as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=max_length)
