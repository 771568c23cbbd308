"""A webhook receiver for the tests, written from docs/WEBHOOKS.md only: verifies every
delivery with the Standard Webhooks specification's own library (PyPI `standardwebhooks`) and
writes one JSON line per request to the file named by argv[2].

argv: port_file out_file secret [control_dir]
- control_dir/down exists: answer 503 (the receiver is "down"; nothing is verified).
- control_dir/gone exists: answer 410 Gone.
Prints nothing; writes the port it listens on (127.0.0.1) to port_file.
"""
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

port_file, out_file, secret = sys.argv[1], sys.argv[2], sys.argv[3]
control = sys.argv[4] if len(sys.argv) > 4 else None
hook = Webhook(secret)
lock = threading.Lock()


def record(line):
    with lock, open(out_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        if control and os.path.exists(os.path.join(control, "down")):
            record({"answer": 503, "id": headers.get("webhook-id")})
            return self.reply(503)
        if control and os.path.exists(os.path.join(control, "gone")):
            record({"answer": 410, "id": headers.get("webhook-id")})
            return self.reply(410)
        try:
            payload = hook.verify(body, headers)
        except WebhookVerificationError as e:
            record({"answer": 400, "rejected": str(e)})
            return self.reply(400)
        # The signature covers the body and the timestamp: a changed body, or the same request
        # presented again ten minutes later, is refused.
        tampered = body.replace(b'"data"', b'"Data"', 1)
        old = dict(headers, **{"webhook-timestamp": str(int(headers["webhook-timestamp"]) - 600)})
        binds = []
        for b, h in ((tampered, headers), (body, old)):
            try:
                hook.verify(b, h)
                binds.append(False)
            except WebhookVerificationError:
                binds.append(True)
        record({
            "answer": 204,
            "id": headers["webhook-id"],
            "signatures": len(headers["webhook-signature"].split(" ")),
            "binds_body_and_time": all(binds),
            "event": payload,
            "raw": body.decode(),
            "headers": {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")},
        })
        self.reply(204)

    def reply(self, status):
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
tmp = port_file + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    f.write(str(server.server_address[1]))
os.replace(tmp, port_file)
server.serve_forever()
