"""MONAI Label app that serves the ClinicalFMamba fusion bundle (this repository) as one infer model.

Run it from the separate MONAI Label environment (``scripts/monailabel_env.sh``; see ``docs/monailabel.md``)::

    PATH="$PWD/.venv-monailabel/bin:$PATH" monailabel start_server \
        --app scripts/monailabel/fusion_app --studies /path/to/studies \
        --conf sam2 false --host 127.0.0.1 --port 8000

``--conf`` options read by this app:

- ``bundle_path`` — the bundle root (default: the repository this app lives in, three folders up);
- ``model_name`` — the model's name in ``/info/`` and ``/infer/<name>`` (default ``clinicalfmamba_fusion``);
- ``weights`` — a checkpoint file (``{"model": state_dict}`` or a plain state dict) instead of ``models/model.pt``;
- ``allow_untrained`` — ``true`` serves a seed-0 random initialisation when there are no weights (smoke tests);
- ``preload`` — ``true`` loads the network at start-up instead of at the first request.

No trainers (the bundle's unsupervised fusion training does not fit MONAI Label's labelled-datastore training),
no SAM2 / other sample models (so nothing is downloaded), and results are never saved as datastore labels.
"""

import json
import logging
import os

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.infer_fusion import FusionInferTask
from lib.pipeline import MODEL_NAME, default_bundle_root

logger = logging.getLogger(__name__)


class FusionApp(MONAILabelApp):
    """One model: ``clinicalfmamba_fusion`` (a :class:`FusionInferTask`, type ``others``)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle_path = os.path.abspath(os.path.expanduser(conf.get("bundle_path") or default_bundle_root(app_dir)))
        self.model_name = conf.get("model_name") or MODEL_NAME
        version = "unknown"
        try:
            with open(os.path.join(self.bundle_path, "configs", "metadata.json")) as f:
                version = json.load(f).get("version", version)
        except OSError as e:
            logger.error(f"cannot read the bundle metadata under {self.bundle_path}: {e}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"ClinicalFMamba image fusion (bundle {version}, MONAI Label {monailabel.__version__})",
            description="Fuses a co-registered 2-channel image (MRI, other modality) into one float32 image in [0, 1]",
            version=version,
        )

    def init_infers(self) -> dict[str, InferTask]:
        logger.info(f"ClinicalFMamba bundle: {self.bundle_path}")
        task = FusionInferTask(self.bundle_path, self.conf)
        if not task.is_valid():
            logger.error(f"ClinicalFMamba fusion model NOT served (see the errors above); bundle {self.bundle_path}")
            return {}
        logger.info(f"+++ Adding Inferer:: {self.model_name} => {task}")
        return {self.model_name: task}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        """As ``MONAILabelApp.infer``, but a fused image is never stored as a datastore label."""
        request = dict(request)
        if str(request.get("save_label", "false")).lower() in ("1", "true", "yes"):
            logger.warning("save_label ignored: a fused image is not a label of its input")
        request["save_label"] = False
        return super().infer(request, datastore)
