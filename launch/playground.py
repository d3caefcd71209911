#!/usr/bin/env python
"""An any-to-any playground in the browser for a trained model.

    python launch/playground.py --model DIR [--port 7860] [--host 127.0.0.1] [--tokenizers DIR]
                                [--adapter DIR] [--scenes 500] [--max-upload-mb 10]

Serves a page at http://127.0.0.1:7860: pick a held-out embedded scene or upload an image, type a
caption or boxes, tick outputs (depth, semseg, boxes, caption, rgb, ...) in the order to generate
them, chained or independent, with sampling controls; results side by side with ground truth and
its metrics for held-out scenes. Requests are queued and run one at a time. `make playground`
serves the demo's model (runs/demo/model).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, positive_int, run, setup_logging

log = logging.getLogger("playground")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port); a taken port is a UsageError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exn:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exn.strerror or exn} (pick another --port)") from None
    sock.listen(64)
    return sock


def main(argv=None) -> int:
    p = ArgumentParser(prog="playground.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a from_pretrained model directory (the demo's OUT/model, training's OUT/final)")
    p.add_argument("--tokenizers", default=None, help="tokenizer set (default: the one recorded with the model)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory applied to --model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (0: any free port)")
    p.add_argument("--scenes", type=positive_int, default=500, help="held-out embedded scenes to offer (the demo's val split)")
    p.add_argument("--scene-seed", type=int, default=1, help="seed of the held-out scenes (the demo's val seed is 1)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image file accepted")
    p.add_argument("--max-queue", type=positive_int, default=16, help="requests that may wait at once")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    setup_logging()
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise UsageError("--max-upload-mb must be > 0")
    try:
        import uvicorn

        from fourm.playground.app import create_app
    except ImportError as exn:
        raise UsageError(f"the playground needs fastapi, uvicorn and python-multipart ({exn.name} is missing): pip install -e '.[playground]'") from None
    from fourm.generation.files import open_model
    from fourm.playground.requests import Limits
    from fourm.playground.scenes import SceneStore

    if not Path(args.model).is_dir():
        raise UsageError(f"no model at {args.model} (run `make demo` first, or pass --model DIR)")
    sock = bind(args.host, args.port)  # before loading the model: a taken port fails fast
    try:
        model, tokenizers = open_model(args.model, args.tokenizers, args.dtype, args.adapter)
    except (OSError, ValueError) as exn:
        raise UsageError(str(exn)) from None
    scenes = SceneStore(num=args.scenes, seed=args.scene_seed, res=tokenizers.resolution)
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20))
    app = create_app(model, tokenizers, model_dir=args.model, scenes=scenes, limits=limits, max_waiting=args.max_queue)
    host, port = sock.getsockname()[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the playground", args.host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    log.info("model %s (%s), modalities %s", args.model, model.config.arch, ", ".join(tokenizers.modalities))
    print(f"playground: {url}  (Ctrl+C stops it)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    run(main)
