"""MPerClassBatchSampler: m per class in every batch, disjoint shards across ranks, clear errors."""

from collections import Counter

import numpy as np
import pytest

from metricsearch.data.samplers import MPerClassBatchSampler, RandomBatchSampler, SamplerConfigError


def _labels(sizes):
    return np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])


@pytest.mark.parametrize("m,batch_size", [(4, 32), (2, 8), (5, 25)])
def test_every_batch_has_m_images_of_each_class(m, batch_size):
    labels = _labels(np.random.default_rng(0).integers(m, 30, size=20))
    sampler = MPerClassBatchSampler(labels, batch_size=batch_size, m=m, seed=1, rank=0, world_size=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // batch_size
    for batch in batches:
        assert len(batch) == batch_size
        assert len(set(batch)) == batch_size, "an image repeated within a batch without replacement"
        counts = Counter(labels[batch].tolist())
        assert set(counts.values()) == {m}
        assert len(counts) == batch_size // m


def test_epochs_differ_and_are_reproducible():
    labels = _labels([10] * 12)
    a = MPerClassBatchSampler(labels, 16, m=4, seed=3, rank=0, world_size=1)
    b = MPerClassBatchSampler(labels, 16, m=4, seed=3, rank=0, world_size=1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first


def test_ranks_draw_disjoint_batches_with_m_per_class():
    labels = _labels([12] * 16)
    shards = [list(MPerClassBatchSampler(labels, 16, m=4, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(labels) // 32
    assert not {tuple(b) for b in shards[0]} & {tuple(b) for b in shards[1]}
    for batch in shards[0] + shards[1]:
        assert set(Counter(labels[batch].tolist()).values()) == {4}


def test_batch_not_divisible_by_m_names_both_numbers():
    with pytest.raises(SamplerConfigError, match=r"batch_size=30 is not divisible by sampler.m=4"):
        MPerClassBatchSampler(_labels([10] * 10), batch_size=30, m=4)


def test_m_larger_than_smallest_class_without_replacement():
    labels = _labels([10, 10, 3, 10, 10])
    with pytest.raises(SamplerConfigError, match=r"sampler.m=4 is larger than the smallest training class \(3 images"):
        MPerClassBatchSampler(labels, batch_size=8, m=4)
    # With replacement the small class is repeated and batches still hold m per class.
    sampler = MPerClassBatchSampler(labels, batch_size=8, m=4, replacement=True, rank=0, world_size=1)
    for batch in sampler:
        assert set(Counter(labels[batch].tolist()).values()) == {4}


def test_too_few_classes_for_a_batch():
    with pytest.raises(SamplerConfigError, match="needs 8 classes per batch, but the training split has only 3"):
        MPerClassBatchSampler(_labels([10, 10, 10]), batch_size=32, m=4)


def test_random_sampler_partitions_the_data_across_ranks():
    labels = _labels([5] * 8)
    shards = [list(RandomBatchSampler(labels, 4, seed=0, rank=r, world_size=2)) for r in range(2)]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert len(seen) == len(set(seen)) == 40
