"""The OpenAPI document describes exactly the routes the app serves, and its examples hold."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest
from prometheus_client import CollectorRegistry

from orchestrator.config import parse_settings
from orchestrator.intake import build_intake_app
from orchestrator.intake.openapi import build_document
from orchestrator.intake.schemas import Unprocessable, parse_rollback_request
from orchestrator.metrics import Metrics
from orchestrator.store import open_store


def _served_routes() -> set[tuple[str, str]]:
    settings = parse_settings({"sources": {"bot": {"kind": "api", "token": "t-0001"}}})
    store = open_store("sqlite:///unused.db")  # constructing a store does no I/O
    app = build_intake_app(
        store,
        Metrics(CollectorRegistry()),
        settings.sources,
        max_body_bytes=1024,
        default_region="cn-hangzhou",
    )
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def test_document_lists_every_served_route_and_nothing_else() -> None:
    """Paths and methods in /openapi.json equal the app's routes."""
    document = build_document()
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == _served_routes()


def test_every_error_status_has_the_error_body() -> None:
    """Each documented 4xx/5xx answer refers to a response whose body is the Error schema."""
    document = build_document()
    responses = document["components"]["responses"]
    for item in document["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    name = response["$ref"].rsplit("/", 1)[-1]
                    schema = responses[name]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}


def _schema(name: str) -> Any:
    document = build_document()
    # Resolve local refs by embedding the components next to the schema.
    schema = {**document["components"]["schemas"][name]}
    schema["components"] = document["components"]
    return jsonschema_rs.Draft4Validator(schema)


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"app_id": "demo-app"}, True),
        ({"change_order_id": "co-1", "reason": "x", "region": "cn-hangzhou"}, True),
        ({}, False),
        ({"reason": "x"}, False),
        ({"app_id": "demo-app", "extra": 1}, False),
        ({"app_id": "bad/id"}, False),
    ],
)
def test_rollback_request_schema_agrees_with_the_validator(body: Any, valid: bool) -> None:
    """The documented request schema accepts and rejects what the handler does."""
    assert _schema("RollbackRequest").is_valid(body) is valid
    try:
        parse_rollback_request(body)
        accepted = True
    except Unprocessable:
        accepted = False
    assert accepted is valid
