import numpy as np
import pytest

from trainer.evaluate import compute_metrics, matthews_corrcoef


def test_perfect_and_chance_mcc():
    assert matthews_corrcoef(np.diag([5, 5, 5])) == pytest.approx(1.0)
    assert matthews_corrcoef(np.ones((3, 3), dtype=int)) == pytest.approx(0.0)


def test_binary_mcc_matches_the_textbook_formula():
    tp, fn, fp, tn = 6, 2, 1, 11
    cm = np.array([[tp, fn], [fp, tn]])
    expected = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(cm) == pytest.approx(expected)


def test_imbalanced_classes_report_macro_f1():
    y_true = np.array([0] * 8 + [1] * 2)
    y_pred = np.array([0] * 8 + [0, 1])
    m = compute_metrics(y_true, y_pred, ("major", "minor"))
    assert m.accuracy == pytest.approx(0.9)
    assert m.per_class["minor"].recall == pytest.approx(0.5) and m.per_class["minor"].precision == pytest.approx(1.0)
    f1_major = 2 * (8 / 9) * 1 / (8 / 9 + 1)
    assert m.macro_f1 == pytest.approx((f1_major + 2 / 3) / 2)
    assert m.confusion == [[8, 0], [1, 1]]
