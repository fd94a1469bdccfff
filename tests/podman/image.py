"""The image the podman tests and benchmarks run engines in, built locally (never pulled): an empty
root filesystem (merged-/usr symlinks and mount points) whose PATH starts with this virtual
environment. The interpreter, the venv and the models are bind-mounted read-only at run time."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

IMAGE = "localhost/swapserve-test-python:latest"
CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"


def use_test_containers_conf() -> None:
    """runc and lowered ulimits (README.md here), for the podman CLI and the services servers start."""
    os.environ.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))


def build_image(image: str = IMAGE) -> str:
    with tempfile.TemporaryDirectory(prefix="swapserve-rootfs-") as tmp:
        tar_path = Path(tmp) / "rootfs.tar"
        with tarfile.open(tar_path, "w") as tar:
            for d in ("usr", "tmp", "etc", "proc", "sys", "dev", "root", "run", "var/tmp"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if "tmp" in d else 0o755
                tar.addfile(info)
            for link in ("bin", "lib", "lib64", "sbin"):
                info = tarfile.TarInfo(link)
                info.type, info.linkname = tarfile.SYMTYPE, f"usr/{link}"
                tar.addfile(info)
        path = f"{sys.prefix}/bin:/usr/local/bin:/usr/bin:/bin"
        out = subprocess.run(["podman", "import", "-q", "--change", f"ENV=PATH={path}", str(tar_path), image],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"podman import: {out.stderr.strip()}")
    return image


def host_volumes() -> list[str]:
    """What a Python engine from this venv needs inside the container, read-only at the same place."""
    paths = {"/usr", os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    return [f"{p}:{p}:ro" for p in sorted(paths)]
