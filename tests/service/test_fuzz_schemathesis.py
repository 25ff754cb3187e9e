"""schemathesis against the service's own OpenAPI schema, in-process (ASGI): no 5xx, responses match the schema.

Every documented operation is fuzzed - /v1, /v2, health, metrics and, with an admin token configured
and sent, /admin too - with bounded examples in both generation modes: positive (data the schema
allows) and negative (data it forbids, which must be refused with a 4xx, never a 5xx). Checks:

- `not_a_server_error`: no 5xx for any generated request;
- `response_schema_conformance`: every JSON body matches the schema documented for its status;
- `status_code_conformance`: every status answered is documented for its operation;
- `content_type_conformance`: the response's content type is the documented one.

Operations are enumerated at collection time from the schema the app factory builds (building an
app loads no model); the requests go to one started app (lifespan entered once, tiny bundle in a
models directory so admin calls reach the registry), whose served /openapi.json is checked to be
that same schema. No test depends on another having run.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from _pytest.outcomes import Skipped as SkipTest
import schemathesis  # dev extra; `make test` installs it
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import ASGIClient, shutdown_lifespans

from oodguard.service.app import create_app
from oodguard.service.settings import Settings

from .bundle_factory import make_tiny_bundle

TOKEN = "fuzz-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE_URL = "http://testserver"
MAX_EXAMPLES = 50  # per operation and generation mode: bounded, the whole file stays well under a minute
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


def _static_openapi() -> dict:
    # Settings.model_construct: defaults only, no environment, no validation - nothing is loaded. With
    # the token, as the live app below: without one the admin routes are not mounted at all.
    return create_app(Settings.model_construct(admin_token=SecretStr(TOKEN))).openapi()


OPENAPI = _static_openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES, deterministic=True
)


@pytest.fixture(scope="module")
def live_client(tmp_path_factory):
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("OODGUARD_")]}
    root = tmp_path_factory.mktemp("fuzz")
    bundle = make_tiny_bundle(root / "bundle", name="tiny", version="1")
    app = create_app(
        Settings(
            bundle=bundle,
            models_dir=root / "models",
            admin_token=TOKEN,
            max_wait_ms=1.0,
            decode_threads=1,
            request_timeout_s=10.0,
        )
    )
    try:
        with ASGIClient(app, base_url=BASE_URL) as client:  # enters the app's lifespan (once)
            yield client
            shutdown_lifespans()  # the app's shutdown (drains the batcher) before the tmp dirs go
    finally:
        os.environ.update(saved)


def test_the_served_schema_is_the_fuzzed_one(live_client):
    assert live_client.get("/openapi.json").json() == OPENAPI


# The raw application/gzip upload form cannot be generated (binary media type); multipart uploads are.
@pytest.mark.filterwarnings("ignore:Skipped test cases with unsupported payload media types")
@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_api_conforms_to_its_schema(case, live_client):
    case.call_and_validate(base_url=BASE_URL, session=live_client, headers=AUTH, checks=CHECKS)


def test_every_operation_was_fuzzed(live_client):
    """Stands alone (no test reads what another one did): every documented operation gets a few
    cases of its own here, positive and negative, checked like the fuzz test's; both halves answer."""
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 16
    statuses: Counter[int] = Counter()
    fuzzed: Counter[str] = Counter()

    for op in operations:
        label = f"{op.method.upper()} {op.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=3, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                response = case.call_and_validate(base_url=BASE_URL, session=live_client, headers=AUTH, checks=CHECKS)
                statuses[response.status_code] += 1
                fuzzed[label] += 1

            try:
                run()
            except (Unsatisfiable, SkipTest) as exc:  # nothing of this mode to generate for this operation
                if mode is GenerationMode.POSITIVE:
                    raise AssertionError(f"{label}: no positive case could be generated") from exc
    missing = sorted({f"{op.method.upper()} {op.path}" for op in operations} - set(fuzzed))
    assert not missing, missing
    assert statuses[200] > 0 and any(400 <= s < 500 for s in statuses), statuses
    print(f"\nschemathesis, every operation: {sum(fuzzed.values())} requests; statuses {dict(sorted(statuses.items()))}")
