import pytest
import torch
import torch.fx as fx

import yoloq
from yoloq.pipeline import PassError, PassResult, build_pipeline, run_pipeline


def _gm():
    return fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU()))


def noop(gm):
    return PassResult(gm, False, {"seen": len(gm.graph.nodes)})


def broken(gm):
    raise ValueError("boom")


class Needy:
    name = "needy"

    def requires(self, gm):
        return "needs a BatchNorm2d"

    def __call__(self, gm):
        return PassResult(gm, False)


class Liar:
    name = "liar"

    def ensures(self, gm):
        return "graph still has a ReLU"

    def __call__(self, gm):
        return PassResult(gm, False)


def test_runner_records_every_pass_and_calls_back():
    seen = []
    gm, records = run_pipeline(_gm(), (noop, noop), callback=lambda name, result, s: seen.append((name, result.stats)))
    assert [r.name for r in records] == ["noop", "noop"]
    assert all(r.seconds >= 0 and r.modified is False for r in records)
    assert seen == [("noop", {"seen": 4}), ("noop", {"seen": 4})]


def test_failure_names_the_pass_and_the_passes_before_it():
    with pytest.raises(PassError, match=r"broken failed after \[noop, noop\]: ValueError: boom"):
        run_pipeline(_gm(), (noop, noop, broken))


def test_requires_and_ensures_are_checked():
    with pytest.raises(PassError, match=r"needy failed after \[noop\]: requirement not met: needs a BatchNorm2d"):
        run_pipeline(_gm(), (noop, Needy()))
    with pytest.raises(PassError, match=r"liar failed after \[\]: guarantee broken: graph still has a ReLU"):
        run_pipeline(_gm(), (Liar(),))


def test_a_pass_must_return_a_pass_result():
    with pytest.raises(PassError, match=r"<lambda> failed after \[\]: returned \w+, not PassResult"):
        run_pipeline(_gm(), (lambda gm: gm,))


def test_build_pipeline_is_the_one_place_that_orders_passes():
    assert build_pipeline("captured") == ()
    assert build_pipeline("fused") == (yoloq.fold_implicit, yoloq.fold_conv_bn, yoloq.fuse_conv_act)
    assert isinstance(build_pipeline(), tuple)
    with pytest.raises(ValueError, match="unknown pipeline stage 'fuzed'.*valid stages"):
        build_pipeline("fuzed")
