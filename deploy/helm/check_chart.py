#!/usr/bin/env python3
"""Renders the longtake chart offline, as `helm template` does (Helm's own Go SDK through the
helm-python-sdk package), for the default values and for values-gpu.yaml, checks the values
against values.schema.json, lints the chart, and validates every rendered object against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors). KEDA's
ScaledObject is a custom resource the Kubernetes schemas do not hold: its fields are checked
here by hand. Prints one line per object; exits non-zero on the first problem.

    pip install helm-python-sdk kubernetes-validate    # tests/setup.sh does it
    python3 deploy/helm/check_chart.py [--kubernetes-version 1.33.0]
"""

import argparse
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE / "longtake"


def render(chart, values, label):
    chart.validate_schema(values)
    rendered = chart.render(values, name="farm", namespace="render", is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        for document in yaml.safe_load_all(text):
            if document:
                objects.append((path, document))
    if not objects:
        sys.exit(f"{label}: the chart rendered no object")
    return objects


def check_scaled_object(obj):
    spec = obj.get("spec", {})
    assert obj["apiVersion"] == "keda.sh/v1alpha1", obj["apiVersion"]
    assert spec["scaleTargetRef"]["name"], "scaleTargetRef.name"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], "replica counts"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus", trigger["type"]
    meta = trigger["metadata"]
    assert meta["serverAddress"].startswith("http"), meta["serverAddress"]
    assert "longtake_queue_depth" in meta["query"], meta["query"]
    float(meta["threshold"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", default="1.33.0")
    args = parser.parse_args()
    chart = helm_python.Chart.load(str(CHART))
    lint = helm_python.lint(str(CHART))
    print(f"helm lint: {lint}")
    gpu = yaml.safe_load((HERE / "longtake" / "values-gpu.yaml").read_text())
    hpa = {"autoscaling": {"hpa": {"enabled": True, "maxReplicas": 12}}}
    for label, values in [
        ("default values", {}),
        ("values-gpu.yaml", gpu),
        ("an HPA on queue depth", hpa),
    ]:
        kinds = []
        for path, obj in render(chart, values, label):
            kind = obj.get("kind")
            name = obj.get("metadata", {}).get("name")
            if kind == "ScaledObject":
                check_scaled_object(obj)
            else:
                try:
                    kubernetes_validate.validate(obj, args.kubernetes_version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    sys.exit(f"{label}: {path}: {kind} {name}: {e.message} at {list(e.path)}")
            kinds.append(kind)
            print(f"{label}: {path}: {kind} {name}: valid")
        print(f"{label}: {len(kinds)} objects valid against Kubernetes {args.kubernetes_version}")
    # KEDA and the HPA are one or the other
    try:
        chart.render({"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}},
                     name="farm", namespace="render", is_install=True)
    except helm_python.HelmError as e:
        print(f"keda and hpa together are refused: {str(e).splitlines()[0]}")
    else:
        sys.exit("keda and hpa together rendered")
    # a value the schema refuses is refused before anything renders
    try:
        chart.validate_schema({"worker": {"device": "tpu"}})
    except helm_python.HelmError as e:
        print(f"values.schema.json refuses worker.device=tpu: {str(e).splitlines()[0]}")
    else:
        sys.exit("values.schema.json took worker.device=tpu")


if __name__ == "__main__":
    main()
