"""LSTM with proj_size (weight_hr_l{k}): outputs, final states and every gradient against
torch.nn and the float64 reference, padded and packed."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfast
from helpers import assert_close_to_ref, compare_all, make_pair, run_three

C, H, P, T, N = 5, 7, 3, 6, 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layers,bidir", [(1, False), (1, True), (2, False), (2, True)],
                         ids=["L1", "L1-bi", "L2", "L2-bi"])
def test_projected_lstm_matches_torch_and_reference(layers, bidir, bias, given_hx, dtype):
    m, f, m64 = make_pair("lstm", C, H, dtype=dtype, num_layers=layers, bidirectional=bidir,
                          bias=bias, proj_size=P)
    assert list(f.state_dict()) == list(m.state_dict())
    assert any(k.startswith("weight_hr") for k in f.state_dict())
    D = 2 if bidir else 1
    torch.manual_seed(1)
    x = torch.randn(T, N, C).to(dtype)
    hx = (torch.randn(layers * D, N, P).to(dtype), torch.randn(layers * D, N, H).to(dtype)) if given_hx else None
    upstream = [torch.randn(T, N, D * P), torch.randn(layers * D, N, P), torch.randn(layers * D, N, H)]
    compare_all(*run_three("lstm", x, hx, m, f, m64, upstream))


def test_projected_lstm_batch_first_unbatched_and_edge_lengths():
    m, f, m64 = make_pair("lstm", C, H, num_layers=2, bidirectional=True, batch_first=True, proj_size=P)
    for x in (torch.randn(N, T, C), torch.randn(T, C), torch.randn(N, 1, C)):
        out_m, (h_m, c_m) = m(x)
        out_f, (h_f, c_f) = f(x)
        assert out_f.shape == out_m.shape and h_f.shape == h_m.shape and c_f.shape == c_m.shape
        for a, b in ((out_f, out_m), (h_f, h_m), (c_f, c_m)):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_projected_lstm_packed():
    m, f, _ = make_pair("lstm", C, H, num_layers=2, bidirectional=True, proj_size=P, dtype=torch.float64)
    x = torch.randn(T, 5, C, dtype=torch.float64)
    lengths = [3, 6, 1, 6, 2]
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    h0 = (torch.randn(4, 5, P, dtype=torch.float64), torch.randn(4, 5, H, dtype=torch.float64))
    out_m, (h_m, c_m) = m(packed, h0)
    out_f, (h_f, c_f) = f(packed, h0)
    for a, b in ((out_f.data, out_m.data), (h_f, h_m), (c_f, c_m)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_projected_lstm_wrong_state_size_is_torchs_error():
    f = rnnfast.LSTM(C, H, proj_size=P)
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size"):
        f(torch.randn(T, N, C), (torch.zeros(1, N, H), torch.zeros(1, N, H)))
