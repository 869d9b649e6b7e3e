"""Pages: sign up, log in, classify, bulk, history, account and admin.

The pages are rendered here; everything they do after loading (classify, batches, keys,
refills) goes through the public /v1 API from the browser, authenticated by the session
cookie plus the ``X-CSRF-Token`` header (see api/auth.py). Only sign-up, log-in and
log-out are classic form posts, each checked against the session's CSRF token.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from markupsafe import Markup

from api import accounts, reads, schemas
from api.auth import (
    WEB_NEW_KEY,
    csrf_token,
    log_in,
    log_out,
    server_session_key,
    session_user,
    session_user_id,
    user_by_password,
)
from api.errors import UNAVAILABLE
from api.services import services
from shared.errors import NotFound, ServiceError, ServiceUnavailable
from shared.jobs import job_to_dict
from shared.models import User, as_utc

STATIC = Path(__file__).resolve().parent / "static"
# The first API key waits for the account page this long, in Redis, never in the cookie.
NEW_KEY_TTL_S = 600

web_blp = Blueprint(
    "web",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/app/static",
)

# The pages load nothing from another origin; only images (the user's own URLs and local
# previews) may come from anywhere.
CSP = (
    "default-src 'self'; img-src 'self' data: blob: http: https:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'self'; object-src 'none'"
)


# --- helpers ---------------------------------------------------------------------


@functools.cache
def _asset_version(filename: str) -> str:
    return hashlib.sha256((STATIC / filename).read_bytes()).hexdigest()[:10]


def asset(filename: str) -> str:
    """A static file's URL with a content hash, so browsers never run stale scripts."""
    return url_for("web.static", filename=filename, v=_asset_version(filename))


def _current_user() -> User | None:
    uid = session_user_id()
    return None if uid is None else session_user(uid)


def _csrf_ok() -> bool:
    sent = request.form.get("csrf_token", "").encode()
    expected = session.get("csrf", "").encode()
    return bool(expected) and hmac.compare_digest(sent, expected)


def _safe_next(target: str | None) -> str:
    """Only our own pages are valid targets after logging in (no open redirect)."""
    default = url_for("web.classify")
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/app/") or "\\" in target:
        return default
    return target


def page(view: Callable[..., Any]) -> Callable[..., Any]:
    """A page for logged-in users; others are sent to the log-in page and back."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user = _current_user()
        if user is None:
            return redirect(url_for("web.login", next=request.full_path.rstrip("?")))
        g.web_user = user
        return view(*args, **kwargs)

    return wrapper


def error_page(status: int, title: str, message: str) -> tuple[str, int]:
    return render_template("web/error.html", title=title, message=message), status


def when(value: datetime | str | None) -> Markup:
    """A <time> element in UTC; app.js rewrites it in the reader's own time zone."""
    if value is None:
        return Markup("—")
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    value = as_utc(value)
    iso = value.isoformat().replace("+00:00", "Z")
    return Markup('<time datetime="{}">{}</time>').format(iso, value.strftime("%Y-%m-%d %H:%M UTC"))


def label(value: str | None) -> str:
    return (value or "").replace("_", " ")


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


@web_blp.context_processor
def _inject() -> dict[str, Any]:
    return {
        "me": g.get("web_user"),
        "csrf": csrf_token(),
        "asset": asset,
        "when": when,
        "label": label,
        "plural": plural,
    }


@web_blp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if response.mimetype == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


@web_blp.errorhandler(ServiceError)
def _service_error(exc: ServiceError):
    return error_page(exc.status, "Something went wrong", exc.message)


def _unavailable(_exc: Exception):
    return error_page(
        503,
        "Temporarily unavailable",
        "The service cannot reach its database right now. Please try again in a moment.",
    )


# ServiceUnavailable too: a unit of work raises it when the database is down (api/services.py).
for _exc_class in (*UNAVAILABLE, ServiceUnavailable):
    web_blp.register_error_handler(_exc_class, _unavailable)


# --- signing up, logging in and out ----------------------------------------------


@web_blp.route("/")
def root():
    return redirect(url_for("web.home"))


@web_blp.route("/app/")
def home():
    if _current_user() is None:
        return redirect(url_for("web.login"))
    return redirect(url_for("web.classify"))


def _expired(template: str, **context: Any) -> tuple[str, int]:
    return render_template(
        template,
        form_error="This form has expired. Please try again.",
        **context,
    ), 400


@web_blp.route("/app/signup", methods=["GET", "POST"])
def signup():
    if request.method == "GET":
        if _current_user() is not None:
            return redirect(url_for("web.classify"))
        return render_template("web/signup.html", errors={}, username="")
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    if not _csrf_ok():
        return _expired("web/signup.html", errors={}, username=username)
    errors = {
        field: " ".join(messages)
        for field, messages in schemas.Credentials()
        .validate({"username": username, "password": password})
        .items()
    }
    if not username:
        errors["username"] = "Choose a username."
    elif "username" in errors:
        errors["username"] = (
            "That username is too short or too long."
            if not 3 <= len(username) <= 64
            else "That username has characters that are not allowed."
        )
    if not errors:
        try:
            user, _row, key = accounts.create_user(username, password)
        except ServiceError as exc:
            if exc.code == "rate_limited":
                page_ = render_template(
                    "web/signup.html",
                    errors={},
                    username=username,
                    form_error="Too many accounts were created from your address. "
                    "Please try again later.",
                )
                return page_, 429, exc.headers
            field = "username" if exc.code == "username_taken" else "password"
            if exc.code == "username_taken":
                errors[field] = f"The username “{username}” is taken. Please choose another."
            elif exc.code == "invalid_password":
                errors[field] = "Use a password of 6 to 72 characters."
            else:
                raise
    if errors:
        return render_template("web/signup.html", errors=errors, username=username), 422
    log_in(user)
    _keep_new_key(key)
    return redirect(url_for("web.account", welcome=1))


def _keep_new_key(key: str) -> None:
    # Shown once on the account page. Not in the cookie: Flask's cookie is signed, not
    # encrypted, so anyone who sees it could read the key.
    name = server_session_key(WEB_NEW_KEY)
    if name is not None:  # logged in: the account page is behind login_required
        services().redis.set(name, key, ex=NEW_KEY_TTL_S)


def _pop_new_key() -> str | None:
    name = server_session_key(WEB_NEW_KEY)
    if name is None:
        return None
    with services().redis.pipeline() as pipe:  # MULTI: get and delete as one step
        pipe.get(name)
        pipe.delete(name)
        key, _ = pipe.execute()
    return key.decode() if key else None


@web_blp.route("/app/login", methods=["GET", "POST"])
def login():
    target = request.values.get("next", "")
    if request.method == "GET":
        if _current_user() is not None:
            return redirect(_safe_next(target))
        return render_template("web/login.html", username="", next=target)
    username = request.form.get("username", "").strip()
    if not _csrf_ok():
        return _expired("web/login.html", username=username, next=target)
    try:
        user = user_by_password(username, request.form.get("password", ""))
    except ServiceUnavailable:
        raise  # the database is down: the 503 page, not "wrong password"
    except ServiceError:
        return render_template(
            "web/login.html",
            username=username,
            next=target,
            form_error="Wrong username or password.",
        ), 401
    log_in(user)
    return redirect(_safe_next(target))


@web_blp.route("/app/logout", methods=["POST"])
def logout():
    if not _csrf_ok():
        return error_page(400, "Form expired", "This form has expired. Reload the page to log out.")
    log_out()
    flash("You have logged out.")
    return redirect(url_for("web.login"))


# --- pages for logged-in users ---------------------------------------------------


@web_blp.route("/app/account")
@page
def account():
    new_key = _pop_new_key()
    return render_template(
        "web/account.html",
        new_key=new_key,
        welcome=new_key is not None,
        origin=request.host_url.rstrip("/"),
    )


@web_blp.route("/app/classify")
@page
def classify():
    config = services().config
    return render_template(
        "web/classify.html", max_bytes=config.max_image_bytes, model=config.default_model
    )


@web_blp.route("/app/jobs/<job_id>")
@page
def job(job_id: str):
    try:
        found = reads.job(g.web_user, job_id)
    except NotFound:
        return error_page(404, "Job not found", "There is no such job in your account.")
    return render_template("web/job.html", job=job_to_dict(found))


@web_blp.route("/app/bulk")
@page
def bulk():
    return render_template("web/bulk.html", max_urls=services().config.max_batch_urls)


@web_blp.route("/app/batches/<batch_id>")
@page
def batch(batch_id: str):
    try:
        found = reads.batch(g.web_user, batch_id)
    except NotFound:
        return error_page(404, "Batch not found", "There is no such batch in your account.")
    return render_template("web/batch.html", batch=found)


@web_blp.route("/app/history")
@page
def history():
    recent_batches, recent_jobs = reads.history(g.web_user)
    return render_template("web/history.html", batches=recent_batches, jobs=recent_jobs)


@web_blp.route("/app/admin")
@page
def admin():
    if not g.web_user.is_admin:
        return error_page(
            403, "Administrators only", "This page is for administrators of the service."
        )
    query = request.args.get("q", "").strip()
    return render_template("web/admin.html", users=reads.find_users(query), q=query)
