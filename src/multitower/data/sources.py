"""Where data sets come from: the official CIFAR-10 download, an import of an
ImageFolder tree, or generated (synthetic) data.

All three build the data set in a sibling staging folder (OUT.partial-<pid>-*)
and rename it to OUT only once it is complete and validated, so an interrupted
run never leaves something at OUT that later opens as a data set. The staging
folder is removed on any failure, Ctrl-C included; nothing else is deleted.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from multitower import __version__
from multitower.data.records import (
    CIFAR10, MANIFEST_NAME, RECORDS_PER_FILE, Dataset, RecordFormat, open_dataset, write_records,
)
from multitower.errors import UserError
from multitower.progress import PlainLines, progress as progress_bar

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"

# 1 MiB reads: ~163 per 163 MB archive, few enough that the progress bar costs nothing.
_DOWNLOAD_CHUNK = 1 << 20
# The official archive holds exactly these files; anything else in it is skipped,
# so a hostile archive cannot overwrite our own files (manifest, the archive itself).
_ARCHIVE_FOLDER = "cifar-10-batches-bin"
_ARCHIVE_FILES = re.compile(r"(data_batch_\d+|test_batch)\.bin|batches\.meta\.txt|readme\.html")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp"})
# 256 images per task: ~200 tasks for 50,000 images keeps both workers busy to the
# end while the per-task overhead (a 0.8 MB pickle) stays under 1% of decode time.
_DECODE_CHUNK = 256


# --- common: the output folder and its staging twin -------------------------------------

def _check_out(out) -> Path:
    """`out` as a Path, refusing anything that would overwrite user data."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose another --out or remove it")
    return out


def _build(out, build) -> Dataset:
    """Run `build(staging)` in a fresh folder next to `out`, validate, rename it to `out`."""
    out = _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        # mkdtemp makes the folder 0700; a data set is meant to be shared like any other folder.
        os.chmod(staging, 0o755)
        build(staging)
        open_dataset(staging)
        try:
            # rename(2) replaces an empty directory but refuses a non-empty one,
            # so data that appeared at `out` meanwhile is never overwritten.
            os.replace(staging, out)
        except OSError as error:
            raise UserError(f"cannot move the finished data set to {out} ({error.strerror}); "
                            "choose another --out or remove it") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return open_dataset(out)


def _write_manifest(root: Path, source: str, generated: bool = False, image_shape=(3, 32, 32), **details) -> None:
    """Write multitower.json, taking the split sizes from the record files themselves."""
    shape = {"image_shape": list(image_shape)}
    # A first manifest, for open_dataset's size checks: the layout's format and the shape.
    (root / MANIFEST_NAME).write_text(json.dumps({"format": "cifar10", **shape}), encoding="utf-8")
    dataset = open_dataset(root)
    manifest = {
        "format": dataset.fmt.name,
        "source": source,
        "generated": generated,
        "splits": {name: len(dataset.split(name)) for name in dataset.splits},
        "num_classes": dataset.fmt.num_classes,
        "class_names": dataset.class_names,
        **shape,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "multitower_version": __version__,
        **details,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _write_class_names(root: Path, class_names: list[str]) -> None:
    (root / "batches.meta.txt").write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")


def _write_train_files(root: Path, images: np.ndarray, labels: np.ndarray, fmt: RecordFormat) -> None:
    """data_batch_1.bin, data_batch_2.bin, ...: 10,000 records each, like the official set."""
    for number, start in enumerate(range(0, len(labels), RECORDS_PER_FILE), start=1):
        stop = start + RECORDS_PER_FILE
        write_records(root / f"data_batch_{number}.bin", images[start:stop], labels[start:stop], fmt)


def _check_count(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise UserError(f"--{name} must be a whole number >= {least}, got {value!r}")


def _progress(progress: str | bool, total: int | None = None, **options) -> tqdm | PlainLines:
    """A bar on a terminal, a few plain lines in a log (multitower.progress); True/False = on/off."""
    return progress_bar(progress, total=total, **options)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- download -----------------------------------------------------------------------------

def download_cifar10(out, url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5,
                     progress: str | bool = "auto") -> Dataset:
    """Download the official CIFAR-10 binary archive, check its MD5, unpack it into `out`.

    `url` may also be a file:// URL or a local path to an archive fetched by hand.
    `md5=None` skips the check (for mirrors that repackage the archive). `progress`, here and
    in the other sources: auto (a bar on a terminal, a few plain lines otherwise), on, off.
    """
    if "://" not in url and Path(url).expanduser().exists():
        url = Path(url).expanduser().absolute().as_uri()

    def build(staging: Path) -> None:
        archive = staging / "cifar-10-binary.tar.gz"
        _fetch(url, archive, md5, progress)
        _extract_cifar10(archive, staging, url, progress)
        archive.unlink()
        try:
            _write_manifest(staging, "download", url=url, md5=md5)
        except UserError as error:
            raise UserError(f"the archive from {url} holds corrupt data: {error}") from None

    return _build(out, build)


def _fetch(url: str, target: Path, md5: str | None, progress: str | bool) -> None:
    """Stream `url` to `target` in 1 MiB chunks, checking length and MD5."""
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except urllib.error.HTTPError as error:
        error.close()
        raise UserError(f"download of {url} failed: HTTP {error.code} {error.reason}; check the URL") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise UserError(f"cannot download {url}: {_one_line(reason)}; check the network and the URL, "
                        "or fetch the archive by hand and pass its path as the URL") from None
    digest = hashlib.md5()
    received = 0
    with response, open(target, "wb") as stream:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        with _progress(progress, total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                       desc="download") as bar:
            while True:
                try:
                    chunk = response.read(_DOWNLOAD_CHUNK)
                except (http.client.HTTPException, OSError) as error:
                    raise UserError(f"download of {url} broke off after {received} bytes "
                                    f"({_one_line(error)}); try again") from None
                if not chunk:
                    break
                digest.update(chunk)
                stream.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        raise UserError(f"download of {url} ended after {received} of {expected} bytes; try again")
    if md5 and digest.hexdigest() != md5.lower():
        raise UserError(f"download of {url} has MD5 {digest.hexdigest()}, expected {md5}; "
                        "the file is corrupt or not the CIFAR-10 binary archive, try again")


def _extract_cifar10(archive: Path, staging: Path, url: str, progress: str | bool) -> None:
    """Copy the record files out of cifar-10-batches-bin/ into `staging`, flat.

    Reads members through extractfile() and never tarfile's extract(): absolute
    names, '..' and links are refused outright, other files skipped.
    """
    found = 0
    try:
        with tarfile.open(archive, "r:*") as tar, _progress(progress, unit="file", desc="extract") as bar:
            for member in tar:
                parts = [part for part in PurePosixPath(member.name).parts if part != "."]
                if member.name.startswith(("/", "\\")) or ".." in parts:
                    raise UserError(f"archive from {url} holds an unsafe path {member.name!r}; refusing to unpack it")
                if member.issym() or member.islnk():
                    raise UserError(f"archive from {url} holds a link {member.name!r}; refusing to unpack it")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise UserError(f"archive from {url} holds a special file {member.name!r}; refusing to unpack it")
                if len(parts) != 2 or parts[0] != _ARCHIVE_FOLDER or not _ARCHIVE_FILES.fullmatch(parts[1]):
                    continue
                with tar.extractfile(member) as source, open(staging / parts[1], "wb") as target:
                    shutil.copyfileobj(source, target, _DOWNLOAD_CHUNK)
                found += parts[1].startswith("data_batch_")
                bar.update(1)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise UserError(f"download of {url} is not a valid .tar.gz ({_one_line(error)}); try again") from None
    if not found:
        raise UserError(f"archive from {url} has no {_ARCHIVE_FOLDER}/data_batch_*.bin; "
                        "is it the CIFAR-10 *binary* version?")


# --- ImageFolder import ---------------------------------------------------------------------

def import_imagefolder(src, out, val: int = 5000, seed: int = 0, progress: str | bool = "auto",
                       workers: int | None = None, size: tuple[int, int] | None = None) -> Dataset:
    """Import an ImageFolder tree `src/<class>/<image>` as a data set in CIFAR-10's record layout.

    Classes are the sorted sub-folder names (label 0 = first). Images are read in
    sorted path order and converted to RGB at their own resolution, which must then be
    the same for all; `size` (height, width) resizes every image to it (bicubic)
    instead. Decoding runs in `workers` processes (default: all CPUs). A seeded permutation
    (numpy default_rng(seed)) of all images puts its first `val` in val_batch.bin
    and the rest, still in permuted order, in data_batch_1..k.bin: each train file
    is then a shuffled mix of classes, like the official ones, rather than
    airplanes first. val=0 writes no validation split.
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise UserError(f"image folder {src} does not exist or is not a directory")
    _check_count("val", val, least=0)
    _check_count("seed", seed, least=0)
    class_names, paths, labels = _scan_imagefolder(src)
    if val >= len(paths):
        raise UserError(f"--val {val} must be smaller than the {len(paths)} images in {src}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    _check_out(out)  # before reading every image, not after
    height, width = size if size is not None else _common_size(src, paths)
    fmt = RecordFormat("cifar10", label_bytes=1, label_index=0, num_classes=len(class_names),
                       image_shape=(3, height, width))

    def build(staging: Path) -> None:
        images = _decode_all(paths, workers, progress, (height, width))
        order = np.random.default_rng(seed).permutation(len(paths))
        val_ids, train_ids = order[:val], order[val:]
        _write_train_files(staging, images[train_ids], labels[train_ids], fmt)
        if val:
            write_records(staging / "val_batch.bin", images[val_ids], labels[val_ids], fmt)
        _write_class_names(staging, class_names)
        _write_manifest(staging, "imagefolder", image_shape=fmt.image_shape, source_dir=str(src.absolute()),
                        seed=seed, val=val, images=len(paths), resized=size is not None)

    return _build(out, build)


def _scan_imagefolder(src: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Sorted class folders and, per class, its image files in sorted path order."""
    class_names = sorted(entry.name for entry in src.iterdir()
                         if entry.is_dir() and not entry.name.startswith("."))
    if len(class_names) < 2:
        raise UserError(f"{src} needs at least 2 class sub-folders (src/<class>/<image>), "
                        f"found {len(class_names)}")
    if len(class_names) > 256:
        raise UserError(f"{src} has {len(class_names)} class folders; the record format holds at most 256")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(str(p) for p in (src / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
        if not files:
            raise UserError(f"class folder {src / name} holds no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove the folder")
        paths += files
        labels += [label] * len(files)
    return class_names, paths, np.asarray(labels, dtype=np.int64)


def _common_size(src: Path, paths: list[str]) -> tuple[int, int]:
    """(height, width) that every image has (read from the headers); a one-line
    UserError naming two that differ otherwise: resizing is only done when asked."""
    sizes: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Exception as error:  # noqa: BLE001 - Pillow raises many types for corrupt files
            raise UserError(f"{path}: cannot read it as an image ({_one_line(error)}); fix or remove it") from None
        sizes.setdefault((height, width), path)
        if len(sizes) > 1:
            (a, first), (b, second) = sizes.items()
            raise UserError(f"images in {src} differ in size ({a[0]}x{a[1]} {first}, {b[0]}x{b[1]} {second}): "
                            f"pass --size HxW to resize them all (e.g. --size {a[0]}x{a[1]})")
    return next(iter(sizes))


def _decode_all(paths: list[str], workers: int, progress: str | bool, size: tuple[int, int]) -> np.ndarray:
    """Decode every image into uint8 [N, 3, height, width], in `paths` order."""
    images = np.empty((len(paths), 3, *size), dtype=np.uint8)
    jobs = [(start, paths[start:start + _DECODE_CHUNK], size) for start in range(0, len(paths), _DECODE_CHUNK)]
    with _progress(progress, total=len(paths), unit="img", desc="decode") as bar:
        if workers == 1 or len(jobs) == 1:
            results = map(_decode_chunk, jobs)
            _collect(results, images, bar)
        else:
            with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
                # Unordered for throughput; each result carries its start index,
                # so the output order is still that of `paths`.
                _collect(pool.imap_unordered(_decode_chunk, jobs), images, bar)
    return images


def _collect(results, images: np.ndarray, bar: tqdm | PlainLines) -> None:
    for start, block, failure in results:
        if failure:
            raise UserError(failure)
        images[start:start + len(block)] = block
        bar.update(len(block))


def _decode_chunk(job: tuple[int, list[str], tuple[int, int]]):
    """Worker: (start, block, None) on success, (start, None, message) on the first bad file."""
    start, paths, size = job
    block = np.empty((len(paths), 3, *size), dtype=np.uint8)
    for position, path in enumerate(paths):
        try:
            block[position] = _decode_image(path, size)
        except Exception as error:  # noqa: BLE001 - Pillow raises many types for corrupt files
            return start, None, f"{path}: cannot read it as an image ({_one_line(error)}); fix or remove it"
    return start, block, None


def _decode_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """uint8 [3, height, width]: the image in RGB, resized (bicubic) only if not that size."""
    height, width = size
    with Image.open(path) as image:
        # For big JPEGs, decode at 1/2..1/8 scale (in the DCT): 10x faster on
        # photos, and the bicubic resize below still sets the final pixels.
        image.draft("RGB", (width, height))
        image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image).transpose(2, 0, 1)


# --- generated data -------------------------------------------------------------------------

# Each class is a (colour, pattern) pair. Every colour is shared by 2 classes and
# every pattern by 2, so neither alone gives more than 50%: a model must see both.
_HUES = {"red": 0.0, "yellow": 60.0, "green": 130.0, "blue": 220.0, "magenta": 300.0}
_PATTERNS = ("vertical", "horizontal", "diagonal", "checker", "rings")
_SYNTHETIC_CLASSES = [(list(_HUES)[c % 5], _PATTERNS[c // 2]) for c in range(10)]
SYNTHETIC_CLASS_NAMES = [f"{hue}-{pattern}" for hue, pattern in _SYNTHETIC_CLASSES]
# Images per vectorised step: ~8 float32 arrays of 2,000 x 32 x 32 = 8 MB each.
_SYNTHETIC_CHUNK = 2000


def make_synthetic(out, train: int = 20000, val: int = 2000, seed: int = 0,
                   progress: str | bool = False, size: int = 32) -> Dataset:
    """Generate a learnable 10-class data set in CIFAR-10 format (for runs without real data).

    A class is a colour and a pattern (stripes of three orientations, checker,
    rings) drawn inside a randomly placed window over a random background, with
    random period, phase, angle, amplitude and pixel noise. Every pattern looks
    the same left-right flipped (diagonals take either direction) and survives a
    24x24 crop, so the tutorial's distortions keep the label. Train and val come
    from independent streams of `seed`: changing `val` leaves the train set as is.
    `size`: the images' height and width in pixels (CIFAR's 32; the geometry scales with it).
    """
    _check_count("train", train, least=1)
    _check_count("size", size, least=8)
    fmt = dataclasses.replace(CIFAR10, image_shape=(3, size, size))
    _check_count("val", val, least=0)
    _check_count("seed", seed, least=0)
    train_stream, val_stream = np.random.SeedSequence(seed).spawn(2)

    def build(staging: Path) -> None:
        with _progress(progress, total=train + val, unit="img", desc="generate") as bar:
            images, labels = synthesize(train, np.random.default_rng(train_stream), bar, size)
            _write_train_files(staging, images, labels, fmt)
            if val:
                images, labels = synthesize(val, np.random.default_rng(val_stream), bar, size)
                write_records(staging / "val_batch.bin", images, labels, fmt)
        _write_class_names(staging, SYNTHETIC_CLASS_NAMES)
        _write_manifest(staging, "generated", generated=True, image_shape=fmt.image_shape, seed=seed,
                        generator="multitower-synthetic-v1")

    return _build(out, build)


def synthesize(count: int, rng: np.random.Generator, bar: tqdm | PlainLines | None = None, size: int = 32):
    """`count` generated images and labels: (uint8 [N, 3, size, size], int64 [N]), classes balanced."""
    labels = rng.permutation(np.arange(count) % len(_SYNTHETIC_CLASSES)).astype(np.int64)
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    for start in range(0, count, _SYNTHETIC_CHUNK):
        stop = min(start + _SYNTHETIC_CHUNK, count)
        images[start:stop] = _draw(labels[start:stop], rng, size)
        if bar is not None:
            bar.update(stop - start)
    return images, labels


def _draw(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    n = len(labels)
    scale = np.float32(size / 32)  # the geometry below is in CIFAR's pixels
    hue = np.array([_HUES[h] for h, _ in _SYNTHETIC_CLASSES], np.float32)[labels]
    pattern = np.array([_PATTERNS.index(p) for _, p in _SYNTHETIC_CLASSES])[labels]

    def per_image(low, high, size=None):
        shape = (n,) if size is None else (n, size)
        return rng.uniform(low, high, shape).astype(np.float32)

    # Geometry: stripes 4..10 px apart, angle +-10 degrees, centre +-5 px off the middle.
    period = per_image(4.0, 10.0)[:, None, None] * scale
    phase = per_image(0.0, 2 * np.pi, 2)
    angle = np.radians(per_image(-10.0, 10.0))
    angle += np.where(pattern == 1, np.pi / 2, 0.0).astype(np.float32)
    # Diagonals go either way, so a left-right flip maps the class onto itself.
    angle += np.where(pattern == 2, rng.choice([-1.0, 1.0], n) * np.pi / 4, 0.0).astype(np.float32)
    centre = (size - 1) / 2 + per_image(-5.0, 5.0, 2) * scale
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx = x[None] - centre[:, 0, None, None]
    dy = y[None] - centre[:, 1, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    along = dx * cos + dy * sin
    across = -dx * sin + dy * cos
    wave = 2 * np.pi / period
    stripes = np.sin(wave * along + phase[:, 0, None, None])
    checker = stripes * np.sin(wave * across + phase[:, 1, None, None])
    rings = np.sin(wave * np.hypot(dx, dy) + phase[:, 0, None, None])
    chosen = pattern[:, None, None]
    signal = np.where(chosen == 3, checker, np.where(chosen == 4, rings, stripes))
    # The pattern fills a square window 20..32 px wide, so a 24x24 crop of the
    # image keeps at least a 12x12 corner of it, and random position matters less.
    half = per_image(10.0, 16.0)[:, None, None] * scale
    window = (np.abs(dx) < half) & (np.abs(dy) < half)
    mix = window * (0.5 + 0.5 * per_image(0.6, 1.0)[:, None, None] * signal)

    foreground = _hsv_to_rgb(hue + per_image(-20.0, 20.0), per_image(0.6, 1.0), per_image(0.6, 1.0))
    background = per_image(0.0, 1.0, 3) * per_image(0.3, 0.9)[:, None]
    pixels = (background[:, :, None, None] * (1 - mix[:, None])
              + foreground[:, :, None, None] * mix[:, None])
    pixels += rng.normal(0.0, 0.06, pixels.shape).astype(np.float32)
    return np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8)


def _hsv_to_rgb(hue_degrees: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """[N] hue (degrees), saturation, value in 0..1 -> [N, 3] RGB in 0..1."""
    k = (np.array([5.0, 3.0, 1.0], np.float32)[None] + (hue_degrees % 360)[:, None] / 60.0) % 6
    ramp = np.clip(np.minimum(k, 4 - k), 0, 1)
    return value[:, None] * (1 - saturation[:, None] * ramp)
