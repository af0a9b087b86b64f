"""CLIP's byte-level BPE tokenizer, written to behave exactly like OpenAI CLIP's ``simple_tokenizer``.

Pipeline of :meth:`Tokenizer.encode` (as in OpenAI CLIP):

1. clean-up: ``ftfy.fix_text`` (mojibake, curly quotes, ligatures, NFC...), ``html.unescape`` twice,
   strip, every whitespace run collapsed to one space, lower case;
2. pre-tokenisation with CLIP's regular expression (special tokens, English contractions, letter runs,
   single digits, runs of other non-space characters);
3. each piece is UTF-8 encoded, its bytes mapped to printable unicode characters (GPT-2's byte
   table), the last character marked with ``</w>`` and merged by BPE rank.

:meth:`Tokenizer.__call__` adds ``<|startoftext|>``/``<|endoftext|>``, pads with 0 to the context
length (77) and, when truncating, keeps ``<|endoftext|>`` as the last token, so that CLIP's EOT
pooling (``argmax`` of the ids, EOT having the largest id) still finds it.

Vocabulary: the packaged ``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merges file
(https://github.com/openai/CLIP, MIT licence, Copyright (c) 2021 OpenAI), unchanged. The vocabulary
is derived from it: 256 byte characters, the same with ``</w>``, the first 48,894 merges, then the two
special tokens (49,408 entries). A Hugging Face tokenizer folder (``vocab.json`` + ``merges.txt``,
or a ``tokenizer.json``) works too (:meth:`Tokenizer.from_hf_dir`).
"""

from __future__ import annotations

import gzip
import html
import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
from torch import Tensor

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
# OpenAI CLIP keeps this many merges of the (longer) packaged file: 49152 - 256 byte tokens - 2 specials.
NUM_MERGES = 49152 - 256 - 2
_BPE_CACHE_SIZE = 1 << 16

# CLIP's pre-tokeniser (case-insensitive, as in OpenAI CLIP).
_PIECE_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE_RE = regex.compile(r"\s+")


def default_vocab_path() -> Path:
    """The packaged OpenAI CLIP merges file."""
    return Path(str(resources.files("promptkd.models") / "assets" / "bpe_simple_vocab_16e6.txt.gz"))


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the remaining bytes (controls, space, ...) map to
    code points 256, 257, ... in byte order, so no byte becomes whitespace or a control character.
    The dict's order (printable bytes first, then the others) is the order of the vocabulary's first
    256 entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Text ftfy.fix_text returns unchanged (by its list of fixes; tests/test_tokenizer.py checks it): printable ASCII, tab and newline, without "&" (the
# only ASCII character that starts something ftfy rewrites, an HTML entity). Every other ftfy fix
# needs a non-ASCII character, an escape (0x1b), "\r" or another control character. Skipping ftfy
# for such text halves the time of tokenising ordinary prompts.
_FTFY_NOOP_RE = regex.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def clean_text(text: str) -> str:
    """CLIP's clean-up: ftfy, HTML entities unescaped twice, whitespace runs collapsed, lower case."""
    if not _FTFY_NOOP_RE.fullmatch(text):
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE_RE.sub(" ", text.strip()).strip().lower()


def _read_merges_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read the BPE merges file ({exc})") from exc
    return lines


def _parse_merges(lines: Sequence[str], source: str, limit: int | None) -> list[tuple[str, str]]:
    """Merge pairs from merges-file lines; a leading ``#version`` header line is skipped."""
    lines = list(lines)
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, start=2):
        if limit is not None and len(merges) >= limit:
            break
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}:{lineno}: expected a merge 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _load_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a *tokenizers* ``tokenizer.json`` holding CLIP's BPE model."""
    model = _read_json(path).get("model", {})
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") not in (None, "</w>"):
        raise ValueError(f"{path}: not a CLIP BPE tokenizer (model type {model.get('type')!r}, "
                         f"end_of_word_suffix {model.get('end_of_word_suffix')!r})")
    vocab, raw_merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(raw_merges, list):
        raise ValueError(f"{path}: model.vocab must be an object and model.merges a list")
    merges: list[tuple[str, str]] = []
    for i, m in enumerate(raw_merges):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"{path}: merge {i} is not a pair: {m!r}")
        merges.append((pair[0], pair[1]))
    return dict(vocab), merges


class Tokenizer:
    """CLIP's BPE tokenizer.

    ``Tokenizer()`` uses the packaged OpenAI vocabulary; ``Tokenizer(path)`` reads another merges file
    in OpenAI's format (``.txt`` or ``.txt.gz``), or a Hugging Face folder with ``vocab.json`` and
    ``merges.txt`` (or, failing those, a ``tokenizer.json``).

    >>> tok = Tokenizer()
    >>> tok.encode("a photo of a cat")
    [320, 1125, 539, 320, 2368]
    >>> tok(["a photo of a cat"]).shape
    torch.Size([1, 77])
    """

    def __init__(self, vocab_path: str | Path | None = None):
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        if path.is_dir():
            encoder, merges = self._load_hf_dir(path)
        elif path.is_file():
            encoder, merges = self._load_openai_merges(path)
        else:
            raise FileNotFoundError(f"tokenizer vocabulary not found: {path}")
        self.source = str(path)
        self.encoder: dict[str, int] = encoder
        self.decoder: dict[int, str] = {i: t for t, i in encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        for special in (SOT_TOKEN, EOT_TOKEN):
            if special not in encoder:
                raise ValueError(f"{path}: the vocabulary has no {special} token")
        self.sot_id: int = encoder[SOT_TOKEN]
        self.eot_id: int = encoder[EOT_TOKEN]
        self._init_cache()

    # --- loading ----------------------------------------------------------------------------------

    @staticmethod
    def _load_openai_merges(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
        merges = _parse_merges(_read_merges_lines(path), str(path), NUM_MERGES)
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        return {token: i for i, token in enumerate(vocab)}, merges

    @staticmethod
    def _load_hf_dir(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        if not (vocab_file.is_file() and merges_file.is_file()):
            if (path / "tokenizer.json").is_file():
                return _load_tokenizer_json(path / "tokenizer.json")
            raise FileNotFoundError(
                f"{path}: a Hugging Face tokenizer folder needs vocab.json and merges.txt, or tokenizer.json "
                f"(found {sorted(p.name for p in path.iterdir())[:10]})"
            )
        encoder = _read_json(vocab_file)
        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise ValueError(f"{vocab_file}: expected a JSON object mapping tokens to integer ids")
        merges = _parse_merges(_read_merges_lines(merges_file), str(merges_file), None)
        return encoder, merges

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """A tokenizer from a Hugging Face folder (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Hugging Face tokenizer folder not found: {path}")
        return cls(path)

    def save_hf_dir(self, path: str | Path) -> Path:
        """Write ``vocab.json`` and ``merges.txt`` (Hugging Face layout) for this vocabulary."""
        from promptkd.fileio import atomic_write

        path = Path(path)
        atomic_write(path / "vocab.json", json.dumps(self.encoder, ensure_ascii=False))
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.__getitem__)
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        atomic_write(path / "merges.txt", "\n".join(lines) + "\n")
        return path

    # --- BPE ---------------------------------------------------------------------------------------

    def _init_cache(self) -> None:
        self._piece_tokens = lru_cache(maxsize=_BPE_CACHE_SIZE)(self._tokens_of_piece)
        self._piece_ids = lru_cache(maxsize=_BPE_CACHE_SIZE)(self._ids_of_piece)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for cache in ("_piece_tokens", "_piece_ids"):  # an lru_cache around a bound method does not pickle
            state.pop(cache, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """Merge the characters of one byte-mapped piece by rank (lowest first) until none applies."""
        if piece in (SOT_TOKEN, EOT_TOKEN):
            return (piece,)
        word = [*piece[:-1], piece[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best_rank, best = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    # --- public API --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _tokens_of_piece(self, piece: str) -> tuple[str, ...]:
        """BPE tokens of one pre-tokenised piece (UTF-8 bytes mapped to characters, then merged)."""
        return self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8")))

    def _ids_of_piece(self, piece: str) -> tuple[int, ...]:
        try:
            return tuple(self.encoder[t] for t in self._piece_tokens(piece))
        except KeyError as exc:  # only possible with an inconsistent vocab.json/merges.txt pair
            raise ValueError(f"{self.source}: BPE produced {exc.args[0]!r}, which the vocabulary lacks") from None

    def tokenize(self, text: str) -> list[str]:
        """BPE token strings of ``text`` (after CLIP's clean-up), without SOT/EOT."""
        out: list[str] = []
        for piece in _PIECE_RE.findall(clean_text(text)):
            out.extend(self._piece_tokens(piece))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without SOT/EOT and without truncation."""
        out: list[int] = []
        for piece in _PIECE_RE.findall(clean_text(text)):
            out.extend(self._piece_ids(piece))
        return out

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of token ids: SOT/EOT are dropped, and so is what follows the last EOT (padding)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.eot_id in ids:
            ids = ids[: len(ids) - ids[::-1].index(self.eot_id)]
        pieces: list[str] = []
        for i in ids:
            if i in (self.sot_id, self.eot_id):
                continue
            if i not in self.decoder:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            pieces.append(self.decoder[i])
        raw = bytearray(self.byte_decoder[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
                 truncate: bool = True) -> Tensor:
        """``[N, context_length]`` LongTensor: SOT, ids, EOT, zero padding.

        A text longer than the context is cut with EOT kept as the last token when ``truncate``;
        otherwise it is an error.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"text {row} is {len(ids)} tokens long (with SOT/EOT), more than the context length "
                        f"{context_length}; pass truncate=True to cut it: {text[:60]!r}..."
                    )
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """A shared tokenizer on the packaged vocabulary (built once per process)."""
    return Tokenizer()
