"""The documented commands work as written, from a fresh shell in the repository root.

Every command in a ``bash``/``sh`` block of the README and docs/ is checked: the program
it names must resolve without an activated virtual environment (a bare ``flask`` or
``python -m client`` finds the system's, or nothing), every ``make`` target must exist,
every module run with ``-m`` or ``-A`` must import, and every ``flask`` command must
exist. The README's "try it on your machine" commands are then run for real.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

ROOT = support.ROOT
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Programs a fresh shell has, or that the docs run inside a container (docs/deploy.md).
SYSTEM = {
    *("curl", "python3", "printf", "export", "cp", "chmod", "date", "docker", "cd", "tar"),
    "mkdir",
}
# docs/deploy.md, "Without Docker": nginx in front of gunicorn on a plain host.
SYSTEM |= {"sudo", "apt-get", "nginx", "systemctl"}
SHELL_WORDS = {"for", "do", "done", "if", "then", "fi"}
VENV_PROGRAMS = {"python", "flask", "celery", "gunicorn", "pytest", "ruff"}
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


def fenced_commands(path: Path) -> list[tuple[int, list[str]]]:
    """(block number, command lines) of each shell block, continuations joined."""
    blocks, current, fence = [], [], None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, current = stripped[3:].strip(), []
        elif fence is not None and stripped.startswith("```"):
            if fence in ("bash", "sh", "shell"):
                blocks.append(current)
            fence = None
        elif fence is not None:
            current.append(line)
    joined = ("\n".join(lines).replace("\\\n", " ") for lines in blocks)
    return [(n, [c for c in text.splitlines() if c.strip()]) for n, text in enumerate(joined)]


def simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command on a line: split at | && ; ( ) $( ), without
    comments, and without the target of a redirection."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, skip_next = [[]], False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in (">", ">>", "<"):
            skip_next = True
        elif set(token) <= set("|&;()"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _program(words: list[str]) -> list[str]:
    """The command without its leading VAR=value assignments."""
    while words and ASSIGNMENT.match(words[0]) and words[0] != "KEY=ick_...":
        words = words[1:]
    return words


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", text, re.M))


def _check(words: list[str], activated: bool) -> str | None:
    """None if the command can run as written, else why not."""
    if not words:
        return None
    program = words[0]
    if program == "make":
        missing = [t for t in words[1:] if "=" not in t and t not in _makefile_targets()]
        return f"no make target {missing}" if missing else None
    if program in (".", "source"):
        return None if words[1:] == [".venv/bin/activate"] else "sources something else"
    if program.startswith(".venv/bin/"):
        if not (ROOT / program).exists():
            return f"{program} does not exist"
        return _check_venv_command(Path(program).name, words[1:])
    if program in VENV_PROGRAMS:
        if not activated:
            return f"bare {program!r} is not the project's: write .venv/bin/{program}"
        return _check_venv_command(program, words[1:])
    if program in SYSTEM or program in SHELL_WORDS or program.startswith("KEY="):
        return None
    if program.startswith(".") and not program.startswith(("./", ".venv")):
        return None  # the tail of a word that a $( ) split: "name-$(date).dump"
    return f"unknown program {program!r}"


def _check_venv_command(program: str, args: list[str]) -> str | None:
    for flag in ("-m", "-A", "--app"):
        if flag in args:
            module = args[args.index(flag) + 1]
            if importlib.util.find_spec(module) is None:
                return f"module {module} not found"
    if program == "flask" and len(args) >= 3:
        run = subprocess.run(
            [str(ROOT / ".venv/bin/flask"), *args[:3], "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if run.returncode != 0:
            return f"flask {' '.join(args[:3])}: {run.stderr.strip()[-300:]}"
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_command_runs_from_a_fresh_shell(doc: Path):
    problems = []
    for number, commands in fenced_commands(doc):
        activated = any(c.strip() == ". .venv/bin/activate" for c in commands)
        for command in commands:
            for words in simple_commands(command):
                problem = _check(_program(words), activated)
                if problem:
                    problems.append(f"block {number}: {command!r}: {problem}")
    assert not problems, "\n".join(problems)


def _readme_prose() -> str:
    """The README with its line breaks and indents as single spaces (sentences wrap)."""
    return " ".join((ROOT / "README.md").read_text().split())


def _make_help() -> dict[str, str]:
    """{target: its line} as ``make help`` prints them (the ``## `` comments)."""
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^([a-z][a-z-]*):.*?## (.*)$", text, re.M))


def test_the_readme_names_every_make_target_as_make_help_does():
    # Issue #24: the README's list of targets left four out, and it and `make help`
    # disagreed on the address `make api` listens on.
    readme = _readme_prose()
    listed = re.search(r"`make help` lists the other targets \(([^)]*)\)", readme)
    assert listed, "the README no longer lists the targets `make help` shows"
    targets = _make_help()
    assert set(re.findall(r"`([a-z-]+)`", listed.group(1))) | {"help", "run", "test"} == set(
        targets
    )
    address = re.search(r"`make api` and `make run` on `(\d+\.\d+\.\d+\.\d+:\d+)`", readme)
    assert address, "the README no longer says where `make api` listens"
    assert address.group(1) in targets["api"] and address.group(1) in targets["run"]


WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBERS = {word: n for n, word in enumerate(WORDS, 1)}


def test_the_readme_says_how_many_tests_the_suite_deselects():
    # Issue #24: the README said six while seven were. Only the browser tests' conftest
    # deselects (their SQLite runs), so collecting tests/web counts every one.
    deselecting = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*.py")
        if p != Path(__file__) and "pytest_deselected" in p.read_text()
    }
    assert deselecting == {"tests/web/conftest.py"}
    said = re.search(r"reports (\w+) tests as \*deselected\*", _readme_prose())
    assert said, "the README no longer says how many tests are deselected"
    env = {k: v for k, v in os.environ.items() if k != "WEB_TESTS_ALL_DATABASES"}
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly",
         "-p", "no:cacheprovider", "tests/web"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    counted = re.search(r"\((\d+) deselected\)", collected.stdout)
    assert counted, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert NUMBERS.get(said.group(1), said.group(1)) == int(counted.group(1))


def _try_it_block() -> str:
    """The README's commands for the third terminal of "Try it on your machine"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it on your machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return blocks[1]


def test_the_try_it_commands_work_as_written(stack, photo_server, tmp_path):
    """Run them with bash against a real API and worker and a photo server on loopback."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "client").symlink_to(ROOT / "client")
    photos = photo_server.url("parrot.jpg").rsplit("/", 1)[0].split("://", 1)[1]
    with support.serving(stack.app) as url:
        script = (
            _try_it_block()
            .replace("localhost:5000", url.split("://", 1)[1])
            .replace("127.0.0.1:8000", photos)
        )
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env={**os.environ, "IMGCLF_URL": url},
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert '"label":"macaw"' in run.stdout.replace(" ", "")
    rows = (tmp_path / "var" / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and all("succeeded" in row for row in rows[1:]), rows
    # The try-out writes into var/ (ignored by git, removed by make clean), not the root.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".venv", "client", "var"]


def _webhook_receiver_snippet() -> str:
    """The README's Flask receiver ("Verifying a webhook"), as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Verifying a webhook", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return snippet


def test_the_webhook_verification_snippet_accepts_a_real_delivery_only(stack, photo_server):
    """A real signed delivery from the webhook worker passes the README's receiver; the
    same delivery with its body changed, or checked with another user's secret, does not."""
    from harness.webhook_receiver import Receiver

    client = stack.client()
    user = support.new_user(client)
    with Receiver() as receiver:
        resp = client.post(
            "/v1/jobs",
            json={"url": photo_server.url("parrot.jpg"), "webhook": receiver.url()},
            headers=user["headers"],
        )
        assert resp.status_code == 202, resp.get_json()
        delivery = support.wait_for(
            lambda: receiver.received[0] if receiver.received else None, 60, "a delivery"
        )
    secret = client.get("/v1/webhook-secret", headers=user["headers"]).get_json()["secret"]
    snippet = _webhook_receiver_snippet()
    assert '"whsec_..."' in snippet

    def receiver_app(with_secret: str):
        namespace: dict = {"__name__": "readme_receiver"}
        exec(snippet.replace('"whsec_..."', repr(with_secret)), namespace)
        return namespace["app"].test_client()

    def post(app, body: bytes):
        return app.post("/hook", data=body, headers=delivery.headers)

    good = receiver_app(secret)
    assert post(good, delivery.body).status_code == 204
    assert post(good, delivery.body.replace(b"succeeded", b"failed")).status_code == 400
    other = client.get("/v1/webhook-secret", headers=support.new_user(client)["headers"])
    assert post(receiver_app(other.get_json()["secret"]), delivery.body).status_code == 400
