"""What Kubernetes' schemas cannot see in the rendered chart, checked against the binary:

- every flag in a switchyard container's args exists in `switchyard <command> --help` (and every
  etcd flag in `etcd --help`); every $(VAR) in args is a variable of the container;
- the ports the processes listen on (--listen, --grpc-addr, --http-addr, --metrics-addr) are
  the container's ports, and --advertise names the pod IP and the listening port;
- every probe names a container port; an HTTP probe's path is a GET route the binary serves on
  that port (read from the source); a gRPC probe targets the gRPC API's port;
- every Service, PDB and NetworkPolicy selects pods that exist, on ports those pods have;
- termination grace periods exceed the drain graces they must cover;
- custom resources (LeaderWorkerSet, ServiceMonitor, PodMonitor, PrometheusRule) match the
  schemas in tests/k8s/schemas/, and a LeaderWorkerSet's pod template validates as a Pod.

  python manifests.py --switchyard BIN --etcd BIN --source REPO FILE.yaml…
Exits 1 naming every problem found.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

WORKLOADS = {"Deployment", "StatefulSet", "LeaderWorkerSet", "Job"}
SCHEMAS = pathlib.Path(__file__).parent / "schemas"
CUSTOM = {
    "LeaderWorkerSet": "leaderworkerset.json",
    "ServiceMonitor": "servicemonitor.json",
    "PodMonitor": "podmonitor.json",
    "PrometheusRule": "prometheusrule.json",
}


def seconds(text):
    """A switchyard duration (500ms, 30s, 2m, or plain seconds) in seconds."""
    m = re.fullmatch(r"([0-9.]+)(ms|s|m)?", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m[2]]


def pod_templates(doc):
    """(name, replicas, template) of a workload's pods."""
    spec = doc["spec"]
    if doc["kind"] == "LeaderWorkerSet":
        lwt = spec["leaderWorkerTemplate"]
        return [(doc["metadata"]["name"], spec["replicas"] * lwt["size"], lwt["workerTemplate"])]
    return [(doc["metadata"]["name"], spec.get("replicas", 1), spec["template"])]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


class Checker:
    def __init__(self, switchyard, etcd, source):
        self.problems = []
        self.switchyard, self.etcd = switchyard, etcd
        self.help = {}
        http = (source / "coordinator/src/http.rs").read_text()
        # The coordinator's top-level HTTP GET routes (the last Router::new() of `router`, the
        # nested /v1 ones come before it); the worker's metrics port serves /metrics only.
        top = http.split("pub fn router")[1].split("\n}\n")[0].rsplit("Router::new()", 1)[1]
        self.coordinator_routes = set(re.findall(r'\.route\("(/[^"]*)",\s*get\(', top))
        metrics = (source / "metrics/src/lib.rs").read_text()
        self.metrics_routes = set(re.findall(r'\.route\(\s*"(/[^"]*)"', metrics))
        assert {"/health", "/ready", "/metrics"} <= self.coordinator_routes, self.coordinator_routes
        assert "/metrics" in self.metrics_routes, self.metrics_routes

    def fail(self, where, what):
        self.problems.append(f"{where}: {what}")

    def flags_of(self, command):
        if command not in self.help:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30)
            text = out.stdout + out.stderr
            self.help[command] = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text))
        return self.help[command]

    def check_container(self, where, c):
        args = c.get("args", [])
        env = {e["name"] for e in c.get("env", [])}
        for a in args:
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                if var not in env:
                    self.fail(where, f"args use $({var}), which is not in the container's env")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        numbers = set(ports.values())
        if runs_switchyard(c):
            self.check_switchyard(where, args, ports)
        elif c["name"] == "etcd":
            known = self.flags_of((self.etcd, "--help"))
            for a in args:
                flag = a.split("=", 1)[0]
                if flag.startswith("--") and flag not in known:
                    self.fail(where, f"etcd has no flag {flag}")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(kind)
            if not probe:
                continue
            for how in ("httpGet", "tcpSocket", "grpc"):
                if how in probe:
                    port = probe[how]["port"]
                    if port not in ports and port not in numbers:
                        self.fail(where, f"{kind} probes port {port}, not a container port")
            if "grpc" in probe and not isinstance(probe["grpc"]["port"], int):
                self.fail(where, f"{kind}: a gRPC probe's port must be a number")
        return ports

    def check_switchyard(self, where, args, ports):
        command = next((a for a in args if not a.startswith("-") and not prev_takes_value(args, a)), None)
        if command not in {"coordinator", "worker"}:
            self.fail(where, f"runs switchyard {command!r}, expected coordinator or worker")
            return
        known = self.flags_of((self.switchyard, command, "--help"))
        for a in args:
            if a.startswith("--") and a.split("=", 1)[0] not in known:
                self.fail(where, f"`switchyard {command}` has no flag {a}")
        flags = flag_values(args)
        listens = {f: flags[f] for f in ("--listen", "--grpc-addr", "--http-addr", "--metrics-addr") if f in flags}
        for flag, addr in listens.items():
            port = int(addr.rsplit(":", 1)[1])
            if port not in ports.values():
                self.fail(where, f"{flag} {addr}: port {port} is not a container port")
        listen = flags.get("--listen") or flags.get("--grpc-addr")
        if "--advertise" in flags:
            host, port = flags["--advertise"].rsplit(":", 1)
            if host != "$(POD_IP)" or port != listen.rsplit(":", 1)[1]:
                self.fail(where, f"--advertise {flags['--advertise']} is not $(POD_IP) on {listen}")
        elif listen and listen.startswith("0.0.0.0"):
            self.fail(where, f"listens on {listen} but does not --advertise its address")

    def check_security(self, where, c, spec, flags):
        """Certificate, key and API key files lie in a mounted Secret that holds that key;
        probes speak what the probed port speaks (HTTPS with --tls-cert; no HTTP or gRPC probe
        where --tls-client-ca asks for a certificate the kubelet cannot present)."""
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for flag in FILE_FLAGS:
            path = flags.get(flag)
            if path is None:
                continue
            directory, _, key = path.rpartition("/")
            volume = volumes.get(mounts.get(directory))
            if volume is None or "secret" not in volume:
                self.fail(where, f"{flag} {path}: no Secret is mounted at {directory}")
            elif key not in SECRET_KEYS:
                self.fail(where, f"{flag} {path}: {key} is no key of a TLS or API key Secret")
        if "--cluster-ca" in flags and not ("--cluster-cert" in flags and "--cluster-key" in flags):
            self.fail(where, "--cluster-ca without --cluster-cert and --cluster-key")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(kind) or {}
            get = probe.get("httpGet")
            if get and get.get("port") in ("http", flags.get("--http-addr", "").rsplit(":", 1)[-1]):
                scheme = get.get("scheme", "HTTP")
                want = "HTTPS" if "--tls-cert" in flags else "HTTP"
                if scheme != want:
                    self.fail(where, f"{kind} probes the HTTP port with {scheme}, which serves {want}")
                if "--tls-client-ca" in flags:
                    self.fail(where, f"{kind} is an HTTP probe, but the port requires a client certificate")
            if "grpc" in probe and "--tls-cert" in flags:
                self.fail(where, f"{kind} is a gRPC probe (plain), but the gRPC API speaks TLS")

    def check_probe_paths(self, where, c, ports, command_flags):
        """HTTP probe paths must be routes served on the probed port."""
        by_port = {}
        http = command_flags.get("--http-addr")
        if http:
            by_port[int(http.rsplit(":", 1)[1])] = self.coordinator_routes
        metrics = command_flags.get("--metrics-addr")
        if metrics:
            by_port[int(metrics.rsplit(":", 1)[1])] = self.metrics_routes
        grpc = command_flags.get("--grpc-addr")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(kind) or {}
            if "httpGet" in probe:
                port = probe["httpGet"]["port"]
                number = ports.get(port, port)
                routes = by_port.get(number)
                if routes is None:
                    self.fail(where, f"{kind} is an HTTP probe on port {port}, where switchyard serves no HTTP")
                elif probe["httpGet"]["path"] not in routes:
                    self.fail(where, f"{kind} path {probe['httpGet']['path']} is not served (routes: {sorted(routes)})")
            if "grpc" in probe and (not grpc or int(grpc.rsplit(":", 1)[1]) != probe["grpc"]["port"]):
                self.fail(where, f"{kind} is a gRPC probe off the gRPC API's port ({grpc})")

    def run(self, docs):
        pods = []  # (where, labels, ports by name, replicas)
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            where = f"{kind}/{name}"
            if kind in CUSTOM:
                schema = json.loads((SCHEMAS / CUSTOM[kind]).read_text())
                for e in jsonschema.Draft7Validator(schema).iter_errors(doc):
                    self.fail(where, f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
            if kind not in WORKLOADS:
                continue
            for _, replicas, template in pod_templates(doc):
                if kind == "LeaderWorkerSet":
                    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, **template}
                    for version in ("1.30.0", kubernetes_validate.latest_version()):
                        try:
                            kubernetes_validate.validate(pod, version, strict=True)
                        except kubernetes_validate.ValidationError as e:
                            self.fail(where, f"its pod template is no valid Pod ({version}): {e.message}")
                spec = template["spec"]
                all_ports = {}
                for c in spec["containers"]:
                    cw = f"{where} container {c['name']}"
                    ports = self.check_container(cw, c)
                    all_ports.update(ports)
                    flags = flag_values(c.get("args", []))
                    if runs_switchyard(c):
                        self.check_probe_paths(cw, c, ports, flags)
                        self.check_security(cw, c, spec, flags)
                    if "--drain-grace" in flags:
                        grace = spec.get("terminationGracePeriodSeconds", 30)
                        drain = seconds(flags["--drain-grace"])
                        if grace <= drain:
                            self.fail(cw, f"terminationGracePeriodSeconds {grace} does not exceed --drain-grace {drain:g}s")
                if kind != "Job":
                    pods.append((where, template["metadata"].get("labels", {}), all_ports, replicas))
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            where = f"{kind}/{name}"
            if kind == "Service":
                chosen = [p for p in pods if matches(doc["spec"]["selector"], p[1])]
                if not chosen:
                    self.fail(where, "selects no pods")
                for port in doc["spec"]["ports"]:
                    target = port.get("targetPort", port["port"])
                    for p in chosen:
                        if target not in p[2] and target not in p[2].values():
                            self.fail(where, f"targetPort {target} is not a port of {p[0]}")
            elif kind == "PodDisruptionBudget":
                chosen = [p for p in pods if matches(doc["spec"]["selector"]["matchLabels"], p[1])]
                if not chosen:
                    self.fail(where, "selects no pods")
                for p in chosen:
                    if int(doc["spec"]["maxUnavailable"]) >= p[3] > 1:
                        self.fail(where, f"maxUnavailable lets all {p[3]} pods of {p[0]} go at once")
            elif kind == "NetworkPolicy":
                chosen = [p for p in pods if matches(doc["spec"]["podSelector"]["matchLabels"], p[1])]
                if not chosen:
                    self.fail(where, "applies to no pods")
                for rule in doc["spec"].get("ingress", []):
                    for port in rule.get("ports", []):
                        for p in chosen:
                            if port["port"] not in p[2] and port["port"] not in p[2].values():
                                self.fail(where, f"port {port['port']} is not a port of {p[0]}")
                    for peer in rule.get("from", []):
                        sel = peer.get("podSelector", {}).get("matchLabels")
                        if sel is not None and "namespaceSelector" not in peer and not any(matches(sel, p[1]) for p in pods):
                            self.fail(where, f"admits pods {sel}, of which there are none")
        return self.problems


# Flags that name a file from a Secret, and the keys such Secrets hold (kubernetes.io/tls and
# cert-manager's ca.crt; the chart's api-keys).
FILE_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca", "--cluster-ca", "--cluster-cert", "--cluster-key", "--api-key-file")
SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt", "api-keys"}


def runs_switchyard(c):
    """The chart's switchyard containers are named for their command."""
    return c["name"] in ("coordinator", "worker")


def prev_takes_value(args, a):
    """Whether `a` is the value of the flag before it (a global flag's value)."""
    i = args.index(a)
    return i > 0 and args[i - 1].startswith("--") and "=" not in args[i - 1]


def flag_values(args):
    out = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
                out[k] = v
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[a] = args[i + 1]
            else:
                out[a] = True
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--switchyard", required=True)
    ap.add_argument("--etcd", required=True)
    ap.add_argument("--source", required=True, type=pathlib.Path)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    failed = False
    for f in a.files:
        docs = [d for d in yaml.safe_load_all(open(f)) if d]
        problems = Checker(a.switchyard, a.etcd, a.source).run(docs)
        kinds = sorted({d["kind"] for d in docs})
        if problems:
            failed = True
            print(f"{f}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        else:
            print(f"{f}: {len(docs)} objects consistent with the binary ({', '.join(kinds)})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
