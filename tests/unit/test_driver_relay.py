"""Which relayed records the driver writes out at once (workers.driver.write_at_once): a client
watching a new or resumed job sees the training phase and the first loss without waiting out the
metrics log's interval; the rest is batched."""

import pytest

from workers.driver import write_at_once

START = {"kind": "event", "event": "start", "step": 0}
TRAIN = {"kind": "train", "step": 10, "loss": 2.3}
EVAL = {"kind": "eval", "step": 50, "val_loss": 1.0}
CKPT = {"kind": "event", "event": "checkpoint", "step": 200}


@pytest.mark.parametrize(
    "records,awaited,first_train,expected",
    [
        ([], False, True, (False, True)),  # nothing relayed: nothing to write
        ([], True, False, (True, False)),  # a checkpoint waits: write out now
        ([START], False, False, (True, True)),  # the worker group is up: the training phase
        ([START, TRAIN], False, False, (True, False)),  # up and its first loss in one drain
        ([TRAIN], False, True, (True, False)),  # the first loss after the start
        ([TRAIN], False, False, (False, False)),  # later losses wait for the interval
        ([TRAIN, TRAIN], False, True, (True, False)),
        ([EVAL], False, True, (False, True)),  # an evaluation is not the first loss
        ([CKPT, TRAIN], False, False, (False, False)),
        ([TRAIN, START], False, False, (True, True)),  # a restart: its first loss is to come
        ([TRAIN], True, False, (True, False)),
    ],
)
def test_write_at_once(records, awaited, first_train, expected):
    assert write_at_once(records, awaited, first_train) == expected
