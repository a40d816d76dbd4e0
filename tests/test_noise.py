import torch

from pipeline.zo.noise import BLOCK, gaussian
from pipeline.zo.seeds import mix, name_key, splitmix64, step_seed


def test_any_slice_equals_the_slice_of_the_whole():
    total = 2 * BLOCK + 12345
    whole = gaussian(7, 11, 0, total)
    gen = torch.Generator().manual_seed(0)
    cuts = [(0, 1), (BLOCK - 3, 7), (BLOCK, BLOCK), (total - 5, 5), (0, total)]
    for _ in range(20):
        a = int(torch.randint(0, total - 1, (1,), generator=gen))
        n = int(torch.randint(1, total - a + 1, (1,), generator=gen))
        cuts.append((a, n))
    for a, n in cuts:
        assert torch.equal(gaussian(7, 11, a, n, total), whole[a : a + n]), (a, n)


def test_shards_of_any_world_size_rebuild_the_whole():
    total = BLOCK + 999
    whole = gaussian(3, 5, 0, total)
    for world in (2, 3, 7):
        size = -(-total // world)
        parts = [gaussian(3, 5, r * size, min(size, total - r * size), total) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)


def test_noise_depends_on_seed_and_key_and_is_standard_normal():
    a = gaussian(1, 2, 0, 200_000)
    assert not torch.equal(a, gaussian(2, 2, 0, 200_000))
    assert not torch.equal(a, gaussian(1, 3, 0, 200_000))
    assert torch.equal(a, gaussian(1, 2, 0, 200_000))
    assert abs(a.mean().item()) < 0.01
    assert abs(a.std().item() - 1) < 0.01


def test_splitmix64_reference_value():
    # First output of SplitMix64 from state 0 (Steele, Lea, Flood 2014; Vigna's reference code).
    assert splitmix64(0) == 0xE220A8397B1DCDAF


def test_seeds_are_pure_functions_of_run_seed_and_step():
    assert step_seed(0, 5) == step_seed(0, 5)
    seeds = {step_seed(r, s, d) for r in range(3) for s in range(100) for d in range(3)}
    assert len(seeds) == 900
    assert all(0 <= s < 2**63 for s in seeds)
    assert mix(1, 2) != mix(2, 1)
    assert name_key("model.layers.0.mlp.up_proj.weight") == name_key(
        "model.layers.0.mlp.up_proj.weight"
    )
