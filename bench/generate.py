"""Deterministic benchmark data: a synthetic CT study and one large file.

    python bench/generate.py OUTDIR [--instances N] [--large-size BYTES]

Layout of OUTDIR:
    study/IM000001.dcm ...   N valid DICOM Part 10 files, ~512 KB each (flat, so every
                             client copies the same tree the same way)
    large.bin                deterministic bytes, written in chunks
    manifest.json            name, size and SHA-256 of every file, plus the parameters

The manifest lets the driver verify copies without re-hashing the sources, and lets a
second run skip generation when nothing changed.  The data is fixed by SEED: the same
arguments give the same bytes on every machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

SEED = 20240611
# Bumped whenever the bytes generated for a given seed change, so old data is not taken as current.
GENERATOR = 2
ROWS = COLS = 512
SLICE_MM = 1.25
# We have no registered UID root, so UIDs use the 2.25 (UUID-derived) form; see _uid.
UID_NAMESPACE = "dicom-cloud-bench"
CHUNK = 8 << 20
MANIFEST = "manifest.json"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1073741824', '200MB' (10^6) or '1GiB' (2^30) -> bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    power = " kmgt".index(unit.lower() or " ")
    return int(float(number) * base**power)


@dataclass(frozen=True)
class FileEntry:
    name: str  # path relative to OUTDIR, with '/'
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    seed: int
    generator: int
    instances: int
    large_size: int
    study: list[FileEntry]
    large: FileEntry

    @staticmethod
    def load(path: Path) -> Manifest:
        raw = json.loads(path.read_text())
        return Manifest(
            seed=raw["seed"],
            generator=raw["generator"],
            instances=raw["instances"],
            large_size=raw["large_size"],
            study=[FileEntry(**e) for e in raw["study"]],
            large=FileEntry(**raw["large"]),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @property
    def study_bytes(self) -> int:
        return sum(e.size for e in self.study)


def _uid(*parts: object) -> UID:
    # 2.25.<UUID as an integer> (PS3.5 B.2) with a name-based UUID: the same UID for the same parts.
    # (pydicom's generate_uid ignores its entropy sources when the prefix is 2.25, and is random then.)
    name = ":".join([UID_NAMESPACE, str(SEED), *map(str, parts)])
    return UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}")


def _ct_dataset(index: int, pixels: bytes) -> Dataset:
    """One CT slice; index is 1-based.  Nothing here depends on N, so slices can be reused."""
    sop_uid = _uid("instance", index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "BENCH0001"
    ds.Modality = "CT"
    ds.Manufacturer = "dicom-cloud synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC BENCHMARK STUDY - NOT A PATIENT"
    ds.SeriesDescription = "Synthetic axial series"
    # Clearly fake identity: nobody is called this, and the ID says what it is.
    ds.PatientName = "Synthetic^Benchmark^^^NOT-A-PATIENT"
    ds.PatientID = "SYNTHETIC-BENCH-0001"
    ds.PatientBirthDate = "19000101"
    ds.PatientSex = "O"
    ds.SliceThickness = f"{SLICE_MM}"
    ds.KVP = "120"
    ds.StudyInstanceUID = _uid("study")
    ds.SeriesInstanceUID = _uid("series", 1)
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-SLICE_MM * (index - 1):.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = _uid("frame-of-reference")
    ds.SliceLocation = f"{-SLICE_MM * (index - 1):.2f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLS
    ds.PixelSpacing = ["0.9765625", "0.9765625"]
    ds.BitsAllocated = 16
    # Random bytes use all 16 bits, so say so: a 12-bit claim would make the pixels invalid.
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = pixels
    return ds


def _pixels(index: int) -> bytes:
    # One generator per slice keeps each file independent of how many came before it.
    return random.Random(f"{SEED}:pixels:{index}").randbytes(ROWS * COLS * 2)


def write_instance(path: Path, index: int) -> FileEntry:
    ds = _ct_dataset(index, _pixels(index))
    tmp = path.with_suffix(".tmp")
    dcmwrite(tmp, ds, enforce_file_format=True)
    tmp.replace(path)  # atomic, so an interrupted run never leaves a short file behind
    return FileEntry(path.parent.name + "/" + path.name, path.stat().st_size, sha256_file(path))


def write_large(path: Path, size: int) -> FileEntry:
    rng = random.Random(f"{SEED}:large")
    digest = hashlib.sha256()
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        left = size
        while left:
            chunk = rng.randbytes(min(CHUNK, left))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    tmp.replace(path)
    return FileEntry(path.name, size, digest.hexdigest())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def instance_name(index: int) -> str:
    return f"IM{index:06d}.dcm"


def _intact(outdir: Path, entries: list[FileEntry]) -> bool:
    return all((outdir / e.name).is_file() and (outdir / e.name).stat().st_size == e.size for e in entries)


def _same_recipe(manifest: Manifest) -> bool:
    return manifest.seed == SEED and manifest.generator == GENERATOR


def _current(outdir: Path, instances: int, large_size: int) -> Manifest | None:
    """The manifest, if it describes exactly these parameters and the files are all there."""
    path = outdir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = Manifest.load(path)
    except (ValueError, KeyError, TypeError):
        return None
    if not _same_recipe(manifest) or (manifest.instances, manifest.large_size) != (instances, large_size):
        return None
    if not _intact(outdir, [*manifest.study, manifest.large]):
        return None
    return manifest


def _study(outdir: Path, instances: int, previous: Manifest | None, log: bool) -> list[FileEntry]:
    study_dir = outdir / "study"
    study_dir.mkdir(parents=True, exist_ok=True)
    # Instances are independent of N, so files already described by an older manifest are reused.
    known = {e.name: e for e in previous.study} if previous and _same_recipe(previous) else {}
    wanted = {instance_name(i) for i in range(1, instances + 1)}
    for stale in study_dir.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    entries = []
    for i in range(1, instances + 1):
        path = study_dir / instance_name(i)
        old = known.get(f"study/{path.name}")
        if old and _intact(outdir, [old]):
            entries.append(old)
            continue
        entries.append(write_instance(path, i))
        if log and i % 100 == 0:
            print(f"  {i}/{instances} instances", file=sys.stderr)
    return entries


def _large(outdir: Path, size: int, previous: Manifest | None) -> FileEntry:
    if (
        previous
        and _same_recipe(previous)
        and previous.large.size == size
        and _intact(outdir, [previous.large])
    ):
        return previous.large
    return write_large(outdir / "large.bin", size)


def _previous(outdir: Path) -> Manifest | None:
    try:
        return Manifest.load(outdir / MANIFEST)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure(outdir: Path, instances: int = 400, large_size: int = 1 << 30, log: bool = True) -> Manifest:
    """Generate what is missing under outdir and return the manifest."""
    outdir.mkdir(parents=True, exist_ok=True)
    manifest = _current(outdir, instances, large_size)
    if manifest:
        if log:
            print(f"generate: {outdir} is up to date", file=sys.stderr)
        return manifest
    previous = _previous(outdir)
    if log:
        print(f"generate: {instances} CT instances and {large_size} bytes into {outdir}", file=sys.stderr)
    manifest = Manifest(
        seed=SEED,
        generator=GENERATOR,
        instances=instances,
        large_size=large_size,
        study=_study(outdir, instances, previous, log),
        large=_large(outdir, large_size, previous),
    )
    manifest.save(outdir / MANIFEST)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--instances", type=int, default=400, help="CT slices in the study (default 400)")
    parser.add_argument(
        "--large-size", type=parse_size, default=1 << 30, help="size of large.bin: 1073741824, 200MB, 1GiB"
    )
    args = parser.parse_args(argv)
    if args.instances < 1 or args.large_size < 1:
        parser.error("--instances and --large-size must be positive")
    manifest = ensure(args.outdir, args.instances, args.large_size)
    print(
        f"{len(manifest.study)} instances ({manifest.study_bytes} bytes), "
        f"large.bin {manifest.large.size} bytes, in {args.outdir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
