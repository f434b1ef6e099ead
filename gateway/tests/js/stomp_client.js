// A STOMP client as the seed front ends write it, with the stock libraries: @stomp/stompjs
// over a plain WebSocket (`ws`) or over SockJS (`sockjs-client`).
//
//   node stomp_client.js ws|sockjs|sockjs-xhr-streaming|sockjs-xhr-polling URL TOKEN DESTINATION...
//
// The sockjs modes allow one SockJS transport each: websocket, xhr-streaming, xhr-polling.
//
// Prints one JSON line per happening: {"connected": headers} once CONNECTED, {"ready": true}
// once every subscription is acknowledged by a receipt, {"message": {destination,
// subscription, body}} per MESSAGE, {"error": message, "body": ...} per ERROR frame and
// {"closed": code} when the socket closes. Exits when stdin closes.
const { Client } = require('@stomp/stompjs');
const WebSocket = require('ws');
const SockJS = require('sockjs-client');

const [mode, url, token, ...destinations] = process.argv.slice(2);
const print = (value) => process.stdout.write(JSON.stringify(value) + '\n');

const client = new Client({
  webSocketFactory: () => {
    const transports = { sockjs: 'websocket', 'sockjs-xhr-streaming': 'xhr-streaming', 'sockjs-xhr-polling': 'xhr-polling' }[mode];
    return transports ? new SockJS(url, null, { transports: [transports] }) : new WebSocket(url, ['v12.stomp', 'v11.stomp', 'v10.stomp']);
  },
  connectHeaders: token ? { Authorization: `Bearer ${token}` } : {},
  heartbeatIncoming: 1000,
  heartbeatOutgoing: 1000,
  reconnectDelay: 0,
  onConnect: (frame) => {
    print({ connected: frame.headers });
    let pending = destinations.length;
    if (pending === 0) print({ ready: true });
    destinations.forEach((destination, i) => {
      const receipt = `sub-${i}`;
      client.watchForReceipt(receipt, () => {
        pending -= 1;
        if (pending === 0) print({ ready: true });
      });
      client.subscribe(destination, (message) => {
        print({ message: { destination: message.headers.destination, subscription: message.headers.subscription, body: JSON.parse(message.body) } });
      }, { receipt });
    });
  },
  onStompError: (frame) => print({ error: frame.headers.message, body: frame.body }),
  onWebSocketClose: (event) => print({ closed: event.code }),
});
client.activate();
process.stdin.on('end', () => client.deactivate().then(() => process.exit(0)));
process.stdin.resume();
