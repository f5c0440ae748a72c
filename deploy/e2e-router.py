#!/usr/bin/env python3
"""End-to-end check of several kfrtrl servers behind the shipped HAProxy router, on loopback.

Three `kfrtrl serve` processes (no default model) behind deploy/router/haproxy.cfg with a server
list from render-backends.py, and a control server that never moves. Through the router: create
24 models by PUT, stream into each over HTTP and over WebSocket (every reply equal to the
control's, which gets the same requests in the same order); each model lives on exactly one
backend, and every backend holds some. Kill one backend: its models get the router's 503 problem,
every other model's replies still equal the control's. Restart it: its models are back with their
streams. Add a fourth backend (a router reload), `kfrtrl migrate` the models whose hash moved to
it: afterwards every reply still equals the control's, and the symbols counted by Prometheus on
the four backends add up to what was sent. Prints the time each move refused changes and the
WebSocket throughput through the router against the same load sent directly.

    deploy/e2e-router.py [path/to/kfrtrl]     (default: target/debug/kfrtrl; needs haproxy)
"""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("e2e_prometheus", ROOT / "deploy/e2e-prometheus.py")
common = importlib.util.module_from_spec(spec)
spec.loader.exec_module(common)
free_port, wait, websocket_exchange = common.free_port, common.wait, common.websocket_exchange

MODELS = [f"m{i:02d}" for i in range(24)]
DEFINITION = {"vocab_size": 256, "hidden": 16, "max_streams": 8}
TEXTS = ["the quick brown fox ", "jumps over the lazy dog ", "abcdefgh abcdefgh ", "to be or not to be "]


def request(method, url, body=None, timeout=30):
    """(status, headers, JSON or text body); never raises on an HTTP error status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    try:
        return status, headers, json.loads(raw) if raw else None
    except ValueError:
        return status, headers, raw.decode(errors="replace")


class Backend:
    def __init__(self, binary, work, index):
        self.binary, self.index = binary, index
        self.name = f"kfrtrl-{index}"
        self.port = free_port()
        self.data = work / f"data-{index}"
        self.process = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        env = {"KFRTRL_LISTEN": f"127.0.0.1:{self.port}", "KFRTRL_DATA_DIR": str(self.data),
               "KFRTRL_LOG_FORMAT": "json", "KFRTRL_NO_DEFAULT_MODEL": "true", "KFRTRL_MAX_MODELS": "32",
               "KFRTRL_RUNTIME_THREADS": "1", "KFRTRL_MODEL_THREADS": "1"}
        self.process = subprocess.Popen([self.binary, "serve"], env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(f"{self.name} to be ready", lambda: request("GET", f"{self.url}/readyz")[0] == 200)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def models(self):
        status, _, body = request("GET", f"{self.url}/v1/models")
        assert status == 200, body
        return {m["name"] for m in body["models"]}


class Router:
    def __init__(self, work):
        self.work, self.port, self.process = work, free_port(), None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, backends):
        servers = [f"{b.name}=127.0.0.1:{b.port}" for b in backends]
        listing = subprocess.run([sys.executable, ROOT / "deploy/router/render-backends.py", *servers],
                                 check=True, capture_output=True, text=True).stdout
        config = self.work / f"backends-{len(backends)}.cfg"
        config.write_text(listing)
        args = ["haproxy", "-db", "-f", str(ROOT / "deploy/router/haproxy.cfg"), "-f", str(config)]
        subprocess.run([*args, "-c", "-q"], check=True, env={**os.environ, "KFRTRL_ROUTER_BIND": "127.0.0.1:1"})
        if self.process:
            args += ["-sf", str(self.process.pid)]
        old = self.process
        log = open(self.work / "haproxy.log", "a")
        self.process = subprocess.Popen(args, env={**os.environ, "KFRTRL_ROUTER_BIND": f"127.0.0.1:{self.port}"},
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if old:
            old.wait(30)
        wait("the router", lambda: request("GET", f"{self.url}/router/healthz")[0] == 200)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


def main():
    binary = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target/debug/kfrtrl")
    if shutil.which("haproxy") is None:
        raise SystemExit("haproxy is missing: apt-get install haproxy")
    work = pathlib.Path(tempfile.mkdtemp(prefix="kfrtrl-router-"))
    backends = [Backend(binary, work, i) for i in range(4)]
    control = Backend(binary, work, 9)
    router = Router(work)
    failures = []

    def check(ok, what):
        print(("ok      " if ok else "FAILED  ") + what, flush=True)
        if not ok:
            failures.append(what)

    def holders():
        listed = {b.name: b.models() for b in backends if b.process and b.process.poll() is None}
        return {m: [b for b in backends if m in listed.get(b.name, ())] for m in MODELS}

    sent = {"tokens": 0}

    def send_round(round_index, expect_down=()):
        """One HTTP request and one WebSocket message per model through the router, the same to the
        control when the router acknowledged it. Returns (equal, refused, others_failed)."""
        equal = refused = others_failed = 0
        for i, model in enumerate(MODELS):
            text = TEXTS[(i + round_index) % len(TEXTS)]
            body = {"text": text, "top_k": 3, "return_losses": True}
            status, headers, reply = request("POST", f"{router.url}/v1/models/{model}/streams/h/tokens", body)
            if model in expect_down:
                if status == 503 and isinstance(reply, dict) and reply.get("type") == "urn:kfrtrl:problem:router-unavailable" \
                        and headers.get("content-type") == "application/problem+json" and headers.get("retry-after"):
                    refused += 1
                continue
            if status != 200:
                others_failed += 1
                continue
            _, _, expected = request("POST", f"{control.url}/v1/models/{model}/streams/h/tokens", body)
            addr = f"127.0.0.1:{router.port}"
            (ws_reply,) = websocket_exchange(addr, f"/v1/models/{model}/streams/w/ws", [{"text": text, "top_k": 2}])
            (ws_expected,) = websocket_exchange(f"127.0.0.1:{control.port}", f"/v1/models/{model}/streams/w/ws",
                                                [{"text": text, "top_k": 2}])
            sent["tokens"] += 2 * len(text)
            equal += (reply == expected) and (ws_reply == ws_expected)
        return equal, refused, others_failed

    try:
        for b in backends[:3]:
            b.start()
        control.start()
        router.start(backends[:3])

        created = [request("PUT", f"{router.url}/v1/models/{m}", DEFINITION)[0] for m in MODELS]
        for m in MODELS:
            request("PUT", f"{control.url}/v1/models/{m}", DEFINITION)
        check(created == [201] * len(MODELS), "24 models created through the router by PUT")
        equal, _, failed = send_round(0)
        check(equal == len(MODELS) and failed == 0,
              f"HTTP and WebSocket replies through the router equal the control's ({equal}/24)")
        placed = holders()
        check(all(len(h) == 1 for h in placed.values()), "each model lives on exactly one backend")
        per_backend = {b.name: sum(1 for h in placed.values() if h == [b]) for b in backends[:3]}
        check(all(n > 0 for n in per_backend.values()), f"every backend holds some: {per_backend}")

        victim = backends[1]
        down = {m for m, h in placed.items() if h == [victim]}
        victim.kill()
        time.sleep(3)  # two failed checks, 1 s apart, mark it down
        equal, refused, failed = send_round(1, expect_down=down)
        check(refused == len(down), f"its {len(down)} models get the router's 503 problem with Retry-After ({refused})")
        check(failed == 0 and equal == len(MODELS) - len(down),
              f"the other {len(MODELS) - len(down)} models never notice ({equal} equal, {failed} failed)")

        victim.start()
        wait("the router to see the restarted backend",
             lambda: all(request("GET", f"{router.url}/v1/models/{m}")[0] == 200 for m in down), 30)
        positions_equal = all(
            request("GET", f"{router.url}/v1/models/{m}/streams/{s}")[2]["position"]
            == request("GET", f"{control.url}/v1/models/{m}/streams/{s}")[2]["position"]
            for m in down for s in ("h", "w"))
        check(positions_equal, "restarted, its models are back with their streams")
        equal, _, failed = send_round(2)
        check(equal == len(MODELS) and failed == 0, f"after the restart every reply equals the control's ({equal}/24)")

        backends[3].start()
        router.start(backends)
        moved = [m for m in MODELS if request("GET", f"{router.url}/v1/models/{m}")[0] == 404]
        check(0 < len(moved) < len(MODELS), f"adding a fourth backend moves the hash of {len(moved)} models")
        placed = holders()
        frozen = []
        for m in moved:
            (source,) = placed[m]
            out = subprocess.run([binary, "migrate", "--json", "--verify-export", "--from", source.url, "--to", backends[3].url, m],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                check(False, f"migrate {m}: {out.stderr.strip()}")
                continue
            frozen.append(json.loads(out.stdout)["frozen_seconds"])
        check(len(frozen) == len(moved), f"kfrtrl migrate moved them; changes refused for at most "
                                         f"{max(frozen, default=0) * 1000:.0f} ms per model")
        placed = holders()
        check(all(len(h) == 1 for h in placed.values()) and all(placed[m] == [backends[3]] for m in moved),
              "each model on exactly one backend, the moved ones on the new one")

        def learned_symbols():
            total = 0.0
            for b in backends:
                text = urllib.request.urlopen(f"{b.url}/metrics", timeout=10).read().decode()
                total += sum(float(v) for v in re.findall(r'^kfrtrl_symbols_total\{[^}]*mode="learn"[^}]*\} (\S+)$',
                                                           text, re.M))
            return total

        before, sent_before = learned_symbols(), sent["tokens"]
        equal, _, failed = send_round(3)
        check(equal == len(MODELS) and failed == 0, f"after the moves every reply equals the control's ({equal}/24)")
        counted = learned_symbols() - before
        check(counted == sent["tokens"] - sent_before,
              f"Prometheus's symbols on the four backends add up to what was sent ({counted:.0f})")
        seen = sum(request("GET", f"{placed[m][0].url}/v1/models/{m}")[2]["stats"]["symbols_seen"] for m in MODELS)
        check(seen == sent["tokens"], f"the models' own counts add up across backends ({seen} of {sent['tokens']})")

        # Measured, not checked (throughput is for commands, not tests): the same WebSocket load
        # through the router and straight to the model's server, alternating, twice each.
        request("PUT", f"{router.url}/v1/models/load", {"vocab_size": 256, "hidden": 16, "max_streams": 128})
        (holder,) = [b for b in backends if "load" in b.models()]
        rates = {"router": [], "direct": []}
        for label, url in [("router", router.url), ("direct", holder.url)] * 2:
            out = subprocess.run([binary, "load", "--url", url, "--model", "load", "--protocol", "ws",
                                  "--streams", "64", "--seconds", "4", "--stream-prefix", label, "--json"],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                report = json.loads(out.stdout)
                rates[label].append(report["symbols_per_sec"])
                if report["errors"]:
                    print(f"note: {report['errors']} errors in the {label} load: {report['first_error']}")
        if rates["router"] and rates["direct"]:
            r, d = max(rates["router"]), max(rates["direct"])
            print(f"measured: WebSocket load, 64 streams: through the router {r:,.0f} symbols/s, direct {d:,.0f} "
                  f"({100 * r / d:.0f}%; runs {rates})")
    finally:
        router.stop()
        for b in [*backends, control]:
            b.stop()
    if failures:
        raise SystemExit(f"{len(failures)} check(s) failed; logs in {work}")
    shutil.rmtree(work, ignore_errors=True)
    print("all router checks passed")


if __name__ == "__main__":
    main()
