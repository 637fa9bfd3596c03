"""A tiny models-from-code pyfunc for registry tests: returns its input plus one."""

import mlflow
from mlflow.pyfunc import PythonModel


class AddOne(PythonModel):
    def predict(self, context, model_input: list[float], params=None) -> list[float]:
        return [x + 1 for x in model_input]


mlflow.models.set_model(AddOne())
