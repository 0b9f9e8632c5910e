#!/usr/bin/env python3
"""Validates Kubernetes manifests (multi-document YAML files) strictly.

Core kinds go through kubernetes-validate's strict schemas (unknown fields are errors). Custom
resources go through their CRD's openAPIV3Schema from tests/fixtures/crd-schemas, made strict
the same way (additionalProperties: false wherever the schema lists properties and does not
preserve unknown fields). A kind with no schema is an error, not a skip.

Usage: validate_manifests.py [--kubernetes-version 1.32] FILE...
Prints one line per document; exits 1 if any document is invalid.
"""
import argparse
import glob
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CRD_DIR = os.path.join(HERE, "..", "tests", "fixtures", "crd-schemas")


def strict(node):
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)
    return node


def crd_schemas():
    out = {}
    for path in glob.glob(os.path.join(CRD_DIR, "*.json")):
        with open(path) as f:
            doc = json.load(f)
        schema = strict(doc["schema"])
        # Some CRDs (Istio's) describe only spec and status; every object has these three.
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        out[(f"{doc['group']}/{doc['version']}", doc["kind"])] = schema
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubernetes-version", default="1.32")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    schemas = crd_schemas()
    failed = 0
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        for doc in docs:
            what = f"{path}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            try:
                if not (doc.get("metadata") or {}).get("name"):
                    raise ValueError("metadata.name missing")
                key = (doc.get("apiVersion"), doc.get("kind"))
                if key in schemas:
                    jsonschema.Draft7Validator(schemas[key]).validate(doc)
                else:
                    kubernetes_validate.validate(doc, args.kubernetes_version, strict=True)
                print(f"ok {what}")
            except kubernetes_validate.SchemaNotFoundError as e:
                failed += 1
                print(f"INVALID {what}: no schema ({e.message})")
            except jsonschema.ValidationError as e:
                failed += 1
                at = "/".join(str(p) for p in e.absolute_path)
                print(f"INVALID {what}: at {at or '(root)'}: {e.message}")
            except Exception as e:  # noqa: BLE001 - report, then keep checking the rest
                failed += 1
                print(f"INVALID {what}: {e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
