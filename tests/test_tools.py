"""Tests of the tools beside train_gpt.py: the data downloader (against a fake hub folder, never the
network), the shared log parser, the submission packager, the record statistics and the compare table."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "records"))

import compare  # noqa: E402
import logparse  # noqa: E402
import make_submission  # noqa: E402
import stats  # noqa: E402

DOWNLOADER = REPO / "data" / "cached_challenge_fineweb.py"
_spec = importlib.util.spec_from_file_location("cached_challenge_fineweb", DOWNLOADER)
downloader = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = downloader  # dataclasses look their module up while it loads
_spec.loader.exec_module(downloader)

REPO_ID, PREFIX, DATASET = "willdepueoai/parameter-golf", "datasets", "fineweb10B_sp1024"


# ----------------------------------------------------------------------------- a fake hub


def shard_bytes(n_tokens: int, seed: int) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, n_tokens)
    tokens = np.random.default_rng(seed).integers(0, 1024, n_tokens, dtype=np.uint16).astype("<u2")
    return header.tobytes() + tokens.tobytes()


def make_hub(tmp_path: Path, *, with_sizes: bool = True, extra_train: int = 0, repo: str = REPO_ID, variant: str = "sp1024",
             docs: bytes | None = None) -> tuple[Path, dict[str, bytes]]:
    """A folder laid out like the hub: {hub}/datasets/{repo}/resolve/main/{prefix}/...; returns (hub, files)."""
    name = f"fineweb10B_{variant}"
    files = {f"datasets/{name}/fineweb_val_000000.bin": shard_bytes(3000, 0)}
    for i in range(3):
        files[f"datasets/{name}/fineweb_train_{i:06d}.bin"] = shard_bytes(2000 + i, i + 1)
    files["tokenizers/fineweb_1024_bpe.model"] = b"sentencepiece model bytes"
    files["tokenizers/fineweb_1024_bpe.vocab"] = b"<unk>\t0\n"
    if docs is not None:
        files["docs_selected.jsonl"] = docs
    root = tmp_path / "hub" / "datasets" / repo / "resolve" / "main" / PREFIX
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    shard_rels = [rel for rel in files if rel.endswith(".bin")]
    shard_rels += [f"datasets/{name}/fineweb_train_{3 + i:06d}.bin" for i in range(extra_train)]  # listed, absent
    dataset = {"name": name, "tokenizer_name": "fineweb_1024_bpe", "stats": {"files_train": 3 + extra_train, "files_val": 1}}
    tokenizer = {"name": "fineweb_1024_bpe", "model_path": "tokenizers/fineweb_1024_bpe.model", "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}
    if with_sizes:
        dataset["files"] = [{"path": rel, "bytes": len(files.get(rel, b"x" * 5000))} for rel in shard_rels]
        tokenizer["files"] = {rel: len(files[rel]) for rel in files if rel.startswith("tokenizers/")}
    manifest = {"datasets": [{"name": "other"}, dataset], "tokenizers": [tokenizer]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "hub", files


@pytest.fixture
def hub_env(monkeypatch):
    for name in ("MATCHED_FINEWEB_REPO_ID", "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    def point_at(hub: Path | str):
        monkeypatch.setenv("HF_ENDPOINT", str(hub))

    return point_at


def run_downloader(out: Path, *args: str) -> int:
    return downloader.main(["--variant", "sp1024", "--output-dir", str(out), *args])


@pytest.mark.parametrize("as_url", [False, True])
def test_download_writes_the_official_layout(tmp_path, hub_env, as_url):
    hub, files = make_hub(tmp_path)
    hub_env(hub.as_uri() if as_url else hub)
    out = tmp_path / "data"
    assert run_downloader(out, "--train-shards", "2") == 0
    for rel, data in files.items():
        if rel.endswith("fineweb_train_000002.bin"):
            assert not (out / rel).exists(), "only the first 2 training shards were asked for"
        else:
            assert (out / rel).read_bytes() == data
    assert not list(out.rglob("*.part"))


def test_download_with_the_official_manifest_checks_shard_headers(tmp_path, hub_env):
    hub, files = make_hub(tmp_path, with_sizes=False)  # counts only, as the official manifest
    hub_env(hub)
    out = tmp_path / "data"
    assert run_downloader(out, "--train-shards", "3") == 0
    assert all((out / rel).read_bytes() == data for rel, data in files.items())
    assert downloader.shard_problem(out / f"datasets/{DATASET}/fineweb_val_000000.bin") is None
    broken = out / f"datasets/{DATASET}/fineweb_train_000000.bin"
    broken.write_bytes(broken.read_bytes()[:-2])
    assert "header promises" in downloader.shard_problem(broken)


def test_download_resumes_a_part_file_and_replaces_a_short_file(tmp_path, hub_env, capsys):
    hub, files = make_hub(tmp_path)
    hub_env(hub)
    out = tmp_path / "data"
    val_rel, train_rel = f"datasets/{DATASET}/fineweb_val_000000.bin", f"datasets/{DATASET}/fineweb_train_000000.bin"
    # A .part whose last byte differs from the hub's: kept as is only if the download continues it.
    prefix = bytearray(files[val_rel][:3000])
    prefix[-1] ^= 0xFF
    (out / val_rel).parent.mkdir(parents=True)
    (out / (val_rel + ".part")).write_bytes(bytes(prefix))
    (out / train_rel).write_bytes(files[train_rel][:1500])  # an interrupted copy by another tool
    assert run_downloader(out, "--train-shards", "1") == 0
    assert (out / val_rel).read_bytes() == bytes(prefix) + files[val_rel][3000:]
    assert (out / train_rel).read_bytes() == files[train_rel]
    assert "resumed" in capsys.readouterr().out
    assert run_downloader(out, "--train-shards", "1") == 0  # a second run fetches nothing
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(progress) == 4 and all(" have " in line for line in progress)


class _HubHandler(SimpleHTTPRequestHandler):
    """Serves the fake hub over HTTP; honors `Range: bytes=N-` only when the server says so."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(wanted.group(1)) if wanted and self.server.honor_range else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.mark.parametrize("honor_range", [True, False])
def test_download_over_http_resumes_or_restarts(tmp_path, hub_env, honor_range):
    hub, files = make_hub(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_HubHandler, directory=str(hub)))
    server.honor_range = honor_range
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_env(f"http://127.0.0.1:{server.server_address[1]}")
        out = tmp_path / "data"
        val_rel = f"datasets/{DATASET}/fineweb_val_000000.bin"
        prefix = bytearray(files[val_rel][:2500])
        prefix[-1] ^= 0xFF  # survives only if the server continued the .part
        (out / val_rel).parent.mkdir(parents=True)
        (out / (val_rel + ".part")).write_bytes(bytes(prefix))
        assert run_downloader(out, "--train-shards", "1") == 0
        expected = bytes(prefix) + files[val_rel][2500:] if honor_range else files[val_rel]
        assert (out / val_rel).read_bytes() == expected
        assert (out / "tokenizers/fineweb_1024_bpe.model").read_bytes() == files["tokenizers/fineweb_1024_bpe.model"]
    finally:
        server.shutdown()
        server.server_close()


def test_download_missing_shard_is_a_clear_error(tmp_path, hub_env, capsys):
    hub, _ = make_hub(tmp_path, extra_train=1)  # fineweb_train_000003.bin listed but not on the hub
    hub_env(hub)
    assert run_downloader(tmp_path / "data", "--train-shards", "4") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fineweb_train_000003.bin" in err and "missing on the hub" in err


def test_download_refuses_more_shards_than_published(tmp_path, hub_env, capsys):
    hub, _ = make_hub(tmp_path)
    hub_env(hub)
    assert run_downloader(tmp_path / "data", "--train-shards", "9") == 1
    assert "only 3 training shards" in capsys.readouterr().err


def test_download_bad_manifest_is_a_clear_error(tmp_path, hub_env, capsys):
    hub, _ = make_hub(tmp_path)
    (hub / "datasets" / REPO_ID / "resolve" / "main" / PREFIX / "manifest.json").write_text("{not json")
    hub_env(hub)
    assert run_downloader(tmp_path / "data", "--train-shards", "1") == 1
    err = capsys.readouterr().err
    assert "manifest" in err and "not valid JSON" in err
    assert not (tmp_path / "data").exists()


def manifest_on_hub(hub: Path, repo: str = REPO_ID) -> Path:
    return hub / "datasets" / repo / "resolve" / "main" / PREFIX / "manifest.json"


def test_download_any_sp_variant_the_manifest_lists(tmp_path, hub_env, capsys):
    hub, files = make_hub(tmp_path, variant="sp2048")
    hub_env(hub)
    out = tmp_path / "data"
    assert downloader.main(["--variant", "sp2048", "--output-dir", str(out), "--train-shards", "1"]) == 0
    assert (out / "datasets/fineweb10B_sp2048/fineweb_val_000000.bin").read_bytes() == files["datasets/fineweb10B_sp2048/fineweb_val_000000.bin"]
    assert downloader.main(["--variant", "sp512", "--output-dir", str(out), "--train-shards", "1"]) == 1
    err = capsys.readouterr().err
    assert "fineweb10B_sp512" in err and "its variants: sp2048" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):  # not sp<N> or byte260: argparse's usage error
        downloader.main(["--variant", "gpt2", "--output-dir", str(out)])


def test_download_keeps_the_manifest_and_needs_no_network_when_all_is_there(tmp_path, hub_env, capsys):
    hub, _ = make_hub(tmp_path)
    hub_env(hub)
    out = tmp_path / "data"
    assert run_downloader(out, "--train-shards", "2") == 0
    assert (out / "manifest.json").read_bytes() == manifest_on_hub(hub).read_bytes()
    hub_env(tmp_path / "no_hub_here")  # the hub is gone: a complete download still succeeds
    capsys.readouterr()
    assert run_downloader(out, "--train-shards", "2") == 0
    assert all(" have " in line for line in capsys.readouterr().out.splitlines() if line.startswith("["))
    (out / f"datasets/{DATASET}/fineweb_train_000001.bin").unlink()  # a missing file needs the hub again
    assert run_downloader(out, "--train-shards", "2") == 1
    assert "no manifest.json at" in capsys.readouterr().err


def test_skip_manifest_plans_from_the_kept_copy(tmp_path, hub_env, capsys):
    hub, files = make_hub(tmp_path)
    hub_env(hub)
    out = tmp_path / "data"
    assert run_downloader(out, "--train-shards", "1", "--skip-manifest") == 1
    assert "--skip-manifest needs" in capsys.readouterr().err and not (out / "manifest.json").exists()
    assert run_downloader(out, "--train-shards", "1") == 0
    manifest_on_hub(hub).unlink()  # fetching the manifest now fails; --skip-manifest does not fetch it
    assert run_downloader(out, "--train-shards", "3", "--skip-manifest") == 0
    assert (out / f"datasets/{DATASET}/fineweb_train_000002.bin").read_bytes() == files[f"datasets/{DATASET}/fineweb_train_000002.bin"]


def test_with_docs_fetches_the_source_documents(tmp_path, hub_env):
    docs = b'{"text": "first document"}\n{"text": "second document"}\n'
    hub, _ = make_hub(tmp_path, docs=docs)
    hub_env(hub)
    out = tmp_path / "data"
    assert run_downloader(out, "--train-shards", "0") == 0 and not (out / "docs_selected.jsonl").exists()
    assert run_downloader(out, "--train-shards", "0", "--with-docs") == 0
    assert (out / "docs_selected.jsonl").read_bytes() == docs


def test_download_offline_exits_with_one_line_and_no_traceback(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MATCHED_FINEWEB_"))}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    done = subprocess.run(
        [sys.executable, str(DOWNLOADER), "--variant", "sp1024", "--train-shards", "1", "--output-dir", str(tmp_path / "data")],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "could not reach the hub" in done.stderr and "HF_ENDPOINT" in done.stderr and "data/smoke.py" in done.stderr
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- logs


SOURCE = '''"""A stand-in for train_gpt.py: the packager reads its SETTINGS defaults."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: object


SETTINGS = (Setting("SEED", 1337), Setting("RUN_ID", ""), Setting("NUM_LAYERS", 11), Setting("MLP_MULT", 3.0),
            Setting("TTT_ENABLED", True), Setting("QK_GAIN_INIT", 1.5), Setting("DATA_PATH", "./data/datasets/fineweb10B_sp1024"))
# padding so that the lzma wrapper is smaller than the source
''' + "# parameter golf: train a small GPT in 10 minutes and pack it under 16,000,000 bytes\n" * 60

DEFAULT_SETTINGS = {"NUM_LAYERS": "12", "MLP_MULT": "3.0", "TTT_ENABLED": "True", "QK_GAIN_INIT": "5.0", "DATA_PATH": "./data/datasets/fineweb10B_sp1024"}


def our_log(seed: int, source: str = SOURCE, *, bpb: float = 1.1, artifact: int = 15_500_000, train_ms: float = 598_123.0,
            audit: str = "PASS", valid: bool | None = None, projected: float = 450.0, settings: dict | None = None, final: bool = True,
            sha: str | None = None) -> str:
    """A log as train_gpt.py writes it. audit: PASS, FAIL or SKIPPED (EVAL_AUDIT=0); valid: the
    submission_valid line, by default what train_gpt.py decides from the audit."""
    sha = sha or hashlib.sha256(source.encode()).hexdigest()
    valid = audit != "FAIL" if valid is None else valid
    audit_lines = [] if audit == "SKIPPED" else [
        "eval_audit path:standard verdict:PASS positions:62021632 scored_once:yes",
        f"eval_audit path:ttt_lora verdict:{audit} perturbation_max_delta:0.0",
    ]
    code = len(source.encode())
    loss = bpb * 1.69
    lines = [
        source.rstrip("\n"),
        "=" * 100,
        "python 3.11.7 torch 2.6.0+cu126 numpy 2.1.0 platform Linux-6.8",
        "cuda 12.6 device NVIDIA H100 80GB HBM3",
        "nvidia driver 560.35.03",
        f"SEED={seed}",
        f"RUN_ID=run_seed{seed}",
        *(f"{k}={v}" for k, v in (settings or DEFAULT_SETTINGS).items()),
        f"code_sha256:{sha} code_bytes:{code}",
        "world_size:8 grad_accum_steps:1 device:cuda",
        "attention_backend:fa3",
        "model_params:26993756",
        "step:0/20000 val_loss:6.9357 val_bpb:4.1077 train_time:0ms step_avg:0.02ms",
        "step:1/20000 train_loss:6.9370 train_time:87ms step_avg:87.00ms tok_s:9039000",
        f"step:6900/20000 train_loss:1.9012 train_time:{train_ms - 9100:.0f}ms step_avg:86.70ms tok_s:9071000",
        "some unknown line: ignored",
        f"step:6901/20000 val_loss:{loss + 0.02:.4f} val_bpb:{bpb + 0.012:.4f} train_time:{train_ms - 9000:.0f}ms step_avg:86.71ms",
        f"stopping_early: wallclock_cap train_time:{train_ms - 9000:.0f}ms step:6901/20000",
        f"gptq_calibration source:train seqs:64 time:9000ms train_time_total:{train_ms:.0f}ms within_cap:yes",
        "peak memory allocated: 21034 MiB reserved: 22018 MiB",
        f"pre_quant weights:ema val_loss:{loss - 0.03:.4f} val_bpb:{bpb - 0.0175:.4f}",
        f"Serialized model int6_zstd: {artifact} bytes",
        f"Code size: {code} bytes",
        f"Total submission size int6_zstd: {artifact + code} bytes",
        f"size_check total_bytes:{artifact + code} cap_bytes:16000000 fits:{'yes' if artifact + code < 16e6 else 'no'}",
    ]
    if final:
        lines += [
            f"final_int6_zstd_roundtrip val_loss:{loss + 0.04:.4f} val_bpb:{bpb + 0.025:.4f} eval_time:2301ms",
            f"final_int6_zstd_roundtrip_exact val_loss:{loss + 0.04:.8f} val_bpb:{bpb + 0.025:.8f}",
            "quant_gap_bpb:0.007500",
            f"final_int6_zstd_sliding_window val_loss:{loss + 0.01:.4f} val_bpb:{bpb + 0.006:.4f} eval_time:88012ms",
            f"final_int6_zstd_sliding_window_exact val_loss:{loss + 0.01:.8f} val_bpb:{bpb + 0.006:.8f}",
            f"final_int6_zstd_ttt_lora val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:301877ms",
            f"final_int6_zstd_ttt_lora_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
            f"ttt_base_same_docs val_bpb:{bpb + 0.006:.8f} ttt_gain_bpb:0.006000",
            *audit_lines,
            f"final_int8_zlib_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
            f"eval_audit_verdict:{audit}",
            f"eval_time_total:392190ms projected_8gpu_s:{projected:.1f} fits_600s:{'yes' if projected <= 600 else 'no'}",
            "submission_valid:yes" if valid else "submission_valid:no reason:audit_failed",
        ]
    return "\n".join(lines) + "\n"


OFFICIAL_LOG = """logs/baseline_8gpu.txt
val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path=./data/tokenizers/fineweb_1024_bpe.model
[rank0]:[W318 14:38:18.833454927 Utils.hpp:112] Warning: Environment variable NCCL_ASYNC_ERROR_HANDLING is deprecated
model_params:17059912
world_size:8 grad_accum_steps:1
seed:1337
warmup_step:20/20
step:0/20000 val_loss:6.9370 val_bpb:4.0978 train_time:0ms step_avg:0.01ms
step:1/20000 train_loss:6.9408 train_time:24ms step_avg:23.99ms
step:13780/20000 val_loss:2.0606 val_bpb:1.2172 train_time:600038ms step_avg:43.54ms
stopping_early: wallclock_cap train_time:600038ms step:13780/20000
peak memory allocated: 10184 MiB reserved: 10200 MiB
Serialized model: 67224983 bytes
Code size: 47642 bytes
Total submission size: 67272625 bytes
Serialized model int8+zlib: 15815847 bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)
Total submission size int8+zlib: 15863489 bytes
final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:1.2244 eval_time:1401ms
final_int8_zlib_roundtrip_exact val_loss:2.07269931 val_bpb:1.22436570
"""


def test_parse_our_log():
    run = logparse.parse_text(our_log(42, bpb=1.1), "logs/run_seed42.txt")
    assert (run.seed, run.run_id) == (42, "run_seed42")
    assert run.settings["NUM_LAYERS"] == "12" and "class Setting" not in str(run.settings)
    assert run.code_sha256 == hashlib.sha256(SOURCE.encode()).hexdigest() and run.code_bytes == len(SOURCE.encode())
    assert run.versions == {"python": "3.11.7", "torch": "2.6.0+cu126", "numpy": "2.1.0", "cuda": "12.6", "device": "NVIDIA H100 80GB HBM3", "driver": "560.35.03"}
    assert (run.world_size, run.grad_accum_steps, run.device, run.attention_backend, run.model_params) == (8, 1, "cuda", "fa3", 26993756)
    assert (run.steps, run.iterations, run.step_avg_ms, run.train_time_ms, run.stopped_early) == (6901, 20000, 86.71, 598123.0, True)
    assert (run.peak_mem_allocated_mib, run.peak_mem_reserved_mib) == (21034, 22018)
    assert (run.pre_quant_weights, run.pre_quant_val_bpb) == ("ema", 1.0825)
    assert (run.quant_scheme, run.artifact_bytes, run.total_bytes, run.size_cap_bytes, run.fits_cap) == ("int6_zstd", 15_500_000, 15_500_000 + len(SOURCE.encode()), 16_000_000, True)
    assert set(run.finals) == {"roundtrip", "sliding_window", "ttt"}
    assert run.finals["sliding_window"] == (pytest.approx(1.69 * 1.1 + 0.01), pytest.approx(1.106), 88012.0, "final_int6_zstd_sliding_window")
    assert run.finals["roundtrip"].name == "final_int6_zstd_roundtrip", "the alias line is not the roundtrip path"
    assert run.aliases == ["final_int8_zlib_roundtrip_exact"]
    assert (run.final_path, run.final_val_bpb, run.final_val_loss) == ("ttt", 1.1, pytest.approx(1.859))
    assert (run.quant_gap_bpb, run.ttt_gain_bpb, run.ttt_base_bpb) == (0.0075, 0.006, pytest.approx(1.106))
    assert run.audits == {"standard": "PASS", "ttt_lora": "PASS"} and run.audit_verdict == "PASS"
    assert (run.eval_time_total_ms, run.projected_8gpu_eval_s, run.fits_600s, run.eval_time_s) == (392190.0, 450.0, True, 392.19)
    assert run.submission_valid is True and run.scored_after_serialization is True
    assert run.nats_per_bpb == pytest.approx(1.69)


def test_parse_failed_run_and_official_log():
    failed = logparse.parse_text(our_log(7, final=False, audit="FAIL"))
    assert failed.final_val_bpb is None and failed.finals == {} and failed.audit_verdict is None and failed.scored_after_serialization is None
    run = logparse.parse_text(OFFICIAL_LOG, "train.log")
    assert (run.seed, run.run_id, run.settings, run.code_sha256) == (1337, "baseline_8gpu", {}, None)
    assert (run.steps, run.train_time_ms, run.step_avg_ms, run.stopped_early) == (13780, 600038.0, 43.54, True)
    assert (run.artifact_bytes, run.code_size_bytes, run.total_bytes) == (15815847, 47642, 15863489)  # not the raw lines
    assert run.finals == {"roundtrip": (2.07269931, 1.2243657, 1401.0, "final_int8_zlib_roundtrip")}
    assert (run.final_path, run.final_val_bpb, run.quant_scheme) == ("roundtrip", 1.2243657, "int8+zlib")
    assert run.audit_verdict is None and run.projected_8gpu_eval_s is None and run.eval_time_s == 1.401


# ----------------------------------------------------------------------------- submission folder


SEEDS = (1337, 42, 2025)


@pytest.fixture
def runs_dir(tmp_path):
    """A script in tmp_path and three logs of it with different seeds and scores."""
    script = tmp_path / "train_gpt.py"
    script.write_text(SOURCE)
    logs = []
    for seed, bpb in zip(SEEDS, (1.1001, 1.0995, 1.1010)):
        path = tmp_path / "logs" / f"run_seed{seed}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(our_log(seed, bpb=bpb))
        logs.append(path)
    return script, logs


def package(tmp_path, script, logs, *extra) -> int:
    return make_submission.main([
        *map(str, logs), "--name", "Test Run", "--author", "Jane Doe", "--github-id", "janedoe",
        "--date", "2025-01-02", "--script", str(script), "--out-root", str(tmp_path / "out"), *extra,
    ])


def test_make_submission_builds_the_folder(tmp_path, runs_dir):
    script, logs = runs_dir
    assert package(tmp_path, script, logs) == 0
    folder = tmp_path / "out" / "track_10min_16mb" / "2025-01-02_Test_Run"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "submission.json", "train_gpt.py", "train_seed1337.log", "train_seed2025.log", "train_seed42.log"]
    assert (folder / "train_gpt.py").read_bytes() == script.read_bytes()
    assert (folder / "train_seed42.log").read_bytes() == logs[1].read_bytes()

    sub = json.loads((folder / "submission.json").read_text())
    types = {"author": str, "github_id": str, "name": str, "blurb": str, "date": str, "val_loss": float, "val_bpb": float,
             "bytes_total": int, "bytes_code": int, "track": str, "seeds": list, "seed_results": dict, "val_bpb_std": float,
             "val_loss_std": float, "artifact_bytes_mean": int, "artifact_bytes_max": int,
             "hardware": str, "pytorch_version": str, "technique_summary": str, "compliance": dict}
    assert set(sub) == set(types) and all(isinstance(sub[k], t) for k, t in types.items())
    code = len(SOURCE.encode())
    assert (sub["author"], sub["track"], sub["date"], sub["seeds"], sub["bytes_code"], sub["bytes_total"]) == ("Jane Doe", "10min_16mb", "2025-01-02", list(SEEDS), code, 15_500_000 + code)
    assert sub["val_bpb"] == pytest.approx((1.1001 + 1.0995 + 1.1010) / 3, abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(np.std([1.1001, 1.0995, 1.1010], ddof=1), abs=1e-8)
    assert (sub["hardware"], sub["pytorch_version"]) == ("8x NVIDIA H100 80GB HBM3", "2.6.0+cu126")
    assert set(sub["seed_results"]) == {"1337", "42", "2025"}
    seed42 = sub["seed_results"]["42"]
    assert seed42 == {"val_bpb": 1.0995, "val_loss": pytest.approx(1.0995 * 1.69), "artifact_bytes": 15_500_000 + code, "steps": 6901,
                      "step_avg_ms": 86.71, "train_time_s": 598.123, "eval_time_s": 392.19}  # artifact_bytes: the counted total
    assert (sub["artifact_bytes_max"], sub["artifact_bytes_mean"]) == (15_500_000 + code, 15_500_000 + code)
    assert sub["val_loss_std"] == pytest.approx(np.std([1.1001 * 1.69, 1.0995 * 1.69, 1.1010 * 1.69], ddof=1), abs=1e-8)
    assert sub["compliance"] == {"train_under_600s": True, "artifact_under_16mb": True, "eval_under_600s": True, "score_first_ttt": True,
                                 "no_pre_quant_ttt": True, "no_slot": True, "no_etlb": True, "no_ngram_cache": True, "three_seeds": True,
                                 "audit_passed": True}

    readme = (folder / "README.md").read_text()
    assert "## Method" in readme and "## Compliance" in readme and "mean ± std" in readme
    assert all(f"| {seed} | " in readme for seed in SEEDS)
    command = readme.split("```bash")[1].split("```")[0]
    assert "for SEED in 1337 42 2025" in command and "--nproc_per_node=8 " in command
    assert "NUM_LAYERS=12" in command and "QK_GAIN_INIT=5.0" in command  # differ from the defaults
    assert "MLP_MULT" not in command and "TTT_ENABLED" not in command and "DATA_PATH" not in command  # defaults


def test_make_submission_compliance_follows_the_logs(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(SOURCE)
    logs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    slot_on = {**DEFAULT_SETTINGS, "SLOT_STEPS": "8"}
    logs[0].write_text(our_log(1, audit="SKIPPED", projected=640.0, settings=slot_on))
    logs[1].write_text(our_log(2, settings=slot_on))
    assert package(tmp_path, script, logs, "--non-record") == 0
    sub = json.loads((tmp_path / "out" / "track_non_record_16mb" / "2025-01-02_Test_Run" / "submission.json").read_text())
    assert sub["track"] == "non_record_16mb"
    assert sub["compliance"] == {"train_under_600s": True, "artifact_under_16mb": True, "eval_under_600s": False, "score_first_ttt": False,
                                 "no_pre_quant_ttt": False, "no_slot": False, "no_etlb": True, "no_ngram_cache": True, "three_seeds": False,
                                 "audit_passed": False}


def _refused(tmp_path, capsys, script, logs, *words) -> None:
    assert package(tmp_path, script, logs) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists(), "a refusal creates nothing"


def test_refuses_a_script_that_did_not_run(tmp_path, runs_dir, capsys):
    script, logs = runs_dir
    script.write_text(SOURCE + "# edited after the runs\n")
    _refused(tmp_path, capsys, script, logs, "sha256", "--script")


def test_refuses_runs_of_different_scripts(tmp_path, runs_dir, capsys):
    script, logs = runs_dir
    logs[2].write_text(our_log(2025, sha="ab" * 32))
    _refused(tmp_path, capsys, script, logs, "different scripts")


def test_refuses_an_artifact_over_the_cap(tmp_path, runs_dir, capsys):
    script, logs = runs_dir
    logs[1].write_text(our_log(42, artifact=16_000_000 - len(SOURCE.encode())))  # exactly the cap: not under it
    _refused(tmp_path, capsys, script, logs, "seed 42", "16,000,000")


def test_refuses_a_log_without_final_score_or_with_other_settings(tmp_path, runs_dir, capsys):
    script, logs = runs_dir
    logs[0].write_text(our_log(1337, final=False))
    _refused(tmp_path, capsys, script, logs, "no final score")
    logs[0].write_text(our_log(1337, settings={**DEFAULT_SETTINGS, "NUM_LAYERS": "11"}))
    _refused(tmp_path, capsys, script, logs, "NUM_LAYERS (11 vs 12)")


def test_refuses_a_run_that_died_during_evaluation(tmp_path, runs_dir, capsys):
    """Killed during TTT: the log's last score is the sliding window's, which is not the run's score."""
    script, logs = runs_dir
    logs[2].write_text(our_log(2025).split("final_int6_zstd_ttt_lora ")[0])
    assert logparse.parse_log(logs[2]).final_path == "sliding_window"
    _refused(tmp_path, capsys, script, logs, "no submission_valid line", "stopped before its evaluation finished")


def test_refuses_a_run_that_logged_submission_valid_no(tmp_path, runs_dir, capsys):
    script, logs = runs_dir
    logs[1].write_text(our_log(42, audit="FAIL"))
    _refused(tmp_path, capsys, script, logs, "submission_valid:no", "audit_failed")


def test_refuses_a_failed_audit_even_when_the_run_says_valid(tmp_path, runs_dir, capsys):
    script, logs = runs_dir
    logs[1].write_text(our_log(42, audit="FAIL", valid=True))
    _refused(tmp_path, capsys, script, logs, "audit of ttt_lora did not pass")


def test_refuses_two_logs_of_one_seed(tmp_path, runs_dir, capsys):
    """The logger keeps an older log of the same RUN_ID as {RUN_ID}.{stamp}.txt: the same seed again."""
    script, logs = runs_dir
    renamed = logs[1].with_name("run_seed42.20250101_120000.txt")
    renamed.write_text(our_log(42, bpb=1.0980))
    _refused(tmp_path, capsys, script, [*logs, renamed], "several logs for seed 42")


def test_refuses_a_log_holding_two_appended_runs(tmp_path, runs_dir, capsys):
    script, logs = runs_dir
    logs[0].write_text(our_log(1337) + our_log(1337))
    _refused(tmp_path, capsys, script, logs, "2 runs")


def test_wrap_ships_a_smaller_self_extracting_script(tmp_path, runs_dir):
    script, logs = runs_dir
    assert package(tmp_path, script, logs, "--wrap") == 0
    folder = tmp_path / "out" / "track_10min_16mb" / "2025-01-02_Test_Run"
    wrapped = (folder / "train_gpt.py").read_bytes()
    assert len(wrapped) < len(SOURCE.encode()) and make_submission.unwrap_source(wrapped) == SOURCE.encode()
    sub = json.loads((folder / "submission.json").read_text())
    assert (sub["bytes_code"], sub["bytes_total"]) == (len(wrapped), 15_500_000 + len(wrapped))
    probe = "import runpy,sys; print(len(runpy.run_path(sys.argv[1])['SETTINGS']))"
    done = subprocess.run([sys.executable, "-c", probe, str(folder / "train_gpt.py")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "7", done.stderr


# ----------------------------------------------------------------------------- statistics


def test_student_t_matches_table_values():
    assert stats.two_sided_p(2.0, 10) == pytest.approx(0.0734, abs=1e-4)
    assert stats.two_sided_p(2.228, 10) == pytest.approx(0.05, abs=2e-4)  # t table, 95 % two-sided
    assert stats.t_sf(2.764, 10) == pytest.approx(0.01, abs=1e-4)  # t table, 99 % one-sided
    assert stats.t_sf(6.965, 2) == pytest.approx(0.01, abs=1e-4)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy
    t = 1.3
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)  # closed form for df=2
    assert stats.t_cdf(-t, 7) == pytest.approx(1 - stats.t_cdf(t, 7), abs=1e-12) and stats.t_sf(0.0, 5) == 0.5
    assert stats.betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # sum of binomial terms


def test_welch_test_on_a_known_example():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]  # variances 2.5 and 14
    assert stats.sample_std(a) ** 2 == pytest.approx(2.5) and stats.sample_std([7.0]) is None
    assert stats.welch_df(2.5, 5, 14.0, 6) == pytest.approx(6.97225573, abs=1e-7)
    test = stats.improvement_test(a, b)
    assert test.kind == "welch" and test.t == pytest.approx(4 / math.sqrt(0.5 + 14 / 6)) and test.df == pytest.approx(6.97225573)
    assert test.p == pytest.approx(stats.t_sf(test.t, test.df)) and 0.02 < test.p < 0.03
    one = stats.improvement_test([1.0, 1.2, 1.1], [1.4], margin=0.1)
    assert one.kind == "one-sample" and one.df == 2 and one.t == pytest.approx(0.2 / (0.1 / math.sqrt(3)))


def _run(seed: int, bpb: float) -> logparse.RunLog:
    return logparse.RunLog(seed=seed, final_val_bpb=bpb, final_val_loss=bpb * 1.7)


def test_record_needs_the_threshold_in_nats_at_one_percent(tmp_path, capsys):
    new = [_run(1, 1.1000), _run(2, 1.1010), _run(3, 1.0990)]
    clear = stats.record_report(new, [1.1100, 1.1110, 1.1090])
    assert clear.improvement_nats == pytest.approx(0.017) and clear.threshold_bpb == pytest.approx(0.005 / 1.7)
    assert clear.test.kind == "welch" and clear.test.p < 0.01 and clear.is_record is True
    small = stats.record_report(new, [1.1040, 1.1045, 1.1035])  # 0.0068 nats: above 0.005, not significantly
    assert small.test_any.p < 0.01 and small.test.p > 0.01 and small.is_record is False
    prev = tmp_path / "submission.json"
    prev.write_text(json.dumps({"val_bpb": 1.11, "seed_results": {"1": {"val_bpb": 1.1100}, "2": {"val_bpb": 1.1110}, "3": {"val_bpb": 1.1090}}}))
    logs = []
    for seed, bpb in ((1, 1.1000), (2, 1.1010), (3, 1.0990)):
        logs.append(tmp_path / f"{seed}.txt")
        logs[-1].write_text(our_log(seed, bpb=bpb))
    assert stats.main([*map(str, logs), "--prev-submission", str(prev)]) == 0
    assert "verdict: RECORD" in capsys.readouterr().out
    assert stats.main([*map(str, logs), "--prev-bpb", "1.1020"]) == 2  # one value: one-sample test, not shown
    assert "one-sample" in capsys.readouterr().out


def test_stats_refuses_the_same_seed_twice(tmp_path, capsys):
    """An older log of the same run, renamed by the logger, must not count as a second seed."""
    logs = [tmp_path / "record_seed42.txt", tmp_path / "record_seed42.20250101_120000.txt", tmp_path / "record_seed7.txt"]
    for path, seed, bpb in zip(logs, (42, 42, 7), (1.1000, 1.0990, 1.1010)):
        path.write_text(our_log(seed, bpb=bpb))
    assert stats.main([*map(str, logs), "--prev-bpb", "1.1200", "1.1210", "1.1190"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: seed 42 is in 2 logs") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- compare


def test_compare_prints_one_row_per_run(tmp_path, capsys):
    ours, official = tmp_path / "ours.txt", tmp_path / "official.txt"
    ours.write_text(our_log(42, bpb=1.1))
    official.write_text(OFFICIAL_LOG)
    assert compare.main([str(ours), str(official), "--markdown", "--sort", "bpb"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and "roundtrip" in lines[0] and "ttt" in lines[0]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:6] == ["run_seed42", "42", "1.1250", "1.1060", "1.1000", "1.100000"]
    assert cells[6:8] == ["+0.0075", "+0.0060"] and cells[10] == f"{15_500_000 + len(SOURCE.encode()):,}"
    official_cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert official_cells[:5] == ["baseline_8gpu", "1337", "1.2244", "-", "-"]


# ----------------------------------------------------------------------------- the README commands


@pytest.mark.parametrize("readme", ["README.md", "records/README.md"])
def test_readme_log_arguments_match_only_the_runs_meant(tmp_path, readme):
    """The logger renames an older log of the same RUN_ID to {RUN_ID}.{YYYYmmdd_HHMMSS}.txt; the
    commands must take the log of each seed of the README's loop, and nothing else."""
    text = (REPO / readme).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    seeds = re.search(r"for SEED in ([\d ]+);", text).group(1).split()
    meant = sorted(f"logs/record_seed{seed}.txt" for seed in seeds)
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in [*meant, "logs/record_seed42.20250101_120000.txt", "logs/record_seed1337.20250101_120500.txt"]:
        (tmp_path / name).write_text("")
    arguments = {arg for block in blocks for line in block.splitlines() if "records/" in line for arg in re.findall(r"logs/record_\S+", line)}
    assert arguments, f"{readme} has no records/ command reading logs"
    for arg in arguments:
        expanded = subprocess.run(["bash", "-c", f"shopt -s nullglob; printf '%s\\n' {arg}"], cwd=tmp_path, capture_output=True, text=True, check=True)
        assert sorted(expanded.stdout.split()) == meant, (readme, arg, expanded.stdout)


def test_stats_averages_only_finished_valid_runs_of_one_configuration_and_says_which(tmp_path, capsys):
    def log(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    good = [log("a.txt", our_log(1, bpb=1.1000)), log("b.txt", our_log(2, bpb=1.1010))]
    died = log("died.txt", our_log(3, bpb=1.0).split("final_int6_zstd_ttt_lora ")[0])  # killed during TTT: the sliding window's score
    invalid = log("invalid.txt", our_log(4, bpb=1.0, valid=False))
    unfinished = log("unfinished.txt", our_log(5, final=False))
    assert stats.main([*good, died, invalid, unfinished, "--prev-bpb", "1.2", "1.21", "1.19"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"excluded {died}: no submission_valid line: the run stopped during its evaluation, so its last score (sliding_window) is not the run's",
        f"excluded {invalid}: submission_valid:no (audit_failed)",
        f"excluded {unfinished}: no final score: the run stopped before its evaluation",
    ]
    assert f"new runs: 2 (seeds 1, 2), averaged: {good[0]}, {good[1]}" in captured.out
    assert "val_bpb   1.10050000" in captured.out  # the mean of the two valid runs only
    other = log("other.txt", our_log(6, bpb=1.0, settings={**DEFAULT_SETTINGS, "NUM_LAYERS": "9", "QK_GAIN_INIT": "4.0"}))
    moved = log("moved.txt", our_log(7, bpb=1.1005, settings={**DEFAULT_SETTINGS, "LOG_DIR": "elsewhere"}))
    assert stats.main([*good, moved, "--prev-bpb", "1.2"]) == 0, "where a run writes its files is not its configuration"
    capsys.readouterr()
    assert stats.main([*good, other, "--prev-bpb", "1.2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {other} and {good[0]} are different configurations: NUM_LAYERS (12 vs 9), QK_GAIN_INIT (5.0 vs 4.0); ") and err.count("\n") == 1
    assert stats.main([died, invalid, "--prev-bpb", "1.2"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: none of the 2 log(s) is a finished valid run (see the lines above); nothing to average"


WEIGHTS = "/home/jane/pg/logs/run_seed42.weights.pt"


def rescue_logs(folder: Path, train_ms: float = 590_000.0, **training_settings) -> tuple[Path, Path]:
    """(the QUANTIZE_ONLY log, the log of the training run that saved the weights it quantized), as train_gpt.py writes them."""
    training = our_log(42, train_ms=train_ms, settings={**DEFAULT_SETTINGS, **training_settings}).split("pre_quant ")[0]
    training += (f"error: no artifact was written to logs/run_seed42.pgz (OSError: [Errno 28] No space left on device); the trained weights are saved "
                 f"in {WEIGHTS}: fix the cause, then quantize, write and evaluate them without retraining: NUM_LAYERS=12 RUN_ID=run_seed42 "
                 f"QUANTIZE_ONLY={WEIGHTS} python3 train_gpt.py\n")
    no_training = ("step:", "stopping_early", "gptq_calibration")
    rescue = "\n".join(line for line in our_log(42, settings={**DEFAULT_SETTINGS, "QUANTIZE_ONLY": WEIGHTS}).splitlines() if not line.startswith(no_training))
    rescue = rescue.replace("model_params:26993756", f"quantize_only weights:{WEIGHTS} (no training)") + "\n"
    paths = folder / "run_seed42.txt", folder / "run_seed42.20250101_120000.txt"
    paths[0].write_text(rescue)
    paths[1].write_text(training)
    return paths


def test_a_quantize_only_rescue_needs_its_training_log_for_the_record_track(tmp_path, runs_dir, capsys):
    script, logs = runs_dir
    rescue, training = rescue_logs(logs[1].parent)
    _refused(tmp_path, capsys, script, logs, "is a QUANTIZE_ONLY run", "holds no training", "--training-log", "--non-record")
    assert package(tmp_path, script, logs, "--training-log", str(training), "--training-log", str(logs[0])) == 1
    assert "--training-log " + str(logs[0]) + " saved no weights that a QUANTIZE_ONLY log given here quantized" in capsys.readouterr().err
    assert package(tmp_path, script, logs, "--training-log", str(training)) == 0
    folder = tmp_path / "out" / "track_10min_16mb" / "2025-01-02_Test_Run"
    assert (folder / "train_seed42_training.log").read_bytes() == training.read_bytes()
    assert (folder / "train_seed42.log").read_bytes() == rescue.read_bytes()
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seed_results"]["42"]["train_time_s"] == 590.0 and sub["seed_results"]["42"]["steps"] == 6901
    assert sub["compliance"]["train_under_600s"] is True
    readme = (folder / "README.md").read_text()
    command = readme.split("```bash")[1].split("```")[0]
    assert "QUANTIZE_ONLY" not in command and "weights.pt" not in command and "NUM_LAYERS=12" in command
    assert "Seed 42: trained by the run logged in `train_seed42_training.log`" in readme


def test_a_quantize_only_rescue_without_its_training_log_is_non_record_and_never_names_the_weights(tmp_path, runs_dir):
    script, logs = runs_dir
    rescue_logs(logs[1].parent)
    assert package(tmp_path, script, logs, "--non-record") == 0
    folder = tmp_path / "out" / "track_non_record_16mb" / "2025-01-02_Test_Run"
    readme = (folder / "README.md").read_text()
    assert "weights.pt" not in readme.split("```bash")[1].split("```")[0] and "whose log is not included" in readme
    assert json.loads((folder / "submission.json").read_text())["compliance"]["train_under_600s"] is False


@pytest.mark.parametrize("change, words", [
    (dict(NUM_LAYERS="11"), ("trained with other settings", "NUM_LAYERS (11 vs 12)")),
    (dict(train_ms=None), ("no training time logged",)),
])
def test_a_training_log_that_does_not_fit_the_rescue_is_refused(tmp_path, runs_dir, capsys, change, words):
    script, logs = runs_dir
    _, training = rescue_logs(logs[1].parent, **{k: v for k, v in change.items() if k != "train_ms"})
    if "train_ms" in change:
        training.write_text("\n".join(line for line in training.read_text().splitlines() if not line.startswith(("step:", "stopping_early", "gptq_"))) + "\n")
    assert package(tmp_path, script, logs, "--training-log", str(training)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err


def test_the_saved_weights_pattern_reads_what_train_gpt_prints(tmp_path):
    """make_submission pairs a rescue with its training log by the path train_gpt.py's keep_trained_weights prints."""
    from conftest import tiny_args, tiny_model
    import train_gpt

    args = tiny_args(LOG_DIR=tmp_path / "my logs", RUN_ID="run_seed42")
    message = train_gpt.keep_trained_weights(tiny_model(), args, train_gpt.Runtime(), "run_seed42", tmp_path / "a.pgz", OSError("disk full"))
    assert make_submission.SAVED_WEIGHTS.search(f"error: {message}").group(1) == str(tmp_path / "my logs" / "run_seed42.weights.pt")


def test_download_records_the_tokenizer_beside_the_shards(tmp_path, hub_env):
    """The shards' fingerprint: train_gpt.py refuses another tokenizer by its sha256, build_shards.py will not write over them."""
    import train_gpt

    hub, files = make_hub(tmp_path)
    hub_env(hub)
    out = tmp_path / "data"
    assert run_downloader(out, "--train-shards", "1") == 0
    assert downloader.FINGERPRINT == train_gpt.TOKENIZER_FINGERPRINT
    record = json.loads((out / "datasets" / DATASET / downloader.FINGERPRINT).read_text())
    assert record == {"tokenizer": "fineweb_1024_bpe.model", "tokenizer_sha256": hashlib.sha256(files["tokenizers/fineweb_1024_bpe.model"]).hexdigest(),
                      "written_by": "data/cached_challenge_fineweb.py"}
    other = tmp_path / "other.model"
    other.write_bytes(b"another tokenizer")
    problem = train_gpt.tokenizer_mismatch(str(out / "datasets" / DATASET), str(other))
    assert f"were made with the tokenizer fineweb_1024_bpe.model (sha256 {record['tokenizer_sha256'][:12]}), not TOKENIZER_PATH={other}" in problem
    assert problem.endswith("use the TOKENIZER_PATH and VOCAB_SIZE that made them")  # the one it names here is no real model
    assert not list(out.rglob("*.part"))
