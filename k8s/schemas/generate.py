"""Generate k8s/schemas/*.json from the CustomResourceDefinitions the upstream projects publish.

    python k8s/schemas/generate.py \\
        --repo ray-project/kuberay=PATH --repo prometheus-operator/prometheus-operator=PATH \\
        --repo kubernetes-sigs/gateway-api=PATH

Each PATH is a git clone (bare or not) of that repository; the CRD is read with `git show TAG:FILE` at the release
tag in SOURCES, so the output does not depend on what is checked out. Nothing here is written by hand: a schema is
the CRD's `openAPIV3Schema` for one version, transformed mechanically:

1. `description` keys are dropped (they are most of a CRD's bytes and validate nothing).
2. Every object that lists `properties` and says nothing about other keys gets `additionalProperties: false`:
   the API server's strict field validation (`kubectl apply --validate=strict`, the default since 1.27 warns, and
   server-side apply errors) rejects a field the CRD does not list; JSON Schema would accept it silently.
   Objects marked `x-kubernetes-preserve-unknown-fields: true` stay open, as the API server keeps them open.
3. The top-level `metadata` (`type: object` in every CRD: the API server validates it as ObjectMeta) refers to the
   strict core ObjectMeta of the `kubernetes-validate` package, as tests/test_k8s.py resolves it.
4. Subtrees that occur more than once (a pod template appears for the head, each worker group and the RayJob
   submitter) are written once under `$defs` and referred to by `$ref`: the same schema, a fifth of the bytes.
   A def is named by the key it first appeared under plus a hash of its content, so regenerating is stable.
5. `x-generated-from` records the repository, tag, commit, file and sha256 of the CRD.

`x-kubernetes-validations` (CEL rules) are kept as written but not evaluated by JSON Schema.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
MIN_SHARED_BYTES = 400  # smaller repeated subtrees (a `{type: string}` map) stay inline: a $ref would not save much

# (repository, release tag, CRD file, version): the release each schema is generated from. Upgrading KubeRay (or
# the others) = change the tag here, re-run, run tests/test_k8s.py.
SOURCES: list[tuple[str, str, str, str]] = [
    ("ray-project/kuberay", "v1.7.0", "ray-operator/config/crd/bases/ray.io_rayservices.yaml", "v1"),
    ("ray-project/kuberay", "v1.7.0", "ray-operator/config/crd/bases/ray.io_rayclusters.yaml", "v1"),
    ("ray-project/kuberay", "v1.7.0", "ray-operator/config/crd/bases/ray.io_rayjobs.yaml", "v1"),
    ("prometheus-operator/prometheus-operator", "v0.93.0",
     "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml", "v1"),
    ("prometheus-operator/prometheus-operator", "v0.93.0",
     "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml", "v1"),
    ("prometheus-operator/prometheus-operator", "v0.93.0",
     "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml", "v1"),
    ("kubernetes-sigs/gateway-api", "v1.6.1", "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml", "v1"),
    ("kubernetes-sigs/gateway-api", "v1.6.1", "config/crd/standard/gateway.networking.k8s.io_gateways.yaml", "v1"),
]


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


SCHEMA_KEYS = ("items", "additionalProperties", "not")  # keys whose value is one schema
SCHEMA_LIST_KEYS = ("anyOf", "allOf", "oneOf")  # keys whose value is a list of schemas


def map_subschemas(schema: dict[str, Any], fn: Any) -> dict[str, Any]:
    """`schema` with `fn` applied to each direct subschema (property schemas, items, anyOf members...): only schema
    positions, never `default`, `enum` or `x-kubernetes-validations` values that merely look like objects."""
    out = dict(schema)
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {name: fn(sub, name) for name, sub in schema["properties"].items()}
    for key in SCHEMA_KEYS:
        if isinstance(schema.get(key), dict):
            out[key] = fn(schema[key], key)
    for key in SCHEMA_LIST_KEYS:
        if isinstance(schema.get(key), list):
            out[key] = [fn(sub, key) for sub in schema[key]]
    return out


def close_objects(schema: dict[str, Any], key: str = "") -> dict[str, Any]:
    """Step 2: `additionalProperties: false` where the API server would reject unknown keys."""
    out = map_subschemas(schema, close_objects)
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def canonical(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def share_repeated(schema: dict[str, Any]) -> dict[str, Any]:
    """Step 4: each subschema of at least MIN_SHARED_BYTES that occurs twice or more -> one `$defs` entry."""
    counts: Counter[str] = Counter()

    def count(node: dict[str, Any], key: str) -> dict[str, Any]:
        text = canonical(node)
        if len(text) >= MIN_SHARED_BYTES:
            counts[text] += 1
        return map_subschemas(node, count)

    count(schema, "")
    defs: dict[str, Any] = {}
    names: dict[str, str] = {}

    def replace(node: dict[str, Any], key: str) -> dict[str, Any]:
        text = canonical(node)
        if counts.get(text, 0) < 2:
            return map_subschemas(node, replace)
        if text not in names:
            names[text] = f"{key}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
            defs[names[text]] = map_subschemas(node, replace)
        return {"$ref": f"#/$defs/{names[text]}"}

    result = map_subschemas(schema, replace)
    if defs:
        result["$defs"] = dict(sorted(defs.items()))
    return result


def generate(crd_text: str, version: str, provenance: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """One CRD version -> (file name, JSON schema)."""
    crd = yaml.safe_load(crd_text)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strip_descriptions(copy.deepcopy(entry["schema"]["openAPIV3Schema"]))
    schema = close_objects(schema)
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
    schema = share_repeated(schema)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    header = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"GENERATED by k8s/schemas/generate.py from {provenance['repository']} {provenance['tag']} "
                    f"{provenance['file']} ({kind} {group}/{version}). Do not edit: change SOURCES and re-run.",
        "x-generated-from": provenance,
    }
    return f"{kind.lower()}.{group}-{version}.json", {**header, **schema}


def git_show(repo_path: Path, tag: str, file: str) -> tuple[str, str]:
    commit = subprocess.run(["git", "-C", str(repo_path), "rev-parse", f"{tag}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    text = subprocess.run(["git", "-C", str(repo_path), "show", f"{commit}:{file}"], check=True,
                          capture_output=True, text=True).stdout
    return commit, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=PATH",
                        help="where a git clone of each upstream repository is")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    clones = dict(item.split("=", 1) for item in args.repo)
    missing = sorted({repo for repo, *_ in SOURCES} - set(clones))
    if missing:
        parser.error(f"--repo needed for {', '.join(missing)}")
    for repository, tag, file, version in SOURCES:
        commit, text = git_show(Path(clones[repository]), tag, file)
        provenance = {"repository": repository, "tag": tag, "commit": commit, "file": file,
                      "sha256": hashlib.sha256(text.encode()).hexdigest()}
        name, schema = generate(text, version, provenance)
        path = args.out / name
        path.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
        print(f"wrote {path.relative_to(args.out.parent.parent) if args.out == HERE else path} "
              f"({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
