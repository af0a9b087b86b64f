"""The CLIP tokenizer against transformers' CLIPTokenizer built from the same vocabulary.

transformers 5's ``CLIPTokenizer`` is backed by the Rust *tokenizers* library: its normaliser is NFC +
whitespace collapse + lower case. It does NOT run OpenAI CLIP's ``ftfy.fix_text`` and double
``html.unescape`` (the slow tokenizer of transformers 4 ran ftfy when installed, a BasicTokenizer
otherwise, and never unescaped HTML). A second, tiny difference: Python's ``str.lower`` (OpenAI CLIP)
applies the Greek final-sigma rule ("ΟΔΟΣ" -> "οδος"), the Rust normaliser lower-cases character by
character ("οδοσ"). So for every string our ids equal the HF ids of the string after ``ftfy.fix_text``
+ ``html.unescape`` x2 + ``str.lower``, and for strings those steps leave unchanged (up to per-character
lower-casing) the ids are equal outright.
"""

from __future__ import annotations

import gzip
import html
import json
import pickle
import random

import ftfy
import pytest
import torch

from promptkd.models.tokenizer import Tokenizer, bytes_to_unicode, clean_text, default_vocab_path

transformers = pytest.importorskip("transformers")

HAND_WRITTEN = [
    "a photo of a cat.",
    "a photo of a {}, a type of pet.",
    "A PHOTO OF A Golden Retriever",
    "Hello, World!!!",
    "it's", "I'm here", "they're", "we've", "you'll", "he'd", "can't", "IT'S LOUD",
    "don't stop", "rock'n'roll", "o'clock", "'quoted'", '"double quoted"',
    "café au lait", "naïve résumé", "Straße", "ÅÄÖ åäö", "Crème brûlée", "jalapeño", "Zürich",
    "İstanbul", "ΣΑΣ ΟΔΟΣ".lower(), "Ωμέγα", "Привет, мир", "مرحبا بالعالم", "שלום", "नमस्ते", "ไทย",
    "日本語のテキスト", "中文字符和标点。", "한국어 문장", "ｶﾀｶﾅ",
    "🐶🐱 emoji", "👍🏽 thumbs", "👨‍👩‍👧 family", "🇫🇷 flag", "❤️", "☃ snowman",
    "1234567890", "3.14159", "1,000,000", "2024-03-05", "v2.0.1", "H2O", "100%", "$19.99", "#hashtag",
    "@user", "e-mail: someone@example.com", "https://example.com/path?q=1&x=2",
    "...", "?!?!", "(parentheses) [brackets] {braces}", "a/b\\c|d", "~`^_", "* bullet", "--dash--",
    "tabs\tand\nnewlines\r\nand    spaces", "   leading and trailing   ", "\n\n\n", "", " ",
    "nbsp\u00a0here", "em\u2003space", "zero\u200bwidth", "soft\u00adhyphen",
    "<|startoftext|>", "a <|endoftext|> b", "<html><body>hi</body></html>", "x < y > z",
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "ab" * 40,
    "The quick brown fox jumps over the lazy dog. " * 8,
    "a " * 100,
    "1 2 3 4 5 6 7 8 9 0 " * 10,
    "🙂" * 90,
]

# Strings whose ids differ from transformers' CLIPTokenizer only because of OpenAI's clean-up.
CLEANUP_DIFFERENCES = {
    "fish &amp; chips": "fish & chips",  # HTML entity unescaped
    "&amp;amp; twice": "& twice",  # ... twice
    "5 &lt; 6 &gt; 4": "5 < 6 > 4",
    "&quot;quoted&quot;": '"quoted"',
    "don’t": "don't",  # ftfy un-curls quotes
    "“curly”": '"curly"',
    "ﬁsh ﬂour": "fish flour",  # ftfy expands latin ligatures
    "cafÃ©": "café",  # ftfy repairs mojibake
    "ＦＵＬＬ ｗｉｄｔｈ": "full width",  # ftfy narrows full-width letters
    "ΟΔΟΣ": "οδος",  # Python's lower() uses the final sigma; the Rust normaliser gives "οδοσ"
}

ALPHABET_POOLS = [
    "abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "àáâãäåçèéêëìíîïñòóôõöùúûüýÿœß",
    "αβγδεζηθικλμνξοπρστυφχψω",
    "абвгдежзийклмнопрстуфхцчшщъыьэюя",
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道",
    "あいうえおかきくけこさしすせそアイウエオ",
    "😀😂🥲😍🤖🎉🌍🚀🍕🐍",
    ".,;:!?-_()[]{}/\\@#$%^*+=~`|\"'",
    " \t\n",
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pools = rng.sample(ALPHABET_POOLS, k=rng.randint(1, 4))
        chars = "".join(pools)
        words = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 12))]
        sep = rng.choice([" ", "  ", "\t", " \n "])
        text = sep.join(words)
        if rng.random() < 0.3:
            text += rng.choice(["'s", "'ll", "'re", " n't", "'D"])
        out.append(text)
    return out


CORPUS = HAND_WRITTEN + list(CLEANUP_DIFFERENCES) + _random_strings(200)


def _openai_cleanup(text: str) -> str:
    """The steps OpenAI CLIP runs and transformers' CLIPTokenizer does not (or does differently)."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).lower()


def _per_char_lower(text: str) -> str:
    return "".join(c.lower() for c in text)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """vocab.json/merges.txt derived from the packaged merges file, independently of our loader."""
    path = tmp_path_factory.mktemp("hf_clip_tok")
    with gzip.open(default_vocab_path(), "rt", encoding="utf-8") as fh:
        merges = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf(hf_dir):
    return transformers.CLIPTokenizer.from_pretrained(str(hf_dir))


def _ours(tok: Tokenizer, text: str) -> list[int]:
    return [tok.sot_id, *tok.encode(text), tok.eot_id]


def test_vocabulary_facts(tok):
    assert tok.vocab_size == 49408
    assert (tok.sot_id, tok.eot_id) == (49406, 49407)
    assert tok.eot_id == max(tok.encoder.values())  # CLIP pools the text at argmax(ids)
    # ids published with OpenAI CLIP's README example ("a diagram" etc. use the same words)
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_parity_with_transformers_on_unchanged_strings(tok, hf):
    unchanged = [s for s in CORPUS if _openai_cleanup(s) == _per_char_lower(s)]
    assert len(unchanged) >= 200
    mismatches = [(s, _ours(tok, s), hf(s)["input_ids"]) for s in unchanged if _ours(tok, s) != hf(s)["input_ids"]]
    assert not mismatches, mismatches[:3]


def test_every_difference_is_the_openai_cleanup(tok, hf):
    for s in CORPUS:
        assert _ours(tok, s) == hf(_openai_cleanup(s))["input_ids"], s


@pytest.mark.parametrize("raw, cleaned", list(CLEANUP_DIFFERENCES.items()))
def test_documented_differences(tok, hf, raw, cleaned):
    assert _ours(tok, raw) != hf(raw)["input_ids"]  # transformers keeps the raw text
    assert tok.encode(raw) == tok.encode(cleaned)
    assert clean_text(raw) == cleaned.lower()


def test_long_strings_are_really_long(tok):
    long_ones = [s for s in CORPUS if len(tok.encode(s)) > 75]
    assert len(long_ones) >= 4


def test_batch_truncation_matches_transformers(tok, hf):
    texts = [s for s in CORPUS if len(tok.encode(s)) > 75] + ["a photo of a dog.", ""]
    batch = tok(texts)
    assert batch.dtype == torch.long and batch.shape == (len(texts), 77)
    for row, text in zip(batch, texts):
        ref = hf(_openai_cleanup(text), truncation=True, max_length=77)["input_ids"]
        n = len(ref)
        assert row[:n].tolist() == ref
        assert (row[n:] == 0).all()  # CLIP pads with 0, not with EOT as transformers does
        assert row[0] == tok.sot_id and int(row.argmax()) == n - 1 and row[n - 1] == tok.eot_id


def test_truncation_keeps_eot_last_and_refuses_when_asked(tok):
    text = "word " * 200
    ids = tok.encode(text)
    row = tok(text)[0]
    assert row.tolist() == [tok.sot_id, *ids[:75], tok.eot_id]
    with pytest.raises(ValueError, match="context length 77"):
        tok(text, truncate=False)
    # exactly 75 tokens + SOT/EOT fits without truncation; 76 does not
    assert tok("a " * 75, truncate=False)[0, -1] == tok.eot_id
    with pytest.raises(ValueError):
        tok("a " * 76, truncate=False)
    short = tok(["a cat"], context_length=8)
    assert short.tolist() == [[tok.sot_id, 320, 2368, tok.eot_id, 0, 0, 0, 0]]
    # a single printable ASCII letter is its byte token + "</w>": id 256 + (code point - ord("!"))
    letter = {c: 256 + ord(c) - ord("!") for c in "abcdef"}
    assert tok("a b c d e f", context_length=4).tolist() == [[tok.sot_id, letter["a"], letter["b"], tok.eot_id]]


def test_decode(tok, hf):
    for s in CORPUS[:120]:
        ids = _ours(tok, s)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    padded = tok("a photo of a cat.")[0]
    assert tok.decode(padded) == "a photo of a cat ."
    assert tok.decode(tok.encode("naïve café 日本")) == "naïve café 日本"
    assert tok.decode(tok("a <|endoftext|> b")[0]) == "a b"  # EOT inside the text, then padding
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([60000])


def test_hf_folder_written_by_transformers(tok, hf, tmp_path):
    hf.save_pretrained(str(tmp_path))  # transformers 5 writes tokenizer.json only
    assert (tmp_path / "tokenizer.json").is_file()
    other = Tokenizer.from_hf_dir(tmp_path)
    assert (other.sot_id, other.eot_id, other.vocab_size) == (tok.sot_id, tok.eot_id, tok.vocab_size)
    for s in CORPUS[::7]:
        assert other.encode(s) == tok.encode(s)


def test_save_hf_dir_round_trip(tok, tmp_path):
    again = Tokenizer.from_hf_dir(tok.save_hf_dir(tmp_path / "out"))
    assert again.encoder == tok.encoder and again.bpe_ranks == tok.bpe_ranks


def test_pickles_for_worker_processes(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone("a photo of a cat").equal(tok("a photo of a cat"))


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(tmp_path / "missing.txt.gz")
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt, or tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vocab.json").write_text("{not json", encoding="utf-8")
    (bad / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_hf_dir(bad)
    (bad / "vocab.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
    with pytest.raises(ValueError, match="<\\|startoftext\\|>"):
        Tokenizer.from_hf_dir(bad)
    (bad / "vocab.json").unlink()
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="not a CLIP BPE tokenizer"):
        Tokenizer.from_hf_dir(bad)
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\ni n\nthree parts here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt:3"):
        Tokenizer(merges)


def test_ftfy_fast_path_changes_nothing():
    """clean_text skips ftfy for printable ASCII (+ tab/newline) without "&": ftfy is the identity there."""
    rng = random.Random(1)
    allowed = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n"]
    samples = ["".join(rng.choice(allowed) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    samples += ["don't", "\"quoted\" 'single'", "a\\nb", "<b>bold</b>", "x" * 500, "\n\t\n", "#;{}[]~^`|"]
    for s in samples:
        assert ftfy.fix_text(s) == s, repr(s)
    for s in CORPUS:  # the whole clean-up equals OpenAI's unoptimised formula
        expected = " ".join(html.unescape(html.unescape(ftfy.fix_text(s))).split()).lower()
        assert clean_text(s) == expected, repr(s)


def test_real_tokens_through_a_tiny_clip_text_tower(tok):
    """Integration smoke: our ids feed the CLIP text tower and it pools at EOT (argmax of the ids)."""
    clip_mod = pytest.importorskip("promptkd.models.clip")
    torch.manual_seed(0)
    model = clip_mod.tiny_clip(seed=0, width=32, layers=1)
    texts = ["a photo of a cat.", "a photo of a samoyed, a type of pet.", "The quick brown fox jumps. " * 20]
    tokens = tok(texts)
    with torch.no_grad():
        feats = model.encode_text(tokens)
        assert feats.shape == (3, model.cfg.embed_dim) and torch.isfinite(feats).all()
        eot = tokens.argmax(-1)
        assert eot.tolist() == [len(tok.encode(t)) + 1 for t in texts[:2]] + [76]  # the long one truncated
        # pooled at EOT under a causal mask: what follows EOT (padding) cannot matter ...
        noisy = tokens.clone()
        after = torch.arange(77) > eot[:, None]
        noisy[after] = torch.randint(0, tok.sot_id, (int(after.sum()),))
        assert torch.allclose(model.encode_text(noisy), feats, atol=1e-5)
        # ... and a shorter context ending at the last EOT gives the same features
        assert torch.allclose(model.encode_text(tokens[:2, : int(eot[:2].max()) + 1]), feats[:2], atol=1e-5)
        # while a word before EOT does
        changed = tok(["a photo of a dog."])
        assert not torch.allclose(model.encode_text(changed)[0], feats[0], atol=1e-3)


def test_plain_text_openai_merges_file(tok, tmp_path):
    plain = tmp_path / "bpe_simple_vocab_16e6.txt"
    with gzip.open(default_vocab_path(), "rt", encoding="utf-8") as fh:
        plain.write_text(fh.read(), encoding="utf-8")
    other = Tokenizer(plain)
    assert other.encoder == tok.encoder and other.encode("naïve café 🐶") == tok.encode("naïve café 🐶")
