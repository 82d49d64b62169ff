"""The quality benchmark's generated tasks: deterministic, balanced, and each needs what it claims."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmray.cli import build_parser
from mmray.data.benchmarks import (
    _COLOURS_ZH,
    _NUMBERS,
    _SHAPES_EN,
    _SHAPES_ZH,
    COLOURS,
    SHAPES,
    TASKS,
    _is_zh,
    _match_pairs,
    make_task_rows,
    render_scene,
)
from tests.helpers import REPO


@pytest.mark.parametrize("task", sorted(TASKS))
def test_rows_are_a_pure_function_of_the_seed(task):
    a, b, c = make_task_rows(task, 24, seed=3), make_task_rows(task, 24, seed=3), make_task_rows(task, 24, seed=4)
    assert a == b and a != c
    assert len(set(a["id"])) == 24
    for raw in a["image"]:
        if raw is not None:
            assert Image.open(io.BytesIO(raw)).size[0] >= 20


def _said(text: str) -> tuple[str, str]:
    """The (colour, shape) a match caption names: whole English words (``coloured`` is not ``red``)."""
    words = set(re.findall(r"[a-z]+", text))
    colour = next(c for c in COLOURS if c in words or _COLOURS_ZH[c] in text)
    shape = next(
        s
        for s in SHAPES
        if any(w in text if _is_zh(w) else w.split()[-1] in words for w in _SHAPES_EN[s] + _SHAPES_ZH[s])
    )
    return colour, shape


def test_match_captions_alone_say_nothing_about_the_label():
    # Every (colour, shape) a caption names occurs exactly as often in matching rows as in the others.
    rows = make_task_rows("match", 24 * 20, seed=0)
    counts = Counter((_said(text), label) for text, label in zip(rows["text"], rows["label"]))
    assert Counter(rows["label"]) == {"yes": 240, "no": 240}
    for pair in ((c, s) for c in COLOURS for s in SHAPES):
        assert counts[pair, "yes"] == counts[pair, "no"] == 20, pair


def test_match_images_alone_say_nothing_and_wrong_captions_differ_in_one_attribute():
    """Each image (colour, shape) is as often matched as not, and half the wrong captions swap the
    colour, half the shape: a model that compares one attribute only scores exactly 0.75."""
    n = 24 * 10
    pairs = _match_pairs(n, np.random.default_rng(1))
    shown = Counter((a, a == b) for a, b in pairs)
    assert set(shown.values()) == {10} and len(shown) == 24
    wrong = [(a, b) for a, b in pairs if a != b]
    assert all((a[0] == b[0]) != (a[1] == b[1]) for a, b in wrong)  # exactly one attribute differs
    assert sum(a[0] != b[0] for a, b in wrong) == len(wrong) // 2
    for attribute in (0, 1):  # the best one-attribute matcher says "yes" when that attribute agrees
        right = sum((a[attribute] == b[attribute]) == (a == b) for a, b in pairs)
        assert right / n == 0.75


def test_sum_labels_add_the_caption_number_to_an_image_count():
    rows = make_task_rows("sum", 900, seed=1)
    assert Counter(rows["label"]) == {"1": 100, "2": 200, "3": 300, "4": 200, "5": 100}
    for text, label in zip(rows["text"], rows["label"]):
        said = [n for n, words in _NUMBERS.items() if any(w in text.split() or w in text for w in words)]
        assert any(1 <= int(label) - n <= 3 for n in said), (text, label)


def test_missing_rows_lack_one_modality_never_both():
    rows = make_task_rows("missing", 2000, seed=2)
    no_text = sum(t is None for t in rows["text"])
    no_image = sum(i is None for i in rows["image"])
    assert 200 < no_text < 400 and 200 < no_image < 400
    assert not any(t is None and i is None for t, i in zip(rows["text"], rows["image"]))


def test_cli_offers_every_task():
    action = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["make-data"]._actions if a.dest == "task"
    )
    assert set(action.choices) == {"demo", *TASKS}


def test_make_data_task_writes_the_splits(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmray.cli", "make-data", str(tmp_path), "--task", "match", "--rows", "100"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    counts = {s: pq.read_table(tmp_path / s).num_rows for s in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 15, "test": 15}
    assert set(pq.read_table(tmp_path / "train").column("label").to_pylist()) == {"yes", "no"}
    # What each image shows, for retrieval (--key-column attributes): a "yes" caption names it.
    rows = pq.read_table(tmp_path / "train").to_pylist()
    for row in rows:
        colour, shape = row["attributes"].split()
        assert colour in COLOURS and shape in SHAPES
    english = [r for r in rows if r["label"] == "yes" and r["text"].isascii()]
    for r in english:  # the colour by name, the shape by one of its words ("a disc, coloured blue")
        colour, shape = r["attributes"].split()
        assert colour in r["text"] and any(word in r["text"] for word in _SHAPES_EN[shape]), r["text"]
    assert english


def test_objects_stay_inside_what_the_center_crop_keeps():
    """Preprocessing resizes the short side and center-crops: an object outside the central square would
    be cut off and its label unrecoverable (a generator bug that capped match accuracy near 0.77)."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        img = Image.open(io.BytesIO(render_scene([("red", "square")], rng, clutter=False))).convert("RGB")
        w, h = img.size
        side = min(w, h)
        x0, y0 = (w - side) // 2, (h - side) // 2
        px = np.asarray(img).astype(int)
        # The object's red (205, 40, 35) +- 30: R - G and R - B above 100, which no tinted grey reaches.
        red = (px[..., 0] - px[..., 1] > 100) & (px[..., 0] - px[..., 2] > 100)
        assert red.sum() > 0.05 * side * side
        ys, xs = np.nonzero(red)
        assert (
            xs.min() >= x0 - 1 and xs.max() <= x0 + side and ys.min() >= y0 - 1 and ys.max() <= y0 + side
        )  # JPEG: 1 px


@pytest.mark.parametrize("task", ["classify", "sum", "match"])
def test_lang_zh_and_en_write_every_caption_in_that_language_and_mixed_is_unchanged(task):
    def zh(text: str) -> bool:
        return any("\u4e00" <= ch <= "\u9fff" for ch in text)

    assert all(zh(t) for t in make_task_rows(task, 60, seed=2, lang="zh")["text"])
    assert not any(zh(t) for t in make_task_rows(task, 60, seed=2, lang="en")["text"])
    mixed = make_task_rows(task, 60, seed=2)["text"]
    assert mixed == make_task_rows(task, 60, seed=2, lang="mixed")["text"] and 10 < sum(map(zh, mixed)) < 50
    # Labels and images do not depend on the captions' language.
    assert make_task_rows(task, 60, seed=2, lang="zh")["label"] == make_task_rows(task, 60, seed=2)["label"]
    assert build_parser().parse_args(["make-data", "out", "--task", task, "--lang", "zh"]).lang == "zh"
