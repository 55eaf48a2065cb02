"""Known-answer and consistency tests for the patch detectors behind the one interface (kNN, MuSc, LAKE) and the
registry."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from spg_dist.detectors import (Detector, DetectorConfigError, FitData, KNNDetector, LAKEDetector, MuScDetector,
                                TokenSet, UnknownDetectorError, create_detector, image_score, list_detectors)


def _ts(tokens, layer=1):
    tokens = np.asarray(tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens, np.float32)
    n = tokens.shape[0]
    return TokenSet({layer: tokens}, [f"img{i}" for i in range(n)], ["c"] * n, np.zeros(n, np.int8))


def knn(normal, **kw):
    det = KNNDetector(**kw)
    shots = kw.get("shots", len(normal))
    return det.fit(FitData(shots=_ts(normal[:shots] if not isinstance(normal, torch.Tensor) else normal[:shots])))


def _e(i, d=8):
    v = np.zeros(d, dtype=np.float32)
    v[i] = 1.0
    return v


def _cos_dist(a, b):
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    return 1.0 - float(a @ b)


# ------------------------------------------------------------------ interface
def test_registry_and_interface():
    assert list_detectors()[:6] == ["spg", "knn", "musc", "lake", "foundad", "visualad"]
    for name in ("knn", "musc", "lake"):
        det = create_detector(name)
        assert isinstance(det, Detector) and det.name == name
        assert det.inputs().layers == (-1,)
    assert create_detector("knn").inputs().shots == 4 and create_detector("musc").inputs().unlabelled_target
    assert create_detector("knn", shots="2").settings.shots == 2  # --param strings are typed by the settings
    with pytest.raises(UnknownDetectorError, match="did you mean 'lake'"):
        create_detector("laek")
    with pytest.raises(DetectorConfigError, match="unknown setting.*shotz"):
        create_detector("knn", shotz=3)
    with pytest.raises(DetectorConfigError, match="shots='x': expected int"):
        create_detector("knn", shots="x")
    with pytest.raises(DetectorConfigError, match="index="):
        create_detector("knn", index="faiss")


# ------------------------------------------------------------------ image_score
def test_image_score_top_fraction():
    s = np.arange(200, dtype=np.float32).reshape(2, 10, 10)  # image 0: 0..99, image 1: 100..199
    # 1% of 100 patches -> 1 patch (max)
    np.testing.assert_allclose(image_score(s), [99.0, 199.0])
    # 5% -> mean of top 5
    np.testing.assert_allclose(image_score(s, top_fraction=0.05), [97.0, 197.0])
    # tiny map: at least one patch used
    small = np.array([[[1.0, 5.0], [3.0, 2.0]]])
    np.testing.assert_allclose(image_score(small), [5.0])
    np.testing.assert_allclose(image_score(small, top_fraction=0.5), [4.0])
    np.testing.assert_allclose(image_score(torch.tensor(small)), [5.0])
    assert KNNDetector().image_scores(small).shape == (1,)


# ------------------------------------------------------------------ kNN
def test_knn_known_answer():
    rng = np.random.default_rng(0)
    bank = np.tile(_e(0), (2, 3, 3, 1)) * rng.uniform(0.5, 2.0, size=(2, 3, 3, 1)).astype(np.float32)
    det = knn(bank)
    test = np.zeros((1, 1, 2, 8), dtype=np.float32)
    test[0, 0, 0] = 3.0 * _e(0)  # along e1 -> 0
    test[0, 0, 1] = 0.7 * _e(1)  # along e2 -> orthogonal -> 1
    s = det.score(test)
    assert s.shape == (1, 1, 2) and s.dtype == np.float32
    np.testing.assert_allclose(s[0, 0], [0.0, 1.0], atol=1e-6)


def test_knn_k_shot_and_torch_input():
    normal = np.stack([np.tile(_e(0), (2, 2, 1)), np.tile(_e(1), (2, 2, 1))])
    test = np.tile(_e(1), (1, 2, 2, 1))
    np.testing.assert_allclose(knn(normal, shots=2).score(test), 0.0, atol=1e-6)
    # only the first image (e1) in the bank -> e2 test patches are at distance 1
    np.testing.assert_allclose(knn(torch.tensor(normal), shots=1).score(torch.tensor(test)), 1.0, atol=1e-6)


def test_knn_score_before_fit_raises():
    with pytest.raises(RuntimeError):
        KNNDetector().score(np.zeros((1, 2, 2, 4), dtype=np.float32))


@pytest.mark.parametrize("chunk", [1, 7, 50, 4096])
def test_knn_chunking_matches_brute_force(chunk):
    rng = np.random.default_rng(1)
    normal = rng.normal(size=(3, 4, 5, 16)).astype(np.float32)
    test = rng.normal(size=(2, 4, 5, 16)).astype(np.float32)
    got = knn(normal, shots=3, chunk=chunk).score(test)
    bank = normal.reshape(-1, 16)
    want = np.empty((2, 4, 5), dtype=np.float64)
    for i in range(2):
        for y in range(4):
            for x in range(5):
                want[i, y, x] = min(_cos_dist(test[i, y, x], b) for b in bank)
    np.testing.assert_allclose(got, want, atol=1e-5)
    ref = knn(normal, shots=3, chunk=10**6).score(test)
    np.testing.assert_allclose(got, ref, atol=1e-6)  # chunked == unchunked


# ------------------------------------------------------------------ MuSc
def test_musc_known_answer():
    rng = np.random.default_rng(2)
    d = 8
    tok = np.tile(_e(0, d), (6, 3, 3, 1)) + 0.01 * rng.normal(size=(6, 3, 3, d)).astype(np.float32)
    tok[4, 1, 2] = _e(1, d)
    s = MuScDetector(fraction=0.3).score(tok)
    assert s.shape == (6, 3, 3) and s.dtype == np.float32
    assert np.unravel_index(np.argmax(s), s.shape) == (4, 1, 2)
    assert s[4, 1, 2] > 0.9
    others = s.copy()
    others[4, 1, 2] = 0.0
    assert others.max() < 1e-3


def _musc_brute(tok, fraction):
    m, h, w, d = tok.shape
    x = tok.reshape(m, h * w, d)
    k = min(m - 1, max(1, int(np.ceil(fraction * (m - 1) - 1e-9))))
    out = np.empty((m, h * w))
    for i in range(m):
        for p in range(h * w):
            mins = sorted(min(_cos_dist(x[i, p], x[j, q]) for q in range(h * w)) for j in range(m) if j != i)
            out[i, p] = np.mean(mins[:k])
    return out.reshape(m, h, w)


@pytest.mark.parametrize("fraction,chunk", [(0.3, 16384), (0.5, 3), (1.0, 1), (0.01, 5)])
def test_musc_matches_brute_force(fraction, chunk):
    rng = np.random.default_rng(3)
    tok = rng.normal(size=(5, 2, 3, 6)).astype(np.float32)
    got = MuScDetector(fraction=fraction, chunk=chunk).score(torch.tensor(tok))
    np.testing.assert_allclose(got, _musc_brute(tok, fraction), atol=1e-5)


def test_musc_needs_two_images():
    with pytest.raises(ValueError):
        MuScDetector().score(np.zeros((1, 2, 2, 4), dtype=np.float32))


# ------------------------------------------------------------------ planted anomalies
def _toy_set(seed=4, n_normal=4, n_test=10, h=8, w=8, d=32):
    """Normal patches: small noise around a few prototype directions; anomalies: new directions."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(4, d)).astype(np.float32)

    def normal_imgs(n):
        idx = rng.integers(0, 4, size=(n, h, w))
        return protos[idx] + 0.05 * rng.normal(size=(n, h, w, d)).astype(np.float32)

    normal = normal_imgs(n_normal)
    test = normal_imgs(n_test)
    mask = np.zeros((n_test, h, w), dtype=bool)
    for i in range(0, n_test, 3):  # anomalies in a few images only
        y, x = rng.integers(0, h - 1, size=2)
        mask[i, y : y + 2, x : x + 2] = True
    test[mask] = rng.normal(size=(mask.sum(), d)).astype(np.float32)
    return normal, test, mask


def test_knn_detects_planted_anomalies():
    normal, test, mask = _toy_set()
    s = knn(normal, shots=2, chunk=100).score(test)
    assert roc_auc_score(mask.ravel(), s.ravel()) == 1.0
    img = image_score(s)
    assert roc_auc_score(mask.any(axis=(1, 2)), img) == 1.0


def test_musc_detects_planted_anomalies():
    _, test, mask = _toy_set()
    det = MuScDetector(fraction=0.3, chunk=50).fit(FitData(unlabelled=_ts(test)))
    s = det.score(_ts(test))
    assert roc_auc_score(mask.ravel(), s.ravel()) == 1.0
    assert roc_auc_score(mask.any(axis=(1, 2)), image_score(s)) == 1.0


def test_musc_through_fit_excludes_each_image_itself():
    rng = np.random.default_rng(3)
    tok = rng.normal(size=(5, 2, 3, 6)).astype(np.float32)
    det = MuScDetector(fraction=0.5).fit(FitData(unlabelled=_ts(tok)))
    np.testing.assert_allclose(det.score(_ts(tok).subset([1, 3])), _musc_brute(tok, 0.5)[[1, 3]], atol=1e-5)


# ------------------------------------------------------------------ LAKE
def test_lake_picks_planted_high_variance_channels_and_scores_their_deviation():
    """Normal patches vary strongly along channels 3 and 7 only; LAKE keeps exactly those, and a patch's score is
    the RMS of its z-scores on them (hand-computed), so a deviation on a low-variance channel is ignored."""
    rng = np.random.default_rng(5)
    n, h, w, d = 4, 4, 4, 12
    normal = 0.01 * rng.normal(size=(n, h, w, d)).astype(np.float32)
    normal[..., 3] += rng.normal(0, 2.0, size=(n, h, w))
    normal[..., 7] += rng.normal(0, 1.0, size=(n, h, w))
    det = LAKEDetector(channels=2, shots=4).fit(FitData(shots=_ts(normal)))
    assert sorted(det.selected.tolist()) == [3, 7] and det.selected[0] == 3  # ordered by variance
    x = normal.reshape(-1, d).astype(np.float64)
    mu, sd = x.mean(0), x.std(0)
    test = np.zeros((1, 1, 3, d), np.float32)
    test[0, 0, 0, 3] = 10.0  # a large deviation on the selected channel
    test[0, 0, 1, 0] = 10.0  # on an unselected, low-variance channel: invisible to LAKE
    got = det.score(test)[0, 0]
    want = [np.sqrt(np.mean([((t[c] - mu[c]) / sd[c]) ** 2 for c in (3, 7)])) for t in test[0, 0].astype(np.float64)]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got[0] > 3 * got[1]
    assert det.pooling == "max" and det.image_scores(det.score(test)) == pytest.approx(got.max())


def test_lake_pca_view_equals_channels_on_uncorrelated_channels():
    rng = np.random.default_rng(6)
    scales = np.array([5.0, 1.0, 3.0, 0.1, 0.2, 0.05], np.float32)
    normal = (rng.normal(size=(6, 5, 5, 6)) * scales).astype(np.float32)
    test = (rng.normal(size=(2, 5, 5, 6)) * scales * 2).astype(np.float32)
    a = LAKEDetector(channels=3, shots=6).fit(FitData(shots=_ts(normal))).score(test)
    b = LAKEDetector(channels=3, shots=6, view="pca").fit(FitData(shots=_ts(normal))).score(test)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    with pytest.raises(DetectorConfigError, match="view"):
        LAKEDetector(view="svd")

