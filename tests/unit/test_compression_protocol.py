"""The contract every compression method keeps (workers.compression.protocol), checked on every
registered method by the same tests: exact resume mid-schedule, a state round trip, identical
state on every data-parallel rank. A method added to the registry without a case here fails
`test_every_registered_method_has_a_case`."""

from __future__ import annotations

import typing
from dataclasses import dataclass

import pytest
import torch

from service.artifacts import LocalArtifactStore
from service.spec import PruningSpec, parse_spec
from tests.thread_ranks import Meeting, run_threads
from workers import train_loop
from workers.checkpoint import load_latest
from workers.compression import registry
from workers.compression.protocol import BaseMethod, Method
from workers.compression.pruning import verify_masks_agree
from workers.data import load_dataset
from workers.data import sharding as sh
from workers.parallel import Dist
from workers.session import LocalSession
from workers.train_loop import Faults, train

# Each case's schedule is mid-way at the resume point (checkpoint at 8, failure after 13).
CASES = {
    "pruning": {"pruning": {"final_sparsity": 0.7, "start_step": 4, "end_step": 16, "frequency": 4}},
    "pruning-2:4": {"pruning": {"structure": "2:4", "start_step": 4, "end_step": 16, "frequency": 4}},
    "pruning-channel": {
        "pruning": {
            "final_sparsity": 0.5,
            "start_step": 4,
            "end_step": 16,
            "frequency": 4,
            "structure": "channel",
            "channel_multiple": 4,  # each layer rounded up to 4 channels: the same on every rank
        }
    },
    # activations measured on each update's calibration batches (replayed identically on resume)
    "pruning-wanda": {
        "pruning": {
            "criterion": "wanda",
            "final_sparsity": 0.7,
            "start_step": 4,
            "end_step": 16,
            "frequency": 4,
            "calibration_batches": 2,
        }
    },
    "quantization-qat": {"quantization": {"mode": "qat", "start_step": 6}},
    "quantization-fixed": {"quantization": {"mode": "fixed", "start_step": 6, "scale": 64}},
    "clipping": {"clipping": {"max_abs": 0.05}},
    # clustered at 6 (before the checkpoint at 8): the resumed run restores the assignments
    "weight_sharing": {
        "pruning": {"final_sparsity": 0.7, "start_step": 0, "end_step": 4, "frequency": 2},
        "weight_sharing": {"bits": 3, "start_step": 6},
    },
}
SPEC = {
    "name": "contract",
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "data": {"name": "digits"},
    "train": {"max_steps": 20, "batch_size": 64, "lr": 0.05, "log_every_steps": 4, "eval_every_steps": 10},
    "checkpoint": {"every_steps": 8},
}


def _spec(case: str, **top):
    return parse_spec({**SPEC, "compression": CASES[case], **top})


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_spec(SPEC).data)


def test_every_registered_method_has_a_case():
    covered = {section for compression in CASES.values() for section in compression}
    assert {cls.name for cls in registry.METHODS} <= covered
    for case in CASES:
        for m in registry.build_methods(_spec(case)):
            assert isinstance(m, Method) and isinstance(m, BaseMethod), m


def test_every_pruning_criterion_has_a_case():
    criteria = set(typing.get_args(PruningSpec.model_fields["criterion"].annotation))
    covered = {c["pruning"].get("criterion", "magnitude") for c in CASES.values() if "pruning" in c}
    assert covered >= criteria
    assert {
        CASES[case]["pruning"].get("criterion", "magnitude") for case, _ in RESUME if "pruning" in CASES[case]
    } >= criteria


def test_every_method_key_is_written_for_every_spec():
    """One checkpoint layout whatever the spec: 'pruner' (the pre-protocol key) and
    'weight_sharing' are None when off."""
    assert registry.state_keys() == ["pruner", "weight_sharing"]


def _states(state: dict) -> dict:
    return {k: state[k] for k in registry.state_keys()}


def _assert_equal(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# Every method once (CI time: variants of a method run in the cheaper tests below), and fp16 on
# the N:M masks: the scaler's skipped steps must not revive a weight either.
RESUME = [
    ("pruning", "fp32"),
    ("pruning-2:4", "fp32"),
    ("pruning-2:4", "fp16"),
    ("pruning-wanda", "fp32"),
    ("quantization-qat", "fp32"),
    ("clipping", "fp32"),
    ("weight_sharing", "fp32"),
]


def test_resume_covers_every_method():
    assert {s for case, _ in RESUME for s in CASES[case]} >= {cls.name for cls in registry.METHODS}


@pytest.mark.parametrize(("case", "precision"), RESUME)
def test_resume_mid_schedule_equals_the_uninterrupted_run(tmp_path, digits, case, precision):
    spec = _spec(case, precision=precision)
    store = LocalArtifactStore(tmp_path)
    whole = LocalSession(store, "whole")
    train(spec, digits, whole)
    with pytest.raises(RuntimeError, match="injected"):
        train(spec, digits, LocalSession(store, "cut"), Faults(raise_at_step=13))
    resumed = LocalSession(store, "cut")
    train(spec, digits, resumed)
    assert [r["resumed_from"] for r in resumed.records if r.get("event") == "start"] == [8]
    a, b = load_latest(store, "whole").state, load_latest(store, "cut").state
    assert a["step"] == b["step"] == 20
    _assert_equal(a["model"], b["model"], "model")  # quantizer buffers included
    _assert_equal(a["optimizer"], b["optimizer"], "optimizer")
    _assert_equal(_states(a), _states(b), "methods")
    # the records after the resume point are the uninterrupted run's, value for value
    after = [r for r in whole.records if r["kind"] in ("train", "eval") and r["step"] > 8]
    again = [r for r in resumed.records if r["kind"] in ("train", "eval") and r["step"] > 8]
    strip = ("samples_per_second", "time")  # wall clock
    assert [{k: v for k, v in r.items() if k not in strip} for r in after] == [
        {k: v for k, v in r.items() if k not in strip} for r in again
    ]


def _advance(run, steps: int, events: list | None = None) -> None:
    """`steps` training steps as the loop takes them (schedule, then the step)."""
    while steps:
        perm = sh.epoch_permutation(
            run.data.info.n_train, run.spec.train.seed, run.step // run.steps_per_epoch
        )
        for m in run.methods:
            event = m.on_step(run.step, run.optimizer)
            if event is not None and events is not None:
                events.append(event)
        x, y = train_loop._batch(run, perm, run.step)
        train_loop.train_step(run, x, y)
        run.step += 1
        steps -= 1


@pytest.mark.parametrize("case", list(CASES))
def test_state_round_trips_into_a_fresh_method(digits, case):
    spec = _spec(case)
    run = train_loop.build(spec, digits, Dist())
    _advance(run, 11)  # mid-schedule for every case
    fresh = train_loop.build(spec, digits, Dist())
    for m, f in zip(run.methods, fresh.methods, strict=True):
        state = m.state_dict()
        assert (state is None) == (m.state_key is None), m.name
        f.load_state_dict(state)
        _assert_equal(f.state_dict(), state, m.name)
        _assert_equal(f.start_part(), m.start_part(), m.name)


@dataclass
class ThreadDist(Dist):
    """A data-parallel replica on a thread: `all_gather_object` meets the other one (`slot`).
    Each trains on the whole global batch (rank 0 of 1 for the data), which leaves it the
    weights DDP's all-reduce leaves every replica with."""

    slot: int = 0
    meeting: Meeting | None = None

    def all_gather_object(self, obj) -> list:
        return self.meeting.meet(self.slot, obj)


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_holds_the_same_state(digits, case):
    spec = _spec(case)
    meeting = Meeting(timeout=120)
    # Built one after the other: model init draws from torch's process-wide RNG.
    runs = [train_loop.build(spec, digits, ThreadDist(slot=r, meeting=meeting)) for r in range(2)]
    events: list[list] = [[], []]
    run_threads(lambda rank: _advance(runs[rank], 17, events[rank]), meeting)
    assert events[0] == events[1]
    for e in events[0]:
        verify_masks_agree(e["mask_checksums"])  # the check the loop makes under DDP
        assert len(e["mask_checksums"]) == 2
    if any(m.name == "pruning" for m in runs[0].methods):
        assert events[0], "the schedule updated masks"
    a, b = runs
    for ma, mb in zip(a.methods, b.methods, strict=True):
        _assert_equal(ma.state_dict(), mb.state_dict(), ma.name)
    _assert_equal(a.module.state_dict(), b.module.state_dict(), "model")
