"""``vlmkit serve``: an OpenAI-compatible chat completions server."""

from __future__ import annotations

import argparse
import signal
import sys

from vlmkit.commands.common import add_engine_args, add_model_args, load_model, positive_float, positive_int

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(host: str, listed: str | None) -> tuple[str, ...] | None:
    """The Host values to serve: those listed, else the loopback names for a loopback bind, the bound address
    itself for a specific one, and any (None) for all interfaces, where the server's public names are unknown."""
    if listed:
        return tuple(h.strip() for h in listed.split(",") if h.strip())
    if host in LOOPBACK:
        return LOOPBACK
    if host in ("0.0.0.0", "::", ""):
        return None
    return (host, *LOOPBACK)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from vlmkit.serving.http import uvicorn_config
    from vlmkit.serving.server import ServerSettings, create_app

    settings = ServerSettings(
        model_name=args.model,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        max_images_per_request=args.max_images_per_request,
        max_image_tokens=args.max_image_tokens,
        allow_remote_images=args.allow_remote_images,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
        allowed_origins=tuple(o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()),
        body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout,
        max_connections=args.max_connections,
        remote_image_timeout_s=args.remote_image_timeout,
        ui=not args.no_ui,
    )
    if settings.allowed_hosts is None and args.allowed_hosts is None:
        print("note: serving requests for any Host name; list this server's names with --allowed-hosts to refuse "
              "DNS-rebinding requests", file=sys.stderr)  # fmt: skip
    vlm = load_model(args)
    app = create_app(vlm, settings)
    print(f"serving {args.model!r} on http://{args.host}:{args.port}/v1 (SIGTERM or Ctrl-C drains and stops)",
          file=sys.stderr)  # fmt: skip
    if settings.ui:
        print(f"chat page: http://{args.host}:{args.port}/", file=sys.stderr)
    # uvicorn drains on SIGTERM, then re-raises the signal; a no-op handler turns that into a clean exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    config = uvicorn_config(app, settings, args.host, args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=None)  # fmt: skip
    uvicorn.Server(config).run()
    print("server stopped", file=sys.stderr)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--max-batch", type=positive_int, default=32, help="requests decoded together")
    parser.add_argument("--max-queue", type=positive_int, default=256, help="waiting requests before 429")
    parser.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit (413 above)")
    parser.add_argument("--max-images-per-request", type=positive_int, default=8)
    parser.add_argument(
        "--max-image-tokens", type=positive_int, help="image tokens per request, checked first (default: the context)"
    )
    parser.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    parser.add_argument("--allowed-local-media-path", help="allow file:// image URLs under this folder")
    parser.add_argument("--remote-image-timeout", type=positive_float, default=5.0,
                        help="seconds to download one remote image, in all")  # fmt: skip
    parser.add_argument("--allowed-hosts", help="comma-separated Host names served (default: from --host; * = any)")
    parser.add_argument("--allowed-origins", help="comma-separated web origins that may call the API (* = any)")
    parser.add_argument("--header-timeout", type=positive_float, default=10.0,
                        help="seconds a client has to send a request head")  # fmt: skip
    parser.add_argument("--body-timeout", type=positive_float, default=30.0,
                        help="seconds a client has to send a request body")  # fmt: skip
    parser.add_argument("--max-connections", type=positive_int, default=512, help="open connections (503 above)")
    parser.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run)
