"""docs/troubleshooting.md: the two lines of logging setup show why a login was skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
SECTION = PAGE[PAGE.index("## Why was a login skipped?") :]

APP = """
from flask import Flask
from flask_login import LoginManager, UserMixin, login_user

from flask_koala import Koala

app = Flask(__name__)
app.config.update(SECRET_KEY="s", KOALA_PUBLIC_KEY="pk_test", KOALA_SUPPRESS_SEND=True)
LoginManager(app)
Koala(app)


class User(UserMixin):
    id = "1"
    email = "jane@example.com"


with app.test_request_context("/login"):  # no ko_id cookie
    login_user(User())
"""


def test_logging_lines_show_the_skip_as_the_page_shows_it() -> None:
    setup, shown = re.findall(r"^```\w+\n(.*?)^```$", SECTION, re.M | re.S)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    done = subprocess.run(
        [sys.executable, "-c", setup + APP],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert shown.strip() in done.stderr.splitlines()
