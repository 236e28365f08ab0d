"""multitower: TensorFlow's CIFAR-10 multi-GPU tutorial and the classic parallel
training strategies (synchronous towers, Downpour SGD, local SGD, Hogwild,
pipelines), on PyTorch's torch.distributed engine."""

__version__ = "0.1.0"
