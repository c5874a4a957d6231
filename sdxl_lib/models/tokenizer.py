"""A CLIP byte-level BPE vocabulary generated in code, so the built-in model needs no download.

The merges are learned from a fixed English word list with the ordinary BPE procedure
(repeatedly merge the most frequent adjacent pair), which gives a real CLIP tokenizer:
`CLIPTokenizer` loads it from `vocab.json` + `merges.txt` like any other.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

# Words the demo captions and typical prompts use; the BPE merges are learned from these.
_CORPUS = " ".join(
    [
        "a an the of on in with and at photo picture image painting drawing render",
        "red green blue yellow orange purple pink white black gray grey brown cyan magenta",
        "circle square triangle star ring stripe stripes cross dot dots diamond heart",
        "background foreground top bottom left right center middle corner small large big tiny",
        "dark light bright pale striped plain gradient textured portrait landscape wide tall",
        "dog cat person man woman face house tree sky sea mountain city car flower",
        "style detailed high quality sharp blurry soft hard shape shapes colour color",
    ]
).split()

NUM_MERGES = 400
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training; ties broken lexicographically so the result is deterministic."""
    byte_map = bytes_to_unicode()
    counts = Counter(words)
    splits = {w: [byte_map[b] for b in w.encode()[:-1]] + [byte_map[w.encode()[-1]] + "</w>"] for w in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in splits.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    return merges


def write_clip_tokenizer_files(directory: Path) -> int:
    """Write vocab.json and merges.txt for a CLIP tokenizer; returns the vocabulary size."""
    byte_chars = list(bytes_to_unicode().values())
    merges = learn_merges(_CORPUS, NUM_MERGES)
    vocab_tokens = byte_chars + [c + "</w>" for c in byte_chars]
    vocab_tokens += ["".join(m) for m in merges if "".join(m) not in vocab_tokens]
    vocab_tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_tokens))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)
