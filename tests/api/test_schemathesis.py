"""``schemathesis run`` with all its checks, against the API on a real socket (real
PostgreSQL and Redis): the OpenAPI document tells the truth (issue #25, item 4).

Bounded (``MAX_EXAMPLES`` per operation, a fixed seed) to stay near a minute on two
cores. Every check left out, for an operation or everywhere, is in ``EXCLUDED`` with
the reason; a status a check would not expect but the spec documents is in
``EXPECTED``. tests/api/test_fuzz.py drives more examples for the no-5xx check alone.

tests/api/schemathesis_hooks.py tells the generator what is configuration rather than
API: this deployment's models (the spec documents ``model`` as a string), how a JSON
Lines body goes on the wire, and a real file for each image type an upload may be.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from api import create_app
from tests import support

MAX_EXAMPLES = 10
SEED = 25
MODELS = "mobilenet"

# (method, path regex or None for every operation, check, why it is left out)
EXCLUDED = [
    (
        "GET",
        "^/v1/(jobs|batches)$",
        "positive_data_acceptance",
        "a cursor is opaque: only a next_cursor the API gave is valid, any other string is "
        "422 invalid_cursor by design, and no schema can make a generator produce one",
    ),
]

EXCLUDED.append(
    (
        "POST",
        "^/(v1/users|register)$",
        "negative_data_rejection",
        "a password is 6 to 72 bytes (bcrypt's limit), which JSON Schema cannot state: the spec "
        "gives two subsets that are always valid (72 printable ASCII characters, or 18 of "
        "anything), so a value outside both can still be valid bytes-wise (19 two-byte "
        "characters) and is rightly accepted",
    )
)

# (method, path regex, check, statuses it should also accept, why)
EXPECTED = [
    (
        "GET",
        "^/readyz$",
        "not_a_server_error",
        ["503"],
        "no worker runs here: /readyz answers its documented 503 with the failing check",
    ),
    (
        "POST",
        "^/(classify|predict)$",
        "not_a_server_error",
        ["504"],
        "no worker runs here: the synchronous seed endpoints wait MAX_WAIT_S (1 s), then "
        "answer their documented 504 timeout",
    ),
]


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def config_file(path) -> str:
    lines = []
    for method, pattern, check, why in EXCLUDED:
        lines += [f"# {why}", "[[operations]]", f'include-method = "{method}"']
        lines += [f"include-path-regex = '{pattern}'"] if pattern else []
        lines += [f"checks.{check}.enabled = false", ""]
    for method, pattern, check, statuses, why in EXPECTED:
        defaults = ["2xx", "3xx", "4xx"]
        lines += [f"# {why}", "[[operations]]", f'include-method = "{method}"']
        lines += [f"include-path-regex = '{pattern}'"]
        lines += [f"checks.{check}.expected-statuses = {_toml_list(defaults + statuses)}", ""]
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def target(postgres_url):
    config = support.migrated(
        support.test_config(
            postgres_url,
            max_wait_s=1,
            models=(MODELS,),
            # Schemathesis sends invalid credentials on purpose, many times.
            login_failure_limit="100000/second",
            login_failure_limit_per_ip="100000/second",
            rate_limit_delete="100000/second",
        )
    )
    app = create_app(config)
    user = support.new_user(app.test_client())
    admin = support.make_admin(app)
    resp = app.test_client().post(
        "/v1/admin/refill",
        json={"username": user["username"], "amount": 1_000_000},
        headers=admin["headers"],
    )
    assert resp.status_code == 200, resp.get_json()
    with support.serving(app) as url:
        yield url, user
    support.delete_redis_prefix(config.queue_prefix)


def test_every_check_is_on_by_default():
    """No --checks flag: an explicit list would override the per-operation exclusions
    (the command line wins over the config file), and 4.x enables every check anyway."""
    from schemathesis.checks import CHECKS, load_all_checks
    from schemathesis.config import SchemathesisConfig

    load_all_checks()
    config = SchemathesisConfig().projects.default.checks_config_for()
    names = CHECKS.get_all_names()
    assert len(names) >= 14
    assert [n for n in names if not config.get_by_name(name=n).enabled] == []


def test_schemathesis_run_with_all_checks_finds_nothing(target, tmp_path):
    url, user = target
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks",
        "IMGCLF_TEST_MODELS": MODELS,
    }
    run = subprocess.run(
        [
            str(support.ROOT / ".venv/bin/schemathesis"),
            "--no-color",
            "--config-file",
            config_file(tmp_path / "schemathesis.toml"),
            "run",
            f"{url}/openapi.json",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--header",
            f"Authorization: {user['headers']['Authorization']}",
        ],
        cwd=support.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-3000:]
