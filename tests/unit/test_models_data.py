"""Registry models on registry data; datasets are deterministic and safe to load."""

import io

import numpy as np
import pytest
import torch

from service import catalog
from service.artifacts import LocalArtifactStore
from service.datasets import dataset_key
from service.errors import ConfigError
from service.spec import DataSpec
from workers.data import load_dataset
from workers.data.info import DataInfo
from workers.models import build_model, output_layer


def defaults(name):
    return catalog.BUILTIN_MODELS[name]().model_dump()


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataSpec(name="digits"))


@pytest.mark.parametrize("name", ["mlp", "lenet5", "convnet"])
def test_image_models_on_digits(name, digits):
    m = build_model(name, defaults(name), digits.info, seed=0)
    out = m(digits.x_val[:7])
    assert out.shape == (7, 10)
    assert output_layer(m) in dict(m.named_modules())


def test_lenet5_on_28x28_has_the_classic_shape():
    info = DataInfo(
        kind="image", input_shape=(784,), input_dtype="float32", num_classes=10, image_shape=(1, 28, 28)
    )
    m = build_model("lenet5", defaults("lenet5"), info)
    assert m.classifier.fc1.in_features == 400
    assert m(torch.rand(2, 784)).shape == (2, 10)


def test_gpt_on_text():
    data = load_dataset(DataSpec(name="text", args={"block_size": 32, "max_chars": 20_000}))
    assert data.info.kind == "tokens" and data.info.num_classes == 256
    m = build_model("gpt", {"n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}, data.info)
    logits = m(data.x_val[:3])
    assert logits.shape == (3, 32, 256)
    # causal: changing a later token never changes earlier logits
    x = data.x_val[:1].clone()
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 256
    assert torch.allclose(m(x)[0, :-1], m(y)[0, :-1])


def test_model_that_cannot_take_the_data_is_a_config_error(digits):
    with pytest.raises(ConfigError, match="cannot be built"):
        build_model("gpt", defaults("gpt"), digits.info)


def test_same_seed_same_init():
    info = DataInfo(
        kind="image", input_shape=(64,), input_dtype="float32", num_classes=10, image_shape=(1, 8, 8)
    )
    a, b = (
        build_model("lenet5", {"activation": "relu"}, info, seed=3),
        build_model("lenet5", {"activation": "relu"}, info, seed=3),
    )
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_digits_split_and_normalisation(digits):
    assert digits.info.n_train == 1438 and digits.info.n_val == 359
    assert digits.info.image_shape == (1, 8, 8) and digits.x_train.max() == 16
    again = load_dataset(DataSpec(name="digits"))
    assert torch.equal(again.y_val, digits.y_val)


def test_synthetic_is_deterministic_by_seed():
    a = load_dataset(DataSpec(name="synthetic", args={"n_samples": 500, "seed": 1}))
    b = load_dataset(DataSpec(name="synthetic", args={"n_samples": 500, "seed": 1}))
    c = load_dataset(DataSpec(name="synthetic", args={"n_samples": 500, "seed": 2}))
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    assert a.info.image_shape == (1, 8, 8)


def test_uri_dataset_from_the_store(tmp_path):
    store = LocalArtifactStore(tmp_path)
    buf = io.BytesIO()
    np.savez(buf, X=np.random.rand(50, 4, 4).astype(np.float32), y=np.arange(50) % 3)
    store.put_bytes(dataset_key("t", "small.npz", "npz"), buf.getvalue())
    spec = DataSpec(uri="store://datasets/small.npz", resolved_uri=dataset_key("t", "small.npz", "npz"))
    data = load_dataset(spec, store)
    assert data.info.image_shape == (1, 4, 4) and data.info.num_classes == 3
    assert data.x_train.shape[1] == 16
    with pytest.raises(ConfigError, match="not found"):
        load_dataset(
            DataSpec(uri="store://datasets/none.npz", resolved_uri="_tenants/t/datasets/none.npz"), store
        )
    # a store:// name is a tenant's: read only once the service has resolved it
    store.put_bytes("datasets/small.npz", buf.getvalue())
    with pytest.raises(ConfigError, match="data.uri: store://datasets/small.npz was not resolved"):
        load_dataset(DataSpec(uri="store://datasets/small.npz"), store)


def test_uri_dataset_with_pickled_objects_is_refused(tmp_path):
    store = LocalArtifactStore(tmp_path)
    buf = io.BytesIO()
    np.savez(buf, X=np.array([object()] * 20, dtype=object), y=np.arange(20))
    store.put_bytes(dataset_key("t", "evil.npz", "npz"), buf.getvalue())
    with pytest.raises(ConfigError, match="not an .npz with arrays X and y"):
        load_dataset(
            DataSpec(uri="store://datasets/evil.npz", resolved_uri=dataset_key("t", "evil.npz", "npz")), store
        )
