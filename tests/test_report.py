"""``mmray report`` on a run directory made by hand (no Ray, no training): every section is there,
every plot is an inline PNG that decodes, nothing is fetched from outside the file, and a real headless
Chromium renders it to a non-blank page."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmray import cli
from mmray.config import Config, config_to_dict
from mmray.report import SECTIONS, load_run, render_report

TASKS = [
    {"name": "label", "kind": "multiclass", "classes": ["cat", "dog", "fox"]},
    {"name": "spam", "kind": "binary", "classes": ["0", "1"]},
]


def _history(epochs: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 1.0 / (e + 1),
            "val_loss": 1.2 / (e + 1),
            "val_accuracy": 0.5 + 0.1 * e,
            "val_macro_f1": 0.4 + 0.1 * e,
            "val_rows": 30.0,
            "rows_per_s": 100.0,
            "lr": 1e-3 * (epochs - e),
            "encoder_lr": 5e-4 * (epochs - e),
        }
        for e in range(epochs)
    ]


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "runs" / "mmray-test-run"
    (d / "quarantine").mkdir(parents=True)
    (d / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in _history(3)))
    metrics = {
        "loss": 0.4,
        "accuracy": 0.7,
        "epoch": 2,
        "train_loss": 0.33,
        "data": {
            "train": {"rows_in": 100, "rows_used": 98, "rows_quarantined": 2},
            "val": {"rows_in": 30, "rows_used": 30, "rows_quarantined": 0},
        },
        "data_cached": True,
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    saved = {"config": config_to_dict(Config()), "versions": {"mmray": "0.1.0 (git abc)"}}
    (d / "config.json").write_text(json.dumps(saved))
    q = pa.table(
        {
            "id": ["a", "b"],
            "stage": ["preprocess"] * 2,
            "column": ["image", "image"],
            "error": ["undecodable image: cannot identify image file"] * 2,
        }
    )
    pq.write_table(q, d / "quarantine" / "train.parquet")
    return d


def _evaluation() -> dict:
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 5, size=(2, 200)).tolist()
    stats = {
        "label": {
            "confusion": [[8, 1, 1], [0, 9, 1], [2, 0, 8]],
            "calibration_rows": [0] * 5 + [3, 5, 7, 6, 9],
            "calibration_correct": [0] * 5 + [1, 3, 5, 5, 9],
        },
        "spam": {"counts": [[10, 2, 3, 15]], "pos_hist": [hist[0]], "neg_hist": [hist[1]]},
    }
    metrics = {
        v: {"loss": 0.4 + i, "accuracy": 0.83 - 0.2 * i, "rows": 30.0}
        for i, v in enumerate(("full", "text_masked", "image_masked"))
    }
    retrieval = {
        "text_to_image": {"R@1": 0.3125, "R@5": 0.75, "R@10": 0.9},
        "image_to_text": {"R@1": 0.25, "R@5": 0.7, "R@10": 0.85},
        "rows": 1234,
        "pairs": "label=yes",
        "same_caption": False,
    }
    return {"metrics": metrics, "stats": stats, "rows_evaluated": 30, "rows_quarantined": 0, "retrieval": retrieval}


def _pngs(page: str) -> list[Image.Image]:
    images = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        img.load()  # decodes every pixel
        images.append(img)
    return images


def test_every_section_is_there_and_every_png_decodes(run_dir):
    page = render_report(load_run(str(run_dir)), _evaluation(), str(run_dir / "checkpoint_epoch0002"), "f00d", TASKS)
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    images = _pngs(page)
    # loss + metrics curves, lr, 1 + 1 confusion, 2 per-class, 2 calibration
    assert len(images) == page.count("<img") == 9
    assert all(img.format == "PNG" and img.width > 100 and img.height > 100 for img in images)
    # self-contained: nothing is loaded from anywhere else
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page and "<link" not in page
    for text in ("text_masked", "undecodable image", "f00d", "0.1.0 (git abc)", "&quot;epochs&quot;: 3"):
        assert text in page, text
    retrieval = page.split('<section id="retrieval">', 1)[1].split("</section>", 1)[0]
    for text in ("<th>R@1</th>", "text to image", '<td class="n">0.3125</td>', "1,234 caption-image pairs"):
        assert text in retrieval, text


def test_a_model_without_alignment_has_no_retrieval_section(run_dir):
    evaluation = _evaluation()
    del evaluation["retrieval"]
    page = render_report(load_run(str(run_dir)), evaluation, None, None, TASKS)
    assert '<section id="retrieval">' not in page and '<section id="ablation">' in page


def test_without_an_evaluation_the_sections_say_why(run_dir, monkeypatch, capsys):
    monkeypatch.setenv("MMRAY_VERBOSE", "0")
    assert cli.main(["report", "--no-evaluate", str(run_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    page = (run_dir / "report.html").read_text()
    assert result["report"] == str(run_dir / "report.html") and result["evaluated"] is False
    assert page.count("not evaluated") == 4 and len(_pngs(page)) == 3


def _chromium() -> str | None:
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.mark.skipif(_chromium() is None, reason="no chromium-headless-shell or chromium (.ci/run installs it)")
def test_a_headless_browser_renders_the_report(run_dir, tmp_path):
    page = render_report(load_run(str(run_dir)), _evaluation(), None, None, TASKS)
    (tmp_path / "report.html").write_text(page)
    shot = tmp_path / "shot.png"
    # No network: every resource of the page is inline, so a page that needed one would render blank parts.
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--proxy-server=127.0.0.1:9",
            "--window-size=1200,3000",
            f"--screenshot={shot}",
            (tmp_path / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (3000, 1200)
    assert (pixels < 128).mean() > 0.01  # text and plots: not a blank page
    assert (pixels > 250).mean() > 0.5  # the white page itself, not an error screen
    # Text alone meets the thresholds above: every figure must also have decoded, at its size. A copy of
    # the page with a probe that writes each image's decoded size into the DOM, dumped once it loaded.
    probe = (
        "<script>function inked(i) { const c = document.createElement('canvas'); c.width = i.naturalWidth;"
        " c.height = i.naturalHeight; const g = c.getContext('2d'); g.drawImage(i, 0, 0); if (!c.width) return 0;"
        " const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;"
        " for (let k = 0; k < d.length; k += 4) if (d[k + 3] > 0 && d[k] + d[k + 1] + d[k + 2] < 600) n++;"
        " return n / (c.width * c.height); }"
        " window.addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'probe';"
        " p.textContent = JSON.stringify([...document.images].map(i => [i.alt, i.naturalWidth, inked(i)]));"
        " document.body.appendChild(p); });</script>"
    )
    (tmp_path / "probed.html").write_text(page.replace("</body>", f"{probe}</body>"))
    dom = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--proxy-server=127.0.0.1:9",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (tmp_path / "probed.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(images) == page.count("<img "), images  # every figure the page has
    decoded = {alt: (width, ink) for alt, width, ink in images}
    # Each decoded at a plot's size and drew axes, labels and data: a share of its pixels is not white.
    assert all(width > 100 and ink > 0.01 for width, ink in decoded.values()), decoded


# What the report draws, against scikit-learn: the figures' numbers are captured where they are drawn.


@pytest.fixture
def drawn(monkeypatch) -> dict[str, list]:
    from mmray import report

    seen: dict[str, list] = {"confusion": [], "per_class": [], "calibration": []}
    monkeypatch.setattr(report, "_confusion", lambda name, classes, cm: seen["confusion"].append((name, cm)) or "")
    monkeypatch.setattr(report, "_per_class", lambda name, classes, p, r: seen["per_class"].append((p, r)) or "")
    monkeypatch.setattr(
        report, "_calibration", lambda name, x, acc, rows, what: seen["calibration"].append((acc, rows)) or ""
    )
    return seen


def test_the_reports_multiclass_confusion_per_class_and_calibration_are_scikit_learns(drawn):
    import torch
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import confusion_matrix, precision_score, recall_score

    from mmray.data.labels import Task
    from mmray.report import _task_sections
    from tests.test_metrics import _accumulated

    rng = np.random.default_rng(11)
    y = rng.integers(0, 3, size=200)
    logits = rng.normal(scale=2.0, size=(200, 3))
    logits[np.arange(200), y] += 1.0
    task = Task("label", "multiclass", ("a", "b", "c"))
    stats = _accumulated([task], {"label": torch.tensor(logits)}, {"label": torch.tensor(y)}).task_stats()
    _task_sections([task.to_dict()], stats)
    pred = logits.argmax(1)
    ((_, cm),) = drawn["confusion"]
    want = confusion_matrix(y, pred, labels=range(3))  # rows true, columns predicted: the axes as labelled
    assert not np.array_equal(want, want.T)
    np.testing.assert_array_equal(cm, want)
    ((precision, recall),) = drawn["per_class"]
    np.testing.assert_allclose(precision, precision_score(y, pred, average=None, labels=range(3)))
    np.testing.assert_allclose(recall, recall_score(y, pred, average=None, labels=range(3)))
    ((accuracy, rows),) = drawn["calibration"]
    top = torch.softmax(torch.tensor(logits, dtype=torch.float32), 1).max(1).values.numpy()
    frac, _ = calibration_curve((pred == y).astype(int), top, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(accuracy[rows > 0], frac, atol=1e-6)
    assert rows.sum() == 200


def test_the_reports_binary_confusion_is_scikit_learns(drawn):
    import torch
    from sklearn.metrics import confusion_matrix

    from mmray.data.labels import Task
    from mmray.report import _task_sections
    from tests.test_metrics import _accumulated, _bin_centre_logits

    rng = np.random.default_rng(12)
    y = rng.integers(0, 2, size=150)
    logits = _bin_centre_logits(rng, y)
    task = Task("flag", "binary", ("no", "yes"))
    targets = {"flag": torch.tensor(y, dtype=torch.float32)}
    stats = _accumulated([task], {"flag": torch.tensor(logits).unsqueeze(-1)}, targets).task_stats()
    _task_sections([task.to_dict()], stats)
    ((name, cm),) = drawn["confusion"]
    want = confusion_matrix(y, (logits >= 0).astype(int), labels=[0, 1])  # [[tn, fp], [fn, tp]]
    assert name == "flag/yes" and len(set(want.ravel())) == 4  # a swapped pair would show
    np.testing.assert_array_equal(cm, want)
