"""Runs: an experiment becomes a run directory.

`<run>/experiment.yaml` (resolved, frozen), `ledger.sqlite` (`evomerge.run.ledger`),
`checkpoint/` (`evomerge.run.checkpoint`), `stages/NAME/best_model`, `archive/STAGE/ID` (M2N2 model
mode), `best/` (`recipe.yaml`, `scores.json`) and `report/` (`evomerge.run.rundir` names the
layout, says what is a run and holds the run's lock). The scheduler
(`evomerge.run.scheduler`) drives a worker pool (`evomerge.run.local` in-process,
`evomerge.run.workers` on Ray) stage by stage (`evomerge.run.stages`); `evomerge.run.status` and
`evomerge.run.export` (the best and its model card) read a run directory.
"""

from evomerge.pkgcall import callable_package

callable_package(__name__, "evomerge.api:run")  # `evomerge.run(experiment, ...)`
