"""Text as the pipeline sees it: a text sample is one row of int64 token ids, right-padded.

The tokenizer is the pretrained model's own `tokenizer.json`, parsed by the Rust `tokenizers`
library (never `AutoTokenizer`, which would read a directory's other files and may run code).
A text model's file carries that JSON in its config (`tokenizer`), so the file alone turns raw
text into the model's input, in `predict` as in evaluation.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

import numpy as np
import torch

_WHITESPACE = re.compile(r"\s+")
MAX_TOKENIZER_BYTES = 64 << 20  # far beyond a 250k-token vocabulary; a file's tokenizer is untrusted


class TokenizerError(ValueError):
    """A tokenizer.json that `tokenizers` cannot read, or one that does not fit the model."""


def normalise_text(text: str) -> str:
    """The key under which two texts count as the same: Unicode NFKC, case-folded, whitespace collapsed.
    Duplicates go to one split by it, and validate looks for leakage by it."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def load_tokenizer(tokenizer_json: str, max_length: int, origin: str = "tokenizer.json"):
    """A `tokenizers.Tokenizer` from its JSON that cuts at `max_length` tokens and never pads: the padding
    a file may declare (all-MiniLM-L6-v2's pads every text to 128) would cost compute on every row."""
    from tokenizers import Tokenizer

    if len(tokenizer_json) > MAX_TOKENIZER_BYTES:
        raise TokenizerError(f"{origin}: {len(tokenizer_json):,} bytes, more than {MAX_TOKENIZER_BYTES:,}")
    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the Rust parser raises plain Exception
        raise TokenizerError(f"{origin}: not a tokenizer `tokenizers` can read ({e})") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


def pad_id(tokenizer_json: str) -> int:
    """The id of the tokenizer's padding token ([PAD]), from its vocabulary."""
    spec = json.loads(tokenizer_json)
    vocab = spec.get("model", {}).get("vocab", {})
    token = (spec.get("padding") or {}).get("pad_token", "[PAD]")
    if not isinstance(vocab, dict) or not isinstance(vocab.get(token), int):
        raise TokenizerError(f"tokenizer.json: no id for the padding token {token!r} in model.vocab")
    return vocab[token]


def encode_counting_cut(tokenizer, texts: list[str], max_length: int, pad: int) -> tuple[np.ndarray, int]:
    """Token ids [len(texts), max_length], int64, each row right-padded with `pad`; and how many texts
    were cut at max_length."""
    ids = np.full((len(texts), max_length), pad, dtype=np.int64)
    cut = 0
    for row, encoding in enumerate(tokenizer.encode_batch(list(texts))):
        ids[row, : len(encoding.ids)] = encoding.ids
        cut += bool(encoding.overflowing)
    return ids, cut


def encode(tokenizer, texts: list[str], max_length: int, pad: int) -> np.ndarray:
    return encode_counting_cut(tokenizer, texts, max_length, pad)[0]


def lengths(ids: np.ndarray, pad: int) -> np.ndarray:
    """Tokens per row, special tokens included: the position after the last non-padding id."""
    used = ids != pad
    return np.where(used.any(axis=1), ids.shape[1] - np.argmax(used[:, ::-1], axis=1), 0)


def trim_padding(x: torch.Tensor, pad: int) -> torch.Tensor:
    """The batch without the padding columns every row has at its end: the same logits (the model masks
    padding), computed on the batch's longest text instead of max_length."""
    used = (x != pad).any(dim=0).nonzero()
    return x[:, : int(used[-1]) + 1] if len(used) else x[:, :1]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def is_text_config(config: dict[str, Any]) -> bool:
    return config.get("modality") == "text"


def example_input(config: dict[str, Any], batch: int = 2) -> torch.Tensor:
    """A batch to run a model on when only its shape matters: zeros, or a text model's non-padding ids."""
    if is_text_config(config):
        return torch.ones(batch, *config["input_shape"], dtype=torch.long)
    return torch.zeros(batch, *config["input_shape"])


def example_ids(config: dict[str, Any], batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random ids of the model's tokenizer [batch, length], starting with its first special token: an input
    to trace and check a text model's export with."""
    ids = torch.randint(0, load_tokenizer(config["tokenizer"], length).get_vocab_size(), (batch, length),
                        generator=generator)
    ids[ids == pad_id(config["tokenizer"])] += 1  # no padding inside the text: the check pads on purpose
    return ids


def trim_vocabulary(tokenizer_json: str, used_ids: np.ndarray, keep_characters: bool) -> tuple[str, np.ndarray]:
    """A WordPiece tokenizer.json that knows only the tokens of `used_ids` (the corpus' ids), the special
    tokens and, with `keep_characters`, every single-character piece, so an unseen word still splits into
    characters rather than becoming [UNK]. Old ids keep their order; returns the new JSON and the kept old
    ids (row i of the new embedding is row kept[i] of the old). Every text made only of kept tokens
    tokenizes to the same tokens as before."""
    spec = json.loads(tokenizer_json)
    vocab = spec.get("model", {}).get("vocab")
    if spec.get("model", {}).get("type") != "WordPiece" or not isinstance(vocab, dict):
        raise TokenizerError("trim_vocab: only WordPiece tokenizers (BERT's) can be trimmed")
    added = spec.get("added_tokens", [])  # the special tokens, and any added beyond the vocabulary
    specials = {token["id"] for token in added} | {vocab[spec["model"]["unk_token"]]}
    characters = {i for t, i in vocab.items() if len(t.removeprefix("##")) == 1} if keep_characters else set()
    kept = np.array(sorted(set(np.unique(used_ids).tolist()) | specials | characters), dtype=np.int64)
    renumbered = {old: new for new, old in enumerate(kept.tolist())}
    spec["model"]["vocab"] = {t: renumbered[i] for t, i in vocab.items() if i in renumbered}
    for token in added:
        token["id"] = renumbered[token["id"]]
    new_ids = {**spec["model"]["vocab"], **{token["content"]: token["id"] for token in added}}

    def renumber(node: Any) -> None:  # the post-processor's [CLS] and [SEP] ids, wherever it keeps them
        if isinstance(node, dict):
            if isinstance(node.get("tokens"), list) and isinstance(node.get("ids"), list):
                node["ids"] = [new_ids[t] for t in node["tokens"]]
            for key, value in node.items():
                if key in ("cls", "sep") and isinstance(value, list) and len(value) == 2:
                    node[key] = [value[0], new_ids[value[0]]]
                else:
                    renumber(value)
        elif isinstance(node, list):
            for value in node:
                renumber(value)

    renumber(spec.get("post_processor"))
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_ids[spec["padding"]["pad_token"]]
    return json.dumps(spec, ensure_ascii=False), kept
