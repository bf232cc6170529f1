#!/usr/bin/env python3
"""Validates deploy/: every plain manifest and every chart rendering against
the Kubernetes API schemas of several releases (kubernetes-validate, strict:
unknown fields are errors), the charts with Helm's own engine (helm-python-sdk
binds the Helm SDK: lint, values.schema.json, templates), and the rules the
project keeps (standard labels, names from the release, the chart's
workloads with the same privileges as the plain manifests, which the
container e2e test runs).

    pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0
    python3 deploy/validate.py

Offline: nothing is fetched. Exit code 1 and one line per problem on failure.
"""

import copy
import pathlib
import sys

import yaml
import helm_python as helm
from helm_python import chart as helm_chart
import kubernetes_validate as kv

DEPLOY = pathlib.Path(__file__).resolve().parent
KUBE_VERSIONS = ["1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.32.0"]
STANDARD_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
]
JOIN = "l2mesh1.eyJleGFtcGxlIjp0cnVlfQ"

problems = []
checks = 0


def check(ok, what):
    global checks
    checks += 1
    if not ok:
        problems.append(what)


def docs_of(text):
    return [d for d in yaml.safe_load_all(text) if d]


def validate_schema(doc, origin):
    for version in KUBE_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
            check(True, "")
        except kv.ValidationError as e:
            check(False, f"{origin}: {doc['kind']} {doc['metadata'].get('name')} invalid for Kubernetes {version}: {e.message} at {list(e.path)}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
            check(False, f"{origin}: {doc['kind']}: no schema for {version}: {e}")


def plain_manifests():
    out = {}
    for path in sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("crds/*.yaml")):
        for doc in docs_of(path.read_text()):
            validate_schema(doc, path.name)
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def render(chart_dir, values, name="l2mesh", namespace="l2mesh-system", upgrade=False):
    with helm_chart.Chart.load(str(chart_dir)) as c:
        c.validate_schema(values)
        rendered = c.render(values, name=name, namespace=namespace,
                            is_install=not upgrade, is_upgrade=upgrade)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            check(text.strip() != "", f"{path}: empty NOTES")
            continue
        for doc in docs_of(text):
            docs.append((path, doc))
    return docs


def refused(chart_dir, values, upgrade=False, name="l2mesh"):
    try:
        render(chart_dir, values, name=name, upgrade=upgrade)
    except helm.HelmError as e:
        return str(e)
    return None


def pod_spec(doc):
    return doc["spec"]["template"]["spec"]


def privileges(doc):
    """What the container test reproduces: securityContexts, commands,
    host paths, host network."""
    spec = pod_spec(doc)
    return {
        "hostNetwork": spec.get("hostNetwork"),
        "podSecurityContext": spec.get("securityContext"),
        "containers": [
            (c["name"], c.get("command"), c.get("securityContext"),
             sorted(m["mountPath"] for m in c.get("volumeMounts", [])))
            for c in spec.get("initContainers", []) + spec["containers"]
        ],
        "hostPathTypes": sorted(v["hostPath"].get("type", "") for v in spec.get("volumes", []) if "hostPath" in v),
    }


def check_chart_docs(origin, docs, release, namespace, fullname):
    for path, doc in docs:
        validate_schema(doc, path)
        meta = doc["metadata"]
        labels = meta.get("labels", {})
        for label in STANDARD_LABELS:
            check(label in labels, f"{path}: {doc['kind']} {meta['name']} lacks label {label}")
        check(labels.get("app.kubernetes.io/instance") == release, f"{path}: instance label is not the release")
        check(meta["name"].startswith(fullname), f"{path}: {doc['kind']} {meta['name']} is not named after the release ({fullname})")
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            check(meta.get("namespace") == namespace, f"{path}: {doc['kind']} {meta['name']} not in the release namespace")
        if doc["kind"] in ("Deployment", "DaemonSet"):
            tmpl = doc["spec"]["template"]["metadata"]["labels"]
            for k, v in doc["spec"]["selector"]["matchLabels"].items():
                check(tmpl.get(k) == v, f"{path}: selector {k} does not match the pod labels")


def cluster_chart(plain):
    chart_dir = DEPLOY / "helm/l2mesh"
    lint = helm.lint(str(chart_dir), {"joinString": JOIN}, strict=True)
    check(not lint["errors"], f"helm lint l2mesh: {lint['errors']}")
    for m in lint["messages"]:
        check(m["severity"] < 2, f"helm lint l2mesh: {m}")

    docs = render(chart_dir, {"joinString": JOIN})
    check_chart_docs("l2mesh", docs, "l2mesh", "l2mesh-system", "l2mesh")
    by_kind = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    join = by_kind[("Secret", "l2mesh-join")]
    check(join["stringData"]["joinString"] == JOIN, "the join Secret carries the join string")
    svc = by_kind[("Service", "l2mesh-agent")]
    check(svc["spec"]["selector"].get("l2mesh.io/node-sync") == "leader",
          "the node-sync Service selects the leader label")
    agent = by_kind[("Deployment", "l2mesh-agent")]
    probe = agent["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    check(probe.get("httpGet", {}).get("path") == "/healthz", "agent readiness is /healthz")
    # The chart runs what the container test ran: the plain manifests' privileges.
    for kind, name in [("Deployment", "l2mesh-agent"), ("DaemonSet", "l2mesh-dataplane")]:
        check(privileges(by_kind[(kind, name)]) == privileges(plain[(kind, name)]),
              f"chart {kind} {name}: privileges differ from deploy/{name.split('-')[1]}.yaml")
    # The chart's RBAC is the plain one, which a test holds against the
    # agent's real API calls.
    for kind in ("ClusterRole", "Role"):
        check(by_kind[(kind, "l2mesh-agent")]["rules"] == plain[(kind, "l2mesh-agent")]["rules"],
              f"chart {kind} rules differ from deploy/agent-rbac.yaml")
    # helm uninstall first runs the uninstall Job (pre-delete hook), with
    # the plain deploy/uninstall.yaml's rights and privileges.
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Job"):
        hook = by_kind[(kind, "l2mesh-uninstall")]["metadata"].get("annotations", {})
        check(hook.get("helm.sh/hook") == "pre-delete", f"uninstall {kind} is a pre-delete hook")
        weight = int(hook.get("helm.sh/hook-weight", "0"))
        check((weight == 0) == (kind == "Job"), f"uninstall {kind}: the Job runs after its RBAC")
    for kind in ("ClusterRole", "Role"):
        check(by_kind[(kind, "l2mesh-uninstall")]["rules"] == plain[(kind, "l2mesh-uninstall")]["rules"],
              f"chart uninstall {kind} rules differ from deploy/uninstall.yaml")
    job = by_kind[("Job", "l2mesh-uninstall")]
    check(privileges(job) == privileges(plain[("Job", "l2mesh-uninstall")]),
          "chart uninstall Job: privileges differ from deploy/uninstall.yaml")
    check(pod_spec(job)["containers"][0]["args"] == ["uninstall"], "the hook runs l2mesh-agent uninstall")
    no_hook = render(chart_dir, {"joinString": JOIN, "uninstallHook": {"enabled": False}})
    check(not any(d["kind"] == "Job" for _, d in no_hook), "uninstallHook.enabled=false drops the hook")
    ds = by_kind[("DaemonSet", "l2mesh-dataplane")]
    check(ds["spec"]["template"]["spec"].get("priorityClassName") == "system-node-critical", "priority class")
    check(("ResourceQuota", "l2mesh-critical-pods") in by_kind, "the priority quota ships by default")

    # Every value the chart offers, changed.
    custom = {
        "joinString": JOIN,
        "fullnameOverride": "mesh",
        "image": {"repository": "registry.example.com/l2mesh", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityQuota": {"enabled": False, "pods": "10"},
        "agent": {"replicas": 3, "nodeSelector": {"role": "infra"},
                  "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
                  "affinity": {}, "resources": {"requests": {"cpu": "10m"}},
                  "extraEnv": [{"name": "L2MESH_LOG", "value": "debug"}]},
        "dataplane": {"listenPort": 51821, "metricsPort": 9500, "workers": 2,
                      "extraArgs": ["--worker-slice-us=500"], "extraEnv": [],
                      "resources": {}, "nodeSelector": {}, "tolerations": []},
        "cni": {"binDir": "/home/kubernetes/bin"},
    }
    docs = render(chart_dir, custom, name="prod", namespace="net")
    check_chart_docs("l2mesh custom", docs, "prod", "net", "mesh")
    by_kind = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    ds = by_kind[("DaemonSet", "mesh-dataplane")]
    spec = pod_spec(ds)
    check(spec["imagePullSecrets"] == [{"name": "regcred"}], "imagePullSecrets reach the pods")
    check(any(v.get("hostPath", {}).get("path") == "/home/kubernetes/bin" for v in spec["volumes"]), "cni.binDir")
    dp = spec["containers"][0]
    check(dp["image"] == "registry.example.com/l2mesh:0.1.0-rc1" and dp["imagePullPolicy"] == "Always", "image values")
    check("--worker-slice-us=500" in dp["args"] and "--listen-port=51821" in dp["args"], "dataplane flags")
    env = {e["name"]: e.get("value") for e in dp["env"]}
    check(env["L2MESH_AGENT"] == "https://mesh-agent.net.svc:7444", f"the dataplane dials the release's agent Service: {env['L2MESH_AGENT']}")
    check(not spec.get("tolerations"), "dataplane tolerations from values")
    check(("ResourceQuota", "mesh-critical-pods") not in by_kind, "priorityQuota.enabled=false drops the quota")
    agent = pod_spec(by_kind[("Deployment", "mesh-agent")])
    check(agent["nodeSelector"].get("role") == "infra", "agent nodeSelector")

    # joinString: required on install, not on upgrade, and well-formed.
    err = refused(chart_dir, {})
    check(err is not None and "joinString is required" in err, f"install without joinString must fail by name: {err}")
    check(refused(chart_dir, {}, upgrade=True) is None, "an upgrade without joinString renders")
    err = refused(chart_dir, {"joinString": "not-a-join-string"})
    check(err is not None and "joinString" in err, f"a malformed joinString is refused by the schema: {err}")
    err = refused(chart_dir, {"joinString": JOIN, "agnet": {}})
    check(err is not None, "an unknown value key is refused by the schema")

    crds = sorted(p.name for p in (chart_dir / "crds").glob("*.yaml"))
    for name in crds:
        check((chart_dir / "crds" / name).read_text() == (DEPLOY / "crds" / name).read_text(),
              f"helm/l2mesh/crds/{name} differs from deploy/crds/{name}")
    for name in crds:
        for doc in docs_of((chart_dir / "crds" / name).read_text()):
            validate_schema(doc, f"helm/l2mesh/crds/{name}")


def broker_chart(plain):
    chart_dir = DEPLOY / "helm/l2mesh-broker"
    values = {"advertise": ["broker.example.com:7443"]}
    lint = helm.lint(str(chart_dir), values, strict=True)
    check(not lint["errors"], f"helm lint l2mesh-broker: {lint['errors']}")
    for m in lint["messages"]:
        check(m["severity"] < 2, f"helm lint l2mesh-broker: {m}")
    docs = render(chart_dir, values, name="mesh")
    check_chart_docs("l2mesh-broker", docs, "mesh", "l2mesh-system", "mesh-l2mesh-broker")
    by_kind = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    dep = by_kind[("Deployment", "mesh-l2mesh-broker")]
    args = pod_spec(dep)["containers"][0]["args"]
    check("--advertise=broker.example.com:7443" in args, f"advertise from values: {args}")
    check(pod_spec(dep)["containers"][0].get("resources", {}).get("limits"), "broker resources")
    check(by_kind[("Service", "mesh-l2mesh-broker")]["spec"]["type"] == "LoadBalancer", "LoadBalancer by default")
    check(privileges(dep) == privileges(plain[("Deployment", "l2mesh-broker")]),
          "chart broker: privileges differ from deploy/broker.yaml")
    docs = render(chart_dir, {"advertise": ["198.51.100.7:30443"],
                              "service": {"type": "NodePort", "nodePort": 30443}}, name="mesh")
    check_chart_docs("l2mesh-broker NodePort", docs, "mesh", "l2mesh-system", "mesh-l2mesh-broker")
    svc = [d for _, d in docs if d["kind"] == "Service"][0]
    check(svc["spec"]["ports"][0].get("nodePort") == 30443, "NodePort from values")
    err = refused(chart_dir, {}, name="mesh")
    check(err is not None and "advertise is required" in err, f"the broker chart refuses to render without advertise: {err}")
    # Replicas on etcd: N replicas, a PodDisruptionBudget, no volume claim,
    # the CA from one Secret, the store flags from values.
    etcd = {"advertise": ["broker.example.com:7443"], "store": "etcd",
            "etcd": {"replicas": 3, "endpoints": ["etcd-0.etcd:2379", "etcd-1.etcd:2379"],
                     "caSecret": "mesh-ca", "tlsSecret": "etcd-client", "clientCertAuth": True}}
    docs = render(chart_dir, etcd, name="mesh")
    check_chart_docs("l2mesh-broker etcd", docs, "mesh", "l2mesh-system", "mesh-l2mesh-broker")
    by_kind = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    dep = by_kind[("Deployment", "mesh-l2mesh-broker")]
    args = pod_spec(dep)["containers"][0]["args"]
    check(dep["spec"]["replicas"] == 3, "etcd: replicas from values")
    check("--store=etcd://etcd-0.etcd:2379,etcd-1.etcd:2379" in args, f"etcd: store flag: {args}")
    check("--etcd-cert=/etc/l2mesh/etcd/tls.crt" in args, f"etcd: client certificate: {args}")
    check(("PodDisruptionBudget", "mesh-l2mesh-broker") in by_kind, "etcd: a PodDisruptionBudget")
    check(("PersistentVolumeClaim", "mesh-l2mesh-broker") not in by_kind, "etcd: no volume claim")
    vols = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    check(vols["data"].get("secret", {}).get("secretName") == "mesh-ca", f"etcd: CA from the Secret: {vols}")
    # The same privileges, plus a read-only mount of the etcd client TLS.
    priv = privileges(dep)
    priv["containers"] = [(n, c, sc, [m for m in mounts if m != "/etc/l2mesh/etcd"])
                          for n, c, sc, mounts in priv["containers"]]
    check(priv == privileges(plain[("Deployment", "l2mesh-broker")]),
          "chart broker on etcd: privileges differ from deploy/broker.yaml")
    for missing, why in [("endpoints", "etcd.endpoints"), ("caSecret", "etcd.caSecret")]:
        v = copy.deepcopy(etcd)
        del v["etcd"][missing]
        err = refused(chart_dir, v, name="mesh")
        check(err is not None and why in err, f"the etcd option refuses to render without {missing}: {err}")


def crd_admission():
    """What the API server admits, by the CRD's own schema (structural
    OpenAPI, the same pattern semantics)."""
    import jsonschema
    crd = docs_of((DEPLOY / "crds/l2network.yaml").read_text())[0]
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for ip_range, ok in [("10.10.0.0/16", True), ("192.168.7.0/28", True), ("fd00:10::/64", True),
                         ("::/0", True), ("not-a-cidr", False), ("10.1.0.0/33", False),
                         ("10.1.0.0/29", False), ("300.1.0.0/16", False), ("fd00::/125", False),
                         ("10.1.0.0", False), (" 10.1.0.0/16", False)]:
        try:
            jsonschema.validate({"scope": "local", "ipRange": ip_range}, schema)
            admitted = True
        except jsonschema.ValidationError:
            admitted = False
        check(admitted == ok, f"CRD admission of ipRange {ip_range!r}: admitted={admitted}, want {ok}")
    names = crd["spec"]["names"]
    check(names.get("categories") == ["l2mesh"], "CRD categories [l2mesh]")
    columns = [c["name"] for c in version.get("additionalPrinterColumns", [])]
    check("Age" in columns, f"CRD Age column: {columns}")
    check("Auto-generated" not in str(crd), "CRD descriptions are written, not generated stubs")
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    check(conditions.get("x-kubernetes-list-type") == "map"
          and conditions.get("x-kubernetes-list-map-keys") == ["type"], "conditions are a list map keyed by type")
    check("type" in conditions["items"].get("required", []), "a list-map key must be required")


def main():
    plain = plain_manifests()
    crd_admission()
    cluster_chart(plain)
    broker_chart(plain)
    for p in problems:
        print(f"FAIL {p}")
    print(f"{checks - len(problems)} passed, {len(problems)} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
