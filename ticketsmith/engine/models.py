"""Model builders by name, and discovery of prunable weights.

Every builder takes (input_shape, num_classes, **options) and returns an nn.Module whose
last Linear layer is the output layer. Prunable = weights of Linear and Conv layers; biases,
embeddings and normalisation layers are pruned only when `model.also_prune` names them.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F
from ticketsmith.base.errors import ModelError  # noqa: F401 (re-exported)
from ticketsmith.engine.transformer import build_gpt


def _flat_features(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


class MLP(nn.Module):
    """Fully connected net; LeNet-300-100 is MLP(784, [300, 100], 10)."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        sizes = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class LeNet5(nn.Module):
    """The small MNIST CNN: two 5x5 conv + max-pool stages, then 120-84-classes."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        feat = 16 * ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2)
        self.fc1 = nn.Linear(feat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.out = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.out(F.relu(self.fc2(x)))


class ConvNet(nn.Module):
    """Conv-2/4/6 of Frankle & Carbin: pairs of 3x3 convs + max-pool, then FC 256-256."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: list[int]):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(c * h * w, 256)
        self.fc2 = nn.Linear(256, 256)
        self.out = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): 3 stages x 3 blocks, widths 16/32/64."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, cout in enumerate([width, 2 * width, 4 * width]):
            for i in range(3):
                blocks.append(_Block(cin, cout, 2 if stage and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        # Global average pooling as a mean over H and W: the same numbers as
        # adaptive_avg_pool2d(x, 1) (bit for bit on CPU), and a backward pass that has a
        # deterministic CUDA kernel, which AdaptiveAvgPool2d's backward lacks.
        return self.out(x.mean(dim=(2, 3)))


Builder = Callable[..., nn.Module]

MODELS: dict[str, Builder] = {
    "lenet_300_100": lambda shape, n: MLP(_flat_features(shape), [300, 100], n),
    "mlp": lambda shape, n, hidden=(64,): MLP(_flat_features(shape), list(hidden), n),
    "mnist_cnn": lambda shape, n: LeNet5(shape, n),
    "conv2": lambda shape, n: ConvNet(shape, n, [64]),
    "conv4": lambda shape, n: ConvNet(shape, n, [64, 128]),
    "conv6": lambda shape, n: ConvNet(shape, n, [64, 128, 256]),
    "resnet20": lambda shape, n, width=16: ResNet20(shape, n, width),
    "gpt": build_gpt,  # language models: shape (context,), n = vocabulary size
}


def import_object(path: str, what: str) -> object:
    """Import `package.module:attribute`; errors name the setting, the path and the cause."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"{what}: {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"{what}: {path!r}: cannot import module {module_name!r} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelError(f"{what}: {path!r}: module {module_name!r} has no attribute {attr!r}") from None


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                factory: str | None = None, options: dict | None = None) -> nn.Module:
    """Build a model by registry name, or by calling a user factory `pkg.mod:fn`."""
    options = dict(options or {})
    if factory:
        fn = import_object(factory, "model.factory")
        model = fn(input_shape=input_shape, num_classes=num_classes, **options)
        if not isinstance(model, nn.Module):
            raise ModelError(f"model.factory {factory!r} returned {type(model).__name__}, "
                             "expected a torch.nn.Module")
        return model
    if name not in MODELS:
        raise ModelError(f"model.name: unknown model {name!r}; choose one of {sorted(MODELS)}")
    accepted = list(inspect.signature(MODELS[name]).parameters)[2:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:  # a typo would otherwise build the default architecture silently
        raise ModelError(f"model.options: {unknown} not accepted by {name!r} "
                         f"(accepts {accepted or 'no options'})")
    return MODELS[name](tuple(input_shape), num_classes, **options)


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 `Conv1D`: a Linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _embedding_params(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
ALSO_PRUNABLE = ("embeddings", "norms", "biases")  # what model.also_prune may name


def _candidates(module: nn.Module, embeddings: set[int], also: set[str]) -> dict[str, nn.Parameter]:
    """One module's prunable parameters, by local name, for the kinds asked for."""
    weight = getattr(module, "weight", None)
    found = {}
    layer = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or _is_conv1d(module)
    if layer and id(weight) not in embeddings:
        found["weight"] = weight
    elif isinstance(module, nn.Embedding) and "embeddings" in also:
        found["weight"] = weight
    elif isinstance(module, _NORMS) and "norms" in also and weight is not None:
        found["weight"] = weight
    bias = getattr(module, "bias", None)
    if "biases" in also and isinstance(bias, nn.Parameter):
        found["bias"] = bias
    return found


def prunable_weights(model: nn.Module, exclude: tuple[str, ...] | list[str] = (),
                     also: tuple[str, ...] | list[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of Linear/Conv layers (and GPT-2's Conv1D) in module order, keyed
    `<module>.weight`; a Linear output head tied to an embedding is an embedding: kept dense.

    `also` adds `model.also_prune`'s kinds: embedding tables, norm scales, biases (a tied
    head's weight is its embedding's: one tensor, one mask, listed once, under the embedding).
    `exclude` names modules (or prefixes of them) whose parameters are left dense; a name that
    matches no module is an error (a typo would otherwise silently prune the layer).
    """
    def excluded(mod_name: str, e: str) -> bool:
        return mod_name == e or mod_name.startswith(e + ".")

    modules = dict(model.named_modules())
    unknown = [e for e in exclude if not any(excluded(m, e) for m in modules)]
    if unknown:
        raise ModelError(f"model.exclude: no module named {unknown} in {type(model).__name__} "
                         f"(modules: {[m for m in modules if m][:20]})")
    found, embeddings = {}, _embedding_params(model)
    for mod_name, module in modules.items():
        if not any(excluded(mod_name, e) for e in exclude):
            for local, param in _candidates(module, embeddings, set(also)).items():
                found[f"{mod_name}.{local}"] = param
    if not found:
        raise ModelError(f"{type(model).__name__} has no prunable Linear/Conv weights "
                         f"(excluded: {list(exclude)})")
    return found


def prunable_for(model: nn.Module, meta: dict) -> dict[str, nn.Parameter]:
    """The prunable weights as a checkpoint's (or experiment's) metadata says: `exclude` and
    `also_prune` (see lottery.model_meta). Every loader and the lottery call this."""
    return prunable_weights(model, meta.get("exclude") or (), meta.get("also_prune") or ())


def output_layer(model: nn.Module, language_model: bool = False) -> str | None:
    """Name of the output layer's weight: the last Linear in module order; None for a
    language model, whose output head is its token embedding (tied), kept dense. An image
    model may hold an embedding too (of a label, say): the task decides, not the modules."""
    if language_model:
        return None
    last = None
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = f"{mod_name}.weight"
    if last is None:
        raise ModelError(f"{type(model).__name__} has no Linear output layer")
    return last


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
