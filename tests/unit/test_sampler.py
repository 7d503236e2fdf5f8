"""NegativeSampler invariants (exact keys and Bloom filter): never a positive, right shape and range, deterministic
with a generator, always ends; the Bloom filter has no false negatives and its design false-positive rate."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ncf_ray.data.sampler import BloomFilter, NegativeSampler, bloom_from_parquet, pair_keys
from ncf_ray.errors import UserError


def _positives(n_users: int = 50, n_items: int = 40, per_user: int = 25, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    users = torch.arange(n_users).repeat_interleave(per_user)
    items = torch.stack([torch.randperm(n_items, generator=g)[:per_user] for _ in range(n_users)]).flatten()
    return users, items


def test_negatives_are_never_positives_and_in_range():
    users, items = _positives()
    s = NegativeSampler(users, items, n_items=40)
    batch = torch.arange(50).repeat(20)
    neg = s.sample(batch, n=8, generator=torch.Generator().manual_seed(1))
    assert neg.shape == (1000, 8) and neg.dtype == torch.long
    assert int(neg.min()) >= 0 and int(neg.max()) < 40
    assert not s.is_positive(batch[:, None].expand(-1, 8), neg).any()
    # Cross-check the exclusion against a plain set.
    pos = set(zip(users.tolist(), items.tolist()))
    assert not any((u, i) in pos for u, row in zip(batch.tolist(), neg.tolist()) for i in row)


def test_excluded_items_are_never_sampled():
    users, items = _positives(n_users=10, n_items=30, per_user=10)
    held_users, held_items = torch.arange(10), torch.full((10,), 0)
    s = NegativeSampler(users, items, 30, exclude_users=held_users, exclude_items=held_items)
    neg = s.sample(torch.arange(10).repeat(50), 5, generator=torch.Generator().manual_seed(0))
    assert not (neg == 0).any()


def test_one_free_item_is_always_the_draw():
    n_items = 50
    users = torch.zeros(n_items - 1, dtype=torch.long)
    items = torch.tensor([i for i in range(n_items) if i != 17])
    neg = NegativeSampler(users, items, n_items).sample(torch.zeros(4, dtype=torch.long), 3)
    assert (neg == 17).all()


def test_uniform_over_free_items():
    users = torch.zeros(5, dtype=torch.long)
    items = torch.arange(5)
    neg = NegativeSampler(users, items, 10).sample(torch.zeros(20000, dtype=torch.long), 1,
                                                   generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(neg.flatten(), minlength=10).float()
    assert (counts[:5] == 0).all()
    assert torch.allclose(counts[5:] / counts.sum(), torch.full((5,), 0.2), atol=0.02)


def test_seeded_generator_is_deterministic():
    users, items = _positives()
    s = NegativeSampler(users, items, 40)
    a = s.sample(torch.arange(50), 4, generator=torch.Generator().manual_seed(3))
    b = s.sample(torch.arange(50), 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_user_with_every_item_is_refused():
    users = torch.zeros(6, dtype=torch.long)
    with pytest.raises(UserError, match="every one of the 6 items"):
        NegativeSampler(users, torch.arange(6), 6)


def test_is_positive():
    s = NegativeSampler(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0]), 4)
    got = s.is_positive(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([1, 3, 0, 1, 0]))
    assert got.tolist() == [True, False, True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_input_device():
    users, items = _positives()
    s = NegativeSampler(users.cuda(), items.cuda(), 40)
    neg = s.sample(torch.arange(50, device="cuda"), 4)
    assert neg.is_cuda
    assert not s.is_positive(torch.arange(50, device="cuda")[:, None].expand(-1, 4), neg).any()
    bloom = BloomFilter.for_keys(users.numel())
    bloom.add(pair_keys(users, items, 40))
    on_gpu = NegativeSampler.from_filter(bloom.to("cuda"), 40)
    neg = on_gpu.sample(torch.arange(50, device="cuda"), 4, generator=torch.Generator("cuda").manual_seed(0))
    assert neg.is_cuda
    assert not s.is_positive(torch.arange(50, device="cuda")[:, None].expand(-1, 4), neg).any()  # exact check
    assert torch.equal(bloom.to("cuda").contains(pair_keys(users, items, 40).cuda()).cpu(),
                       bloom.contains(pair_keys(users, items, 40)))  # same hashes on both devices


# ------------------------------------------------------------------------------------------- Bloom filter
def _random_keys(n: int, seed: int, lo: int = 0, hi: int = 2**40) -> torch.Tensor:
    return torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(seed))


def test_bloom_has_no_false_negatives():
    keys = _random_keys(20_000, seed=1)
    bloom = BloomFilter.for_keys(keys.numel())
    bloom.add(keys[:7_000])  # added in pieces, as bloom_from_parquet adds record batches
    bloom.add(keys[7_000:])
    assert bloom.contains(keys).all()
    assert bloom.n_keys == 20_000 and bloom.nbytes == 25_000  # 10 bits per key


def test_bloom_false_positive_rate_is_near_the_design_rate():
    bloom = BloomFilter.for_keys(20_000, bits_per_key=10)
    bloom.add(_random_keys(20_000, seed=2, hi=2**40))
    absent = _random_keys(100_000, seed=3, lo=2**41, hi=2**42)  # disjoint from the added range
    rate = float(bloom.contains(absent).float().mean())
    design = bloom.expected_fp_rate()
    assert 0.005 < design < 0.012
    assert 0.5 * design < rate < 1.5 * design  # 100k trials: sd of the rate ~ 0.03%


def test_bloom_survives_pickling_as_ray_put_does():
    keys = _random_keys(1_000, seed=4)
    bloom = BloomFilter.for_keys(1_000)
    bloom.add(keys)
    back = pickle.loads(pickle.dumps(bloom, protocol=5))
    assert torch.equal(back.bits, bloom.bits) and back.n_keys == 1_000 and back.n_hashes == bloom.n_hashes
    assert back.contains(keys).all()


def test_bloom_sampler_never_draws_a_positive():
    users, items = _positives()  # 25 of 40 items per user: many redraw rounds
    bloom = BloomFilter.for_keys(users.numel())
    bloom.add(pair_keys(users, items, 40))
    s = NegativeSampler.from_filter(bloom, n_items=40)
    batch = torch.arange(50).repeat(40)
    neg = s.sample(batch, n=8, generator=torch.Generator().manual_seed(1))
    assert neg.shape == (2000, 8) and int(neg.min()) >= 0 and int(neg.max()) < 40
    pos = set(zip(users.tolist(), items.tolist()))
    assert not any((u, i) in pos for u, row in zip(batch.tolist(), neg.tolist()) for i in row)


def test_sampler_ends_when_a_user_has_one_free_item_left():
    # 1 free item in 200: rejection alone would need ~200 rounds per entry; the catalogue scan ends it.
    n_items = 200
    users = torch.zeros(n_items - 1, dtype=torch.long)
    items = torch.tensor([i for i in range(n_items) if i != 123])
    bloom = BloomFilter.for_keys(users.numel(), bits_per_key=40)  # few enough false positives to keep item 123
    bloom.add(pair_keys(users, items, n_items))
    assert not bool(bloom.contains(pair_keys(torch.tensor(0), torch.tensor(123), n_items)))
    for s in (NegativeSampler(users, items, n_items), NegativeSampler.from_filter(bloom, n_items)):
        neg = s.sample(torch.zeros(30, dtype=torch.long), 4, generator=torch.Generator().manual_seed(0))
        assert (neg == 123).all()


def test_saturated_filter_is_a_user_error_not_a_hang():
    bloom = BloomFilter.for_keys(1_000, bits_per_key=0.1)  # 64 bits: every bit set below, every key "present"
    bloom.add(_random_keys(1_000, seed=5))
    assert int(bloom.bits.min()) == 255
    with pytest.raises(UserError, match="user index 3: every one of the 10 items"):
        NegativeSampler.from_filter(bloom, 10).sample(torch.tensor([3]), 2)


def test_bloom_from_parquet_reads_record_batches(tmp_path):
    users, items = _positives(n_users=30, n_items=40, per_user=10)
    files = []
    for k, (u, i) in enumerate(zip(users.chunk(3), items.chunk(3))):
        files.append(tmp_path / f"part-{k}.parquet")
        pq.write_table(pa.table({"u": u.int().numpy(), "i": i.int().numpy()}), files[-1])
    bloom = bloom_from_parquet(files, "u", "i", n_items=40, batch_rows=7)  # batches smaller than a file
    assert bloom.n_keys == users.numel()
    assert bloom.contains(pair_keys(users, items, 40)).all()


# ------------------------------------------------------------------------------------------- stream worker inputs
def _dataset_dir(tmp_path):
    """A small prepared dataset dir (the prepare stage's writer, without Ray)."""
    from ncf_ray.config import DataConfig
    from ncf_ray.data import schema as S
    from ncf_ray.data.prepare import RawLog, build_loo, write_dataset
    from ncf_ray.data.synthetic import SyntheticSpec, iter_synthetic

    t = pa.concat_tables(iter_synthetic(SyntheticSpec(users=60, items=40, interactions=1000, seed=2)))
    built = build_loo(RawLog(t["user_id"].to_numpy(), t["item_id"].to_numpy(), t["timestamp"].to_numpy(),
                             rows=t.num_rows), DataConfig(eval_negatives=10, seed=1))
    d = tmp_path / "ds"
    d.mkdir()
    write_dataset(built, d, shards=3)
    (d / S.META_FILE).write_text(json.dumps({"n_users": int(built.user_ids.size),
                                             "n_items": int(built.item_ids.size)}))
    return d, built.split


def test_stream_worker_inputs_never_read_the_train_positives(tmp_path):
    from ncf_ray.train import build_exclusion, stream_inputs, train_files

    d, split = _dataset_dir(tmp_path)
    bloom = build_exclusion(str(d))  # the driver's job, before the workers start
    assert bloom.n_keys == split.train_users.size and len(train_files(str(d))) == 3
    for f in train_files(str(d)):  # any read of the train shards by the worker would now fail
        f.write_bytes(b"not parquet")
    data, sampler = stream_inputs(str(d), pickle.loads(pickle.dumps(bloom)), torch.device("cpu"))
    assert data.train_users.size == 0 and data.train_items.size == 0
    assert data.valid_neg.shape == (data.n_users, 10)
    users = torch.arange(data.n_users).repeat(20)
    neg = sampler.sample(users, 4, generator=torch.Generator().manual_seed(0))
    pos = set(zip(split.train_users.tolist(), split.train_items.tolist()))
    assert not any((u, i) in pos for u, row in zip(users.tolist(), neg.tolist()) for i in row)


def test_stream_refuses_what_it_cannot_train():
    from ncf_ray.config import ModelConfig, TrainConfig
    from ncf_ray.train import check_streamable

    check_streamable(TrainConfig(stream=True))  # neumf streams
    with pytest.raises(UserError, match="--stream cannot train --model seq"):
        check_streamable(TrainConfig(stream=True, model=ModelConfig(name="seq")))
    with pytest.raises(UserError, match="--stream cannot --refit"):
        check_streamable(TrainConfig(stream=True), refit=True)


def test_pool_limits_negatives_to_the_items_the_log_shows():
    # Items 5..9 have no training positives (released later): a pool of 0..4 never draws them.
    users = torch.tensor([0, 0, 1, 2])
    items = torch.tensor([0, 1, 2, 3])
    sampler = NegativeSampler(users, items, 10, pool=torch.tensor([0, 1, 2, 3, 4]))
    neg = sampler.sample(torch.tensor([0, 1, 2] * 50), 4, generator=torch.Generator().manual_seed(0))
    assert int(neg.max()) <= 4
    assert not bool(sampler.is_positive(torch.tensor([0, 1, 2] * 50)[:, None], neg).any())
