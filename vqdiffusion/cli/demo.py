"""``vqdiffusion demo``: the local web app (:mod:`vqdiffusion.demo`; Gradio, the ``demo`` extra)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
from typing import Any

from .errors import CLIError
from .generate import add_model_arguments, hub_options

DEFAULT_HOST = "127.0.0.1"  # vqdiffusion.demo.DEFAULT_HOST (kept here so --help imports no torch)
DEFAULT_PORT = 7860


def add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", help="a local web app: text to image with every sampling option (needs vqdiffusion[demo])"
    )
    add_model_arguments(demo)
    demo.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to serve on (default {DEFAULT_HOST}: only this machine)"
    )
    demo.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    demo.add_argument("--bf16", action="store_true", help="run the denoiser in bfloat16")
    demo.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    check_host(args.host)
    import torch

    from ..demo import import_gradio, launch_demo
    from ..devices import resolve_device

    device = resolve_device(args.device)
    import_gradio()  # before the model is loaded: a missing extra is reported at once
    launch_demo(
        args.model,
        host=args.host,
        port=args.port,
        device=device,
        dtype=torch.bfloat16 if args.bf16 else None,
        **hub_options(args),
    )
    return 0


def check_host(host: str) -> None:
    """``--host`` must be an address of this machine that a server can bind (checked on a free port, before
    the model is loaded); CLIError naming it otherwise."""
    try:
        family, address = _bind_address(host)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
    except (OSError, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise CLIError(
            f"--host {host!r}: cannot serve on it ({reason}); give an address of this machine, e.g. 127.0.0.1 "
            "(only this machine) or 0.0.0.0 (every network interface)"
        ) from None


def _bind_address(host: str) -> tuple[socket.AddressFamily, tuple]:
    """The socket family and address to bind ``host`` on a free port: an IP address as it is, a name through
    the resolver."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        family, _, _, _, address = socket.getaddrinfo(
            host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return family, address
    if ip.version == 6:
        return socket.AF_INET6, (host, 0, 0, 0)
    return socket.AF_INET, (host, 0)
