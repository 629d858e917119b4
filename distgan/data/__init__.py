"""Data: raw datasets -> webdataset shards (``python -m distgan.prepare``), and the training read stream.

    raw.py      readers of raw datasets (IDX, CIFAR-10 archive, image folder, npz) and the SOURCES table
    download.py fetch a raw dataset from its official address, checksums verified
    shards.py   the shard format: write shards + dataset.json, describe a shard set, decode one shard
    tar.py      the in-memory tar reader, and the one check of a shard URL (pipe:, schemes)
    untrusted.py  user files opened as regular files only, reads bounded by the bytes read; .npy arrays and
                  CIFAR-10 pickles sized by the bytes that hold them, never by a header
    stream.py   the deterministic, resumable per-rank batch stream the trainer consumes
    errors.py   DataError
"""
