"""A provider's revocation endpoints for the tests, on 127.0.0.1: RFC 7009 token revocation
served by Authlib's RevocationEndpoint (the client authenticated with client_secret_basic or
client_secret_post), and an unlink call of Kakao's kind (POST with the user's access token).

argv: port_file state_file control_dir client_id client_secret token...
Each token argument is "ACCESS,REFRESH" (one grant). The state file is rewritten after every
call: {"revoked": [...tokens...], "unlinked": [...access tokens...], "calls": N}.
control_dir/down: answer 503. control_dir/refuse: answer 401 invalid_client.
"""
import hmac
import json
import os
import sys
import threading

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin
from authlib.oauth2.rfc7009 import RevocationEndpoint
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

port_file, state_file, control, client_id, client_secret = sys.argv[1:6]
lock = threading.Lock()
state = {"revoked": [], "unlinked": [], "calls": 0}


class Client(ClientMixin):
    def get_client_id(self):
        return client_id

    def check_client_secret(self, secret):
        return hmac.compare_digest(secret, client_secret)

    def check_endpoint_auth_method(self, method, endpoint):
        return method in ("client_secret_basic", "client_secret_post")


class Token(TokenMixin):
    def __init__(self, access, refresh):
        self.access, self.refresh, self.revoked = access, refresh, False

    def check_client(self, client):
        return client.get_client_id() == client_id

    def get_scope(self):
        return ""

    def get_expires_in(self):
        return 3600

    def is_revoked(self):
        return self.revoked

    def is_expired(self):
        return False


TOKENS = [Token(*t.split(",", 1)) for t in sys.argv[6:]]


def save():
    tmp = state_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, state_file)


class Revocation(RevocationEndpoint):
    def query_token(self, token_string, token_type_hint):
        for t in TOKENS:
            if token_string in (t.access, t.refresh):
                return t
        return None

    def revoke_token(self, token, request):
        token.revoked = True
        state["revoked"].append(request.form["token"])


app = Flask(__name__)
server = AuthorizationServer(app, query_client=lambda cid: Client() if cid == client_id else None,
                             save_token=lambda token, req: None)
server.register_endpoint(Revocation)


def blocked():
    if os.path.exists(os.path.join(control, "down")):
        return jsonify(error="temporarily_unavailable"), 503
    if os.path.exists(os.path.join(control, "refuse")):
        return jsonify(error="invalid_client"), 401
    return None


@app.post("/oauth/revoke")
def revoke():
    with lock:
        state["calls"] += 1
        answer = blocked() or server.create_endpoint_response(Revocation.ENDPOINT_NAME)
        save()
        return answer


@app.post("/v1/user/unlink")
def unlink():
    with lock:
        state["calls"] += 1
        answer = blocked()
        if answer is None:
            auth = request.headers.get("Authorization", "")
            known = [t for t in TOKENS if auth == f"Bearer {t.access}" and not t.revoked]
            if known:
                known[0].revoked = True
                state["unlinked"].append(known[0].access)
                answer = jsonify(id=42)
            else:
                answer = (jsonify(msg="this access token does not exist", code=-401), 401)
        save()
        return answer


srv = make_server("127.0.0.1", 0, app, threaded=True)
save()
tmp = port_file + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    f.write(str(srv.server_port))
os.replace(tmp, port_file)
srv.serve_forever()
