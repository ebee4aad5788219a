"""The CNN recipe of the companion bundle: crop geometry, normalisation, loss weights, the inner validation split
(training patients only) and early stopping that restores the best epoch. Synthetic data, tiny networks."""

import copy
from functools import partial

import numpy as np
import pytest
import torch
from monai.networks.nets import ResNet
from monai.transforms import RandRotate90
from tumor_classification_scripts import (
    ArmImages,
    CNNClassifier,
    Cohort,
    SliceRecord,
    training,
)
from tumor_classification_scripts.cnn_inputs import (
    build_augmentation,
    cnn_inputs,
    crop_square,
    normalise_in_head,
    square_box,
)
from tumor_classification_scripts.training import (
    balanced_weights,
    fit_classifier,
    inner_validation_split,
)

TINY_NET = partial(
    ResNet, block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 4, 4, 4], spatial_dims=2, conv1_t_stride=2,
    num_classes=1,
)  # fmt: skip


def coordinate_image(h: int = 64, w: int = 64) -> torch.Tensor:
    """``(1, h, w)`` whose pixel (r, c) holds ``1000 r + c`` (a crop tells where it came from)."""
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return (1000 * r + c)[None]


def test_square_box_around_a_hand_made_mask():
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 20:30] = True  # 10 x 10 at rows 10-19, cols 20-29
    assert square_box(mask, margin=0.5) == (5, 15, 20)  # side 10 * (1 + 2 * 0.5), same centre (15, 25)
    assert square_box(mask, margin=0.0) == (10, 20, 10)
    assert square_box(mask, margin=0.0, min_side=16) == (7, 17, 16)  # the minimum side, still centred
    tall = np.zeros((64, 64), dtype=bool)
    tall[0:20, 40:44] = True  # 20 x 4: the square side follows the longer edge
    assert square_box(tall, margin=0.25) == (-5, 27, 30)  # centre (10, 42)
    assert square_box(np.zeros((8, 8), dtype=bool), margin=0.25) is None


def test_crop_is_the_boxed_region_with_zero_padding():
    img = coordinate_image()
    crop = crop_square(img, (5, 15, 20), size=20)  # no resize: exact pixels
    assert torch.equal(crop, img[:, 5:25, 15:35])
    edge = crop_square(img, (-5, 27, 30), size=30)  # 5 rows above the image are zeros
    assert torch.equal(edge[:, 5:], img[:, 0:25, 27:57]) and torch.count_nonzero(edge[:, :5]) == 0
    resized = crop_square(img, (5, 15, 20), size=10)
    assert resized.shape == (1, 10, 10)
    centre = resized[0, 4:6, 4:6].mean().item()  # the resize keeps the box's centre at the centre
    assert centre == pytest.approx(1000 * 14.5 + 24.5, abs=300)


def test_normalise_in_head_is_a_z_score_inside_the_head():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand((2, 16, 16), generator=gen) * torch.tensor([1.0, 5.0])[:, None, None] + 3.0
    head = np.zeros((16, 16), dtype=bool)
    head[2:14, 3:12] = True
    out = normalise_in_head(img, head)
    inside = out[:, torch.as_tensor(head)]
    assert torch.allclose(inside.mean(dim=1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(inside.std(dim=1, unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.count_nonzero(out[:, ~torch.as_tensor(head)]) == 0


def test_tumour_crop_centres_on_the_mask_and_the_head_crop_ignores_it():
    images = torch.zeros((2, 1, 64, 64))
    heads = np.zeros((2, 64, 64), dtype=bool)
    heads[:, 8:56, 8:56] = True
    images[:, :, 8:56, 8:56] = 0.2
    images[0, :, 40:48, 12:20] = 1.0  # a bright 8 x 8 "tumour" off-centre
    rois = np.zeros((2, 64, 64), dtype=bool)
    rois[0, 40:48, 12:20] = True  # slice 1 has an empty mask (falls back to the head box)
    x, fallback = cnn_inputs(images, heads, rois, "tumour", size=16, margin=0.5, min_side_fraction=0.0)
    assert x.shape == (2, 1, 16, 16) and fallback.tolist() == [False, True]
    bright = x[0, 0] > x[0, 0].mean()
    rows, cols = np.nonzero(bright.numpy())
    assert rows.min() >= 3 and rows.max() <= 12 and cols.min() >= 3 and cols.max() <= 12  # tumour in the middle
    assert (x[0, 0, 4:12, 4:12] > 1.0).float().mean() > 0.9
    head_only, none = cnn_inputs(images, heads, None, "head", size=16)
    other = np.ones_like(rois)  # the head crop never reads the masks
    assert torch.equal(head_only, cnn_inputs(images, heads, other, "head", size=16)[0]) and not none.any()
    with pytest.raises(ValueError, match="'mask' column"):
        cnn_inputs(images, heads, None, "tumour", size=16)


def test_balanced_weights_hand_values():
    w = balanced_weights([1, 1, 1, 0], groups=["a", "a", "b", "c"])
    assert w.tolist() == pytest.approx([0.5, 0.5, 1.0, 2.0])  # patients a, b equal within class 1; classes equal
    assert balanced_weights([1, 0, 0, 0]).tolist() == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3])


def test_augmentation_is_seeded_and_keeps_head_orientation():
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 64, 64)
    a, b = build_augmentation(3, dihedral=True), build_augmentation(3, dihedral=True)
    assert all(torch.equal(torch.as_tensor(a(x)), torch.as_tensor(b(x))) for _ in range(5))
    assert any(isinstance(t, RandRotate90) for t in build_augmentation(0, dihedral=True).transforms)
    assert not any(isinstance(t, RandRotate90) for t in build_augmentation(0, dihedral=False).transforms)


def test_inner_validation_split_is_whole_patients_and_stratified():
    groups = [f"p{i // 3}" for i in range(60)]  # 20 patients x 3 slices
    y = np.asarray([int(g[1:]) % 2 for g in groups])
    tr, va = inner_validation_split(np.arange(100, 160), y, groups, fraction=0.2, seed=1)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(60))
    train_p, val_p = {groups[i] for i in tr}, {groups[i] for i in va}
    assert not train_p & val_p and len(val_p) == 4 and set(y[va]) == {0, 1}
    assert len(inner_validation_split(np.arange(3), y[:3], groups[:3], 0.2, 0)[1]) == 0  # one patient: none


def synthetic_arm(n_patients: int = 12, slices: int = 4, size: int = 24) -> ArmImages:
    """Patients with alternating labels, 3 tumour slices + 1 tumour-free slice each, a bright square tumour."""
    recs, labels = [], {}
    images = torch.zeros((n_patients * slices, 1, size, size))
    rois = np.zeros((n_patients * slices, size, size), dtype=bool)
    gen = torch.Generator().manual_seed(0)
    for p in range(n_patients):
        labels[f"P{p:02d}"] = p % 2
        for s in range(slices):
            i = p * slices + s
            recs.append(SliceRecord(f"P{p:02d}", str(s), "a.png", "b.png", tumour=int(s < slices - 1)))
            images[i, 0, 2:-2, 2:-2] = 0.3 + 0.05 * torch.rand((size - 4, size - 4), generator=gen)
            if s < slices - 1:
                images[i, 0, 6:12, 8:14] = 0.6 + 0.3 * (p % 2)
                rois[i, 6:12, 8:14] = True
    cohort = Cohort("synthetic", recs, labels)
    pairs = images.repeat(1, 2, 1, 1)
    return ArmImages(cohort, images, pairs, rois, ["flair"])


def test_inner_validation_holds_only_training_patients():
    data = synthetic_arm()
    patients = data.cohort.patients
    test_p, train_p = patients[:4], patients[4:]
    clf = CNNClassifier(TINY_NET, epochs=2, patience=1, batch_size=8, input_size=16, device="cpu")
    for task in ("patient", "slice"):
        model = clf.fit(task, data, train_p, seed=0)
        val = set(model.fit_info["val_patients"])
        assert val and val < set(train_p) and not val & set(test_p), task
        assert model.fit_info["n_val"] == sum(1 for i in data.task_slices(task, sorted(val))[0])
        units, _, _, scores = clf.predict(model, task, data, test_p)
        assert len(units) == (4 if task == "patient" else 16) and np.all((scores >= 0) & (scores <= 1))


def test_early_stopping_restores_the_best_epoch(monkeypatch):
    data = synthetic_arm()
    idx, y = data.task_slices("slice", data.cohort.patients)
    scripted = iter([0.6, 0.8, 0.7, 0.75, 0.9, 0.95])  # best at epoch 2, then 2 epochs without improvement
    monkeypatch.setattr(training, "auc", lambda *_: next(scripted))
    states: list[dict] = []
    real_predict = training.predict_proba

    def recording_predict(network, *args, **kwargs):  # called once per epoch, on the validation units
        states.append(copy.deepcopy(network.state_dict()))
        return real_predict(network, *args, **kwargs)

    monkeypatch.setattr(training, "predict_proba", recording_predict)
    torch.manual_seed(0)
    net = TINY_NET(n_input_channels=1)
    fit = fit_classifier(
        net, data.images, y[:32], idx[:32], epochs=6, batch_size=8, learning_rate=1e-2, weight_decay=0.0, seed=0,
        val_index=idx[32:], val_targets=y[32:], patience=2,
    )  # fmt: skip
    assert fit["best_epoch"] == 2 and fit["epochs_run"] == 4 and len(states) == 4
    assert fit["val_auc"] == [0.6, 0.8, 0.7, 0.75] and fit["val_metric"] == "auc"
    now = net.state_dict()
    assert all(torch.equal(now[k], states[1][k]) for k in now)  # the weights of epoch 2
    assert not all(torch.equal(now[k], states[3][k]) for k in now if now[k].is_floating_point())


def test_one_class_validation_falls_back_to_the_loss():
    data = synthetic_arm()
    idx, y = data.task_slices("slice", data.cohort.patients)
    val = idx[y[: len(idx)] == 1][:6]
    net = TINY_NET(n_input_channels=1)
    fit = fit_classifier(
        net, data.images, y, idx, epochs=3, batch_size=8, learning_rate=1e-3, weight_decay=0.0, seed=0,
        val_index=val, val_targets=np.ones(len(val), dtype=np.int64), patience=5,
    )  # fmt: skip
    assert fit["val_metric"] == "neg_loss" and fit["best_epoch"] == int(np.argmin(fit["val_loss"])) + 1
