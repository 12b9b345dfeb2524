"""Corpora, tokenizers, silo partitioning and token streams."""

from fedtrain.data.corpus import CorpusError, Document, kjv_documents, read_text_documents
from fedtrain.data.partition import Partition, partition_documents
from fedtrain.data.prepare import PreparedData, prepare_data, tokenize_documents
from fedtrain.data.stream import TokenStream, derive_seed, eval_windows, unigram_cross_entropy
from fedtrain.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CorpusError",
    "Document",
    "Partition",
    "PreparedData",
    "TokenStream",
    "derive_seed",
    "eval_windows",
    "kjv_documents",
    "load_tokenizer",
    "partition_documents",
    "prepare_data",
    "read_text_documents",
    "tokenize_documents",
    "train_bpe",
    "unigram_cross_entropy",
]
