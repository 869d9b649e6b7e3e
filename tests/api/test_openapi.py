"""The OpenAPI document is valid and describes every route the app serves."""

from openapi_spec_validator import validate


def test_spec_is_valid_and_complete(client, api_stack):
    spec = client.get("/openapi.json").get_json()
    validate(spec)
    documented = {
        (path, method.upper())
        for path, ops in spec["paths"].items()
        for method in ops
        if method != "parameters"
    }
    served = set()
    for rule in api_stack.app.url_map.iter_rules():
        # The HTML pages (blueprint "web") and the docs themselves are not API operations.
        if rule.endpoint == "static" or rule.endpoint.startswith("web."):
            continue
        if rule.rule.startswith(("/docs", "/openapi")):
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        served |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented


def test_human_docs_are_served_without_outside_hosts(client):
    page = client.get("/docs/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/openapi.json" in html and "https://" not in html


def test_health_probes(client):
    assert client.get("/healthz").get_json()["status"] == "ok"
    # No worker runs here: /readyz says so (tests/api/test_readiness.py), and still
    # reports the database and Redis.
    ready = client.get("/readyz").get_json()
    assert ready["checks"]["database"] == ready["checks"]["redis"] == "ok"
    assert "worker_heartbeat_age_s" in ready["checks"] and "worker" in ready["checks"]
