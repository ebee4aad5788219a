"""Radiomics features against values computed by hand on tiny arrays, and the radiomics classifier's folds."""

import math

import numpy as np
import pytest
import torch
from tumor_classification_scripts.classifiers import ArmImages, RadiomicsClassifier, WholeSliceClassifier
from tumor_classification_scripts.cohort import Cohort, SliceRecord
from tumor_classification_scripts.features import (
    discretise,
    first_order_features,
    glcm_features,
    glcm_matrix,
    histogram_features,
    normalise_slice,
    patient_features,
    shape_features,
    whole_slice_features,
)


def test_first_order_by_hand():
    f = first_order_features(np.array([1.0, 2.0, 3.0, 4.0]))
    # deviations -1.5, -0.5, 0.5, 1.5: m2 = 1.25, m4 = 2.5625 -> excess kurtosis 2.5625 / 1.5625 - 3 = -1.36
    assert f["mean"] == 2.5 and f["variance"] == 1.25 and f["skewness"] == 0.0
    assert f["kurtosis"] == pytest.approx(-1.36)
    assert (f["median"], f["minimum"], f["maximum"], f["range"]) == (2.5, 1.0, 4.0, 3.0)
    assert f["p10"] == pytest.approx(1.3) and f["p90"] == pytest.approx(3.7)  # linear interpolation
    assert f["interquartile_range"] == pytest.approx(1.5)
    assert f["mean_absolute_deviation"] == 1.0 and f["median_absolute_deviation"] == 1.0
    assert f["robust_mean_absolute_deviation"] == 0.5  # values in [1.3, 3.7]: 2 and 3
    assert f["root_mean_square"] == pytest.approx(math.sqrt(7.5))
    const = first_order_features(np.full(5, 2.0))
    assert const["skewness"] == 0.0 and const["variance"] == 0.0
    assert all(math.isnan(v) for v in first_order_features(np.zeros(0)).values())


def test_discretisation_and_histogram_by_hand():
    # IBSI fixed bin number: floor(Ng (x - lo) / (hi - lo)) + 1, the maximum clipped into the top bin
    np.testing.assert_array_equal(discretise(np.array([0.0, 0.24, 0.5, 1.0]), 0.0, 1.0, 4), [1, 1, 3, 4])
    np.testing.assert_array_equal(discretise(np.array([3.0, 3.0]), 3.0, 3.0, 8), [1, 1])
    h = histogram_features(np.array([1, 1, 2, 2]), 2)
    assert h["entropy"] == pytest.approx(1.0) and h["uniformity"] == pytest.approx(0.5)
    h = histogram_features(np.array([1, 1, 1, 1]), 4)
    assert h["entropy"] == 0.0 and h["uniformity"] == 1.0


def test_glcm_by_hand():
    # levels [[1, 2], [1, 2]], four angles, symmetric: 0 deg -> (1,2) x2 each way; 90 deg -> (1,1) x2, (2,2) x2;
    # 45 and 135 deg -> one (1,2) pair each, both ways. Merged counts [[2, 4], [4, 2]], p = [[1/6, 1/3], [1/3, 1/6]]
    levels = np.array([[1, 2], [1, 2]])
    m = glcm_matrix([levels], [np.ones((2, 2), bool)], 2)
    np.testing.assert_array_equal(m, [[2, 4], [4, 2]])
    f = glcm_features(m)
    assert f["joint_maximum"] == pytest.approx(1 / 3)
    assert f["joint_average"] == pytest.approx(1.5)
    assert f["joint_variance"] == pytest.approx(0.25)
    assert f["joint_entropy"] == pytest.approx(-(2 / 6) * math.log2(1 / 6) - (2 / 3) * math.log2(1 / 3))
    assert f["contrast"] == pytest.approx(2 / 3) and f["difference_average"] == pytest.approx(2 / 3)
    assert f["inverse_difference"] == pytest.approx(2 / 3) and f["inverse_difference_moment"] == pytest.approx(2 / 3)
    assert f["angular_second_moment"] == pytest.approx(2 / 36 + 2 / 9)
    assert f["correlation"] == pytest.approx(-1 / 3)  # sum (i - 1.5)(j - 1.5) p / 0.25
    # pixels outside the ROI never enter a pair: the right column excluded leaves only vertical (1,1) pairs
    roi = np.array([[True, False], [True, False]])
    np.testing.assert_array_equal(glcm_matrix([levels], [roi], 2), [[2, 0], [0, 0]])
    # matrices of several slices are summed before the features (IBSI 2.5-D merged)
    np.testing.assert_array_equal(glcm_matrix([levels, levels], [np.ones((2, 2), bool)] * 2, 2), 2 * m)


def test_shape_by_hand():
    square = np.zeros((10, 10), bool)
    square[2:6, 2:6] = True
    small = np.zeros((10, 10), bool)
    small[0:2, 0:2] = True
    f = shape_features([square, small, np.zeros((10, 10), bool)])
    assert (f["n_slices"], f["total_area"], f["max_area"]) == (2.0, 20.0, 16.0)
    assert f["eccentricity"] == pytest.approx(0.0) and f["solidity"] == 1.0 and f["extent"] == 1.0
    assert f["major_axis_length"] == pytest.approx(f["minor_axis_length"]) and f["n_components"] == 1.0
    two = square.copy()
    two[8:10, 8:10] = True
    assert shape_features([two])["n_components"] == 2.0


def test_normalisation_uses_the_normal_appearing_head():
    img = np.array([[0.0, 2.0], [10.0, 50.0]])
    head = np.array([[True, True], [True, False]])
    roi = np.array([[False, False], [True, False]])
    z = normalise_slice(img, roi, head, min_reference=1)  # reference = {0, 2}: mean 1, sd 1
    np.testing.assert_allclose(z, [[-1.0, 1.0], [9.0, 49.0]])


def test_patient_features_shape_identical_across_arms_and_channel_prefixes():
    rng = np.random.default_rng(0)
    rois = np.zeros((2, 16, 16), bool)
    rois[:, 4:10, 5:12] = True
    heads = np.ones((2, 16, 16), bool)
    a = patient_features(rng.random((2, 1, 16, 16)), rois, heads, n_bins=8)
    b = patient_features(rng.random((2, 1, 16, 16)) ** 2, rois, heads, n_bins=8)
    shape_keys = [k for k in a if k.startswith("shape_")]
    assert len(shape_keys) == 11 and all(a[k] == b[k] for k in shape_keys)
    assert a["firstorder_mean"] != b["firstorder_mean"]
    img_only = patient_features(rng.random((2, 1, 16, 16)), rois, heads, n_bins=8, with_shape=False)
    assert not any(k.startswith("shape_") for k in img_only) and len(img_only) == 15 + 2 + 10
    two = patient_features(
        rng.random((2, 2, 16, 16)), rois, heads, n_bins=8, channel_names=["flair", "t1c"], with_shape=False
    )
    assert "flair_glcm_contrast" in two and "t1c_firstorder_mean" in two and len(two) == 2 * 27
    with pytest.raises(ValueError, match=r"\(S, C, H, W\)"):
        patient_features(rng.random((2, 16, 16)), rois, heads)


def _toy_cohort(n=16, size=16):
    """Patients whose tumour is bright (label 1) or dim (label 0), with noise; 2 tumour slices each."""
    rng = np.random.default_rng(1)
    slices, labels, images, rois = [], {}, [], []
    for p in range(n):
        y = p % 2
        labels[f"p{p:02d}"] = y
        for k in range(2):
            img = rng.random((1, size, size)) * 0.3
            roi = np.zeros((size, size), bool)
            roi[4:10, 4:10] = True
            img[0][roi] += (0.6 if y else 0.2) + 0.2 * rng.random()
            images.append(img)
            rois.append(roi)
            slices.append(SliceRecord(f"p{p:02d}", str(k), "a.png", "b.png", tumour=1, mask="m.png"))
    cohort = Cohort("toy", slices, labels)
    images = torch.as_tensor(np.stack(images), dtype=torch.float32)
    return ArmImages(cohort, images, images.repeat(1, 2, 1, 1), np.stack(rois), ["image"])


def test_radiomics_classifier_separates_and_fits_inside_the_training_patients():
    data = _toy_cohort()
    clf = RadiomicsClassifier(with_shape=False, c_grid=[0.1, 1.0], k_grid=[3], inner_folds=2)
    train = [f"p{p:02d}" for p in range(10)]
    test = [f"p{p:02d}" for p in range(10, 16)]
    model = clf.fit("patient", data, train, seed=0)
    assert model.best_params_["select__k"] == 3 and model.n_features_in_ == 27
    units, pats, y, s = clf.predict(model, "patient", data, test)
    assert units == pats == sorted(test) and list(y) == [0, 1, 0, 1, 0, 1]
    assert s[y == 1].min() > s[y == 0].max()  # bright vs dim tumours: perfectly separated
    # the fit saw only the training patients: refitting after changing a test patient's image changes nothing
    data.images[-2:] = 0.0
    data.cache.clear()
    again = clf.fit("patient", data, train, seed=0)
    assert np.allclose(again.best_estimator_["lr"].coef_, model.best_estimator_["lr"].coef_)
    with pytest.raises(ValueError, match="patients only"):
        clf.fit("slice", data, train, seed=0)


def test_whole_slice_features_hyperintensity_and_asymmetry():
    head = np.zeros((20, 20), bool)
    head[2:18, 2:18] = True
    img = np.where(head, 1.0, 0.0)[None]
    flat = whole_slice_features(img, head, n_bins=8, reference=[(1.0, 0.5)])
    assert flat["asymmetry_mean"] == 0.0 and flat["head_fraction_above_2sd"] == 0.0
    spot = img.copy()
    spot[0, 5:9, 4:8] = 3.0  # 16 of 256 head pixels at z = (3 - 1) / 0.5 = 4, all in the left half
    f = whole_slice_features(spot, head, n_bins=8, reference=[(1.0, 0.5)])
    assert f["head_fraction_above_3sd"] == pytest.approx(16 / 256)
    assert f["asymmetry_above_2sd"] == pytest.approx(16 / 128) and f["asymmetry_mean"] == pytest.approx(4 * 16 / 128)
    assert f["firstorder_maximum"] == pytest.approx(4.0) and not any(k.startswith("shape_") for k in f)


def test_whole_slice_classifier_scores_slices_and_groups_inner_folds_by_patient():
    data = _toy_cohort()
    sl = data.cohort.slices
    for i, rec in enumerate(sl):  # slice 0 of each patient keeps its bright square (tumour), slice 1 loses it
        sl[i] = SliceRecord(rec.patient, rec.slice_id, "a.png", "b.png", tumour=int(rec.slice_id == "0"))
        if rec.slice_id == "1":
            data.images[i, 0][torch.as_tensor(data.rois[i])] = 0.1
    clf = WholeSliceClassifier(c_grid=[1.0], k_grid=[5], inner_folds=2)
    train = [f"p{p:02d}" for p in range(10)]
    model = clf.fit("slice", data, train, seed=0)
    units, pats, y, s = clf.predict(model, "slice", data, [f"p{p:02d}" for p in range(10, 16)])
    assert len(units) == 12 and units[0] == "p10/0" and pats[0] == "p10" and y.sum() == 6
    assert s[y == 1].mean() > s[y == 0].mean()
    with pytest.raises(ValueError, match="slices only"):
        clf.fit("patient", data, train, seed=0)
