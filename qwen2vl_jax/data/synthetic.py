"""Embedded synthetic dataset: deterministic, rendered on the fly, nothing downloaded.

Three kinds of ground-truth sources, each a pure function of (seed, index, split, stream):
  * `scene(...)`  -> Scene: a PIL RGB image (112..448 px per side, varied aspect ratio) with 1-4 coloured
                    shapes (grouped by (colour, shape), 1..3 groups) and 1-2 rendered words (OCR), plus
                    the ground truth (shape, colour, pixel box of every object; every word and its box).
  * `clip(...)`   -> Clip: 4-8 frames of one shape moving left/right/up/down.
  * `arithmetic(...)` -> Arithmetic: a text-only question (a + b, a - b) for pure-text dialogue.
Language (captions, questions) lives in `formats.py`; this module only draws and records facts.

Splits are disjoint by construction: every draw uses its own `numpy.random.SeedSequence` whose spawn key
contains the split code, the stream code and the index, so the train and held-out streams never share a
random state. `heldout_scenes(kind, n)` returns the fixed evaluation set.

Boxes are (x1, y1, x2, y2) pixel coordinates with x2/y2 INCLUSIVE (the last painted column/row), so
0 <= x1 <= x2 <= width-1.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SPLITS = ("train", "heldout")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS = {  # name -> RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
DIRECTIONS = ("left", "right", "up", "down")
# Words rendered into scenes for OCR (upper case so that they stay legible at 14 px).
WORDS = (
    "CAT", "DOG", "SUN", "MOON", "STAR", "TREE", "BOOK", "DOOR", "FISH", "BIRD", "CAKE", "MILK", "RAIN",
    "SNOW", "WIND", "FIRE", "LAKE", "HILL", "ROAD", "SHIP", "BOAT", "CAR", "BUS", "TRAIN", "PLANE", "HOME",
    "SHOP", "CAFE", "BANK", "PARK", "ZOO", "GATE", "EXIT", "OPEN", "STOP", "GO", "SALE", "FREE", "NEW",
    "HOT", "COLD", "BIG", "SMALL", "FAST", "SLOW", "LEFT", "RIGHT", "UP", "DOWN", "NORTH", "SOUTH", "EAST",
    "WEST", "APPLE", "LEMON", "MANGO", "PEACH", "GRAPE", "BREAD", "RICE", "TEA", "JAM", "SOUP", "SALT",
    "GOLD", "IRON", "ROCK", "SAND", "LEAF", "ROSE", "LILY", "OAK", "PINE", "KING", "QUEEN", "CLOCK", "LAMP",
    "DESK", "CHAIR", "BED", "PEN", "INK", "MAP", "KEY", "LOCK", "BELL", "DRUM", "SONG", "JAZZ", "ROBOT",
    "PIXEL", "DATA", "CODE", "JAX", "QWEN", "VISION", "MODEL", "TOKEN", "HELLO", "WORLD", "ZERO", "ONE",
    "TWO", "TEN", "MAX", "MIN", "PLUS", "MINUS", "YES", "NO", "OK",
)
IMAGE_SIDE = (112, 448)      # min/max pixels per side of a scene
CLIP_SIDE = (112, 224)       # min/max pixels per side of a clip frame
CLIP_FRAMES = (4, 8)         # min/max frames per clip
CLIP_FPS = 2.0
MAX_OBJECTS = 4
FONT_SIZE = (0.09, 0.12)     # word height range, as a fraction of the scene's short side
OBJECT_SIZE = (0.30, 0.45)   # object side range, as a fraction of the scene's short side
# Objects this large stay several patches wide at the CPU image budget (16 LLM tokens per image), so a tiny
# model can learn shapes from captions; smaller ones left shapes unlearned (docs/notes/2026-11-learning-diagnosis.md).
HELDOUT_SEED = 20240918      # the fixed seed of the evaluation set (Qwen2-VL paper date)

_SPLIT_CODE = {"train": 1, "heldout": 2}


# ---------------------------------------------------------------------------------------------------
# Ground-truth records

@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    box: tuple[int, int, int, int]       # pixels, inclusive

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclasses.dataclass(frozen=True)
class Word:
    text: str
    box: tuple[int, int, int, int]       # pixels, inclusive: the painted ink


@dataclasses.dataclass(frozen=True)
class Scene:
    image: Image.Image = dataclasses.field(compare=False, repr=False)   # RGB, size (width, height)
    objects: tuple[Obj, ...]
    words: tuple[Word, ...]
    seed: int
    index: int
    split: str
    stream: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def groups(self) -> tuple[tuple[str, str, tuple[Obj, ...]], ...]:
        """(colour, shape, objects) per distinct (colour, shape), ordered by the group's leftmost object;
        objects inside a group ordered by (x1, y1)."""
        by_key: dict[tuple[str, str], list[Obj]] = {}
        for o in self.objects:
            by_key.setdefault((o.colour, o.shape), []).append(o)
        groups = [(c, s, tuple(sorted(objs, key=lambda o: (o.box[0], o.box[1])))) for (c, s), objs in by_key.items()]
        return tuple(sorted(groups, key=lambda g: (g[2][0].box[0], g[2][0].box[1])))

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(1 for o in self.objects if shape in (None, o.shape) and colour in (None, o.colour))

    def reading_order(self) -> tuple[Word, ...]:
        """Words top to bottom, then left to right."""
        return tuple(sorted(self.words, key=lambda w: (w.box[1], w.box[0])))


@dataclasses.dataclass(frozen=True)
class Clip:
    frames: tuple[Image.Image, ...] = dataclasses.field(compare=False, repr=False)
    shape: str
    colour: str
    direction: str                                   # one of DIRECTIONS
    boxes: tuple[tuple[int, int, int, int], ...]     # the object's box in every frame
    fps: float
    seed: int
    index: int
    split: str
    stream: str


@dataclasses.dataclass(frozen=True)
class Arithmetic:
    a: int
    b: int
    op: str            # "plus" | "minus"
    seed: int
    index: int
    split: str
    stream: str

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "plus" else self.a - self.b


# ---------------------------------------------------------------------------------------------------
# Random streams

def stream_code(name: str) -> int:
    """A stable (process- and platform-independent) integer for a stream name."""
    return zlib.crc32(name.encode("utf-8"))


def rng_for(seed: int, index: int, split: str, stream: str) -> np.random.Generator:
    if split not in _SPLIT_CODE:
        raise ValueError(f"split {split!r} unknown; valid: {', '.join(SPLITS)}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed {seed} and index {index} must be >= 0")
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(_SPLIT_CODE[split], stream_code(stream), int(index)))
    return np.random.Generator(np.random.PCG64(ss))


# ---------------------------------------------------------------------------------------------------
# Drawing

@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def _ink_bbox(text: str, size: int) -> tuple[int, int, int, int]:
    """Exact painted extent (left, top, right_exclusive, bottom_exclusive) of `text` drawn at (0, 0)."""
    font = _font(size)
    _, _, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right + 2, bottom + 2), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font)
    return mask.getbbox()


def shape_polygon(shape: str, x: int, y: int, size: int) -> list[tuple[int, int]] | None:
    """Integer vertices of `shape` inscribed in the square [x, x+size-1] x [y, y+size-1];
    None for the circle (drawn as an ellipse on that square)."""
    s = size - 1
    cx, cy, r = x + s / 2, y + s / 2, s / 2
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    elif shape == "triangle":
        pts = [(cx, y), (x + s, y + s), (x, y + s)]
    elif shape == "diamond":
        pts = [(cx, y), (x + s, cy), (cx, y + s), (x, cy)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    elif shape == "hexagon":
        pts = [(cx + r * math.cos(-math.pi / 2 + k * math.pi / 3), cy + r * math.sin(-math.pi / 2 + k * math.pi / 3))
               for k in range(6)]
    else:
        raise ValueError(f"shape {shape!r} unknown; valid: {', '.join(SHAPES)}")
    return [(int(round(px)), int(round(py))) for px, py in pts]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, x: int, y: int, size: int) -> tuple[int, int, int, int]:
    """Paints the shape and returns its inclusive pixel box."""
    rgb = COLOURS[colour]
    pts = shape_polygon(shape, x, y, size)
    if pts is None:
        draw.ellipse([x, y, x + size - 1, y + size - 1], fill=rgb)
        return (x, y, x + size - 1, y + size - 1)
    draw.polygon(pts, fill=rgb)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = int(rng.integers(95, 166))
    return tuple(int(np.clip(grey + rng.integers(-12, 13), 0, 255)) for _ in range(3))


def _overlaps(a, b, margin: int) -> bool:
    return not (a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1])


def _place(rng, w: int, h: int, bw: int, bh: int, taken: list, margin: int, tries: int = 40):
    """A random inclusive box of size (bw, bh) inside (w, h) that keeps `margin` px from every taken box."""
    if bw > w or bh > h:
        return None
    for _ in range(tries):
        x = int(rng.integers(0, w - bw + 1))
        y = int(rng.integers(0, h - bh + 1))
        box = (x, y, x + bw - 1, y + bh - 1)
        if not any(_overlaps(box, t, margin) for t in taken):
            return box
    return None


def _draw_groups(rng: np.random.Generator) -> list[tuple[str, str]]:
    """1..3 distinct (colour, shape) pairs with counts summing to <= MAX_OBJECTS: one entry per object."""
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    n_groups = int(rng.integers(1, min(3, n_objects) + 1))
    cuts = sorted(rng.choice(np.arange(1, n_objects), size=n_groups - 1, replace=False)) if n_groups > 1 else []
    sizes = np.diff([0, *cuts, n_objects])
    keys: list[tuple[str, str]] = []
    names = list(COLOURS)
    while len(keys) < n_groups:
        key = (names[int(rng.integers(len(names)))], SHAPES[int(rng.integers(len(SHAPES)))])
        if key not in keys:
            keys.append(key)
    return [k for k, n in zip(keys, sizes) for _ in range(int(n))]


def _random_word(rng: np.random.Generator) -> str:
    word = WORDS[int(rng.integers(len(WORDS)))]
    if rng.random() < 0.3:
        word += " " + str(int(rng.integers(0, 100)))
    return word


def scene(seed: int, index: int, split: str = "train", stream: str = "image") -> Scene:
    """Renders scene `index` of (seed, split, stream). Pure: the same arguments give the same pixels."""
    rng = rng_for(seed, index, split, stream)
    w, h = (int(v) for v in rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1, size=2))
    if max(w, h) > 2.5 * min(w, h):          # keep aspect ratios within 1:2.5
        w = min(w, int(2.5 * h))
        h = min(h, int(2.5 * w))
    bg = _background(rng)
    text_rgb = (0, 0, 0) if sum(bg) / 3 > 128 else (255, 255, 255)
    entries = _draw_groups(rng)
    n_words = 1 if rng.random() < 0.7 else 2
    words = [_random_word(rng) for _ in range(n_words)]
    side = min(w, h)
    for attempt in range(8):                 # shrink everything until the layout fits
        scale = 0.85**attempt
        taken: list = []
        placed: list = []
        font_size = max(12, int(side * rng.uniform(*FONT_SIZE) * scale))
        font = _font(font_size)
        ok = True
        for word in words:
            left, top, right, bottom = _ink_bbox(word, font_size)
            box = _place(rng, w, h, right - left, bottom - top, taken, margin=4)
            if box is None:
                ok = False
                break
            taken.append(box)
            placed.append(("word", word, box, (box[0] - left, box[1] - top), font))
        for colour, shape in entries if ok else ():
            size = max(14, int(side * rng.uniform(*OBJECT_SIZE) * scale))
            box = _place(rng, w, h, size, size, taken, margin=3)
            if box is None:
                ok = False
                break
            taken.append(box)
            placed.append(("obj", (colour, shape), box, None, None))
        if ok:
            break
    else:  # pragma: no cover - the 8th attempt (x0.85^7) fits <= 4 objects of <= 0.15*side at 112 px
        raise RuntimeError(f"scene {index} of split {split!r}: could not lay out {entries} and {words} in {w}x{h}")
    image = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(image)
    objects, word_records = [], []
    for kind, payload, box, origin, font in placed:
        if kind == "word":
            draw.text(origin, payload, fill=text_rgb, font=font)
            word_records.append(Word(payload, box))
        else:
            colour, shape = payload
            drawn = draw_shape(draw, shape, colour, box[0], box[1], box[2] - box[0] + 1)
            objects.append(Obj(shape, colour, drawn))
    return Scene(image=image, objects=tuple(objects), words=tuple(word_records), seed=seed, index=index,
                 split=split, stream=stream)


def clip(seed: int, index: int, split: str = "train", stream: str = "video") -> Clip:
    """4-8 frames of one shape moving at constant speed in one of DIRECTIONS."""
    rng = rng_for(seed, index, split, stream)
    w, h = (int(v) for v in rng.integers(CLIP_SIDE[0], CLIP_SIDE[1] + 1, size=2))
    n = int(rng.integers(CLIP_FRAMES[0], CLIP_FRAMES[1] + 1))
    bg = _background(rng)
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    size = int(min(w, h) * rng.uniform(0.2, 0.3))
    horizontal = direction in ("left", "right")
    span = (w if horizontal else h) - size                 # room along the motion axis
    travel = int(span * rng.uniform(0.5, 0.9))
    start = int(rng.integers(0, span - travel + 1))
    path = np.linspace(start, start + travel, n).round().astype(int)
    if direction in ("left", "up"):          # towards smaller coordinates
        path = path[::-1]
    cross = int(rng.integers(0, (h if horizontal else w) - size + 1))
    frames, boxes = [], []
    for p in path:
        x, y = (int(p), cross) if horizontal else (cross, int(p))
        frame = Image.new("RGB", (w, h), bg)
        boxes.append(draw_shape(ImageDraw.Draw(frame), shape, colour, x, y, size))
        frames.append(frame)
    return Clip(frames=tuple(frames), shape=shape, colour=colour, direction=direction, boxes=tuple(boxes),
                fps=CLIP_FPS, seed=seed, index=index, split=split, stream=stream)


def arithmetic(seed: int, index: int, split: str = "train", stream: str = "text") -> Arithmetic:
    """A one-step sum or difference of two numbers below 50 (differences are never negative)."""
    rng = rng_for(seed, index, split, stream)
    a, b = (int(v) for v in rng.integers(0, 50, size=2))
    op = "plus" if rng.random() < 0.5 else "minus"
    if op == "minus" and b > a:
        a, b = b, a
    return Arithmetic(a=a, b=b, op=op, seed=seed, index=index, split=split, stream=stream)


def heldout_scenes(kind: str, n: int, seed: int = HELDOUT_SEED):
    """The fixed evaluation set for an eval kind: Clips for "video", Arithmetic for "text", else Scenes.
    Drawn from the held-out split with stream "eval/<kind>", so no training sample can coincide."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    stream = f"eval/{kind}"
    if kind == "video":
        return [clip(seed, i, "heldout", stream) for i in range(n)]
    if kind == "text":
        return [arithmetic(seed, i, "heldout", stream) for i in range(n)]
    return [scene(seed, i, "heldout", stream) for i in range(n)]
