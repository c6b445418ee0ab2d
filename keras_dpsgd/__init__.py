"""keras-dpsgd: DP-SGD without shortcuts for Keras 3.

`keras_dpsgd.accounting` and the `python -m keras_dpsgd.privacy` command line
do not import Keras; the model classes are imported on first use.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DPModel": "keras_dpsgd.model",
    "PrivacyBudgetExceededError": "keras_dpsgd.model",
    "make_private": "keras_dpsgd.model",
    "DPOptimizer": "keras_dpsgd.optimizer",
    "accounting": "keras_dpsgd.accounting",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'keras_dpsgd' has no attribute {name!r}")
