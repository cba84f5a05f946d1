"""CUDA graphs of the fused forward (``use_cuda_graphs``): replays give the plain launches' bits, follow weight
updates, never alias, and step aside where a graph cannot run. The replay tests need a GPU; the rest run anywhere."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from fastunet import FastUNet, UNet
from fastunet.graphs import GraphCache

SMALL = {"in_channels": 3, "num_classes": 2, "base_channels": 8, "depth": 2, "upsample": "bilinear", "norm": "batch"}


def _pair(device, dtype=torch.float32):
    """Two fused models over one reference's tensors: one replaying graphs, one launching plainly."""
    torch.manual_seed(0)
    reference = UNet(**SMALL).eval()
    plain = FastUNet.from_reference(reference).to(device, dtype).eval()
    graphed = FastUNet.from_reference(reference).to(device, dtype).eval().use_cuda_graphs()
    return plain, graphed


def test_api_checks_its_arguments():
    model = FastUNet(**SMALL)
    assert model.use_cuda_graphs() is model and isinstance(model._graphs, GraphCache)
    assert model.use_cuda_graphs(False)._graphs is None
    with pytest.raises(TypeError, match="enabled must be a bool"):
        model.use_cuda_graphs("yes")
    with pytest.raises(ValueError, match="limit must be an int >= 1, got 0"):
        model.use_cuda_graphs(limit=0)


def test_copies_carry_an_empty_cache_with_the_same_limit():
    model = FastUNet(**SMALL).use_cuda_graphs(limit=3)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(clone._graphs, GraphCache) and clone._graphs.limit == 3 and len(clone._graphs) == 0


def test_cpu_forwards_launch_plainly(device):
    if device.type != "cpu":
        pytest.skip("the CPU path")
    plain, graphed = _pair(device)
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        for _ in range(3):
            out = graphed(x)
    assert graphed._graphs.captures == 0 and graphed._graphs.replays == 0
    assert torch.equal(out, plain(x)) and "CUDA graph" not in graphed.last_backend_reason


@pytest.mark.gpu
def test_replays_match_plain_launches_bit_for_bit():
    plain, graphed = _pair(torch.device("cuda"), torch.bfloat16)
    outs = []
    with torch.no_grad():
        for i in range(4):
            x = torch.randn(1, 3, 32, 48, device="cuda", dtype=torch.bfloat16)
            out = graphed(x)
            assert torch.equal(out, plain(x)), f"forward {i}"
            outs.append(out)
    assert graphed._graphs.captures == 1 and graphed._graphs.replays == 3
    assert "CUDA graph replay" in graphed.last_backend_reason
    assert len({o.data_ptr() for o in outs}) == len(outs), "replays must return fresh tensors"


@pytest.mark.gpu
def test_weight_updates_reach_the_replays():
    plain, graphed = _pair(torch.device("cuda"))
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        graphed(x), graphed(x)  # plain, then captured
        for p in graphed.parameters():  # shared with plain's
            p.mul_(1.5)
        assert torch.equal(graphed(x), plain(x))
    assert graphed._graphs.captures == 1


@pytest.mark.gpu
def test_each_signature_gets_its_graph_and_the_limit_holds():
    plain, graphed = _pair(torch.device("cuda"))
    graphed.use_cuda_graphs(limit=1)
    shapes = [(1, 3, 16, 16), (2, 3, 16, 24), (1, 3, 16, 16)]
    with torch.no_grad():
        for _ in range(2):
            for shape in shapes:
                x = torch.randn(shape, device="cuda")
                assert torch.equal(graphed(x), plain(x)), shape
    assert len(graphed._graphs) == 1


@pytest.mark.gpu
def test_graphs_step_aside_for_gradients_and_other_captures():
    plain, graphed = _pair(torch.device("cuda"))
    x = torch.randn(1, 3, 16, 16, device="cuda", requires_grad=True)
    for _ in range(3):
        graphed(x).sum().backward()
    assert graphed._graphs.captures == 0
    with torch.no_grad():
        y = torch.randn(1, 3, 16, 16, device="cuda")
        graphed(y), graphed(y)
        captures = graphed._graphs.captures
        outer = torch.cuda.CUDAGraph()
        with torch.cuda.graph(outer):
            static = graphed(y)  # plain launches, recorded by the caller's graph
        outer.replay()
        torch.cuda.synchronize()
        assert graphed._graphs.captures == captures
        assert torch.equal(static, plain(y))
