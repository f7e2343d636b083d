"""A tiny OAuth 2 / OpenID Connect provider on 127.0.0.1, for the recipes' tests.

It signs in one user without asking (``sam@example.com``), answers the discovery document,
the authorization redirect, the code exchange and ``userinfo``, and checks what a real
provider checks: the client's id and secret, the redirect URI and the one-time code. Nothing
leaves the machine.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any
from urllib.parse import urlencode

from flask import Flask, abort, jsonify, redirect, request
from werkzeug.serving import make_server

CLIENT_ID = "flask-koala-recipes"
CLIENT_SECRET = "recipe-secret"
USER = {"sub": "sam", "email": "sam@example.com", "name": "Sam Provider"}


class LocalProvider:
    """The provider app served by werkzeug on a free loopback port, in a thread."""

    def __init__(self) -> None:
        self.codes: dict[str, str] = {}  # code -> redirect_uri
        self.tokens: set[str] = set()
        self.app = self._build()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def _build(self) -> Flask:
        app = Flask("local_provider")

        @app.get("/.well-known/openid-configuration")
        def discovery() -> Any:
            return jsonify(
                issuer=self.url,
                authorization_endpoint=f"{self.url}/authorize",
                token_endpoint=f"{self.url}/token",
                userinfo_endpoint=f"{self.url}/userinfo",
                response_types_supported=["code"],
                subject_types_supported=["public"],
                id_token_signing_alg_values_supported=["RS256"],
            )

        @app.get("/authorize")
        def authorize() -> Any:
            args = request.args
            if args.get("client_id") != CLIENT_ID or args.get("response_type") != "code":
                abort(400)
            code = secrets.token_urlsafe(16)
            self.codes[code] = args["redirect_uri"]
            query = {"code": code, "state": args.get("state", "")}
            return redirect(f"{args['redirect_uri']}?{urlencode(query)}")

        @app.post("/token")
        def token() -> Any:
            form = request.form
            auth = request.authorization
            client_id = auth.username if auth else form.get("client_id")
            client_secret = auth.password if auth else form.get("client_secret")
            if (client_id, client_secret) != (CLIENT_ID, CLIENT_SECRET):
                return jsonify(error="invalid_client"), 401
            redirect_uri = self.codes.pop(form.get("code", ""), None)
            if redirect_uri is None or redirect_uri != form.get("redirect_uri"):
                return jsonify(error="invalid_grant"), 400
            access_token = secrets.token_urlsafe(16)
            self.tokens.add(access_token)
            return jsonify(access_token=access_token, token_type="Bearer", expires_in=3600)

        @app.get("/userinfo")
        def userinfo() -> Any:
            header = request.headers.get("Authorization", "")
            if header.removeprefix("Bearer ") not in self.tokens:
                return jsonify(error="invalid_token"), 401
            return jsonify(USER)

        return app
