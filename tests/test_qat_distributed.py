"""QAT under DistributedDataParallel: two CPU processes with the gloo backend train a few steps on
disjoint shards of the data and must end with identical weights, scales, BN statistics and
oscillation statistics."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import yoloq
        from yoloq.models.tiny import tiny_yolo
        from yoloq.tools.qat import QATConfig, distributed, train_qat
        from yoloq.tools.train_data import TrainDataset

        assert distributed() == (rank, WORLD)
        calib = [images for images, _, _ in TrainDataset(data, 64, augment=False).batches(4, shuffle=False, workers=0)]
        qm = yoloq.prepare_qat(tiny_yolo(), "w4a4", calib=calib)
        config = QATConfig(batch=2, imgsz=64, lr=1e-3, scale_lr=1e-3, workers=0, max_steps=3)
        result = train_qat(qm, data, config, progress=False)
        torch.save({"state": qm.graph_module.state_dict(), "losses": result.losses,
                    "frequency": result.hook.tracker.frequency}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_end_identical(toy_dataset, tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(toy_dataset), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0.keys() == state1.keys()
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    assert any(k.endswith("running_mean") for k in state0) and any(k.endswith("scale") for k in state0)
    assert ranks[0]["frequency"].keys() == ranks[1]["frequency"].keys() and ranks[0]["frequency"]
    for key in ranks[0]["frequency"]:
        assert torch.equal(ranks[0]["frequency"][key], ranks[1]["frequency"][key])
    # the ranks saw different shards, so their losses differ while their weights agree
    assert ranks[0]["losses"] != ranks[1]["losses"]
