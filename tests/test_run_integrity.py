"""Run directories that lost rows or files: a ledger that lacks rows its checkpoint counts is
refused (status, resume, export, report) and `resume --rebuild` re-creates exactly the lost rows;
`status` tells a live run from a dead one; Ctrl-C names the resume command; every damaged,
unreadable or unwritable file is one line `error: FILE: ...`, exit code 2, nothing half-written.

The runs are the tiny PS -> DFS (over `stage:ps`) experiment of tests/test_run.py with a baseline,
scored by its cheap deterministic evaluator."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.run_helpers import cli, row_count, rows
from tests.test_run import REPO, experiment, two_stage_experiment, write_exp


@pytest.fixture(scope="module")
def reference(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(experiment file, the finished run that lost nothing)."""
    root = tmp_path_factory.mktemp("integrity")
    exp_file = write_exp(root / "exp.yaml", two_stage_experiment(llama_family))
    code, out = cli("run", exp_file, "--out", root / "reference")
    assert code == 0, out
    return exp_file, root / "reference"


def comparable(run_dir: Path) -> list[dict]:
    return [r.comparable() for r in rows(run_dir)]


def one_error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out, out
    return lines[0]


def digest(root: Path) -> dict[str, str]:
    """Every file under `root` and a hash of its bytes (what a refused command must not change);
    SQLite's shared-memory index and an empty write-ahead log, which any reader of a WAL database
    creates, are not the run's data."""

    def data(p: Path) -> bool:
        return p.is_file() and not p.name.endswith("-shm") and not (p.name.endswith("-wal") and p.stat().st_size == 0)

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if data(p)}


def delete_rows(ledger: Path, where: str) -> int:
    with sqlite3.connect(ledger) as conn:
        n = conn.execute(f"DELETE FROM evaluations WHERE {where}").rowcount
    conn.close()
    return n


def start_driver(args: list[str], cwd: Path, delay: str = "0.3") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EVOMERGE_TEST_DELAY": delay}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_rows(run_dir: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while row_count(run_dir) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]


# ---- lost rows ----------------------------------------------------------------------------------

LOSSES = {
    # the last 15 rows (the ledger's main file without its -wal after a kill -9: the end is gone)
    "tail": "seq > 7",
    # rows here and there: a baseline row, PS rows (one of a generation, two in a row), DFS rows
    "holes": "seq IN (1, 4, 5, 9, 15, 18)",
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_lost_rows_are_refused_then_rebuilt_into_the_same_ledger(reference: tuple[Path, Path], tmp_path: Path, loss: str) -> None:
    _, ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    before = rows(run_dir)
    lost = delete_rows(run_dir / "ledger.sqlite", LOSSES[loss])
    assert lost in (15, 6) and len(before) == 22
    unchanged = digest(run_dir)

    for command in (["status"], ["status", "--json"], ["resume"], ["export"], ["report"]):
        code, out = cli(*command, run_dir)
        line = one_error_line(out)
        assert code == 2, out
        assert f"{run_dir / 'ledger.sqlite'}: {lost} row(s) the checkpoint counts are missing" in line, line
        assert "restore ledger.sqlite-wal beside it" in line and f"`evomerge resume {run_dir} --rebuild`" in line
    assert digest(run_dir) == unchanged and not (run_dir / "report").exists()
    if loss == "tail":
        assert "seq 8-22" in line and "of stage 'dfs'" in line and "8 search rows of stage 'dfs'" in line

    code, out = cli("resume", run_dir, "--rebuild")
    assert code == 0, out
    assert "rebuilding from stage '" in out
    assert comparable(run_dir) == comparable(ref)
    survivors = {r.seq: r.started for r in rows(run_dir)}
    assert all(survivors[r.seq] == r.started for r in before if r.seq in survivors and not _deleted(loss, r.seq))
    assert json.loads((run_dir / "best" / "scores.json").read_text()) == json.loads((ref / "best" / "scores.json").read_text())
    status = json.loads(cli("status", run_dir, "--json")[1])
    assert status["finished"] is True and status["state"] == "finished" and status["evaluations"] == 16
    code, out = cli("resume", run_dir, "--rebuild")  # whole again: nothing to rebuild
    assert code == 0 and "nothing to rebuild" in out and comparable(run_dir) == comparable(ref)


def _deleted(loss: str, seq: int) -> bool:
    return seq > 7 if loss == "tail" else seq in (1, 4, 5, 9, 15, 18)


def test_a_rebuild_killed_halfway_goes_on_to_the_same_ledger(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """kill -9 during `resume --rebuild` (after it re-created the PS rows): the checkpoints it
    wrote count only what it has told, so what is still missing is refused again, and a second
    rebuild ends with the uninterrupted run's ledger."""
    _, ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    delete_rows(run_dir / "ledger.sqlite", "seq IN (4, 5, 15, 18)")
    proc = start_driver(["resume", str(run_dir), "--rebuild"], tmp_path)
    try:
        wait_rows(run_dir, 20, proc)  # seqs 4 and 5 are back; 15 and 18 are not (0.3 s per evaluation)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert 20 <= len(rows(run_dir)) < 22
    code, out = cli("status", run_dir)
    assert code == 2 and "--rebuild" in one_error_line(out)
    code, out = cli("resume", run_dir, "--rebuild")
    assert code == 0, out
    assert comparable(run_dir) == comparable(ref)


OPTIMIZERS = {
    # an Optuna study in the run's storage: the restarted stage opens a new study beside the old
    "optuna": {"name": "optuna", "sampler": "tpe", "sampler_options": {"n_startup_trials": 3}},
    # M2N2 model mode: its archive members on disk are taken up again
    "m2n2_model": {"name": "m2n2", "mode": "model", "archive_size": 3},
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rebuild_restarts_any_optimizer_from_its_seed(llama_family: dict[str, Path], tmp_path: Path, name: str) -> None:
    exp = experiment(llama_family)
    exp["stages"][0]["optimizer"] = OPTIMIZERS[name]
    if name == "m2n2_model":
        exp["stages"][0].pop("space")
        exp["models"] = {"sources": [str(llama_family[k]) for k in "abc"]}
    exp_file = write_exp(tmp_path / "exp.yaml", exp)
    assert cli("run", exp_file, "--out", tmp_path / "reference")[0] == 0
    run_dir = tmp_path / "run"
    shutil.copytree(tmp_path / "reference", run_dir)
    delete_rows(run_dir / "ledger.sqlite", "seq IN (3, 5) OR seq > 7")
    assert cli("resume", run_dir)[0] == 2
    code, out = cli("resume", run_dir, "--rebuild")
    assert code == 0, out
    assert comparable(run_dir) == comparable(tmp_path / "reference")


def test_a_changed_stage_best_stops_the_rebuild_of_later_rows(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """The checkpoint records each finished stage's best; when a rebuilt stage ends with another
    best, rows of a later stage scored on the old `stage:ps` model cannot be kept."""
    _, ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    state_file = run_dir / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert set(state["stage_bests"]) == {"ps", "dfs"}
    state["stage_bests"]["ps"] = "not-the-best"
    state_file.write_text(json.dumps(state))
    delete_rows(run_dir / "ledger.sqlite", "seq = 4")
    code, out = cli("resume", run_dir, "--rebuild")
    assert code == 2, out
    assert "the rebuilt stage 'ps' ended with another best" in out and "stage 'dfs' has rows scored on its old best model" in out


def test_rebuild_without_a_readable_checkpoint_rebuilds_from_the_ledger(reference: tuple[Path, Path], tmp_path: Path) -> None:
    _, ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    (run_dir / "checkpoint" / "state.json").write_bytes(os.urandom(300))
    delete_rows(run_dir / "ledger.sqlite", "seq IN (6, 16)")
    code, out = cli("resume", run_dir)
    assert code == 2 and "--rebuild" in one_error_line(out)
    code, out = cli("resume", run_dir, "--rebuild")
    assert code == 0, out
    assert "the checkpoint cannot be read" in out and comparable(run_dir) == comparable(ref)


# ---- a live run, kill -9, Ctrl-C ----------------------------------------------------------------


def test_status_tells_live_from_dead_and_a_copy_without_wal_resumes_whole(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """While the driver runs, status says `running (pid N)`; after kill -9 `stopped: resume with
    ...`. The rows the last checkpoint counts are in the ledger's main file (the checkpoint copies
    the write-ahead log into it), so a copy made without `ledger.sqlite-wal` resumes into the
    whole run."""
    exp_file, ref = reference
    run_dir = tmp_path / "killed"
    proc = start_driver(["run", str(exp_file), "--out", str(run_dir)], tmp_path)
    try:
        wait_rows(run_dir, 15, proc)  # in the DFS stage
        code, out = cli("status", run_dir, "--json")
        assert code == 0, out
        live = json.loads(out)
        assert live["state"] == "running" and live["pid"] == proc.pid and live["finished"] is False
        code, out = cli("status", run_dir)
        assert code == 0 and f"running (pid {proc.pid})" in out and "[running]" in out, out
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert (run_dir / "ledger.sqlite-wal").is_file()
    dead = json.loads(cli("status", run_dir, "--json")[1])
    assert dead["state"] == "stopped" and dead["pid"] is None
    code, out = cli("status", run_dir)
    assert code == 0 and f"stopped: resume with `evomerge resume {run_dir}`" in out and "[stopped]" in out, out

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    ckpt = json.loads((copy / "checkpoint" / "state.json").read_text())
    with sqlite3.connect(copy / "ledger.sqlite") as conn:
        assert conn.execute("SELECT MAX(seq) FROM evaluations").fetchone()[0] >= ckpt["ledger_seq"] >= 13
    conn.close()
    code, out = cli("resume", copy)
    assert code == 0, out
    assert comparable(copy) == comparable(ref)


def test_ctrl_c_ends_with_one_line_naming_the_resume_command(reference: tuple[Path, Path], tmp_path: Path) -> None:
    exp_file, ref = reference
    run_dir = tmp_path / "interrupted"
    proc = start_driver(["run", str(exp_file), "--out", str(run_dir)], tmp_path)
    try:
        wait_rows(run_dir, 5, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()[-2000:]
    text = err.decode()
    assert "Traceback" not in text and "Aborted!" not in text, text
    last = [line for line in text.splitlines() if line.strip()][-1]
    assert last == f"interrupted (Ctrl-C); the run goes on from its last checkpoint with `evomerge resume {run_dir}`", text
    assert json.loads(cli("status", run_dir, "--json")[1])["state"] == "stopped"
    code, out = cli("resume", run_dir)
    assert code == 0, out
    assert comparable(run_dir) == comparable(ref)


# ---- damaged files ------------------------------------------------------------------------------

DAMAGE = {
    "checkpoint random bytes": ("checkpoint/state.json", lambda data: os.urandom(200), "the checkpoint cannot be read"),
    "checkpoint truncated": ("checkpoint/state.json", lambda data: data[: len(data) // 2], "the checkpoint cannot be read: it is not valid JSON"),
    "checkpoint not a mapping": ("checkpoint/state.json", lambda data: b"[1, 2]", "it holds a JSON list, not a checkpoint"),
    "experiment not YAML": ("experiment.yaml", lambda data: b"name: t\nstages: [ {name: ps\n", "the run's experiment is damaged, not valid YAML"),
    "experiment random bytes": ("experiment.yaml", lambda data: b"\xff\xfe\x00\x81" + os.urandom(100), "the run's experiment is damaged"),
    "experiment a list": ("experiment.yaml", lambda data: b"- 1\n- 2\n", "it holds a YAML list, not an experiment"),
    "ledger random bytes": ("ledger.sqlite", lambda data: os.urandom(len(data)), "cannot use the database (file is not a database)"),
    "ledger truncated": ("ledger.sqlite", lambda data: data[: len(data) // 3], "cannot use the database"),
    "ledger empty header": ("ledger.sqlite", lambda data: data[:100], "cannot use the database"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_files_are_one_line_naming_the_file(reference: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    _, ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    name, damage, message = DAMAGE[case]
    path = run_dir / name
    path.write_bytes(damage(path.read_bytes()))
    unchanged = digest(run_dir)
    for command in ("status", "resume", "export", "report"):
        code, out = cli(command, run_dir)
        line = one_error_line(out)
        assert code == 2, (command, out)
        assert line.startswith(f"error: {path}: ") and message in line, (command, line)
        assert digest(run_dir) == unchanged, command  # nothing written, not even half
    assert not (run_dir / "report").exists()


def test_report_on_a_directory_that_is_no_run(tmp_path: Path) -> None:
    (tmp_path / "experiment.yaml").write_text("name: mine\nstages: []\n")  # an experiment file, not a run
    code, out = cli("report", tmp_path)
    assert code == 2 and "not a run directory" in one_error_line(out) and not (tmp_path / "report").exists()
    (tmp_path / "ledger.sqlite").write_bytes(b"SQLite format 3\x00" + b"\x00" * 84)  # a ledger in name only
    code, out = cli("report", tmp_path)
    assert code == 2 and one_error_line(out).startswith(f"error: {tmp_path / 'ledger.sqlite'}: ")
    assert not (tmp_path / "report").exists()


# ---- full disk, permission denied ---------------------------------------------------------------


def _child(args: list[str], prefix: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*prefix, sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


APPEND = (
    "import sys; from evomerge.errors import EvomergeError; from evomerge.run.ledger import Ledger\n"
    "ledger = Ledger.open(sys.argv[1]); row = ledger.get(1); row.seq = 0; row.per_sample = {'t': [0.5] * 5000}\n"
    "try: ledger.append(row)\nexcept EvomergeError as exc: print(exc)"
)


def test_full_disk_is_one_line_and_nothing_half_written(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """The run directory on a tiny tmpfs that is full (a private mount namespace: `unshare -rm`):
    `export` cannot write best/recipe.yaml; `resume` of a run whose last rows are still to be
    evaluated cannot write them. One line each, exit 2, no temp file, no half row."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a tiny tmpfs")
    _, ref = reference
    size = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file()) + (2 << 20)
    out = tmp_path / "out"
    out.mkdir()
    run = out / "run"
    cli_cmd = f"{sys.executable} -m evomerge.cli"
    script = tmp_path / "full.sh"
    script.write_text(
        f"""set -e
mount -t tmpfs -o size={size} tmpfs {out}
cp -r {ref} {run}
rm -f {run}/best/recipe.yaml {run}/checkpoint/state.json
{sys.executable} -c "import sqlite3; c = sqlite3.connect('{run}/ledger.sqlite'); c.execute('DELETE FROM evaluations WHERE seq > 18'); c.commit()"
{cli_cmd} status {run} > /dev/null  # SQLite's -shm index exists before the disk fills
head -c {size} /dev/zero > {out}/filler 2>/dev/null || true
cd {tmp_path}
set +e
{cli_cmd} export {run} > {tmp_path}/export.out 2>&1; echo $? > {tmp_path}/export.rc
{cli_cmd} resume {run} > {tmp_path}/resume.out 2>&1; echo $? > {tmp_path}/resume.rc
{sys.executable} -c "{APPEND}" {run}/ledger.sqlite > {tmp_path}/append.out 2>&1
ls -a {run} {run}/best {run}/checkpoint > {tmp_path}/listing
{sys.executable} -c "import sqlite3; print(sqlite3.connect('file:{run}/ledger.sqlite?mode=ro', uri=True).execute('SELECT COUNT(*) FROM evaluations').fetchone()[0])" > {tmp_path}/rows
"""
    )
    proc = subprocess.run(["unshare", "-rm", "sh", str(script)], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    export_out = (tmp_path / "export.out").read_text()
    line = one_error_line(export_out)
    assert (tmp_path / "export.rc").read_text().strip() == "2", export_out
    assert line.startswith(f"error: {run}/best/recipe.yaml: No space left on device (ENOSPC); the disk is full"), line
    resume_out = (tmp_path / "resume.out").read_text()
    assert (tmp_path / "resume.rc").read_text().strip() == "2", resume_out
    line = one_error_line(resume_out.splitlines()[-1])  # after the stage's progress lines
    assert line.startswith(f"error: {run}/") and ("full" in line or "space" in line), line
    appended = (tmp_path / "append.out").read_text()  # the ledger itself cannot grow
    assert appended.startswith(f"{run}/ledger.sqlite: cannot use the database (database or disk is full); the disk may be full"), appended
    listing = (tmp_path / "listing").read_text()
    assert ".tmp" not in listing and "recipe.yaml" not in listing  # no temp file, no half a recipe
    assert (tmp_path / "rows").read_text().strip() == "18"  # no row written, not even half of one


def test_permission_denied_is_one_line(reference: tuple[Path, Path], tmp_path: Path) -> None:
    prefix: list[str] = []
    if os.geteuid() == 0:  # root reads and writes anything: drop the capabilities that allow it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be tested")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    _, ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    (run_dir / "best").chmod(0o555)
    (run_dir / "checkpoint" / "state.json").chmod(0o000)
    try:
        proc = _child(["status", str(run_dir)], prefix, tmp_path)
        line = one_error_line(proc.stderr + proc.stdout)
        assert proc.returncode == 2 and line.startswith(f"error: {run_dir / 'checkpoint' / 'state.json'}: Permission denied (EACCES)"), line
        (run_dir / "checkpoint" / "state.json").chmod(0o644)
        proc = _child(["export", str(run_dir)], prefix, tmp_path)
        line = one_error_line(proc.stderr + proc.stdout)
        assert proc.returncode == 2 and line.startswith(f"error: {run_dir / 'best' / 'recipe.yaml'}: Permission denied (EACCES)"), line
    finally:
        (run_dir / "best").chmod(0o755)
        (run_dir / "checkpoint" / "state.json").chmod(0o644)
