"""A webhook receiver that verifies every delivery the way Vellum's users do.

Each request is checked with the independent `standardwebhooks` library (Standard Webhooks
headers) and with the seed receivers' Python snippet (`X-Webhook-Signature`), and reported
as one JSON line on stdout. The first line printed is the port it listens on.

  /plain/...  endpoints whose secret is the plain string --plain-secret
  /whsec/...  endpoints whose secret is the whsec_ value --whsec-secret

--fail-first answers 503 to the first attempt of every webhook-id; while the file named by
--slow-file exists, every answer takes 3 seconds.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


# The seed document's Python receiver, verbatim.
def verify_webhook_signature(payload: str, signature: str, secret: str) -> bool:
    expected_signature = base64.b64encode(
        hmac.new(
            secret.encode('utf-8'),
            payload.encode('utf-8'),
            hashlib.sha256
        ).digest()
    ).decode('utf-8')

    return hmac.compare_digest(signature, expected_signature)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plain-secret", required=True)
    parser.add_argument("--whsec-secret", required=True)
    parser.add_argument("--fail-first", action="store_true")
    parser.add_argument("--slow-file")
    args = parser.parse_args()
    seen_ids = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            plain = self.path.startswith("/plain")
            key = args.plain_secret.encode() if plain else args.whsec_secret
            try:
                Webhook(key).verify(body, headers)
                standard = True
            except WebhookVerificationError:
                standard = False
            seed = None
            if plain:
                seed = verify_webhook_signature(
                    body.decode("utf-8"), headers.get("x-webhook-signature", ""), args.plain_secret)
            msg_id = headers.get("webhook-id", "")
            with lock:
                first = (self.path, msg_id) not in seen_ids
                seen_ids.add((self.path, msg_id))
            status = 503 if (args.fail_first and first) else 200
            report = {
                "path": self.path,
                "id": msg_id,
                "eventType": headers.get("x-event-type"),
                "timestamp": headers.get("x-timestamp"),
                "standard": standard,
                "seed": seed,
                "status": status,
                "body": body.decode("utf-8"),
                "legacy": headers.get("x-webhook-signature"),
            }
            with lock:
                sys.stdout.write(json.dumps(report) + "\n")
                sys.stdout.flush()
            # Reported on arrival, answered later: a test may kill the sender meanwhile.
            if args.slow_file and os.path.exists(args.slow_file):
                time.sleep(3)
            answer = b'{"received": true}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
