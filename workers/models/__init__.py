"""The model registry: built-ins (mlp, lenet5, convnet, gpt, resnet) plus operator-installed models from
the `slimtrain.models` entry points. Models are built from validated arguments and the dataset's
`DataInfo`; they take raw features as the dataset provides them and return logits, with
normalisation and reshaping inside the module (so the exported graph is self-contained)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from service import catalog
from service.errors import ConfigError
from workers.data.info import DataInfo
from workers.models.convnet import ConvNet
from workers.models.gpt import GPT
from workers.models.lenet5 import LeNet5
from workers.models.mlp import MLP
from workers.models.resnet import ResNet

Builder = Callable[[dict, DataInfo], nn.Module]

BUILDERS: dict[str, Builder] = {
    "mlp": lambda a, i: MLP(i, **a),
    "lenet5": lambda a, i: LeNet5(i, **a),
    "convnet": lambda a, i: ConvNet(i, **a),
    "gpt": lambda a, i: GPT(i, **a),
    "resnet": lambda a, i: ResNet(i, **a),
    # transformers is imported on first use only: ~4 s that the built-ins should not pay.
    "hf_causal_lm": lambda a, i: _hf().causal_lm(a, i),
    "hf_seq_cls": lambda a, i: _hf().seq_cls(a, i),
}


def _hf():
    from workers.models import hf

    return hf


def build_model(name: str, args: dict, info: DataInfo, seed: int | None = None) -> nn.Module:
    """Build a registry model. With `seed`, initialisation is a pure function of it (every rank
    and every restart builds the same initial weights)."""
    if seed is not None:
        torch.manual_seed(seed)
    if name in BUILDERS:
        builder = BUILDERS[name]
    elif name in catalog.model_plugins():
        builder = catalog.model_plugins()[name].load().build
    else:
        raise ConfigError(f"model.name: unknown model {name!r}; allowed: {', '.join(catalog.model_names())}")
    try:
        model = builder(args, info)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ConfigError(f"model {name!r} cannot be built for dataset input {info.describe()}: {e}") from e
    return model


def output_layer(model: nn.Module) -> str | None:
    """The module that produces the logits (never channel-pruned: its rows are the classes)."""
    name = getattr(model, "output_layer", None)
    if name:
        return name
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    return last
