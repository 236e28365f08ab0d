"""The fast path (--precision bf16/fp16, --channels-last, --compile) against the fp32
control on the CPU; precision_checks.py says what the control is and why the bounds are
what they are (test_cuda.py holds the GPU to the same ones)."""

from __future__ import annotations

import pytest
import torch

from multitower.config import Config, ParallelConfig
from multitower.data.loader import Batch
from multitower.errors import UserError
from multitower.train.build import check_config
from multitower.parallel.precision import FastPath
from multitower.parallel.single import Single
from precision_checks import (assert_curve_follows_fp32, assert_grads_follow_fp32, loss_curve,
                              one_batch_grads, relative_error)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randn(32, 3, 24, 24), torch.randint(0, 10, (32,))


def test_channels_last_is_the_same_function(batch):
    images, labels = batch
    logits32, m32, g32 = one_batch_grads("fp32", False, images, labels)
    logits_cl, m_cl, g_cl = one_batch_grads("fp32", True, images, labels)
    torch.testing.assert_close(logits_cl, logits32, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m_cl.loss, m32.loss, rtol=1e-5, atol=1e-6)
    for name in g32:
        torch.testing.assert_close(g_cl[name], g32[name], rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_logits_and_grads_follow_fp32(batch):
    images, labels = batch
    logits32, m32, g32 = one_batch_grads("fp32", False, images, labels)
    logits16, m16, g16 = one_batch_grads("bf16", False, images, labels)
    assert m16.loss.dtype == torch.float32 and m16.cross_entropy.dtype == torch.float32  # fp32 loss
    assert relative_error(logits16, logits32) < 0.02  # measured 0.4%
    assert abs(m16.cross_entropy.item() - m32.cross_entropy.item()) < 0.01
    assert_grads_follow_fp32(g16, g32, "bf16")


def test_fp16_with_loss_scaling_follows_fp32(batch):
    images, labels = batch
    logits32, m32, g32 = one_batch_grads("fp32", False, images, labels)
    logits16, m16, g16 = one_batch_grads("fp16", False, images, labels)
    assert m16.loss.dtype == torch.float32  # the loss in fp32
    assert relative_error(logits16, logits32) < 0.01  # fp16 keeps 11 mantissa bits to bf16's 8
    # The optimizer saw unscaled gradients: the scale (65,536) is divided out again.
    assert_grads_follow_fp32(g16, g32, "fp16")


def test_fp16_skips_an_overflowing_step_and_backs_off_the_scale():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    before = [p.detach().clone() for p in model.parameters()]

    def huge_loss(model, logits, labels):  # finite, but x 65,536 overflows fp16 gradients
        loss = torch.nn.functional.cross_entropy(logits.float(), labels) * 1e36
        return loss, loss.detach()

    strategy = Single(ParallelConfig(precision="fp16"), torch.device("cpu"), huge_loss)
    strategy.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    scale = strategy.fast.scaler.get_scale()
    strategy.step(Batch(images=torch.randn(8, 4), labels=torch.randint(0, 2, (8,)), step=0, epoch=0))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the step was skipped
    assert strategy.fast.scaler.get_scale() == scale / 2
    state = strategy.checkpoint_state({})
    assert state["grad_scaler"]["scale"] == scale / 2  # checkpoints keep it...
    fresh = Single(ParallelConfig(precision="fp16"), torch.device("cpu"), huge_loss)
    other = torch.nn.Linear(4, 2)
    fresh.wrap(other, torch.optim.SGD(other.parameters(), lr=0.1))
    fresh.load(state)
    assert fresh.fast.scaler.get_scale() == scale / 2  # ...and a resume continues from it


@pytest.mark.slow
def test_compiled_step_is_the_same_function(batch):
    """--compile default: the same logits, loss and gradients as eager, to float rounding (a
    compiled step takes ~1 min to compile on 2 cores, hence slow)."""
    from torch._dynamo.utils import counters  # dynamo's own tally of the graphs it compiled
    images, labels = batch
    logits32, m32, g32 = one_batch_grads("fp32", True, images, labels)
    torch._dynamo.reset()
    counters.clear()
    logits_c, m_c, g_c = one_batch_grads("fp32", True, images, labels, compile_mode="default")
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled: the comparison would be eager vs eager"
    torch.testing.assert_close(logits_c, logits32, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m_c.loss, m32.loss, rtol=1e-5, atol=1e-6)
    assert set(g_c) == set(g32)  # compiled in place: the same parameter names
    for name in g32:
        torch.testing.assert_close(g_c[name], g32[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("compile_mode, device, message", [
    ("fast", "cpu", "--compile must be one of off, default, max-autotune, reduce-overhead, got 'fast'"),
    ("reduce-overhead", "cpu", "--compile reduce-overhead records CUDA graphs: it needs a CUDA device, not cpu"),
])
def test_fast_path_rejects_bad_compile_modes(compile_mode, device, message):
    with pytest.raises(UserError, match=message):
        FastPath("fp32", False, torch.device(device), compile_mode)


@pytest.mark.parametrize("strategy", ["hogwild", "downpour", "pipeline"])
def test_strategies_that_do_not_compile_refuse_it(strategy):
    cfg = Config(parallel=ParallelConfig(strategy=strategy, workers=2, compile="default"))
    with pytest.raises(UserError, match=f"--strategy {strategy} cannot take --compile: it is not built to compile"):
        check_config(cfg)


def test_fast_path_rejects_unknown_precision():
    with pytest.raises(UserError, match="precision"):
        FastPath("fp8", False, torch.device("cpu"))
    cfg = Config(parallel=ParallelConfig(precision="fp8"))
    with pytest.raises(UserError, match="--precision"):
        cfg.validate()


@pytest.mark.slow
@pytest.mark.timeout(900)  # bf16 runs ~5x slower than fp32 on a CPU without bf16 kernels (AVX2)
@pytest.mark.parametrize("precision,channels_last", [("bf16", False), ("fp32", True)])
def test_loss_curve_follows_fp32(synth_dir, precision, channels_last):
    steps, batch_size = 150, 128  # the tutorial's batch: less gradient noise than 32
    control = loss_curve(synth_dir, "fp32", False, steps, batch_size)
    fast = loss_curve(synth_dir, precision, channels_last, steps, batch_size)
    assert_curve_follows_fp32(control, fast, f"{precision}/channels_last={channels_last}")


@pytest.mark.parametrize("flags, line", [
    ([], "fast path: fp32, channels_last, compile off, augmentation on the host"),
    (["--compile", "max-autotune", "--no-channels-last"], "fast path: fp32, NCHW, compile max-autotune, augmentation on the host"),
    (["--strategy", "hogwild", "--workers", "2"], "fast path: fp32, NCHW, compile off, augmentation on the host"),
])
def test_dry_run_shows_the_fast_path(capsys, synth_dir, tmp_path, flags, line):
    from multitower.cli import main
    assert main(["train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), "--dry-run", *flags]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == line


def test_cuda_graphs_on_a_cpu_fail_in_one_line_before_training(capsys, synth_dir, tmp_path):
    from multitower.cli import main
    code = main(["train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                 "--compile", "reduce-overhead"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["multitower: error: --compile reduce-overhead records CUDA graphs: it needs a "
                                 "CUDA device, not cpu"]
    assert not (tmp_path / "run").exists()
