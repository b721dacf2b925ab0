"""Data section of train_gpt.py: the shard reader and writer, missing data, validation tokens, the
distributed loader and document spans."""

import numpy as np
import pytest
import torch

import train_gpt
from conftest import synthetic_stream

HEADER_BYTES = 256 * 4


def raw_shard(tokens, magic=20240520, version=1, count=None, extra=b"") -> bytes:
    """Shard bytes written by hand (not by write_data_shard), so a reader bug cannot hide behind a writer bug."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, tokens.size if count is None else count)
    return header.tobytes() + tokens.tobytes() + extra


# ----------------------------------------------------------------------------- shard files


def test_shard_round_trip(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 1023, 7], dtype=np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    train_gpt.write_data_shard(path, tokens)
    raw = path.read_bytes()
    assert raw == raw_shard(tokens), "the writer must produce the official layout byte for byte"
    assert len(raw) == HEADER_BYTES + 2 * tokens.size
    back = train_gpt.load_data_shard(path)
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    empty = tmp_path / "empty.bin"
    train_gpt.write_data_shard(empty, np.array([], dtype=np.uint16))
    assert train_gpt.load_data_shard(empty).size == 0


def test_reader_accepts_hand_written_official_shard(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 1024
    path = tmp_path / "s.bin"
    path.write_bytes(raw_shard(tokens))
    assert np.array_equal(train_gpt.load_data_shard(path), tokens)


def test_writer_rejects_ids_outside_uint16(tmp_path):
    with pytest.raises(train_gpt.DataError, match="uint16"):
        train_gpt.write_data_shard(tmp_path / "x.bin", np.array([1, 70000]))
    with pytest.raises(train_gpt.DataError, match="uint16"):
        train_gpt.write_data_shard(tmp_path / "y.bin", np.array([1, -1]))


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("bad_magic", raw_shard([1, 2, 3], magic=12345), ["magic", "12345", "20240520"]),
        ("bad_version", raw_shard([1, 2, 3], version=7), ["version", "7", "re-download it", "re-create it with data/build_shards.py"]),
        ("truncated_header", raw_shard([1, 2, 3])[:500], ["500 bytes", "header", "truncated"]),
        ("missing_tokens", raw_shard([1, 2, 3], count=10), ["10 tokens", "1030 bytes"]),
        ("extra_bytes", raw_shard([1, 2, 3], extra=b"\x00\x00\x00"), ["3 tokens", "1033 bytes"]),
        ("empty_file", b"", ["0 bytes", "header"]),
    ],
)
def test_corrupt_shard_raises_data_error(tmp_path, name, data, words):
    path = tmp_path / f"{name}.bin"
    path.write_bytes(data)
    with pytest.raises(train_gpt.DataError) as info:
        train_gpt.load_data_shard(path)
    message = str(info.value)
    assert str(path) in message, "the message must name the file"
    message = message.replace(str(path), "")  # the words must be in the explanation, not the file name
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


def test_missing_shards_message_names_download_and_smoke_commands(tmp_path):
    for split in ("train", "val"):
        with pytest.raises(train_gpt.DataError) as info:
            train_gpt.shard_files(str(tmp_path), split)
        message = str(info.value)
        assert f"fineweb_{split}_" in message and str(tmp_path) in message
        assert "cached_challenge_fineweb.py" in message
        assert "data/smoke.py" in message
    # the same error reaches the callers that the run uses
    with pytest.raises(train_gpt.DataError, match="cached_challenge_fineweb.py"):
        train_gpt.load_validation_tokens(str(tmp_path), 1024)
    with pytest.raises(train_gpt.DataError, match="data/smoke.py"):
        train_gpt.DistributedTokenLoader(str(tmp_path), train_gpt.Runtime(), 16)


def test_shards_are_read_in_name_order(tmp_path):
    train_gpt.write_data_shard(tmp_path / "fineweb_val_000001.bin", np.array([7, 8], dtype=np.uint16))
    train_gpt.write_data_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 2, 3], dtype=np.uint16))
    tokens = train_gpt.load_validation_tokens(str(tmp_path), 16)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [1, 2, 3, 7, 8]
    assert train_gpt.load_validation_tokens(str(tmp_path), 16, max_tokens=4).tolist() == [1, 2, 3, 7]


def test_validation_tokens_reject_ids_outside_vocab(tmp_path):
    train_gpt.write_data_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 5, 64, 2], dtype=np.uint16))
    assert train_gpt.load_validation_tokens(str(tmp_path), 65).tolist() == [1, 5, 64, 2]
    with pytest.raises(train_gpt.DataError) as info:
        train_gpt.load_validation_tokens(str(tmp_path), 64)
    assert "64" in str(info.value) and "VOCAB_SIZE" in str(info.value)


def test_validation_needs_two_tokens(tmp_path):
    train_gpt.write_data_shard(tmp_path / "fineweb_val_000000.bin", np.array([1], dtype=np.uint16))
    with pytest.raises(train_gpt.DataError):
        train_gpt.load_validation_tokens(str(tmp_path), 64)


# ----------------------------------------------------------------------------- the distributed loader


def _write_train(tmp_path, sizes):
    """Train shards holding 2, 3, 4, ... (mod 60000, never BOS) so every token names its global position."""
    start = 0
    for i, n in enumerate(sizes):
        train_gpt.write_data_shard(tmp_path / f"fineweb_train_{i:06d}.bin", (2 + np.arange(start, start + n) % 60000).astype(np.uint16))
        start += n
    return start


def test_loader_spans_stay_inside_a_shard_skip_its_tail_and_wrap(tmp_path):
    """Each micro-step reads local + 1 tokens from one shard; a tail too short for a span is skipped, as the record's loader does."""
    _write_train(tmp_path, [50, 37])
    loader = train_gpt.DistributedTokenLoader(str(tmp_path), train_gpt.Runtime(), 8)
    firsts = [int(loader.next_batch(8 * 16, 8)[0][0, 0]) - 2 for _ in range(7)]  # 16 inputs + 1 per micro-step
    assert firsts == [0, 17, 50, 67, 0, 17, 50]


def test_loader_starts_at_a_shards_first_bos(tmp_path):
    tokens = np.arange(2, 202, dtype=np.uint16)
    tokens[5] = tokens[40] = train_gpt.BOS_ID
    train_gpt.write_data_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    x, y, _ = train_gpt.DistributedTokenLoader(str(tmp_path), train_gpt.Runtime(), 8).next_batch(8 * 16, 8)
    assert x.flatten().tolist() == tokens[5:21].tolist() and y.flatten().tolist() == tokens[6:22].tolist()


@pytest.mark.parametrize("backend, shape", [("sdpa", (4, 16)), ("fa2", (1, 64))])
def test_loader_x_y_are_shifted_by_one(tmp_path, backend, shape):
    """SDPA gets rows of TRAIN_SEQ_LEN; a FlashAttention backend one row per micro-step."""
    _write_train(tmp_path, [5000])
    loader = train_gpt.DistributedTokenLoader(str(tmp_path), train_gpt.Runtime(), 16, backend)
    x, y, layout = loader.next_batch(8 * 64, 8)
    assert x.shape == y.shape == shape and x.dtype == torch.int64
    assert torch.equal(y.flatten(), x.flatten() + 1)
    assert (layout.mask is None) == (backend != "sdpa") and (layout.cu_seqlens is None) == (backend == "sdpa")


def test_loader_layout_cuts_documents_at_bos_and_every_seq_len(tmp_path):
    """The packed row's segments start at every BOS and every TRAIN_SEQ_LEN tokens into a document (not
    at the SDPA layout's row edges, so a document across one keeps its context)."""
    tokens = np.full(400, 7, dtype=np.uint16)
    tokens[[0, 10, 50]] = train_gpt.BOS_ID
    train_gpt.write_data_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    _, _, layout = train_gpt.DistributedTokenLoader(str(tmp_path), train_gpt.Runtime(), 16, "fa2").next_batch(8 * 64, 8)
    cu = layout.cu_seqlens.tolist()
    assert cu[:5] == [0, 10, 26, 42, 50] and set(cu[5:]) == {64} and len(cu) % 64 == 0  # the document from 10 runs past 16 tokens
    assert layout.max_len == 16
    _, _, plain = train_gpt.DistributedTokenLoader(str(tmp_path), train_gpt.Runtime(), 16, "fa2", isolate=False).next_batch(8 * 64, 8)
    assert plain.cu_seqlens.tolist()[:5] == [0, 16, 32, 48, 64]


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("backend", ["sdpa", "fa2"])
def test_ranks_together_read_what_one_rank_reads_for_the_same_global_batch(tmp_path, world_size, backend):
    """Runtime.grad_accum_steps = 8 // world_size keeps the global batch: the ranks' slices of each of
    their micro-steps must together be exactly the micro-batches of one process with 8 micro-steps,
    so 1, 2, 4 or 8 processes train on the same tokens with the same attention segments."""
    _write_train(tmp_path, [3000, 2500])  # several steps, crossing a shard boundary
    global_tokens, seq_len, steps = 8 * 2 * 16, 16, 3
    single_rt = train_gpt.Runtime()
    single = train_gpt.DistributedTokenLoader(str(tmp_path), single_rt, seq_len, backend)
    single_batches = [single.next_batch(global_tokens, single_rt.grad_accum_steps) for _ in range(steps * 8)]
    rts = [train_gpt.Runtime(rank=r, world_size=world_size) for r in range(world_size)]
    loaders = [train_gpt.DistributedTokenLoader(str(tmp_path), rt, seq_len, backend) for rt in rts]
    accum = rts[0].grad_accum_steps
    assert accum * world_size == 8
    multi = []
    for _ in range(steps * accum):
        multi.extend(ld.next_batch(global_tokens, accum) for ld in loaders)
    assert len(multi) == len(single_batches)
    for (xs, ys, ls), (xm, ym, lm) in zip(single_batches, multi):
        assert torch.equal(xs, xm) and torch.equal(ys, ym)
        assert all(torch.equal(a, b) if a is not None else b is None for a, b in zip(ls, lm) if not isinstance(a, int))


def test_two_ranks_split_one_call_without_overlap(tmp_path):
    _write_train(tmp_path, [5000])
    global_tokens, seq_len = 2 * 4 * 16, 16
    xs = []
    for r in range(2):
        loader = train_gpt.DistributedTokenLoader(str(tmp_path), train_gpt.Runtime(rank=r, world_size=2), seq_len)
        x, y, _ = loader.next_batch(global_tokens, 1)
        assert x.shape == (4, 16)
        assert torch.equal(y.flatten(), x.flatten() + 1)
        xs.append(x)
    a, b = xs[0].flatten().tolist(), xs[1].flatten().tolist()
    assert not set(a) & set(b), "the two ranks must not train on the same input tokens"


# ----------------------------------------------------------------------------- document spans


def _span_targets(tokens: torch.Tensor):
    spans = train_gpt.document_spans(tokens)
    positions = [p for s, e in spans for p in range(s + 1, e + 1)]
    return spans, positions


@pytest.mark.parametrize(
    "stream",
    [
        [1, 5, 6, 7, 1, 8, 9, 1, 4],  # starts with BOS
        [5, 6, 1, 7, 8, 1, 9],  # does not start with BOS
        [1, 5, 6, 1],  # ends right after a BOS
        [5, 6, 7, 1],  # neither
        [1, 1, 5, 1, 1, 6],  # empty documents
        [1, 5],
        [7, 7],
        [1, 1],
    ],
)
def test_document_spans_cover_every_target_once(stream):
    tokens = torch.tensor(stream)
    spans, positions = _span_targets(tokens)
    assert positions == list(range(1, len(stream))), (spans, positions)
    for s, e in spans:
        assert s == 0 or stream[s] == train_gpt.BOS_ID, "a document starts at a BOS (or at 0)"
        assert all(t != train_gpt.BOS_ID for t in stream[s + 1 : e]), "no BOS inside a document's inputs"


def test_document_spans_on_long_random_streams():
    for seed in range(5):
        stream = synthetic_stream(40, seed=seed)
        for cut in (0, 3):  # also a stream starting mid-document
            tokens = torch.from_numpy(stream[cut:].astype(np.int64))
            _, positions = _span_targets(tokens)
            assert positions == list(range(1, tokens.numel()))
