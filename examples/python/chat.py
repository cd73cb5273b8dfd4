#!/usr/bin/env python3
"""Interactive chat with Ember's Python bindings, using the model's chat template.

    python3 examples/python/chat.py models/SmolLM2-135M-Instruct.Q4_1.gguf --system "Be brief."

Reads one user message per line from stdin until EOF and prints each reply on stdout (the
"> " prompt goes to stderr, so piped output is only the replies). The conversation is kept
in one session, so each turn computes only its new tokens. Prints exactly what
examples/cpp/chat.cpp prints for the same input and options.
"""

import argparse
import sys

import ember


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="GGUF file or Hugging Face folder of a model with a chat template")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max-tokens", type=int, default=256, help="per reply")
    parser.add_argument("--threads", type=int, default=0, help="0 = half the cores")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    try:
        with ember.Model(args.model, threads=args.threads) as model, model.session() as session:
            sampler = ember.Sampler(temperature=args.temperature, seed=args.seed)
            start = [{"role": "system", "content": args.system}] if args.system else []
            messages = list(start)
            while True:
                print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:
                    break
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line})
                try:
                    reply = say(session, messages, sampler, args.max_tokens)
                except ember.ContextFullError:
                    print("(the context is full: starting a new conversation)", file=sys.stderr)
                    messages = start + [messages[-1]]
                    reply = say(session, messages, sampler, args.max_tokens)
                # Messages reach the C API as NUL-terminated strings: drop any NUL generated.
                messages.append({"role": "assistant", "content": reply.replace("\0", "")})
    except ember.EmberError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def say(session: ember.Session, messages: list, sampler: ember.Sampler, max_tokens: int) -> str:
    """Streams the assistant's reply to stdout and returns it."""
    pieces = []
    for piece in session.chat(messages, max_tokens=max_tokens, sampler=sampler):
        sys.stdout.write(piece)
        sys.stdout.flush()
        pieces.append(piece)
    sys.stdout.write("\n")
    return "".join(pieces)


if __name__ == "__main__":
    sys.exit(main())
