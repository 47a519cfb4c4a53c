"""The MLflow pyfunc model of a carry-on adapter (MLflow's models-from-code: this file is the model's
code, the adapter directory its artifact; nothing is pickled).

    model = mlflow.pyfunc.load_model("models:/NAME@ALIAS")
    model.predict(["Sentence: Heavy rain flooded the harbor.\\nTopic:"], params={"max_tokens": 4})

Input: prompts (a list of strings, or a DataFrame with a `prompt` column). Output: one generated
text per prompt. Params: max_tokens (default 64), temperature (default 0: greedy), seed.
`mlflow models serve -m models:/NAME@ALIAS --env-manager local` serves it over REST. The base named
by the adapter (`base_model_name_or_path`) must be loadable where the model runs.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

# predict takes prompts as a list or a DataFrame (see above), which one type hint cannot say; the
# signature is logged explicitly instead. The hint says DataFrame, the one input type for which
# MLflow neither infers a schema nor converts the input (what it receives is what it was given);
# without a hint MLflow warns "Add type hints to the `predict` method" every time it is logged.


class CarryOnPyfunc(PythonModel):
    def load_context(self, context):
        from carryon_ray.generation import CarryOnModel

        self.model = CarryOnModel.from_pretrained(context.artifacts["adapter"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        params = params or {}
        if hasattr(model_input, "columns"):  # a DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        tok = self.model.tokenizer
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outs = self.model.generate(ids, int(params.get("max_tokens", 64)), float(params.get("temperature", 0.0)),
                                   seed=params.get("seed"))
        return [tok.decode(o, skip_special_tokens=True) for o in outs]


mlflow.models.set_model(CarryOnPyfunc())
