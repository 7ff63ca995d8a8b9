"""`multigran serve`: arguments and the command (FastAPI and uvicorn are imported only when it runs)."""

import logging
import os


def add_serve_arguments(parser):
    parser.add_argument("--model", required=True, help="a multigran model directory")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--served-model-name", help="the name clients pass as 'model' (default: the directory's name)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together (a request takes n rows)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a batch slot; beyond it the server answers 429 with Retry-After")
    parser.add_argument("--allowed-local-media-path",
                        help="a folder whose files requests may name as images (default: no local files)")
    parser.add_argument("--media-timeout", type=float, default=10.0, help="seconds an image URL may take to answer")
    parser.add_argument("--max-image-bytes", type=int, default=20 << 20, help="largest image a request may carry")
    parser.add_argument("--max-images", type=int, default=8, help="most images in one request")
    parser.add_argument("--default-max-tokens", type=int, default=512,
                        help="answer length when a request gives no max_tokens")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="on SIGTERM/SIGINT, seconds to let open requests finish before exiting")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def serve_command(args):
    from ..extras import require

    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    from ..loading import load_model, load_processor
    from .app import create_app
    from .media import MediaPolicy

    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        raise ValueError(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a folder")
    for name in ("max_batch_size", "max_images", "default_max_tokens", "max_image_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    processor = load_processor(args.model)
    model = load_model(args.model, args.device, args.dtype)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    media = MediaPolicy(allowed_local_path=args.allowed_local_media_path, timeout=args.media_timeout,
                        max_bytes=args.max_image_bytes)
    app = create_app(model, processor, model_name=name, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                     media=media, max_images=args.max_images, default_max_tokens=args.default_max_tokens)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_timeout)
