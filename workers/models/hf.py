"""HuggingFace transformers models in the registry: `hf_causal_lm` (GPT-2, Llama-style decoders)
and `hf_seq_cls` (BERT-style sequence classification), built from a config dict alone.

Nothing is downloaded: the config dict (checked at submission by service.catalog) becomes the
transformers config class of its `model_type`, the model is built from it with random weights
(`model.init` then loads trained ones, HuggingFace key names as they are), and
`HF_HUB_OFFLINE=1` is set before transformers is imported so no code path can reach the hub.

The registry's contract is "token ids in, logits out": each model is a subclass of the
transformers class whose forward takes the token ids only and returns the logits tensor
(`use_cache=False`, no cache object, no output dataclass), which is what the training loop, the
ONNX exporter (dynamic batch and sequence) and the evaluation all need. Being a subclass, not a
wrapper, keeps module and parameter names exactly HuggingFace's (`transformer.h.0.attn.c_attn`).

Tied embeddings (GPT-2's `lm_head.weight` is `transformer.wte.weight`): one parameter, pruned
once (through `lm_head`, the layer that multiplies by it), and stored once: the state dict leaves
out the tied alias, as HuggingFace's own safetensors files do, and loading fills it back in.
"""

from __future__ import annotations

import os
from functools import cache

import torch
from torch import nn

from workers.data.info import DataInfo

# Before the first transformers import anywhere in this process: never reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _config(args_config: dict, vocab: int, max_len: int, num_labels: int | None = None):
    """The transformers config of a validated dict, with the data's vocabulary and length
    checked against it (ValueError naming the key: build_model turns it into a ConfigError)."""
    from transformers import AutoConfig

    raw = dict(args_config)
    mt = raw.pop("model_type")
    raw.setdefault("vocab_size", vocab)
    if raw["vocab_size"] < vocab:
        raise ValueError(
            f"model.args.config.vocab_size: {raw['vocab_size']} is smaller than the data's "
            f"vocabulary ({vocab} token ids)"
        )
    if mt == "gpt2":
        # GPT-2's defaults (50256) lie outside a small vocabulary: default to its last id.
        raw.setdefault("bos_token_id", raw["vocab_size"] - 1)
        raw.setdefault("eos_token_id", raw["vocab_size"] - 1)
    if num_labels is not None:
        raw["num_labels"] = num_labels
    cfg = AutoConfig.for_model(mt, **raw)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, key, None)
        ids = v if isinstance(v, list) else [v]
        for i in ids:
            if i is not None and not 0 <= i < cfg.vocab_size:
                raise ValueError(
                    f"model.args.config.{key}: {i} is outside the vocabulary 0..{cfg.vocab_size - 1}"
                )
    pos_key = "n_positions" if mt == "gpt2" else "max_position_embeddings"
    if getattr(cfg, pos_key) < max_len:
        raise ValueError(
            f"model.args.config.{pos_key}: {getattr(cfg, pos_key)} is shorter than the data's "
            f"sequences ({max_len} tokens)"
        )
    cfg.use_cache = False
    # Eager attention: plain MatMul/Softmax in the ONNX graph, the same math on every backend.
    cfg._attn_implementation = "eager"
    return cfg


def max_positions(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """alias key -> kept key for parameters registered under two names (tied embeddings)."""
    seen: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return out


def _drop_aliases(module, state_dict, prefix, local_metadata):
    for alias in module._tied:
        state_dict.pop(prefix + alias, None)
    return state_dict


def _fill_aliases(module, state_dict, prefix, *args):
    for alias, kept in module._tied.items():
        if prefix + kept in state_dict and prefix + alias not in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + kept]


class _LogitsOnly:
    """Mixed in front of a transformers class: token ids in, logits out."""

    def _slimtrain_setup(self) -> None:
        self.tie_weights()
        self._tied = _tied_aliases(self)
        self._register_state_dict_hook(_drop_aliases)
        self._register_load_state_dict_pre_hook(_fill_aliases, with_module=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(input_ids=input_ids.long(), use_cache=False, return_dict=True)
        return out.logits


@cache
def _logits_class(base: type) -> type:
    return type(base.__name__, (_LogitsOnly, base), {"__module__": __name__})


def _build(base: type, cfg) -> nn.Module:
    cls = _logits_class(base)
    model = cls(cfg)
    model._slimtrain_setup()
    model.output_layer = "lm_head" if hasattr(model, "lm_head") else "classifier"
    model.onnx_max_seq = max_positions(model)  # the exported graph's sequence axis is dynamic
    return model


def causal_lm(args: dict, info: DataInfo) -> nn.Module:
    if info.kind != "tokens":
        raise ValueError("hf_causal_lm takes token sequences (next-token targets)")
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = _config(args["config"], info.num_classes, info.input_shape[0])
    return _build(MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)], cfg)


def seq_cls(args: dict, info: DataInfo) -> nn.Module:
    if info.kind != "sequence":
        raise ValueError("hf_seq_cls takes token sequences with one class label each")
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    vocab = info.vocab_size or 0
    cfg = _config(args["config"], vocab, info.input_shape[0], num_labels=info.num_classes)
    return _build(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(cfg)], cfg)
