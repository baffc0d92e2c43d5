"""Using a trained model: the predictor behind ``step_lightning.load``, image inputs and outputs, export, model
folders and the Hugging Face Hub."""

from step_lightning.api.predictor import Prediction, Predictor, load
from step_lightning.api.pretrained import push_to_hub, save_pretrained

__all__ = ["Prediction", "Predictor", "load", "push_to_hub", "save_pretrained"]
