"""Quantizers: the spec, fake-quant modules, uniform and non-uniform grids, LSQ/LSQ+, observers."""
from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.quantizers.nonuniform import (apot_levels, fit_codebook, nearest_level_index, nonuniform_fake_quantize,
                                         pot_levels, project, project_pass)
from yoloq.quantizers.observers import (EmaMinMaxObserver, EntropyObserver, MinMaxObserver, MseObserver, Observer,
                                        PercentileObserver, make_observer)
from yoloq.quantizers.spec import QuantSpec, SpecError
from yoloq.quantizers.uniform import (dequantize, fake_quantize, grad_scale, lsq_fake_quantize, lsq_grad_factor,
                                      lsq_plus_fake_quantize, quantize, quantize_with_offset, round_pass,
                                      uniform_qparams)

__all__ = [
    "QuantSpec", "SpecError", "FakeQuantize", "make_observer",
    "Observer", "MinMaxObserver", "EmaMinMaxObserver", "PercentileObserver", "MseObserver", "EntropyObserver",
    "uniform_qparams", "quantize", "dequantize", "fake_quantize", "quantize_with_offset",
    "round_pass", "grad_scale", "lsq_grad_factor", "lsq_fake_quantize", "lsq_plus_fake_quantize",
    "pot_levels", "apot_levels", "fit_codebook", "nearest_level_index", "project", "project_pass",
    "nonuniform_fake_quantize",
]
