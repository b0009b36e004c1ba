"""Data for layerjax: sources (Depo, random tokens, local text), tokenizers, one grain pipeline.

The entry point is `build_data(cfg, process_index, process_count)`; see pipeline.py for the batch
format.
"""

from layerjax.data.depo import DepoTask
from layerjax.data.metrics import exact_match_by_hops, merge_counts
from layerjax.data.pipeline import COLUMNS, Data, build_data
from layerjax.data.sources import DataError, read_documents, split_train_val
from layerjax.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "COLUMNS", "ByteTokenizer", "Data", "DataError", "DepoTask", "HFTokenizer", "build_data",
    "build_tokenizer", "exact_match_by_hops", "merge_counts", "read_documents", "split_train_val",
]
