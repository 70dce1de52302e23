"""Datasets for federated fine-tuning: synthetic private records with canaries, local data,
partitioners and response-only tokenisation.

Builders are registered in :data:`fedsecure.registry.DATASETS` (``private-records``, ``local``)::

    from fedsecure.registry import DATASETS
    ds = DATASETS.get("private-records")(num_clients=4, seed=0)
"""

from fedsecure.data.base import Canary, DataError, DataFileNotFoundError, Example, FederatedDataset
from fedsecure.data.catalog import local_dataset, private_records
from fedsecure.data.partition import PARTITIONS, partition_dirichlet, partition_iid, partition_natural
from fedsecure.data.tokenize import DEFAULT_SYSTEM, collate, encode_dataset, encode_example, make_loader

__all__ = [
    "DEFAULT_SYSTEM",
    "PARTITIONS",
    "Canary",
    "DataError",
    "DataFileNotFoundError",
    "Example",
    "FederatedDataset",
    "collate",
    "encode_dataset",
    "encode_example",
    "local_dataset",
    "make_loader",
    "partition_dirichlet",
    "partition_iid",
    "partition_natural",
    "private_records",
]
