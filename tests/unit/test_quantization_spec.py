"""Quantization settings: bad combinations are rejected at validation naming the field and what is
allowed; a schedule beyond the job's last step is a ConfigError before training."""

import re

import pytest

from service.errors import ConfigError, SpecError
from service.spec import parse_spec
from workers.train_loop import total_steps

BASE = {"name": "x", "model": {"name": "lenet5"}, "data": {"name": "digits"}}


def _spec(quant=None, pruning=None, **compression):
    c = dict(compression)
    if quant is not None:
        c["quantization"] = quant
    if pruning is not None:
        c["pruning"] = pruning
    return {**BASE, "compression": c}


def errors(d):
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    return {x["field"]: x["message"] for x in e.value.errors}


@pytest.mark.parametrize(
    ("quant", "field", "message"),
    [
        ({"bits": 4}, "bits", "only used when mode is ptq, qat or fixed (mode is none)"),
        ({"codebook_bits": 3}, "codebook_bits", "only used when mode is ptq, qat or fixed"),
        ({"mode": "fixed"}, "scale", "required when mode is `fixed`"),
        ({"mode": "qat", "scale": 64}, "scale", "only used by mode `fixed` (mode is qat)"),
        ({"mode": "ptq", "start_step": 10}, "start_step", "mode `ptq` quantizes after training"),
        ({"mode": "ptq", "freeze_step": 10}, "freeze_step", "only used by mode `qat` (mode is ptq)"),
        ({"mode": "qat", "bits": 4, "freeze_step": 10}, "freeze_step", "bits 4 is weight-only"),
        ({"mode": "qat", "start_step": 50, "freeze_step": 50}, "freeze_step", "greater than start_step (50)"),
        ({"mode": "qat", "bits": 4, "codebook_bits": 4}, "codebook_bits", "less than bits (4)"),
        ({"mode": "qat", "bits": 3}, "bits", "Input should be 8 or 4"),
        ({"mode": "int8"}, "mode", "'none', 'ptq', 'qat' or 'fixed'"),
        ({"mode": "fixed", "scale": -1}, "scale", "greater than 0"),
        ({"kernels": "vnni"}, "kernels", "only used when mode is ptq, qat or fixed"),
        ({"mode": "qat", "bits": 4, "kernels": "vnni"}, "kernels", "only for bits 8 (bits 4 is weight-only"),
        ({"mode": "qat", "kernels": "amx"}, "kernels", "'portable' or 'vnni'"),
    ],
)
def test_bad_combinations_name_the_field(quant, field, message):
    errs = errors(_spec(quant))
    key = f"compression.quantization.{field}"
    assert key in errs, errs
    assert message in errs[key]


def test_freeze_before_the_last_mask_update_is_rejected():
    errs = errors(
        _spec(
            {"mode": "qat", "start_step": 10, "freeze_step": 100},
            {"start_step": 0, "end_step": 200, "frequency": 10},
        )
    )
    assert "last pruning update (200)" in errs["compression.quantization.freeze_step"]


@pytest.mark.parametrize(
    "quant",
    [
        {"mode": "qat", "bits": 8, "start_step": 600},
        {"mode": "qat", "bits": 4},
        {"mode": "ptq"},
        {"mode": "ptq", "bits": 4, "codebook_bits": 2},
        {"mode": "fixed", "scale": 64, "start_step": 10},
        {"mode": "qat", "start_step": 10, "freeze_step": 700, "codebook_bits": 5},
        {"mode": "ptq", "kernels": "vnni"},
        {"mode": "qat", "bits": 8, "kernels": "portable"},
    ],
)
def test_good_combinations(quant):
    s = parse_spec(_spec(quant, {"start_step": 0, "end_step": 600, "frequency": 10}))
    assert s.compression.quantization.mode == quant["mode"]


def test_baseline_job_is_an_id():
    assert parse_spec(_spec(baseline_job="dense-1")).compression.baseline_job == "dense-1"
    assert "compression.baseline_job" in errors(_spec(baseline_job="../etc"))


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"mode": "qat", "start_step": 22}, "start_step: 22 is at or after the job's last step (22)"),
        ({"mode": "qat", "start_step": 2, "freeze_step": 23}, "freeze_step: 23 is after the job's last step"),
    ],
)
def test_schedule_past_the_last_step_is_a_config_error(quant, message):
    spec = parse_spec({**_spec(quant), "train": {"epochs": 1}})  # 1437 // 64 -> 22 steps
    with pytest.raises(ConfigError, match=re.escape(message)):
        total_steps(spec, 1437)
