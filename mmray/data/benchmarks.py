"""The quality benchmark's generated datasets (its "tasks", each a labelling rule; unrelated to
``labels.Task`` and ``model.tasks``, the heads a model trains): each needs what real text-image data
needs, with a known answer.

``mmray make-data --task NAME`` writes one of these; ``bench/quality.py`` trains every fusion on each.
Images are rendered scenes with real variation (canvas size, background gradient and noise, clutter
strokes, object position, scale, rotation, shade); captions are paraphrased templates in English and
Chinese with distractor words, so a model must read words, not string positions.

    classify  label = animal (named in the caption) x colour (of the object in the image); each
              modality alone is capped at 50%: both are needed, additively (independent factors)
    sum       label = a number in the caption (0-2, as a digit, an English or a Chinese word) plus
              the number of objects in the image (1-3): both modalities, additively
    match     does the caption describe the object (colour + shape)? Each modality alone is exactly at
              chance (every caption and every image occurs as often in matching as in other rows):
              only the interaction decides; a wrong caption differs in one attribute (half colour,
              half shape), so neither attribute alone gets past 75%
    lazy      ``classify`` with a hard text side (made-up synonyms hidden among made-up filler
              words) and an easy image side: the modality-laziness trap
    missing   ``classify`` with 15% of rows lacking the text and 15% lacking the image

Captions are half English, half Chinese (``lang="mixed"``), or all one language (``"en"``, ``"zh"``:
``mmray make-data --lang zh`` for the text-preprocessing benchmark); ``lazy``'s captions are made-up
words in any case. Every generator is a pure function of its seed and language (``mixed`` makes the same
rows as before languages were a choice). Splits come from ``synthetic.write_splits``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from mmray.data.synthetic import ANIMALS, encode_png_or_jpeg, make_imbalanced_rows, write_splits

__all__ = ["LANGS", "TASKS", "make_task_dataset", "make_task_rows", "render_scene"]

COLOURS = {"red": (205, 40, 35), "green": (40, 160, 60), "blue": (35, 70, 205), "yellow": (225, 200, 40)}
SHAPES = ("circle", "square", "triangle")
_COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
_SHAPES_EN = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge", "pyramid"],
}
_SHAPES_ZH = {
    "circle": ["圆形", "圆圈", "圆点"],
    "square": ["正方形", "方块", "方形"],
    "triangle": ["三角形", "三角", "尖角"],
}
_NUMBERS = {
    0: ["0", "zero", "no", "零", "没有"],
    1: ["1", "one", "a single", "一", "一个"],
    2: ["2", "two", "a pair of", "二", "两个"],
}
_FILLER_EN = ["today", "really", "quite", "photo", "picture", "look", "nice", "small", "old", "new", "here", "again"]
_FILLER_ZH = ["今天", "真的", "照片", "图片", "看看", "很好", "这里", "又是", "非常", "好像"]
LANGS = ("mixed", "en", "zh")


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------


def _shade(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(COLOURS[colour]) + rng.integers(-30, 31, size=3)
    return tuple(int(v) for v in np.clip(base, 0, 255))


_REACH = {"circle": 1.0, "square": math.sqrt(2), "triangle": 1.15}  # corner distance / r, as _polygon draws


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "triangle": 3}[shape]
    start = angle + (math.pi / 4 if shape == "square" else -math.pi / 2)
    radius = r * _REACH[shape]
    return [
        (
            cx + radius * math.cos(start + 2 * math.pi * k / corners),
            cy + radius * math.sin(start + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def render_scene(objects: list[tuple[str, str]], rng: np.random.Generator, clutter: bool = True) -> bytes:
    """A PNG or JPEG with ``objects`` ((colour, shape) pairs) at random, non-overlapping places.

    Variation: canvas 48-96 px a side (any aspect), a tinted grey gradient background with noise, grey
    clutter strokes anywhere, objects inside the central square (what a center crop keeps, as photos
    keep their subject in the middle), radius 18-28% of its side (10-14% when several), any rotation,
    shade jitter of +-30 per channel.
    """
    w, h = (int(v) for v in rng.integers(48, 97, size=2))
    base = (rng.integers(80, 181) + rng.integers(-20, 21, size=3)).astype(np.float32)  # tinted grey
    ramp = np.linspace(-25, 25, w, dtype=np.float32)[None, :, None] * rng.choice([-1.0, 1.0])
    pixels = base[None, None, :] + ramp + rng.normal(0, 10, size=(h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    if clutter:  # neutral strokes: texture a model must learn to ignore
        for _ in range(int(rng.integers(2, 6))):
            g = int(rng.integers(40, 220))
            xy = [tuple(float(v) for v in rng.uniform(0, [w, h])) for _ in range(2)]
            draw.line(xy, fill=(g, g, g), width=int(rng.integers(1, 3)))
    side = min(w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2
    placed: list[tuple[float, float, float]] = []
    for colour, shape in objects:
        for _ in range(50):
            r = side * rng.uniform(0.18, 0.28) if len(objects) == 1 else side * rng.uniform(0.10, 0.14)
            reach = r * _REACH[shape]  # the farthest corner from the centre, at any rotation
            # Inside the central square: the part that preprocessing's resize + center crop keeps.
            cx = x0 + rng.uniform(reach + 1, side - reach - 1)
            cy = y0 + rng.uniform(reach + 1, side - reach - 1)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (reach + q + 2) ** 2 for x, y, q in placed):
                break
        placed.append((cx, cy, reach))
        fill = _shade(colour, rng)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill)
    return encode_png_or_jpeg(img, rng, min_quality=75)


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def _pick(options: list[str] | tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _is_zh(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _in_lang(options: list[str], lang: str) -> list[str]:
    """The options written in ``lang`` (all of them when mixed)."""
    return options if lang == "mixed" else [o for o in options if _is_zh(o) == (lang == "zh")]


def _zh_caption(rng: np.random.Generator, lang: str) -> bool:
    u = rng.random()  # drawn in every language, so the rest of a row's draws stay in step
    return u < 0.5 if lang == "mixed" else lang == "zh"


def _with_distractors(words: str, rng: np.random.Generator, zh: bool) -> str:
    """Prepends or appends up to two filler words (never the label words)."""
    filler = [_pick(_FILLER_ZH if zh else _FILLER_EN, rng) for _ in range(int(rng.integers(0, 3)))]
    sep = "" if zh else " "
    return sep.join(filler + [words]) if rng.random() < 0.5 else sep.join([words] + filler)


def _object_caption(colour: str, shape: str, rng: np.random.Generator, lang: str) -> str:
    if _zh_caption(rng, lang):
        s = _pick(_SHAPES_ZH[shape], rng)
        c = _COLOURS_ZH[colour]
        text = _pick(["图里有一个{c}的{s}", "这是{c}{s}", "一个{c}的{s}在画面中", "{c}{s}"], rng).format(c=c, s=s)
        return _with_distractors(text, rng, zh=True)
    s = _pick(_SHAPES_EN[shape], rng)
    text = _pick(
        [
            "a {c} {s}",
            "there is a {c} {s} in the picture",
            "one {c} {s} on a plain background",
            "the {s} is {c}",
            "a {s}, coloured {c}",
        ],
        rng,
    ).format(c=colour, s=s)
    return _with_distractors(text, rng, zh=False)


def _animal_caption(animal: str, rng: np.random.Generator, lang: str) -> str:
    word = _pick(_in_lang(ANIMALS[animal], lang), rng)
    zh = _is_zh(word)
    if zh:
        text = _pick(["这是我家的{a}", "{a}在沙发上睡觉", "看看这只{a}", "我们的{a}今天很开心"], rng).format(a=word)
    else:
        text = _pick(
            ["my {a} at home", "look at this {a}", "the {a} slept on the sofa", "our {a} was happy today"], rng
        ).format(a=word)
    return _with_distractors(text, rng, zh=zh)


def _number_caption(n: int, rng: np.random.Generator, lang: str) -> str:
    word = _pick(_in_lang(_NUMBERS[n], lang), rng)
    if _is_zh(word):
        return _with_distractors(_pick(["加上{n}", "再来{n}", "数字是{n}"], rng).format(n=word), rng, zh=True)
    return _with_distractors(
        _pick(["add {n}", "plus {n} more", "the number is {n}"], rng).format(n=word), rng, zh=False
    )


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


def _classify(n: int, rng: np.random.Generator, lang: str) -> dict[str, list]:
    rows: dict[str, list] = {"text": [], "image": [], "label": []}
    animals, colours = list(ANIMALS), ["red", "blue"]
    for i in range(n):
        animal, colour = animals[i % 2], colours[(i // 2) % 2]  # exactly balanced classes
        rows["text"].append(_animal_caption(animal, rng, lang))
        rows["image"].append(render_scene([(colour, _pick(SHAPES, rng))], rng))
        rows["label"].append(f"{animal}_{colour}")
    return rows


def _sum(n: int, rng: np.random.Generator, lang: str) -> dict[str, list]:
    rows: dict[str, list] = {"text": [], "image": [], "label": []}
    for i in range(n):
        a, b = i % 3, 1 + (i // 3) % 3  # every (caption, image) number pair equally often
        objects = [(_pick(list(COLOURS), rng), _pick(SHAPES, rng)) for _ in range(b)]
        rows["text"].append(_number_caption(a, rng, lang))
        rows["image"].append(render_scene(objects, rng))
        rows["label"].append(str(a + b))
    return rows


def _match_pairs(n: int, rng: np.random.Generator) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``n`` (shown, said) pairs of colour and shape for ``match``, in blocks of 24 rows.

    A block shows every pair twice, once with its own caption ("yes") and once with a caption that
    differs in exactly one attribute ("no"): shape-only for the objects of two random colours, the
    other colour of the remaining two for the rest. So each full block has every image and every
    caption once per label (each modality alone exactly at chance), and half its wrong captions differ
    only in colour, half only in shape: a colour matcher or a shape matcher alone scores 0.75. Uniform
    wrong captions ("any other pair") made 9 in 11 differ in colour, so a colour matcher scored 0.91 and
    shape decided 1 row in 11: the hard negatives of caption-matching benchmarks (one attribute swapped)
    put shape and colour on an equal footing.
    """
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    out: list[tuple[tuple[str, str], tuple[str, str]]] = []
    while len(out) < n:
        colours = [str(c) for c in rng.permutation(list(COLOURS))]
        shape_only, swapped = colours[:2], colours[2:]
        step = int(rng.integers(1, len(SHAPES)))
        block = [(p, p) for p in pairs]
        for colour, shape in pairs:
            if colour in shape_only:
                said = (colour, SHAPES[(SHAPES.index(shape) + step) % len(SHAPES)])
            else:
                said = (swapped[1 - swapped.index(colour)], shape)
            block.append(((colour, shape), said))
        out += [block[j] for j in rng.permutation(len(block))]
    return out[:n]


def _match(n: int, rng: np.random.Generator, lang: str) -> dict[str, list]:
    # "attributes": what the image shows ("red circle"), whatever language or words its caption uses: a
    # caption's correct images in retrieval are every image with its attributes (`mmray ablate
    # --retrieval --key-column attributes` on the "yes" rows, whose captions say what their image shows).
    rows: dict[str, list] = {"text": [], "image": [], "label": [], "attributes": []}
    for shown, said in _match_pairs(n, rng):
        rows["text"].append(_object_caption(*said, rng, lang))
        rows["image"].append(render_scene([shown], rng))
        rows["label"].append("yes" if said == shown else "no")
        rows["attributes"].append(" ".join(shown))
    return rows


def _lazy(n: int, rng: np.random.Generator, lang: str) -> dict[str, list]:
    rows = make_imbalanced_rows(n, int(rng.integers(2**31)))
    return {k: rows[k] for k in ("text", "image", "label")}


def _missing(n: int, rng: np.random.Generator, lang: str) -> dict[str, list]:
    rows = _classify(n, rng, lang)
    for i in range(n):
        u = rng.random()
        if u < 0.15:
            rows["text"][i] = None
        elif u < 0.30:
            rows["image"][i] = None
    return rows


TASKS: dict[str, Callable[[int, np.random.Generator, str], dict[str, list]]] = {
    "classify": _classify,
    "sum": _sum,
    "match": _match,
    "lazy": _lazy,
    "missing": _missing,
}
_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.binary()), ("label", pa.string())])


def make_task_rows(task: str, n: int, seed: int = 0, lang: str = "mixed") -> dict[str, list]:
    """``n`` shuffled rows (id, text, image, label) of ``task``, a pure function of ``seed`` and ``lang``."""
    if task not in TASKS:
        raise ValueError(f"--task: unknown task {task!r} (known: {sorted(TASKS)})")
    if lang not in LANGS:
        raise ValueError(f"--lang: unknown language {lang!r} (known: {list(LANGS)})")
    rng = np.random.default_rng(seed)
    rows = TASKS[task](n, rng, lang)
    order = rng.permutation(n)
    out = {k: [v[j] for j in order] for k, v in rows.items()}
    return {"id": [f"{task[:2]}{i:07d}" for i in range(n)], **out}


def make_task_dataset(
    task: str,
    out_dir: str | os.PathLike,
    rows: int = 2000,
    seed: int = 0,
    files_per_split: int = 2,
    lang: str = "mixed",
) -> dict:
    """Writes ``train/``, ``val/``, ``test/`` (70/15/15) Parquet of ``task`` under ``out_dir``."""
    data = make_task_rows(task, rows, seed, lang)
    schema = _SCHEMA.append(pa.field("attributes", pa.string())) if "attributes" in data else _SCHEMA
    return write_splits(data, out_dir, files_per_split, schema)
