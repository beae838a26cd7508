# %% [markdown]
# # evomerge from Python: a worked example
#
# Evolve a TIES merge of two experts of the tiny zoo (`add` and `reverse`, fine-tuned from one
# base), scored by a plain Python function, then read the ledger into pandas, plot it with the
# report's helpers and export the best model. A script in "percent" cells (`# %%`): run it with
# `python examples/notebook.py`, or open it as a notebook (VS Code, Jupyter with jupytext).
#
#     python examples/notebook.py                        # the tiny zoo (built once, minutes)
#     python examples/notebook.py --preset test --evaluations 4 --out /tmp/nb   # seconds

# %%
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

import evomerge as em
from evomerge.report import plots
from evomerge.report.data import load_run
from evomerge.zoo.tasks import eval_docs

parser = argparse.ArgumentParser(description="evomerge from Python: a worked example")
parser.add_argument("--preset", default="tiny", help="zoo preset: tiny (the demo's models) or test (seconds)")
parser.add_argument("--evaluations", type=int, default=16, help="the search's budget")
parser.add_argument("--out", type=Path, default=Path("runs/notebook_example"), help="where the run and the model go")
args, _ = parser.parse_known_args()  # (a notebook kernel passes its own arguments)


# %% [markdown]
# ## The evaluator: any Python function
#
# It gets the merged model (in memory), its tokenizer and the split (`search` or `holdout`), and
# returns its objectives, here with the per-document scores that the ledger keeps. No module path
# to write: `em.python_evaluator` registers the function (a Ray worker gets it pickled).


# %%
def exact_match(model, tokenizer, split, n: int = 32) -> dict:
    """Per skill, the share of the first `n` documents whose answer is the model's greedy choice at
    every position (teacher forcing: one forward pass per document)."""
    per_sample = {}
    for skill in ("add", "reverse"):
        hits = []
        for doc in eval_docs(skill)[split][:n]:
            prompt = tokenizer(doc.prompt)["input_ids"]
            ids = tokenizer(doc.prompt + doc.target)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]
            guess = logits[len(prompt) - 1 : len(ids) - 1].argmax(-1).tolist()
            hits.append(float(guess == ids[len(prompt) :]))
        per_sample[skill] = hits
    objectives = {skill: sum(h) / len(h) for skill, h in per_sample.items()}
    return {"objectives": {"mean": sum(objectives.values()) / len(objectives), **objectives}, "per_sample": per_sample}


evaluator = em.python_evaluator(exact_match, objectives={"mean": True, "add": True, "reverse": True}, args={"n": 32})

# %% [markdown]
# ## The experiment, as a mapping (the fields of an experiment YAML)

# %%
zoo = f"zoo:{args.preset}"
experiment = em.Experiment(
    {
        "name": "notebook_example",
        "seed": 0,
        "models": {"base": f"{zoo}/base", "sources": [f"{zoo}/add", f"{zoo}/reverse"]},
        "stages": [
            {
                "name": "ps",
                "space": "ps_ties",  # a built-in search space: weight and density per expert
                "evaluator": evaluator,
                "optimizer": {"name": "cmaes", "popsize": 4},
                "budget": {"evaluations": 16},
                "holdout_top_k": 1,
            }
        ],
        "ray": {"workers": 0},  # evaluate in this process
    }
).with_overrides({"stages.ps.budget.evaluations": args.evaluations})
config = experiment.validate()  # one-line errors (em.ConfigError), nothing loaded yet
print(f"{config.name}: {config.stages[0].optimizer.name}, {config.stages[0].budget.evaluations} evaluations")

# %% [markdown]
# ## Run it
#
# The run directory holds the ledger (one row per evaluation), checkpoints and the best recipe;
# `em.resume(run.run_dir)` would carry on a stopped run.

# %%
run_dir = args.out / "run"
run = em.Run(run_dir) if (run_dir / "ledger.sqlite").exists() else em.run(experiment, out=run_dir)
best = run.best()
print(f"best: candidate {best.candidate_id}, search {best.score:.3f}, holdout {best.holdout_score:.3f}")

# %% [markdown]
# ## The ledger in pandas

# %%
ledger = run.ledger()
search = ledger[ledger.split == "search"]
table = pd.concat([search[["seq", "generation", "fitness"]].reset_index(drop=True), pd.json_normalize(search["objectives"].tolist())], axis=1)
print(table.to_string(index=False))
per_doc = run.ledger(per_sample=True).set_index("seq")["per_sample"]
print(f"documents scored per evaluation: {sum(len(v) for v in per_doc.iloc[0].values())}")

# %% [markdown]
# ## Plots, with the report's helpers (PNG bytes; `run.report()` writes the whole HTML page)

# %%
view = load_run(run.run_dir)
figure = args.out / "fitness.png"
figure.write_bytes(plots.fitness_plot(view.stages[0]))
print(f"plot: {figure}")
print(f"report: {run.report()}")

# %% [markdown]
# ## Export the best recipe (a mergekit config) and the merged model

# %%
model_dir = args.out / "merged"
exported = run.export(model_dir)
print(f"recipe: {exported.recipe}\nmodel: {exported.model}")
