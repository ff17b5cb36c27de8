"""Property-based fuzzing driven by the live server's own /openapi.json (schemathesis): for every
documented operation, requests generated from the document (valid ones and ones that break it)
go over real HTTP to a real server (supervisor, gunicorn workers, engine on the tiny model).
Every answer must conform to the document: a documented status, its schema (streamed SSE
events against their declared event schemas), its required headers; and no 5xx but a
documented 503 with Retry-After. Bounded: a fixed number of examples per operation.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from e2e_support import running_server
from hypothesis import HealthCheck, given, settings

import schemathesis
from schemathesis import checks

pytestmark = pytest.mark.timeout(900)
EXAMPLES = 15  # per operation and mode: 12 operations x 2 modes x 15
# Keep valid requests cheap: the point is the shape of answers, not a 1024-sample, 4k-token
# generation on a 2-core box (the server's --max-tokens 4 is the default when absent).
CAPS = {"n": 2, "max_tokens": 4, "max_completion_tokens": 4, "repetition_context_size": 64}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("schema-fuzz"), tiny_model_dir, "--max-tokens", "4",
                        "--max-batch", "8", "--max-queue", "64", workers=2) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def document(server):
    with server.client() as c:
        return c.get("/openapi.json").json()


def _cap(body) -> None:
    """Shrink the costly knobs of a generated body in place (types and validity kept)."""
    if not isinstance(body, dict):
        return
    # (a whole float such as 886.0 is a valid integer to the server: cap those too)
    def number(value) -> bool:
        return type(value) in (int, float)

    for key, limit in CAPS.items():
        value = body.get(key)
        if number(value) and value > limit:
            body[key] = limit
    if number(body.get("min_policy_version")) and body["min_policy_version"] > 0:
        body["min_policy_version"] = 0  # a future version waits (bounded, but a minute)
    for key in ("prompt", "prompt_ids", "messages"):
        value = body.get(key)
        if isinstance(value, list) and len(value) > 2 and isinstance(value[0], (list, str)):
            body[key] = value[:2]


def _check_sse(document: dict, case, response) -> None:
    """Each `data:` event of a streamed answer against the event schemas the document declares."""
    op = document["paths"][case.operation.path][case.method.lower()]
    media = op["responses"][str(response.status_code)]["content"]["text/event-stream"]
    validator = jsonschema.Draft202012Validator({**document, **media["schema"]["contentSchema"]})
    events = [line[len("data: "):] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", response.text[-500:]
    for data in events:
        validator.validate(data if data == "[DONE]" else json.loads(data))


def _operations(document: dict) -> list:
    # from the served document (from_url would leave out GET /openapi.json itself)
    live = schemathesis.openapi.from_dict(document)
    return [result.ok() for result in live.get_all_operations()]


def _cases() -> list[tuple]:
    """(operation label, generation mode): valid inputs everywhere, invalid ones where there is
    a body or parameter to break."""
    from mlxsup.api.spec import build_spec

    out = []
    for path, ops in build_spec()["paths"].items():
        for method, op in ops.items():
            out.append((f"{method.upper()} {path}", "positive"))
            if "requestBody" in op or op.get("parameters"):
                out.append((f"{method.upper()} {path}", "negative"))
    return out


# One test per documented operation (the list comes from the document the server serves, the
# same one build_spec() makes here); valid and invalid bodies both.
@pytest.mark.parametrize("label,mode", _cases())
def test_every_answer_conforms_to_the_live_document(server, document, label, mode):
    (operation,) = [op for op in _operations(document) if op.label == label]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        check_case(server, document, case)

    fuzz()


def check_case(server, document, case) -> None:
    _cap(case.body)
    response = case.call(base_url=server.url, timeout=60)
    status = response.status_code
    headers = {k.lower(): v[0] for k, v in response.headers.items()}  # schemathesis keeps lists
    assert status < 500 or (status == 503 and headers.get("retry-after")), (
        f"{case.method} {case.path} answered {status}: {response.text[:500]}\n{case.as_curl_command()}")
    is_sse = headers.get("content-type", "").startswith("text/event-stream")
    conformance = [checks.status_code_conformance, checks.content_type_conformance,
                   checks.response_headers_conformance]
    if not is_sse:
        conformance.append(checks.response_schema_conformance)
    case.validate_response(response, checks=conformance)
    if is_sse:
        _check_sse(document, case, response)
