"""Patient-level folds and cohorts (LGG adapter and the generic CSV)."""

import csv
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from tumor_classification_scripts.arms import ChannelArm, FusionArm, load_pairs
from tumor_classification_scripts.cohort import csv_cohort, load_cohort
from tumor_classification_scripts.folds import stratified_patient_folds


def test_folds_stratified_patient_level_and_reproducible():
    labels = {f"p{i:02d}": int(i % 3 == 0) for i in range(40)}
    f1 = stratified_patient_folds(labels, 5, seed=7)
    assert set(f1) == set(labels) and set(f1.values()) == set(range(5))
    for k in range(5):
        members = [p for p, f in f1.items() if f == k]
        n_pos = sum(labels[p] for p in members)
        assert abs(n_pos - sum(labels.values()) / 5) <= 1
    # same seed -> same folds, whatever the input order; another seed -> other folds
    assert stratified_patient_folds(dict(reversed(list(labels.items()))), 5, seed=7) == f1
    assert stratified_patient_folds(labels, 5, seed=8) != f1
    with pytest.raises(ValueError):
        stratified_patient_folds({"a": 0, "b": 1, "c": 1}, 2, 0)


def test_lgg_cohort_counts(shared_data):
    c = load_cohort(shared_data / "lgg_tcga")
    s = c.summary()
    assert (s["n_patients"], s["n_positive"], s["n_negative"]) == (78, 44, 34)
    assert s["n_slices"] == 1232 and s["n_tumour_slices"] == 920
    assert s["n_excluded"] == 10
    assert all("T1c missing" in r for r in c.excluded.values())
    assert c.sequence_names == ("FLAIR", "T1c")
    rec = c.slices[0]
    assert (rec.seq_a_channel, rec.seq_b_channel) == (1, 2) and rec.seq_a == rec.seq_b
    # FLAIR + pre-contrast T1 instead: other exclusions
    c2 = load_cohort(shared_data / "lgg_tcga", sequences=("flair", "t1"))
    assert c2.summary()["n_excluded"] < 10
    sub = c.subset(max_patients=6, max_slices_per_patient=3)
    assert len(sub.patients) == 6 and len(set(sub.labels.values())) == 2
    assert max(Counter(x.patient for x in sub.slices).values()) <= 3


def test_lgg_pairs_are_flair_and_t1c(shared_data):
    c = load_cohort(shared_data / "lgg_tcga", max_patients=2, max_slices_per_patient=1)
    pairs = load_pairs(c, 64)
    assert pairs.shape == (2, 2, 64, 64)
    assert float(pairs.min()) == 0.0 and float(pairs.max()) == 1.0
    raw = np.asarray(Image.open(c.slices[0].seq_a)).astype(np.float32)
    flair = raw[..., 1]
    import torch
    import torch.nn.functional as F

    ref = F.interpolate(torch.from_numpy(flair)[None, None], size=(64, 64), mode="area")[0, 0]
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(pairs[0, 0].numpy(), ref.numpy(), atol=1e-5)


def _write_png(path, value, size=24):
    rng = np.random.default_rng(value)
    Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(path)


def test_generic_csv_cohort(tmp_path):
    rows = []
    for p, lab, excl in (("A", 1, ""), ("B", 0, ""), ("C", "", ""), ("D", 1, "T1c is a FLAIR copy")):
        for k in range(2):
            a, b = tmp_path / f"{p}{k}_a.png", tmp_path / f"{p}{k}_b.png"
            _write_png(a, ord(p) * 10 + k)
            _write_png(b, ord(p) * 10 + k + 5)
            rows.append({"patient": p, "label": lab, "seq_a": a.name, "seq_b": str(b), "tumour": k, "exclude": excl})
    path = tmp_path / "cohort.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    c = load_cohort(path, sequences=("FLAIR", "T1c"))
    assert c.patients == ["A", "B"] and c.labels == {"A": 1, "B": 0}
    assert c.excluded == {"C": "no label", "D": "T1c is a FLAIR copy"}
    assert len(c.slices) == 4 and c.has_slice_labels
    pairs = load_pairs(c, 16)
    assert pairs.shape == (4, 2, 16, 16)
    assert ChannelArm("a", [0]).build(pairs).shape == (4, 1, 16, 16)
    from tumor_classification_scripts.fusion import MaxFusion

    fused = FusionArm("max", MaxFusion()).build(pairs)
    assert torch_equal(fused, pairs.amax(dim=1, keepdim=True))
    bad = tmp_path / "bad.csv"
    bad.write_text("patient,seq_a,seq_b\nA,x.png,y.png\n")
    with pytest.raises(ValueError, match="label"):
        csv_cohort(bad)


def torch_equal(a, b):
    import torch

    return bool(torch.equal(a, b))


def test_fusion_from_torchscript_and_from_the_bundle_folder_keeps_this_process_imports(tmp_path):
    import sys

    import torch
    from tumor_classification_scripts.fusion import (
        MeanFusion,
        load_fusion_bundle,
        load_fusion_torchscript,
    )

    ts = tmp_path / "mean.ts"
    torch.jit.script(MeanFusion()).save(str(ts))
    arm = FusionArm("ts", load_fusion_torchscript(ts))
    pairs = torch.rand(3, 2, 8, 8)
    assert arm.weights == "trained" and torch.allclose(arm.build(pairs), pairs.mean(dim=1, keepdim=True))
    with pytest.raises(FileNotFoundError, match="TorchScript fusion model not found"):
        load_fusion_torchscript(tmp_path / "absent.ts")
    # the fusion bundle's own 'scripts' package is imported in isolation: this process's 'scripts' is unchanged
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    before = sys.modules["scripts"]
    tiny = {"network_def#features": [4, 8], "network_def#dilations": [1, 3], "network_def#depth": 1,
            "network_def#decoder_depth": 1, "network_def#d_state": 4, "network_def#swap_d_state": 4}  # fmt: skip
    fusion = load_fusion_bundle(root, ckpt_path=tmp_path / "none.pt", overrides=tiny, require_weights=False)
    assert sys.modules["scripts"] is before and fusion.weights == "untrained"
    from scripts.networks import ClinicalFMamba  # this process's copy of the class

    assert type(fusion.network).__name__ == "ClinicalFMamba" and type(fusion.network) is not ClinicalFMamba
    out = FusionArm("cfm", fusion).build(torch.rand(2, 2, 16, 16))
    assert out.shape == (2, 1, 16, 16) and sys.modules["scripts"] is before
    with pytest.raises(
        FileNotFoundError, match="trained fusion weights not found at .*none.pt.*--allow_untrained true"
    ):
        load_fusion_bundle(root, ckpt_path=tmp_path / "none.pt", overrides=tiny)
    with pytest.raises(FileNotFoundError, match="fusion bundle config not found"):
        load_fusion_bundle(tmp_path)
