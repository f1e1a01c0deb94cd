#!/usr/bin/env python3
"""Where the instructions of one call go: callgrind dumps grouped by crate, per call.

Usage: callgrind_summary.py CALLS FILE [FILE...]
Each FILE is a callgrind dump of CALLS calls (self cost per function, from callgrind_annotate).
Inlined code counts toward the function it was inlined into, and the kernel's share of a
syscall is not counted at all (callgrind sees user space only).
"""

import re
import subprocess
import sys

# First match wins: order from most to least specific.
BUCKETS = [
    # NB: ring's assembly has bare symbols (`__ecp_nistz256_mul_montq`), which the libc bucket's
    # `__` would otherwise take.
    ("ring (signature check, hashing)", ("ring::", "ring_core_", "<ring", "nistz256", "sha256_block")),
    ("tonic/prost (gRPC)", ("tonic::", "tonic_prost", "prost::", "<tonic", "<prost")),
    ("h2 (HTTP/2)", ("h2::", "<h2::")),
    ("hyper, hyper-util (HTTP/1 client, pool)", ("hyper::", "hyper_util::", "<hyper", "want::")),
    ("reqwest", ("reqwest::", "<reqwest")),
    ("url, idna (URL parsing)", ("url::", "idna::", "<url", "form_urlencoded")),
    ("serde_json, serde", ("serde_json::", "serde::", "<serde", "ryu::", "itoa::")),
    ("base64", ("base64::", "<base64")),
    ("tracing", ("tracing", "<tracing")),
    ("metrics (prometheus-client)", ("prometheus_client", "<prometheus_client")),
    ("audit log (humantime, write)", ("humantime", "audit_log")),
    ("kmsgate's own code", ("kmsgate::", "<kmsgate", "plugin::")),
    ("tokio (runtime, I/O, timers, sync)", ("tokio::", "<tokio", "mio::", "parking_lot", "futures_")),
    ("http, bytes, headers", ("http::", "<http::", "bytes::", "<bytes", "http_body", "httparse")),
    ("malloc, free", ("malloc", "free", "realloc", "_int_", "tcache", "arena", "calloc")),
    ("memcpy, memset, memcmp", ("memcpy", "memmove", "memset", "memcmp", "strlen", "bcmp")),
    ("hashing (SipHash)", ("siphash", "Hasher", "hash::")),
    ("alloc, core, std (other)", ("alloc::", "core::", "std::", "<alloc", "<core", "<std")),
    ("libc (syscall wrappers, locks)", ("libc", "pthread", "__", "epoll", "syscall", "clock_gettime")),
]

LINE = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$")


def bucket(symbol):
    for name, needles in BUCKETS:
        if any(n in symbol for n in needles):
            return name
    return "other"


def main():
    calls = int(sys.argv[1])
    totals = {}
    everything = 0
    for path in sys.argv[2:]:
        out = subprocess.run(
            ["callgrind_annotate", "--inclusive=no", "--threshold=100", path],
            capture_output=True, text=True, check=True,
        ).stdout
        in_table = False
        for line in out.splitlines():
            if "file:function" in line:
                in_table = True
                continue
            m = LINE.match(line)
            if not m or not in_table:
                continue
            ir = int(m.group(1).replace(",", ""))
            symbol = m.group(2)
            totals[bucket(symbol)] = totals.get(bucket(symbol), 0) + ir
            everything += ir
    print(f"| where | instructions per call | share |")
    print(f"|---|---:|---:|")
    for name, ir in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ir / calls:,.0f} | {100 * ir / everything:.1f}% |")
    print(f"| **total** | **{everything / calls:,.0f}** | 100% |")


if __name__ == "__main__":
    main()
