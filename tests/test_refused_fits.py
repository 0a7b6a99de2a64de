"""Refused fits are reported, never silent (issue 21, "Bad input"): an anchored fit whose regression is not finite
falls back to the plain whitened truncation, the left-factor refit keeps the anchored target and is refused when not
finite, and the report marks and counts each refused fit."""

from __future__ import annotations

import pytest
import torch

from rankwise.compression import compress_
from rankwise.linalg import anchored_svd, whitened_svd
from rankwise.methods.svd_llm import SVDLLMConfig
from tests.test_records import paired
from tests.tiny_models import tiny_model, tiny_tokens


def test_a_non_finite_regression_falls_back_and_says_why():
    X, Xh, W = paired()
    C, cross = Xh @ Xh.T, X @ Xh.T
    for bad in (float("nan"), float("inf")):
        broken = cross.clone()
        broken[3, 5] = bad
        lr = anchored_svd(W, C, broken, 4)
        assert lr.anchored_fallback and lr.info["anchored_skipped"] == "not finite"
        assert all(bool(torch.isfinite(t).all()) for t in (lr.U, lr.S, lr.Vh))
        torch.testing.assert_close(lr.to_dense(), whitened_svd(W, C, 4).to_dense())
    # past float32's range (the regression is formed in float64, then cast): the same fallback
    huge = anchored_svd(W.float(), C, cross * 1e40, 4)
    assert huge.info["anchored_skipped"] == "not finite" and bool(torch.isfinite(huge.to_dense()).all())
    assert not anchored_svd(W, C, cross, 4).anchored_fallback


def test_the_ridge_path_of_the_anchored_fit_is_reported_as_a_whitening_fallback(monkeypatch):
    import importlib

    whiten_module = importlib.import_module("rankwise.linalg.whiten")  # the module: the package exports the function
    monkeypatch.setattr(whiten_module, "EIGH_MAX_N", 8)  # 24 inputs: the large-n path (ridge, then Cholesky)
    X, Xh, W = paired(tokens=10)  # singular: Cholesky fails until a ridge makes it positive definite
    lr = anchored_svd(W, Xh @ Xh.T, X @ Xh.T, 4)
    assert lr.info["anchored"] is True and lr.info["whitening"]["method"] == "ridge"
    assert lr.whitening_fallback


def test_the_refit_keeps_the_anchored_target():
    """With ``anchor`` a < 1 the left-factor refit solves for the anchored fit's target ``W (a X + (1 - a) Xh)``:
    the least-squares solution on the tokens themselves."""
    from rankwise.calibrate import LayerStats
    from rankwise.compression.layer import refit

    X, Xh, W = paired()
    stats = LayerStats(n=X.shape[0], xxt=Xh @ Xh.T, count=X.shape[1])
    stats.cross = X @ Xh.T
    lr = whitened_svd(W, stats.covariance, 5)
    for a in (1.0, 0.4):
        got = refit(W, lr, stats, a).to_dense()
        target = W @ (a * X + (1 - a) * Xh)
        U = torch.linalg.lstsq((lr.Vh @ Xh).T, target.T).solution.T  # (m, r)
        torch.testing.assert_close(got, U @ lr.Vh, atol=1e-8, rtol=1e-6)
    assert SVDLLMConfig(ratio=0.4, sequential=True, anchored=True, anchor=0.4).refit_anchor == 0.4
    assert SVDLLMConfig(ratio=0.4, sequential=True, update_u=True, anchor=0.4).refit_anchor == 1.0


def test_refused_fits_are_reported_per_layer_and_in_the_notes(monkeypatch):
    """A refused refit (singular system) and a refused anchored fit (a cross moment that is not finite) keep the
    plain factors, mark the layer, and the report's notes count and name them."""
    import rankwise.compression.layer as layer_module
    import rankwise.methods.svd_llm as svd_llm_module

    monkeypatch.setattr(layer_module, "refit_left", lambda *args, **kwargs: None)
    model = tiny_model("llama")
    report = compress_(model, SVDLLMConfig(ratio=0.4, sequential=True, update_u=True), tiny_tokens(8), progress=False)
    refused = [layer for layer in report.layers if layer.refused_fits == ("refit",)]
    assert refused and all("refit skipped" in layer.notes for layer in refused)
    assert any(note.startswith("left-factor refit refused") and f": {len(refused)} layers (" in note
               for note in report.notes)

    monkeypatch.undo()
    real = svd_llm_module.anchored_svd
    monkeypatch.setattr(svd_llm_module, "anchored_svd", lambda W, C, cross, rank, **kw: real(
        W, C, cross * float("nan") if cross.shape[0] == 64 else cross, rank, **kw))  # the 64-wide inputs: NaN
    report = compress_(tiny_model("llama"), SVDLLMConfig(ratio=0.4, sequential=True, anchored=True), tiny_tokens(8),
                       progress=False)
    skipped = [layer for layer in report.layers if "anchored" in layer.refused_fits]
    assert skipped and all("anchored fit skipped" in layer.notes for layer in skipped)
    assert any(note.startswith("anchored fit refused") and f": {len(skipped)} layers (" in note
               for note in report.notes)
    assert all(layer.refused_fits == () for layer in report.layers if layer.name.endswith("down_proj"))

    # both refused in one layer (the anchored fit, then the refit): both are reported
    monkeypatch.setattr(layer_module, "refit_left", lambda *args, **kwargs: None)
    report = compress_(tiny_model("llama"), SVDLLMConfig(ratio=0.4, sequential=True, anchored=True, update_u=True),
                       tiny_tokens(8), progress=False)
    assert any(layer.refused_fits == ("anchored", "refit") for layer in report.layers)


def test_anchored_without_paired_statistics_is_a_clear_error():
    from rankwise.calibrate import LayerStats
    from rankwise.methods.svd_llm import svd_llm

    X, _Xh, W = paired()
    stats = LayerStats(n=X.shape[0], xxt=X @ X.T, count=X.shape[1])
    with pytest.raises(ValueError, match="anchored needs the paired statistics"):
        svd_llm(W, stats, 4, SVDLLMConfig(ratio=0.4, sequential=True, anchored=True), "layer")
