"""Python package of the tumour-classification companion bundle (tumour classification on fused images).

- :mod:`.cohort` — cohorts: the LGG (TCGA) adapter and the generic "bring your own cohort" per-slice CSV;
- :mod:`.folds` — stratified patient-level k-fold, the same for every arm;
- :mod:`.fusion` — the fusion bundle loaded as a pipeline would (bundle folder or TorchScript), mean / max rules;
- :mod:`.arms` — input arms (sequence A / B alone, both as two channels, fused by ClinicalFMamba or a baseline);
- :mod:`.cnn_inputs` — what the CNN sees: head z-scoring, tumour / head crops, MONAI augmentation;
- :mod:`.training` — the CNN recipe shared by all arms (the one training loop, early stopping);
- :mod:`.features` — IBSI-named radiomics features (numpy, scikit-image);
- :mod:`.classifiers` — classifier families: CNN on slices, radiomics + penalised logistic regression;
- :mod:`.stats` — ROC AUC, DeLong test, patient-level bootstrap CIs, slice-to-patient aggregation, thresholds;
- :mod:`.study` — the whole protocol (:class:`~.study.ClassificationStudy`);
- :mod:`.report` — markdown report and ROC figure;
"""

from .arms import ChannelArm, FusionArm, load_masks, load_pairs
from .classifiers import ArmImages, CNNClassifier, RadiomicsClassifier, WholeSliceClassifier
from .cohort import Cohort, SliceRecord, csv_cohort, lgg_tcga_cohort, load_cohort
from .folds import fold_assignment, stratified_patient_folds
from .fusion import MaxFusion, MeanFusion, load_fusion_bundle, load_fusion_torchscript
from .stats import (
    aggregate_scores,
    auc,
    bootstrap_auc,
    choose_threshold,
    delong_test,
    delong_variance,
    paired_bootstrap_delta,
    threshold_metrics,
)
from .study import ClassificationStudy, summarise

__all__ = [
    "ArmImages",
    "CNNClassifier",
    "RadiomicsClassifier",
    "WholeSliceClassifier",
    "load_masks",
    "ChannelArm",
    "ClassificationStudy",
    "Cohort",
    "FusionArm",
    "SliceRecord",
    "aggregate_scores",
    "auc",
    "bootstrap_auc",
    "choose_threshold",
    "csv_cohort",
    "delong_test",
    "delong_variance",
    "fold_assignment",
    "lgg_tcga_cohort",
    "load_cohort",
    "load_fusion_bundle",
    "load_fusion_torchscript",
    "MaxFusion",
    "MeanFusion",
    "load_pairs",
    "paired_bootstrap_delta",
    "stratified_patient_folds",
    "summarise",
    "threshold_metrics",
]
