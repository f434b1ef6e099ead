// A real-time client that reconnects without missing anything, as seeds 002-004 describe:
// it remembers the `sequence` of the last event it received and, when its connection drops,
// connects to the next gateway URL and resumes from there.
//
//   node resuming_client.js json|stomp TOKEN URL...
//
// `json` speaks the WebSocket JSON protocol with `ws` (resuming with `?lastEventId=`);
// `stomp` uses @stomp/stompjs over `ws`, subscribing to /topic/documents (resuming with a
// `last-event-id` header on SUBSCRIBE). URLs are tried in turn, the last one kept.
//
// Prints one JSON line per happening: {"connected": url} once connected (for stomp: once the
// subscription's receipt arrived), {"event": {sequence, type, documentId, filename}} per
// document event and {"closed": code} when a connection drops. Exits when stdin closes.
const WebSocket = require('ws');
const { Client } = require('@stomp/stompjs');

const [mode, token, ...urls] = process.argv.slice(2);
const print = (value) => process.stdout.write(JSON.stringify(value) + '\n');
let last = null;
let attempt = 0;
const nextUrl = () => urls[Math.min(attempt++, urls.length - 1)];

const received = (sequence, message) => {
  last = sequence;
  print({
    event: {
      sequence,
      type: message.type,
      documentId: message.data && message.data.documentId,
      filename: message.data && message.data.filename,
    },
  });
};

if (mode === 'json') {
  const connect = () => {
    const url = nextUrl();
    const resume = last === null ? '' : `&lastEventId=${last}`;
    const socket = new WebSocket(`${url}/ws?token=${token}${resume}`);
    socket.on('message', (data) => {
      const message = JSON.parse(data.toString());
      if (message.type === 'connection_established') print({ connected: url });
      else if (typeof message.sequence === 'number') received(message.sequence, message);
    });
    socket.on('close', (code) => {
      print({ closed: code });
      setTimeout(connect, 200);
    });
    socket.on('error', () => {});
  };
  connect();
} else {
  let url = null;
  const client = new Client({
    webSocketFactory: () => {
      url = nextUrl();
      return new WebSocket(`${url}/ws`, ['v12.stomp', 'v11.stomp', 'v10.stomp']);
    },
    connectHeaders: { Authorization: `Bearer ${token}` },
    heartbeatIncoming: 1000,
    heartbeatOutgoing: 1000,
    reconnectDelay: 200,
    onConnect: () => {
      const headers = { receipt: `sub-${attempt}` };
      if (last !== null) headers['last-event-id'] = String(last);
      client.watchForReceipt(headers.receipt, () => print({ connected: url }));
      client.subscribe('/topic/documents', (message) => {
        received(Number(message.headers.sequence), JSON.parse(message.body));
      }, headers);
    },
    onWebSocketClose: (event) => print({ closed: event.code }),
  });
  client.activate();
}
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
