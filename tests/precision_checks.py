"""The fast path against the fp32 control: helpers and bounds shared by the CPU tests
(test_fast_path.py) and the CUDA ones (test_cuda.py), so both devices meet the same bar.

Trusted control: the same Single strategy, same initial weights, same batches, in
plain fp32 NCHW. channels_last is the same arithmetic in another memory order, so
it must match to fp32 rounding; bf16 autocast rounds every conv/matmul input to 8
mantissa bits (relative 2**-9 ~ 0.2% per element), so it must match in direction
(cosine) and to a few percent in norm, and its loss curve must follow fp32's.
"""

from __future__ import annotations

import statistics

import torch

from helpers import build, config
from multitower.data.datasets import ImageData
from multitower.data.loader import Batch
from multitower.train.build import build_run


# What the builder needs to make a run without a data directory: 64 random CIFAR-sized
# images of the 10 classes (the steps under test get their batches from the test).
_RANDOM = torch.Generator().manual_seed(0)
PROBE_DATA = ImageData(train=[(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=_RANDOM), i % 10)
                              for i in range(64)], name="random images")


def single_step_of(precision: str, channels_last: bool, device: str = "cpu", lr: float = 0.1,
                   compile_mode: str = "off"):
    """cifar10-tf (seeded init) on `device` under the Single strategy with plain SGD at
    `lr`, as train builds it: (model, strategy), the strategy's step() the one under test."""
    cfg = config("", precision=precision, channels_last=channels_last, compile=compile_mode, device=device)
    run = build_run(cfg, data=PROBE_DATA)
    for group in run.optimizer.param_groups:  # lr 0 (one_batch_grads) is no training setting
        group["lr"] = lr
    return run.model, run.strategy


def one_batch_grads(precision: str, channels_last: bool, images, labels, device: str = "cpu",
                    compile_mode: str = "off"):
    """Logits, step metrics and fp32 parameter gradients of one step of cifar10-tf on `device`."""
    # lr=0: step() runs the whole path (autocast, backward, optimizer) but leaves the weights as they were.
    model, strategy = single_step_of(precision, channels_last, device, lr=0.0, compile_mode=compile_mode)
    images, labels = images.to(device), labels.to(device)
    with strategy.fast.autocast():
        logits = model(strategy.fast.images(images)).float()
    metrics = strategy.step(Batch(images=images, labels=labels, step=0, epoch=0))
    grads = {name: p.grad.detach().float().cpu().clone() for name, p in model.named_parameters()}
    return logits.detach().cpu(), metrics, grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# Per precision, the bounds on every parameter's gradient against fp32's on one batch:
# (largest relative error in norm, smallest cosine). At init on noise the weight
# gradients are sums with heavy cancellation, so the rounding shows. Measured on the
# CPU: bf16 0.2-16% relative error (conv1 worst, the logits 0.4%), cosine >= 0.987,
# i.e. the update points within ~9 degrees of fp32's; fp16 (11 mantissa bits, loss
# scaled) conv1 5.3%, the others less. The bounds leave ~1.5-2x room; the loss-curve
# checks show the effect over many steps.
GRAD_BOUNDS = {"bf16": (0.25, 0.98), "fp16": (0.1, 0.995)}


def assert_grads_follow_fp32(grads: dict, control: dict, precision: str) -> None:
    """Every gradient within GRAD_BOUNDS[precision] of the fp32 control's; the message
    lists every parameter's figures, not only the first one out of bounds."""
    max_error, min_cosine = GRAD_BOUNDS[precision]
    rows, bad = [], []
    for name, reference in control.items():
        assert grads[name].dtype == torch.float32, name  # fp32 master weights get fp32 grads
        error = relative_error(grads[name], reference)
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), reference.flatten(), dim=0).item()
        rows.append(f"{name}: relative error {error:.4f}, cosine {cosine:.5f}")
        if not (error < max_error and cosine > min_cosine):
            bad.append(name)
    assert not bad, f"{precision} gradients out of bounds ({max_error}, {min_cosine}) for {bad}:\n" + "\n".join(rows)


def loss_curve(data_dir, precision: str, channels_last: bool, steps: int, batch_size: int,
               device: str = "cpu") -> list[float]:
    """Cross-entropy of each of `steps` training steps of cifar10-tf at the tutorial's lr."""
    run = build(data_dir, precision=precision, channels_last=channels_last, device=device, lr=0.1,
                batch_size=batch_size)  # the tutorial's initial lr
    with run.batches() as batches:
        iterator = iter(batches)
        return [run.strategy.step(next(iterator)).cross_entropy.item() for _ in range(steps)]


# Tolerance on the mean of the paired differences fast - fp32 over the last steps.
# Both runs see the same batches, so pairing cancels how hard each batch is (the fp32
# curve's own spread over that window is ~0.2-0.4 nats, which made an unpaired
# comparison of window means flaky; channels_last's paired gap measured 0.04 nats).
# Rounding differences grow into somewhat different trajectories even for
# channels_last (same arithmetic, other summation order), hence a tolerance rather
# than equality; a run that has drifted off the fp32 trajectory (or diverged) shows a
# gap beyond it. 0.1 nats is 4% of ln(10) = 2.30.
CURVE_TOLERANCE = 0.1


def assert_curve_follows_fp32(control: list[float], fast: list[float], label: str, tail: int = 50) -> None:
    c, f = statistics.fmean(control[-tail:]), statistics.fmean(fast[-tail:])
    gaps = [a - b for a, b in zip(fast[-tail:], control[-tail:])]
    gap = statistics.fmean(gaps)
    assert c < control[0] - 0.3, f"the fp32 control did not learn: {control[0]:.3f} -> {c:.3f}"
    assert abs(gap) < CURVE_TOLERANCE, (
        f"{label}: last-{tail} mean CE {f:.4f} vs fp32 {c:.4f}, paired gap {gap:.4f} "
        f"(spread of the gaps {statistics.pstdev(gaps):.4f}, of fp32 {statistics.pstdev(control[-tail:]):.4f})")
