"""The public API as a user's script calls it: a model and data of the user's own (not
CIFAR-10's size), their loss and optimizer; a resume that continues bitwise; the model
named by import path from the command line; one-line refusals."""

import json
import shutil

import pytest
import torch
from torch import nn

import multitower as mt
from helpers import multitower
from multitower.errors import UserError
from multitower.train.checkpoint import CheckpointDir

HEIGHT, WIDTH, CLASSES = 20, 28, 3


class Pairs(torch.utils.data.Dataset):
    """A map-style data set of (CHW uint8 tensor, label): class c brightens row band c."""

    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, CLASSES, (count,), generator=generator)
        self.images = torch.randint(0, 100, (count, 3, HEIGHT, WIDTH), generator=generator, dtype=torch.uint8)
        for i, label in enumerate(self.labels.tolist()):
            band = HEIGHT // CLASSES
            self.images[i, :, label * band:(label + 1) * band] += 120

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


def tiny_net(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(8 * 16, num_classes))


def data() -> "mt.ImageData":
    return mt.ImageData(train=Pairs(256, 0), val=Pairs(64, 1))


def fit(run_dir, steps, **settings):
    optimizer = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731 (one process: no pickling)
    return mt.fit(model=tiny_net, data=data(), loss=nn.functional.cross_entropy, optimizer=optimizer,
                  steps=steps, batch_size=32, run_dir=str(run_dir), summary_every=0, log_every=2,
                  checkpoint_every=4, progress="off", threads=1, **settings)


def newest_model(run_dir) -> dict:
    return CheckpointDir(run_dir / "checkpoints").load()["model"]


def test_own_model_data_loss_and_optimizer_train_at_their_own_size_and_resume_bitwise(tmp_path):
    straight = fit(tmp_path / "straight", 8)
    assert straight.step == 8
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["model"]["name"].endswith("test_api:tiny_net") and config["optim"]["recipe"] == "plain"
    # A crash after step 4's checkpoint: the same run, its index naming steps up to 4 only.
    shutil.copytree(tmp_path / "straight", tmp_path / "crashed")
    index = tmp_path / "crashed" / "checkpoints" / "index.json"
    body = json.loads(index.read_text())
    body["checkpoints"] = [entry for entry in body["checkpoints"] if entry["step"] <= 4]
    index.write_text(json.dumps(body))
    assert fit(tmp_path / "crashed", 8, resume=True).step == 8
    first, second = newest_model(tmp_path / "straight"), newest_model(tmp_path / "crashed")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    result = mt.evaluate(tmp_path / "straight", model=tiny_net, data=data(), device="cpu")
    assert result.step == 8 and 0.0 <= result.precision_at_1 <= 1.0


def test_a_model_named_by_file_path_trains_and_evaluates_from_the_command_line(synth_dir, tmp_path):
    model_file = tmp_path / "my_model.py"
    model_file.write_text("from torch import nn\n\n\ndef make(num_classes):\n"
                          "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2),\n"
                          "                         nn.Flatten(), nn.Linear(16, num_classes))\n")
    run_dir = tmp_path / "run"
    trained = multitower("train", "--data", synth_dir, "--run-dir", run_dir, "--model", f"{model_file}:make",
                         "--recipe", "plain", "--steps", 3, "--batch-size", 16, "--summary-every", "0",
                         "--progress", "off")
    assert trained.returncode == 0, trained.stderr
    evaluated = multitower("eval", run_dir, "--once", "--progress", "off")
    assert evaluated.returncode == 0 and "step 3: precision @ 1" in evaluated.stdout, evaluated.stderr


def test_a_setting_fit_does_not_have_is_one_line():
    with pytest.raises(UserError, match="fit\\(\\) has no setting 'batchsize'"):
        mt.fit(model=tiny_net, data=data(), batchsize=32)
