#!/usr/bin/env python3
"""A CycloneDX 1.5 SBOM (JSON) of every crate in Cargo.lock, from `cargo metadata`.

    scripts/sbom.py OUT.json          write the SBOM
    scripts/sbom.py --check OUT.json  fail unless it names every crate in Cargo.lock, at its
                                      locked version and checksum

It lists the whole lock file (every platform, build and dev dependencies too), so a scanner that
reads it sees a superset of what the binary carries; the binary's own list is embedded by
`cargo auditable` (see scripts/auditable-check.sh). Reproducible: the serial number derives from
Cargo.lock and the timestamp from SOURCE_DATE_EPOCH when set.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
import tomllib
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "Cargo.lock")


def purl(name, version):
    return f"pkg:cargo/{name}@{version}"


def locked():
    """(name, version) -> checksum (None for our own crate) for every package in Cargo.lock."""
    with open(LOCK, "rb") as f:
        lock = tomllib.load(f)
    return {(p["name"], p["version"]): p.get("checksum") for p in lock["package"]}


def generate(out):
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--locked", "--format-version", "1", "--manifest-path",
             os.path.join(ROOT, "Cargo.toml")],
            check=True, capture_output=True,
        ).stdout
    )
    sums = locked()
    by_id = {p["id"]: p for p in metadata["packages"]}
    root_id = metadata["resolve"]["root"]
    ref = {pid: purl(p["name"], p["version"]) for pid, p in by_id.items()}

    def component(p, kind):
        c = {"type": kind, "bom-ref": ref[p["id"]], "name": p["name"], "version": p["version"],
             "purl": ref[p["id"]]}
        if p.get("license"):
            # NB: old manifests write "MIT/Apache-2.0"; SPDX says "MIT OR Apache-2.0".
            c["licenses"] = [{"expression": " ".join(p["license"].replace("/", " OR ").split())}]
        checksum = sums.get((p["name"], p["version"]))
        if checksum:
            c["hashes"] = [{"alg": "SHA-256", "content": checksum}]
        if p.get("repository"):
            c["externalReferences"] = [{"type": "vcs", "url": p["repository"]}]
        return c

    lock_bytes = open(LOCK, "rb").read()
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                     hashlib.sha256(lock_bytes).hexdigest())),
        "version": 1,
        "metadata": {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)),
            "tools": {"components": [{"type": "application", "name": "kmsgate scripts/sbom.py"}]},
            "component": component(by_id[root_id], "application"),
        },
        "components": sorted(
            (component(p, "library") for pid, p in by_id.items() if pid != root_id),
            key=lambda c: (c["name"], c["version"]),
        ),
        "dependencies": sorted(
            ({"ref": ref[n["id"]], "dependsOn": sorted(ref[d] for d in n["dependencies"])}
             for n in metadata["resolve"]["nodes"]),
            key=lambda d: d["ref"],
        ),
    }
    with open(out, "w") as f:
        json.dump(bom, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"sbom: {len(bom['components']) + 1} crates -> {out}", file=sys.stderr)


def check(path):
    with open(path) as f:
        bom = json.load(f)
    assert bom.get("bomFormat") == "CycloneDX", f"{path}: not a CycloneDX document"
    named = {(c["name"], c["version"]): c for c in bom["components"]}
    top = bom["metadata"]["component"]
    named[(top["name"], top["version"])] = top
    problems = []
    for (name, version), checksum in sorted(locked().items()):
        c = named.get((name, version))
        if c is None:
            problems.append(f"{name} {version} is in Cargo.lock but not in the SBOM")
        elif checksum and {"alg": "SHA-256", "content": checksum} not in c.get("hashes", []):
            problems.append(f"{name} {version}: the SBOM's hash differs from Cargo.lock's checksum")
    if problems:
        sys.exit("sbom check failed:\n  " + "\n  ".join(problems))
    print(f"sbom check: all {len(locked())} crates in Cargo.lock are in {path}", file=sys.stderr)


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "--check":
        check(args[1])
    elif len(args) == 1 and not args[0].startswith("-"):
        generate(args[0])
    else:
        sys.exit(__doc__)
