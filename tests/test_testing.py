"""The pytest plugin in ``flask_koala.testing``, used the way a user's suite uses it.

The end-to-end tests write a small user project (an app module, a ``conftest.py`` opting
into the plugin, test files) with ``pytester`` and run it in a fresh process, so the
plugin is loaded by name exactly as ``pytest_plugins = ["flask_koala.testing"]`` loads it.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import requests
from flask import Flask

import flask_koala._receiver
import flask_koala.testing
from flask_koala import Koala
from flask_koala.testing import KoalaReceiver, ReceivedCall, check_body

from .support import PROFILE_ID, koala_of

# A user's app module, as small as a real one can be: a factory and a login view.
USER_APP = """
from flask import Flask, request
from flask_login import LoginManager, UserMixin, login_user
from flask_koala import Koala

koala = Koala()
login_manager = LoginManager()


class User(UserMixin):
    def __init__(self, id, email):
        self.id, self.email = id, email


USERS = {"jane": User("jane", "jane@example.com")}


@login_manager.user_loader
def load_user(user_id):
    return USERS.get(user_id)


def create_app(config=None):
    app = Flask(__name__)
    app.config.update(SECRET_KEY="test", KOALA_PUBLIC_KEY="pk_test")
    app.config.update(config or {})
    login_manager.init_app(app)
    koala.init_app(app)

    @app.post("/login/<name>")
    def login(name):
        login_user(USERS[name])
        return "ok"

    return app
"""

VISITOR = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"

SUPPRESSED_CONFTEST = """
import pytest
from myapp import create_app

pytest_plugins = ["flask_koala.testing"]


@pytest.fixture
def app():
    return create_app({"TESTING": True})
"""

SENDING_CONFTEST = """
import pytest
from myapp import create_app, koala

pytest_plugins = ["flask_koala.testing"]


@pytest.fixture
def app(koala_receiver):
    app = create_app({
        "TESTING": True,
        "KOALA_SUPPRESS_SEND": False,
        "KOALA_API_URL": koala_receiver.url,
    })
    yield app
    with app.app_context():
        koala.shutdown(5)
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A user's project: the app module and a strict pytest configuration."""
    pytester.makepyfile(myapp=USER_APP)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    return pytester


def run(project: pytest.Pytester) -> pytest.RunResult:
    return project.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)


# -- koala_calls, as a user's suite uses it -----------------------------------------------


@pytest.mark.slow
def test_koala_calls_records_a_login_in_suppressed_mode(project: pytest.Pytester) -> None:
    project.makeconftest(SUPPRESSED_CONFTEST)
    project.makepyfile(
        test_login=f"""
        def test_login_identifies_jane(app, koala_calls):
            client = app.test_client()
            client.set_cookie("ko_id", "{VISITOR}")
            client.post("/login/jane")
            assert [call["email"] for call in koala_calls] == ["jane@example.com"]
            assert koala_calls[0]["profile_id"] == "{VISITOR}"

        def test_testing_app_never_sends(app):
            assert app.extensions["koala"].config.mode == "suppressed"
        """
    )

    run(project).assert_outcomes(passed=2)


@pytest.mark.slow
def test_koala_calls_records_a_login_in_sending_mode(project: pytest.Pytester) -> None:
    project.makeconftest(SENDING_CONFTEST)
    project.makepyfile(
        test_login=f"""
        from myapp import koala

        def test_login_is_recorded_and_delivered(app, koala_calls, koala_receiver):
            client = app.test_client()
            client.set_cookie("ko_id", "{VISITOR}")
            client.post("/login/jane")
            assert koala_calls[0]["email"] == "jane@example.com"
            with app.app_context():
                assert koala.flush(5)
            assert koala_receiver.bodies == koala_calls
            assert koala_receiver.violations == []
        """
    )

    run(project).assert_outcomes(passed=1)


@pytest.mark.slow
def test_koala_receiver_faults_reach_the_users_app(project: pytest.Pytester) -> None:
    project.makeconftest(SENDING_CONFTEST)
    project.makepyfile(
        test_faults=f"""
        from myapp import koala

        def test_retry_after_a_503_delivers_the_same_call(app, koala_receiver):
            koala_receiver.respond_with(503, retry_after=0)
            client = app.test_client()
            client.set_cookie("ko_id", "{VISITOR}")
            client.post("/login/jane")
            with app.app_context():
                assert koala.flush(5)
                assert koala.stats["sent"] == 1
            assert [call.status for call in koala_receiver.calls] == [503, 200]

        def test_suspended_koala_fails_the_call(app, koala_receiver):
            koala_receiver.suspend()
            client = app.test_client()
            client.set_cookie("ko_id", "{VISITOR}")
            assert client.post("/login/jane").status_code == 200
            with app.app_context():
                koala.flush(5)
                assert koala.stats["failed.http_400"] == 1
        """
    )

    run(project).assert_outcomes(passed=2)


@pytest.mark.slow
def test_each_test_sees_only_its_own_calls(project: pytest.Pytester) -> None:
    project.makeconftest(
        """
        import pytest
        from myapp import create_app

        pytest_plugins = ["flask_koala.testing"]


        @pytest.fixture(scope="session")
        def app():
            return create_app({"TESTING": True})
        """
    )
    project.makepyfile(
        test_order=f"""
        def test_first(app, koala_calls):
            client = app.test_client()
            client.set_cookie("ko_id", "{VISITOR}")
            client.post("/login/jane")
            assert len(koala_calls) == 1

        def test_second(app, koala_calls):
            assert koala_calls == []
        """
    )

    run(project).assert_outcomes(passed=2)


@pytest.mark.slow
def test_conftest_may_import_the_module_before_naming_the_plugin(
    project: pytest.Pytester,
) -> None:
    project.makeconftest(
        'from flask_koala.testing import KoalaReceiver\npytest_plugins = ["flask_koala.testing"]\n'
    )
    project.makepyfile(test_x="def test_x(koala_receiver):\n    assert koala_receiver.url\n")

    run(project).assert_outcomes(passed=1)


@pytest.mark.slow
def test_plugin_is_not_loaded_without_opting_in(project: pytest.Pytester) -> None:
    project.makeconftest(
        SUPPRESSED_CONFTEST.replace('pytest_plugins = ["flask_koala.testing"]', "")
    )
    project.makepyfile(test_x="def test_x(koala_calls):\n    pass\n")

    result = run(project)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'koala_calls' not found*"])


@pytest.mark.slow
def test_koala_calls_without_an_app_fixture_says_so(project: pytest.Pytester) -> None:
    project.makeconftest('pytest_plugins = ["flask_koala.testing"]\n')
    project.makepyfile(test_x="def test_x(koala_calls):\n    pass\n")

    result = run(project)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'app' not found*"])


# -- the fixtures, used directly by this suite ----------------------------------------------


def test_koala_calls_starts_empty(koala_calls: list[dict[str, Any]]) -> None:
    assert koala_calls == []


def test_koala_calls_records_the_login_of_this_suites_app(
    client: Any, koala_calls: list[dict[str, Any]]
) -> None:
    client.post("/login/jane")

    assert [call["email"] for call in koala_calls] == ["jane@example.com"]


def test_koala_calls_holds_bodies_as_sent(
    app: Flask,
    client: Any,
    koala: Koala,
    koala_calls: list[dict[str, Any]],
    receiver: KoalaReceiver,
) -> None:
    client.post("/login/jane")
    with app.app_context():
        koala.flush(5)

    assert koala_calls == receiver.bodies


def test_recording_ends_with_the_fixture(app: Flask, koala: Koala) -> None:
    recording = flask_koala.testing._recorded_calls(app)
    calls = next(recording)
    recording.close()

    with app.app_context():
        koala.identify("jane@example.com", profile_id=PROFILE_ID)
        koala.flush(5)

    assert calls == []


def test_koala_calls_on_an_app_without_koala_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"init_app"):
        next(flask_koala.testing._recorded_calls(Flask("plain")))


def test_koala_receiver_is_a_running_receiver(koala_receiver: KoalaReceiver) -> None:
    response = requests.post(koala_receiver.url + "/nope", data=b"{}", timeout=5)

    assert response.status_code == 404
    assert len(koala_receiver.calls) == 1


# -- the module without pytest --------------------------------------------------------------


def test_receiver_names_are_re_exported() -> None:
    assert KoalaReceiver is flask_koala._receiver.KoalaReceiver
    assert ReceivedCall is flask_koala._receiver.ReceivedCall
    assert check_body is flask_koala._receiver.check_body


def test_module_imports_without_pytest() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "import flask_koala.testing as t\n"
        "assert t.KoalaReceiver and not hasattr(t, 'koala_calls')\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.stdout.strip() == "ok", done.stderr


def test_record_calls_of_an_app_needs_no_app_context(app: Flask) -> None:
    from flask_koala.testing import record_calls

    request = app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"})
    with record_calls(app) as calls, request:
        koala_of(app).identify("jane@example.com")
    assert [body["email"] for body in calls] == ["jane@example.com"]
