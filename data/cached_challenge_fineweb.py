"""Download the challenge's FineWeb shards and tokenizer from the Hugging Face hub (stdlib only).

    python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80
    python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 10 --with-docs
    python3 data/cached_challenge_fineweb.py --variant sp8192_lossless_caps_caseops_v1_reserved --tokenizer-only --with-docs

writes `data/datasets/fineweb10B_sp8192/fineweb_{val,train}_{i:06d}.bin` and
`data/tokenizers/fineweb_8192_bpe.{model,vocab}` (same command line, flags and layout as the
official downloader). It is resumable: complete files are skipped, a file is written to
`<name>.part` and renamed only once its size is verified, and an interrupted `.part` is continued
where it stopped.

Variants: any `sp<N>` (and `byte260`, and `sp<N>_<suffix>`) the manifest lists as a dataset
`fineweb10B_<variant>`. `sp8192_lossless_caps_caseops_v1_reserved` is the CaseOps record's: its
tokenizer (checked against the sha256 of the copy in the record's folder of the official repository)
and its published shards with their byte sidecars, from the Hugging Face dataset that record
trained on. The manifest is kept as `data/manifest.json`: a later run whose files are all present
uses it and needs no network; `--skip-manifest` never downloads the manifest and plans from that
copy (as the official flag, it needs one). `--with-docs` also fetches `docs_selected.jsonl`, the
official documents (one JSON object with a "text" per line; the first 50,000 are the validation
set), always from the official repository (or MATCHED_FINEWEB_REPO_ID), for data/build_shards.py;
`--tokenizer-only` fetches the variant's tokenizer and no shards: with `--with-docs`, what
build_shards.py needs to make the shards itself.

Where it reads from: `{HF_ENDPOINT}/datasets/{repo}/resolve/main/{prefix}/{file}` with
  HF_ENDPOINT                         default https://huggingface.co; a `file://` URL or a folder
                                      is read as a local mirror with the same layout below it
  MATCHED_FINEWEB_REPO_ID             default willdepueoai/parameter-golf
                                      (kevclark/parameter-golf for sp4096 and sp8192)
  MATCHED_FINEWEB_REMOTE_ROOT_PREFIX  default datasets
  HF_TOKEN                            optional, sent as a bearer token (gated datasets)

The manifest, `{prefix}/manifest.json`, is read first (or the copy kept in the output folder, see
above). Every path in it is relative to the folder that holds it. Fields this script uses (others are ignored):

    {
      "datasets": [{
        "name": "fineweb10B_sp1024",                 # folder datasets/<name>/ of the shards
        "tokenizer_name": "fineweb_1024_bpe",
        "stats": {"files_train": 80, "files_val": 1}, # shard counts (the official manifest)
        "files": [                                    # optional: exact shard list with sizes;
          {"path": "datasets/fineweb10B_sp1024/fineweb_val_000000.bin", "bytes": 123456},
          ...                                         # when present it replaces the counts
        ]
      }],
      "tokenizers": [{
        "name": "fineweb_1024_bpe",
        "model_path": "tokenizers/fineweb_1024_bpe.model",   # and/or "vocab_path", "path"
        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
        "files": [{"path": "tokenizers/fineweb_1024_bpe.model", "bytes": 254000}]  # optional sizes
      }]
    }

A "files" entry may also be a plain path, and "files" may be a {path: bytes} object; "size" is
read like "bytes". Without a size, a download is checked against the server's Content-Length and
a shard against its header (magic 20240520, version 1, 1024 + 2 * n bytes).

Once every file is there, `tokenizer_fingerprint.json` beside the shards records the sha256 of the
tokenizer that made them, as data/build_shards.py does: train_gpt.py refuses another tokenizer with
one hash, and build_shards.py refuses to write over these shards.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REPO = "willdepueoai/parameter-golf"
DEFAULT_PREFIX = "datasets"
VARIANT = re.compile(r"sp\d+(_[a-z0-9_]+)?|byte260")
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"  # the 1.0611 record's CaseOps tokenizer and data
VARIANT_REPOS = {"sp4096": "kevclark/parameter-golf", "sp8192": "kevclark/parameter-golf",
                 CASEOPS_VARIANT: "romeerp/parameter-golf-caseops-v1"}  # others: DEFAULT_REPO
# Files whose bytes are known in advance: the record's tokenizer, as its folder in openai/parameter-golf ships it
# (records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/tokenizers/).
PINNED_SHA256 = {"tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model": "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d"}
MANIFEST = "manifest.json"
DOCS = "docs_selected.jsonl"  # beside the manifest on the hub, data/docs_selected.jsonl here
FINGERPRINT = "tokenizer_fingerprint.json"  # = train_gpt.TOKENIZER_FINGERPRINT (a test keeps the two equal)
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


class DownloadError(Exception):
    """A failure the user can act on; main() prints it as one line."""


@dataclass(frozen=True)
class Hub:
    endpoint: str
    repo: str
    prefix: str

    @property
    def local_root(self) -> Path | None:
        """The mirror folder when HF_ENDPOINT is a file:// URL or a path, else None (HTTP)."""
        if self.endpoint.startswith("file://"):
            return Path(urllib.request.url2pathname(urllib.parse.urlparse(self.endpoint).path))
        if "://" not in self.endpoint:
            return Path(self.endpoint)
        return None

    def location(self, rel: str) -> str:
        tail = "/".join(part for part in ("datasets", self.repo, "resolve/main", self.prefix, rel) if part)
        root = self.local_root
        return str(root / tail) if root is not None else f"{self.endpoint.rstrip('/')}/{urllib.parse.quote(tail)}"

    def open(self, rel: str, start: int = 0):
        """(stream, offset it starts at, total size or None). The offset is 0 if the server ignores a range."""
        where = self.location(rel)
        if self.local_root is not None:
            path = Path(where)
            if not path.is_file():
                raise DownloadError(self.missing(rel))
            stream = open(path, "rb")
            stream.seek(start)
            return stream, start, path.stat().st_size
        headers = {"User-Agent": "parameter-golf-downloader"}
        if os.environ.get("HF_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            response = _OPENER.open(urllib.request.Request(where, headers=headers), timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:  # the .part is not shorter than the file: fetch it whole
                return self.open(rel, 0)
            raise DownloadError(self._http_error(rel, e)) from None
        except (urllib.error.URLError, OSError) as e:
            raise DownloadError(self.unreachable(getattr(e, "reason", e))) from None
        offset = start if response.status == 206 else 0
        length = response.headers.get("Content-Length")
        return response, offset, (offset + int(length)) if length and length.isdigit() else None

    def _http_error(self, rel: str, e: urllib.error.HTTPError) -> str:
        if e.code == 404:
            return self.missing(rel)
        if e.code in (401, 403):
            return f"access denied to {self.repo} (HTTP {e.code}); the dataset may be gated: set HF_TOKEN"
        return self.unreachable(f"HTTP {e.code} {e.reason}")

    def missing(self, rel: str) -> str:
        if rel == "manifest.json":
            return (
                f"no manifest.json at {self.location(rel)}; check HF_ENDPOINT, MATCHED_FINEWEB_REPO_ID "
                "and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
            )
        return f"{rel} is listed in the manifest but missing on the hub ({self.location(rel)})"

    def unreachable(self, reason) -> str:
        return (
            f"could not reach the hub at {self.endpoint} ({reason}); set HF_ENDPOINT to a mirror URL or "
            "folder, or MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX to another export; "
            "without network, run the offline smoke run: python3 data/smoke.py"
        )


class _DropAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """The hub redirects downloads to a CDN with a signed URL; a bearer token there would be refused."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlparse(newurl).netloc != urllib.parse.urlparse(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_DropAuthOnRedirect)


def hub_for(variant: str | None) -> Hub:
    """The hub of a variant's files; variant None: of the official documents."""
    return Hub(
        endpoint=os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT,
        repo=os.environ.get("MATCHED_FINEWEB_REPO_ID") or VARIANT_REPOS.get(variant, DEFAULT_REPO),
        prefix=(os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX") or DEFAULT_PREFIX).strip("/"),
    )


def dataset_name(variant: str) -> str:
    return f"fineweb10B_{variant}"


# ----------------------------------------------------------------------------- manifest -> file plan


@dataclass(frozen=True)
class RemoteFile:
    rel: str  # path relative to the manifest's folder, also relative to the output folder
    size: int | None


def parse_manifest(raw: bytes, where: str) -> dict:
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DownloadError(f"manifest {where} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DownloadError(f"manifest {where} is not a JSON object")
    return manifest


def fetch_manifest(hub: Hub, output_dir: Path) -> dict:
    """The hub's manifest, also kept as output_dir/manifest.json for runs without network."""
    stream, _, _ = hub.open(MANIFEST)
    with stream, transfer_errors(MANIFEST):
        raw = stream.read()
    manifest = parse_manifest(raw, hub.location(MANIFEST))
    output_dir.mkdir(parents=True, exist_ok=True)
    part = output_dir / (MANIFEST + ".part")
    part.write_bytes(raw)
    os.replace(part, output_dir / MANIFEST)
    return manifest


def cached_manifest(output_dir: Path) -> dict | None:
    path = output_dir / MANIFEST
    return parse_manifest(path.read_bytes(), str(path)) if path.is_file() else None


def _safe_rel(rel: str) -> str:
    """A manifest path must stay inside the output folder."""
    path = PurePosixPath(str(rel))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DownloadError(f"manifest path {rel!r} must be relative and stay inside the data folder")
    return str(path)


def _as_size(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None  # an unreadable size is checked like a missing one


def _sizes(entry: dict) -> dict[str, int | None]:
    """The entry's optional "files": a list of paths or {path, bytes} objects, or a {path: bytes} object."""
    files = entry.get("files") or []
    if isinstance(files, dict):
        pairs = list(files.items())
    else:
        pairs = [(f, None) if isinstance(f, str) else (f.get("path"), f.get("bytes", f.get("size"))) for f in files if isinstance(f, (str, dict))]
    return {_safe_rel(rel): _as_size(size) for rel, size in pairs if rel}


def _find(manifest: dict, kind: str, name: str) -> dict:
    entries = [e for e in manifest.get(kind) or [] if isinstance(e, dict)]
    for entry in entries:
        if entry.get("name") == name:
            return entry
    known = ", ".join(str(e.get("name")) for e in entries) or "none"
    raise DownloadError(f"the manifest has no {kind[:-1]} named {name} (it lists: {known})")


def listed_variants(manifest: dict) -> list[str]:
    names = [str(e.get("name", "")) for e in manifest.get("datasets") or [] if isinstance(e, dict)]
    return sorted(n.removeprefix("fineweb10B_") for n in names if n.startswith("fineweb10B_"))


def dataset_files(entry: dict, dataset: str, train_shards: int) -> list[RemoteFile]:
    """All validation shards and the first `train_shards` training shards."""
    listed = _sizes(entry)
    if listed:
        val = sorted(rel for rel in listed if PurePosixPath(rel).name.startswith("fineweb_val_"))
        train = sorted(rel for rel in listed if PurePosixPath(rel).name.startswith("fineweb_train_"))
    else:
        stats = entry.get("stats") or {}
        try:
            n_val, n_train = int(stats["files_val"]), int(stats["files_train"])
        except (KeyError, TypeError, ValueError):
            raise DownloadError(f"the manifest entry of {dataset} has neither \"files\" nor stats.files_val/files_train") from None
        val = [f"datasets/{dataset}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
        if "caseops" in dataset:  # each validation shard has its byte sidecar beside it
            val += [f"datasets/{dataset}/fineweb_val_bytes_{i:06d}.bin" for i in range(n_val)]
        train = [f"datasets/{dataset}/fineweb_train_{i:06d}.bin" for i in range(n_train)]
    if not val:
        raise DownloadError(f"the manifest lists no validation shard for {dataset}")
    if train_shards > len(train):
        raise DownloadError(f"{dataset} has only {len(train)} training shards on the hub, {train_shards} requested")
    return [RemoteFile(rel, listed.get(rel)) for rel in val + train[:train_shards]]


def tokenizer_files(entry: dict) -> list[RemoteFile]:
    sizes = _sizes(entry)
    rels = [_safe_rel(entry[key]) for key in ("model_path", "vocab_path", "path") if entry.get(key)]
    rels += [rel for rel in sizes if rel not in rels]
    if not rels:
        raise DownloadError(f"the manifest's tokenizer {entry.get('name')} names no file (model_path, vocab_path or path)")
    return [RemoteFile(rel, sizes.get(rel)) for rel in rels]


def plan(manifest: dict, variant: str, train_shards: int, with_docs: bool = False, tokenizer_only: bool = False) -> list[RemoteFile]:
    dataset = dataset_name(variant)
    try:
        entry = _find(manifest, "datasets", dataset)
    except DownloadError:
        raise DownloadError(f"--variant {variant}: the manifest has no dataset {dataset} (its variants: {', '.join(listed_variants(manifest)) or 'none'})") from None
    tokenizer = _find(manifest, "tokenizers", entry.get("tokenizer_name"))
    shards = [] if tokenizer_only else dataset_files(entry, dataset, train_shards)
    docs = [RemoteFile(DOCS, None)] if with_docs else []
    return shards + tokenizer_files(tokenizer) + docs


# ----------------------------------------------------------------------------- download with resume


def shard_problem(path: Path) -> str | None:
    """Why a .bin file is not a complete shard, or None if its header and size agree."""
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        return f"{size} bytes is shorter than the 1024-byte header"
    with open(path, "rb") as f:
        magic, version, n_tokens = struct.unpack("<3i", f.read(12))
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        return f"bad header (magic {magic}, version {version})"
    if size != SHARD_HEADER_BYTES + 2 * n_tokens:
        return f"{size} bytes, but its header promises {SHARD_HEADER_BYTES + 2 * n_tokens}"
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(path: Path, size: int | None, sha256: str | None = None) -> bool:
    if not path.is_file():
        return False
    if sha256 is not None:
        return sha256_of(path) == sha256
    if size is not None:
        return path.stat().st_size == size
    if path.suffix == ".bin":
        return shard_problem(path) is None
    return path.stat().st_size > 0


@contextlib.contextmanager
def transfer_errors(rel: str):
    """A connection lost or a disk full in the middle of a file becomes a one-line error."""
    try:
        yield
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{rel}: transfer stopped ({e or type(e).__name__}); run the same command again to resume") from None


def download(hub: Hub, item: RemoteFile, dest: Path) -> str:
    """Fetch one file into dest via dest.part; returns what was done ("have", "fetched", "resumed")."""
    pinned = PINNED_SHA256.get(item.rel)
    if is_complete(dest, item.size, pinned):
        return "have"
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    if item.size is not None and start >= item.size:
        start = 0  # a .part as long as the file yet never renamed is suspect: fetch it again
    stream, offset, total = hub.open(item.rel, start)
    expected = item.size if item.size is not None else total
    with stream, open(part, "ab" if offset else "wb") as out, transfer_errors(item.rel):
        while chunk := stream.read(CHUNK_BYTES):
            out.write(chunk)
    got = part.stat().st_size
    if expected is not None and got != expected:
        if got > expected:
            part.unlink()  # not a prefix of this file: start over next time
        raise DownloadError(f"{item.rel}: got {got} bytes, expected {expected}; run the command again to resume")
    if dest.suffix == ".bin" and (problem := shard_problem(part)):
        part.unlink()
        raise DownloadError(f"{item.rel} is not a valid shard: {problem}")
    if pinned is not None and (got_sha := sha256_of(part)) != pinned:
        part.unlink()
        raise DownloadError(f"{item.rel} from {hub.location(item.rel)} has sha256 {got_sha}, not {pinned} (the record's); "
                            "the published file changed: take the copy in the record's folder of openai/parameter-golf")
    os.replace(part, dest)
    return "resumed" if offset else "fetched"


def all_present(manifest: dict, variant: str, train_shards: int, with_docs: bool, output_dir: Path, tokenizer_only: bool = False) -> bool:
    """Every file the kept manifest plans is complete here (a manifest of another export plans nothing)."""
    try:
        planned = plan(manifest, variant, train_shards, with_docs, tokenizer_only)
        return all(is_complete(output_dir / f.rel, f.size, PINNED_SHA256.get(f.rel)) for f in planned)
    except DownloadError:
        return False


def write_fingerprints(items: list[RemoteFile], output_dir: Path):
    """Beside the downloaded shards, the name and sha256 of the tokenizer the manifest pairs with them."""
    models = [output_dir / f.rel for f in items if f.rel.endswith(".model")]
    if len(models) != 1:
        return
    record = {"tokenizer": models[0].name, "tokenizer_sha256": hashlib.sha256(models[0].read_bytes()).hexdigest(),
              "written_by": "data/cached_challenge_fineweb.py"}
    for folder in sorted({(output_dir / f.rel).parent for f in items if f.rel.endswith(".bin")}):
        part = folder / (FINGERPRINT + ".part")
        part.write_text(json.dumps(record) + "\n")
        os.replace(part, folder / FINGERPRINT)


def run(variant: str, train_shards: int, output_dir: Path, *, skip_manifest: bool = False, with_docs: bool = False,
        tokenizer_only: bool = False) -> None:
    hub = hub_for(variant)
    cached = cached_manifest(output_dir)
    if skip_manifest:
        if cached is None:
            raise DownloadError(f"--skip-manifest needs {output_dir / MANIFEST}, which a run without --skip-manifest writes")
        manifest = cached
    elif cached is not None and all_present(cached, variant, train_shards, with_docs, output_dir, tokenizer_only):
        manifest = cached  # everything is here already: no need to reach the hub
    else:
        manifest = fetch_manifest(hub, output_dir)
    items = plan(manifest, variant, train_shards, with_docs, tokenizer_only)
    print(f"{len(items)} files of {variant} from {hub.location('')} into {output_dir}", flush=True)
    for i, item in enumerate(items, 1):
        what = download(hub_for(None) if item.rel == DOCS else hub, item, output_dir / item.rel)
        print(f"[{i}/{len(items)}] {what:7s} {item.rel}", flush=True)
    write_fingerprints(items, output_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download the challenge FineWeb shards and tokenizer (manifest-driven, resumable). "
        "Environment: HF_ENDPOINT, MATCHED_FINEWEB_REPO_ID, MATCHED_FINEWEB_REMOTE_ROOT_PREFIX, HF_TOKEN.",
    )
    parser.add_argument("train_shards_positional", nargs="?", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", type=variant_arg, default="sp8192", help="tokenizer family: sp<N> or byte260, as the manifest lists them (default %(default)s)")
    parser.add_argument("--train-shards", type=int, default=80, help="training shards to fetch, 10^8 tokens each (default %(default)s)")
    parser.add_argument("--skip-manifest", action="store_true", help=f"do not download {MANIFEST}: plan from the copy a previous run kept in the output folder")
    parser.add_argument("--with-docs", action="store_true", help=f"also fetch {DOCS}, the official documents (for data/build_shards.py), from the official repository")
    parser.add_argument("--tokenizer-only", action="store_true", help="fetch the variant's tokenizer but no shards (with --with-docs: what build_shards.py needs)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent, help="folder that receives datasets/, tokenizers/ and manifest.json (default: this script's folder)")
    return parser


def variant_arg(value: str) -> str:
    if not VARIANT.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not sp<N> (e.g. sp1024, sp8192), sp<N>_<suffix> (e.g. {CASEOPS_VARIANT}) or byte260")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shards = args.train_shards if args.train_shards_positional is None else args.train_shards_positional
    if shards < 0:
        print("error: --train-shards must be >= 0", file=sys.stderr)
        return 1
    try:
        run(args.variant, shards, args.output_dir, skip_manifest=args.skip_manifest, with_docs=args.with_docs, tokenizer_only=args.tokenizer_only)
    except (DownloadError, OSError) as e:  # OSError: the output folder cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
