"""model.init in one process (no Ray): a pruning job started from a dense parent's weights, strict
loading (missing / unexpected keys, shapes, files that are not safetensors), sharded folders,
and the service's resolution of init to one store key per tenant."""

import io
import json
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.errors import ConfigError, SpecError
from service.spec import parse_spec
from service.uploads import model_key, resolve_init
from workers import export, init_weights
from workers.data import load_dataset
from workers.driver import preflight
from workers.models import build_model
from workers.session import LocalSession
from workers.train_loop import train

PARENT = {
    "name": "parent",
    "model": {"name": "mlp", "args": {"hidden": [64]}},
    "data": {"name": "digits"},
    "train": {"epochs": 4, "batch_size": 64, "lr": 0.1},
    "checkpoint": {"every_steps": 1000},
}
TOTAL = 4 * (1438 // 64)  # 88 steps
CHILD = {
    **PARENT,
    "name": "child",
    "model": {**PARENT["model"], "init": {"job": "parent"}},
    "train": {"epochs": 4, "batch_size": 64, "lr": 0.02},
    "compression": {"pruning": {"final_sparsity": 0.7, "start_step": 0, "end_step": 60, "frequency": 10}},
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_spec(PARENT).data)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalArtifactStore(tmp_path_factory.mktemp("init"))


def _run(store, job_id, spec, data):
    session = LocalSession(store, job_id)
    summary = train(spec, data, session)
    rep = export.export(spec, data, store, job_id, summary["step"], {"steps": summary["step"]}, 2)
    rep = init_weights.rebase(rep, init_weights.baseline_of(session.records, data.info.kind))
    JobArtifacts(store, job_id).write_manifest()
    return rep, session


@pytest.fixture(scope="module")
def parent(store, digits):
    return _run(store, "parent", parse_spec(PARENT), digits)[0]


def _state(digits, **changes):
    spec = parse_spec(PARENT)
    return dict(build_model(spec.model.name, spec.model.args, digits.info, seed=1).state_dict(), **changes)


def _resolved(store, data, tenant="default"):
    return resolve_init(parse_spec(data, submitted=True), tenant, store)


def test_pruning_from_a_dense_parent_starts_at_its_accuracy(store, digits, parent):
    spec = _resolved(store, CHILD)
    assert spec.model.init.resolved == "parent/model.safetensors"
    rep, session = _run(store, "child", spec, digits)
    step0 = [r for r in session.records if r["kind"] == "eval" and r["step"] == 0]
    assert len(step0) == 1 and step0[0]["baseline"] is True
    # The same validation split: the parent's exported (onnxruntime) accuracy, within one sample.
    assert abs(step0[0]["val_accuracy"] - parent["accuracy"]) <= 1 / digits.info.n_val + 1e-12
    assert parent["accuracy"] > 0.85
    assert rep["baseline"]["accuracy"] == step0[0]["val_accuracy"]
    assert rep["dense_accuracy"] == rep["baseline"]["accuracy"]
    assert rep["sparsity"]["global"] == pytest.approx(0.7, abs=0.005)


def test_without_init_no_step0_evaluation_and_no_baseline(parent, store):
    assert "baseline" not in parent


def test_a_random_start_is_far_from_the_parent(digits, parent):
    # The test above can fail: a model that ignored init would start near chance (10 classes).
    spec = parse_spec(PARENT)
    model = build_model(spec.model.name, spec.model.args, digits.info, seed=0)
    from workers.report import torch_accuracy

    assert torch_accuracy(model, digits)["accuracy"] < 0.3


def test_missing_unexpected_and_wrong_shapes_name_the_keys(digits):
    spec = parse_spec(PARENT)
    model = build_model(spec.model.name, spec.model.args, digits.info)
    good = model.state_dict()
    first = next(iter(good))
    missing = {k: v for k, v in good.items() if k != first}
    with pytest.raises(ConfigError, match=rf"missing keys {first}$"):
        init_weights.apply(model, missing)
    extra = {**good, **{f"extra.{i}": torch.zeros(1) for i in range(8)}}
    listed = r"unexpected keys extra.0, extra.1, extra.2, extra.3, extra.4 and 3 more"
    with pytest.raises(ConfigError, match=listed):
        init_weights.apply(model, extra)
    shaped = {**good, first: torch.zeros(3, 3)}
    with pytest.raises(ConfigError, match=rf"shape mismatches {first} \(3, 3\) \(model: "):
        init_weights.apply(model, shaped)
    # never half-loaded: the model still holds its own weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: torch.full_like(v, 7.0) for k, v in good.items()}
    bad["extra"] = torch.zeros(1)
    with pytest.raises(ConfigError):
        init_weights.apply(model, bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Boom:
    """Unpickling this creates a file: proof that a file was (or was not) unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_disguised_as_safetensors_is_refused_and_never_unpickled(tmp_path, digits):
    marker = tmp_path / "unpickled"
    buf = io.BytesIO()
    torch.save({"w": _Boom(str(marker))}, buf)  # what torch.save writes (a zip of pickles)
    for raw in (buf.getvalue(), pickle.dumps(_Boom(str(marker)))):
        store = LocalArtifactStore(tmp_path / "s")
        store.put_bytes("m/model.safetensors", raw)
        with pytest.raises(ConfigError, match="not a safetensors file"):
            init_weights.read_state("m/model.safetensors", store.get_bytes)
    assert not marker.exists()
    # the bytes really are a live payload: unpickling them does create the file
    pickle.loads(pickle.dumps(_Boom(str(marker))))
    assert marker.exists()


def test_truncated_and_garbage_files_are_config_errors():
    good = st_save({"w": torch.ones(4, 4)})
    cases = (
        (good[:-3], "outside the 61 data bytes"),
        (good + b"xx", "cover 64 of its 66"),
        (b"", "shorter"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00[]", "JSON object"),
    )
    for raw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            init_weights.parse(raw, "x")


def test_sharded_folder_with_hf_index(tmp_path, digits):
    store = LocalArtifactStore(tmp_path)
    state = _state(digits)
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[:1], "model-00002-of-00002.safetensors": keys[1:]}
    weight_map = {}
    for fn, ks in shards.items():
        store.put_bytes(f"w/{fn}", st_save({k: state[k].contiguous() for k in ks}))
        weight_map.update({k: fn for k in ks})
    store.put_bytes("w/model.safetensors.index.json", json.dumps({"weight_map": weight_map}).encode())
    got = init_weights.read_state("w/", store.get_bytes)
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert set(init_weights.read_state("w/model.safetensors.index.json", store.get_bytes)) == set(state)
    weight_map[keys[0]] = "../../other/model.safetensors"
    store.put_bytes("w/model.safetensors.index.json", json.dumps({"weight_map": weight_map}).encode())
    with pytest.raises(ConfigError, match="shards sit beside it"):
        init_weights.read_state("w/", store.get_bytes)


def test_bad_weights_fail_in_preflight_before_any_training(tmp_path, digits):
    store = LocalArtifactStore(tmp_path)
    state = _state(digits)
    first = next(iter(state))
    state[first] = torch.zeros(2, 2)
    store.put_bytes(model_key("acme", "bad"), st_save(state))
    spec_data = {**PARENT, "model": {**PARENT["model"], "init": {"uri": "store://models/bad"}}}
    spec = _resolved(store, spec_data, "acme")
    with pytest.raises(ConfigError, match=f"shape mismatches {first}"):
        preflight(spec, store)
    session = LocalSession(store, "bad-job")
    with pytest.raises(ConfigError, match=f"shape mismatches {first}"):
        train(spec, digits, session)
    assert session.records == []  # nothing trained, nothing reported


def test_resolution_is_per_tenant_and_refuses_what_it_can(tmp_path, digits):
    store = LocalArtifactStore(tmp_path)
    raw = st_save(_state(digits))
    store.put_bytes(model_key("acme", "m"), raw)
    store.put_bytes(model_key("bolt", "m"), raw)
    data = {**PARENT, "model": {**PARENT["model"], "init": {"uri": "store://models/m"}}}
    a, b = _resolved(store, data, "acme"), _resolved(store, data, "bolt")
    assert a.model.init.resolved == "_tenants/acme/models/m/model.safetensors"
    assert b.model.init.resolved == "_tenants/bolt/models/m/model.safetensors"
    with pytest.raises(SpecError) as e:
        _resolved(store, data, "carl")
    assert e.value.errors[0]["field"] == "model.init.uri"
    job = {**PARENT, "model": {**PARENT["model"], "init": {"job": "nope"}}}
    with pytest.raises(SpecError) as e:
        _resolved(store, job)
    assert e.value.errors[0]["field"] == "model.init.job"
    # a client cannot point the workers at a key of its choosing
    forged_init = {"job": "x", "resolved": model_key("acme", "m")}
    forged = {**PARENT, "model": {**PARENT["model"], "init": forged_init}}
    with pytest.raises(SpecError) as e:
        parse_spec(forged, submitted=True)
    assert e.value.errors[0]["field"] == "model.init.resolved"
    # an unresolved init never reaches a store key on a worker
    with pytest.raises(ConfigError, match="not resolved"):
        init_weights.load_init_state(parse_spec(data), store)
