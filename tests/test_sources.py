"""Data-set sources: download (against a local HTTP server), ImageFolder import, generated data."""

import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multitower.data import sources
from multitower.data.records import open_dataset, write_records
from multitower.data.sources import download_cifar10, import_imagefolder, make_synthetic
from multitower.errors import UserError

REAL_TRAIN = Path("/work/shared/datasets/cifar10-jpeg/train")


def assert_nothing_left(parent: Path, out: Path):
    """`out` was not created and no staging folder survived next to it."""
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name]


# --- download -------------------------------------------------------------------------------

def official_tarball(folder: Path, batch_size=3, test_size=4, extra_members=()) -> bytes:
    """A miniature cifar-10-binary.tar.gz with the official structure."""
    rng = np.random.default_rng(0)
    members = {}
    for number in range(1, 6):
        write_records(folder / "r.bin", rng.integers(0, 256, (batch_size, 3, 32, 32), dtype=np.uint8),
                      rng.integers(0, 10, batch_size))
        members[f"data_batch_{number}.bin"] = (folder / "r.bin").read_bytes()
    write_records(folder / "r.bin", rng.integers(0, 256, (test_size, 3, 32, 32), dtype=np.uint8),
                  np.arange(test_size) % 10)
    members["test_batch.bin"] = (folder / "r.bin").read_bytes()
    (folder / "r.bin").unlink()
    members["batches.meta.txt"] = "".join(f"class{i}\n" for i in range(10)).encode() + b"\n"
    members["readme.html"] = b"<html></html>"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        directory = tarfile.TarInfo("cifar-10-batches-bin")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra_members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        kind, body = route
        self.send_response(200)
        # "truncated": promise more than is sent, then close (HTTP/1.0 closes after the reply).
        self.send_header("Content-Length", str(len(body) + (10_000 if kind == "truncated" else 0)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes = {}
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def tarball(tmp_path):
    folder = tmp_path / "build"
    folder.mkdir()
    data = official_tarball(folder)
    return data, hashlib.md5(data).hexdigest()


def test_download_success(server, tarball, tmp_path):
    data, md5 = tarball
    server.routes["/cifar.tar.gz"] = ("ok", data)
    out = tmp_path / "data" / "cifar10"
    dataset = download_cifar10(out, url=server.url + "/cifar.tar.gz", md5=md5, progress=False)
    assert dataset.root == out
    assert dataset.splits == ["train", "test"]
    assert len(dataset.split("train")) == 15 and len(dataset.split("test")) == 4
    assert dataset.class_names == [f"class{i}" for i in range(10)]
    assert dataset.manifest["source"] == "download" and dataset.generated is False
    assert dataset.manifest["md5"] == md5 and dataset.manifest["splits"] == {"train": 15, "test": 4}
    assert sorted(p.name for p in out.iterdir()) == [
        "batches.meta.txt", "data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
        "data_batch_5.bin", "multitower.json", "readme.html", "test_batch.bin"]
    assert_nothing_left(out.parent, out.parent / "absent")
    reopened = open_dataset(out)
    np.testing.assert_array_equal(reopened.split("test").labels, [0, 1, 2, 3])


def test_download_into_empty_directory_and_from_local_path(tarball, tmp_path):
    data, md5 = tarball
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(data)
    out = tmp_path / "empty"
    out.mkdir()
    dataset = download_cifar10(out, url=str(archive), md5=md5, progress=False)
    assert len(dataset.split("train")) == 15


def test_download_md5_mismatch_leaves_nothing(server, tarball, tmp_path):
    data, md5 = tarball
    server.routes["/cifar.tar.gz"] = ("ok", data)
    out = tmp_path / "cifar10"
    wrong = "0" * 32
    with pytest.raises(UserError) as excinfo:
        download_cifar10(out, url=server.url + "/cifar.tar.gz", md5=wrong, progress=False)
    message = str(excinfo.value)
    assert wrong in message and md5 in message and "\n" not in message
    assert_nothing_left(tmp_path, out)


def test_download_truncated_body(server, tarball, tmp_path):
    data, md5 = tarball
    server.routes["/cifar.tar.gz"] = ("truncated", data)
    out = tmp_path / "cifar10"
    with pytest.raises(UserError) as excinfo:
        download_cifar10(out, url=server.url + "/cifar.tar.gz", md5=md5, progress=False)
    assert "\n" not in str(excinfo.value) and "try again" in str(excinfo.value)
    assert_nothing_left(tmp_path, out)


def test_download_http_404(server, tmp_path):
    out = tmp_path / "cifar10"
    with pytest.raises(UserError) as excinfo:
        download_cifar10(out, url=server.url + "/missing.tar.gz", progress=False)
    assert "404" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert_nothing_left(tmp_path, out)


def test_download_connection_refused(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "cifar10"
    with pytest.raises(UserError) as excinfo:
        download_cifar10(out, url=f"http://127.0.0.1:{port}/x.tar.gz", progress=False)
    assert f"127.0.0.1:{port}" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert_nothing_left(tmp_path, out)


def _unsafe_members():
    escape = tarfile.TarInfo("cifar-10-batches-bin/../../escaped.txt")
    escape.size = 3
    link = tarfile.TarInfo("cifar-10-batches-bin/data_batch_9.bin")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return [("escape", [(escape, b"bad")]), ("link", [(link, None)])]


@pytest.mark.parametrize("kind, members", _unsafe_members(), ids=["dotdot", "symlink"])
def test_download_refuses_unsafe_archives(kind, members, tmp_path):
    folder = tmp_path / "build"
    folder.mkdir()
    data = official_tarball(folder, extra_members=members)
    (tmp_path / "archive.tar.gz").write_bytes(data)
    out = tmp_path / "deep" / "cifar10"
    with pytest.raises(UserError) as excinfo:
        download_cifar10(out, url=str(tmp_path / "archive.tar.gz"), md5=None, progress=False)
    assert "refusing" in str(excinfo.value)
    assert_nothing_left(out.parent, out)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_download_interrupted_leaves_nothing(monkeypatch, tarball, tmp_path):
    data, md5 = tarball
    (tmp_path / "archive.tar.gz").write_bytes(data)

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_extract_cifar10", interrupt)
    out = tmp_path / "cifar10"
    with pytest.raises(KeyboardInterrupt):
        download_cifar10(out, url=str(tmp_path / "archive.tar.gz"), md5=md5, progress=False)
    assert_nothing_left(tmp_path, out)


def test_existing_output_is_never_touched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for build in (lambda: make_synthetic(out, train=10, val=0),
                  lambda: download_cifar10(out, url="http://127.0.0.1:1/x", progress=False)):
        with pytest.raises(UserError) as excinfo:
            build()
        assert "already exists" in str(excinfo.value) and str(out) in str(excinfo.value)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


# --- ImageFolder import ---------------------------------------------------------------------

def make_imagefolder(root: Path, per_class=6):
    """3 classes of PNG/JPEG images (one 40x30, one greyscale), plus a non-image file.

    Returns {path: RGB uint8 [32, 32, 3]} for the PNGs that must survive exactly.
    """
    rng = np.random.default_rng(1)
    exact = {}
    for name in ("dog", "ant", "cat"):  # sorted: ant=0, cat=1, dog=2
        (root / name).mkdir(parents=True)
        for number in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            if number % 2:
                Image.fromarray(pixels).save(root / name / f"{number:02d}.jpg", quality=90)
            else:
                Image.fromarray(pixels).save(root / name / f"{number:02d}.png")
                exact[str(root / name / f"{number:02d}.png")] = pixels
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "cat" / "wide.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(root / "dog" / "grey.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    return exact


def sorted_images(root: Path):
    return sorted(str(p) for p in root.rglob("*") if p.suffix in (".png", ".jpg"))


def test_import_counts_labels_order_and_exact_pixels(tmp_path):
    src = tmp_path / "src"
    exact = make_imagefolder(src)
    out = tmp_path / "out"
    dataset = import_imagefolder(src, out, val=0, seed=3, progress=False, workers=1, size=(32, 32))
    assert dataset.class_names == ["ant", "cat", "dog"]
    assert dataset.fmt.num_classes == 3
    assert dataset.splits == ["train"] and not (out / "val_batch.bin").exists()
    assert dataset.manifest["source"] == "imagefolder" and dataset.manifest["seed"] == 3
    paths = sorted_images(src)
    train = dataset.split("train")
    assert len(train) == len(paths) == 20
    np.testing.assert_array_equal(np.bincount(train.labels), [6, 7, 7])

    # Documented order: record i is sorted path number permutation[i].
    permutation = np.random.default_rng(3).permutation(len(paths))
    images, labels = train.gather(np.arange(len(train)))
    for record, source in enumerate(permutation):
        path = paths[source]
        assert dataset.class_names[labels[record]] == Path(path).parent.name
        if path in exact:
            np.testing.assert_array_equal(images[record].numpy().transpose(1, 2, 0), exact[path])
        if path.endswith("wide.png"):
            expected = Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
            np.testing.assert_array_equal(images[record].numpy().transpose(1, 2, 0), np.asarray(expected))
        if path.endswith("grey.png"):
            plane = images[record].numpy()
            assert (plane[0] == plane[1]).all() and (plane[1] == plane[2]).all()


def test_images_of_another_resolution_keep_it_and_mixed_sizes_need_a_size(tmp_path):
    """A folder of 96x128 images imports at 96x128, never squashed to 32x32 unasked;
    images of different sizes are refused in one line that names two of them."""
    src = tmp_path / "wide"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        for number in range(3):
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(src / name / f"{number}.png")
    dataset = import_imagefolder(src, tmp_path / "out", val=2, progress=False, workers=1)
    assert dataset.image_shape == (3, 96, 128) and dataset.manifest["image_shape"] == [3, 96, 128]
    images, _ = dataset.split("train").gather(np.arange(4))
    assert tuple(images.shape) == (4, 3, 96, 128)
    mixed = tmp_path / "src"
    make_imagefolder(mixed)
    with pytest.raises(UserError, match=r"differ in size \(32x32 .*, 30x40 .*wide.png\): pass --size HxW"):
        import_imagefolder(mixed, tmp_path / "refused", val=0, progress=False, workers=1)
    assert not (tmp_path / "refused").exists()
    smaller = import_imagefolder(mixed, tmp_path / "small", val=0, progress=False, workers=1, size=(16, 24))
    assert smaller.image_shape == (3, 16, 24) and smaller.manifest["resized"] is True


def test_import_validation_split_is_seeded(tmp_path):
    src = tmp_path / "src"
    make_imagefolder(src)

    def val_images(seed, name):
        dataset = import_imagefolder(src, tmp_path / name, val=5, seed=seed, progress=False, workers=1, size=(32, 32))
        assert (len(dataset.split("train")), len(dataset.split("val"))) == (15, 5)
        assert dataset.manifest["splits"] == {"train": 15, "val": 5}
        return dataset.split("val").gather(np.arange(5))[0].numpy()

    first, again, other = val_images(0, "a"), val_images(0, "b"), val_images(1, "c")
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_import_in_parallel_matches_serial(monkeypatch, tmp_path):
    src = tmp_path / "src"
    make_imagefolder(src)
    monkeypatch.setattr(sources, "_DECODE_CHUNK", 3)  # 7 chunks over 2 worker processes
    serial = import_imagefolder(src, tmp_path / "serial", val=4, progress=False, workers=1, size=(32, 32))
    parallel = import_imagefolder(src, tmp_path / "parallel", val=4, progress=False, workers=2, size=(32, 32))
    for split in ("train", "val"):
        indices = np.arange(len(serial.split(split)))
        np.testing.assert_array_equal(serial.split(split).gather(indices)[0].numpy(),
                                      parallel.split(split).gather(indices)[0].numpy())
        np.testing.assert_array_equal(serial.split(split).labels, parallel.split(split).labels)


@pytest.mark.parametrize("workers", [1, 2])
def test_import_corrupt_image_names_it(monkeypatch, tmp_path, workers):
    src = tmp_path / "src"
    make_imagefolder(src)
    (src / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    monkeypatch.setattr(sources, "_DECODE_CHUNK", 4)
    out = tmp_path / "out"
    with pytest.raises(UserError) as excinfo:
        import_imagefolder(src, out, val=2, progress=False, workers=workers, size=(32, 32))  # decode's check
    assert str(src / "cat" / "broken.jpg") in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert_nothing_left(tmp_path, out)


def test_import_argument_errors(tmp_path):
    src = tmp_path / "src"
    make_imagefolder(src)
    with pytest.raises(UserError) as excinfo:
        import_imagefolder(src, tmp_path / "out", val=20, progress=False)
    assert "20" in str(excinfo.value)
    with pytest.raises(UserError):
        import_imagefolder(src, tmp_path / "out", val=-1, progress=False)
    with pytest.raises(UserError):
        import_imagefolder(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (src / "empty-class").mkdir()
    with pytest.raises(UserError) as excinfo:
        import_imagefolder(src, tmp_path / "out", val=0, progress=False)
    assert "empty-class" in str(excinfo.value)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("")
    (src / "empty-class").rmdir()
    with pytest.raises(UserError) as excinfo:
        import_imagefolder(src, out, val=0, progress=False)
    assert "already exists" in str(excinfo.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not REAL_TRAIN.is_dir(), reason="real CIFAR-10 JPEGs not available")
def test_import_real_subset(tmp_path):
    src = tmp_path / "subset"
    for class_dir in sorted(REAL_TRAIN.iterdir()):
        (src / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:20]:
            (src / class_dir.name / image.name).symlink_to(image)  # no copies of the data
    dataset = import_imagefolder(src, tmp_path / "out", val=50, progress=False, workers=2)
    assert dataset.class_names[:3] == ["airplane", "automobile", "bird"]
    assert (len(dataset.split("train")), len(dataset.split("val"))) == (150, 50)
    labels = np.concatenate([dataset.split("train").labels, dataset.split("val").labels])
    np.testing.assert_array_equal(np.bincount(labels), [20] * 10)
    first = sorted((REAL_TRAIN / "airplane").iterdir())[0]
    expected = np.asarray(Image.open(first).convert("RGB")).transpose(2, 0, 1)
    images, _ = dataset.split("train").gather(np.arange(150))
    val_images, _ = dataset.split("val").gather(np.arange(50))
    every = np.concatenate([images.numpy(), val_images.numpy()])
    assert (every == expected).all(axis=(1, 2, 3)).any()


# --- generated data -------------------------------------------------------------------------

def test_synthetic_is_deterministic_balanced_and_marked(tmp_path):
    first = make_synthetic(tmp_path / "a", train=300, val=50, seed=5)
    assert first.generated is True
    assert first.manifest["source"] == "generated" and first.manifest["generated"] is True
    assert first.manifest["splits"] == {"train": 300, "val": 50}
    assert len(first.class_names) == 10 and len(set(first.class_names)) == 10
    np.testing.assert_array_equal(np.bincount(first.split("train").labels), [30] * 10)
    np.testing.assert_array_equal(np.bincount(first.split("val").labels), [5] * 10)

    make_synthetic(tmp_path / "b", train=300, val=50, seed=5)
    make_synthetic(tmp_path / "c", train=300, val=50, seed=6)
    for name in ("data_batch_1.bin", "val_batch.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    # The train set does not depend on the size of the validation split.
    make_synthetic(tmp_path / "d", train=300, val=10, seed=5)
    assert (tmp_path / "a" / "data_batch_1.bin").read_bytes() == (tmp_path / "d" / "data_batch_1.bin").read_bytes()


def test_synthetic_train_files_hold_10000_records(tmp_path):
    dataset = make_synthetic(tmp_path / "s", train=12000, val=0)
    assert [len(f) for f in dataset.split("train").files] == [10000, 2000]
    assert dataset.splits == ["train"]


def image_features(images: np.ndarray) -> np.ndarray:
    """Per image: standardised mean R, G, B and the mean |horizontal| and |vertical| gradients."""
    x = images.astype(np.float32)
    x = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / (x.std(axis=(1, 2, 3), keepdims=True) + 1)
    colour = x.mean(axis=(2, 3))
    across = np.abs(np.diff(x, axis=3)).mean(axis=(1, 2, 3))
    down = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))
    return np.column_stack([colour, across, down])


def test_synthetic_classes_have_structure(tmp_path):
    dataset = make_synthetic(tmp_path / "s", train=2000, val=500, seed=0)
    train, val = dataset.split("train"), dataset.split("val")
    train_features = image_features(train.gather(np.arange(len(train)))[0].numpy())
    val_features = image_features(val.gather(np.arange(len(val)))[0].numpy())
    centroids = np.stack([train_features[train.labels == c].mean(axis=0) for c in range(10)])
    distances = ((val_features[:, None] - centroids[None]) ** 2).sum(axis=2)
    accuracy = (distances.argmin(axis=1) == val.labels).mean()
    # Five numbers per image and a nearest-mean rule: ~28%. Chance is 10% and its
    # spread over 500 images 1.3%, so 20% cannot happen by luck.
    assert accuracy > 0.2, accuracy
    # Vertical stripes change along a row; horizontal ones down a column.
    vertical, horizontal = dataset.class_names.index("red-vertical"), dataset.class_names.index("green-horizontal")
    assert centroids[vertical, 3] > centroids[vertical, 4]
    assert centroids[horizontal, 4] > centroids[horizontal, 3]


def test_synthetic_argument_errors(tmp_path):
    for arguments in ({"train": 0}, {"val": -1}, {"train": 2.5}, {"seed": -1}):
        with pytest.raises(UserError):
            make_synthetic(tmp_path / "s", **arguments)
    assert not (tmp_path / "s").exists()


def _distort(images, generator):
    """The tutorial's training distortions: 24x24 crop, flip, brightness, contrast, standardise."""
    import torch

    count = images.shape[0]
    top = torch.randint(0, 9, (count,), generator=generator)
    left = torch.randint(0, 9, (count,), generator=generator)
    rows = (top[:, None] + torch.arange(24))[:, None, :, None].expand(count, 3, 24, 32)
    x = images.float().gather(2, rows)
    columns = (left[:, None] + torch.arange(24))[:, None, None, :].expand(count, 3, 24, 24)
    x = x.gather(3, columns)
    flip = torch.rand(count, generator=generator) < 0.5
    x[flip] = x[flip].flip(3)
    x = x + (torch.rand(count, 1, 1, 1, generator=generator) * 126 - 63)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * (torch.rand(count, 1, 1, 1, generator=generator) * 1.6 + 0.2) + mean
    return _standardise(x)


def _standardise(x):
    mean, std = x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / std.clamp(min=1 / np.sqrt(x[0].numel()))


@pytest.mark.slow
def test_synthetic_is_learnable_by_a_small_convnet(tmp_path):
    """300 SGD steps at batch 64 on distorted crops: ~85% held-out (chance 10%), 5-15 s on 2 cores."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    dataset = make_synthetic(tmp_path / "s", train=5000, val=2000, seed=0)
    train, val = dataset.split("train"), dataset.split("val")
    model = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 6 * 6, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for _ in range(300):
        images, labels = train.gather(rng.integers(0, len(train), 64))
        loss = nn.functional.cross_entropy(model(_distort(images, generator)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        images, labels = val.gather(np.arange(len(val)))
        centre = _standardise(images.float()[:, :, 4:28, 4:28])
        accuracy = (model(centre).argmax(dim=1) == labels).float().mean().item()
    assert accuracy > 0.7, accuracy
