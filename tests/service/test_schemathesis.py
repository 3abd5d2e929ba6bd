"""Schemathesis against the service's own OpenAPI schema: no 5xx, and every response as the schema says.

Requests are generated from the schema (valid ones, and invalid ones it derives from it) and sent to the app
in process, lifespan included. `EXAMPLES` bounds the cases per operation, so this stays a matter of seconds.
"""

from __future__ import annotations

import hypothesis
import schemathesis
from hypothesis import HealthCheck
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.config import Settings
from service.main import create_app
from tests.service.conftest import CPU, MODEL_DIR

# Generated cases per operation.
EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


# Built at collection, as Schemathesis's pytest plugin needs it (`from_fixture` fails on this pytest):
# fetching the schema is the app's first request, so its lifespan (the model load) runs then, once.
app = create_app(Settings(model_dir=MODEL_DIR, providers=CPU, intra_op_threads=1, access_log=False))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)
