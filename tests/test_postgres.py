"""The Dagster instance on a real PostgreSQL server, chosen by PRICELAB_POSTGRES_URL alone.

The server is the PostgreSQL that the `pgserver` wheel ships (requirements.lock), started by the
test on 127.0.0.1 (TCP only, no Unix socket) in a temporary data directory and stopped at the end.
The URL given is the plain `postgresql://...` a user would write; `jobs.instance` makes it name
psycopg2 (a bare URL under SQLAlchemy 2.1 would ask for psycopg 3, which is not installed)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs.instance import InstanceSettingError, psycopg2_url
from tests.test_cli import user_env, write_market


def test_the_url_names_psycopg2_whatever_the_user_wrote():
    assert psycopg2_url("postgresql://u:p@127.0.0.1:5432/db") == "postgresql+psycopg2://u:p@127.0.0.1:5432/db"
    assert psycopg2_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert psycopg2_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg2://u@h/db"
    with pytest.raises(InstanceSettingError, match="must be a PostgreSQL URL"):
        psycopg2_url("mysql://u@h/db")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server on 127.0.0.1:<free port>, stopped (by its own pg_ctl, then its PID) afterwards."""
    pgserver = pytest.importorskip("pgserver")
    bin_dir = Path(pgserver.__file__).parent / "pginstall" / "bin"
    run_as = {}
    root = Path(tempfile.mkdtemp(prefix="pricelab-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root: use the wheel's own service user
        from pgserver.utils import ensure_user_exists

        entry = ensure_user_exists("pgserver")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        run_as = {"user": entry.pw_uid, "group": entry.pw_gid}
    root.chmod(0o755)
    data, log, port = root / "data", root / "server.log", _free_port()
    subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120, **run_as)
    subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(log),
                    "-o", f"-h 127.0.0.1 -p {port} -k ''", "start"], check=True, capture_output=True, timeout=90, **run_as)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop"],
                       capture_output=True, timeout=60, **run_as)
        try:
            os.kill(pid, 9)  # only if pg_ctl could not stop it
        except ProcessLookupError:
            pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_a_job_runs_on_a_postgres_instance(postgres_url, tmp_path):
    import psycopg2

    root = write_market(tmp_path)
    home = tmp_path / ".dagster_home"
    home.mkdir()
    shutil.copyfile(Path(__file__).resolve().parents[1] / "dagster.yaml", home / "dagster.yaml")
    env = {**user_env(root), "DAGSTER_HOME": str(home), "PRICELAB_POSTGRES_URL": postgres_url,
           "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1", "GX_ANALYTICS_ENABLED": "False"}
    dagster = str(Path(sys.executable).with_name("dagster"))
    done = subprocess.run([dagster, "asset", "materialize", "-m", "jobs.definitions", "--select", "catalog"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # the run and its events are in PostgreSQL, and nothing went to SQLite files under DAGSTER_HOME
    with psycopg2.connect(postgres_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status FROM runs")
        assert [r[0] for r in cursor.fetchall()] == ["SUCCESS"]
        cursor.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
        assert cursor.fetchone()[0] == 1
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))
    # a second process reads the same instance through the same one setting
    script = "import dagster as dg; i = dg.DagsterInstance.get(); print([r.status.value for r in i.get_runs()], type(i.run_storage).__name__)"
    seen = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert seen.stdout.strip() == "['SUCCESS'] PostgresRunStorage", seen.stderr[-2000:]
