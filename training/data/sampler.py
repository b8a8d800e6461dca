"""Samplers and collate functions: N-way K-shot episodes and shuffled supervised batches.

Episodic regime::

    sampler = EpisodeSampler(dataset.labels, way=5, shot=1, query=5, episodes=1000, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=EpisodeCollate(dataset.label_texts, way=5, shot=1),
                        num_workers=2)
    for episode in loader:   # dict, see EpisodeCollate
        ...

(``episode_loader`` builds exactly that.) Supervised (multi-task) regime: ``SupervisedBatchSampler``
+ ``collate_supervised`` (``supervised_loader``).

Both samplers are seeded: the same seed gives the same batches. Episode ``i`` depends only on
(seed, epoch, i), so sharding episodes over DDP ranks (``rank``/``world_size``) or iterating twice
changes nothing; ``set_epoch`` draws a fresh set, as with ``DistributedSampler``.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "EpisodeSampler",
    "EpisodeCollate",
    "SupervisedBatchSampler",
    "collate_supervised",
    "episode_loader",
    "supervised_loader",
]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class EpisodeSampler(Sampler[list[int]]):
    """Yields one list of dataset indices per N-way K-shot episode.

    Each list has ``way * shot`` support indices, ordered class by class (K of the first class, then
    K of the second, ...), followed by ``way * query`` query indices in the same class order. The N
    classes of an episode are distinct and drawn uniformly (in random order) from the classes with at
    least ``shot + query`` items; the K + Q items of a class are distinct, so support and query never
    share a video.

    Args:
        labels: class index per dataset item (``VideoDataset.labels``).
        way, shot, query: N, K, Q.
        episodes: number of episodes in one pass (over all ranks).
        seed: random seed; same seed (and epoch) -> same episodes.
        rank, world_size: this process takes episodes ``rank, rank + world_size, ...`` (DDP).
    """

    def __init__(self, labels: Sequence[int], way: int, shot: int, query: int, episodes: int, seed: int = 0,
                 *, rank: int = 0, world_size: int = 1) -> None:
        if way < 1 or shot < 1 or query < 1 or episodes < 1:
            raise ValueError(f"way, shot, query and episodes must be >= 1, got way={way}, shot={shot}, "
                             f"query={query}, episodes={episodes}")
        _check_rank(rank, world_size)
        labels_array = np.asarray(labels, dtype=np.int64)
        by_class: dict[int, np.ndarray] = {}
        for label in np.unique(labels_array):
            by_class[int(label)] = np.flatnonzero(labels_array == label)
        self.eligible = [c for c, idx in sorted(by_class.items()) if len(idx) >= shot + query]
        if len(self.eligible) < way:
            raise ValueError(
                f"a {way}-way episode needs {way} classes with at least {shot + query} videos "
                f"(shot {shot} + query {query}); only {len(self.eligible)} of {len(by_class)} classes have that many")
        self._by_class = by_class
        self.way, self.shot, self.query, self.episodes = way, shot, query, episodes
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use a different (still seeded) set of episodes for this epoch."""
        self.epoch = int(epoch)

    def episode(self, index: int) -> tuple[list[int], list[int]]:
        """Episode ``index`` as (indices [N*K support + N*Q query], class_ids [N])."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        class_ids = rng.choice(self.eligible, size=self.way, replace=False)
        support, query = [], []
        for class_id in class_ids:
            picks = rng.choice(self._by_class[int(class_id)], size=self.shot + self.query, replace=False)
            support.extend(int(i) for i in picks[: self.shot])
            query.extend(int(i) for i in picks[self.shot:])
        return support + query, [int(c) for c in class_ids]

    def __iter__(self) -> Iterator[list[int]]:
        for index in range(self.rank, self.episodes, self.world_size):
            yield self.episode(index)[0]

    def __len__(self) -> int:
        return len(range(self.rank, self.episodes, self.world_size))


class EpisodeCollate:
    """Turns the items of one episode (as ordered by ``EpisodeSampler``) into a dict.

    Given a list of (frames uint8 [T,S,S,3], label) of length N*K + N*Q, returns::

        support_frames  uint8 [N*K, T, S, S, 3]
        support_labels  int64 [N*K]   episode classes 0..N-1, class by class
        query_frames    uint8 [N*Q, T, S, S, 3]
        query_labels    int64 [N*Q]   episode classes 0..N-1
        class_ids       int64 [N]     dataset class index of each episode class
        label_texts     list[str] [N] label text of each episode class

    ``way`` and ``shot`` must match the sampler's; the number of queries is what follows the support.
    """

    def __init__(self, label_texts: Sequence[str], way: int, shot: int) -> None:
        if way < 1 or shot < 1:
            raise ValueError(f"way and shot must be >= 1, got way={way}, shot={shot}")
        self.label_texts = list(label_texts)
        self.way, self.shot = int(way), int(shot)

    def __call__(self, batch: Sequence[tuple[torch.Tensor, int]]) -> dict:
        labels = [int(label) for _, label in batch]
        n_support = self.way * self.shot
        if len(labels) <= n_support:
            raise ValueError(f"an episode of {self.way}-way {self.shot}-shot needs more than {n_support} items "
                             f"(support then queries), got {len(labels)}")
        class_ids = labels[:n_support:self.shot]
        groups_ok = all(labels[i * self.shot:(i + 1) * self.shot] == [c] * self.shot for i, c in enumerate(class_ids))
        if not groups_ok or len(set(class_ids)) != self.way:
            raise ValueError(f"episode support items must come in {self.way} groups of {self.shot} items of one "
                             f"class each, got labels {labels[:n_support]}")
        position = {c: i for i, c in enumerate(class_ids)}
        query_labels = labels[n_support:]
        if any(label not in position for label in query_labels):
            raise ValueError(f"episode queries must belong to the support classes {class_ids}, got {query_labels}")
        frames = torch.stack([f if isinstance(f, torch.Tensor) else torch.as_tensor(f) for f, _ in batch])
        return {
            "support_frames": frames[:n_support],
            "support_labels": torch.tensor([position[c] for c in labels[:n_support]], dtype=torch.long),
            "query_frames": frames[n_support:],
            "query_labels": torch.tensor([position[c] for c in query_labels], dtype=torch.long),
            "class_ids": torch.tensor(class_ids, dtype=torch.long),
            "label_texts": [self.label_texts[c] for c in class_ids],
        }


class SupervisedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of dataset indices for supervised (multi-task) training.

    Each epoch is a seeded permutation of all items (``set_epoch`` to change it), split into
    batches of ``batch_size``; with DDP each rank takes every ``world_size``-th batch (all ranks get
    the same number of batches). ``drop_last`` drops a final short batch.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int = 0, drop_last: bool = True, *,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_rank(rank, world_size)
        self.num_items = len(labels)
        if self.num_items == 0:
            raise ValueError("no items to sample from")
        self.batch_size, self.seed, self.drop_last = int(batch_size), int(seed), bool(drop_last)
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _num_batches(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size].tolist() for i in range(self._num_batches())]
        per_rank = len(batches) // self.world_size
        yield from batches[self.rank::self.world_size][:per_rank]

    def __len__(self) -> int:
        return self._num_batches() // self.world_size


def collate_supervised(batch: Sequence[tuple[torch.Tensor, int]]) -> dict:
    """Items -> dict(frames uint8 [B, T, S, S, 3], labels int64 [B])."""
    return {
        "frames": torch.stack([f if isinstance(f, torch.Tensor) else torch.as_tensor(f) for f, _ in batch]),
        "labels": torch.tensor([int(label) for _, label in batch], dtype=torch.long),
    }


def episode_loader(dataset: Dataset, way: int, shot: int, query: int, episodes: int, seed: int = 0, *,
                   num_workers: int = 0, rank: int = 0, world_size: int = 1, **loader_kwargs) -> DataLoader:
    """A DataLoader yielding episode dicts (see ``EpisodeCollate``) from a ``VideoDataset``.

    The sampler is ``loader.batch_sampler`` (call ``set_epoch`` on it between passes).
    """
    sampler = EpisodeSampler(dataset.labels, way, shot, query, episodes, seed, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=EpisodeCollate(dataset.label_texts, way, shot),
                      num_workers=num_workers, persistent_workers=False, **loader_kwargs)


def supervised_loader(dataset: Dataset, batch_size: int, seed: int = 0, *, drop_last: bool = True,
                      num_workers: int = 0, rank: int = 0, world_size: int = 1, **loader_kwargs) -> DataLoader:
    """A DataLoader yielding dict(frames [B,T,S,S,3], labels [B]) in seeded shuffled batches."""
    sampler = SupervisedBatchSampler(dataset.labels, batch_size, seed, drop_last, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_supervised, num_workers=num_workers,
                      **loader_kwargs)
