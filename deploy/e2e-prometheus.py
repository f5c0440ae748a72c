#!/usr/bin/env python3
"""End-to-end observability check with a real Prometheus (Debian's `prometheus` package).

Starts `kfrtrl serve` on loopback with a temporary data directory and a Prometheus that scrapes it
every second with the shipped alert rules loaded; streams known text to two streams over HTTP
(learned, advanced with learn: false, and predicted) and to a third over WebSocket (one request
learned, one refused); then asks Prometheus's HTTP API for the
counters and the loss and checks that they equal what was sent: symbols by mode, the count and sum
of the loss histogram against the per-token losses the server returned, a histogram bucket, and the
moving-average gauge against the model's own stats, and the WebSocket replies by status, their
latency count and the client's close. Also: every shipped rule evaluates without
error, and every query of the Grafana dashboard runs (the loss and WebSocket panels with data).

    deploy/e2e-prometheus.py [path/to/kfrtrl]     (default: target/debug/kfrtrl)
"""

import base64
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXTS = {
    "e2e-alice": ["It was the best of times, it was the worst of times, ", "it was the age of wisdom, "],
    "e2e-bob": ["to be or not to be, that is the question", " whether 'tis nobler in the mind"],
}
ADVANCE = ("e2e-alice", "it was the age of foolishness")
# Over WebSocket: one request that learns, one refused (an empty request: 422).
WEBSOCKET = ("e2e-carol", "all happy families are alike")
PREDICT = ("e2e-bob", " to suffer")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def websocket_exchange(addr, path, messages, timeout=10):
    """A minimal RFC 6455 client (the standard library has none): the handshake, one masked text
    frame per message and its reply (answering pings meanwhile), then a clean close."""
    sock = socket.create_connection(tuple(addr.rsplit(":", 1)), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    stream = sock.makefile("rb")
    status = stream.readline()
    if b" 101 " not in status:
        raise SystemExit(f"WebSocket handshake refused: {status!r}")
    while stream.readline() not in (b"\r\n", b""):
        pass

    def send(opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        sock.sendall(bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive():
        first, second = stream.read(2)
        n = second & 0x7F
        if n >= 126:
            n = int.from_bytes(stream.read(2 if n == 126 else 8), "big")
        return first & 0x0F, stream.read(n)

    replies = []
    for message in messages:
        send(0x1, json.dumps(message).encode())
        while True:
            opcode, payload = receive()
            if opcode == 0x9:
                send(0xA, payload)
            elif opcode == 0x1:
                replies.append(json.loads(payload))
                break
            else:
                raise SystemExit(f"unexpected WebSocket frame {opcode}: {payload!r}")
    send(0x8, (1000).to_bytes(2, "big"))
    while receive()[0] != 0x8:
        pass
    sock.close()
    return replies


def wait(what, condition, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def start_server(binary, data_dir):
    env = {"KFRTRL_LISTEN": "127.0.0.1:0", "KFRTRL_DATA_DIR": str(data_dir), "KFRTRL_LOG_FORMAT": "json"}
    process = subprocess.Popen([binary, "serve"], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = {}
    ready = threading.Event()

    def read():
        for line in process.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "listening":
                found["addr"] = entry["addr"]
            if entry.get("message") == "ready":
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60):
        process.kill()
        raise SystemExit("the server did not become ready")
    return process, found["addr"]


def start_prometheus(work, target):
    port = free_port()
    rules = ROOT / "deploy/prometheus/rules/kfrtrl.rules.yml"
    config = work / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{rules}']\n"
        "scrape_configs:\n"
        f"  - job_name: kfrtrl\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    subprocess.run(["promtool", "check", "config", str(config)], check=True, stdout=subprocess.DEVNULL)
    log = open(work / "prometheus.log", "w")
    process = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    wait("Prometheus to be ready", lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200)
    return process, base


def query(base, promql):
    reply = http(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    if reply["status"] != "success":
        raise SystemExit(f"query {promql} failed: {reply}")
    return reply["data"]["result"]


def scalar(base, promql):
    result = query(base, promql)
    if len(result) != 1:
        raise SystemExit(f"{promql}: expected one series, got {result}")
    return float(result[0]["value"][1])


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/debug/kfrtrl")
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install prometheus")
    work = pathlib.Path(tempfile.mkdtemp(prefix="kfrtrl-e2e-"))
    server = prometheus = None
    checks = []

    def check(ok, what):
        checks.append((ok, what))
        print(("ok      " if ok else "FAILED  ") + what)

    try:
        server, addr = start_server(binary, work / "data")
        prometheus, prom = start_prometheus(work, addr)
        api = f"http://{addr}/v1/models/default/streams"
        # One scrape before any traffic, so that every rate has its zero to start from.
        wait("a first scrape", lambda: query(prom, 'kfrtrl_symbols_total{model="default", mode="learn"} == 0'), 30)

        learned = advanced = predicted = 0
        losses = []
        for stream, chunks in TEXTS.items():
            for text in chunks:
                reply = http(f"{api}/{stream}/tokens", {"text": text, "return_losses": True})
                losses += reply["losses_bits"]
                learned += len(text.encode())
        stream, text = WEBSOCKET
        learned_reply, refused_reply = websocket_exchange(
            addr, f"/v1/models/default/streams/{stream}/ws",
            [{"text": text, "return_losses": True}, {"tokens": []}])
        losses += learned_reply["losses_bits"]
        learned += len(text.encode())
        check(refused_reply.get("status") == 422, f"a refused WebSocket request gets its problem: {refused_reply}")
        stream, text = ADVANCE
        reply = http(f"{api}/{stream}/tokens", {"text": text, "learn": False, "return_losses": True})
        losses += reply["losses_bits"]
        advanced += len(text.encode())
        stream, text = PREDICT
        http(f"{api}/{stream}/predict", {"text": text})
        predicted += len(text.encode())
        stats = http(f"http://{addr}/v1/models/default")["stats"]
        answered = time.time()

        # Wait for a scrape that started after the last reply, then compare. (Waiting for a
        # non-zero count instead once caught a scrape in the middle of the predict: 5 of its 10.)
        wait("Prometheus to scrape after the last reply",
             lambda: query(prom, f'timestamp(kfrtrl_symbols_total{{model="default", mode="predict"}}) > {answered}'),
             30)
        for mode, expected in (("learn", learned), ("advance", advanced), ("predict", predicted)):
            got = scalar(prom, f'kfrtrl_symbols_total{{job="kfrtrl", model="default", mode="{mode}"}}')
            check(got == expected, f"kfrtrl_symbols_total{{mode={mode}}} = {got:g}, sent {expected}")
        count = scalar(prom, 'kfrtrl_loss_bits_count{model="default"}')
        check(count == len(losses), f"kfrtrl_loss_bits_count = {count:g}, consumed {len(losses)}")
        total = scalar(prom, 'kfrtrl_loss_bits_sum{model="default"}')
        check(abs(total - sum(losses)) <= 1e-9 * sum(losses),
              f"kfrtrl_loss_bits_sum = {total:.9f}, the replies' losses add to {sum(losses):.9f}")
        below_8 = scalar(prom, 'kfrtrl_loss_bits_bucket{model="default", le="8"}')
        check(below_8 == sum(1 for x in losses if x <= 8), f"kfrtrl_loss_bits_bucket{{le=8}} = {below_8:g}")
        average = scalar(prom, 'kfrtrl_loss_bits_avg{model="default"}')
        check(average == stats["loss_bits_avg"],
              f"kfrtrl_loss_bits_avg = {average}, the model's stats say {stats['loss_bits_avg']}")
        updates = scalar(prom, 'kfrtrl_optimizer_updates_total{model="default"}')
        check(updates == stats["optimizer_updates"] > 0, f"kfrtrl_optimizer_updates_total = {updates:g}")
        # Two scrapes since the close, so that the dashboard's rates over it have data.
        wait("Prometheus to scrape the WebSocket close twice",
             lambda: query(prom, 'count_over_time(kfrtrl_websocket_closes_total{reason="client"}[1m]) >= 2'), 30)
        check(scalar(prom, 'kfrtrl_websocket_closes_total{reason="client"}') == 1, "one WebSocket closed by its client")
        for status, expected in (("200", 1), ("422", 1)):
            got = scalar(prom, f'kfrtrl_websocket_replies_total{{status="{status}"}}')
            check(got == expected, f"kfrtrl_websocket_replies_total{{status={status}}} = {got:g}, sent {expected}")
        count = scalar(prom, "kfrtrl_websocket_reply_duration_seconds_count")
        check(count == 2, f"kfrtrl_websocket_reply_duration_seconds_count = {count:g}, two replies")
        mean_rule = wait("the loss recording rule to see the traffic",
                         lambda: query(prom, "model:kfrtrl_loss_bits:mean10m > 0"), 30)
        check(0 < float(mean_rule[0]["value"][1]) < 16,
              f"the recording rule model:kfrtrl_loss_bits:mean10m = {float(mean_rule[0]['value'][1]):.3f} bits")

        # Every shipped rule evaluated without error against real series.
        groups = http(f"{prom}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        bad = [f"{r.get('name')}: {r.get('lastError')}" for r in rules if r.get("health") == "err"]
        check(len(rules) >= 11 and not bad, f"{len(rules)} rules loaded and healthy {bad or ''}".strip())
        alerts = [a["labels"]["alertname"] for a in http(f"{prom}/api/v1/alerts")["data"]["alerts"]]
        check(not alerts, f"no alert fires on a healthy server {alerts or ''}".strip())

        # Every query of the Grafana dashboard runs (with the variables Grafana would substitute).
        dashboard = json.loads((ROOT / "deploy/grafana/dashboards/kfrtrl.json").read_text())
        failed = []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
                try:
                    result = query(prom, expr)
                except (SystemExit, urllib.error.HTTPError) as e:
                    failed.append(f"{panel['title']}: {expr}: {e}")
                    continue
                if panel["title"].startswith(("Loss", "WebSocket")) and not result:
                    failed.append(f"{panel['title']}: {expr}: no data")
        check(not failed, ("every dashboard query runs; the loss and WebSocket panels have data "
                           + "; ".join(failed)).strip())

        server.send_signal(signal.SIGTERM)
        check(server.wait(30) == 0, "the server exits 0 on SIGTERM")
        server = None
    finally:
        for process in (server, prometheus):
            if process is not None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(work, ignore_errors=True)

    failed = sum(1 for ok, _ in checks if not ok)
    print(f"prometheus-e2e: {len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
