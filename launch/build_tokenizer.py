"""Builds the embedded tokenizer qwen2vl_jax/assets/tokenizer.json, deterministically.

Byte-level BPE in the Qwen2 layout (NFC normaliser, the Qwen split regex then ByteLevel, ByteLevel
decoder), trained on the text of the synthetic samples (every kind, train split only) so that the
vocabulary covers captions, questions, OCR words and ChatML. Exactly TINY_TEXT_VOCAB (2032) BPE tokens
(256 byte symbols + 1776 merges) at ids 0..2031, then the 14 special tokens at 2032..2045.

    python -m launch.build_tokenizer            # rewrite the asset
    python -m launch.build_tokenizer --check    # exit 1 if the shipped asset differs from a rebuild
"""
from __future__ import annotations

import json
import re

import numpy as np
import tokenizers
from absl import flags
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from experiments import flags as cli
from qwen2vl_jax.model.config import SPECIAL_TOKENS, TINY_TEXT_VOCAB
from qwen2vl_jax.data import formats, synthetic
from qwen2vl_jax.data.tokenizer import EMBEDDED_PATH, from_json_str

# The Qwen2 pre-tokenizer regex (from the tokenizer.json of Qwen2 / Qwen2-VL).
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SAMPLES_PER_KIND = 400
PSEUDO_WORDS = 20000
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def corpus(samples_per_kind: int = SAMPLES_PER_KIND, seed: int = 0) -> list[str]:
    """Text pieces between special tokens of the synthetic samples, plus the OCR words in three cases
    (so that their merges exist in lower/title case for general text)."""
    pieces: list[str] = []
    for kind in formats.KINDS:
        for i in range(samples_per_kind):
            pieces += [p for p in _SPECIAL_SPLIT.split(formats.sample_text(kind, i, "train", seed)) if p]
    for word in synthetic.WORDS:
        pieces += [word, word.lower(), word.title(), " " + word.lower()]
    return pieces + pseudo_words(seed)


def pseudo_words(seed: int = 0, n: int = PSEUDO_WORDS) -> list[str]:
    """Pronounceable filler words (Zipf-weighted syllables) so that BPE reaches its full size with
    general sub-word merges after the synthetic-data merges."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 7])))
    syllables = [c + v for c in "bcdfghjklmnprstvwyz" for v in ("a", "e", "i", "o", "u", "ar", "en", "in", "on", "er")]
    weights = 1.0 / np.arange(1, len(syllables) + 1)
    weights /= weights.sum()
    order = rng.permutation(len(syllables))
    words = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        word = "".join(syllables[order[j]] for j in rng.choice(len(syllables), size=k, p=weights))
        words.append((" " if rng.random() < 0.7 else "") + (word.title() if rng.random() < 0.15 else word))
    return words


def build(samples_per_kind: int = SAMPLES_PER_KIND, seed: int = 0) -> str:
    """-> tokenizer.json text."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_TEXT_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(samples_per_kind, seed), trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=False)
    if n != TINY_TEXT_VOCAB:
        raise RuntimeError(f"BPE training produced {n} tokens, expected {TINY_TEXT_VOCAB}: enlarge the corpus")
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    text = json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=None, separators=(",", ":"))
    from_json_str(text, "embedded (rebuilt)")    # validates the special-token layout
    return text


FLAGS = flags.FlagValues()


flags.DEFINE_bool("check", False, "compare a rebuild with the shipped asset (exit 1 if they differ)", flag_values=FLAGS)
flags.DEFINE_string("out", EMBEDDED_PATH, "tokenizer.json to write (or to compare with --check)", flag_values=FLAGS)


def main(argv) -> int:
    cli.parse(FLAGS, argv, __doc__)
    text = build()
    if FLAGS.check:
        with open(FLAGS.out, encoding="utf-8") as f:
            same = f.read() == text
        print(f"{FLAGS.out}: {'identical to' if same else 'DIFFERS from'} a rebuild")
        return 0 if same else 1
    with open(FLAGS.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {FLAGS.out} ({len(text)} bytes, {TINY_TEXT_VOCAB} BPE + {len(SPECIAL_TOKENS)} special tokens)")
    return 0


if __name__ == "__main__":
    cli.run(main)
