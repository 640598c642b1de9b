#!/usr/bin/env python3
"""Re-vendor uPlot from the npm registry (stdlib only).

    python viewer/static/vendor/refresh_uplot.py [VERSION]     # default 1.6.32

Downloads ``https://registry.npmjs.org/uplot/-/uplot-VERSION.tgz`` (the URL and
the integrity hash come from the registry's metadata for that version),
checks the tarball against the registry's ``dist.integrity`` (SRI, sha512)
and ``dist.shasum`` (sha1), extracts ``dist/uPlot.iife.min.js``,
``dist/uPlot.min.css`` and ``LICENSE`` into ``vendor/uplot/`` next to this
script, and rewrites ``vendor/uplot/VERSION`` with the version, the tarball
URL and the sha256 of the tarball and of each vendored file.

``--tarball FILE`` uses an already downloaded tarball (its integrity is still
checked against the registry unless ``--offline`` is given too).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
PACKAGE = "uplot"
DEFAULT_VERSION = "1.6.32"
# member of the tarball -> file name in vendor/uplot/
FILES = {
    "package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
    "package/dist/uPlot.min.css": "uPlot.min.css",
    "package/LICENSE": "LICENSE",
}
DEST = Path(__file__).resolve().parent / "uplot"


def _get(url: str, timeout: float = 60.0) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "kohakuboard-refresh-uplot"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (fixed https URL)
        return resp.read()


def registry_dist(version: str) -> dict:
    """The ``dist`` block of the registry's metadata for ``uplot@version``."""
    meta = json.loads(_get(f"{REGISTRY}/{PACKAGE}/{version}"))
    if meta.get("version") != version:
        raise SystemExit(f"registry answered version {meta.get('version')!r}, asked {version!r}")
    return meta["dist"]


def check_integrity(data: bytes, dist: dict) -> None:
    """Verify the tarball against the registry's SRI integrity (and sha1 shasum)."""
    integrity = dist.get("integrity")
    if integrity:
        algo, _, b64 = integrity.partition("-")
        if algo not in ("sha512", "sha384", "sha256"):
            raise SystemExit(f"unsupported integrity algorithm {algo!r}")
        got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
        if got != b64:
            raise SystemExit(f"integrity mismatch: registry {integrity}, tarball {algo}-{got}")
    shasum = dist.get("shasum")
    if shasum and hashlib.sha1(data).hexdigest() != shasum:  # noqa: S324 (registry's own check)
        raise SystemExit(f"shasum mismatch: registry {shasum}")
    if not integrity and not shasum:
        raise SystemExit("the registry gave no integrity hash: refusing")


def extract(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member, name in FILES.items():
            info = tar.getmember(member)
            if not info.isfile():
                raise SystemExit(f"{member} is not a regular file in the tarball")
            f = tar.extractfile(info)
            assert f is not None
            out[name] = f.read()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("version", nargs="?", default=DEFAULT_VERSION)
    ap.add_argument("--tarball", type=Path, help="use this downloaded tarball")
    ap.add_argument("--offline", action="store_true", help="with --tarball: skip the registry check")
    args = ap.parse_args(argv)

    url = f"{REGISTRY}/{PACKAGE}/-/{PACKAGE}-{args.version}.tgz"
    dist = None
    if not args.offline:
        dist = registry_dist(args.version)
        url = dist["tarball"]
    elif not args.tarball:
        raise SystemExit("--offline needs --tarball")
    data = args.tarball.read_bytes() if args.tarball else _get(url)
    if dist is not None:
        check_integrity(data, dist)

    files = extract(data)
    DEST.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (DEST / name).write_bytes(content)

    lines = [
        f"uPlot {args.version} (https://github.com/leeoniya/uPlot), MIT license (see LICENSE)",
        f"source: {url}",
        f"tarball sha256: {hashlib.sha256(data).hexdigest()}",
    ]
    if dist is not None and dist.get("integrity"):
        lines.append(f"tarball integrity (npm): {dist['integrity']}")
    lines.append("files (sha256, vendored unmodified from the tarball):")
    for member, name in FILES.items():
        lines.append(f"{hashlib.sha256(files[name]).hexdigest()}  {name}  ({member.removeprefix('package/')})")
    (DEST / "VERSION").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
