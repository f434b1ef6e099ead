# The seed document's Python (Flask) receiver check, run over recorded deliveries.
# Reads JSON lines {body, signature} on stdin; prints how many verified and how many not.
import base64
import hashlib
import hmac
import json
import sys


def verify_webhook_signature(payload: str, signature: str, secret: str) -> bool:
    expected_signature = base64.b64encode(
        hmac.new(
            secret.encode('utf-8'),
            payload.encode('utf-8'),
            hashlib.sha256
        ).digest()
    ).decode('utf-8')

    return hmac.compare_digest(signature, expected_signature)


secret = sys.argv[1]
ok = bad = 0
for line in sys.stdin:
    delivery = json.loads(line)
    # As the seed's handler does: request.get_data(as_text=True), the body as sent.
    if verify_webhook_signature(delivery['body'], delivery['signature'], secret):
        ok += 1
    else:
        bad += 1
print(json.dumps({'ok': ok, 'bad': bad}))
