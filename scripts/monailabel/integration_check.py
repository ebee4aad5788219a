"""Helpers of ``scripts/monailabel_integration.sh``, run with the MONAI Label environment's Python.

Sub-commands (stdlib + numpy + nibabel; the app's ``lib.pipeline`` does the NIfTI work):

- ``sample OUT_DIR`` — stack the embedded BraTS FLAIR / T1c slice (``docs/samples/BraTS-FLAIR-T1c``) into one
  2-channel NIfTI ``OUT_DIR/<id>.nii.gz`` (channel 0 FLAIR = reference, channel 1 T1c); prints the image id;
- ``free-port`` — a free TCP port on 127.0.0.1;
- ``info URL MODEL`` — checks ``/info/``: the model is listed, type ``others``, no trainers; prints the model entry;
- ``check FUSED INPUT [--label L]`` — the shape / affine / dtype / value-range checks of ``lib.pipeline.check_fused``;
  one ``CHECK <label> <name>: PASS|FAIL (detail)`` line each; exit status 1 when one fails.

Every HTTP request goes to 127.0.0.1 only and has a timeout; proxies are bypassed.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "scripts" / "monailabel" / "fusion_app"
SAMPLE = ROOT / "docs" / "samples" / "BraTS-FLAIR-T1c"
SAMPLE_NAME = "brats_2013_pat0001_1_z063"
sys.path.insert(0, str(APP))

from lib.pipeline import check_fused, stack_pair  # noqa: E402

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _local(url: str) -> str:
    host = urllib.request.urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing a non-local URL: {url}")
    return url


def cmd_sample(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_id = f"{SAMPLE_NAME}_flair_t1c"
    out = out_dir / f"{image_id}.nii.gz"
    stack_pair(SAMPLE / "FLAIR" / f"{SAMPLE_NAME}.nii.gz", SAMPLE / "T1c" / f"{SAMPLE_NAME}.nii.gz", out)
    import nibabel as nib

    img = nib.load(str(out))
    detail = f"shape {img.shape} dtype {img.get_data_dtype()} (channel 0 FLAIR, channel 1 T1c)"
    print(f"sample: {out} {detail}", file=sys.stderr)
    print(image_id)
    return 0


def cmd_free_port(_: argparse.Namespace) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _NO_PROXY.open(_local(args.url.rstrip("/") + "/info/"), timeout=args.timeout) as r:
        info = json.load(r)
    model = info.get("models", {}).get(args.model)
    checks = [
        ("model listed", model is not None, f"models: {sorted(info.get('models', {}))}"),
        ("type others", bool(model) and model.get("type") == "others", f"type {model and model.get('type')!r}"),
        ("no trainers", not info.get("trainers"), f"trainers: {sorted(info.get('trainers') or {})}"),
    ]
    print(f"INFO name: {info.get('name')!r}, version: {info.get('version')!r}")
    if model:
        shown = {k: model.get(k) for k in ("type", "labels", "dimension", "description", "weights", "input", "output")}
        print(f"INFO model {args.model}: {json.dumps(shown)}")
    return _report(checks, "info")


def cmd_check(args: argparse.Namespace) -> int:
    return _report(check_fused(args.fused, args.input), args.label)


def _report(checks, label: str) -> int:
    ok = True
    for name, passed, detail in checks:
        ok &= bool(passed)
        print(f"CHECK {label} {name}: {'PASS' if passed else 'FAIL'} ({detail})")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("out_dir")
    s.set_defaults(func=cmd_sample)
    s = sub.add_parser("free-port")
    s.set_defaults(func=cmd_free_port)
    s = sub.add_parser("info")
    s.add_argument("url")
    s.add_argument("model")
    s.add_argument("--timeout", type=float, default=30.0)
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("check")
    s.add_argument("fused")
    s.add_argument("input")
    s.add_argument("--label", default="infer")
    s.set_defaults(func=cmd_check)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
