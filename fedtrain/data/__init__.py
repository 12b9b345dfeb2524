"""Corpora, sources, prepared token shards, tokenizers, silo partitioning and token streams.

Names are imported lazily: `fedtrain data prepare` and its tokenising workers must not pay for
importing torch.
"""

from __future__ import annotations

from fedtrain._lazy import lazy

_WHERE = {
    "BPETokenizer": "fedtrain.data.tokenizer",
    "ByteTokenizer": "fedtrain.data.tokenizer",
    "CorpusError": "fedtrain.data.corpus",
    "Document": "fedtrain.data.corpus",
    "Partition": "fedtrain.data.partition",
    "PreparedData": "fedtrain.data.prepare",
    "TokenShards": "fedtrain.data.shards",
    "TokenStream": "fedtrain.data.stream",
    "derive_seed": "fedtrain.data.stream",
    "eval_windows": "fedtrain.data.stream",
    "kjv_documents": "fedtrain.data.corpus",
    "load_tokenizer": "fedtrain.data.tokenizer",
    "partition_documents": "fedtrain.data.partition",
    "prepare_data": "fedtrain.data.prepare",
    "prepare_sources": "fedtrain.data.prepared",
    "read_text_documents": "fedtrain.data.corpus",
    "tokenize_documents": "fedtrain.data.prepare",
    "train_bpe": "fedtrain.data.tokenizer",
    "unigram_cross_entropy": "fedtrain.data.stream",
}

__all__ = sorted(_WHERE)

__getattr__ = lazy(__name__, _WHERE)
