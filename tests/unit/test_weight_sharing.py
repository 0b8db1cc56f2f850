"""Weight sharing (workers.compression.weight_sharing): the clustering and its centroid gradients
value by value, exact resume mid fine-tuning, the packed `shared` encoding round trip, an
exported job whose model.packed decodes to the trained shared weights at the reported accuracy,
and the spec's 422s. No Ray: one process, tiny mlps on digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.errors import SpecError
from service.spec import parse_spec, schedule_errors
from workers import export, pack, report, train_loop
from workers.checkpoint import load_latest
from workers.compression import weight_sharing as ws
from workers.data import load_dataset
from workers.data import sharding as sh
from workers.parallel import Dist
from workers.session import LocalSession

# --- clustering (pure) --------------------------------------------------------------------------

W = torch.tensor([[0.0, 1.0, 1.1, 5.0], [5.2, 0.0, -1.0, -1.2]])


def test_cluster_values():
    # Linear init over [-1.2, 5.2]: -1.2, 0.933, 3.067, 5.2; Lloyd's moves three of them to their
    # members' means; the third keeps its place (no members) and zeros belong to no cluster.
    centroids, assign = ws.cluster(W, bits=2)
    np.testing.assert_allclose(centroids.numpy(), [-1.1, 1.05, 3.0666667, 5.1], rtol=1e-6)
    assert assign.tolist() == [[-1, 1, 1, 3], [3, -1, 0, 0]]
    shared = ws.shared_values(centroids, assign)
    np.testing.assert_allclose(shared.numpy(), [[0, 1.05, 1.05, 5.1], [5.1, 0, -1.1, -1.1]], rtol=1e-6)


def test_cluster_never_exceeds_the_codebook_and_keeps_zeros():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g) * (torch.rand(40, 30, generator=g) > 0.8)
    centroids, assign = ws.cluster(w, bits=3)
    shared = ws.shared_values(centroids, assign)
    assert len(centroids) == 8
    assert torch.equal(shared == 0, w == 0)
    assert torch.unique(shared[shared != 0]).numel() <= 8
    # every weight sits at its nearest centroid (Lloyd's fixed point)
    nz = w != 0
    nearest = (w[nz][:, None] - centroids[None, :]).abs().argmin(dim=1)
    assert torch.equal(nearest, assign[nz].long())


def test_cluster_sums_and_representatives():
    assign = torch.tensor([[-1, 1, 1, 3], [3, -1, 0, 0]], dtype=torch.int16)
    values = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    assert ws.cluster_sums(values, assign, 4).tolist() == [6 + 7, 1 + 2, 0, 3 + 4]
    # first member of each cluster (flat index); the empty cluster points anywhere valid
    reps = ws.representatives(assign, 4)
    assert reps[[0, 1, 3]].tolist() == [6, 1, 3] and 0 <= int(reps[2]) < 8


def test_centroid_gradient_is_the_sum_of_its_members():
    """One plain SGD step after clustering: each centroid moves by lr * the sum of its members'
    gradients (Han et al.), every member with it, pruned weights stay 0."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    shared = ws.SharedLayers({"fc": layer.weight}, [])
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    shared.cluster_(2, opt)
    before = layer.weight.detach().clone()
    centroids = torch.tensor([before[1, 2], before[0, 1], 0.0, before[0, 3]])
    layer(torch.randn(5, 4)).pow(2).sum().backward()
    raw = layer.weight.grad.clone()
    shared.share_grads_()
    opt.step()
    shared.snap_()
    sums = ws.cluster_sums(raw, shared.assign["fc"], 4)
    want = ws.shared_values(centroids - 0.1 * sums, shared.assign["fc"])
    torch.testing.assert_close(layer.weight.detach(), want, rtol=1e-6, atol=1e-6)
    assert bool((layer.weight[W == 0] == 0).all())


# --- the method in a training run ---------------------------------------------------------------

SPEC = {
    "name": "ws",
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "data": {"name": "digits"},
    "train": {"max_steps": 24, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "log_every_steps": 4},
    "compression": {
        "pruning": {"final_sparsity": 0.7, "start_step": 0, "end_step": 6, "frequency": 2},
        "weight_sharing": {"bits": 3, "start_step": 6},
    },
    "checkpoint": {"every_steps": 100},
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_spec(SPEC).data)


def _advance(run, steps: int) -> None:
    """`steps` training steps as the loop takes them (schedule, then the step)."""
    for _ in range(steps):
        perm = sh.epoch_permutation(
            run.data.info.n_train, run.spec.train.seed, run.step // run.steps_per_epoch
        )
        for m in run.methods:
            m.on_step(run.step, run.optimizer)
        x, y = train_loop._batch(run, perm, run.step)
        train_loop.train_step(run, x, y)
        run.step += 1


def test_fine_tuning_keeps_the_layers_shared_and_moves_the_centroids(digits):
    run = train_loop.build(parse_spec(SPEC), digits, Dist())
    method = run.method("weight_sharing")
    _advance(run, 7)  # clustered at step 6, then one step
    first = {n: torch.unique(w.detach()) for n, w in method.layers.weights.items()}
    zeros = {n: w.detach() == 0 for n, w in method.layers.weights.items()}
    _advance(run, 10)
    for n, w in method.layers.weights.items():
        values = torch.unique(w.detach())
        assert values.numel() <= 2**3 + 1, n  # 8 shared values and the pruned zeros
        assert torch.equal(w.detach() == 0, zeros[n]), n
        assert not torch.equal(values, first[n]), f"{n}: the shared values did not train"
    for b in method.layers.rest:  # biases on the float16 grid, as model.packed stores them
        assert torch.equal(b.detach(), b.detach().half().float())


def test_resume_mid_fine_tuning_is_exact(digits):
    """State round trip: a fresh run given the model, optimizer and method state of a run
    stopped mid fine-tuning continues exactly as the uninterrupted run."""
    spec = parse_spec(SPEC)
    whole = train_loop.build(spec, digits, Dist())
    _advance(whole, 10)
    saved = (
        copy.deepcopy(whole.module.state_dict()),
        copy.deepcopy(whole.optimizer.state_dict()),
        copy.deepcopy(whole.method("weight_sharing").state_dict()),
    )
    _advance(whole, 8)
    resumed = train_loop.build(spec, digits, Dist())
    resumed.module.load_state_dict(saved[0])
    resumed.optimizer.load_state_dict(saved[1])
    resumed.method("pruning").load_state_dict(
        {**whole.method("pruning").state_dict(), "masks": whole.method("pruning").state_dict()["masks"]}
    )
    resumed.method("weight_sharing").load_state_dict(saved[2])
    resumed.step = 10
    _advance(resumed, 8)
    for k, v in whole.module.state_dict().items():
        assert torch.equal(v, resumed.module.state_dict()[k]), k
    a, b = whole.method("weight_sharing").state_dict(), resumed.method("weight_sharing").state_dict()
    assert a["k"] == b["k"] and all(torch.equal(a["assign"][n], b["assign"][n]) for n in a["assign"])


# --- the packed encoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions",
    [[], [0], [0, 1, 2], [5, 260, 261, 1000], [254, 255, 509, 510, 1020]],
)
def test_gap_tokens_round_trip(positions):
    p = np.array(positions, dtype=np.int64)
    tokens = ws.gap_tokens(p)
    assert tokens.dtype == np.uint8
    assert ws.positions_of(tokens).tolist() == positions


def test_gap_tokens_values():
    # gaps 5, 254, 0, 738 = 2*255 + 228
    assert ws.gap_tokens(np.array([5, 260, 261, 1000])).tolist() == [5, 254, 0, 255, 255, 228]


def test_shared_weight_round_trips_bit_for_bit_through_model_packed():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(300, 64, generator=g) * (torch.rand(300, 64, generator=g) > 0.95)
    dense[0, :] = 0  # a long run of zeros: escapes
    centroids, assign = ws.cluster(dense, bits=4)
    w = ws.shared_values(centroids, assign)
    state = {"fc.weight": w, "fc.bias": torch.randn(300, generator=g)}
    data = pack.pack(state, {"m": 1}, shared={"fc.weight"})
    back, meta = pack.unpack(data)
    assert meta == {"m": 1}
    assert torch.equal(back["fc.weight"], w) and torch.equal(back["fc.bias"], state["fc.bias"])
    # smaller than the bitmap + float values the packer would otherwise store
    assert len(data) < len(pack.pack(state, {"m": 1}))
    with pytest.raises(ValueError, match="more than 256"):
        ws.encode(torch.arange(1, 300, dtype=torch.float32))


def test_exported_job_decodes_to_the_trained_weights_at_the_reported_accuracy(tmp_path, digits):
    spec = parse_spec(SPEC)
    store = LocalArtifactStore(tmp_path)
    summary = train_loop.train(spec, digits, LocalSession(store, "j"))
    rep = export.export(spec, digits, store, "j", summary["step"], {}, latency_repeats=1)
    packed = JobArtifacts(store, "j").get_bytes("model.packed")
    assert rep["size"]["compressed_bytes"] == len(packed)
    assert rep["size"]["ratio"] == rep["size"]["dense_bytes"] / len(packed)
    rebuilt = pack.rebuild(packed)
    trained = load_latest(store, "j").state["model"]
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert report.torch_accuracy(rebuilt, digits)["accuracy"] == rep["accuracy"]
    clusters = rep["weight_sharing"]["clusters"]
    assert set(clusters) == {"layers.fc1", "layers.fc2"} and all(1 <= c <= 8 for c in clusters.values())


# --- the spec -----------------------------------------------------------------------------------


def _errors(compression: dict, **top) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        parse_spec({**SPEC, "compression": compression, **top})
    return {x["field"]: x["message"] for x in e.value.errors}


PRUNE = {"final_sparsity": 0.9, "start_step": 0, "end_step": 100, "frequency": 10}


@pytest.mark.parametrize(
    ("compression", "top", "field", "message"),
    [
        (
            {"weight_sharing": {"bits": 0}},
            {},
            "compression.weight_sharing.bits",
            "greater than or equal to 1",
        ),
        ({"weight_sharing": {"bits": 9}}, {}, "compression.weight_sharing.bits", "less than or equal to 8"),
        ({"weight_sharing": {"start_step": -1}}, {}, "compression.weight_sharing.start_step", "greater than"),
        ({"weight_sharing": {"codes": 4}}, {}, "compression.weight_sharing.codes", "unknown field"),
        (
            {"pruning": PRUNE, "weight_sharing": {"start_step": 50}},
            {},
            "compression.weight_sharing.start_step",
            "last pruning update (100)",
        ),
        (
            {"quantization": {"mode": "qat"}, "weight_sharing": {}},
            {},
            "compression.weight_sharing",
            "set quantization.mode to none (is qat)",
        ),
        (
            {"weight_sharing": {}},
            {"parallel": {"strategy": "fsdp", "workers": 2}},
            "compression.weight_sharing",
            "set parallel.strategy to ddp (is fsdp)",
        ),
    ],
)
def test_bad_specs_name_the_field(compression, top, field, message):
    errs = _errors(compression, **top)
    assert field in errs, errs
    assert message in errs[field]


def test_start_after_the_last_step_names_the_field():
    spec = parse_spec({**SPEC, "compression": {"weight_sharing": {"start_step": 25}}})
    errs = {e["field"]: e["message"] for e in schedule_errors(spec, 1437)}
    assert "after the job's last step (24)" in errs["compression.weight_sharing.start_step"]
    ok = parse_spec({**SPEC, "compression": {"weight_sharing": {"start_step": 24}}})
    assert schedule_errors(ok, 1437) == []


def test_only_shared_weights_take_the_shared_encoding():
    spec = parse_spec(SPEC)
    state = {
        "fc.weight": ws.shared_values(*ws.cluster(torch.randn(8, 8), bits=2)),
        "emb.weight": torch.randn(30, 30),  # no Linear/Conv: never clustered, 900 values
        "fc.bias": torch.zeros(8),
    }
    assert ws.shared_layers(spec, state) == {"fc.weight"}
    assert ws.shared_layers(parse_spec({**SPEC, "compression": {}}), state) == set()
