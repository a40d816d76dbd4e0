"""The deterministic rank-order reduction of vectors, chunked so that traffic does not grow with
the world size: bitwise the all-gather-and-sum it replaces, on 2 and 3 gloo ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.parallel.comm_count import recording
from pipeline.parallel.distributed import GATHERED, DistributedBackend

SIZES = [1, GATHERED, GATHERED + 1, 1000, 4099]


def _vector(rank: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rank * 7 + n)
    return torch.randn(n, dtype=torch.float64, generator=gen)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    backend = DistributedBackend(torch.device("cpu"))
    results, calls = {}, {}
    for n in SIZES:
        with recording() as seen:
            results[n] = backend.all_reduce_mean(_vector(rank, n))
        calls[n] = seen
    # a column-major matrix (the range finder's thin products) keeps its layout, no copy made
    results["colmajor"] = backend.all_reduce_mean(_vector(rank, 4099 * 3).view(3, 4099).T)
    torch.save({"results": results, "calls": calls}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_vectors_reduce_bitwise_in_rank_order_with_traffic_of_about_2n(world, tmp_path):
    mp.spawn(_rank, args=(world, _port(), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for n in SIZES:
        want = _vector(0, n).clone()
        for r in range(1, world):
            want += _vector(r, n)  # the float64 sum in rank order, then the mean
        want /= world
        for got in ranks:
            assert torch.equal(got["results"][n], want), n
        ops = [(c["op"], c["numel"]) for c in ranks[0]["calls"][n]]
        if n <= GATHERED:  # scalars: one all-gather of this rank's values
            assert ops == [("all_gather", n)]
        else:  # each rank sends its vector once and its summed chunk once: ~n (1 + 1/W)
            chunk = -(-n // world)
            assert ops == [("all_to_all", chunk * world), ("all_gather", chunk)]
    want = sum(_vector(r, 4099 * 3).view(3, 4099).T for r in range(1, world)) + 0
    want = (_vector(0, 4099 * 3).view(3, 4099).T.clone() + want) / world
    for got in ranks:
        got = got["results"]["colmajor"]
        assert got.shape == (4099, 3) and got.T.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
