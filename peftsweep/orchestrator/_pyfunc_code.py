"""The code of the registry's pyfunc models (MLflow "models from code"): MLflow copies this file into each
model and runs it at load, instead of unpickling an object; peftsweep must be installed where it loads."""

import mlflow.models

from peftsweep.orchestrator.logged_model import TrainedModel

mlflow.models.set_model(TrainedModel())
