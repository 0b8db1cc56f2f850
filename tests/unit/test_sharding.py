import torch

from workers.data import sharding as sh


def test_global_batch_is_the_same_at_any_worker_count():
    perm = sh.epoch_permutation(1000, seed=3, epoch=2)
    for step in range(5):
        batch = sh.global_batch(perm, step, 64)
        for world in (1, 2, 4, 8):
            parts = [sh.rank_slice(batch, r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), batch)
            assert len({len(p) for p in parts}) == 1


def test_permutation_is_a_pure_function_of_seed_and_epoch():
    assert torch.equal(sh.epoch_permutation(500, 1, 3), sh.epoch_permutation(500, 1, 3))
    assert not torch.equal(sh.epoch_permutation(500, 1, 3), sh.epoch_permutation(500, 1, 4))
    assert not torch.equal(sh.epoch_permutation(500, 1, 3), sh.epoch_permutation(500, 2, 3))


def test_eval_slices_partition():
    for n in (10, 359, 1000):
        for world in (1, 2, 3, 7):
            idx = [i for r in range(world) for i in range(n)[sh.eval_slice(n, r, world)]]
            assert idx == list(range(n))


def test_split_is_fixed_and_disjoint():
    tr, va = sh.split_indices(1797, 0.2)
    tr2, va2 = sh.split_indices(1797, 0.2)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == 359 and len(set(tr.tolist()) & set(va.tolist())) == 0
    assert sh.steps_per_epoch(len(tr), 64) == 22
