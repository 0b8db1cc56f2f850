"""The OpenAPI document is valid for the version it declares (openapi-spec-validator), and says
what POST /v1/jobs reads: JSON or YAML, anything else 415."""

from __future__ import annotations

import json

import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from api.app import create_app
from service.settings import Settings
from tests.plugins.fake_ray import FakeRay


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> dict:
    data = tmp_path_factory.mktemp("openapi")
    settings = Settings(data_dir=data, api_tokens="openapi-token-0123456789:t", run_scheduler=False)
    # as served: through JSON
    return json.loads(json.dumps(create_app(settings, ray=FakeRay()).openapi()))


def test_the_document_is_valid_openapi_of_its_declared_version(doc):
    assert doc["openapi"].startswith("3.1.")
    validate(doc)  # picks the validator of the declared version


def test_the_validator_refuses_a_keyword_of_a_later_version(doc):
    """The check can fail: OpenAPI 3.2's `itemSchema` in a 3.1 document is refused."""
    bad = json.loads(json.dumps(doc))
    stream = bad["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    stream["text/event-stream"]["itemSchema"] = {"type": "object"}
    with pytest.raises(OpenAPIValidationError):
        validate(bad)


def test_the_event_stream_is_described_with_3_1_words(doc):
    content = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    # 3.1: the schema of a text/event-stream describes each event
    schema = content["text/event-stream"]["schema"]
    assert schema["required"] == ["id", "event", "data"]
    assert schema["properties"]["event"]["enum"] == ["state", "metric"]
    assert "itemSchema" not in json.dumps(doc)


def test_submit_reads_json_and_yaml_and_documents_415(doc):
    post = doc["paths"]["/v1/jobs"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"application/json", "application/yaml", "application/x-yaml", "text/yaml"}
    for media in content.values():
        assert media["schema"] == {"$ref": "#/components/schemas/JobSpec"}
        assert media["examples"]  # the examples/ specs, for either format
    assert post["responses"]["415"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
