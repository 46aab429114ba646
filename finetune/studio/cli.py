"""`finetune studio`: serve the local web studio.

    finetune studio [--host 127.0.0.1] [--port 8765] [--root DIR]

Loopback by default. On any other interface a token is required; it is printed with the URL at start.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune studio", description="A local web studio: data, recipes, runs.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--root", type=Path, default=Path("."),
                   help="folder the studio may read and write: data, run folders (default: the current folder)")
    p.add_argument("--token", default=os.environ.get("FINETUNE_STUDIO_TOKEN"),
                   help="token for a non-loopback bind (default: a new random one, printed at start)")
    p.add_argument("--devices", default="",
                   help="comma-separated CUDA devices, one run at a time on each (default: one queue, all devices)")
    p.add_argument("--max-upload-mb", type=int, default=50, help="largest file the page may upload (MiB)")
    p.add_argument("--recipes", type=Path, default=None,
                   help="folder of recipes to start from (default: the checkout's recipes/)")
    return p


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def addresses(host: str) -> list[str]:
    """Addresses to print for a bind: the host itself, or for a wildcard bind (0.0.0.0, ::) the ones another
    machine can open (this machine's own addresses; a wildcard is not an address a browser can reach)."""
    import socket

    if host not in ("0.0.0.0", "::", ""):
        return [host]
    family = socket.AF_INET6 if host == "::" else socket.AF_INET
    found = []
    try:
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, family)]
    except OSError:
        pass
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:  # the interface of the default route (a UDP connect sends nothing; 192.0.2.1 is a documentation address)
            probe.connect(("2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1", 9))
            found.append(probe.getsockname()[0])
        except OSError:
            pass
    outside = [a for a in dict.fromkeys(found) if not a.startswith(("127.", "::1", "fe80:"))]
    return [*outside, "::1" if family == socket.AF_INET6 else "127.0.0.1"]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if not args.root.is_dir():
        print(f"error: --root {args.root}: not a folder; create it or point at your data", file=sys.stderr)
        raise SystemExit(2)
    if not 0 < args.port < 65536:
        print(f"error: --port {args.port}: choose 1-65535", file=sys.stderr)
        raise SystemExit(2)
    try:
        import uvicorn

        from finetune.studio.app import Studio, create_app
    except ImportError as e:
        print(f"error: the studio needs its server packages ({e.name} is missing); pip install starlette uvicorn",
              file=sys.stderr)
        raise SystemExit(2) from None
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] or [None]
    extra = {"recipes_dir": args.recipes.resolve()} if args.recipes else {}
    studio = Studio.make(args.root, args.host, args.token, devices=devices,
                         max_upload=args.max_upload_mb * 1024 * 1024, **extra)
    # the server's checks resolve what a run resolves, from an empty folder of the studio's (see procs)
    from finetune.studio.procs import work_dir

    os.chdir(work_dir(studio.root / ".studio"))
    query = f"?token={studio.token}" if studio.token else ""
    urls = [f"http://{_bracketed(h)}:{args.port}/{query}" for h in addresses(args.host)]
    print(f"finetune studio: {urls[0]}  (root: {studio.root})", flush=True)
    for url in urls[1:]:
        print(f"  also: {url}", flush=True)
    if studio.token:
        print("not a loopback address: every request needs the token in that URL", flush=True)
    uvicorn.run(create_app(studio), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=2)
