"""keras-dpsgd: DP-SGD without shortcuts for Keras 3.

Importing the package registers its Keras classes (DPModel, DPOptimizer), so
`keras.saving.load_model` finds them after a plain `import keras_dpsgd`.
"""

from keras_dpsgd import accounting
from keras_dpsgd.model import DPModel
from keras_dpsgd.model import PrivacyBudgetExceededError
from keras_dpsgd.model import make_private
from keras_dpsgd.optimizer import DPOptimizer

__version__ = "0.1.0"

__all__ = ["DPModel", "DPOptimizer", "PrivacyBudgetExceededError", "accounting", "make_private"]
