import math

import pytest
import torch

from fedtrain.data import (
    ByteTokenizer,
    CorpusError,
    TokenStream,
    kjv_documents,
    load_tokenizer,
    partition_documents,
    read_text_documents,
    train_bpe,
    unigram_cross_entropy,
)


@pytest.fixture(scope="module")
def kjv():
    return kjv_documents()


def test_kjv_is_the_whole_bible_in_canonical_order(kjv):
    assert len(kjv) == 1189  # chapters
    assert kjv[0].doc_id == "Genesis 1" and kjv[-1].doc_id == "Revelation 22"
    assert kjv[0].text.startswith("In the beginning God created the heaven and the earth.")


@pytest.mark.parametrize("split", ["iid", "noniid"])
@pytest.mark.parametrize("silos", [1, 4, 7])
def test_shards_are_disjoint_and_cover_the_training_split(kjv, split, silos):
    part = partition_documents(kjv, silos, split, 0.05, seed=3)
    ids = [d.doc_id for shard in part.silo_docs for d in shard]
    eval_ids = {d.doc_id for d in part.eval_docs}
    assert len(ids) == len(set(ids))  # disjoint between silos
    assert not eval_ids & set(ids)  # eval never trained on
    assert set(ids) | eval_ids == {d.doc_id for d in kjv}  # together: the whole corpus
    assert len(part.silo_docs) == silos and all(part.silo_docs)
    assert 0.04 < len(eval_ids) / len(kjv) < 0.06
    sizes = [sum(len(d.text) for d in s) for s in part.silo_docs]
    assert max(sizes) < 1.5 * min(sizes)  # balanced by characters


def test_noniid_split_gives_silos_different_books(kjv):
    part = partition_documents(kjv, 4, "noniid", 0.05, seed=0)
    first_books = [s[0].group for s in part.silo_docs]
    assert first_books[0] == "Genesis"
    assert part.silo_docs[-1][-1].group == "Revelation"
    books = [{d.group for d in s} for s in part.silo_docs]
    # Contiguous cuts share at most the one book they cut through.
    assert all(len(books[i] & books[j]) <= 1 for i in range(4) for j in range(i + 1, 4))


def test_iid_split_mixes_books(kjv):
    part = partition_documents(kjv, 4, "iid", 0.05, seed=0)
    assert all(len({d.group for d in s}) > 40 for s in part.silo_docs)


def test_too_many_silos_is_a_clear_error(kjv):
    with pytest.raises(ValueError, match="cannot be split among"):
        partition_documents(kjv[:10], 20, "iid", 0.05, seed=0)


def test_byte_tokenizer_round_trips_text():
    tok = ByteTokenizer()
    text = "In the beginning — ñ, 日本語."
    assert tok.decode(tok.encode(text)) == text


def test_bpe_trained_locally_round_trips_and_compresses(kjv, tmp_path):
    texts = [d.text for d in kjv[:300]]
    tok = train_bpe(texts, 1000)
    assert tok.vocab_size == 1000
    sample = kjv[400].text
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(sample) / len(ids) > 2.5  # real merges happened
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.encode(sample) == ids


def test_token_stream_batches_are_a_pure_function_of_step():
    tokens = torch.arange(1000, dtype=torch.int32)
    a = TokenStream(tokens, seed=1, stream_id="s0")
    b = TokenStream(tokens, seed=1, stream_id="s0")
    x1, y1 = a.batch(5, 0, 4, 16)
    x2, y2 = b.batch(5, 0, 4, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    x3, _ = a.batch(6, 0, 4, 16)
    assert not torch.equal(x1, x3)
    x4, _ = TokenStream(tokens, seed=1, stream_id="s1").batch(5, 0, 4, 16)
    assert not torch.equal(x1, x4)


def test_unigram_cross_entropy_hand_computed():
    # counts +1 smoothing over vocab 4: train [0,0,1] -> counts 3,2,1,1 of 7.
    ce = unigram_cross_entropy(
        torch.bincount(torch.tensor([0, 0, 1]), minlength=4), torch.tensor([0, 2])
    )
    expected = -(math.log(3 / 7) + math.log(1 / 7)) / 2
    assert abs(ce - expected) < 1e-12


def test_user_text_from_local_files_and_fsspec_urls(tmp_path):
    import fsspec

    (tmp_path / "a.txt").write_text("Call me Ishmael.")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    docs = read_text_documents([str(tmp_path / "*.txt"), f"file://{tmp_path}/b.jsonl"])
    assert [d.text for d in docs] == ["Call me Ishmael.", "one", "two"]
    with fsspec.open("memory://fedtrain-test/c.txt", "wt") as f:
        f.write("from memory")
    assert read_text_documents(["memory://fedtrain-test/c.txt"])[0].text == "from memory"


def test_bad_user_text_gives_named_errors(tmp_path):
    with pytest.raises(CorpusError, match="no files match"):
        read_text_documents([str(tmp_path / "missing-*.txt")])
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:1"):
        read_text_documents([str(tmp_path / "bad.jsonl")])


def test_a_silo_can_bring_its_own_text(tmp_path):
    from fedtrain.config import config_from_dict
    from fedtrain.data import prepare_data

    own = tmp_path / "own.txt"
    own.write_text("Our institution's private notes. " * 200)
    cfg = config_from_dict(
        {
            "run": {"rounds": 1, "eval_batches": 2},
            "data": {
                "silos": 3,
                "tokenizer": "byte",
                "max_chars": 200_000,
                "silo_data": {"silo1": str(own)},
            },
            "train": {"seq_len": 16},
        }
    )
    data = prepare_data(cfg, tmp_path)
    t = data.silo_tokens[1]
    assert bytes(t.read(0, len(t)).tolist()).decode() == own.read_text()
    assert data.silo_groups[1] == ["own.txt"]
    assert data.silo_groups[0][0] == "Genesis"  # others keep their corpus shards
    bad = config_from_dict(
        {
            "run": {"rounds": 1},
            "data": {"silos": 2, "silo_data": {"silo1": str(tmp_path / "missing.txt")}},
        }
    )
    with pytest.raises(CorpusError):
        prepare_data(bad, tmp_path / "x")
