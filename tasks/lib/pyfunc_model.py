"""MLflow pyfunc wrapper of a checkpoint, logged as code ("models from code", no pickle).

    model = mlflow.pyfunc.load_model("models:/sft@champion")
    model.predict(["What does `json.dumps` do?"], params={"max_new_tokens": 64, "temperature": 0.7})

Input: prompts (a list of strings, or a DataFrame with a `prompt` column). Output: one
completion per prompt: answers for chat models (sft and the aligned ones), continuations for the base
model. Params (the signature's defaults): `max_new_tokens` 64, `temperature` 0.0 (greedy),
`top_p` 1.0, `seed` 0.
"""

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class CheckpointModel(PythonModel):
    def load_context(self, context):
        from tasks.lib.bpe import load_tokenizer
        from tasks.lib.model import load_checkpoint

        folder = Path(context.artifacts["checkpoint"])
        self.model, self.info = load_checkpoint(folder)
        self.model.eval()
        self.tok = load_tokenizer(folder)

    def predict(self, context, model_input, params=None):
        from tasks.lib.template import complete

        if hasattr(model_input, "columns"):
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        else:
            prompts = [str(p) for p in model_input]
        params = params or {}
        temperature = float(params.get("temperature", 0.0))
        return complete(self.model, self.tok, prompts, chat=bool(self.info.get("chat", False)),
                        max_new_tokens=int(params.get("max_new_tokens", 64)), temperature=temperature,
                        top_p=float(params.get("top_p", 1.0)), seed=int(params.get("seed", 0)))


mlflow.models.set_model(CheckpointModel())
