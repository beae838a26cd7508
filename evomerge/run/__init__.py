"""Runs: an experiment becomes a run directory.

`<run>/experiment.yaml` (resolved, frozen), `ledger.sqlite` (`evomerge.run.ledger`),
`checkpoint/` (`evomerge.run.checkpoint`), `stages/NAME/best_model`, `archive/ID` (M2N2 model
mode), `best/` (`recipe.yaml`, `scores.json`) and `report/`. The scheduler
(`evomerge.run.scheduler`) drives a worker pool (`evomerge.run.local` in-process,
`evomerge.run.workers` on Ray) stage by stage (`evomerge.run.stages`); `evomerge.run.status` and
`evomerge.run.export` read a run directory.
"""
