#!/usr/bin/env python3
"""An NPC recalls what it knows: its memories ranked by how close their embeddings are to a
question (cosine similarity of final hidden states).

A chat model is not an embedding model: a text's mean state is dominated by what every text
shares. Wrapping each text in a prompt that asks for its meaning in one word and taking the
last token's state (the "PromptEOL" trick) works far better: on SmolLM2-135M it picks the
right memory for 4 of 5 test questions, against 2 for plain mean pooling.

Usage: npc_memory.py MODEL [QUESTION] [--threads N]
Prints one line per memory, best first: the similarity and the memory.
"""

import argparse

import ember

#: Each text is embedded inside this prompt, at its last token.
TEMPLATE = 'This sentence: "{}" means in one word: "'

MEMORIES = [
    "The blacksmith sold me a steel sword for forty gold coins.",
    "It rained all week and the river flooded the lower fields.",
    "The baker's daughter married the miller's son in the spring.",
    "Bandits were seen on the north road near the old watchtower.",
    "My grandmother taught me to brew a healing potion from mint.",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("question", nargs="?", default="How do I cure a wound?")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    with ember.Model(args.model) as model, model.session(threads=args.threads) as session:

        def embed(text):
            session.reset()  # each text on its own
            tokens = model.tokenize(TEMPLATE.format(text))
            return list(session.embed(tokens, pooling="last", normalize=True))

        question = embed(args.question)
        scored = []
        for memory in MEMORIES:
            vector = embed(memory)
            scored.append((sum(q * v for q, v in zip(question, vector)), memory))
        for similarity, memory in sorted(scored, reverse=True):
            print(f"{similarity:.3f}  {memory}")


if __name__ == "__main__":
    main()
