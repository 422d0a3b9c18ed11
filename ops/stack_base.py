"""What every part of the local stack (ops/stack) shares: where its state lives, how a failure is told, and how a
program is found, installed and recognised as the stack's own. Standard library only."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("ZIMAGE_STACK_DIR") or ROOT / ".stack").resolve()
PIDS = STATE / "pids"
HOST = "127.0.0.1"


class StackError(Exception):
    """A failure worth one clear line (and maybe a log tail), not a traceback."""


def port_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise StackError(f"{name}={raw!r} is not a TCP port")
    return int(raw)



def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0



# ---------------------------------------------------------------- processes we started

def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"  # a zombie has exited already


def is_ours(pid: int, marker: str) -> bool:
    """The pid runs the expected program from this stack's state directory (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return alive(pid) and marker in cmdline and (cwd == STATE or STATE in cwd.parents)


# ---------------------------------------------------------------- installing what a fresh machine lacks

def run_tool(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"{what} failed (exit code {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def need_command(command: str, apt_package: str) -> str:
    found = shutil.which(command)
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"] if shutil.which("sudo") else None
    if sudo is None or not shutil.which("apt-get"):
        raise StackError(f"`{command}` is missing: install it (as root: apt-get install -y {apt_package})")
    print(f"  installing {apt_package} with apt-get ...", flush=True)
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", apt_package]):
        run_tool([*sudo, "env", "DEBIAN_FRONTEND=noninteractive", *step], " ".join(step))
    found = shutil.which(command)
    if not found:
        raise StackError(f"{apt_package} installed but `{command}` is still not on PATH")
    return found

