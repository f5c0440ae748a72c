// Drives headless Chromium over the DevTools protocol (no npm packages): opens the status page,
// lets it watch live traffic, types into the text box key by key, waits for the predictions of
// the whole text, and saves a PNG. Usage: node --experimental-websocket screenshot.mjs URL OUT.PNG
// (Node 22+ needs no flag). Environment: CHROMIUM (default /usr/bin/chromium), WATCH_SECONDS (30),
// TEXT (what to type).
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, out] = process.argv.slice(2);
if (!url || !out) throw new Error("usage: screenshot.mjs URL OUT.PNG");
const chromium = process.env.CHROMIUM || "/usr/bin/chromium";
const watchSeconds = Number(process.env.WATCH_SECONDS || 30);
const text = process.env.TEXT || "The server learns from every tok";
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const profile = mkdtempSync(join(tmpdir(), "kfrtrl-chromium-"));
const browser = spawn(chromium, [
  "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
  "--remote-debugging-port=0", `--user-data-dir=${profile}`, "--window-size=1200,1000", "about:blank",
], { stdio: ["ignore", "ignore", "pipe"] });
browser.stderr.resume();

async function cleanup() {
  browser.kill("SIGTERM");
  await sleep(300);
  rmSync(profile, { recursive: true, force: true });
}

try {
  const portFile = join(profile, "DevToolsActivePort");
  for (let i = 0; i < 200 && !existsSync(portFile); i++) await sleep(100);
  const port = readFileSync(portFile, "utf8").split("\n")[0];
  const targets = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
  const page = targets.find((t) => t.type === "page");
  const socket = new WebSocket(page.webSocketDebuggerUrl);
  await new Promise((resolve, reject) => { socket.onopen = resolve; socket.onerror = reject; });
  let nextId = 1;
  const waiting = new Map();
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.id && waiting.has(message.id)) {
      const { resolve, reject } = waiting.get(message.id);
      waiting.delete(message.id);
      if (message.error) reject(new Error(JSON.stringify(message.error))); else resolve(message.result);
    }
  };
  const call = (method, params = {}) => new Promise((resolve, reject) => {
    const id = nextId++;
    waiting.set(id, { resolve, reject });
    socket.send(JSON.stringify({ id, method, params }));
  });
  const evaluate = async (expression) =>
    (await call("Runtime.evaluate", { expression, returnByValue: true })).result.value;
  const waitFor = async (what, expression, seconds = 30) => {
    for (let i = 0; i < seconds * 10; i++) {
      if (await evaluate(expression)) return;
      await sleep(100);
    }
    throw new Error(`timed out waiting for ${what}`);
  };

  await call("Emulation.setDeviceMetricsOverride", { width: 1200, height: 1000, deviceScaleFactor: 1, mobile: false });
  await call("Page.navigate", { url });
  await waitFor("the model cards", "document.querySelectorAll('.card').length > 0");
  await waitFor("the text box's model", "document.getElementById('try-model').options.length > 0");
  console.log(`watching the live traffic for ${watchSeconds} s`);
  await sleep(watchSeconds * 1000);
  await evaluate("document.getElementById('try-text').focus()");
  for (const ch of text) {
    await call("Input.insertText", { text: ch });
    await sleep(60);
  }
  const bytes = Buffer.byteLength(text, "utf8");
  await waitFor("the predictions of the whole text",
    `document.querySelectorAll('#predictions .prediction').length > 0 &&
     document.querySelector('#predictions .note').textContent.startsWith('${bytes} bytes read')`);
  await sleep(1200); // one more poll, so the charts end at the present
  const { cssContentSize } = await call("Page.getLayoutMetrics");
  const height = Math.ceil(cssContentSize.height);
  await call("Emulation.setDeviceMetricsOverride", { width: 1200, height, deviceScaleFactor: 1, mobile: false });
  await sleep(300);
  const shot = await call("Page.captureScreenshot", { format: "png" });
  writeFileSync(out, Buffer.from(shot.data, "base64"));
  console.log(`saved ${out} (1200x${height})`);
  socket.close();
} finally {
  await cleanup();
}
