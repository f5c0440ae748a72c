#!/usr/bin/env python3
"""Writes the router's server list (the second configuration file of deploy/router/haproxy.cfg).

    render-backends.py NAME=HOST:PORT ...              one server per argument, in ring order
    render-backends.py --statefulset kfrtrl --service kfrtrl-headless --namespace default --replicas 3

Each server gets a fixed id (its place in the list, from 1): the hash ring is built from the ids,
so a server appended at the end takes about 1/N of the models and moves no other. Never reorder or
remove a line in the middle; to scale in, move the last server's models away (`kfrtrl migrate`)
and drop the last line.
"""

import argparse
import sys

HEAD = """\
# Written by deploy/router/render-backends.py; the ring order is the list order.
backend kfrtrl
    # The model is the path's fourth field: /v1/models/{model}/...
    balance hash path,field(4,/)
    hash-type consistent
"""

SERVER = """\
listen {name}
    # The health-checked hop in front of one server (see haproxy.cfg).
    bind abns@{name}
    option httpchk GET /readyz
    http-check expect status 200
    server {name} {address} id 1 check inter 1s fall 2 rise 1 resolvers dns init-addr last,libc,none
"""


def render(servers):
    out = [HEAD]
    out += [f"    server {name} abns@{name} id {i}\n" for i, (name, _) in enumerate(servers, 1)]
    for name, address in servers:
        out.append("\n" + SERVER.format(name=name, address=address))
    return "".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("servers", nargs="*", help="NAME=HOST:PORT")
    p.add_argument("--statefulset")
    p.add_argument("--service")
    p.add_argument("--namespace", default="default")
    p.add_argument("--replicas", type=int)
    p.add_argument("--port", type=int, default=8080)
    a = p.parse_args()
    if a.statefulset:
        if a.servers or not a.service or not a.replicas:
            p.error("--statefulset needs --service and --replicas, and no NAME=HOST:PORT")
        domain = f"{a.service}.{a.namespace}.svc.cluster.local"
        servers = [(f"{a.statefulset}-{i}", f"{a.statefulset}-{i}.{domain}:{a.port}") for i in range(a.replicas)]
    else:
        servers = [tuple(s.split("=", 1)) for s in a.servers]
        if not servers or any(len(s) != 2 for s in servers):
            p.error("give at least one NAME=HOST:PORT")
    sys.stdout.write(render(servers))


if __name__ == "__main__":
    main()
