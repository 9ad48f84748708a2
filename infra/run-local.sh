#!/usr/bin/env bash
# The pipeline's services on this machine, without containers, all on 127.0.0.1:
#   postgres  PostgreSQL cluster in $SERVICES_DIR/pg (databases `mlflow` and `prefect`)
#   s3        S3-compatible store (moto_server, in memory) with buckets `mlflow` and `dvc`
#   mlflow    MLflow tracking server: Postgres backend, artifacts proxied to s3://mlflow
#   prefect   Prefect server on Postgres (API and UI)
#   worker    `python -m flows.serve`: serves the pipeline's deployment and runs its flow runs
#
#   infra/run-local.sh up [SERVICE...]     start (all by default; make services), wait for health
#   infra/run-local.sh down [SERVICE...]   stop exactly what `up` started (make services-down)
#   infra/run-local.sh status              one line per service: pid, port, health
#   infra/run-local.sh services            each service's port variable, port and settings
#   source .services/env                   the exports the pipeline needs (written by up)
#
# Settings (environment): SERVICES_DIR (default .services), SERVICES_PROJECT (the project the
# worker runs, default this checkout), PYTHON (default .venv/bin/python),
# SERVICES_{PG,S3,MLFLOW,PREFECT}_PORT (5432, 9000, 5000, 4200), SERVICES_WAIT_S (health
# timeout per service, 120), SERVICES_MLFLOW_WORKERS (2), SERVICES_PG_BIN (PostgreSQL's bin
# folder; found under /usr/lib/postgresql otherwise). Credentials: POSTGRES_USER,
# POSTGRES_PASSWORD, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY from the environment, else the
# ones saved in $SERVICES_DIR/env (mode 600), else generated there. They are never printed.
# PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` OS user that
# Debian's package creates (SERVICES_PG_OS_USER).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${SERVICES_DIR:-$ROOT/.services}
PROJECT=${SERVICES_PROJECT:-$ROOT}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PYTHON")
PG_PORT=${SERVICES_PG_PORT:-5432}
S3_PORT=${SERVICES_S3_PORT:-9000}
MLFLOW_PORT=${SERVICES_MLFLOW_PORT:-5000}
PREFECT_PORT=${SERVICES_PREFECT_PORT:-4200}
WAIT_S=${SERVICES_WAIT_S:-120}
MLFLOW_WORKERS=${SERVICES_MLFLOW_WORKERS:-2}
PG_OS_USER=${SERVICES_PG_OS_USER:-postgres}
HOST=127.0.0.1
ALL=(postgres s3 mlflow prefect worker)
# a marker each service's command line must contain before `down` signals a recorded pid
declare -A MARKER=([s3]=moto_server [mlflow]=mlflow [prefect]=prefect [worker]=flows.serve)

say() { printf '%s\n' "$*"; }
die() { printf 'error: run-local: %s\n' "$*" >&2; exit 1; }

port_of() {
    case $1 in postgres) echo "$PG_PORT" ;; s3) echo "$S3_PORT" ;; mlflow) echo "$MLFLOW_PORT" ;;
               prefect) echo "$PREFECT_PORT" ;; worker) echo "" ;; *) die "unknown service '$1' (one of: ${ALL[*]})" ;; esac
}

# ------------------------------------------------------------------ credentials and env file
load_credentials() {
    local saved_pg_user="" saved_pg_pw="" saved_key="" saved_secret=""
    if [[ -f $DIR/env ]]; then
        saved_pg_user=$(sed -n 's/^export POSTGRES_USER=//p' "$DIR/env")
        saved_pg_pw=$(sed -n 's/^export POSTGRES_PASSWORD=//p' "$DIR/env")
        saved_key=$(sed -n 's/^export AWS_ACCESS_KEY_ID=//p' "$DIR/env")
        saved_secret=$(sed -n 's/^export AWS_SECRET_ACCESS_KEY=//p' "$DIR/env")
    fi
    gen() { "$PYTHON" -c 'import secrets; print(secrets.token_hex(16))'; }
    POSTGRES_USER=${POSTGRES_USER:-${saved_pg_user:-pipeline}}
    POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-${saved_pg_pw:-$(gen)}}
    AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-${saved_key:-local-$(gen | cut -c1-12)}}
    AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-${saved_secret:-$(gen)}}
    # the database password goes only to the processes that need it (not to the S3 store or
    # the worker); the S3 keys go to every service that talks to the store
    export -n POSTGRES_USER POSTGRES_PASSWORD
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
    # URL-encoded for the database URLs (a user-chosen password may hold any character)
    PG_USER_Q=$("$PYTHON" -c 'import sys, urllib.parse as u; print(u.quote(sys.argv[1], safe=""))' "$POSTGRES_USER")
    PG_PW_Q=$(POSTGRES_PASSWORD=$POSTGRES_PASSWORD "$PYTHON" -c 'import os, urllib.parse as u; print(u.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')
}

write_env() {
    local tmp=$DIR/env.tmp
    (umask 077; cat >"$tmp" <<EOF
# Written by infra/run-local.sh up: the services on 127.0.0.1. Load it with: source $DIR/env
# Holds credentials (mode 600): do not commit or share it.
export POSTGRES_USER=$POSTGRES_USER
export POSTGRES_PASSWORD=$POSTGRES_PASSWORD
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
export AWS_ENDPOINT_URL=http://$HOST:$S3_PORT
export MLFLOW_S3_ENDPOINT_URL=http://$HOST:$S3_PORT
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api
EOF
    )
    mv "$tmp" "$DIR/env"
}

# ------------------------------------------------------------------ processes
pid_of() { [[ -f $DIR/$1.pid ]] && cat "$DIR/$1.pid" || true; }

# alive and still the process we started (a recycled pid runs something else)
ours() {
    local name=$1 pid=$2
    [[ -n $pid && -d /proc/$pid ]] || return 1
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    if [[ $name == postgres ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/pg"
    else
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "${MARKER[$name]}"
    fi
}

port_busy() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

http_ok() {  # http_ok URL: exit 0 when it answers 200
    "$PYTHON" - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

# wait_for NAME PID CHECK...: until CHECK passes; fail at once if the process died
wait_for() {
    local name=$1 pid=$2; shift 2
    local t0=$SECONDS
    until "$@"; do
        if ! ours "$name" "$pid"; then
            say "---- last lines of $DIR/logs/$name.log:" >&2
            tail -n 25 "$DIR/logs/$name.log" >&2 || true
            die "$name exited during startup (see $DIR/logs/$name.log)"
        fi
        if (( SECONDS - t0 >= WAIT_S )); then
            tail -n 25 "$DIR/logs/$name.log" >&2 || true
            die "$name did not become healthy within ${WAIT_S}s (SERVICES_WAIT_S); log: $DIR/logs/$name.log"
        fi
        sleep 1
    done
    say "  $name healthy after $((SECONDS - t0))s"
}

# spawn NAME CMD...: in its own session (process group = its pid) with the exported
# environment, in $SPAWN_CWD (default: the checkout), output to its log, pid recorded
spawn() {
    local name=$1; shift
    local port; port=$(port_of "$name")
    if [[ -n $port ]] && port_busy "$port"; then
        die "port $port for $name is already in use on $HOST (set SERVICES_${name^^}_PORT)"
    fi
    mkdir -p "$DIR/logs"
    # a background subshell of a script is no process-group leader, so setsid execs in place
    ( cd "${SPAWN_CWD:-$ROOT}" && exec setsid "$@" ) >>"$DIR/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$DIR/$name.pid"
}

# ------------------------------------------------------------------ postgres
pg_bin() {
    if [[ -n ${SERVICES_PG_BIN:-} ]]; then echo "$SERVICES_PG_BIN"; return; fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $d && -x $d/initdb ]]; then echo "$d"; return; fi
    if command -v initdb >/dev/null; then dirname "$(command -v initdb)"; return; fi
    die "PostgreSQL not found: install it (apt-get install -y postgresql) or set SERVICES_PG_BIN"
}

as_pg() {  # run a PostgreSQL server command as a user it accepts
    if [[ $(id -u) == 0 ]]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi
}

psql_q() { PGPASSWORD=$POSTGRES_PASSWORD "$PGB/psql" -h $HOST -p "$PG_PORT" -U "$POSTGRES_USER" -d postgres -v ON_ERROR_STOP=1 -tAqc "$1"; }

up_postgres() {
    PGB=$(pg_bin)
    local data=$DIR/pg
    if [[ $(id -u) == 0 ]]; then
        id -u "$PG_OS_USER" >/dev/null 2>&1 || die "running as root, PostgreSQL needs an OS user to run as: '$PG_OS_USER' does not exist (apt-get install -y postgresql creates it; or set SERVICES_PG_OS_USER)"
        runuser -u "$PG_OS_USER" -- test -x "$DIR" || die "the '$PG_OS_USER' OS user cannot reach $DIR (a parent folder is not searchable by others); set SERVICES_DIR to a folder it can reach"
    fi
    if [[ ! -f $data/PG_VERSION ]]; then
        say "  initdb $data"
        mkdir -p "$data"
        local pw=$DIR/.pgpass-init
        (umask 077; printf '%s\n' "$POSTGRES_PASSWORD" >"$pw")
        if [[ $(id -u) == 0 ]]; then chown "$PG_OS_USER" "$data" "$pw"; fi
        chmod 700 "$data"
        as_pg "$PGB/initdb" -D "$data" -U "$POSTGRES_USER" --pwfile="$pw" --auth=scram-sha-256 -E UTF8 --no-locale \
            >"$DIR/logs/postgres-initdb.log" 2>&1 || { rm -f "$pw"; tail -n 20 "$DIR/logs/postgres-initdb.log" >&2; die "initdb failed"; }
        rm -f "$pw"
    fi
    if [[ -n $(pid_of postgres) ]] && ours postgres "$(pid_of postgres)"; then say "  postgres already running"; return; fi
    port_busy "$PG_PORT" && die "port $PG_PORT for postgres is already in use on $HOST (set SERVICES_PG_PORT)"
    touch "$DIR/logs/postgres.log"
    if [[ $(id -u) == 0 ]]; then chown "$PG_OS_USER" "$DIR/logs/postgres.log"; fi
    # TCP on 127.0.0.1 only, no Unix socket (its folder may not exist or be too long a path)
    as_pg "$PGB/pg_ctl" -D "$data" -l "$DIR/logs/postgres.log" -w -t "$WAIT_S" \
        -o "-c listen_addresses=$HOST -p $PG_PORT -c unix_socket_directories=''" start >/dev/null \
        || { tail -n 20 "$DIR/logs/postgres.log" >&2; die "PostgreSQL did not start (log: $DIR/logs/postgres.log)"; }
    head -n 1 "$data/postmaster.pid" >"$DIR/postgres.pid"
    local t0=$SECONDS
    until "$PGB/pg_isready" -q -h $HOST -p "$PG_PORT"; do
        (( SECONDS - t0 < WAIT_S )) || die "PostgreSQL on $HOST:$PG_PORT not ready within ${WAIT_S}s"
        sleep 1
    done
    psql_q "select 1" >/dev/null || die "cannot log in to PostgreSQL on $HOST:$PG_PORT as '$POSTGRES_USER' (POSTGRES_PASSWORD differs from the cluster's?)"
    local db
    for db in mlflow prefect; do
        [[ $(psql_q "select 1 from pg_database where datname = '$db'") == 1 ]] || psql_q "create database $db" >/dev/null
    done
    say "  postgres healthy on $HOST:$PG_PORT (databases mlflow, prefect)"
}

down_postgres() {
    local pid; pid=$(pid_of postgres)
    [[ -n $pid ]] || return 0
    if ours postgres "$pid"; then
        as_pg "$(pg_bin)/pg_ctl" -D "$DIR/pg" -m fast -w -t 60 stop >/dev/null || die "pg_ctl stop failed (pid $pid)"
        say "  postgres stopped (pid $pid)"
    else
        say "  postgres was not running (stale pid $pid)"
    fi
    rm -f "$DIR/postgres.pid"
}

# ------------------------------------------------------------------ the other services
up_s3() {
    spawn s3 "$BIN/moto_server" -H $HOST -p "$S3_PORT"
    wait_for s3 "$(pid_of s3)" http_ok "http://$HOST:$S3_PORT/moto-api/"
    AWS_ENDPOINT_URL=http://$HOST:$S3_PORT "$PYTHON" - <<'EOF'
import boto3
s3 = boto3.client("s3")
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for bucket in ("mlflow", "dvc"):
    if bucket not in have:
        s3.create_bucket(Bucket=bucket)
EOF
    say "  s3 buckets mlflow, dvc"
}

needs_postgres() {
    "$(pg_bin)/pg_isready" -q -h $HOST -p "$PG_PORT" || die "$1 needs PostgreSQL on $HOST:$PG_PORT: start it first (run-local.sh up postgres)"
}

up_mlflow() {
    needs_postgres mlflow
    # credentials reach the server through its environment, never its command line (`ps` shows
    # that): psycopg2 reads PGPASSWORD, boto3 the AWS_* variables
    # its background job runner (GenAI evaluation jobs) is not needed here: off unless asked for
    ( export PGPASSWORD=$POSTGRES_PASSWORD MLFLOW_S3_ENDPOINT_URL=http://$HOST:$S3_PORT AWS_ENDPOINT_URL=http://$HOST:$S3_PORT \
          MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
      spawn mlflow "$BIN/mlflow" server --host $HOST --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
          --backend-store-uri "postgresql://$PG_USER_Q@$HOST:$PG_PORT/mlflow" \
          --artifacts-destination s3://mlflow --serve-artifacts )
    wait_for mlflow "$(pid_of mlflow)" http_ok "http://$HOST:$MLFLOW_PORT/health"
}

up_prefect() {
    needs_postgres prefect
    mkdir -p "$DIR/prefect-home"
    ( unset PREFECT_API_URL
      export PREFECT_HOME=$DIR/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false \
          PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$PG_USER_Q:$PG_PW_Q@$HOST:$PG_PORT/prefect" \
          PREFECT_UI_API_URL="http://$HOST:$PREFECT_PORT/api"
      spawn prefect "$BIN/prefect" server start --host $HOST --port "$PREFECT_PORT" )
    wait_for prefect "$(pid_of prefect)" http_ok "http://$HOST:$PREFECT_PORT/api/health"
}

deployment_polled_since() {  # the worker has polled the API for its deployment's runs since $1
    "$PYTHON" - "http://$HOST:$PREFECT_PORT/api" "$1" "$PROJECT/params.yaml" <<'EOF'
import json, sys, urllib.request
from datetime import datetime
import yaml
api, since, params = sys.argv[1], float(sys.argv[2]), yaml.safe_load(open(sys.argv[3]))
name = params["orchestration"]["deployment_name"]
try:
    with urllib.request.urlopen(f"{api}/deployments/name/gpt-pipeline/{name}", timeout=3) as r:
        dep = json.load(r)
except Exception:
    sys.exit(1)
polled = dep.get("last_polled")
sys.exit(0 if polled and datetime.fromisoformat(polled.replace("Z", "+00:00")).timestamp() >= since else 1)
EOF
}

up_worker() {
    [[ -f $PROJECT/params.yaml ]] || die "SERVICES_PROJECT=$PROJECT has no params.yaml"
    http_ok "http://$HOST:$PREFECT_PORT/api/health" || die "worker needs the Prefect server on $HOST:$PREFECT_PORT: start it first (run-local.sh up prefect)"
    local since; since=$(date +%s)
    # stage commands say `python`: the venv's comes first on PATH
    ( export PATH="$BIN:$PATH" PREFECT_HOME=$DIR/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false \
          PREFECT_API_URL="http://$HOST:$PREFECT_PORT/api" MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT" \
          AWS_ENDPOINT_URL="http://$HOST:$S3_PORT" MLFLOW_S3_ENDPOINT_URL="http://$HOST:$S3_PORT" PYTHONUNBUFFERED=1
      SPAWN_CWD=$PROJECT spawn worker "$PYTHON" -m flows.serve --project "$PROJECT" )
    wait_for worker "$(pid_of worker)" deployment_polled_since "$since"
}

up_one() {
    local name=$1 pid; pid=$(pid_of "$name")
    if [[ $name != postgres && -n $pid ]] && ours "$name" "$pid"; then say "  $name already running (pid $pid)"; return; fi
    "up_$name"
}

stop_pid() {  # stop_pid NAME: SIGTERM to the process group we started, SIGKILL after 30 s
    local name=$1 pid; pid=$(pid_of "$name")
    [[ -n $pid ]] || return 0
    if ! ours "$name" "$pid"; then
        say "  $name was not running (stale pid $pid)"; rm -f "$DIR/$name.pid"; return 0
    fi
    local target=$pid
    # its own process group (setsid): signal the group, which holds the server's workers too
    [[ $(ps -o pgid= -p "$pid" | tr -d ' ') == "$pid" ]] && target=-$pid
    kill -TERM -- "$target" 2>/dev/null || true
    local t0=$SECONDS
    while kill -0 -- "$target" 2>/dev/null; do
        if (( SECONDS - t0 >= 30 )); then kill -KILL -- "$target" 2>/dev/null || true; sleep 1; break; fi
        sleep 0.5
    done
    say "  $name stopped (pid $pid)"
    rm -f "$DIR/$name.pid"
}

status() {
    local name pid port state rc=0
    for name in "${ALL[@]}"; do
        pid=$(pid_of "$name"); port=$(port_of "$name")
        if [[ -z $pid ]]; then state=stopped
        elif ! ours "$name" "$pid"; then state="dead (stale pid file)"; rc=1
        else
            state=running
            case $name in
                s3) http_ok "http://$HOST:$S3_PORT/moto-api/" && state=healthy || state=unhealthy ;;
                mlflow) http_ok "http://$HOST:$MLFLOW_PORT/health" && state=healthy || state=unhealthy ;;
                prefect) http_ok "http://$HOST:$PREFECT_PORT/api/health" && state=healthy || state=unhealthy ;;
                postgres) "$(pg_bin)/pg_isready" -q -h $HOST -p "$PG_PORT" && state=healthy || state=unhealthy ;;
            esac
            [[ $state == unhealthy ]] && rc=1
        fi
        printf '%-9s pid %-8s port %-6s %s\n' "$name" "${pid:--}" "${port:--}" "$state"
    done
    return $rc
}

selected() {  # the services named on the command line, in start order (all by default)
    if (( $# == 0 )); then printf '%s\n' "${ALL[@]}"; return; fi
    local s
    for s in "$@"; do port_of "$s" >/dev/null; done
    for s in "${ALL[@]}"; do [[ " $* " == *" $s "* ]] && echo "$s"; done
    return 0
}

cmd=${1:-}; shift || true
case $cmd in
    up)
        [[ -x $PYTHON ]] || die "no Python at $PYTHON: run make setup (or set PYTHON)"
        mkdir -p "$DIR/logs"; chmod 755 "$DIR"
        load_credentials
        write_env
        say "starting services in $DIR (logs in $DIR/logs)"
        for s in $(selected "$@"); do up_one "$s"; done
        say ""
        say "Services up. Point the pipeline at them with:  source $DIR/env"
        say "  MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT   (UI: the same address)"
        say "  PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api   (UI: http://$HOST:$PREFECT_PORT)"
        say "  AWS_ENDPOINT_URL=http://$HOST:$S3_PORT   (S3 store; credentials in $DIR/env)"
        if [[ $S3_PORT != 9000 ]]; then
            say "  DVC remote on this store: dvc remote modify --local store endpointurl http://$HOST:$S3_PORT"
        fi
        ;;
    down)
        [[ -d $DIR ]] || { say "nothing started ($DIR does not exist)"; exit 0; }
        mapfile -t order < <(selected "$@")
        for (( i=${#order[@]}-1; i>=0; i-- )); do
            if [[ ${order[i]} == postgres ]]; then down_postgres; else stop_pid "${order[i]}"; fi
        done
        ;;
    status) status ;;
    services)  # what each service is and gets; tests/test_services.py holds the compose file to it
        printf '# name\tport variable\tport\tcredentials (environment)\tclient settings it is given\n'
        printf 'postgres\tSERVICES_PG_PORT\t%s\tPOSTGRES_USER,POSTGRES_PASSWORD\t-\n' "$PG_PORT"
        printf 's3\tSERVICES_S3_PORT\t%s\tAWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY\t-\n' "$S3_PORT"
        printf 'mlflow\tSERVICES_MLFLOW_PORT\t%s\tPOSTGRES_USER,POSTGRES_PASSWORD,AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY\tMLFLOW_S3_ENDPOINT_URL\n' "$MLFLOW_PORT"
        printf 'prefect\tSERVICES_PREFECT_PORT\t%s\tPOSTGRES_USER,POSTGRES_PASSWORD\tPREFECT_API_DATABASE_CONNECTION_URL,PREFECT_UI_API_URL\n' "$PREFECT_PORT"
        printf 'worker\t-\t-\tAWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY\tPREFECT_API_URL,MLFLOW_TRACKING_URI,AWS_ENDPOINT_URL,MLFLOW_S3_ENDPOINT_URL\n'
        ;;
    *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
