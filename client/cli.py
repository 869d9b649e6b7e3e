"""Command line: ``python -m client {submit,wait,retry,classify,delete}``.

Exit codes are part of the interface (scripts branch on them), so every failure
goes through :func:`exit_code_for` or a command's explicit return:

0 ok · 2 usage or local file · 3 authentication/permission (401/403) ·
4 insufficient tokens (402) · 5 any other API error · 6 server unreachable ·
7 some lines of the batch failed (after ``--wait`` or ``wait``; ``--allow-failures``
makes that 0) · 130 interrupted.

Failed lines exit 7 by default because a script or CI job that runs ``submit --wait``
under ``set -e`` must not go on as if every image had been classified; the results are
downloaded first either way, and a pipeline that handles failed lines from the results
says so with ``--allow-failures``.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.api import TERMINAL_JOB_STATUSES, ApiError, Client, Unreachable
from client.progress import summary, wait_for_batch
from client.urlfile import UrlLine, parse_url_lines, read_url_text

DEFAULT_URL = "http://127.0.0.1:5000"
CLASSIFY_PREFER_WAIT_S = 60
CLASSIFY_POLL_WAIT_S = 30
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class ExitCode(enum.IntEnum):
    OK = 0
    USAGE = 2
    AUTH = 3
    TOKENS = 4
    API = 5
    UNREACHABLE = 6
    FAILED_LINES = 7
    INTERRUPTED = 130


class UsageError(Exception):
    """A problem on this side (arguments, local files): exit 2 without calling the server."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The one mapping from failures to exit codes."""
    if isinstance(exc, ApiError):
        if exc.status in (401, 403):
            return ExitCode.AUTH
        if exc.status == 402:
            return ExitCode.TOKENS
        return ExitCode.API
    if isinstance(exc, Unreachable):
        return ExitCode.UNREACHABLE
    if isinstance(exc, UsageError | OSError | UnicodeDecodeError):
        return ExitCode.USAGE
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.API


def _error(message: str) -> None:
    # Plain print, not rich: server messages may contain [brackets] rich would eat.
    print(f"error: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # Connection flags are accepted before or after the subcommand; SUPPRESS keeps a
    # subparser's unset flag from overwriting one given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"server address (env IMGCLF_URL, default {DEFAULT_URL})",
    )
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env IMGCLF_API_KEY)")

    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Classify images with an imgclf server.",
        parents=[common],
        epilog="exit codes: 0 ok, 2 usage/local file, 3 auth, 4 insufficient tokens, "
        "5 other API error, 6 server unreachable, 7 some lines failed (see --allow-failures), "
        "130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="model name (server default if omitted)")
        p.add_argument("--top-k", type=int, help="predictions per image (server default: 5)")

    def output_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", help="results file (default: stdout)")
        p.add_argument(
            "--allow-failures",
            action="store_true",
            help="exit 0 even when some lines failed (default: exit 7, with a summary "
            "by error code on stderr)",
        )
        p.add_argument(
            "--format",
            choices=("jsonl", "csv"),
            help="results format (default: csv if --out ends in .csv, else jsonl)",
        )

    p = sub.add_parser(
        "submit",
        parents=[common],
        help="submit a file of image URLs as one batch",
        description="Submit FILE (one URL per line; blank lines and # comments ignored; "
        "- for stdin) as one batch. A FILE ending in .jsonl or .ndjson holds one JSON "
        'object per line, {"custom_id": "...", "url": "...", "top_k": N} (custom_id and '
        "top_k optional); the results then carry each line's custom_id. Prints the batch "
        "id at once.",
    )
    p.add_argument("file", metavar="FILE")
    model_flags(p)
    p.add_argument(
        "--webhook",
        metavar="URL",
        help="http(s) URL the server POSTs the signed batch.completed event to",
    )
    p.add_argument("--wait", action="store_true", help="show progress, then download results")
    output_flags(p)
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser(
        "wait",
        parents=[common],
        help="wait for an existing batch and download its results",
        description="Resume waiting on a batch (e.g. after Ctrl-C), then download its results.",
    )
    p.add_argument("batch_id", metavar="BATCH_ID")
    output_flags(p)
    p.set_defaults(handler=cmd_wait)

    p = sub.add_parser(
        "retry",
        parents=[common],
        help="run a batch's failed lines again",
        description="Re-queue the lines of BATCH_ID that failed (one token each), as new "
        "attempts in the same batch. Prints the batch id at once.",
    )
    p.add_argument("batch_id", metavar="BATCH_ID")
    p.add_argument(
        "--error-code",
        action="append",
        dest="error_codes",
        metavar="CODE",
        help="retry only lines failed with this code (e.g. fetch_failed); repeatable",
    )
    p.add_argument("--wait", action="store_true", help="show progress, then download results")
    output_flags(p)
    p.set_defaults(handler=cmd_retry)

    p = sub.add_parser(
        "classify",
        parents=[common],
        help="classify one image (local file or URL)",
        description="Classify one image: an existing file is uploaded, a URL is fetched "
        "by the server.",
    )
    p.add_argument("target", metavar="URL_OR_FILE")
    model_flags(p)
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    p.set_defaults(handler=cmd_classify)

    p = sub.add_parser(
        "delete",
        parents=[common],
        help="delete a finished job or batch",
        description="Delete a finished job, or an ended batch with all its jobs, at once "
        "(results, inputs, webhook events). Tokens are not refunded: the ledger keeps "
        "the charges.",
    )
    p.add_argument("target_id", metavar="JOB_OR_BATCH_ID")
    p.set_defaults(handler=cmd_delete)
    return parser


def make_client(args: argparse.Namespace) -> Client:
    url = getattr(args, "url", None) or os.environ.get("IMGCLF_URL") or DEFAULT_URL
    key = getattr(args, "api_key", None) or os.environ.get("IMGCLF_API_KEY")
    if not key:
        raise UsageError("no API key: pass --api-key or set IMGCLF_API_KEY")
    return Client(url, key)


# --- batches --------------------------------------------------------------------------


def _results_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    return "csv" if args.out and args.out.lower().endswith(".csv") else "jsonl"


def _check_out(out: str | None) -> None:
    """Fail before submitting, not after a long wait, if the results cannot be written."""
    if out and out != "-":
        parent = Path(out).resolve().parent
        if not parent.is_dir():
            raise UsageError(f"{out}: directory {parent} does not exist")
        if Path(out).is_dir():
            raise UsageError(f"{out} is a directory")


def write_results(chunks: Iterable[bytes], out: str | None) -> None:
    """Stream to stdout, or to ``out`` via a ``.part`` file so a broken download
    never leaves a truncated file that looks complete."""
    if not out or out == "-":
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    target = Path(out)
    partial = target.with_name(target.name + ".part")
    try:
        with partial.open("wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _wait_and_download(
    client: Client, batch: dict, args: argparse.Namespace, announce: bool = False
) -> int:
    batch_id = batch["id"]
    try:
        if announce:  # inside the try: a Ctrl-C right after it still gets the resume hint
            _note(f"batch {batch_id} ({_images(batch.get('total'))})")
        batch = wait_for_batch(client, batch, Console(stderr=True))
        write_results(client.iter_results(batch_id, _results_format(args)), args.out)
        failures = failure_codes(client, batch_id) if _failed(batch) else Counter()
    except KeyboardInterrupt:
        _note(
            f"\ninterrupted; batch {batch_id} keeps running on the server. Resume with:\n"
            f"  {resume_command(batch_id, args)}"
        )
        return ExitCode.INTERRUPTED
    where = f"; results in {escape(args.out)}" if args.out and args.out != "-" else ""
    plain = Console(stderr=True, highlight=False)
    plain.print(f"batch {batch_id} {batch.get('status')}: {summary(batch)}{where}")
    if not failures:
        return ExitCode.OK
    _failure_summary(batch_id, failures, args)
    return ExitCode.OK if args.allow_failures else ExitCode.FAILED_LINES


def _failed(batch: dict) -> int:
    return int((batch.get("counts") or {}).get("failed", 0))


def failure_codes(client: Client, batch_id: str) -> Counter[str]:
    """Failed lines per error code, read from the JSON Lines results (whatever format the
    user asked for): the batch's counts say how many failed, not why."""
    codes: Counter[str] = Counter()
    pending = b""
    for chunk in client.iter_results(batch_id, "jsonl"):
        *lines, pending = (pending + chunk).split(b"\n")
        codes.update(_error_code(line) for line in lines if line.strip())
    if pending.strip():
        codes.update([_error_code(pending)])
    codes.pop(None, None)
    return codes


def _error_code(line: bytes) -> str | None:
    row = json.loads(line)
    if row.get("status") != "failed":
        return None
    return str((row.get("error") or {}).get("code") or "unknown")


def _failure_summary(batch_id: str, failures: Counter[str], args: argparse.Namespace) -> None:
    """What failed, by error code, and the command that runs those lines again."""
    total = sum(failures.values())
    _note(f"{total} line{'s' if total != 1 else ''} failed:")
    for code, count in sorted(failures.items(), key=lambda item: (-item[1], item[0])):
        _note(f"  {count:>6}  {code}")
    retry = _command("retry", batch_id, args, "--wait")
    _note(f"run them again with: {retry}  (add --error-code CODE for some codes only)")


def resume_command(batch_id: str, args: argparse.Namespace) -> str:
    """The ``wait`` command that picks up where this one stopped, with the user's options.

    The API key is left out on purpose: a hint is printed, and may be pasted or logged.
    """
    return _command("wait", batch_id, args)


def _command(verb: str, batch_id: str, args: argparse.Namespace, *extra: str) -> str:
    words = [_python(), "-m", "client", verb, batch_id, *extra]
    for flag in ("url", "out", "format"):
        value = getattr(args, flag, None)
        if value:
            words += [f"--{flag}", value]
    if getattr(args, "allow_failures", False):
        words.append("--allow-failures")
    return shlex.join(words)


def _python() -> str:
    """How this interpreter is named from here: `.venv/bin/python` works in a fresh shell."""
    relative = os.path.relpath(sys.executable)
    return "python" if relative.startswith("..") else relative


def _images(n: object) -> str:
    return "1 image" if n == 1 else f"{n} images"


def _invalid_urls(exc: ApiError, entries: list[UrlLine], source: str) -> None:
    """The server's message already names the lines; add the lines themselves."""
    _error(f"{exc.message} ({exc.code})")
    lines = exc.details.get("lines")
    name = "stdin" if source == "-" else source
    by_line = {e.lineno: e.url for e in entries}
    for n in lines[:20] if isinstance(lines, list) else []:
        if n in by_line:
            print(f"  {name}:{n}: {by_line[n]}", file=sys.stderr)


def _needs_wait(args: argparse.Namespace) -> None:
    if (args.out or args.format or args.allow_failures) and not args.wait:
        raise UsageError(
            "--out, --format and --allow-failures need --wait (or use: python -m client wait ID)"
        )


def cmd_submit(args: argparse.Namespace) -> int:
    _needs_wait(args)
    _check_out(args.out)
    try:
        text = read_url_text(args.file)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {args.file}: {exc}") from None
    entries = parse_url_lines(text)
    if not entries:
        raise UsageError(f"{args.file}: no URLs (blank lines and # comments are ignored)")
    client = make_client(args)
    jsonl = args.file.lower().endswith(JSONL_SUFFIXES)
    try:
        batch = client.create_batch(
            text, model=args.model, top_k=args.top_k, jsonl=jsonl, webhook=args.webhook
        )
    except ApiError as exc:
        if exc.code not in ("invalid_urls", "invalid_lines"):
            raise
        _invalid_urls(exc, entries, args.file)
        return exit_code_for(exc)
    if not args.wait:
        print(batch["id"], flush=True)
        _note(
            f"{_images(batch.get('total'))} queued; wait with: {resume_command(batch['id'], args)}"
        )
        return ExitCode.OK
    return _wait_and_download(client, batch, args, announce=True)


def cmd_retry(args: argparse.Namespace) -> int:
    _needs_wait(args)
    _check_out(args.out)
    client = make_client(args)
    batch = client.retry_batch(args.batch_id, args.error_codes)
    if not args.wait:
        print(batch["id"], flush=True)
        _note(
            f"{_images(batch.get('retried'))} re-queued; wait with: "
            f"{resume_command(batch['id'], args)}"
        )
        return ExitCode.OK
    _note(f"{_images(batch.get('retried'))} re-queued")
    return _wait_and_download(client, batch, args, announce=True)


def cmd_wait(args: argparse.Namespace) -> int:
    _check_out(args.out)
    client = make_client(args)
    return _wait_and_download(client, client.get_batch(args.batch_id), args)


# --- single images --------------------------------------------------------------------


def predictions_table(job: dict) -> Table:
    table = Table()
    table.add_column("label")
    table.add_column("score", justify="right")
    for p in (job.get("result") or {}).get("predictions") or []:
        table.add_row(str(p.get("label")), f"{float(p.get('score', 0)) * 100:.2f}%")
    return table


def cmd_classify(args: argparse.Namespace) -> int:
    path = Path(args.target)
    is_file = path.is_file()
    if not is_file and "://" not in args.target:
        # Sending it as a URL would only earn a confusing invalid_url from the server.
        raise UsageError(f"{args.target}: no such file (and not a URL)")
    client = make_client(args)
    opts = {"model": args.model, "top_k": args.top_k, "wait_s": CLASSIFY_PREFER_WAIT_S}
    if is_file:
        try:
            job = client.create_job_file(path, **opts)
        except OSError as exc:
            raise UsageError(f"cannot read {args.target}: {exc}") from None
    else:
        job = client.create_job_url(args.target, **opts)
    try:
        while job.get("status") not in TERMINAL_JOB_STATUSES:
            job = client.get_job(job["id"], wait_s=CLASSIFY_POLL_WAIT_S)
    except KeyboardInterrupt:
        _note(f"\ninterrupted; job {job['id']} keeps running (GET /v1/jobs/{job['id']})")
        return ExitCode.INTERRUPTED
    if args.json:
        print(json.dumps(job, indent=2))
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        _error(
            f"job {job['id']} {job['status']}: {error.get('message', 'no result')} "
            f"({error.get('code', job['status'])})"
        )
        return ExitCode.API
    if not args.json:
        console = Console(highlight=False)
        console.print(predictions_table(job))
        console.print(f"job {job['id']} · {job.get('model')}", style="dim", markup=False)
    return ExitCode.OK


# --- deleting -------------------------------------------------------------------------


def cmd_delete(args: argparse.Namespace) -> int:
    """A job id or a batch id: both are UUIDs, so ask for the job first, then the batch."""
    client = make_client(args)
    try:
        client.delete_job(args.target_id)
        kind = "job"
    except ApiError as exc:
        if exc.code != "job_not_found":
            raise  # job_not_finished, job_in_batch: the message says what to do
        try:
            client.delete_batch(args.target_id)
        except ApiError as batch_exc:
            if batch_exc.code != "batch_not_found":
                raise
            raise ApiError(404, "not_found", f"no job or batch {args.target_id} of yours") from None
        kind = "batch"
    print(f"deleted {kind} {args.target_id}")
    return ExitCode.OK


# --- entry point ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on bad usage, as argparse does
    try:
        return int(args.handler(args))
    except ApiError as exc:
        _error(f"{exc.message} ({exc.code}, HTTP {exc.status})")
        return exit_code_for(exc)
    except (Unreachable, UsageError) as exc:
        _error(str(exc))
        return exit_code_for(exc)
    except KeyboardInterrupt:
        _note("\ninterrupted")
        return ExitCode.INTERRUPTED
