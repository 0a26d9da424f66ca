"""tapernorm.passes: torch.fx passes that find gate-zero TaperNorm layers and fold them into linears.

Imports only the core (`tapernorm.layers` for the layer types); never the compiler or the runtime.

    gm, report = fold(model, (input_ids,))          # folded GraphModule + JSON-ready report
    gm, report = materialize(model, (input_ids,))   # explicit x * s maps, no statistic (unfused)
"""
from .fold_math import apply_taper_map, fold_linear, fold_ln_linear, fold_rms_linear, taper_map
from .pipeline import fold, materialize
from .verify import TOLERANCES, VerifyError

__all__ = ["fold", "materialize", "VerifyError", "TOLERANCES", "fold_linear", "fold_rms_linear", "fold_ln_linear",
           "taper_map", "apply_taper_map"]
