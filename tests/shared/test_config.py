import pytest

from shared.config import Config


def test_reads_typed_values_from_the_environment():
    config = Config.from_env(
        {
            "BATCH_MAX": "8",
            "ALLOW_PRIVATE_URLS": "true",
            "MODELS": "mobilenet, mobilenet_v2",
            "FETCH_TIMEOUT_S": "2.5",
            "DATABASE_URL": "sqlite:///x.db",
        }
    )
    assert config.batch_max == 8
    assert config.allow_private_urls is True
    assert config.models == ("mobilenet", "mobilenet_v2")
    assert config.fetch_timeout_s == 2.5
    assert config.database_url == "sqlite:///x.db"
    assert config.effective_prefetch == 32  # two batches for each of the 2 slots


def test_defaults_are_the_embedded_ones():
    config = Config.from_env({})
    assert config.database_url.startswith("sqlite:///")
    assert config.default_model == "mobilenet"
    assert config.allow_private_urls is False
    assert config.effective_broker_url == config.redis_url


def test_refuses_a_prefetch_that_cannot_fill_a_batch():
    with pytest.raises(ValueError, match="WORKER_PREFETCH"):
        Config.from_env({"BATCH_MAX": "32", "WORKER_PREFETCH": "40"})


def test_refuses_an_unknown_worker_pool():
    with pytest.raises(ValueError, match="WORKER_POOL"):
        Config.from_env({"WORKER_POOL": "gevent"})


def test_refuses_a_default_model_that_is_not_served():
    with pytest.raises(ValueError, match="DEFAULT_MODEL"):
        Config.from_env({"MODELS": "mobilenet_v2"})


def test_overrides_win_over_the_environment():
    assert Config.from_env({"BATCH_MAX": "8"}, batch_max=4).batch_max == 4


def test_the_decode_budget_must_hold_the_largest_accepted_image():
    # Otherwise the API would charge for images that no worker could ever decode.
    with pytest.raises(ValueError, match="DECODE_BUDGET_PIXELS must be >= MAX_IMAGE_PIXELS"):
        Config.from_env({"DECODE_BUDGET_PIXELS": "30000000", "MAX_IMAGE_PIXELS": "40000000"})
    assert Config.from_env({"DECODE_BUDGET_PIXELS": "40000000"}).decode_budget_pixels == 40_000_000


def test_retention_takes_fractions_of_a_day_and_refuses_a_negative_one():
    assert Config.from_env({"RETENTION_DAYS": str(60 / 86400)}).retention_s == pytest.approx(60)
    with pytest.raises(ValueError, match="RETENTION_DAYS"):
        Config.from_env({"RETENTION_DAYS": "-1"})


def test_the_bulk_window_defaults_to_one_batch_more_than_the_slots():
    assert Config.from_env({}).effective_bulk_window_batches == 3  # 2 running, 1 waiting
    assert Config.from_env({"WORKER_CONCURRENCY": "4"}).effective_bulk_window_batches == 5
    assert Config.from_env({"BULK_WINDOW_BATCHES": "8"}).effective_bulk_window_batches == 8
    with pytest.raises(ValueError, match="BULK_WINDOW_BATCHES"):
        Config.from_env({"BULK_WINDOW_BATCHES": "-1"})


def test_loader_processes_auto_follows_the_cores(monkeypatch):
    from shared import config as config_module

    for cores, expected in ((1, 0), (2, 0), (3, 0), (4, 3), (16, 15), (64, 63)):
        monkeypatch.setattr(config_module, "usable_cores", lambda n=cores: n)
        assert Config().effective_loader_processes == expected
    assert Config.from_env({"LOADER_PROCESSES": "5"}).effective_loader_processes == 5
    assert Config.from_env({"LOADER_PROCESSES": "0"}).effective_loader_processes == 0
    for bad in ("-1", "many", "2.5"):
        with pytest.raises(ValueError, match="LOADER_PROCESSES"):
            Config.from_env({"LOADER_PROCESSES": bad})


def test_the_null_runtime_needs_its_own_setting_not_allow_private_urls():
    # Issue #23: ALLOW_PRIVATE_URLS (which also turns off SSRF protection) used to permit it.
    with pytest.raises(ValueError, match="ALLOW_NULL_RUNTIME=1"):
        Config.from_env({"RUNTIME": "null", "ALLOW_PRIVATE_URLS": "1"})
    with pytest.raises(ValueError, match="ALLOW_NULL_RUNTIME=1"):
        Config.from_env({"RUNTIME": "null"})
    allowed = Config.from_env({"RUNTIME": "null", "ALLOW_NULL_RUNTIME": "1"})
    assert allowed.null_runtime and not allowed.allow_private_urls
    assert not Config.from_env({"ALLOW_NULL_RUNTIME": "1"}).null_runtime


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://imgclf:pw@postgres:5432/imgclf",  # compose's database
        "postgresql+psycopg://u:pw@db.internal:5432/imgclf",
        "postgresql+psycopg://u:pw@10.0.0.5/imgclf",
        "postgresql+psycopg://u:pw@/imgclf?host=db.internal",
    ],
)
def test_the_null_runtime_is_refused_next_to_a_database_on_another_host(url):
    with pytest.raises(ValueError, match="another host"):
        Config.from_env({"RUNTIME": "null", "ALLOW_NULL_RUNTIME": "1", "DATABASE_URL": url})


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///var/bench.db",
        "postgresql+psycopg://postgres@127.0.0.1:5432/imgclf_bench",
        "postgresql+psycopg://postgres@localhost/imgclf_bench",
        "postgresql+psycopg://postgres@/imgclf_bench?host=/var/run/postgresql",
    ],
)
def test_the_null_runtime_runs_on_a_local_database(url):
    env = {"RUNTIME": "null", "ALLOW_NULL_RUNTIME": "1", "DATABASE_URL": url}
    assert Config.from_env(env).null_runtime
