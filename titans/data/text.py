"""Text data: tokenised, memory-mapped shards and the packed loader that trains on them.

``prepare(inputs, out_dir, tokenizer)`` reads documents (a ``.txt``/``.md`` file is one document;
a ``.jsonl`` file has one document per line in a text field; directories are walked recursively in
sorted order), tokenises each one followed by the tokenizer's ``eos_id``, assigns it to the train or
val split by a hash of its text (stable: the same document always lands in the same split), and
writes each split as a stream of ``.npy`` shards (uint16 when the vocabulary fits, else uint32).
``manifest.json`` is written last and atomically: tokenizer spec, per-shard token count and
SHA-256, per-split totals, and the source files with their SHA-256.

``PackedTextSource`` (a ``titans.data.stream.BatchSource``) concatenates a split's shards into one
token stream and cuts it into windows of ``seq_len + 1`` tokens with stride ``seq_len``: window i is
``stream[i * seq_len : i * seq_len + seq_len + 1]``, so consecutive windows share one token and
every token after the first is a target exactly once per epoch. Window order is a seeded
permutation per epoch (epoch e uses ``seed + e``). Shards are memory-mapped, never loaded whole.

Layout of a prepared directory::

    manifest.json  train-00000.npy  train-00001.npy ...  val-00000.npy ...
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .stream import rank_rows
from .tokenizers import ByteTokenizer, Tokenizer, encode_batch, load_tokenizer, train_bpe
from ..errors import UserError
from ..io.files import printable, sha256_file, write_text_atomic

__all__ = [
    "SHARD_TOKENS",
    "SPLITS",
    "DataError",
    "PackedTextSource",
    "TokenSplit",
    "input_files",
    "load_manifest",
    "prepare",
    "train_bpe_on_corpus",
    "unigram_entropy",
]

SHARD_TOKENS = 16 * 2**20  # ~16M tokens: 32 MB (uint16) or 64 MB (uint32) per shard
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
MANIFEST = "manifest.json"
FORMAT = "titans-token-shards"
_BATCH_CHARS = 4 << 20  # documents are tokenised in batches of about this many characters


class DataError(UserError, ValueError):
    """Input text or prepared shards that cannot be used; the message names the file and the fix."""



# --------------------------------------------------------------------------- reading documents


def input_files(inputs: Sequence[str | os.PathLike], skipped: dict[str, int] | None = None) -> list[Path]:
    """The files ``inputs`` name: files as given, directories walked recursively in sorted order
    (``.txt``, ``.md``, ``.jsonl``; hidden entries and other suffixes skipped, and counted into
    ``skipped`` by reason when given: ``"hidden"`` or the suffix). Duplicates once."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = []
            for p in (p for p in path.rglob("*") if p.is_file()):
                if any(part.startswith(".") for part in p.relative_to(path).parts):
                    reason = "hidden"
                elif p.suffix.lower() not in TEXT_SUFFIXES + (JSONL_SUFFIX,):
                    reason = p.suffix.lower() or "no suffix"
                else:
                    found.append(p)
                    continue
                if skipped is not None:
                    skipped[reason] = skipped.get(reason, 0) + 1
            if not found:
                raise DataError(f"directory {path} holds no .txt, .md or .jsonl files")
            files.extend(sorted(found, key=lambda p: p.relative_to(path).parts))
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES + (JSONL_SUFFIX,):
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .md or .jsonl")
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise DataError("no input files given")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _file_documents(path: Path, text_field: str, hasher) -> Iterator[tuple[str | None, int]]:
    """(document text, bytes consumed) of one file (text None for a blank line of a ``.jsonl``
    file, which is no document); ``hasher`` sees every byte of the file."""
    if path.suffix.lower() == JSONL_SUFFIX:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                hasher.update(raw)
                line = raw.strip()
                if not line:
                    yield None, len(raw)
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from err
                if not isinstance(record, dict) or text_field not in record:
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{lineno}: no text field {text_field!r} (found {fields}); "
                                    "choose the field with --text-field")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
                yield text, len(raw)
    else:
        raw = path.read_bytes()
        hasher.update(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({err})") from err
        yield text, len(raw)


class _Documents:
    """Iterates ``(file index, text)`` over every non-blank document of ``files`` (blank means
    only whitespace) and records each file's SHA-256 in ``self.sha`` once it has been read."""

    def __init__(self, files: list[Path], text_field: str, progress=None):
        self.files, self.text_field, self.progress = files, text_field, progress
        self.sha: dict[int, str] = {}
        self.blank = 0  # documents left out for being blank

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for index, path in enumerate(self.files):
            hasher = hashlib.sha256()
            for text, nbytes in _file_documents(path, self.text_field, hasher):
                if self.progress is not None:
                    self.progress.update(nbytes)
                if text is None:
                    continue
                if text.strip():
                    yield index, text
                else:
                    self.blank += 1
            self.sha[index] = hasher.hexdigest()


def _doc_u(text: str) -> float:
    """A uniform number in [0, 1) from the document's SHA-256: its stable split coordinate."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


@dataclass
class _Plan:
    """Pass one over the inputs: which documents go to val, and each file's checksum."""

    files: list[Path]
    is_val: np.ndarray  # [num_documents] bool, in reading order
    sources: list[dict[str, Any]]


def _plan(files: list[Path], text_field: str, val_fraction: float, progress: bool = False) -> _Plan:
    from tqdm.auto import tqdm

    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    us, per_file = [], [0] * len(files)
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="splitting", disable=not progress) as bar:
        docs = _Documents(files, text_field, progress=bar)
        for index, text in docs:
            us.append(_doc_u(text))
            per_file[index] += 1
    if not us:
        raise DataError(f"the inputs hold no text (all {len(files)} files are empty or blank)")
    u = np.asarray(us)
    is_val = u < val_fraction
    if val_fraction > 0 and not is_val.any() and len(u) > 1:
        is_val[np.argmin(u)] = True  # a small corpus still gets a (one-document) val split
    sources = [
        {"path": str(f.resolve()), "sha256": docs.sha[i], "bytes": f.stat().st_size,
         "documents": per_file[i]}
        for i, f in enumerate(files)
    ]  # fmt: skip
    return _Plan(files, is_val, sources)


# --------------------------------------------------------------------------- writing shards


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token arrays to one split and writes full shards of exactly ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids.astype(self.dtype, copy=False))
        self.pending_tokens += len(ids)
        while self.pending_tokens >= self.shard_tokens:
            flat = np.concatenate(self.pending)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.pending, self.pending_tokens = [rest], len(rest)

    def close(self) -> dict[str, Any]:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}  # fmt: skip

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):05d}.npy"
        tmp = self.out_dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, tokens)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out_dir / name)
        self.shards.append({"file": name, "tokens": len(tokens), "sha256": sha256_file(self.out_dir / name)})


def _encode_arrays(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if type(tokenizer) is ByteTokenizer:  # the UTF-8 bytes are the ids: skip Python int lists
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    return [np.asarray(ids, dtype=np.int64) for ids in encode_batch(tokenizer, texts)]


def _fingerprint(manifest: dict[str, Any], split: str) -> str:
    """Identity of one split's tokens: what a resumed loader must find again. Paths are left out,
    so the same data prepared elsewhere has the same fingerprint."""
    tok = {k: v for k, v in manifest["tokenizer"].items() if k not in ("path", "json")}
    shards = [[s["tokens"], s["sha256"]] for s in manifest["splits"][split]["shards"]]
    blob = json.dumps([FORMAT, tok, manifest["dtype"], shards], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _clear_previous(out_dir: Path, overwrite: bool) -> None:
    old = [out_dir / MANIFEST] if (out_dir / MANIFEST).exists() else []
    old += sorted(p for split in SPLITS for p in out_dir.glob(f"{split}-*.npy"))
    if old and not overwrite:
        raise DataError(f"{out_dir} already holds prepared data ({old[0].name}); "
                        "choose another output directory or overwrite it (--force)")
    # the manifest goes first: a crash below never leaves a manifest naming missing shards
    for p in old:
        p.unlink()


def prepare(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer | dict | str,
    *,
    text_field: str = "text",
    shard_tokens: int = SHARD_TOKENS,
    val_fraction: float = 0.005,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise ``inputs`` into shards under ``out_dir``; returns the manifest (also written).

    Each document becomes its token ids followed by ``tokenizer.eos_id``. A document goes to val
    when the first 8 bytes of its SHA-256, read as a fraction, are below ``val_fraction`` (with at
    least one val document when ``val_fraction > 0`` and there are two or more documents).
    """
    from tqdm.auto import tqdm

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    skipped: dict[str, int] = {}
    files = input_files(inputs, skipped)
    plan = _plan(files, text_field, val_fraction, progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir, overwrite)

    dtype = _token_dtype(tokenizer.vocab_size)
    writers = {s: _ShardWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    total_bytes = sum(s["bytes"] for s in plan.sources)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising", disable=not progress)
    batch: list[str] = []
    doc_index = 0

    def flush() -> None:
        nonlocal doc_index
        for ids in _encode_arrays(tokenizer, batch):
            if len(ids) and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise DataError(f"tokenizer {tokenizer.name} produced ids outside [0, {tokenizer.vocab_size})")
            if doc_index >= len(plan.is_val):
                raise DataError("the inputs changed while they were being prepared; run prepare again")
            writer = writers["val" if plan.is_val[doc_index] else "train"]
            writer.add(np.concatenate([ids.astype(np.int64), eos]))
            writer.documents += 1
            doc_index += 1
        batch.clear()

    docs = _Documents(files, text_field, progress=bar)
    chars = 0
    with bar:
        for _, text in docs:
            batch.append(text)
            chars += len(text)
            if chars >= _BATCH_CHARS:
                flush()
                chars = 0
        flush()
    for i, source in enumerate(plan.sources):
        if docs.sha[i] != source["sha256"]:
            raise DataError(f"{files[i]} changed while it was being prepared; run prepare again")
    if doc_index != len(plan.is_val):
        raise DataError("the inputs changed while they were being prepared; run prepare again")

    manifest = {
        "format": FORMAT,
        "version": 1,
        "tokenizer": tokenizer.to_spec(),
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": int(tokenizer.eos_id),
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "splits": {s: w.close() for s, w in writers.items()},
        "sources": plan.sources,
        # what the directory walk and the documents left out, so that a user sees it was meant
        "skipped": {"files": dict(sorted(skipped.items())), "blank_documents": docs.blank},
    }
    for split in SPLITS:
        manifest["splits"][split]["fingerprint"] = _fingerprint(manifest, split)
    write_text_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def train_bpe_on_corpus(
    inputs: Sequence[str | os.PathLike], vocab_size: int, *, text_field: str = "text",
    val_fraction: float = 0.005, min_frequency: int = 2,
):  # fmt: skip
    """Train a byte-level BPE on the documents ``prepare`` would put in the train split (the val
    documents are held out of the tokenizer too)."""
    files = input_files(inputs)
    plan = _plan(files, text_field, val_fraction)
    train_texts = (t for (_, t), v in zip(_Documents(files, text_field), plan.is_val) if not v)
    return train_bpe(train_texts, vocab_size, min_frequency=min_frequency)


# --------------------------------------------------------------------------- reading shards


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared directory, checked for the fields the readers need."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"data directory not found: {data_dir}")
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir}: prepare it first (titans data prepare ... --out {data_dir})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # a JSONDecodeError is a ValueError
        raise DataError(f"{path} is not valid JSON ({type(err).__name__}: {err}); prepare the data again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a titans shard manifest")
    missing = [k for k in ("tokenizer", "vocab_size", "eos_id", "dtype", "splits") if k not in manifest]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; prepare the data again")
    try:
        dtype = np.dtype(manifest["dtype"])
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in "iu":
        raise DataError(f"{path} records dtype {printable(repr(manifest['dtype']))}, not an integer type; prepare the "
                        f"data again")  # fmt: skip
    splits = manifest["splits"]
    malformed = DataError(f"{path}: its splits are not tables of shards (file, tokens, sha256); prepare the data again")
    if not isinstance(splits, dict) or not all(
        isinstance(info, dict) and isinstance(info.get("shards", []), list) for info in splits.values()
    ):
        raise malformed
    shards = [shard for info in splits.values() for shard in info.get("shards", [])]
    if not all(_is_shard(shard) for shard in shards):
        raise malformed
    for shard in shards:  # a shard is a file of the directory: a manifest never points a read outside it
        name = shard["file"]
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise DataError(f"{path} lists shard {name!r}, which is not a file of {data_dir}; prepare the data again")
    return manifest


def _is_shard(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("tokens"), int)
            and isinstance(entry.get("sha256"), str))  # fmt: skip


class TokenSplit:
    """One split of a prepared directory as a single memory-mapped stream of ``len(self)`` ids.

    ``verify=True`` checks every shard's SHA-256 against the manifest first (one read of the
    data); shape and dtype are always checked.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, *, verify: bool = True):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
        self.data_dir, self.split = Path(data_dir), split
        self.manifest = load_manifest(data_dir)
        info = self.manifest["splits"].get(split)
        if info is None:
            raise DataError(f"{self.data_dir / MANIFEST} has no {split!r} split")
        self.fingerprint = info.get("fingerprint") or _fingerprint(self.manifest, split)
        self.eos_id = int(self.manifest["eos_id"])
        dtype = np.dtype(self.manifest["dtype"])
        self._shards = [self._open(s, dtype, verify) for s in info["shards"]]
        lengths = [len(a) for a in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.documents = int(info.get("documents", 0))

    def _open(self, shard: dict[str, Any], dtype: np.dtype, verify: bool) -> np.ndarray:
        path = self.data_dir / shard["file"]
        if path.is_symlink() and not path.resolve().is_file():
            raise DataError(f"shard {path} is a link to {printable(os.readlink(path))}, which is not an ordinary file")
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing; prepare the data again")
        if verify:
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                raise DataError(f"shard {path} is corrupt: sha256 {digest} but the manifest records "
                                f"{shard['sha256']}; prepare the data again")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"shard {path} is unreadable ({err}); prepare the data again") from err
        if array.dtype != dtype or array.ndim != 1 or len(array) != shard["tokens"]:
            raise DataError(f"shard {path} holds {array.dtype}{list(array.shape)}, but the manifest records "
                            f"{dtype}[{shard['tokens']}]; prepare the data again")
        return array

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split's stream as int64 (may span shards)."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"range [{start}, {start + length}) outside the {self.split} split of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        for k in range(first, len(self._shards)):
            if done == length:
                break
            lo = start + done - int(self._starts[k])
            take = min(length - done, len(self._shards[k]) - lo)
            out[done : done + take] = self._shards[k][lo : lo + take]
            done += take
        return out

    def iter_documents(self, block: int = 1 << 22) -> Iterator[np.ndarray]:
        """Each document's ids (int64, without its eos), in stored order, reading ``block`` tokens
        at a time."""
        carry = np.empty(0, dtype=np.int64)
        for start in range(0, len(self), block):
            chunk = np.concatenate([carry, self.read(start, min(block, len(self) - start))])
            ends = np.flatnonzero(chunk == self.eos_id)
            prev = 0
            for end in ends:
                yield chunk[prev:end]
                prev = end + 1
            carry = chunk[prev:]
        if len(carry):
            yield carry  # a stream that does not end in eos (never written by prepare)


def unigram_entropy(data_dir: str | os.PathLike, split: str = "train", *, verify: bool = True) -> float:
    """Entropy in nats per token of the split's unigram distribution (eos included).

    A model that ignores context entirely can reach this cross-entropy; a language model must
    beat it.
    """
    tokens = TokenSplit(data_dir, split, verify=verify)
    if len(tokens) == 0:
        raise DataError(f"the {split} split of {data_dir} is empty")
    vocab = int(tokens.manifest["vocab_size"])
    counts = np.zeros(vocab, dtype=np.int64)
    for shard in tokens._shards:
        for lo in range(0, len(shard), 1 << 24):
            counts += np.bincount(shard[lo : lo + (1 << 24)], minlength=vocab)[:vocab]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------- the loader


class PackedTextSource:
    """Fixed-length training windows from a prepared directory (a ``BatchSource``).

    ``next_batch(B)`` returns this rank's rows of the next global batch as a LongTensor
    ``[B // world_size, seq_len + 1]``; the global batch is the next ``B`` windows of the epoch's
    permutation, running on into the next epoch's when this one ends. ``state_dict`` /
    ``load_state_dict`` resume at the exact window.
    """

    def __init__(
        self, data_dir: str | os.PathLike, split: str = "train", seq_len: int = 1024, seed: int = 0,
        rank: int = 0, world_size: int = 1, *, verify: bool = True,
    ):  # fmt: skip
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.data_dir, self.split, self.seq_len, self.seed = Path(data_dir), split, seq_len, int(seed)
        self.rank, self.world_size, self.verify = rank, world_size, verify
        self.tokens = TokenSplit(data_dir, split, verify=verify)
        self.num_windows = self._count_windows(self.tokens)
        self.epoch, self.cursor = 0, 0
        self._perms: dict[int, np.ndarray] = {}
        self._val: TokenSplit | None = self.tokens if split == "val" else None

    @property
    def vocab_size(self) -> int:
        return int(self.tokens.manifest["vocab_size"])

    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        return self.tokens.manifest["tokenizer"]

    def _count_windows(self, tokens: TokenSplit) -> int:
        n = (len(tokens) - 1) // self.seq_len
        if n < 1:
            raise DataError(f"the {tokens.split} split of {self.data_dir} has {len(tokens)} tokens, fewer than "
                            f"seq_len + 1 = {self.seq_len + 1}; use more data, a larger val fraction or a shorter seq_len")
        return n

    def _window(self, tokens: TokenSplit, i: int) -> np.ndarray:
        return tokens.read(i * self.seq_len, self.seq_len + 1)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # batches span at most a few epochs; keep memory bounded
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.num_windows)
        return self._perms[epoch]

    def next_batch(self, global_batch_size: int):
        """This rank's rows of the next global batch: LongTensor [B // world_size, seq_len + 1]."""
        import torch

        if global_batch_size < 1:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}")
        mine = rank_rows(global_batch_size, self.rank, self.world_size)
        windows = []
        for row in range(global_batch_size):
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
            if mine.start <= row < mine.stop:
                windows.append(int(self._perm(self.epoch)[self.cursor]))
            self.cursor += 1
        batch = np.stack([self._window(self.tokens, i) for i in windows])
        return torch.from_numpy(batch)  # int64; the trainer moves it to its device

    def iter_eval_batches(self, batch_size: int, max_batches: int | None = None):
        """Batches of the val split in stored order (no shuffle; the same on every call and every
        rank): LongTensor [batch_size, seq_len + 1], the last one possibly shorter."""
        import torch

        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if self._val is None:
            self._val = TokenSplit(self.data_dir, "val", verify=self.verify)
        n = self._count_windows(self._val)
        for b, lo in enumerate(range(0, n, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            rows = [self._window(self._val, i) for i in range(lo, min(lo + batch_size, n))]
            yield torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "packed_text",
            "split": self.split,
            "data": self.tokens.fingerprint,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "packed_text":
            raise ValueError(f"state is not a PackedTextSource state (kind {state.get('kind')!r})")
        checks = [("split", self.split, "another split"),
                  ("data", self.tokens.fingerprint, "the prepared data differ from the run's (manifest checksum)"),
                  ("seq_len", self.seq_len, "another seq_len"), ("seed", self.seed, "another seed")]  # fmt: skip
        for key, mine, what in checks:
            if state.get(key) != mine:
                raise ValueError(f"cannot resume: {what}: saved {key}={state.get(key)!r}, this source has {mine!r}")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.num_windows:
            raise ValueError(f"cannot resume: position epoch={epoch}, cursor={cursor} outside {self.num_windows} windows")
        self.epoch, self.cursor = epoch, cursor

    def __repr__(self) -> str:
        return (f"PackedTextSource({str(self.data_dir)!r}, split={self.split!r}, seq_len={self.seq_len}, "
                f"seed={self.seed}, windows={self.num_windows})")
