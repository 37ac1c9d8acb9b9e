"""Clients' shares of the training examples, for federated averaging (data.partition), reproducible from the seed.

  iid              a random permutation cut into equal parts
  labels:k         McMahan et al.'s pathological non-IID split: the examples sorted by label, cut into clients x k
                   shards of equal size, each client given k random shards (so mostly k labels)
  dirichlet:alpha  per label, the examples spread over the clients in proportions drawn from Dirichlet(alpha)
                   (Hsu et al., 2019): small alpha, few labels per client; large alpha, close to IID
"""
from __future__ import annotations

import numpy as np

from hvdtrain.errors import DataError


def partition(labels: np.ndarray, clients: int, spec: str, seed: int) -> list[np.ndarray]:
    """Each client's example indices (sorted), one array per client; none may be empty."""
    labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
    n = len(labels)
    if clients > n:
        raise DataError(f"fedavg.clients={clients} is more than the {n} training examples; use at most {n} clients")
    rng = np.random.default_rng([seed, 7])
    kind, _, value = spec.partition(":")
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif kind == "labels":
        parts = _label_shards(labels, clients, int(value), rng)
    else:
        parts = _dirichlet(labels, clients, float(value), rng)
    for client, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(f"data.partition={spec} leaves client {client} of {clients} without examples; use fewer "
                            "fedavg.clients" + (" or a larger alpha" if kind == "dirichlet" else ""))
    return [np.sort(part) for part in parts]


def _label_shards(labels: np.ndarray, clients: int, per_client: int, rng) -> list[np.ndarray]:
    shards = np.array_split(np.argsort(labels, kind="stable"), clients * per_client)
    order = rng.permutation(len(shards))
    return [np.concatenate([shards[s] for s in order[c * per_client:(c + 1) * per_client]]) for c in range(clients)]


def _dirichlet(labels: np.ndarray, clients: int, alpha: float, rng) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(piece)
    return [np.concatenate(p) for p in parts]


def describe(parts: list[np.ndarray], labels: np.ndarray) -> dict:
    """What the run directory keeps (partition.json): per client its examples and its label counts."""
    labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
    return {"clients": [{"examples": part.tolist(),
                         "labels": {str(k): int(v) for k, v in zip(*np.unique(labels[part], return_counts=True))}}
                        for part in parts]}
