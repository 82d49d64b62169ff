"""Losses and metrics: the weighted training loss that every metric report's ``loss`` means, and every
metric checked against scikit-learn (a test-only dependency), never against mmray's own maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    mean_absolute_error,
    roc_auc_score,
    root_mean_squared_error,
)

from mmray.data.labels import Task
from mmray.metrics import MetricAccumulator, weighted_row_loss


def test_weighted_row_loss_weights_each_task_and_defaults_to_one():
    tasks = [Task("label", "multiclass", ("a", "b")), Task("score", "regression")]
    logits = {"label": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "score": torch.tensor([[1.0], [3.0]])}
    targets = {"label": torch.tensor([0, 1]), "score": torch.tensor([0.0, 1.0])}
    loss = weighted_row_loss(tasks, logits, targets, {"label": 2.0})  # "score" unnamed: weight 1
    # cross-entropy of [2, 0] -> class 0 is log(1 + e^-2), of [0, 0] is log 2; squared errors 1 and 4
    expected = torch.tensor([2 * math.log1p(math.exp(-2)) + 1.0, 2 * math.log(2) + 4.0])
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------------------------------
# Every metric against an independent computation (scikit-learn), on data split over two "workers"
# whose states are summed as the all-reduce does.
# --------------------------------------------------------------------------------------------------

BINS = 200  # the accumulator's AUROC histogram; scores at bin centres make its AUROC exact


def _accumulated(tasks, logits: dict, targets: dict) -> MetricAccumulator:
    """Two halves in two accumulators, states summed: what validation on two workers holds."""
    halves = []
    for part in (slice(0, 37), slice(37, None)):
        acc = MetricAccumulator(tasks)
        acc.update({k: v[part] for k, v in logits.items()}, {k: v[part] for k, v in targets.items()}, 0.0)
        halves.append(acc.state())
    total = MetricAccumulator(tasks)
    total.load_state(halves[0] + halves[1])
    return total


def _accumulate(tasks, logits: dict, targets: dict) -> dict[str, float]:
    return _accumulated(tasks, logits, targets).compute()


def _bin_centre_logits(rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
    """Logits whose sigmoid is a histogram bin's centre, positives 60 bins higher (informative, not
    perfect); repeats make ties, which both sides score 1/2."""
    p = (np.minimum(rng.integers(0, BINS - 60, size=y.shape) + 60 * y, BINS - 1) + 0.5) / BINS
    return np.log(p / (1 - p))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_accuracy_f1_and_auroc_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=90)
    logits = _bin_centre_logits(rng, y)
    task = Task("flag", "binary", ("no", "yes"))
    m = _accumulate(
        [task], {"flag": torch.tensor(logits).unsqueeze(-1)}, {"flag": torch.tensor(y, dtype=torch.float32)}
    )
    scores = 1 / (1 + np.exp(-logits))
    pred = (scores >= 0.5).astype(int)
    assert m["rows"] == 90
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred))  # the positive class's F1
    # Scores snap to bin centres only up to float rounding: allow that, nothing like a bin's width.
    assert m["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-9)
    assert 0.5 < m["auroc"] < 1.0


def test_auroc_of_arbitrary_scores_is_within_the_same_bin_ties_of_the_exact_value():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, size=400)
    scores = np.clip(rng.normal(0.45 + 0.1 * y, 0.2), 1e-4, 1 - 1e-4)
    task = Task("flag", "binary", ("no", "yes"))
    logits = torch.tensor(np.log(scores / (1 - scores))).unsqueeze(-1)
    m = _accumulate([task], {"flag": logits}, {"flag": torch.tensor(y, dtype=torch.float32)})
    bins = np.minimum((scores * BINS).astype(int), BINS - 1)
    pos, neg = bins[y == 1], bins[y == 0]
    same_bin_pairs = (pos[:, None] == neg[None, :]).sum()
    # Pairs in different bins are ordered exactly; a pair inside one bin counts 1/2 instead of 0 or 1.
    bound = 0.5 * same_bin_pairs / (len(pos) * len(neg))
    assert abs(m["auroc"] - roc_auc_score(y, scores)) <= bound + 1e-12
    assert bound < 0.01


def test_multilabel_f1_accuracy_and_auroc_match_scikit_learn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=(80, 4))
    y[:, 3] = 0  # a label nobody has: AUROC undefined (skipped), F1 1.0 when never predicted either
    logits = _bin_centre_logits(rng, y)
    logits[:, 3] = -5.0
    task = Task("tags", "multilabel", ("a", "b", "c", "d"))
    m = _accumulate([task], {"tags": torch.tensor(logits)}, {"tags": torch.tensor(y, dtype=torch.float32)})
    scores = 1 / (1 + np.exp(-logits))
    pred = (scores >= 0.5).astype(int)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=1.0))
    assert m["accuracy"] == pytest.approx(1 - hamming_loss(y, pred))
    per_label_auroc = [roc_auc_score(y[:, j], scores[:, j]) for j in range(3)]
    assert m["auroc"] == pytest.approx(np.mean(per_label_auroc), abs=1e-9)


def test_multiclass_accuracy_and_macro_f1_match_scikit_learn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, size=100)
    y[y == 3] = 2  # class 3 never occurs ...
    logits = rng.normal(size=(100, 4))
    logits[np.arange(100), y] += 1.0
    logits[:5, 3] = 10.0  # ... but is predicted five times: a present class with F1 0
    task = Task("label", "multiclass", ("a", "b", "c", "d"))
    m = _accumulate([task], {"label": torch.tensor(logits)}, {"label": torch.tensor(y)})
    pred = logits.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))  # classes in y or pred


# --------------------------------------------------------------------------------------------------
# task_stats, the sums behind mmray report's confusion matrix, calibration and score plots, against
# scikit-learn: a transposed matrix or a calibration bin counting the wrong rows leaves accuracy and
# macro F1 unchanged, so only these catch it.
# --------------------------------------------------------------------------------------------------


def test_multiclass_confusion_and_calibration_match_scikit_learn():
    rng = np.random.default_rng(8)
    c, n = 4, 300
    y = rng.integers(0, c, size=n)
    logits = rng.normal(scale=2.0, size=(n, c))  # wide: top probabilities fill bins 0.3 .. 1.0
    logits[np.arange(n), y] += 1.0
    task = Task("label", "multiclass", ("a", "b", "c", "d"))
    stats = _accumulated([task], {"label": torch.tensor(logits)}, {"label": torch.tensor(y)}).task_stats()["label"]

    pred = logits.argmax(1)
    want = confusion_matrix(y, pred, labels=range(c))  # rows: true class, columns: predicted
    assert not np.array_equal(want, want.T)  # else a transposed matrix would pass
    np.testing.assert_array_equal(stats["confusion"].numpy(), want)

    top = np.exp(logits - logits.max(1, keepdims=True))
    top = (top / top.sum(1, keepdims=True)).max(1)
    edges = np.linspace(0, 1, 11)
    assert np.abs(top[:, None] - edges[None, :]).min() > 1e-6  # no row on a bin edge, where float32 may flip
    rows = stats["calibration_rows"].numpy()
    np.testing.assert_array_equal(rows, np.histogram(top, bins=edges)[0])
    assert rows.sum() == n and (rows > 0).sum() >= 5
    correct = (pred == y).astype(int)
    frac_correct, _ = calibration_curve(correct, top, n_bins=10, strategy="uniform")  # non-empty bins only
    np.testing.assert_allclose(stats["calibration_correct"].numpy()[rows > 0] / rows[rows > 0], frac_correct)
    assert stats["calibration_correct"].sum() == correct.sum()


def _check_counts_and_histograms(stats: dict, y: np.ndarray, scores: np.ndarray) -> None:
    """``counts`` per label as (tp, fp, fn, tn) and the score histograms split by the true label."""
    pred = (scores >= 0.5).astype(int)
    for j in range(y.shape[1]):
        tn, fp, fn, tp = confusion_matrix(y[:, j], pred[:, j], labels=[0, 1]).ravel()
        assert stats["counts"][j].tolist() == [tp, fp, fn, tn]
        edges = np.linspace(0, 1, BINS + 1)
        np.testing.assert_array_equal(stats["pos_hist"][j].numpy(), np.histogram(scores[y[:, j] == 1, j], edges)[0])
        np.testing.assert_array_equal(stats["neg_hist"][j].numpy(), np.histogram(scores[y[:, j] == 0, j], edges)[0])
        # The reliability curve the histograms give: fraction positive per non-empty score bin.
        pos, neg = stats["pos_hist"][j].numpy(), stats["neg_hist"][j].numpy()
        filled = pos + neg > 0
        frac_pos, _ = calibration_curve(y[:, j], scores[:, j], n_bins=BINS, strategy="uniform")
        np.testing.assert_allclose(pos[filled] / (pos + neg)[filled], frac_pos)


def test_binary_counts_and_histograms_match_scikit_learn():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, size=120)
    logits = _bin_centre_logits(rng, y)  # bin centres: no score on an edge
    task = Task("flag", "binary", ("no", "yes"))
    acc = _accumulated(
        [task], {"flag": torch.tensor(logits).unsqueeze(-1)}, {"flag": torch.tensor(y, dtype=torch.float32)}
    )
    stats = acc.task_stats()["flag"]
    assert stats["counts"].shape == (1, 4)
    tn, fp, fn, tp = confusion_matrix(y, (logits >= 0).astype(int), labels=[0, 1]).ravel()
    assert min(tn, fp, fn, tp) > 0 and len({tn, fp, fn, tp}) == 4  # a swapped pair of counts would show
    _check_counts_and_histograms(stats, y[:, None], 1 / (1 + np.exp(-logits[:, None])))


def test_multilabel_counts_and_histograms_match_scikit_learn():
    rng = np.random.default_rng(10)
    y = rng.integers(0, 2, size=(90, 3))
    logits = _bin_centre_logits(rng, y)
    task = Task("tags", "multilabel", ("a", "b", "c"))
    acc = _accumulated([task], {"tags": torch.tensor(logits)}, {"tags": torch.tensor(y, dtype=torch.float32)})
    stats = acc.task_stats()["tags"]
    assert stats["counts"].shape == (3, 4)
    _check_counts_and_histograms(stats, y, 1 / (1 + np.exp(-logits)))


def test_regression_mae_and_rmse_match_scikit_learn():
    rng = np.random.default_rng(5)
    y, out = rng.normal(size=70), rng.normal(size=70)
    task = Task("score", "regression")
    m = _accumulate([task], {"score": torch.tensor(out).unsqueeze(-1)}, {"score": torch.tensor(y)})
    assert m["mae"] == pytest.approx(mean_absolute_error(y, out))
    assert m["rmse"] == pytest.approx(root_mean_squared_error(y, out))


def test_label_smoothing_moves_targets_towards_uniform_by_hand():
    """train.label_smoothing: multiclass targets become (1 - eps) one-hot + eps / K; binary and multilabel
    0/1 targets become eps/2 and 1 - eps/2; regression is unchanged. Checked against the formulas."""
    eps = 0.2
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    mc = Task("m", "multiclass", ("a", "b", "c"))
    soft = torch.tensor([[1 - eps + eps / 3, eps / 3, eps / 3]])
    want = -(soft * torch.log_softmax(logits, -1)).sum()
    got = weighted_row_loss([mc], {"m": logits}, {"m": torch.tensor([0])}, {}, label_smoothing=eps)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    raw = weighted_row_loss([mc], {"m": logits}, {"m": torch.tensor([0])}, {})  # no smoothing: plain cross-entropy
    assert raw.item() == pytest.approx(-torch.log_softmax(logits, -1)[0, 0].item(), rel=1e-6)
    assert got.item() != pytest.approx(raw.item())

    b = Task("b", "binary", ("no", "yes"))
    z = torch.tensor([[1.5]])
    p = torch.sigmoid(z).item()
    want_b = -((1 - eps / 2) * math.log(p) + (eps / 2) * math.log(1 - p))
    got_b = weighted_row_loss([b], {"b": z}, {"b": torch.tensor([1.0])}, {}, label_smoothing=eps)
    assert got_b.item() == pytest.approx(want_b, rel=1e-6)

    r = Task("r", "regression", ())
    y, t = torch.tensor([[0.5]]), torch.tensor([2.0])
    assert weighted_row_loss([r], {"r": y}, {"r": t}, {}, label_smoothing=eps).item() == pytest.approx(2.25)
