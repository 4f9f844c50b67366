"""The chart's pods as real containers: every pod a rendered workload describes is started on
the local Docker engine from the locally built images, with the command, args, env, ports,
user, read-only root and dropped capabilities its spec gives (the pod IP is the container's
address on a private network; Services' DNS names are network aliases). Then, under a steady
load of greedy completions sent through the coordinator "Service" (its ready endpoints, as
the manifests' readiness probes find them; HTTP, and gRPC checked once per coordinator):

  1. every container's probes answer as the manifests define them, and /ready is 200 on the
     one leading coordinator only;
  2. a worker deleted as Kubernetes deletes a pod (SIGTERM, SIGKILL after the grace period)
     drains and exits 0, the placement shrinks, its replacement joins again;
  3. the same for the leading coordinator: a standby takes over;
  4. a worker cut off the network (`docker network disconnect`) is dropped like a lost worker
     and rejoins when reconnected.

No request may fail or change its output (a refusal before any answer is retried on another
endpoint, as a client of a Service whose endpoint is going away does). Timings are printed.

  python containers.py --manifests FILE.yaml --model DIR --namespace NS --switchyard BIN
"""

import argparse
import http.client
import ipaddress
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

import yaml

NETWORK = f"switchyard-k8s-{os.getpid()}"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def docker(*args, check=True, timeout=120):
    out = subprocess.run(("docker",) + args, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


class Pod:
    """One pod of a workload, run as one container (every pod here has one)."""

    def __init__(self, name, template, ip, grace, aliases):
        self.name, self.ip, self.grace, self.aliases = name, ip, grace, aliases
        spec = template["spec"]
        assert len(spec["containers"]) == 1, f"{name}: one container per pod expected"
        self.c = spec["containers"][0]
        self.spec = spec
        self.labels = template["metadata"]["labels"]
        self.component = self.labels.get("app.kubernetes.io/component")
        self.ports = {p["name"]: p["containerPort"] for p in self.c.get("ports", [])}
        self.container = f"{NETWORK}-{name}"
        self.started = None

    def env(self):
        values = {}
        for e in self.c.get("env", []):
            if "value" in e:
                values[e["name"]] = e["value"]
            else:
                field = e["valueFrom"]["fieldRef"]["fieldPath"]
                values[e["name"]] = {"status.podIP": self.ip, "metadata.name": self.name}[field]
        return values

    def run_args(self, model_dir):
        """`docker run` arguments for this pod's container, from its spec."""
        env = self.env()
        pod_sc, sc = self.spec.get("securityContext", {}), self.c.get("securityContext", {})
        uid, gid = pod_sc.get("runAsUser"), pod_sc.get("runAsGroup")
        a = ["--name", self.container, "--hostname", self.name, "--network", NETWORK, "--ip", self.ip]
        for alias in self.aliases:
            a += ["--network-alias", alias]
        if uid is not None:
            a += ["--user", f"{uid}:{gid}"]
        if sc.get("readOnlyRootFilesystem"):
            a.append("--read-only")
        for cap in sc.get("capabilities", {}).get("drop", []):
            a += ["--cap-drop", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            a += ["--security-opt", "no-new-privileges"]
        # SIGTERM, then SIGKILL after the pod's grace period: what `docker stop` does with it.
        a += ["--stop-timeout", str(self.grace)]
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for m in self.c.get("volumeMounts", []):
            v = volumes.get(m["name"], {})
            if "persistentVolumeClaim" in v or "hostPath" in v:
                assert m["mountPath"] == "/models", f"{self.name}: unexpected volume {m}"
                a += ["--mount", f"type=bind,src={model_dir},dst=/models,readonly"]
            else:  # emptyDir (or a claim template): a tmpfs the pod's user owns
                a += ["--tmpfs", f"{m['mountPath']}:uid={uid},gid={gid},mode=0700"]
        for k, v in env.items():
            a += ["-e", f"{k}={v}"]
        a.append(self.c["image"])
        if "command" in self.c:
            raise RuntimeError(f"{self.name}: command overrides are not emulated")
        # Kubernetes expands $(VAR) in args from the container's env.
        a += [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m[1]], x) for x in self.c.get("args", [])]
        return a

    def start(self, model_dir):
        docker("rm", "-f", self.container, check=False)
        docker("run", "-d", *self.run_args(model_dir))
        self.started = time.monotonic()

    def probe(self, kind):
        """Runs the container's probe of this kind once; None when it has none."""
        p = self.c.get(kind)
        if not p:
            return None
        timeout = p.get("timeoutSeconds", 1)
        try:
            if "httpGet" in p:
                port = p["httpGet"]["port"]
                c = http.client.HTTPConnection(self.ip, self.ports.get(port, port), timeout=timeout)
                c.request("GET", p["httpGet"]["path"])
                return 200 <= c.getresponse().status < 400
            if "tcpSocket" in p:
                port = p["tcpSocket"]["port"]
                socket.create_connection((self.ip, self.ports.get(port, port)), timeout=timeout).close()
                return True
        except OSError:
            return False
        raise RuntimeError(f"{self.name}: {kind} {p} is not emulated")

    def get(self, path, port="http", timeout=5):
        c = http.client.HTTPConnection(self.ip, self.ports[port], timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()

    def logs(self):
        out = subprocess.run(["docker", "logs", "--tail", "30", self.container], capture_output=True, text=True)
        return out.stdout + out.stderr


def pods_of(docs, namespace, subnet):
    """Every pod the workloads describe, with its IP and DNS names."""
    hosts = ipaddress.ip_network(subnet).hosts()
    next(hosts)  # the gateway
    services = [d for d in docs if d["kind"] == "Service"]
    pods = []
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        template, name = d["spec"]["template"], d["metadata"]["name"]
        grace = template["spec"].get("terminationGracePeriodSeconds", 30)
        for i in range(d["spec"]["replicas"]):
            pod = f"{name}-{i}"
            labels = template["metadata"]["labels"]
            aliases = []
            for s in services:
                if not all(labels.get(k) == v for k, v in s["spec"]["selector"].items()):
                    continue
                svc = f"{s['metadata']['name']}.{namespace}.svc"
                if s["spec"].get("clusterIP") == "None" and d["kind"] == "StatefulSet":
                    aliases.append(f"{pod}.{svc}")  # a StatefulSet pod's stable name
                elif d["kind"] == "StatefulSet" and d["spec"]["replicas"] == 1:
                    aliases.append(svc)  # a one-pod Service: its name is the pod's
            pods.append(Pod(pod, template, str(next(hosts)), grace, aliases))
    return pods


class Load:
    """Clients sending greedy completions one after another through the coordinator Service:
    each request goes to a ready endpoint (round robin); a refusal (connection refused, or 503
    from a coordinator that takes no new requests) is retried on the next; an answer must equal the prompt's expected text."""

    def __init__(self, endpoints, expected, clients):
        self.endpoints, self.expected = endpoints, expected
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.completed, self.retried, self.failures = 0, 0, []
        self.threads = [threading.Thread(target=self.client, args=(k,), daemon=True) for k in range(clients)]
        for t in self.threads:
            t.start()

    def client(self, k):
        prompts = list(self.expected)
        n = k
        while not self.stop_flag.is_set():
            prompt = prompts[n % len(prompts)]
            n += 1
            give_up = time.monotonic() + 60
            while True:
                status, text, reason = complete(self.endpoints(), prompt, n)
                with self.lock:
                    if status == 200 and text == self.expected[prompt]:
                        self.completed += 1
                        break
                    if status == 200:
                        self.failures.append(f"{prompt!r}: {text!r}, expected {self.expected[prompt]!r}")
                        break
                    if status in (None, 503) and time.monotonic() < give_up:
                        self.retried += 1
                    else:
                        self.failures.append(f"{prompt!r}: {status} {reason}")
                        break
                time.sleep(0.1)

    def finish(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=120)
        return self.completed, self.retried, self.failures


ROUND = [0]


def complete(endpoints, prompt, n, max_tokens=8):
    """One completion through the Service: (HTTP status, None when the connection was refused,
    or "cut" when it broke after the request was sent; text; reason)."""
    if not endpoints:
        return None, None, "no ready endpoint"
    ROUND[0] += 1
    pod = endpoints[ROUND[0] % len(endpoints)]
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    try:
        c = http.client.HTTPConnection(pod.ip, pod.ports["http"], timeout=60)
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json", "X-Request-Id": f"k8s-{n}"})
        r = c.getresponse()
        data = r.read()
    except ConnectionRefusedError as e:
        return None, None, f"{pod.name}: {e}"  # nothing was sent: a clean refusal
    except OSError as e:  # sent, then cut off: the request may be lost
        return "cut", None, f"{pod.name}: {e!r}"
    if r.status != 200:
        return r.status, None, f"{pod.name}: {data[:300]!r}"
    return 200, json.loads(data)["choices"][0]["text"], None


class Cluster:
    def __init__(self, pods, model_dir):
        self.pods, self.model_dir = pods, model_dir
        self.ready = {}  # pod name → readiness probe result
        self.stop = threading.Event()
        threading.Thread(target=self.prober, daemon=True).start()

    def of(self, component):
        return [p for p in self.pods if p.component == component]

    def prober(self):
        """The kubelet's readiness probes, at the coordinators' period: they decide the
        Service's endpoints."""
        while not self.stop.is_set():
            for p in self.of("coordinator"):
                self.ready[p.name] = bool(p.probe("readinessProbe"))
            time.sleep(self.of("coordinator")[0].c["readinessProbe"].get("periodSeconds", 10))

    def endpoints(self):
        return [p for p in self.of("coordinator") if self.ready.get(p.name)]

    def leader(self):
        for p in self.of("coordinator"):
            try:
                if p.get("/ready", timeout=2)[0] == 200:
                    return p
            except OSError:
                pass
        return None

    def grid(self):
        """The leader's placement: (grid, worker addresses), or None."""
        leader = self.leader()
        if not leader:
            return None
        try:
            s = json.loads(leader.get("/api/dashboard")[1])
        except (OSError, ValueError):
            return None
        workers = sorted(w["address"] for w in s["workers"])
        if len(workers) != len(s["lanes"]) * s["stages"]:
            return None  # not a complete placement
        return f"{s['stages']}x{s['shards']}", workers

    def wait(self, what, check, limit):
        t = time.monotonic()
        while True:
            v = check()
            if v:
                return time.monotonic() - t, v
            if time.monotonic() - t > limit:
                raise AssertionError(f"not {what} within {limit} s")
            time.sleep(0.2)

    def wait_probes(self, pods, limit):
        """Until every probe of every pod succeeds; seconds from each pod's start."""
        times = {}
        t = time.monotonic()
        while len(times) < len(pods):
            for p in pods:
                if p.name in times:
                    continue
                if all(p.probe(k) is not False for k in ("startupProbe", "livenessProbe", "readinessProbe")):
                    times[p.name] = time.monotonic() - p.started
            if time.monotonic() - t > limit:
                missing = [p for p in pods if p.name not in times]
                raise AssertionError("probes failing for " + ", ".join(f"{p.name}:\n{p.logs()}" for p in missing))
            time.sleep(0.2)
        return times

    def delete(self, pod):
        """Deletes a pod as Kubernetes does: SIGTERM, SIGKILL after the grace period; returns
        (seconds to exit, exit code); then its controller starts the replacement."""
        t = time.monotonic()
        docker("stop", "-t", str(pod.grace), pod.container, timeout=pod.grace + 30)
        took = time.monotonic() - t
        code = int(docker("inspect", "-f", "{{.State.ExitCode}}", pod.container))
        return took, code


def create_network():
    """The pods' network, on a /24 no other network of the engine uses (runs may overlap)."""
    errors = []
    for third in random.sample(range(256), 16):
        subnet = f"10.213.{third}.0/24"
        out = subprocess.run(["docker", "network", "create", "--subnet", subnet, NETWORK],
                             capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return subnet
        errors.append(out.stderr.strip())
    raise RuntimeError("cannot create a network: " + "; ".join(errors[-3:]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifests", required=True)
    ap.add_argument("--model", required=True, help="host directory mounted at /models")
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--switchyard", required=True, help="the binary, as a gRPC client")
    a = ap.parse_args()
    docs = [d for d in yaml.safe_load_all(open(a.manifests)) if d]
    subnet = create_network()
    pods, cluster = [], None
    try:
        pods = pods_of(docs, a.namespace, subnet)
        counts = {c: sum(p.component == c for p in pods) for c in ("etcd", "coordinator", "worker")}
        log(f"pods: {counts} on {subnet}")
        assert counts == {"etcd": 1, "coordinator": 2, "worker": 4}, counts
        cluster = Cluster(pods, a.model)
        run(cluster, a.model, a.switchyard)
    except Exception:
        for p in pods:
            print(f"--- {p.name} ({p.container}) logs:\n{p.logs()}")
        raise
    finally:
        if cluster:
            cluster.stop.set()
        for p in pods:
            docker("rm", "-f", p.container, check=False)
        docker("network", "rm", NETWORK, check=False)


def worker_address(w):
    return f"{w.ip}:{w.ports['worker']}"


def run(cluster, model_dir, switchyard):
    timings = {}
    t0 = time.monotonic()
    for p in cluster.of("etcd"):
        p.start(model_dir)
    timings["etcd probes pass (s)"] = max(cluster.wait_probes(cluster.of("etcd"), 60).values())
    for p in cluster.of("coordinator") + cluster.of("worker"):
        p.start(model_dir)
    probes = cluster.wait_probes(cluster.of("coordinator") + cluster.of("worker"), 120)
    log("every probe passes: " + ", ".join(f"{k} {v:.1f}s" for k, v in probes.items()))
    took, (grid, workers) = cluster.wait("serving 2x2", lambda: (g := cluster.grid()) and g[0] == "2x2" and g, 120)
    timings["start to serving 2x2 (s)"] = time.monotonic() - t0
    addresses = sorted(worker_address(w) for w in cluster.of("worker"))
    assert workers == addresses, f"placement over {workers}, pods at {addresses}"
    # /ready: exactly the leader (readiness: any sends clients to the standby too).
    ready = {p.name: p.get("/ready")[0] for p in cluster.of("coordinator")}
    assert sorted(ready.values()) == [200, 503], f"/ready per coordinator: {ready}"
    log(f"/ready: {ready}; liveness /health and readiness as rendered pass on all")
    # What the ServiceMonitor and PodMonitor scrape.
    for p in cluster.of("coordinator") + cluster.of("worker"):
        status, body = p.get("/metrics", port="http" if p.component == "coordinator" else "metrics")
        assert status == 200 and b"switchyard_" in body, f"{p.name} /metrics: {status}"

    # The expected output of each prompt: the cluster's own answer, undisturbed.
    cluster.wait("both coordinators are endpoints", lambda: len(cluster.endpoints()) == 2, 30)
    prompts = ["The capital of France is", "Hello", "Once upon a time", "1, 2, 3,", "Kubernetes"]
    expected = {}
    for prompt in prompts:
        for p in cluster.of("coordinator"):  # through the leader and through the forwarding standby
            status, text, reason = complete([p], prompt, 0)
            assert status == 200, reason
            assert expected.setdefault(prompt, text) == text, f"{p.name} answers {text!r} to {prompt!r}"
    # The Service's gRPC port: the same answers through the streaming gRPC API.
    for p in cluster.of("coordinator"):
        out = subprocess.run(
            [switchyard, "generate", "--server", f"{p.ip}:{p.ports['grpc']}", "--prompt", prompts[0],
             "--max-tokens", "8", "--ignore-eos", "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"gRPC generate through {p.name}: {out.stderr}"
        assert json.loads(out.stdout)["text"] == expected[prompts[0]], out.stdout
    load = Load(cluster.endpoints, expected, clients=4)
    time.sleep(3)

    # A worker deleted: drains, exits 0; the placement goes on without it; its replacement joins.
    w = cluster.of("worker")[3]
    took, code = cluster.delete(w)
    assert code == 0, f"{w.name} exited {code} after SIGTERM:\n{w.logs()}"
    timings["worker SIGTERM to exit (s)"] = took
    g = cluster.wait("re-planned without the worker", lambda: (g := cluster.grid()) and worker_address(w) not in g[1] and g, 60)[1]
    log(f"worker {w.name} drained in {took:.1f}s (exit 0); placement now {g[0]} over {len(g[1])}")
    t = time.monotonic()
    w.start(model_dir)
    cluster.wait("2x2 over all four workers again", lambda: cluster.grid() == ("2x2", addresses), 120)
    timings["worker replacement started to 2x2 (s)"] = time.monotonic() - t

    # The leading coordinator deleted: drains, resigns, exits 0; the standby takes over.
    leader = cluster.leader()
    took, code = cluster.delete(leader)
    assert code == 0, f"{leader.name} exited {code} after SIGTERM:\n{leader.logs()}"
    timings["leader SIGTERM to exit (s)"] = took
    timings["leader exit to new leader ready (s)"], new = cluster.wait("a new leader", cluster.leader, 60)
    assert new is not leader
    log(f"coordinator {leader.name} drained in {took:.1f}s (exit 0); {new.name} leads")
    leader.start(model_dir)
    cluster.wait_probes([leader], 60)
    cluster.wait("both coordinators are endpoints", lambda: len(cluster.endpoints()) == 2, 30)

    # A worker partitioned off the network: lost like a dead worker, back when reconnected.
    w = cluster.of("worker")[1]
    t = time.monotonic()
    docker("network", "disconnect", NETWORK, w.container)
    timings["partition to re-planned without it (s)"] = cluster.wait(
        "re-planned without the partitioned worker", lambda: (g := cluster.grid()) and worker_address(w) not in g[1], 60)[0]
    time.sleep(2)
    docker("network", "connect", "--ip", w.ip, NETWORK, w.container)
    timings["reconnected to 2x2 (s)"] = cluster.wait(
        "2x2 over all four workers again", lambda: cluster.grid() == ("2x2", addresses), 120)[0]
    log(f"partition of {w.name} survived in {time.monotonic() - t:.1f}s")
    time.sleep(2)

    completed, retried, failures = load.finish()
    log(f"load: {completed} completions, {retried} refusals retried, {len(failures)} failed")
    assert not failures, "requests failed or changed:\n" + "\n".join(failures[:20])
    assert completed > 0
    for k, v in timings.items():
        log(f"timing: {k}: {v:.1f}")
    log("PASS: the chart's pods ran as containers, probes answered, no request was lost")


if __name__ == "__main__":
    sys.exit(main())
