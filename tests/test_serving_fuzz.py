"""Fuzz the server from the schema it publishes: schemathesis reads /openapi.json (FastAPI writes it from the
pydantic request models of helpers/course/serving/protocol.py) and generates requests for every operation, valid
ones and, for the request bodies, invalid ones too. Each answer must not be a 5xx, and its status, content type
and body must be those the schema documents (issue 20: "with the schema published, fuzz the endpoints from it"):
server.py documents OpenAI's error object for every error status and both content types of a completion.

Bounded to stay a few seconds: a handful of examples per operation, no shrinking, no example database, and a
valid max_tokens over 4 (or n over 2) is lowered to that, which keeps every generation short.
Run it longer: `pytest tests/test_serving_fuzz.py --hypothesis-seed=N` with other seeds, or raise max_examples."""
import json
import urllib.request

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (after the importorskip)
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance)

from helpers.course.serving import start_server  # noqa: E402

KEY = "fuzz-key-31d9"
OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("GET", "/v1/models/{model_id}"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/replicas")]
# no 5xx; every answer's status, content type and body as /openapi.json documents them (server.py's ERRORS, STREAMED)
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def server():
    with start_server(replicas=1, max_batch=8, api_key=KEY, env={"COURSE_IMPL": "solutions"}) as s:
        yield s
        print(f"the server's log, last 3000 characters:\n{s._log_text()[-3000:]}")   # shown if a test failed


@pytest.fixture(scope="module")
def schema(server):
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=10) as response:
        return schemathesis.openapi.from_dict(json.loads(response.read()))


def _shorten(case) -> None:
    """A valid max_tokens (or max_completion_tokens) over 4 becomes 4, and so does chat's default (the rest of the
    context); a valid n over 2 becomes 2. Invalid values stay: they must get their 400."""
    body = case.body
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        if type(body.get(name)) is int and 4 < body[name] <= 256:
            body[name] = 4
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4
    if type(body.get("n")) is int and 2 < body["n"] <= 16:
        body["n"] = 2


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_from_the_published_schema(server, schema, method, path):
    operation = schema[path][method]
    modes = [schemathesis.GenerationMode.POSITIVE] + \
        ([schemathesis.GenerationMode.NEGATIVE] if method == "POST" else [])
    for mode in modes:
        @settings(max_examples=10 if method == "POST" else 4, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            _shorten(case)
            response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            case.validate_response(response, checks=CHECKS)
        call()
    assert server.get("/health")["status"] == "ok"
