#!/usr/bin/env bash
# The minimum supported Rust version (Cargo.toml's rust-version) holds for the dependencies:
# none of those built on Linux declares a newer one. (Our own use of the standard library
# is checked against it by clippy's incompatible_msrv lint in the clippy step; this machine
# has one toolchain, so no build with the old compiler runs here.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --all-features --filter-platform x86_64-unknown-linux-gnu |
python3 -c '
import json, sys
meta = json.load(sys.stdin)
version = lambda text: tuple((list(map(int, text.split("."))) + [0, 0])[:3])
ours = next(p for p in meta["packages"] if p["name"] == "kiwimq")["rust_version"]
used = {node["id"] for node in meta["resolve"]["nodes"]}
newer = sorted(
    (p["name"], p["version"], p["rust_version"])
    for p in meta["packages"]
    if p["id"] in used and p.get("rust_version") and version(p["rust_version"]) > version(ours)
)
for name, v, needs in newer:
    print(f"{name} {v} needs Rust {needs}, above kiwimq'"'"'s rust-version {ours}")
sys.exit(1 if newer else print(f"MSRV {ours}: every dependency builds with it"))
'
