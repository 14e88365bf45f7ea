"""CUDA: the kernel lives on the model's device and matches the CPU result (skipped without a GPU)."""

import pytest
import torch

import ntk_torch as ntk

from zoo import make_zoo

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "auto"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "transformer", "dict_in_out"])
def test_cuda_kernel_matches_cpu(name, mode, method):
    case = make_zoo()[name]
    x1, x2 = case.make_inputs(5, 0), case.make_inputs(3, 1)
    common = dict(mode=mode, method=method, output_fn=case.output_fn, dtype=torch.float64)
    on_cpu = ntk.empirical_ntk(case.model, x1, x2, **common)
    model = case.model.cuda()
    on_gpu = ntk.empirical_ntk(model, x1, x2, **common)  # CPU inputs move to the model's device
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-10, atol=1e-12)
    symmetric = ntk.empirical_ntk(model, x1, mode=mode, method=method, output_fn=case.output_fn, batch_size=2)
    transposed = symmetric.permute(1, 0, 3, 2) if mode == "full" else symmetric.transpose(0, 1)
    assert torch.equal(symmetric, transposed)


def test_cuda_rng_state_is_untouched():
    case = make_zoo()["cnn_bn"]
    model = case.model.cuda().train()
    x = case.make_inputs(4, 0).cuda()
    before = torch.cuda.get_rng_state()
    ntk.empirical_ntk(model, x)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert model.training


def test_default_memory_budget_reads_free_cuda_memory():
    from ntk_torch.kernel.cost import default_memory_budget

    free, _ = torch.cuda.mem_get_info()
    assert 0 < default_memory_budget(torch.device("cuda")) <= free
