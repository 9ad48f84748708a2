"""MLflow pyfunc wrapper of a checkpoint, logged as code ("models from code", no pickle).

    model = mlflow.pyfunc.load_model("models:/sft@champion")
    model.predict(["What does `json.dumps` do?"], params={"max_new_tokens": 64})

Input: a list of prompts or a DataFrame with a `prompt` column. Output: one completion per
prompt (greedy unless `temperature` is given): answers for chat models (sft, rlhf),
continuations for the base model.
"""

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class CheckpointModel(PythonModel):
    def load_context(self, context):
        from tokenizers import Tokenizer

        from tasks.model import load_checkpoint

        folder = Path(context.artifacts["checkpoint"])
        self.model, self.info = load_checkpoint(folder)
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def predict(self, context, model_input, params=None):
        from tasks.chat import complete

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        params = params or {}
        return complete(self.model, self.tok, prompts, chat=bool(self.info.get("chat", False)),
                        max_new_tokens=int(params.get("max_new_tokens", 64)), temperature=float(params.get("temperature", 0.0)))


mlflow.models.set_model(CheckpointModel())
