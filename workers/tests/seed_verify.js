// The seed document's Node.js receiver check, run over recorded deliveries.
// Reads JSON lines {body, signature} on stdin; prints how many verified and how many not.
const crypto = require('crypto');
const readline = require('readline');

function verifyWebhookSignature(payload, signature, secret) {
  const hmac = crypto.createHmac('sha256', secret);
  hmac.update(payload);
  const expectedSignature = hmac.digest('base64');

  return signature === expectedSignature;
}

const secret = process.argv[2];
let ok = 0;
let bad = 0;
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const { body, signature } = JSON.parse(line);
  // As the seed's Express handler does: the parsed body, serialised again.
  const req = { body: JSON.parse(body) };
  const payload = JSON.stringify(req.body);
  if (verifyWebhookSignature(payload, signature, secret)) ok += 1; else bad += 1;
}).on('close', () => {
  console.log(JSON.stringify({ ok, bad }));
});
