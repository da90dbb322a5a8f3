"""``vlmkit chat``: one answer, or an interactive multi-turn session with streaming."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vlmkit.commands.common import add_engine_args, add_model_args, load_model, positive_int
from vlmkit.errors import VlmkitError

HELP = "commands: /image PATH (attach to the next message), /reset, /quit"


def _user_turn(text: str, images: list[str]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image", "image": path} for path in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from vlmkit.processing.images import load_image

    for path in args.image:
        load_image(path)  # a bad image fails before the model loads
    vlm = load_model(args)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise VlmkitError("the prompt is empty")
        print(vlm.chat([_user_turn(args.prompt, args.image)], **_options(args)))
        return 0
    history: list[dict[str, Any]] = []
    pending = list(args.image)
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, pending = [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                load_image(path)
            except VlmkitError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            pending.append(path)
            print(f"(image attached: {path})", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=sys.stderr)
            continue
        turn = _user_turn(line, pending)
        try:
            pieces = []
            print("vlm> ", end="", flush=True)
            for piece in vlm.stream([*history, turn], **_options(args)):
                pieces.append(piece)
                print(piece, end="", flush=True)
            print()
        except VlmkitError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        history += [turn, {"role": "assistant", "content": "".join(pieces)}]
        pending = []


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="answer this once and exit; without it, start a session")
    add_model_args(parser)
    add_engine_args(parser)
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="attach an image (repeatable)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.set_defaults(func=run)
