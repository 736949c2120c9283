"""Bias correction kernels: streamed channel means merge exactly; the predicted shift matches the measured one."""

from __future__ import annotations

import numpy as np

from onnxopt.kernels.bias_correction import ChannelMeanObserver, mean_output_shift


def test_channel_means_stream_and_merge_across_widths():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 3, 4, w)) + np.arange(3).reshape(1, 3, 1, 1) for w in (5, 9, 2)]
    whole = ChannelMeanObserver(1)
    for x in xs:
        whole.update(x)
    parts = ChannelMeanObserver(1).update(xs[0]).merge(ChannelMeanObserver(1).update(xs[1]).update(xs[2]))
    expected = np.concatenate([x.transpose(1, 0, 2, 3).reshape(3, -1) for x in xs], axis=1).mean(axis=1)
    np.testing.assert_allclose(whole.mean, expected)
    np.testing.assert_allclose(parts.mean, expected)
    np.testing.assert_allclose(ChannelMeanObserver.from_dict(whole.to_dict()).mean, expected)


def test_predicted_shift_matches_the_measured_mean_error():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 6)) + 3.0
    w = rng.standard_normal((6, 4))
    w_dq = np.round(w * 8) / 8
    measured = (x @ w_dq - x @ w).mean(axis=0)
    np.testing.assert_allclose(mean_output_shift(w, w_dq, x.mean(axis=0), "matmul"), measured, atol=1e-9)
    np.testing.assert_allclose(mean_output_shift(w.T, w_dq.T, x.mean(axis=0), "gemm_t"), measured, atol=1e-9)
    dense = mean_output_shift(w.T.reshape(4, 6, 1, 1), w_dq.T.reshape(4, 6, 1, 1), x.mean(axis=0), "conv")
    np.testing.assert_allclose(dense, measured, atol=1e-9)
    gw, gdq = w.T[:, :3].reshape(4, 3, 1, 1), w_dq.T[:, :3].reshape(4, 3, 1, 1)  # group 2: outputs 0-1 read
    err = (gdq - gw)[:, :, 0, 0]  # channels 0-2, 2-3 read 3-5
    grouped_measured = np.concatenate([(x[:, :3] @ err[:2].T).mean(0), (x[:, 3:] @ err[2:].T).mean(0)])
    np.testing.assert_allclose(mean_output_shift(gw, gdq, x.mean(axis=0), "conv", group=2), grouped_measured, atol=1e-9)
