"""Data: raw sources -> webdataset shards (prepare), and the deterministic, resumable training read stream."""
from distgan.data.pipeline import BatchStream, StreamPlan, make_batch_iterator, read_dataset_info
from distgan.data.shards import DataError, DatasetInfo, write_shards

__all__ = [
    "BatchStream", "DataError", "DatasetInfo", "StreamPlan", "make_batch_iterator", "read_dataset_info",
    "write_shards",
]
