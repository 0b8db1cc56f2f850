"""Which compression methods a spec turns on, built in one fixed order.

The order is the order of their hooks within a step. Quantization comes first: its `convert`
swaps layers for fake-quantized ones, which pruning and clipping then see under the same names.
Pruning's and clipping's hooks commute (clamping keeps zeros at zero), as do quantization's
observer fold and pruning's gradient mask, but a fixed order keeps every run, and every rank,
doing the same thing in the same sequence.

Adding a method: one module with a `BaseMethod` subclass (workers.compression.protocol), its
class added to METHODS, its spec section in service.spec.CompressionSpec, and its tests (the
contract tests in tests/unit/test_compression_protocol.py take it by parametrization)."""

from __future__ import annotations

from service.spec import JobSpec
from workers.compression.clipping import ClippingMethod
from workers.compression.protocol import Method
from workers.compression.pruning import PruningMethod
from workers.compression.quantization import QuantizationMethod
from workers.compression.weight_sharing import WeightSharingMethod

# Weight sharing last: it sums the gradients pruning masked and snaps what clipping clamped.
METHODS: tuple[type[Method], ...] = (QuantizationMethod, PruningMethod, ClippingMethod, WeightSharingMethod)


def build_methods(spec: JobSpec) -> list[Method]:
    """The active methods of `spec`, in METHODS order (none of them converted or attached)."""
    return [m for m in (cls.from_spec(spec) for cls in METHODS) if m is not None]


def state_keys() -> list[str]:
    """Every checkpoint key a method may own: written (None when the method is off) by every run."""
    return [cls.state_key for cls in METHODS if cls.state_key is not None]


def report_parts(spec: JobSpec, model) -> dict[str, dict]:
    """What the methods add to report.json, merged by section."""
    out: dict[str, dict] = {}
    for cls in METHODS:
        for section, part in cls.report_part(spec, model).items():
            out.setdefault(section, {}).update(part)
    return out


def finalize(spec: JobSpec, model, example):
    """The model as it ships: every method's `finalize`, in METHODS order (once, at export)."""
    for cls in METHODS:
        model = cls.finalize(spec, model, example)
    return model


def conform(model, state: dict) -> None:
    """Shape a freshly built registry model like the model `state` was saved from."""
    for cls in METHODS:
        cls.conform(model, state)
