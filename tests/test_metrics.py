"""Evaluation metrics against scikit-learn and scipy, the references everyone reports with."""

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from jaxtune import metrics


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (5, 2), (6, 3)])
def test_classification_metrics_match_scikit_learn(k, seed):
    rng = np.random.RandomState(seed)
    y = rng.randint(0, k, 300)
    p = np.where(rng.rand(300) < 0.6, y, rng.randint(0, k, 300))
    if k == 5:
        p[p == 4] = 3  # a class never predicted: the zero-division convention
    if k == 6:
        y[y == 5], p[p == 5] = 0, 1  # a label neither true nor predicted: left out of the macro averages
    names = [f"c{i}" for i in range(k)]
    got = metrics.classification(y, p, names)
    labels = list(range(k))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    for avg in ("macro",):
        kw = dict(average=avg, zero_division=0)  # scikit-learn's default: the labels that occur
        assert got[f"precision_{avg}"] == pytest.approx(skm.precision_score(y, p, **kw))
        assert got[f"recall_{avg}"] == pytest.approx(skm.recall_score(y, p, **kw))
        assert got[f"f1_{avg}"] == pytest.approx(skm.f1_score(y, p, **kw))
    assert got["f1_micro"] == pytest.approx(skm.f1_score(y, p, labels=labels, average="micro"))
    per = skm.f1_score(y, p, labels=labels, average=None, zero_division=0)
    assert [got[f"f1/{n}"] for n in names] == pytest.approx(per.tolist())
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p))
    assert got["confusion_matrix"] == skm.confusion_matrix(y, p, labels=labels).tolist()


def test_regression_metrics_match_scipy():
    rng = np.random.RandomState(3)
    y = rng.randn(200)
    p = y + rng.randn(200) * 0.5
    p[:20] = np.round(p[:20])  # ties
    got = metrics.regression(y, p)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(y, p))
    assert got["pearson"] == pytest.approx(scipy.stats.pearsonr(y, p)[0])
    assert got["spearman"] == pytest.approx(scipy.stats.spearmanr(y, p)[0])


def test_multilabel_metrics_match_scikit_learn():
    rng = np.random.RandomState(4)
    y = (rng.rand(100, 4) < 0.4).astype(int)
    logits = rng.randn(100, 4) + (y - 0.5) * 2
    got = metrics.multilabel(y, logits)
    pred = (logits > 0).astype(int)
    assert got["exact_match"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["f1_micro"] == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))


def test_user_metric_by_import_path():
    fn = metrics.user_metric("numpy:mean")
    assert fn([1, 2, 3]) == 2
    for bad in ("numpy.mean", "numpy:no_such_function", "no_such_module:f"):
        with pytest.raises(ValueError) as e:
            metrics.user_metric(bad)
        assert bad in str(e.value) and "\n" not in str(e.value)
