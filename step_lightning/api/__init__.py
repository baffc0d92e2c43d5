"""Using a trained model: the predictor behind ``step_lightning.load``, image inputs and outputs, export."""

from step_lightning.api.predictor import Prediction, Predictor, load

__all__ = ["Prediction", "Predictor", "load"]
