"""The network of TensorFlow's CIFAR-10 tutorial (tensorflow/models
tutorials/image/cifar10/cifar10.py): `inference` and `loss`, same function, same init.

conv1 -> pool1 -> norm1 -> conv2 -> norm2 -> pool2 -> local3 -> local4 -> softmax_linear

Cifar10TF.forward runs whichever of these children still exist, in order, so a
pipeline stage is the model with the children it does not own deleted. Parameters
are kept in PyTorch layouts (OIHW, [out, in]); local3 flattens in TF's NHWC order so
that a TF checkpoint's weights load unchanged through load_tensorflow_weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from multitower.errors import UserError
from multitower.losses import Loss, cross_entropy
from multitower.models.tf_ops import LRN, Conv2dSame, MaxPool2dSame, same_output_size, truncated_normal_

# The tutorial's L2 coefficient on local3 and local4 weights (wd=0.004).
WEIGHT_DECAY = 0.004

LAYER_NAMES = (
    "conv1",
    "pool1",
    "norm1",
    "conv2",
    "norm2",
    "pool2",
    "local3",
    "local4",
    "softmax_linear",
)


class ConvBeforeReLU(Conv2dSame):
    """conv1 / conv2: conv2d(x, kernel, SAME) + biases. The tutorial's ReLU on it is
    done by the next LRN (LRN(relu=True)): norm2 follows conv2, and pool1 between conv1
    and norm1 commutes with it (max(relu(a), relu(b)) = relu(max(a, b)), the same values
    and the same gradients), so the ReLU costs no pass over memory of its own, and
    layer 1's runs on pool1's quarter of the pixels. summary_activation gives the
    tutorial's conv1 / conv2 tensors for the activation summaries."""

    @staticmethod
    def summary_activation(output: torch.Tensor) -> torch.Tensor:
        return F.relu(output)


class Local(nn.Module):
    """A TF dense layer, x @ weights + biases, with optional ReLU and weight decay.

    `weight` is [out, in] (torch), the transpose of TF's [in, out]. With 4-D input
    (local3) it first flattens as TF does on NHWC, so TF's local3 weights apply as is.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        stddev: float,
        bias_init: float,
        weight_decay: float | None = None,
        relu: bool = True,
        hint: str = "",
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.stddev = stddev
        self.bias_init = bias_init
        self.weight_decay = weight_decay
        self.relu = relu
        self.hint = hint
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        truncated_normal_(self.weight, self.stddev)
        nn.init.constant_(self.bias, self.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1).flatten(1)  # NCHW -> NHWC order, as TF's reshape
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise UserError(
                f"dense layer expects {self.in_features} input features, got input of shape "
                f"{tuple(x.shape)}{self.hint}"
            )
        y = F.linear(x, self.weight, self.bias)
        return F.relu(y, inplace=True) if self.relu else y

    def extra_repr(self) -> str:
        wd = f", weight_decay={self.weight_decay}" if self.weight_decay else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}{wd}"


def _positive_int(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


class Cifar10TF(nn.Module):
    """cifar10.inference: float32 NCHW images [B, 3, image_size, image_size] -> logits.

    width multiplies the conv channels (64) and the local sizes (384, 192); width=1
    is the tutorial (1,068,298 parameters). image_size is the crop fed to the net
    (24 in the tutorial); it fixes local3's input size.
    """

    def __init__(self, num_classes: int = 10, width: int = 1, image_size: int = 24):
        super().__init__()
        num_classes = _positive_int(num_classes, "num_classes")
        width = _positive_int(width, "width")
        image_size = _positive_int(image_size, "image_size")
        self.num_classes = num_classes
        self.width = width
        self.image_size = image_size
        channels, dim3, dim4 = 64 * width, 384 * width, 192 * width
        side = same_output_size(same_output_size(image_size, 2), 2)
        lrn = dict(depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75)
        hint = f" (this model takes {image_size}x{image_size} images: image_size={image_size})"

        self.conv1 = ConvBeforeReLU(3, channels, 5, stddev=5e-2, bias_init=0.0)
        self.pool1 = MaxPool2dSame(3, 2)
        self.norm1 = LRN(**lrn, relu=True)  # conv1's ReLU, after pool1 (ConvBeforeReLU)
        self.conv2 = ConvBeforeReLU(channels, channels, 5, stddev=5e-2, bias_init=0.1)
        # Layer 2 normalises before pooling, unlike layer 1: the tutorial's order.
        self.norm2 = LRN(**lrn, relu=True)  # conv2's ReLU
        self.pool2 = MaxPool2dSame(3, 2)
        self.local3 = Local(side * side * channels, dim3, 0.04, 0.1, WEIGHT_DECAY, hint=hint)
        self.local4 = Local(dim3, dim4, 0.04, 0.1, WEIGHT_DECAY)
        # The tutorial's stddev is 1/192.0, i.e. 1/fan_in; it follows the width.
        self.softmax_linear = Local(dim4, num_classes, 1.0 / dim4, 0.0, None, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only the children that still exist: a pipeline stage deletes the others.
        for layer in self.children():
            x = layer(x)
        return x


def inference(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """cifar10.inference: the logits (model(images), named after the tutorial)."""
    return model(images)


def weight_decay_loss(model: nn.Module) -> torch.Tensor:
    """Sum of wd * tf.nn.l2_loss(w) = wd * sum(w**2) / 2 over the decayed layers
    (local3, local4) present in `model`; zero if it has none (e.g. a conv-only stage)."""
    total = None
    for module in model.modules():
        wd = getattr(module, "weight_decay", None)
        if isinstance(module, Local) and wd:
            term = wd * 0.5 * module.weight.float().pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def _tutorial_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return cross_entropy(logits, labels)  # (a named function: a Loss travels to spawned workers)


TOWER_LOSS = Loss(data=_tutorial_cross_entropy, parameters=weight_decay_loss)
"""cifar10.loss for one tower, split as multitower.losses.Loss: the mean sparse softmax
cross-entropy of the batch, plus weight_decay_loss of the layers present (the tutorial's
add_n over the 'losses' collection). Computed in float32 under autocast."""


def tower_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_loss, cross_entropy): TOWER_LOSS, by the tutorial's name."""
    return TOWER_LOSS(model, logits, labels)


def loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cifar10.loss: the total loss (cross-entropy + weight decay)."""
    return tower_loss(model, logits, labels)[0]


# --- TensorFlow checkpoint names and layouts --------------------------------------

def _tf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_children() if isinstance(m, (Conv2dSame, Local))]


def _to_tf(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    # OIHW -> HWIO for convs; [out, in] -> [in, out] for dense layers.
    return weight.permute(2, 3, 1, 0) if isinstance(module, Conv2dSame) else weight.t()


def _from_tf(module: nn.Module, array: torch.Tensor) -> torch.Tensor:
    return array.permute(3, 2, 0, 1) if isinstance(module, Conv2dSame) else array.t()


def tensorflow_weight_names(model: nn.Module) -> dict[str, str]:
    """{torch state_dict key: TF variable name}, e.g. 'conv1.weight': 'conv1/weights',
    for the layers present in `model`."""
    names = {}
    for name, _ in _tf_layers(model):
        names[f"{name}.weight"] = f"{name}/weights"
        names[f"{name}.bias"] = f"{name}/biases"
    return names


def tensorflow_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as TF variables: names and layouts (HWIO, [in, out])."""
    out = {}
    for name, module in _tf_layers(model):
        out[f"{name}/weights"] = _to_tf(module, module.weight.detach()).float().cpu().numpy().copy()
        out[f"{name}/biases"] = module.bias.detach().float().cpu().numpy().copy()
    return out


@torch.no_grad()
def load_tensorflow_weights(
    model: nn.Module, arrays: dict[str, np.ndarray], moving_averages: bool = False
) -> list[str]:
    """Copy TF variables ('conv1/weights' HWIO, 'local3/weights' [2304, 384], ...,
    'softmax_linear/biases') into the layers present in `model`; returns the names used.

    Extra entries (global_step, optimizer slots) are ignored. moving_averages=True
    reads '<name>/ExponentialMovingAverage', the shadows the tutorial evaluates with.
    Everything is checked before anything is copied.
    """
    suffix = "/ExponentialMovingAverage" if moving_averages else ""
    plan, missing = [], []
    for name, module in _tf_layers(model):
        for tf_name, param in ((f"{name}/weights", module.weight), (f"{name}/biases", module.bias)):
            key = tf_name + suffix
            if key not in arrays:
                missing.append(key)
                continue
            value = torch.as_tensor(np.asarray(arrays[key]))
            expected = tuple(_to_tf(module, param).shape) if param is module.weight else tuple(param.shape)
            if tuple(value.shape) != expected:
                raise UserError(
                    f"TF variable {key} has shape {list(value.shape)}, the model expects {list(expected)}"
                    " (a checkpoint of a different num_classes, width or image_size?)"
                )
            plan.append((key, module, param, value))
    if missing:
        raise UserError(f"TF weights lack {len(missing)} variable(s) the model needs: {', '.join(missing)}")
    for key, module, param, value in plan:
        value = _from_tf(module, value) if param is module.weight else value
        param.copy_(value.to(dtype=param.dtype, device=param.device))
    return [key for key, *_ in plan]
