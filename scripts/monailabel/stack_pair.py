"""Stack a co-registered NIfTI pair into the MONAI Label app's input: one 2-channel NIfTI ``(X, Y, Z, 2)``.

    python scripts/monailabel/stack_pair.py MRI.nii.gz OTHER.nii.gz OUT.nii.gz

Channel 0 = the MRI / reference image, channel 1 = the other modality (CT, PET or SPECT luminance, or a second MRI
sequence); float32 with the reference's affine and header. The two files must have the same shape and affine.
Runs in the project venv or the MONAI Label venv (needs numpy and nibabel only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fusion_app"))

from lib.pipeline import stack_pair  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mri", help="reference image (network channel 0)")
    p.add_argument("other", help="other modality (network channel 1)")
    p.add_argument("out", help="output 2-channel NIfTI (.nii.gz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args()
    if Path(args.out).exists() and not args.overwrite:
        p.error(f"{args.out} exists (use --overwrite)")
    try:
        out = stack_pair(args.mri, args.other, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import nibabel as nib

    print(f"{out}: shape {nib.load(out).shape} (channel 0 {args.mri}, channel 1 {args.other})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
