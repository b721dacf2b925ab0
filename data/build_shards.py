#!/usr/bin/env python3
"""Turn a text corpus into shards in the official Parameter Golf format.

Inputs are JSON Lines files with a "text" field (plain, .gz or .xz) or .txt files (one document per
file, or several separated by --txt-doc-separator). The output uses the official layout, so
train_gpt.py only needs DATA_PATH and TOKENIZER_PATH pointed at it:

    <out>/tokenizers/fineweb_{V}_bpe.model              (with --train-tokenizer)
    <out>/datasets/fineweb10B_sp{V}/fineweb_val_000000.bin, fineweb_train_000000.bin, ...

Each document is written as [BOS=1] + token ids with no EOS, documents concatenated, 10**8 tokens
per shard, exactly as the official export.

Files it did not write are never replaced unless --overwrite: shards whose folder has no
tokenizer_fingerprint.json of this script (the official download, say) and a tokenizer file that no
such fingerprint records. It refuses before writing anything; a failed build removes what it wrote.

--caseops lowercases the text and spells capitals as operator pieces (data/caseops.py, the record's
transform) before the tokenizer sees it, and writes beside each validation shard a byte sidecar in
the same format, fineweb_val_bytes_000000.bin: per token, the UTF-8 bytes of the original text it
stands for (0 for BOS and operators), which train_gpt.py divides by. With the record's tokenizer
(--tokenizer .../fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model) the folder is the record's,
fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/, and the shards and sidecars are what the
record's prepare_caseops_data.py writes from the same documents (with 10**8-token shards, as its
published data); a tokenizer trained here with --caseops is fineweb_{V}_bpe_caseops.model, its
folder fineweb10B_sp{V}_caseops/. Examples:

    python3 data/build_shards.py corpus.jsonl.xz --train-tokenizer --vocab-size 1024 \\
        --val-docs 1000 --output-dir /tmp/mydata
    python3 data/build_shards.py 'books/*.txt' --tokenizer data/tokenizers/fineweb_1024_bpe.model \\
        --val-file heldout.jsonl --output-dir /tmp/mydata
    python3 data/build_shards.py data/docs_selected.jsonl --caseops --val-docs 50000 --output-dir data \\
        --tokenizer data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model  # the record's data

The first 50,000 documents of the official docs_selected.jsonl are the validation set: with it as
input, --val-docs must be at least 50000, so that no validation document is trained on.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import itertools
import json
import lzma
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import caseops  # noqa: E402
import train_gpt  # noqa: E402  (the shard format and BOS id live there, in one place)

DEFAULT_SHARD_TOKENS = 10**8
DOCS_PER_BATCH = 256
MAX_TOKEN_ID = 2**16 - 1  # shards store uint16 ids
TOKENIZER_MAX_SENTENCES = 2_000_000  # SentencePiece samples this many lines; bounds its memory
TOKENIZER_MAX_LINE_BYTES = 16384  # longer lines are skipped by the trainer (its default, 4192, drops many paragraphs)
OFFICIAL_DOCS, OFFICIAL_VAL_DOCS = "docs_selected.", 50_000  # the official documents (.jsonl, or compressed) and their validation prefix


class BuildError(Exception):
    """A problem with the inputs or options; main() prints it as one line and exits with 1."""


# ----------------------------------------------------------------------------- reading documents


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files named directly or through globs, in the order given (each glob sorted)."""
    paths = []
    for pattern in patterns:
        is_glob = any(c in pattern for c in "*?[")
        matches = sorted(glob.glob(pattern)) if is_glob else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise BuildError(f"input not found: {pattern}" + (" (the glob matches no files)" if is_glob else ""))
        paths.extend(Path(m) for m in matches)
    return paths


def open_text(path: Path):
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def is_txt(path: Path) -> bool:
    name = path.name[: -len(path.suffix)] if path.suffix in (".xz", ".gz") else path.name
    return name.endswith(".txt")


def iter_jsonl_texts(path: Path) -> Iterator[str]:
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BuildError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise BuildError(f'{path}:{line_no}: no "text" field with a string')
            text = record["text"]
            if not text.isascii():  # isascii is O(1); only other texts can hold an escaped lone surrogate
                check_unicode(text, f"{path}:{line_no}")
            yield text


def check_unicode(text: str, where: str):
    """Refuse a text with a lone surrogate (a JSON escape such as \\ud800 without its pair): it is not Unicode,
    has no UTF-8 bytes to count, and the tokenizer cannot take it. Refused rather than skipped: a skipped
    document would quietly shift the first --val-docs documents that make the validation set."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BuildError(f"{where}: the text holds a lone surrogate ({text[e.start]!r} at character {e.start}, a JSON \\u escape without its pair), "
                         "which is not Unicode text; repair or remove that document (a surrogate pair split when the text was cut?), "
                         "then run this command again") from None


def iter_txt_documents(path: Path, separator: str | None) -> Iterator[str]:
    with open_text(path) as f:
        text = f.read()
    if separator is None:
        yield text
        return
    # Separator-delimited files often end with a separator; empty pieces are not documents.
    yield from (doc for doc in text.split(separator) if doc.strip())


def read_documents(paths: list[Path], txt_separator: str | None = None) -> Iterator[str]:
    for path in paths:
        try:
            if is_txt(path):
                yield from iter_txt_documents(path, txt_separator)
            else:
                yield from iter_jsonl_texts(path)
        except UnicodeDecodeError as e:
            raise BuildError(f"{path}: not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x}); convert it to UTF-8, "
                             "e.g. iconv -f latin1 -t utf-8 IN > OUT, and run this command again") from None
        except (EOFError, lzma.LZMAError, gzip.BadGzipFile) as e:
            raise BuildError(f"{path}: the compressed file is truncated or corrupt ({e}); download or compress it again, "
                             "then run this command again") from None
        except OSError as e:
            raise BuildError(f"{path}: cannot read: {e}") from None


def require_documents(stream, what: str):
    """Fail before any output is written when a split would be empty."""
    if next(iter(stream()), None) is None:
        raise BuildError(f"no {what} documents: the corpus is empty or --val-docs takes all of it")


# ----------------------------------------------------------------------------- tokenizer


def check_vocab_size(vocab_size: int):
    if not 4 < vocab_size <= MAX_TOKEN_ID + 1:  # 4 special pieces, ids stored as uint16
        raise BuildError(f"--vocab-size must be in [5, {MAX_TOKEN_ID + 1}] so token ids fit in uint16, got {vocab_size}")


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_path: Path, *, byte_fallback: bool = False, threads: int = 1,
                    caseops_operators: bool = False) -> Path:
    """Train a SentencePiece BPE model with the official spec; writes model_path and its .vocab.

    caseops_operators: the documents are CaseOps text; each operator becomes a reserved piece (ids 4-7),
    never merged with its neighbours."""
    check_vocab_size(vocab_size)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    failures = []

    def lines():  # SentencePiece turns an error raised while it reads into a RuntimeError; keep the original
        try:
            yield from training_lines(documents)
        except BaseException as e:
            failures.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            user_defined_symbols=list(caseops.OPERATORS) if caseops_operators else [],
            sentence_iterator=lines(),
            model_prefix=str(model_path.with_suffix("")),
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=0.999,
            split_digits=True,
            normalization_rule_name="nmt_nfkc",
            add_dummy_prefix=False,
            byte_fallback=byte_fallback,
            pad_id=0,
            bos_id=train_gpt.BOS_ID,
            eos_id=2,
            unk_id=3,
            hard_vocab_limit=False,  # as the official models: a small corpus may give a few pieces less
            input_sentence_size=TOKENIZER_MAX_SENTENCES,
            shuffle_input_sentence=True,
            max_sentence_length=TOKENIZER_MAX_LINE_BYTES,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError:
        if failures:
            raise failures[0] from None
        raise
    return model_path


def training_lines(documents: Iterable[str]) -> Iterator[str]:
    """Non-empty lines: nmt_nfkc turns newlines into spaces anyway, and lines keep each sentence short."""
    for doc in documents:
        for line in doc.replace("\x00", " ").splitlines():
            if line.strip():
                yield line


def load_tokenizer(model_path: Path) -> spm.SentencePieceProcessor:
    """Load a model and check that its ids fit the shard format and its BOS is the one train_gpt.py expects."""
    if not model_path.is_file():
        raise BuildError(f"tokenizer not found: {model_path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError):
        raise BuildError(f"not a SentencePiece model: {model_path}") from None
    if sp.vocab_size() > MAX_TOKEN_ID + 1:
        raise BuildError(f"{model_path}: vocabulary of {sp.vocab_size()} does not fit uint16 shards (at most {MAX_TOKEN_ID + 1})")
    if sp.bos_id() != train_gpt.BOS_ID:
        raise BuildError(f"{model_path}: bos_id is {sp.bos_id()}, but shards need BOS = {train_gpt.BOS_ID}")
    return sp


def check_caseops_match(model_path: Path, caseops_text: bool):
    """A CaseOps tokenizer only for CaseOps text, and the other way round."""
    has_operators = train_gpt.is_caseops_tokenizer(str(model_path))
    if caseops_text and not has_operators:
        raise BuildError(f"{model_path} has no CaseOps operator pieces (U+E001-U+E004); --caseops needs the record's CaseOps tokenizer "
                         "(data/cached_challenge_fineweb.py --variant sp8192_lossless_caps_caseops_v1_reserved --tokenizer-only) or one trained with --train-tokenizer --caseops")
    if has_operators and not caseops_text:
        raise BuildError(f"{model_path} is a CaseOps tokenizer; add --caseops so that the text is transformed as it expects")


# ----------------------------------------------------------------------------- byte sidecar


def piece_spans(sp: spm.SentencePieceProcessor, texts: list[str]) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
    """Per text, (ids, begin, end): the characters [begin, end) of the text each piece was cut from, as
    SentencePiece aligns them (the pieces' surfaces). Consecutive pieces share their bounds; whitespace that
    normalization drops at a text's two ends is in no piece; a character split into byte-fallback pieces
    belongs to the last of them."""
    if hasattr(sp, "encode_as_immutable_proto"):  # sentencepiece <= 0.2.0
        protos = [sp.encode_as_immutable_proto(t).pieces for t in texts]
        return [([p.id for p in ps], np.array([p.begin for p in ps], dtype=np.int64), np.array([p.end for p in ps], dtype=np.int64)) for ps in protos]
    spans = []
    for result in sp.encode(texts, out_type="offset_mapping", num_threads=1):
        offsets = np.array(result["offsets"], dtype=np.int64).reshape(-1, 2)
        spans.append((result["ids"], offsets[:, 0], offsets[:, 1]))
    return spans


def token_source_bytes(encoded: str, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Byte sidecar entries of one CaseOps document: per token, the original UTF-8 bytes of the text it was
    cut from (caseops.source_bytes over its span of `encoded`): 0 for an operator, a piece's own bytes where
    the text had no capital, and the whitespace normalization collapsed into it. This is the record's count
    (its prepare_caseops_data.py, through the pieces' surfaces), so the entries of a document sum to its
    UTF-8 length less the whitespace the tokenizer drops at its two ends, which no token stands for."""
    cumulative = np.concatenate([[0], np.cumsum(caseops.source_bytes(encoded))])
    return cumulative[end] - cumulative[begin]


# ----------------------------------------------------------------------------- tokenizing in parallel

_worker_sp: spm.SentencePieceProcessor | None = None
_worker_caseops = False


def _init_worker(model_path: str, caseops_text: bool):
    global _worker_sp, _worker_caseops
    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)
    _worker_caseops = caseops_text


def _init_pool_worker(model_path: str, caseops_text: bool):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    _init_worker(model_path, caseops_text)


def encode_batch(texts: list[str], with_sidecar: bool = False) -> tuple[int, int, np.ndarray, np.ndarray | None]:
    """(documents, UTF-8 bytes of the original texts, tokens, byte sidecar or None): each document as
    [BOS] + ids, concatenated; the sidecar has one entry per token, 0 for each BOS."""
    inputs = [caseops.encode(t) for t in texts] if _worker_caseops else texts
    spans = piece_spans(_worker_sp, inputs) if with_sidecar else None
    encoded = [ids for ids, _, _ in spans] if with_sidecar else _worker_sp.encode(inputs, num_threads=1)  # parallelism comes from the processes
    total = len(encoded) + sum(map(len, encoded))
    flat = itertools.chain.from_iterable(itertools.chain((train_gpt.BOS_ID,), ids) for ids in encoded)
    tokens = np.fromiter(flat, dtype=np.uint16, count=total)
    sidecar = None
    if with_sidecar:
        sidecar = np.concatenate([np.append(0, token_source_bytes(text, begin, end)) for text, (_, begin, end) in zip(inputs, spans)])
        if sidecar.max() > MAX_TOKEN_ID:
            raise BuildError(f"a token stands for {sidecar.max()} bytes of text (a run of whitespace or control characters the tokenizer folds into one piece), "
                             "more than a uint16 sidecar entry holds; shorten that run in the input")
    return len(texts), sum(len(t.encode("utf-8")) for t in texts), tokens, sidecar


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def ordered_parallel_map(pool, func, items: Iterable, max_pending: int) -> Iterator:
    """pool.imap, but reading the input only as fast as results are consumed.

    Pool.imap pulls its whole input in a helper thread, which would hold a large corpus in memory."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class ParallelEncoder:
    """Encodes document batches on `workers` processes (in this process when workers == 1); with
    caseops_text, each document goes through caseops.encode first."""

    def __init__(self, model_path: Path, workers: int, caseops_text: bool = False):
        self.model_path, self.workers, self.caseops_text, self.pool = str(model_path), workers, caseops_text, None

    def __enter__(self):
        if self.workers > 1:
            self.pool = multiprocessing.Pool(self.workers, _init_pool_worker, (self.model_path, self.caseops_text))
        else:
            _init_worker(self.model_path, self.caseops_text)
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()

    def encode(self, documents: Iterable[str], with_sidecar: bool = False) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
        batches = batched(documents, DOCS_PER_BATCH)
        encode = functools.partial(encode_batch, with_sidecar=with_sidecar)
        if self.pool is None:
            return map(encode, batches)
        return ordered_parallel_map(self.pool, encode, batches, max_pending=2 * self.workers)


# ----------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Cuts the token stream of one split into shards of exactly `shard_tokens` (the last may be shorter),
    and, with_sidecar, the byte sidecar stream at the same points into fineweb_{split}_bytes_*.bin."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, with_sidecar: bool = False):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.parts, self.buffered, self.shards_written = [], 0, 0
        self.sidecar_parts = [] if with_sidecar else None
        directory.mkdir(parents=True, exist_ok=True)
        # Stale shards (and sidecars) from an earlier, larger build would otherwise be read as part of this one.
        for stale in directory.glob(f"fineweb_{split}_*.bin"):
            stale.unlink()

    def add(self, tokens: np.ndarray, sidecar: np.ndarray | None = None):
        self.parts.append(tokens)
        if self.sidecar_parts is not None:
            self.sidecar_parts.append(sidecar)
        self.buffered += tokens.size
        while self.buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self):
        if self.buffered:
            self._write(self.buffered)

    def _write(self, count: int):
        stream = np.concatenate(self.parts)
        path = self.directory / f"fineweb_{self.split}_{self.shards_written:06d}.bin"
        train_gpt.write_data_shard(path, stream[:count])
        self.parts, self.buffered = [stream[count:]], stream.size - count
        if self.sidecar_parts is not None:
            sidecar = np.concatenate(self.sidecar_parts)
            train_gpt.write_data_shard(train_gpt.byte_sidecar_path(str(path)), sidecar[:count])
            self.sidecar_parts = [sidecar[count:]]
        self.shards_written += 1


class Progress:
    """A status line on stderr: rewritten in place on a terminal, every 10 s in a log."""

    def __init__(self, label: str):
        self.label, self.start = label, time.time()
        self.tty = sys.stderr.isatty()
        self.interval = 0.5 if self.tty else 10.0
        self.last = self.start

    def update(self, docs: int, tokens: int, final: bool = False):
        now = time.time()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        line = f"{self.label}: {docs:,} docs, {tokens:,} tokens, {rate:,.0f} tokens/s"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def write_split(encoder: ParallelEncoder, documents: Iterable[str], directory: Path, split: str, shard_tokens: int,
                with_sidecar: bool = False) -> dict:
    """Tokenize `documents` into fineweb_{split}_*.bin (and their byte sidecars); returns counts for the summary."""
    writer, progress = ShardWriter(directory, split, shard_tokens, with_sidecar), Progress(split)
    docs = text_bytes = tokens = 0
    for n_docs, n_bytes, batch_tokens, batch_sidecar in encoder.encode(documents, with_sidecar):
        writer.add(batch_tokens, batch_sidecar)
        docs, text_bytes, tokens = docs + n_docs, text_bytes + n_bytes, tokens + batch_tokens.size
        progress.update(docs, tokens)
    writer.close()
    progress.update(docs, tokens, final=True)
    return {"docs": docs, "tokens": tokens, "bytes": text_bytes, "shards": writer.shards_written}


def write_dataset(val_docs: Iterable[str], train_docs: Iterable[str], model_path: Path, dataset_dir: Path, *,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1, caseops_text: bool = False) -> dict:
    """Write the validation split, then the training split, with the tokenizer at model_path, and record
    that tokenizer's fingerprint beside them (train_gpt.py refuses another). On any failure the shards
    written are removed: a validation split without its training split must not look like a dataset.
    CaseOps text gets byte sidecars for the validation split only: train_gpt.py counts bytes only to evaluate."""
    try:
        dataset_dir.mkdir(parents=True, exist_ok=True)
        fingerprint = {"tokenizer": model_path.name, "tokenizer_sha256": train_gpt.file_sha256(model_path), "written_by": WRITER}
        (dataset_dir / train_gpt.TOKENIZER_FINGERPRINT).write_text(json.dumps(fingerprint) + "\n")
        with ParallelEncoder(model_path, workers, caseops_text) as encoder:
            val = write_split(encoder, val_docs, dataset_dir, "val", shard_tokens, with_sidecar=caseops_text)
            train = write_split(encoder, train_docs, dataset_dir, "train", shard_tokens)
        for split, stats in (("validation", val), ("training", train)):
            if stats["docs"] == 0:
                raise BuildError(f"no {split} documents: the corpus is empty or --val-docs takes all of it")
    except BaseException:
        for written in [*dataset_dir.glob("fineweb_*.bin"), dataset_dir / train_gpt.TOKENIZER_FINGERPRINT]:
            written.unlink(missing_ok=True)
        raise
    return {"val": val, "train": train}


# ----------------------------------------------------------------------------- what a build may replace

WRITER = "data/build_shards.py"  # the fingerprint's written_by (data/cached_challenge_fineweb.py writes its own)


def written_here(dataset_dir: Path) -> dict | None:
    """The fingerprint of shards this script wrote (None when there is none, or another tool wrote it)."""
    try:
        record = json.loads((dataset_dir / train_gpt.TOKENIZER_FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by", WRITER) == WRITER else None


def foreign_outputs(output_dir: Path, dataset_dir: Path, model_path: Path | None) -> list[Path]:
    """What this build would replace that no build of this script wrote: shards in dataset_dir without our
    fingerprint (the official download has none, or the downloader's), and a tokenizer at model_path (to be
    trained) whose sha256 none of our fingerprints under output_dir/datasets records."""
    foreign = []
    if any(dataset_dir.glob("fineweb_*.bin")) and written_here(dataset_dir) is None:
        foreign.append(dataset_dir)
    if model_path is not None and model_path.is_file():
        ours = {record.get("tokenizer_sha256") for d in output_dir.glob("datasets/*") if (record := written_here(d))}
        if train_gpt.file_sha256(model_path) not in ours:
            foreign.append(model_path)
    return foreign


def check_outputs(args, dataset_dir: Path, model_path: Path | None):
    """Refuse, before writing anything, to replace files this script did not write (unless --overwrite)."""
    foreign = [] if args.overwrite else foreign_outputs(args.output_dir, dataset_dir, model_path)
    if foreign:
        them = "it" if len(foreign) == 1 else "them"
        raise BuildError(f"{' and '.join(map(str, foreign))} {'was' if len(foreign) == 1 else 'were'} not written by build_shards.py "
                         f"(the official download, say) and this build would replace {them}; give another --output-dir, or add --overwrite to replace {them}")


# ----------------------------------------------------------------------------- command line


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_separator(raw: str | None) -> str | None:
    """Decode backslash escapes so that --txt-doc-separator '\\n\\n' means a blank line."""
    if raw is None:
        return None
    return raw.encode("latin-1", "backslashreplace").decode("unicode_escape")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSON Lines (.jsonl, .jsonl.gz, .jsonl.xz) or .txt files, or globs of them")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", type=Path, help="an existing SentencePiece model")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a BPE tokenizer (official spec) on the training documents first")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer (with --train-tokenizer)")
    p.add_argument("--byte-fallback", action="store_true", help="trained tokenizer: byte pieces instead of <unk> (the official sp1024 has none)")
    p.add_argument("--caseops", action="store_true", help="lowercase the text, capitals as operator pieces (data/caseops.py); "
                   "writes a byte sidecar beside each validation shard")
    p.add_argument("--output-dir", type=Path, required=True, help="root of the tokenizers/ and datasets/ folders")
    p.add_argument("--overwrite", action="store_true", help="replace shards and a tokenizer in --output-dir that this script did not write "
                   "(by default it refuses, e.g. in the folder of the official download)")
    val = p.add_mutually_exclusive_group(required=True)
    val.add_argument("--val-docs", type=int, help="the first N documents of the inputs are the validation set")
    val.add_argument("--val-file", action="append", help="a separate validation corpus (repeatable; files or globs)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (default: 10**8)")
    p.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes (default: all CPU cores)")
    p.add_argument("--max-docs", type=int, help="read at most N documents of the inputs (validation ones included), for quick runs")
    p.add_argument("--tokenizer-train-docs", type=int, default=1_000_000, help="train the tokenizer on at most N documents (default: 10**6)")
    p.add_argument("--txt-doc-separator", help=r"split .txt files into documents at this string, e.g. '\n\n' (default: one file = one document)")
    return p


def check_args(args):
    if args.train_tokenizer:
        if args.vocab_size is None:
            raise BuildError("--train-tokenizer needs --vocab-size")
        check_vocab_size(args.vocab_size)
    if args.tokenizer is not None and (args.vocab_size is not None or args.byte_fallback):
        raise BuildError("--vocab-size and --byte-fallback only apply with --train-tokenizer")
    for name in ("val_docs", "shard_tokens", "workers", "max_docs", "tokenizer_train_docs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BuildError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.txt_doc_separator == "":
        raise BuildError("--txt-doc-separator must not be empty")


def corpus_streams(args, separator: str | None):
    """Factories of (validation, training) document iterators; each call re-reads the files."""
    paths = expand_inputs(args.inputs)
    if args.val_file:
        val_paths = expand_inputs(args.val_file)
        return (lambda: read_documents(val_paths, separator),
                lambda: itertools.islice(read_documents(paths, separator), args.max_docs))
    return (lambda: itertools.islice(read_documents(paths, separator), min(args.val_docs, args.max_docs or args.val_docs)),
            lambda: itertools.islice(read_documents(paths, separator), args.val_docs, args.max_docs))


def check_official_validation(args):
    """None of the official validation documents may reach the training split or a trained tokenizer.

    They are the first 50,000 of docs_selected.jsonl. (The record's prepare_caseops_data.py defaults to
    10,000 validation documents, which trains on the other 40,000; its published data used 50,000.)"""
    official = [p for p in args.inputs if Path(p).name.startswith(OFFICIAL_DOCS)]
    if official and (args.val_file or args.val_docs < OFFICIAL_VAL_DOCS):
        raise BuildError(f"{official[0]}: its first {OFFICIAL_VAL_DOCS:,} documents are the official validation set; use --val-docs {OFFICIAL_VAL_DOCS} "
                         "so that none of them is trained on (add --max-docs N for a shorter build)")


def dataset_name(model_path: Path, vocab_size: int, caseops_text: bool) -> str:
    """fineweb10B_sp{V}; with CaseOps fineweb10B_sp{V}{suffix} for a tokenizer fineweb_{V}_bpe{suffix}.model, so the
    record's tokenizer gives the record's folder (fineweb10B_sp8192_lossless_caps_caseops_v1_reserved), else _caseops."""
    prefix = f"fineweb_{vocab_size}_bpe_"
    if caseops_text and model_path.name.startswith(prefix) and model_path.suffix == ".model":
        return f"fineweb10B_sp{vocab_size}_{model_path.stem.removeprefix(prefix)}"
    return f"fineweb10B_sp{vocab_size}" + ("_caseops" if caseops_text else "")


def run(args) -> dict:
    check_args(args)
    check_official_validation(args)
    separator = parse_separator(args.txt_doc_separator)
    val_stream, train_stream = corpus_streams(args, separator)
    require_documents(val_stream, "validation")
    require_documents(train_stream, "training")
    suffix = "_caseops" if args.caseops else ""
    datasets = args.output_dir / "datasets"
    if args.train_tokenizer:
        model_path = args.output_dir / "tokenizers" / f"fineweb_{args.vocab_size}_bpe{suffix}.model"
        check_outputs(args, datasets / f"fineweb10B_sp{args.vocab_size}{suffix}", model_path)
        print(f"training a {args.vocab_size}-piece BPE tokenizer -> {model_path}", file=sys.stderr, flush=True)
        start = time.time()
        docs = itertools.islice(train_stream(), args.tokenizer_train_docs)
        if args.caseops:
            docs = map(caseops.encode, docs)
        train_tokenizer(docs, args.vocab_size, model_path, byte_fallback=args.byte_fallback, threads=args.workers, caseops_operators=args.caseops)
        print(f"tokenizer trained in {time.time() - start:.1f}s", file=sys.stderr, flush=True)
    else:
        model_path = args.tokenizer
    try:
        sp = load_tokenizer(model_path)
        check_caseops_match(model_path, args.caseops)
        vocab_size = sp.vocab_size()
        if args.train_tokenizer and vocab_size != args.vocab_size:
            print(f"note: the corpus gave {vocab_size} pieces, not {args.vocab_size}; use VOCAB_SIZE={vocab_size}", file=sys.stderr)
        dataset_dir = datasets / dataset_name(model_path, vocab_size, args.caseops)
        check_outputs(args, dataset_dir, None)
        stats = write_dataset(val_stream(), train_stream(), model_path, dataset_dir, shard_tokens=args.shard_tokens, workers=args.workers,
                              caseops_text=args.caseops)
    except BaseException:
        if args.train_tokenizer:  # trained by this run and recorded by no fingerprint now: a later run would take it for a foreign one
            for written in (model_path, model_path.with_suffix(".vocab")):
                written.unlink(missing_ok=True)
        raise
    return {**stats, "vocab_size": vocab_size, "tokenizer": str(model_path), "dataset_dir": str(dataset_dir), "caseops": args.caseops}


def format_summary(result: dict) -> str:
    lines = []
    for split in ("train", "val"):
        s = result[split]
        lines.append(f"{split:>5}: {s['docs']:,} docs, {s['tokens']:,} tokens, {s['shards']} shard(s), "
                     f"{s['bytes'] / s['tokens']:.3f} bytes/token")
    lines.append("(bytes/token: UTF-8 bytes of the original text per shard token, BOS tokens included)")
    if result.get("caseops"):
        lines.append("CaseOps: fineweb_val_bytes_*.bin beside the validation shards hold each token's original bytes; train_gpt.py divides by them")
    lines.append(f"DATA_PATH={result['dataset_dir']} TOKENIZER_PATH={result['tokenizer']} VOCAB_SIZE={result['vocab_size']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (BuildError, train_gpt.DataError, OSError) as e:  # OSError: e.g. a full disk; it names the file
        print(f"build_shards: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
