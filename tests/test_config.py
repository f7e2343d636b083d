"""init_app fails fast, naming the key to fix."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from flask import Flask

from flask_koala import ConfigError, Koala
from flask_koala._config import DEFAULT_API_URL, load_config


def init(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    Koala(app)
    return app


def test_defaults() -> None:
    config = load_config({"KOALA_PUBLIC_KEY": "pk_live"})
    assert config.api_url == DEFAULT_API_URL
    assert config.cookie_name == "ko_id"
    assert config.enabled is True
    assert config.suppress_send is False
    assert config.max_queue_size == 10_000
    assert config.shutdown_timeout == 2.0
    assert config.endpoint == f"{DEFAULT_API_URL}/web/projects/pk_live/batch"


def test_suppress_send_defaults_to_testing() -> None:
    assert load_config({}, testing=True).suppress_send is True
    assert load_config({"KOALA_PUBLIC_KEY": "pk"}, testing=False).suppress_send is False


@pytest.mark.parametrize("value", [None, ""])
def test_public_key_required_while_sending(value: Any) -> None:
    with pytest.raises(ConfigError, match="KOALA_PUBLIC_KEY"):
        init(KOALA_PUBLIC_KEY=value)


def test_public_key_not_required_when_disabled() -> None:
    init(KOALA_ENABLED=False)


def test_public_key_not_required_when_suppressed() -> None:
    init(KOALA_SUPPRESS_SEND=True)


@pytest.mark.parametrize("key", ["pk/x", "pk?x", "pk#x", "pk%2F", "pk x", "pk\tx", "pk\x00"])
def test_public_key_must_be_url_safe(key: str) -> None:
    with pytest.raises(ConfigError, match="KOALA_PUBLIC_KEY"):
        init(KOALA_PUBLIC_KEY=key)


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com", "example.com", "http://example.com", "http://10.0.0.1", "https://"],
)
def test_api_url_rejected(url: str) -> None:
    with pytest.raises(ConfigError, match="KOALA_API_URL"):
        init(KOALA_PUBLIC_KEY="pk", KOALA_API_URL=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://koala.example.com",
        "http://localhost:8787",
        "http://127.0.0.1:8787",
        "http://127.1.2.3",
        "http://[::1]:8787",
    ],
)
def test_api_url_accepted(url: str) -> None:
    app = init(KOALA_PUBLIC_KEY="pk", KOALA_API_URL=url + "/")
    assert app.extensions["koala"].config.api_url == url


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://localhost:8787", True),
        ("http://127.1.2.3", True),
        ("https://[::1]:8787/koala", True),
        ("https://koala.example.com", False),
        ("https://127.0.0.1.example.com", False),
        (DEFAULT_API_URL, False),
    ],
)
def test_api_url_on_this_machine_is_told_apart(url: str, local: bool) -> None:
    app = init(KOALA_PUBLIC_KEY="pk", KOALA_API_URL=url)
    assert app.extensions["koala"].config.api_is_local is local


@pytest.mark.parametrize(
    "key",
    [
        "KOALA_TIMEOUT",
        "KOALA_MAX_WORKERS",
        "KOALA_MAX_QUEUE_SIZE",
        "KOALA_MAX_RETRIES",
        "KOALA_SHUTDOWN_TIMEOUT",
    ],
)
@pytest.mark.parametrize("value", [0, -1, "3", True])
def test_numeric_settings_must_be_positive(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        init(KOALA_PUBLIC_KEY="pk", **{key: value})


def test_timeout_pair_accepted() -> None:
    app = init(KOALA_PUBLIC_KEY="pk", KOALA_TIMEOUT=(1, 2.5))
    assert app.extensions["koala"].config.timeout == (1.0, 2.5)


@pytest.mark.parametrize("value", [(1,), (1, 0), (1, 2, 3)])
def test_timeout_pair_rejected(value: Any) -> None:
    with pytest.raises(ConfigError, match="KOALA_TIMEOUT"):
        init(KOALA_PUBLIC_KEY="pk", KOALA_TIMEOUT=value)


def test_boolean_setting_must_be_bool() -> None:
    with pytest.raises(ConfigError, match="KOALA_ENABLED"):
        init(KOALA_PUBLIC_KEY="pk", KOALA_ENABLED="no")


def test_missing_cookie_policy_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"KOALA_MISSING_COOKIE.*'skip', 'defer', 'mint'"):
        init(KOALA_PUBLIC_KEY="pk", KOALA_MISSING_COOKIE="ignore")


def test_init_twice_is_refused() -> None:
    app = init(KOALA_PUBLIC_KEY="pk")
    with pytest.raises(RuntimeError, match="already initialised"):
        Koala().init_app(app)


def test_config_error_is_value_and_runtime_error() -> None:
    error = ConfigError("KOALA_X", "bad")
    assert isinstance(error, ValueError)
    assert isinstance(error, RuntimeError)
    assert str(error).startswith("KOALA_X")


def test_init_app_starts_no_thread() -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    init(KOALA_PUBLIC_KEY="pk", KOALA_API_URL="http://127.0.0.1:9")
    after = {t.name for t in threading.enumerate()}
    assert after == before


# -- browser snippet ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.getkoala.com/v1/pk/sdk.js",
        "https://koala.example.com/sdk.js",
        "http://127.0.0.1:8000/sdk.js",
        "http://localhost/sdk.js",
        "http://[::1]:5000/sdk.js",
        "https://cdn.example.com/npm/koala-sdk@1.2.3/sdk.js",  # '@' in the path
    ],
)
def test_sdk_url_accepted(url: str) -> None:
    assert load_config({"KOALA_SDK_URL": url}, testing=True).sdk_url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://cdn.example.com/sdk.js",
        "//cdn.example.com/sdk.js",
        "javascript:alert(1)",
        "https://",
        "https://[::1",
        "https://cdn.example.com/sdk.js\n",
        "https://cdn.example.com/s dk.js",
    ],
)
def test_sdk_url_rejected(url: str) -> None:
    with pytest.raises(ConfigError, match="KOALA_SDK_URL"):
        load_config({"KOALA_SDK_URL": url}, testing=True)


@pytest.mark.parametrize(
    "url",
    ["https://user:s3cretpw@cdn.example.com/sdk.js", "ftp://user:s3cretpw@cdn.example.com/s.js"],
)
def test_sdk_url_with_credentials_is_refused_without_showing_them(url: str) -> None:
    with pytest.raises(ConfigError, match="KOALA_SDK_URL: must not hold user:password@") as e:
        load_config({"KOALA_SDK_URL": url}, testing=True)
    assert "s3cretpw" not in str(e.value)


def test_sdk_url_defaults_to_none() -> None:
    assert load_config({}, testing=True).sdk_url is None


@pytest.mark.parametrize(
    "settings", [{"x": float("nan")}, {"x": {1, 2}}, {"x": object()}, "host=x", ["host"]]
)
def test_sdk_settings_must_be_a_json_dict(settings: Any) -> None:
    with pytest.raises(ConfigError, match="KOALA_SDK_SETTINGS"):
        load_config({"KOALA_SDK_SETTINGS": settings}, testing=True)


def test_sdk_settings_are_copied() -> None:
    settings: dict[str, Any] = {"sdk_settings": {"autocapture": False}}
    config = load_config({"KOALA_SDK_SETTINGS": settings}, testing=True)
    settings["sdk_settings"]["autocapture"] = True
    assert config.sdk_settings == {"sdk_settings": {"autocapture": False}}


def test_public_key_must_be_ascii() -> None:
    with pytest.raises(ConfigError, match="KOALA_PUBLIC_KEY"):
        init(KOALA_PUBLIC_KEY="pk_éx")


def test_failed_init_app_leaves_the_app_untouched() -> None:
    app = Flask(__name__)
    app.config.update(KOALA_PUBLIC_KEY="pk", KOALA_MISSING_COOKIE="defer")
    with pytest.raises(ConfigError, match="KOALA_MISSING_COOKIE"):
        Koala(app)
    assert "koala" not in app.extensions
    app.secret_key = "now-set"
    Koala(app)  # the fix works without a fresh app


# -- values that used to slip through ----------------------------------------------------


@pytest.mark.parametrize("name", ["ko_id\n", "ko_id\r\n", "ko id", "ko;id", ""])
def test_cookie_name_must_be_a_token(name: str) -> None:
    with pytest.raises(ConfigError, match="KOALA_COOKIE_NAME"):
        init(KOALA_PUBLIC_KEY="pk", KOALA_COOKIE_NAME=name)


@pytest.mark.parametrize(
    "domain",
    [
        "example.com; HttpOnly; SameSite=None",
        "example.com\r\nSet-Cookie: x=1",
        "example.com\n",
        "exa mple.com",
        "example.com,other.com",
        "example..com",
        "example.com.",
        "-example.com",
        "bücher.example",
        "http://example.com",
        "example.com:443",
        "a" * 64 + ".com",
    ],
)
def test_cookie_domain_must_be_a_domain(domain: str) -> None:
    with pytest.raises(ConfigError, match="KOALA_COOKIE_DOMAIN"):
        init(KOALA_PUBLIC_KEY="pk", KOALA_COOKIE_DOMAIN=domain)


@pytest.mark.parametrize(
    "domain", ["example.com", ".example.com", "shop.example.co.uk", "xn--bcher-kva.example"]
)
def test_cookie_domain_accepted(domain: str) -> None:
    app = init(KOALA_PUBLIC_KEY="pk", KOALA_COOKIE_DOMAIN=domain)
    assert app.extensions["koala"].config.cookie_domain == domain


@pytest.mark.parametrize(
    "url",
    [
        "https://koala.example.com\r\n",
        "https://koala.example.com/\nx",
        "https://koala.example.com/a b",
        "https://koala example.com",
        "https://koala.example.com:0",
        "https://koala.example.com:65536",
        "https://koala.example.com:99999",
        "https://koala.example.com:+443",
        "https://koala.example.com:http",
        "https://koala.example.com:",
        "http://[::1]x:80",
        "http://[::g]:80",
        "https://evil.example.com\\.127.0.0.1",
        "http://evil.example.com\\@127.0.0.1/",
        "http://127.0.0.1\\evil.example.com/",
        "https://koala.example.com/p\u00e4th",
        "https://koala.example.com/<x>",
    ],
)
def test_api_url_with_bad_characters_or_port_rejected(url: str) -> None:
    with pytest.raises(ConfigError, match="KOALA_API_URL"):
        init(KOALA_PUBLIC_KEY="pk", KOALA_API_URL=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://user:s3cr3t-pw@koala.example.com",
        "http://user:s3cr3t-pw@127.0.0.1:8787",
        "ftp://user:s3cr3t-pw@koala.example.com",
        "https://user:s3cr3t-pw@koala.example.com:99999",
        "https://user:s3cr3t-pw/x@koala.example.com",
    ],
)
def test_api_url_with_credentials_rejected_without_showing_them(url: str) -> None:
    with pytest.raises(ConfigError, match="KOALA_API_URL") as info:
        init(KOALA_PUBLIC_KEY="pk", KOALA_API_URL=url)
    assert "s3cr3t" not in str(info.value)
    assert "password@" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://koala.example.com:443/collect",
        "https://koala.example.com/a/b-c_d.e~f%20g",
        "http://localhost",
        "https://koala_proxy:8443",
    ],
)
def test_api_url_with_port_or_path_accepted(url: str) -> None:
    app = init(KOALA_PUBLIC_KEY="pk", KOALA_API_URL=url)
    assert app.extensions["koala"].config.api_url == url


@pytest.mark.parametrize("key", [".", "..", "..."])
def test_public_key_of_dots_rejected(key: str) -> None:
    with pytest.raises(ConfigError, match="KOALA_PUBLIC_KEY"):
        init(KOALA_PUBLIC_KEY=key)


def test_public_key_with_dots_inside_accepted() -> None:
    app = init(KOALA_PUBLIC_KEY="pk_a.b")
    assert app.extensions["koala"].config.public_key == "pk_a.b"


@pytest.mark.parametrize("key", ["sk_live_5ecret", "SK_test_1"])
def test_a_secret_key_is_refused_as_the_public_key(key: str) -> None:
    # It would be published in every page's snippet, and in every request's URL.
    with pytest.raises(ConfigError, match=r"KOALA_PUBLIC_KEY.*secret key"):
        init(KOALA_PUBLIC_KEY=key)


def test_max_workers_is_bounded() -> None:
    with pytest.raises(ConfigError, match=r"KOALA_MAX_WORKERS.*at most 64"):
        init(KOALA_PUBLIC_KEY="pk", KOALA_MAX_WORKERS=65)


def test_max_workers_at_the_bound_accepted() -> None:
    app = init(KOALA_PUBLIC_KEY="pk", KOALA_MAX_WORKERS=64)
    assert app.extensions["koala"].config.max_workers == 64


@pytest.mark.parametrize("testing", [False, True])
def test_sync_with_celery_dispatcher_refused(testing: bool) -> None:
    config = {"KOALA_PUBLIC_KEY": "pk", "KOALA_SYNC": True, "KOALA_DISPATCHER": "celery"}
    with pytest.raises(ConfigError, match=r"KOALA_SYNC.*KOALA_DISPATCHER") as info:
        load_config(config, testing=testing)
    assert info.value.key == "KOALA_SYNC"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("KOALA_TIMEOUT", 1e10),
        ("KOALA_TIMEOUT", (1.0, 1e10)),
        ("KOALA_TIMEOUT", 3600.5),
        ("KOALA_SHUTDOWN_TIMEOUT", 1e300),
        ("KOALA_CELERY_PUBLISH_TIMEOUT", 1e10),
    ],
)
def test_waits_longer_than_an_hour_refused(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"{key}: must be at most 3600 seconds"):
        init(KOALA_PUBLIC_KEY="pk", **{key: value})


def test_wait_of_an_hour_accepted() -> None:
    app = init(KOALA_PUBLIC_KEY="pk", KOALA_TIMEOUT=(3600, 3600), KOALA_SHUTDOWN_TIMEOUT=3600)
    assert app.extensions["koala"].config.timeout == (3600.0, 3600.0)


def test_defer_max_age_may_be_long() -> None:
    config = load_config({"KOALA_DEFER_MAX_AGE": timedelta(days=30)}, testing=True)
    assert config.defer_max_age == 30 * 86_400
