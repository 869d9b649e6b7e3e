"""The command-line client: unit tests for its parsing and exit codes, and end-to-end
runs of ``python -m client`` as a subprocess against the real API on a real socket,
a real Celery worker and the real model."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from client.api import ApiError, Unreachable
from client.cli import ExitCode, UsageError, exit_code_for, main
from client.progress import is_final, wait_for_batch
from client.urlfile import UrlLine, parse_url_lines
from harness.webhook_receiver import Receiver
from tests import support

ROOT = Path(__file__).resolve().parents[2]
CATS = {"Egyptian_cat", "tabby", "tiger_cat"}


# --- unit: no server ----------------------------------------------------------------


def test_url_lines_skip_blanks_and_comments_and_keep_file_line_numbers():
    text = "# my photos\n\nhttp://a/1.jpg\n   \n  http://a/2.jpg  \n#x\nhttp://a/p.jpg#frag\n"
    assert parse_url_lines(text) == [
        UrlLine(3, "http://a/1.jpg"),
        UrlLine(5, "http://a/2.jpg"),
        UrlLine(7, "http://a/p.jpg#frag"),
    ]
    assert parse_url_lines("") == [] and parse_url_lines("# only\n\n") == []
    assert parse_url_lines("http://a/1.jpg\r\nhttp://a/2.jpg") == [
        UrlLine(1, "http://a/1.jpg"),
        UrlLine(2, "http://a/2.jpg"),
    ]


def test_a_canceled_batch_is_final_only_when_its_started_jobs_are_done():
    running = {"status": "canceled", "counts": {"processing": 2, "canceled": 5}}
    assert not is_final(running)
    assert is_final({"status": "canceled", "counts": {"processing": 0, "canceled": 5}})
    assert is_final({"status": "completed", "counts": {"succeeded": 3}})
    assert not is_final({"status": "running", "counts": {"succeeded": 3}})


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ApiError(401, "invalid_api_key", "bad key"), ExitCode.AUTH),
        (ApiError(403, "admin_required", "no"), ExitCode.AUTH),
        (ApiError(402, "insufficient_tokens", "broke"), ExitCode.TOKENS),
        (ApiError(422, "invalid_urls", "bad lines"), ExitCode.API),
        (ApiError(404, "not_found", "gone"), ExitCode.API),
        (ApiError(503, "service_unavailable", "down"), ExitCode.API),
        (Unreachable("refused"), ExitCode.UNREACHABLE),
        (UsageError("no file"), ExitCode.USAGE),
        (FileNotFoundError("x"), ExitCode.USAGE),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
    ],
)
def test_exit_codes(exc, code):
    assert exit_code_for(exc) == code


def test_local_problems_are_usage_errors_before_any_request(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMGCLF_URL", "http://127.0.0.1:9")  # nothing may be contacted
    monkeypatch.setenv("IMGCLF_API_KEY", "ick_x")
    assert main(["submit", str(tmp_path / "missing.txt")]) == ExitCode.USAGE
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert main(["submit", str(empty)]) == ExitCode.USAGE
    assert "no URLs" in capsys.readouterr().err
    assert main(["classify", str(tmp_path / "nope.jpg")]) == ExitCode.USAGE
    urls = tmp_path / "urls.txt"
    urls.write_text("http://a/1.jpg\n")
    out = str(tmp_path / "no-such-dir" / "r.jsonl")
    assert main(["submit", str(urls), "--wait", "--out", out]) == ExitCode.USAGE
    assert main(["submit", str(urls), "--out", str(tmp_path / "r.jsonl")]) == ExitCode.USAGE
    assert main(["submit", str(urls), "--allow-failures"]) == ExitCode.USAGE
    monkeypatch.delenv("IMGCLF_API_KEY")
    assert main(["submit", str(urls)]) == ExitCode.USAGE
    assert "IMGCLF_API_KEY" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["submit"])
    assert exc.value.code == 2


def test_unreachable_server_exits_6(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_client(f"http://127.0.0.1:{port}", "ick_x", "classify", "http://a/b.jpg")
    assert result.returncode == ExitCode.UNREACHABLE, result.stderr
    assert "cannot reach" in result.stderr


class FakeClient:
    """Serves a scripted sequence of batch states, as GET /v1/batches/{id} would."""

    def __init__(self, states):
        self.states = list(states)
        self.calls = 0

    def get_batch(self, batch_id):
        self.calls += 1
        return self.states.pop(0)


def _batch(status, succeeded=0, failed=0, queued=0):
    counts = {"queued": queued, "processing": 0, "succeeded": succeeded, "failed": failed}
    return {"id": "b1", "status": status, "total": 4, "counts": {**counts, "canceled": 0}}


def test_polling_backs_off_from_1s_to_2s_and_resets_on_progress():
    from rich.console import Console

    states = [
        _batch("running", queued=4),
        _batch("running", queued=4),
        _batch("running", queued=4),
        _batch("running", queued=4),
        _batch("running", succeeded=1, queued=3),
        _batch("completed", succeeded=3, failed=1),
    ]
    sleeps = []
    client = FakeClient(states[1:])
    final = wait_for_batch(client, states[0], Console(file=io.StringIO()), sleep=sleeps.append)
    assert final["status"] == "completed" and client.calls == 5
    assert sleeps == [1.0, 1.25, 1.5625, 1.953125, 1.0]
    done = wait_for_batch(FakeClient([]), _batch("completed", 4), Console(file=io.StringIO()))
    assert done["counts"]["succeeded"] == 4  # already final: no request at all


# --- integration: the real service on a real socket ----------------------------------


def run_client(url: str, key: str, *args: str, stdin: str | None = None, timeout: float = 240):
    env = {**os.environ, "IMGCLF_URL": url, "IMGCLF_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def live(stack):
    with support.serving(stack.app) as url:
        yield url


@pytest.fixture
def live_user(stack):
    return support.new_user(stack.client())


def _refill(stack, username: str, amount: int) -> None:
    """Top up through the documented admin path: create-admin, then /v1/admin/refill."""
    support.refill(stack.client(), stack.app, username, amount)


def test_classify_a_url_prints_a_table(live, live_user, photo_server):
    result = run_client(live, live_user["key"], "classify", photo_server.url("parrot.jpg"))
    assert result.returncode == 0, result.stderr
    assert "macaw" in result.stdout and "%" in result.stdout


def test_classify_uploads_a_local_file_and_prints_json(live, live_user, photos_dir):
    result = run_client(
        live, live_user["key"], "classify", str(photos_dir / "cat.bmp"), "--json", "--top-k", "3"
    )
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded" and job["input"] == {"filename": "cat.bmp"}
    predictions = job["result"]["predictions"]
    assert len(predictions) == 3 and predictions[0]["label"] in CATS


def test_classify_a_url_that_fails_exits_5_with_the_job_error(live, live_user, photo_server):
    result = run_client(live, live_user["key"], "classify", photo_server.url("missing.jpg"))
    assert result.returncode == ExitCode.API
    assert "fetch_failed" in result.stderr


def test_classify_rejections_map_to_exit_codes(live, live_user, photo_server):
    url = photo_server.url("parrot.jpg")
    bad_key = run_client(live, "ick_not-a-real-key", "classify", url)
    assert bad_key.returncode == ExitCode.AUTH, bad_key.stderr
    assert "invalid_api_key" in bad_key.stderr
    bad_model = run_client(live, live_user["key"], "classify", url, "--model", "resnet9000")
    assert bad_model.returncode == ExitCode.API and "unknown_model" in bad_model.stderr
    bad_url = run_client(live, live_user["key"], "classify", "ftp://example.com/a.jpg")
    assert bad_url.returncode == ExitCode.API and "invalid_url" in bad_url.stderr


def _results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_submit_wait_downloads_one_result_per_line_in_order(
    stack, live, live_user, photo_server, tmp_path
):
    _refill(stack, live_user["username"], 20)
    names = [
        "parrot.jpg",
        "hot_dog.jpg",
        "missing.jpg",
        "bird.bmp",
        "parrot.jpg",
        "notes.jpg",
        "dog.jpg",
        "eagle.jpg",
    ]
    urls = [photo_server.url(n) for n in names]
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("# photos for the CLI test\n\n" + "\n".join(urls) + "\n")
    out = tmp_path / "results.jsonl"

    result = run_client(
        live, live_user["key"], "submit", str(urls_file), "--wait", "--out", str(out)
    )
    # Two lines failed: exit 7 by default, with the results written all the same.
    assert result.returncode == ExitCode.FAILED_LINES, result.stderr
    assert not result.stdout  # progress and the id go to stderr; results to --out
    results = _results(out)
    assert [r["index"] for r in results] == list(range(len(names)))
    assert [r["url"] for r in results] == urls
    expected = ["succeeded"] * len(names)
    expected[2] = expected[5] = "failed"
    assert [r["status"] for r in results] == expected
    assert results[0]["predictions"][0]["label"] == "macaw"
    assert results[4]["predictions"][0]["label"] == "macaw"
    assert results[1]["predictions"][0]["label"] == "hotdog"
    assert results[2]["error"]["code"] == "fetch_failed" and results[2]["predictions"] is None
    assert results[5]["error"]["code"] == "not_an_image"

    batch_id = next(
        line.split()[1] for line in result.stderr.splitlines() if line.startswith("batch ")
    )
    summary = result.stderr[result.stderr.index("2 lines failed:") :].splitlines()
    assert [line.split() for line in summary[1:3]] == [["1", "fetch_failed"], ["1", "not_an_image"]]
    assert f"client retry {batch_id} --wait --out {out}" in summary[3]
    again = tmp_path / "again.jsonl"
    resumed = run_client(
        live, live_user["key"], "wait", batch_id, "--out", str(again), "--allow-failures"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "2 lines failed:" in resumed.stderr  # the summary is shown either way
    assert again.read_text() == out.read_text()

    as_csv = run_client(live, live_user["key"], "wait", batch_id, "--format", "csv")
    assert as_csv.returncode == ExitCode.FAILED_LINES, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["url"] for r in rows] == urls
    assert rows[0]["top_label"] == "macaw" and rows[2]["error_code"] == "fetch_failed"


def test_submit_without_wait_prints_the_id_from_stdin(stack, live, live_user, photo_server):
    result = run_client(
        live, live_user["key"], "submit", "-", stdin=photo_server.url("kite.jpg") + "\n"
    )
    assert result.returncode == 0, result.stderr
    batch_id = result.stdout.strip()
    resp = requests.get(f"{live}/v1/batches/{batch_id}", headers=live_user["headers"], timeout=10)
    assert resp.status_code == 200 and resp.json()["total"] == 1
    done = run_client(live, live_user["key"], "wait", batch_id)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert json.loads(line)["url"] == photo_server.url("kite.jpg")


def test_jsonl_submit_then_retry_with_the_progress_bar(live, live_user, photo_server, tmp_path):
    key = uuid.uuid4().hex
    items = [
        {"custom_id": "row-1", "url": photo_server.url("parrot.jpg")},
        {"custom_id": "row-2", "url": photo_server.url(f"down/{key}/hot_dog.jpg"), "top_k": 2},
    ]
    items_file = tmp_path / "items.jsonl"
    items_file.write_text("".join(json.dumps(item) + "\n" for item in items))
    first = tmp_path / "first.csv"
    result = run_client(
        live, live_user["key"], "submit", str(items_file), "--wait", "--out", str(first)
    )
    assert result.returncode == ExitCode.FAILED_LINES, result.stderr
    assert "1 line failed:" in result.stderr and "fetch_failed" in result.stderr
    rows = list(csv.DictReader(io.StringIO(first.read_text())))
    assert [(r["custom_id"], r["status"]) for r in rows] == [
        ("row-1", "succeeded"),
        ("row-2", "failed"),
    ]
    batch_id = next(
        line.split()[1] for line in result.stderr.splitlines() if line.startswith("batch ")
    )

    photo_server.gate(key).set()  # the host is back
    out = tmp_path / "retried.jsonl"
    retried = run_client(
        live,
        live_user["key"],
        "retry",
        batch_id,
        "--error-code",
        "fetch_failed",
        "--wait",
        "--out",
        str(out),
    )
    assert retried.returncode == 0, retried.stderr
    assert "1 image re-queued" in retried.stderr and "2 ok" in retried.stderr
    results = _results(out)
    assert [(r["custom_id"], r["status"], r["retries"]) for r in results] == [
        ("row-1", "succeeded", 0),
        ("row-2", "succeeded", 1),
    ]
    assert len(results[1]["predictions"]) == 2
    nothing = run_client(live, live_user["key"], "retry", batch_id)
    assert nothing.returncode == ExitCode.API and "nothing_to_retry" in nothing.stderr


def test_submit_with_a_webhook_gets_the_signed_batch_completed_event(
    live, live_user, photo_server, tmp_path
):
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text(photo_server.url("parrot.jpg") + "\n")
    with Receiver() as receiver:
        result = run_client(
            live, live_user["key"], "submit", str(urls_file), "--webhook", receiver.url()
        )
        assert result.returncode == 0, result.stderr
        batch_id = result.stdout.strip()
        delivery = support.wait_for(
            lambda: receiver.received[-1] if receiver.received else None,
            60,
            "the batch.completed delivery",
            interval=0.2,
        )
    secret = requests.get(
        f"{live}/v1/webhook-secret", headers=live_user["headers"], timeout=10
    ).json()["secret"]
    payload = Webhook(secret).verify(delivery.body, delivery.headers)
    assert payload["type"] == "batch.completed" and payload["data"]["id"] == batch_id
    batch = requests.get(f"{live}/v1/batches/{batch_id}", headers=live_user["headers"], timeout=10)
    assert batch.json()["webhook"] == receiver.url()


def test_submit_rejections_map_to_exit_codes(live, live_user, photo_server, tmp_path):
    good = photo_server.url("parrot.jpg")
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text(f"# header\n{good}\n\nnot a url\n{good}\nftp://x.org/a.jpg\n")
    bad_lines = run_client(live, live_user["key"], "submit", str(urls_file))
    assert bad_lines.returncode == ExitCode.API, bad_lines.stderr
    assert "invalid_urls" in bad_lines.stderr
    assert "4, 6" in bad_lines.stderr  # the file's own line numbers, comments counted
    assert f"{urls_file}:4: not a url" in bad_lines.stderr

    urls_file.write_text(good + "\n")
    bad_key = run_client(live, "ick_not-a-real-key", "submit", str(urls_file))
    assert bad_key.returncode == ExitCode.AUTH, bad_key.stderr

    urls_file.write_text("".join(f"{good}?{i}\n" for i in range(6)))  # 6 images, 5 tokens
    broke = run_client(live, live_user["key"], "submit", str(urls_file))
    assert broke.returncode == ExitCode.TOKENS, broke.stderr
    assert "insufficient_tokens" in broke.stderr

    missing = run_client(live, live_user["key"], "wait", "no-such-batch")
    assert missing.returncode == ExitCode.API and "batch_not_found" in missing.stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_waiting_says_how_to_resume(api_stack, photo_server, tmp_path):
    """With no worker the batch stays queued, so the client is surely still waiting."""
    user = support.new_user(api_stack.client())
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text(photo_server.url("parrot.jpg") + "\n")
    out_args = ["--out", str(tmp_path / "my results.csv"), "--format", "csv"]
    with support.serving(api_stack.app) as url:
        env = {**os.environ, "IMGCLF_URL": url, "IMGCLF_API_KEY": user["key"]}
        proc = subprocess.Popen(
            [sys.executable, "-m", "client", "submit", str(urls_file), "--wait", *out_args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # An ignored SIGINT is inherited across exec (and Python then installs no
            # KeyboardInterrupt handler): give the client the default a terminal gives it,
            # whatever the test run's own SIGINT disposition is.
            preexec_fn=_default_sigint,
        )
        try:
            first = proc.stderr.readline()  # "batch <id> (1 images)", printed before waiting
            assert first.startswith("batch "), first
            batch_id = first.split()[1]
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED, err
    resume = f"python -m client wait {batch_id} --out '{tmp_path / 'my results.csv'}' --format csv"
    assert resume in err
    assert user["key"] not in err
    assert out == ""


def test_delete_takes_a_job_or_a_batch_id(stack, live, live_user, photo_server):
    _refill(stack, live_user["username"], 5)
    key, url = live_user["key"], photo_server.url("parrot.jpg")
    job = json.loads(run_client(live, key, "classify", url, "--json").stdout)
    batch_id = run_client(live, key, "submit", "-", stdin=url + "?b\n").stdout.strip()
    assert run_client(live, key, "wait", batch_id).returncode == 0

    for kind, target in (("job", job["id"]), ("batch", batch_id)):
        result = run_client(live, key, "delete", target)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"deleted {kind} {target}"
    gone = run_client(live, key, "delete", job["id"])
    assert gone.returncode == ExitCode.API and "no job or batch" in gone.stderr
    assert (
        requests.get(f"{live}/v1/me", headers=live_user["headers"], timeout=10).json()["tokens"]
        == 5 + 5 - 2
    )  # deleting refunds nothing
