"""The official bits-per-byte accounting (REFERENCE §3) against real text and the official tokenizers.

How the expected byte counts are made independent of train_gpt's tables
-----------------------------------------------------------------------
train_gpt counts bytes per *vocabulary entry*: it strips a leading "▁" from `id_to_piece(i)`,
counts the UTF-8 bytes of the rest and adds one space byte unless the previous token is a boundary.
The expected counts below never look at the vocabulary. They start from the text that the
tokenizer actually covers, produced by SentencePiece's own C++ code:

* `sp.normalize(text)` is the normalized text (NFKC, whitespace collapsed, "▁" for spaces) that the
  pieces tile exactly; its UTF-8 length (with "▁" back to a 1-byte space) is every byte of the text.
* for documents without <unk>, `sp.decode(ids)` (the C++ decoder) must give that same text, so the
  count is `len(sp.decode(ids).encode())`.
* <unk> pieces are charged 0 bytes by the official rule, and a space right after an <unk> is not
  charged either (<unk> is a boundary). For documents with <unk>, the expected count is the
  normalized text's bytes minus the bytes of the characters that became <unk> (their surface
  strings, located by where the pieces fall in the normalized text) minus those spaces.
"""

import json
import lzma
import math

import numpy as np
import pytest
import torch

import train_gpt
from conftest import SHARED_DATA, toy_tables

WIKI_VAL = SHARED_DATA / "wiki_small" / "val.jsonl.xz"
SP8192 = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe.model"


def utf8_len(s: str) -> int:
    return len(s.replace("\u2581", " ").encode("utf-8"))


def official_sum(ids: list[int], tables: train_gpt.ByteTables) -> int:
    seq = torch.tensor([train_gpt.BOS_ID] + list(ids))
    return int(train_gpt.target_bytes(seq[:-1], seq[1:], tables).sum())


def expected_bytes(sp, text: str) -> tuple[int, int]:
    """(expected official byte count, number of <unk> pieces), computed from the normalized text."""
    normalized = sp.normalize(text)
    ids, pieces = sp.encode(text), sp.encode(text, out_type=str)
    assert "".join(pieces) == normalized, "the pieces must tile the normalized text"
    unk = sp.unk_id()
    total = utf8_len(normalized)
    if normalized.startswith("\u2581"):  # a leading space right after BOS is not charged
        total -= 1
    unk_count = 0
    for i, (tid, piece) in enumerate(zip(ids, pieces)):
        if tid == unk:
            unk_count += 1
            total -= utf8_len(piece)
            if i + 1 < len(pieces) and ids[i + 1] != unk and pieces[i + 1].startswith("\u2581"):
                total -= 1
    return total, unk_count


@pytest.fixture(scope="module")
def wiki_docs():
    if not WIKI_VAL.is_file():
        pytest.skip("../shared/data is not beside the repository")
    with lzma.open(WIKI_VAL, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def test_official_count_matches_the_decoder_on_documents_without_unk(sp1024, wiki_docs):
    tables = train_gpt.build_byte_tables(sp1024, 1024)
    checked = 0
    for text in wiki_docs:
        ids = sp1024.encode(text)
        if sp1024.unk_id() in ids:
            continue
        decoded = sp1024.decode(ids)
        assert official_sum(ids, tables) == len(decoded.encode("utf-8"))
        assert official_sum(ids, tables) == expected_bytes(sp1024, text)[0]
        checked += 1
    assert checked >= 3, "need a few <unk>-free documents"


def test_official_count_matches_normalized_text_on_documents_with_unk(sp1024, wiki_docs):
    tables = train_gpt.build_byte_tables(sp1024, 1024)
    with_unk = 0
    for text in wiki_docs[:30]:
        ids = sp1024.encode(text)
        expected, unk_count = expected_bytes(sp1024, text)
        with_unk += unk_count > 0
        assert official_sum(ids, tables) == expected
        # the official count is below the true UTF-8 size only by what <unk> hides
        assert expected <= utf8_len(sp1024.normalize(text))
    assert with_unk >= 3, "need documents where <unk> occurs"


def test_concatenated_documents_count_each_document_once(sp1024, wiki_docs):
    """The flat stream [BOS]+doc1+[BOS]+doc2...: BOS targets are 0 bytes and nothing leaks across."""
    tables = train_gpt.build_byte_tables(sp1024, 1024)
    docs = wiki_docs[:8]
    stream = []
    for text in docs:
        stream += [train_gpt.BOS_ID] + sp1024.encode(text)
    seq = torch.tensor(stream)
    total = int(train_gpt.target_bytes(seq[:-1], seq[1:], tables).sum())
    assert total == sum(expected_bytes(sp1024, t)[0] for t in docs)


def test_leading_space_rule_on_real_pieces(sp1024):
    tables = train_gpt.build_byte_tables(sp1024, 1024)
    the, a = sp1024.piece_to_id("\u2581the"), sp1024.piece_to_id("a")
    assert sp1024.id_to_piece(the) == "\u2581the" and not sp1024.is_unknown(the)
    bos, unk = torch.tensor([train_gpt.BOS_ID]), torch.tensor([sp1024.unk_id()])
    assert int(train_gpt.target_bytes(torch.tensor([a]), torch.tensor([the]), tables)) == 4  # " the"
    assert int(train_gpt.target_bytes(bos, torch.tensor([the]), tables)) == 3  # after BOS: no space
    assert int(train_gpt.target_bytes(unk, torch.tensor([the]), tables)) == 3  # after <unk>: no space
    assert int(train_gpt.target_bytes(torch.tensor([a]), unk, tables)) == 0  # <unk> itself: 0 bytes
    assert int(train_gpt.target_bytes(torch.tensor([a]), bos, tables)) == 0  # BOS: 0 bytes
    for special in (0, 1, 2, 3):
        assert bool(tables.is_boundary[special]) and int(tables.base_bytes[special]) == 0


def test_byte_fallback_piece_is_one_byte():
    if not SP8192.is_file():
        pytest.skip("../shared/data is not beside the repository")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    tables = train_gpt.build_byte_tables(sp, 8192)
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    for i in byte_ids:
        assert sp.id_to_piece(i).startswith("<0x")  # 6 characters, but 1 byte of text
        assert int(tables.base_bytes[i]) == 1 and not bool(tables.has_leading_space[i]) and not bool(tables.is_boundary[i])
    text = "Snow \u2603 and \U0001F600 in Zürich: 東京 and \u0416 x"
    ids = sp.encode(text)
    assert any(sp.is_byte(i) for i in ids), "the sample must use byte fallback"
    assert sp.unk_id() not in ids
    decoded = sp.decode(ids)
    assert decoded == sp.normalize(text).replace("\u2581", " ")
    assert official_sum(ids, tables) == len(decoded.encode("utf-8")) == len(text.encode("utf-8"))


def test_byte_tables_reject_vocab_mismatch(sp1024):
    with pytest.raises(train_gpt.DataError) as info:
        train_gpt.build_byte_tables(sp1024, 8192)
    assert "1024" in str(info.value) and "VOCAB_SIZE=8192" in str(info.value)


def test_missing_tokenizer_names_the_commands(tmp_path):
    with pytest.raises(train_gpt.DataError) as info:
        train_gpt.load_tokenizer_tables(str(tmp_path / "nope.model"), 1024)
    assert "TOKENIZER_PATH" in str(info.value) and "cached_challenge_fineweb.py" in str(info.value)


def test_target_bytes_on_toy_tables():
    tables = toy_tables()
    prev = torch.tensor([1, 4, 5, 3, 6, 9])
    tgt = torch.tensor([5, 5, 7, 9, 2, 4])
    # base = 1 + id % 3 (ids >= 4), space for odd ids >= 4 unless prev < 4
    # 5 after BOS: 3, no space; 5 after 4: 3 + space; 7 after 5: 2 + space; 9 after <unk>: 1, no space;
    # control id 2: 0; 4 (even, no space marker): 2
    expected = [3, 4, 3, 1, 0, 2]
    got = train_gpt.target_bytes(prev, tgt, tables)
    assert got.tolist() == expected
    assert got.dtype == torch.int32


def test_bits_per_byte_arithmetic():
    assert train_gpt.bits_per_byte(math.log(2.0) * 10.0, 5.0) == pytest.approx(2.0, rel=1e-15)
    # a uniform model over 1024 tokens: 10 bits per token; 4 bytes per token -> 2.5 bits per byte
    tokens, nbytes = 1000, 4000
    assert train_gpt.bits_per_byte(tokens * math.log(1024), nbytes) == pytest.approx(2.5, rel=1e-12)
    # loss in nats per token times tokens per byte, in bits
    val_loss, toks, byts = 2.0, 123456, 500000
    assert train_gpt.bits_per_byte(val_loss * toks, byts) == pytest.approx(val_loss / math.log(2) * toks / byts, rel=1e-12)
    assert np.isfinite(train_gpt.bits_per_byte(0.0, 1.0))
