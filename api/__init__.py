"""The HTTP API: ``create_app(config=None)`` builds a Flask app from shared.config."""

from __future__ import annotations

import random
import secrets
from typing import Any

from flask import Flask, g, request
from flask_smorest import Api
from flask_swagger_ui import get_swaggerui_blueprint
from werkzeug.middleware.proxy_fix import ProxyFix

from api.auth import KeyCache, dummy_hash
from api.errors import register_error_handlers
from api.json_provider import JSONProvider, invalid_json
from api.metrics import init_metrics
from api.ratelimit import Limits
from api.schemas import ErrorSchema
from api.services import Services, close_db
from api.waits import WaitSlots
from shared import logs
from shared.config import Config

API_TITLE = "imgclf: queued batch image classification"
MULTIPART_OVERHEAD = 1024 * 1024


def create_app(config: Config | None = None, **overrides: Any) -> Flask:
    config = config or Config.from_env()
    if overrides:
        config = config.replace(**overrides)
    logs.configure(config.log_level, config.log_format)
    app = Flask(__name__)
    app.json = JSONProvider(app)  # deep nesting is a 400, not a RecursionError
    app.config.update(
        SECRET_KEY=config.secret_key or secrets.token_hex(32),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.session_cookie_secure,
        MAX_CONTENT_LENGTH=config.max_image_bytes + MULTIPART_OVERHEAD,
        API_TITLE=API_TITLE,
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
    )
    if config.trusted_proxies:
        # The client's address (rate limits on failed logins) comes from X-Forwarded-For.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=config.trusted_proxies)  # type: ignore[method-assign]
    app.extensions["imgclf"] = svc = Services.build(config)
    init_metrics(app, svc)
    app.extensions["imgclf_limits"] = Limits(config)
    app.extensions["imgclf_keys"] = KeyCache(config.api_key_cache_s)
    # Made now, not on the first unknown username (that answer would be slower once).
    dummy_hash(config.bcrypt_rounds)
    app.extensions["imgclf_waits"] = WaitSlots(svc.redis, config)
    app.teardown_appcontext(close_db)
    app.before_request(_bind_request_id)
    app.before_request(_reject_malformed_json)
    app.after_request(_echo_request_id)
    if config.null_runtime:  # fixed answers, not a model: say so on every answer
        app.after_request(_mark_null_runtime)

    app.json.sort_keys = False
    api = ServiceApi(app, spec_kwargs={"components": _security_components(), "security": _SECURITY})
    from api.routes import admin, batches, health, jobs, legacy, users, webhooks

    blueprints = (users.blp, admin.blp, jobs.blp, batches.blp, webhooks.blp, health.blp, legacy.blp)
    for blp in blueprints:
        api.register_blueprint(blp)
    from api.web import web_blp

    app.register_blueprint(web_blp)
    app.register_blueprint(
        get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": API_TITLE}),
        url_prefix="/docs",
    )
    register_error_handlers(app)

    from api.cli import register_cli

    register_cli(app)
    return app


class ServiceApi(Api):
    # Default error responses in the spec use the service's own error format.
    ERROR_SCHEMA = ErrorSchema


_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"basicAuth": []}]


def _security_components() -> dict:
    return {
        "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "API key"},
            "basicAuth": {"type": "http", "scheme": "basic"},
            "metricsToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "METRICS_TOKEN (GET /metrics only)",
            },
        }
    }


def _bind_request_id() -> None:
    # A client-sent id is kept (so callers can correlate), if it is short and plain.
    sent = request.headers.get("X-Request-ID", "")
    valid = 0 < len(sent) <= 64 and sent.replace("-", "").replace("_", "").isalnum()
    # 32 random hex digits, as uuid4().hex gave, without its system call: an id, not a
    # secret (random reseeds in each forked worker).
    g.request_id = sent if valid else f"{random.getrandbits(128):032x}"
    logs.request_id.set(g.request_id)


def _echo_request_id(response):
    response.headers["X-Request-ID"] = g.get("request_id", "")
    return response


#: On every answer of an API configured with RUNTIME=null (benchmarks only).
NULL_RUNTIME_HEADER = "X-Imgclf-Runtime"
NULL_RUNTIME_NOTE = "null: every image gets the same fixed answer, no model runs (benchmarks only)"


def _mark_null_runtime(response):
    response.headers[NULL_RUNTIME_HEADER] = NULL_RUNTIME_NOTE
    return response


def _reject_malformed_json() -> None:
    # One check for every endpoint: a JSON body that does not parse is a 400, not a 422.
    # (get_data, not content_length: a chunked body has no Content-Length.)
    if request.is_json and request.get_data(cache=True) and request.get_json(silent=True) is None:
        raise invalid_json(request.get_data())
