#!/usr/bin/env python3
"""Writes deploy/kubernetes/router.yaml: the HAProxy router as a Deployment, its Service, and a
ConfigMap holding deploy/router/haproxy.cfg, the error files and the server list of the
StatefulSet's pods (one per replica of deploy/kubernetes/statefulset.yaml, by their stable names
in the headless Service). Rerun it after changing the replicas (scale out: append; scale in: move
the last pod's models away first, see deploy/README.md); deploy/check.sh fails when it is stale.

    deploy/router/render-kubernetes.py > deploy/kubernetes/router.yaml
"""

import importlib.util
import pathlib
import sys

import yaml

ROUTER = pathlib.Path(__file__).resolve().parent
ROOT = ROUTER.parent.parent
spec = importlib.util.spec_from_file_location("render_backends", ROUTER / "render-backends.py")
backends = importlib.util.module_from_spec(spec)
spec.loader.exec_module(backends)


def block(text, indent):
    pad = " " * indent
    return "".join(pad + line if line.strip() else "\n" for line in text.splitlines(keepends=True))


def render():
    (sts,) = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/statefulset.yaml").read_text()) if d]
    name, service, replicas = sts["metadata"]["name"], sts["spec"]["serviceName"], sts["spec"]["replicas"]
    servers = [(f"{name}-{i}", f"{name}-{i}.{service}:8080") for i in range(replicas)]
    files = {"haproxy.cfg": (ROUTER / "haproxy.cfg").read_text(), "backends.cfg": backends.render(servers)}
    errors = {f"{p.stem}.http": p.read_bytes().decode() for p in sorted((ROUTER / "errors").glob("*.http"))}
    out = ["# Written by deploy/router/render-kubernetes.py from deploy/router and the StatefulSet's replicas.\n",
           "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kfrtrl-router\n  labels:\n",
           "    app.kubernetes.io/name: kfrtrl-router\ndata:\n"]
    for key, text in files.items():
        out.append(f"  {key}: |\n{block(text, 4)}")
    out.append("---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kfrtrl-router-errors\n  labels:\n"
               "    app.kubernetes.io/name: kfrtrl-router\ndata:\n")
    for key, text in errors.items():
        # The HTTP messages need their CRLFs: JSON strings keep them exactly.
        out.append(f"  {key}: {yaml.safe_dump(text, default_style=chr(34), width=10**6).strip()}\n")
    out.append((ROUTER / "kubernetes.tmpl.yaml").read_text())
    return "".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
