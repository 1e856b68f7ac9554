"""Bootstrap intervals and paired comparisons of classifier metrics (`engine.train.metrics`)."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from engine.train.metrics import (_CHUNK, _resampled_confusions, _scores, bootstrap_intervals,
                                  classification_metrics, paired_bootstrap)

CODES = [f"c{i}" for i in range(6)]


def _calls(n: int, right: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CODES), n)
    wrong = (y + rng.integers(1, len(CODES), n)) % len(CODES)
    return y, np.where(rng.random(n) < right, y, wrong)


def test_each_resample_scores_as_sklearn_scores_the_images_it_drew():
    y, pred = _calls(300, 0.8, 0)
    (conf,) = _resampled_confusions(y, [pred], len(CODES), 5, seed=7)
    s = _scores(conf)
    rng = np.random.default_rng(7)  # the same draws: how many times each image was drawn
    counts = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=min(_CHUNK, 5))
    for k, w in enumerate(counts):
        assert s["accuracy"][k] == pytest.approx(accuracy_score(y, pred, sample_weight=w))
        drawn = np.unique(y[w > 0])  # the classes this resample drew
        assert s["macro_f1"][k] == pytest.approx(f1_score(y, pred, labels=drawn,
                                                          average="macro", sample_weight=w))
        assert s["recall"][k, 2] == pytest.approx(w[(y == 2) & (pred == 2)].sum()
                                                  / w[y == 2].sum())


def test_intervals_hold_the_figures_and_narrow_as_the_sample_grows():
    y, pred = _calls(400, 0.85, 1)
    m = classification_metrics(y, np.eye(len(CODES))[pred], CODES, bootstrap=1000)
    ci = m["ci95"]
    assert ci["resamples"] == 1000 and ci["level"] == 0.95
    assert ci["macro_f1"][0] < m["macro_f1"] < ci["macro_f1"][1]
    assert ci["accuracy"][0] < m["accuracy"] < ci["accuracy"][1]
    for code in CODES:
        lo, hi = ci["per_class"][code]["recall"]
        assert lo < m["per_class"][code]["recall"] < hi
    # four times the images, the same errors: about half the width (1/sqrt(4))
    big = bootstrap_intervals(np.tile(y, 4), np.tile(pred, 4), CODES, 1000)
    ratio = np.diff(big["macro_f1"])[0] / np.diff(ci["macro_f1"])[0]
    assert 0.4 < ratio < 0.62
    assert "ci95" not in classification_metrics(y, np.eye(len(CODES))[pred], CODES)


def test_paired_differences_tell_a_real_gain_from_chance():
    y, base = _calls(600, 0.8, 2)
    same = paired_bootstrap(y, base, base, CODES, 500)
    assert same["macro_f1"] == {"difference": 0.0, "difference_ci": [0.0, 0.0],
                                "share_higher": 0.0}
    # put right a third of the baseline's errors and break nothing: a gain the sample shows
    wrong = np.flatnonzero(base != y)
    better = base.copy()
    better[wrong[::3]] = y[wrong[::3]]
    gain = paired_bootstrap(y, better, base, CODES, 1000)
    assert gain["accuracy"]["difference"] == pytest.approx(len(wrong[::3]) / len(y), abs=1e-4)
    assert gain["macro_f1"]["difference_ci"][0] > 0 and gain["macro_f1"]["share_higher"] > 0.99
    # the same number of images put right and others broken: no difference to speak of
    swap = better.copy()
    ok = np.flatnonzero(base == y)[: len(wrong[::3])]
    swap[ok] = (y[ok] + 1) % len(CODES)
    null = paired_bootstrap(y, swap, base, CODES, 1000)
    lo, hi = null["accuracy"]["difference_ci"]
    assert null["accuracy"]["difference"] == 0 and lo < 0 < hi
    # paired intervals are narrower than the unpaired ones would suggest
    single = bootstrap_intervals(y, better, CODES, 1000)["macro_f1"]
    assert np.diff(gain["macro_f1"]["difference_ci"])[0] < np.diff(single)[0]
