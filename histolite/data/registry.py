"""Dataset registry: where each public dataset comes from and how to verify and unpack it.

Entries are plain data (no code), in the spirit of timm's model registry. Downloads stream to a
temporary file, are verified by checksum, and only then are extracted; nothing half written is
left behind.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from histolite.errors import DataError
from histolite.fileio import atomic_path
from histolite.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is, where to get it, and how its files are laid out.

    ``groupings`` names what correlated files share, as (kind, regex on the file name) pairs; the
    first is the default for grouped splits. ``patient_level`` datasets get their patient from
    the layout parser instead.
    """

    name: str
    description: str
    url: str | None = None
    filename: str | None = None
    md5: str | None = None
    sha384: str | None = None
    size_bytes: int | None = None
    classes: tuple[str, ...] = ()
    groupings: tuple[tuple[str, str], ...] = ()
    mpp: float | None = None  # microns per pixel of the images, where the publisher states it
    layout: str = "class_folders"
    patient_level: bool = False
    label_schemes: tuple[str, ...] = ()
    homepage: str = ""
    citation: str = ""
    licence: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


_DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset; names are unique."""
    return _DATASETS.add(spec.name, spec)


def get_dataset(name: str) -> DatasetSpec:
    spec = _DATASETS.get(name)
    if spec is None:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(_DATASETS)}")
    return spec


def list_datasets() -> list[DatasetSpec]:
    return [_DATASETS[n] for n in _DATASETS]


register_dataset(
    DatasetSpec(
        name="folder",
        description="Any image folder ROOT/<class>/<image> (.png .jpg .jpeg .tif .tiff).",
    )
)

register_dataset(
    DatasetSpec(
        name="kather2016",
        mpp=0.495,
        description="Kather et al. 2016 colorectal texture tiles: 5,000 tiles, 150 px, 8 classes.",
        url="https://zenodo.org/records/53169/files/Kather_texture_2016_image_tiles_5000.zip?download=1",
        filename="Kather_texture_2016_image_tiles_5000.zip",
        md5="0ddbebfc56344752028fda72602aaade",
        sha384="7d86abe1d04e68b77c055820c2a4c582a1d25d2983e38ab724eac75affce8b7cb2cbf5ba68848dcfd9d84005d87d6790",
        classes=(
            "01_TUMOR",
            "02_STROMA",
            "03_COMPLEX",
            "04_LYMPHO",
            "05_DEBRIS",
            "06_MUCOSA",
            "07_ADIPOSE",
            "08_EMPTY",
        ),
        groupings=(
            ("source_image", r"_(CRC-Prim-HE-[^.]+)\.tif"),
            ("patient", r"(CRC-Prim-HE-\d+)"),
        ),
        citation=(
            "Kather JN et al. Multi-class texture analysis in colorectal cancer histology. "
            "Sci Rep 6, 27988 (2016). doi:10.1038/srep27988; data doi:10.5281/zenodo.53169"
        ),
        licence="CC BY 4.0",
        notes=(
            "File names name the source image each tile was cut from "
            "(..._CRC-Prim-HE-03_009.tif_Row_301_Col_151): splits keep a source image's tiles "
            "together by default (data.group_by=patient keeps a patient's).",
            "08_EMPTY comes from two source images (patients 06 and 10), so a grouped split can "
            "hold it in two parts at most: with a test split, take validation from the training "
            "images (data.val_split_by=stratified).",
            "The literature protocol is a stratified random tile split (data.split_by=stratified), "
            "which lets tiles of one source image sit in training and test.",
        ),
    )
)


register_dataset(
    DatasetSpec(
        name="slide_features",
        description=(
            "Slide bags for attention MIL: ROOT/<class>/<slide>.npz tile features written by "
            "`histolite slide features`."
        ),
        layout="feature_bags",
    )
)

# tiles cut by `histolite slide tiles` are named <slide-stem>_x<X>_y<Y>.png (slide.layout), and
# listed in ROOT/tiles.csv with these columns
SLIDE_TILE_PATTERN = r"^(.+)_x\d+_y\d+\.png$"
SLIDE_TILE_COLUMNS = (
    "path",
    "slide",
    "x",
    "y",
    "width",
    "height",
    "class",
    "coverage",
    "mpp",
    "tile_mpp",
)


def dataset_mpp(dataset: str, root: str | Path | None) -> float | None:
    """Microns per pixel of a dataset's images: what its tiles.csv records (slide tile
    datasets, whose tiles were cut at a chosen size), else what the publisher states."""
    if root is not None and is_slide_tile_dataset(root):
        with (Path(root) / "tiles.csv").open(newline="", encoding="utf-8") as fh:
            first = next(csv.DictReader(fh), None)
        if first is not None and first.get("tile_mpp"):
            return float(first["tile_mpp"])
    return get_dataset(dataset).mpp


def is_slide_tile_dataset(root: str | Path) -> bool:
    """Whether ``root`` was written by ``histolite slide tiles`` (its tiles.csv says so)."""
    listing = Path(root) / "tiles.csv"
    if not listing.is_file():
        return False
    with listing.open(encoding="utf-8") as fh:
        return fh.readline().strip() == ",".join(SLIDE_TILE_COLUMNS)


register_dataset(
    DatasetSpec(
        name="slide_tiles",
        description=(
            "Tiles cut from annotated whole slides by `histolite slide tiles`: "
            "ROOT/<class>/<slide>_x<X>_y<Y>.png plus ROOT/tiles.csv; split by slide."
        ),
        groupings=(("slide", SLIDE_TILE_PATTERN),),
        notes=(
            "Tiles of one slide never cross splits. data.patients (a CSV of slide,patient) "
            "keeps a patient's slides together instead.",
            "A plain folder (data.dataset: folder) holding a tiles.csv written by `histolite "
            "slide tiles` is read as this dataset.",
        ),
    )
)

register_dataset(
    DatasetSpec(
        name="bach2018",
        mpp=0.42,
        description="ICIAR 2018 BACH Part A: 400 breast H&E photos, 2048x1536 TIFF, 4 classes.",
        url="https://zenodo.org/records/3632035/files/ICIAR2018_BACH_Challenge.zip?download=1",
        filename="ICIAR2018_BACH_Challenge.zip",
        md5="8ae1801334aa943c44627c1eef3631b2",
        classes=("Normal", "Benign", "InSitu", "Invasive"),
        layout="bach2018",
        homepage="https://iciar2018-challenge.grand-challenge.org/",
        citation=(
            "Aresta G et al. BACH: Grand challenge on breast cancer histology images. "
            "Med Image Anal 56, 122-139 (2019). doi:10.1016/j.media.2019.05.010"
        ),
        licence="CC BY-NC-ND 4.0",
        notes=(
            "No patient ids are published: each photo is its own group, so patches of one photo "
            "never cross splits, but two photos of one patient may.",
            "The md5 is the one other open-source loaders record; the byte size is not recorded.",
        ),
    )
)

register_dataset(
    DatasetSpec(
        name="breakhis",
        description=(
            "BreakHis v1: 7,909 breast tumour images (700x460 PNG) from 82 patients at 40/100/"
            "200/400X; benign/malignant or 8 subtypes."
        ),
        url="http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz",
        filename="BreaKHis_v1.tar.gz",
        classes=("benign", "malignant"),
        layout="breakhis",
        patient_level=True,
        label_schemes=("binary", "subtype"),
        homepage=(
            "https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/"
        ),
        citation=(
            "Spanhol FA et al. A dataset for breast cancer histopathological image "
            "classification. IEEE Trans Biomed Eng 63(7), 1455-1462 (2016)."
        ),
        licence="research use; see the homepage",
        notes=(
            "File names encode tumour class, subtype, patient and magnification "
            "(SOB_<B|M>_<subtype>-<year>-<patient>-<mag>-<seq>.png).",
            "No official checksum is published; `data download` prints the archive's md5.",
        ),
    )
)

register_dataset(
    DatasetSpec(
        name="idc",
        description=(
            "Breast histopathology IDC patches: 277,524 patches of 50x50 px from 279 patients, "
            "IDC-negative (0) or positive (1)."
        ),
        url="http://andrewjanowczyk.com/wp-static/IDC_regular_ps50_idx5.zip",
        filename="IDC_regular_ps50_idx5.zip",
        classes=("non_idc", "idc"),
        layout="idc",
        patient_level=True,
        homepage="http://www.andrewjanowczyk.com/use-case-6-invasive-ductal-carcinoma-idc-segmentation/",
        citation=(
            "Janowczyk A, Madabhushi A. Deep learning for digital pathology image analysis. "
            "J Pathol Inform 7, 29 (2016); Cruz-Roa A et al. SPIE Medical Imaging 2014."
        ),
        licence="research use; also mirrored on Kaggle (breast-histopathology-images)",
        notes=("No official checksum is published; `data download` prints the archive's md5.",),
    )
)

_NCT_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
_NCT_CITATION = (
    "Kather JN et al. Predicting survival from colorectal cancer histology slides using deep "
    "learning. PLOS Med 16(1), e1002730 (2019); data doi:10.5281/zenodo.1214456"
)

register_dataset(
    DatasetSpec(
        name="nct_crc_he_100k",
        mpp=0.5,
        description="NCT-CRC-HE-100K: 100,000 colorectal tiles, 224 px (0.5 um/px), 9 classes.",
        url="https://zenodo.org/records/1214456/files/NCT-CRC-HE-100K.zip?download=1",
        filename="NCT-CRC-HE-100K.zip",
        md5="6fd702d11df6292bc054397ae038a464",
        size_bytes=11_690_284_003,
        classes=_NCT_CLASSES,
        citation=_NCT_CITATION,
        licence="CC BY 4.0",
        notes=(
            "Macenko-normalised tiles from 86 slides; slide ids are not in the file names, so "
            "the usual protocol trains here and tests on CRC-VAL-HE-7K (other patients).",
        ),
    )
)

register_dataset(
    DatasetSpec(
        name="crc_val_he_7k",
        mpp=0.5,
        description="CRC-VAL-HE-7K: 7,180 colorectal tiles from 50 other patients, 9 classes.",
        url="https://zenodo.org/records/1214456/files/CRC-VAL-HE-7K.zip?download=1",
        filename="CRC-VAL-HE-7K.zip",
        md5="2fd1651b4f94ebd818ebf90ad2b6ce06",
        size_bytes=800_276_929,
        classes=_NCT_CLASSES,
        citation=_NCT_CITATION,
        licence="CC BY 4.0",
        notes=("The external test set for models trained on NCT-CRC-HE-100K.",),
    )
)


def file_digests(path: Path) -> dict[str, str]:
    """md5 and sha384 of a file, read once."""
    md5, sha384 = hashlib.md5(usedforsecurity=False), hashlib.sha384()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            md5.update(chunk)
            sha384.update(chunk)
    return {"md5": md5.hexdigest(), "sha384": sha384.hexdigest()}


def verify_archive(path: Path, spec: DatasetSpec) -> None:
    """Check size and checksums against the registry entry; raise naming what differs."""
    if spec.size_bytes is not None and path.stat().st_size != spec.size_bytes:
        raise DataError(
            f"{path}: size {path.stat().st_size} bytes, expected {spec.size_bytes} for "
            f"{spec.name}; the download is incomplete or a different file"
        )
    digests = file_digests(path)
    for algo in ("md5", "sha384"):
        expected = getattr(spec, algo)
        if expected and digests[algo] != expected:
            raise DataError(
                f"{path}: {algo} {digests[algo]} does not match {expected} for {spec.name}; "
                "the file is corrupt or not the official archive"
            )


def _download(url: str, target: Path, progress: bool) -> None:
    import httpx

    with atomic_path(target) as tmp:
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=60.0) as response:
                response.raise_for_status()
                total = int(response.headers.get("content-length", 0)) or None
                with (
                    tmp.open("wb") as fh,
                    tqdm(
                        total=total,
                        unit="B",
                        unit_scale=True,
                        desc=target.name,
                        disable=not progress,
                    ) as bar,
                ):
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
                        bar.update(len(chunk))
        except httpx.HTTPError as exc:
            raise DataError(f"download of {url} failed: {exc}") from exc


def archive_stem(filename: str) -> str:
    """``X.zip`` / ``X.tar.gz`` / ``X.tgz`` -> ``X``: the folder an archive is extracted into."""
    for suffix in (".tar.gz", ".tgz", ".zip"):
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return Path(filename).stem


def _extract_to_staging(archive: Path, dest: Path, staging: Path) -> None:
    if archive.name.endswith((".tar.gz", ".tgz")):
        try:
            with tarfile.open(archive, "r:gz") as tf:
                # The "data" filter refuses absolute paths, escaping members and device files.
                tf.extractall(staging, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"{archive}: cannot extract ({exc})") from exc
        return
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                target = (dest / member.filename).resolve()
                if not target.is_relative_to(dest):
                    raise DataError(
                        f"{archive}: member {member.filename!r} escapes the target folder"
                    )
            zf.extractall(staging)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a valid zip archive ({exc})") from exc


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip or tar.gz into ``dest`` via a staging folder, refusing escaping members."""
    dest = dest.resolve()
    staging = dest.parent / f".{dest.name}.extracting"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        _extract_to_staging(archive, dest, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    dest.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        final = dest / item.name
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        item.rename(final)
    staging.rmdir()


def download_dataset(
    name: str,
    to: str | Path,
    *,
    source: str | Path | None = None,
    progress: bool = True,
    spec: DatasetSpec | None = None,
) -> Path:
    """Fetch (or take ``source``, a local copy of the archive), verify, and extract into ``to``.

    Args:
        name: registry name.
        to: destination folder; the archive is kept there as well.
        source: an already downloaded archive; it is verified like a download.
        spec: use this entry instead of the registry's (tests, mirrors).

    Returns:
        The extracted folder, ready for ``scan_image_folder``.
    """
    spec = spec or get_dataset(name)
    if not spec.url or not spec.filename:
        raise DataError(f"dataset {spec.name!r} has no download; point data.root at your folder")
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    archive = to / spec.filename
    if source is not None:
        source = Path(source)
        if not source.is_file():
            raise DataError(f"{source}: archive not found")
        verify_archive(source, spec)
        if source.resolve() != archive.resolve():
            with atomic_path(archive) as tmp:
                shutil.copyfile(source, tmp)
    elif archive.is_file():
        verify_archive(archive, spec)
    else:
        _download(spec.url, archive, progress)
        try:
            verify_archive(archive, spec)
        except DataError:
            archive.unlink()
            raise
    extracted = to / archive_stem(spec.filename)
    safe_extract(archive, extracted)
    return extracted
