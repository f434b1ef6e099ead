// Drives Debian's Chromium through playwright-core for the browser test: opens the page
// (argv: its URL and the Chromium executable), prints `ready` once its clients are
// connected, then answers the lines it reads: `upload <filename>` uploads through the
// page's tus client and prints the document id; `wait <filename>,…` waits until every
// client in the page shows each name and prints what each shows.
const { chromium } = require('playwright-core');
const readline = require('readline');

const log = [];
const say = (value) => process.stdout.write(`${typeof value === 'string' ? value : JSON.stringify(value)}\n`);

async function main() {
  const [url, executablePath] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    // A closed network: nothing but the pages' own requests.
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--no-first-run', '--disable-sync', '--disable-quic'],
  });
  try {
    const page = await browser.newPage();
    page.on('console', (m) => log.push(`console.${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => log.push(`page error: ${e.message}`));
    page.on('requestfailed', (r) => log.push(`request failed: ${r.url()} ${r.failure() && r.failure().errorText}`));
    await page.goto(url);
    const state = () => page.evaluate(() => window.vellum);
    try {
      await page.waitForFunction(() => ['stomp', 'websocket', 'sse'].every((k) => window.vellum.ready[k]), null,
        { timeout: 30000 });
    } catch (e) {
      say({ error: `the page's clients did not connect: ${e.message}`, state: await state(), log });
      return 1;
    }
    say('ready');
    for await (const line of readline.createInterface({ input: process.stdin })) {
      const [command, argument] = line.trim().split(' ');
      if (command === 'upload') {
        try {
          say({ uploaded: await page.evaluate((name) => window.upload(name, 200000), argument) });
        } catch (e) {
          say({ error: `the tus upload failed: ${e.message}`, state: await state(), log });
        }
      } else if (command === 'wait') {
        const names = argument.split(',');
        const areas = { stomp: '#notifications .notification', websocket: '#job-status li', sse: '#events li' };
        await page.waitForFunction(([areas, names]) => Object.values(areas).every((selector) => names.every((name) =>
          [...document.querySelectorAll(selector)].some((e) => e.textContent.includes(name)))), [areas, names],
        { timeout: 30000 }).catch(() => {});
        const shown = await page.evaluate((areas) => Object.fromEntries(Object.entries(areas).map(([k, selector]) =>
          [k, [...document.querySelectorAll(selector)].map((e) => e.textContent.trim())])), areas);
        const bar = await page.evaluate(() => document.getElementById('upload-progress').value);
        say({ shown, bar, state: await state(), log });
        return 0;
      }
    }
    return 0;
  } finally {
    await browser.close();
  }
}

main().then((code) => process.exit(code), (e) => { say({ error: String((e && e.stack) || e), log }); process.exit(1); });
