#!/usr/bin/env bash
# Benchmarks micromsg against nginx+nchan and the bare hyper `hello` server on this
# machine, side by side in one run (issue 3; BENCHMARKS.md has the figures).
#
#   bench/run.sh            every scenario, each target RUNS times (interleaved),
#                           medians and ratios as a markdown table
#   bench/run.sh --quick    CI smoke (same as SMOKE=1): micromsg only, scenario 1 for
#                           3 s, a fan-out to 50 subscribers for 2 s, S=100 P=4
#                           over WebSocket for 2 s, S=100 P=4 with 50 messages
#                           per /v1/publish_batch for 2 s, 2 rounds of 500
#                           sessions that come and go (scenario 12) and, when redis-server is
#                           installed, S=100 P=4 over 3 pairs sharing one Redis for
#                           2 s, once each; fails if anything was lost, duplicated
#                           or misrouted. Needs no nginx and no network.
#
# Environment:
#   DURATION   seconds per run (default 15; 3 in --quick)
#   RUNS       runs per scenario and target (default 3)
#   SCENARIOS  which scenarios, in order (default "1 2 3 4 5 6 7 8 9 10 11 12"; 6
#              to 10 and 12 are micromsg only, 10 beside hello)
#   TARGETS    which servers (default "micromsg nchan hello"; scenario 3 skips hello;
#              nginx is installed and started only when nchan is among them)
#   IDLE       parked long-polls in scenario 3 (default 10000)
#   FANOUT     subscribers of the channel in scenario 7 (default 10000)
#   CHURN      new sessions per round in scenario 12 (default 10000)
#   CHURN_ROUNDS  rounds of scenario 12 (default 10)
#   TRANSPORTS how the subscribers of scenario 8 receive, side by side (default
#              "poll ws sse": x0 long-poll, WebSocket in fast flow, SSE)
#   CLUSTERS   what scenario 9 compares, side by side: BACKEND:PAIRS each (default
#              "embedded:1 redis:1 redis:3"; embedded takes 1 pair only)
#   POLICIES   which fsync policies scenario 6 runs (default "always interval never")
#   REDIS_FSYNC  appendfsync of scenario 9's redis-server (default always: what
#              msgserver needs so that nothing answered "ok" is lost; everysec, no)
#   ATTEMPTS   tries per measurement while runs come out disturbed (default 3)
#   RESULTS    file for the raw JSON lines (default target/bench/results-<time>.jsonl;
#              the markdown table goes next to it as .md)
#   LAYOUT     where the processes run (default shared: anywhere, as the scheduler
#              likes; split: every server on the upper half of the CPUs and msgbench
#              on the lower half, with taskset, so that server and generator never
#              share a CPU; nginx then runs one worker per server CPU)
#   NGINX_WORKERS  nginx's worker_processes (default 2, or as LAYOUT says)
#   KEEP_TMP=1 keep the servers' logs and configs
#
# Installs nginx and libnginx-mod-nchan with apt if nchan is a target and they are
# missing, and redis-server if scenario 9 is to run and it is missing (neither
# system service is enabled or left running), builds in
# release mode, starts the targets among micromsg (msgserver + msghandler on a
# private socket), nginx+nchan (own prefix and config in a temporary directory) and
# hello, each on a free loopback port (scenario 9: a redis-server on a Unix socket
# and msghandler+msgserver pairs over it), and stops everything it started on exit.
# Load only ever goes to 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${SMOKE:-0}" = 1 ] && quick=1
for arg in "$@"; do
    case $arg in
        --quick | --smoke) quick=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "run.sh: unknown argument $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

duration=${DURATION:-15}
runs=${RUNS:-3}
idle_polls=${IDLE:-10000}
fanout=${FANOUT:-10000}
attempts=${ATTEMPTS:-3}
scenarios=${SCENARIOS:-1 2 3 4 5 6 7 8 9 10 11 12}
churn=${CHURN:-10000}
churn_rounds=${CHURN_ROUNDS:-10}
# Scenario 12's core forgets a session 2 s after its last request (session_timeout
# and idle_mailbox_timeout, 60 and 300 s by default), so that a round is forgotten
# in seconds.
churn_env=(MICROMSG_SESSION_TIMEOUT=2 MICROMSG_IDLE_MAILBOX_TIMEOUT=2)
clusters=${CLUSTERS:-embedded:1 redis:1 redis:3}
redis_fsync=${REDIS_FSYNC:-always}
read -r -a fsync_policies <<< "${POLICIES:-always interval never}"
transports=${TRANSPORTS:-poll ws sse}
targets=${TARGETS:-micromsg nchan hello}
has_target() { [[ " $targets " == *" $1 "* ]]; }
[ "$quick" = 1 ] && duration=${DURATION:-3}

# Command prefixes that place the servers and the generator (LAYOUT above).
layout=${LAYOUT:-shared}
on_servers=()
on_generator=()
nginx_workers=2
case $layout in
    shared) ;;
    split)
        cpus=$(nproc)
        if [ "$cpus" -lt 2 ]; then
            echo "run.sh: LAYOUT=split needs at least 2 CPUs" >&2
            exit 2
        fi
        half=$((cpus / 2))
        on_generator=(taskset -c "0-$((half - 1))")
        on_servers=(taskset -c "$half-$((cpus - 1))")
        nginx_workers=$((cpus - half))
        ;;
    *)
        echo "run.sh: LAYOUT must be shared or split, not $layout" >&2
        exit 2
        ;;
esac
nginx_workers=${NGINX_WORKERS:-$nginx_workers}

log() { echo "run.sh: $*" >&2; }

tmp=$(mktemp -d -t msgbench.XXXXXX)
# msgserver drops to www-data and nginx workers run as nobody: let them in.
chmod 755 "$tmp"
declare -A started=() # pid -> what
cleanup() {
    local pid
    for pid in "${!started[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${!started[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "${KEEP_TMP:-0}" = 1 ]; then
        log "kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------
# Setup

port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local port=$1
    while port_in_use "$port"; do port=$((port + 1)); done
    echo "$port"
}
wait_for_port() { # port pid what
    local _
    for _ in $(seq 200); do
        port_in_use "$1" && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.05
    done
    log "$3 did not come up on port $1; its log:"
    cat "$tmp/$3.log" >&2 || true
    exit 1
}
stop() { # pid
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    unset "started[$1]"
}

nchan_module=/usr/lib/nginx/modules/ngx_nchan_module.so
install_nchan() {
    if command -v nginx >/dev/null && [ -f "$nchan_module" ]; then
        return
    fi
    log "installing nginx and libnginx-mod-nchan"
    local was_running=0
    if [ -f /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
        was_running=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends nginx libnginx-mod-nchan >"$tmp/apt.log" 2>&1 ||
        { apt-get update >>"$tmp/apt.log" 2>&1 &&
            apt-get install -y --no-install-recommends nginx libnginx-mod-nchan >>"$tmp/apt.log" 2>&1; } ||
        { cat "$tmp/apt.log" >&2; exit 1; }
    # The package may have started the system service (on port 80): only ours runs.
    if [ "$was_running" = 0 ] && [ -f /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
        log "stopping the system nginx the package started"
        nginx -s stop 2>/dev/null || kill "$(cat /run/nginx.pid)" 2>/dev/null || true
    fi
    command -v systemctl >/dev/null && systemctl disable nginx >/dev/null 2>&1 || true
}

if [ "$quick" = 0 ] && has_target nchan; then
    install_nchan
fi

install_redis() {
    command -v redis-server >/dev/null && return
    log "installing redis-server"
    local pidfile=/run/redis/redis-server.pid was_running=0
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        was_running=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends redis-server >"$tmp/apt.log" 2>&1 ||
        { apt-get update >>"$tmp/apt.log" 2>&1 &&
            apt-get install -y --no-install-recommends redis-server >>"$tmp/apt.log" 2>&1; } ||
        { cat "$tmp/apt.log" >&2; exit 1; }
    # The package may have started the system service (on port 6379): only ours runs.
    if [ "$was_running" = 0 ] && [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        log "stopping the system redis-server the package started"
        kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
    if command -v systemctl >/dev/null; then
        systemctl disable redis-server >/dev/null 2>&1 || true
    fi
}
if [ "$quick" = 0 ] && has_target micromsg && [[ " $scenarios " == *" 9 "* ]]; then
    install_redis
fi

log "building (release)"
cargo build --release --bins -p msgserver -p msghandler -p msgbench >&2
# Run private copies: other sessions may rebuild target/ while this runs.
mkdir -p "$tmp/bin"
for b in msgserver msghandler msgbench hello; do
    cp "target/release/$b" "$tmp/bin/$b"
done
bin=$tmp/bin

# Parked polls and subscribers need a descriptor each, in the servers and here.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open-file limit $(ulimit -n)"
if [ "$(id -u)" = 0 ] && ! getent passwd www-data >/dev/null; then
    # msgserver started as root hands its socket to www-data and drops to it.
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin www-data
fi

# ---------------------------------------------------------------------------------
# The three servers

micromsg_port=$(free_port 18080)
socket=$tmp/msgserver.sock
# Extra msgserver flags and environment for the next start (scenario 6 sets durable
# storage, scenario 12 short session timeouts).
msgserver_args=()
msgserver_env=()
start_micromsg() {
    rm -f "$socket"
    "${on_servers[@]}" env "${msgserver_env[@]}" "$bin/msgserver" --config etc/msgserver.toml --socket "$socket" "${msgserver_args[@]}" \
        >"$tmp/msgserver.log" 2>&1 &
    msgserver_pid=$!
    started[$msgserver_pid]=msgserver
    local _
    for _ in $(seq 200); do [ -S "$socket" ] && break; sleep 0.05; done
    [ -S "$socket" ] || { log "msgserver did not create $socket"; cat "$tmp/msgserver.log" >&2; exit 1; }
    "${on_servers[@]}" "$bin/msghandler" --config etc/msghandler.toml --socket "$socket" \
        --listen "127.0.0.1:$micromsg_port" --poll-timeout 10 >"$tmp/msghandler.log" 2>&1 &
    msghandler_pid=$!
    started[$msghandler_pid]=msghandler
    wait_for_port "$micromsg_port" "$msghandler_pid" msghandler
}
stop_micromsg() {
    stop "$msghandler_pid"
    stop "$msgserver_pid"
}

nchan_port=$(free_port $((micromsg_port + 1)))
start_nchan() {
    local dir=$tmp/nginx
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
# nginx + nchan for bench/run.sh: its own prefix, loopback only, nothing system-wide.
load_module $nchan_module;
worker_processes $nginx_workers;
worker_rlimit_nofile $(ulimit -n);
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events {
    worker_connections 16384;
}
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    # The generator keeps one connection per task for the whole run.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    # nchan keeps delivered messages in shared memory until they expire or are
    # pushed out of the channel's buffer: give it room (the default is 32M).
    nchan_max_reserved_memory 1024M;

    server {
        listen 127.0.0.1:$nchan_port backlog=4096;
        # One channel per subscriber session, as micromsg has one mailbox per session;
        # keep as many undelivered messages as micromsg's mailbox_max_len.
        nchan_message_buffer_length 1000;
        # Every message is delivered within seconds here; expiring them after 30 s
        # (default 1h) keeps the shared memory from filling up over a long run.
        nchan_message_timeout 30s;

        location = /pub {
            nchan_publisher;
            nchan_channel_id \$arg_id;
        }
        location = /sub {
            nchan_subscriber longpoll;
            nchan_channel_id \$arg_id;
            # A new subscriber starts at the next message, not at what earlier runs
            # left in the channel's buffer (nchan keeps delivered messages until
            # they expire; micromsg deletes them on delivery).
            nchan_subscriber_first_message newest;
            # micromsg runs with --poll-timeout 10.
            nchan_subscriber_timeout 10s;
            # Everything waiting in one reply (multipart/mixed), as a micromsg poll does.
            nchan_longpoll_multipart_response on;
        }
    }
}
EOF
    "${on_servers[@]}" nginx -p "$dir/" -c "$dir/nginx.conf" -g 'daemon off;' >"$tmp/nginx.log" 2>&1 &
    nginx_pid=$!
    started[$nginx_pid]=nginx
    wait_for_port "$nchan_port" "$nginx_pid" nginx
}
stop_nchan() {
    stop "$nginx_pid"
}

hello_port=$(free_port $((nchan_port + 1)))
start_hello() {
    "${on_servers[@]}" "$bin/hello" --listen "127.0.0.1:$hello_port" >"$tmp/hello.log" 2>&1 &
    hello_pid=$!
    started[$hello_pid]=hello
    wait_for_port "$hello_port" "$hello_pid" hello
}

# Scenario 9 (and the cluster smoke): BACKEND PAIRS. embedded: one msghandler +
# msgserver pair as start_micromsg's; redis: a fresh redis-server on a Unix socket
# (no TCP port; append-only file with appendfsync $redis_fsync, no snapshots) and
# PAIRS pairs over it, node names a, b, c..., msghandlers on consecutive free ports.
# Sets cluster_urls (comma-separated) and cluster_watch (msgbench's --watch and
# --watch-backend flags).
cluster_port=$(free_port $((hello_port + 1)))
cluster_pids=()
cluster= # "BACKEND PAIRS" for run_one cluster
start_cluster() { # backend pairs
    local backend=$1 pairs=$2 names=({a..z}) i name dir socket port pid redis_url
    local servers=() handlers=() urls=()
    local redis_dir=$tmp/redis
    cluster_watch=()
    if [ "$backend" = redis ]; then
        rm -rf "$redis_dir"
        mkdir -p "$redis_dir"
        chmod 755 "$redis_dir"
        cat >"$redis_dir/redis.conf" <<EOF
port 0
unixsocket $redis_dir/redis.sock
unixsocketperm 777
dir $redis_dir
appendonly yes
appendfsync $redis_fsync
save ""
daemonize no
EOF
        "${on_servers[@]}" redis-server "$redis_dir/redis.conf" >"$tmp/redis.log" 2>&1 &
        pid=$!
        started[$pid]=redis-server
        cluster_pids+=("$pid")
        for _ in $(seq 200); do [ -S "$redis_dir/redis.sock" ] && break; sleep 0.05; done
        [ -S "$redis_dir/redis.sock" ] || { log "redis-server did not start"; cat "$tmp/redis.log" >&2; exit 1; }
        redis_url=redis+unix://$redis_dir/redis.sock
        cluster_watch+=(--watch-backend "redis-server:$pid")
    fi
    port=$cluster_port
    for i in $(seq 0 $((pairs - 1))); do
        name=${names[i]}
        dir=$tmp/pair-$name
        socket=$dir/msgserver.sock
        rm -rf "$dir"
        mkdir -p "$dir"
        chmod 755 "$dir"
        if [ "$backend" = redis ]; then
            MICROMSG_BACKEND=redis MICROMSG_REDIS_URL=$redis_url MICROMSG_NODE_NAME=$name \
                "${on_servers[@]}" "$bin/msgserver" --config etc/msgserver.toml --socket "$socket" \
                >"$tmp/msgserver-$name.log" 2>&1 &
        else
            "${on_servers[@]}" "$bin/msgserver" --config etc/msgserver.toml --socket "$socket" \
                >"$tmp/msgserver-$name.log" 2>&1 &
        fi
        pid=$!
        started[$pid]=msgserver
        cluster_pids+=("$pid")
        servers+=("$pid")
        for _ in $(seq 200); do [ -S "$socket" ] && break; sleep 0.05; done
        [ -S "$socket" ] || { log "msgserver $name did not create $socket"; cat "$tmp/msgserver-$name.log" >&2; exit 1; }
        port=$(free_port "$port")
        "${on_servers[@]}" "$bin/msghandler" --config etc/msghandler.toml --socket "$socket" \
            --listen "127.0.0.1:$port" --poll-timeout 10 >"$tmp/msghandler-$name.log" 2>&1 &
        pid=$!
        started[$pid]=msghandler
        cluster_pids+=("$pid")
        handlers+=("$pid")
        wait_for_port "$port" "$pid" "msghandler-$name"
        urls+=("http://127.0.0.1:$port")
        port=$((port + 1))
    done
    cluster_urls=$(IFS=,; echo "${urls[*]}")
    cluster_watch=(--watch "msgserver:$(IFS=,; echo "${servers[*]}")"
        --watch "msghandler:$(IFS=,; echo "${handlers[*]}")" "${cluster_watch[@]}")
}
stop_cluster() {
    local i
    # The handlers first, then the cores, then Redis: started in the reverse order.
    for ((i = ${#cluster_pids[@]} - 1; i >= 0; i--)); do
        stop "${cluster_pids[i]}"
    done
    cluster_pids=()
}

# ---------------------------------------------------------------------------------
# Runs

mkdir -p target/bench
results=${RESULTS:-target/bench/results-$(date +%Y%m%d-%H%M%S).jsonl}
: >"$results"
failures=0

# run_one TARGET LABEL [msgbench flags...]: one measured run, appended to $results.
# A run disturbed by other load on the machine (or by the hypervisor taking CPU away)
# is repeated, up to ATTEMPTS runs in all; the last one counts either way and the
# report says how many of the counted runs were disturbed. With fresh_micromsg=1,
# every attempt runs on a freshly started micromsg. TARGET cluster is micromsg as
# start_cluster BACKEND PAIRS (cluster="BACKEND PAIRS") starts it, afresh for every
# attempt.
run_one() {
    local target=$1 label=$2
    shift 2
    local url watch attempt line rc bench_target backend_label
    bench_target=$target
    for attempt in $(seq "$attempts"); do
        if [ "$target" = micromsg ] && [ "${fresh_micromsg:-0}" = 1 ]; then
            stop_micromsg
            start_micromsg
        fi
        if [ "$target" = cluster ]; then
            stop_cluster
            # shellcheck disable=SC2086 # "BACKEND PAIRS"
            start_cluster $cluster
            bench_target=micromsg
        fi
        case $target in
            micromsg)
                url=http://127.0.0.1:$micromsg_port
                watch=(--watch "msgserver:$msgserver_pid" --watch "msghandler:$msghandler_pid")
                ;;
            nchan)
                url=http://127.0.0.1:$nchan_port
                watch=(--watch "nginx:$nginx_pid")
                ;;
            hello)
                url=http://127.0.0.1:$hello_port
                watch=(--watch "hello:$hello_pid")
                ;;
            cluster)
                url=$cluster_urls
                # The backend's column in the report; Redis's fsync policy too
                # unless it is the one msgserver needs.
                backend_label=${cluster%% *}
                if [ "$backend_label" = redis ] && [ "$redis_fsync" != always ]; then
                    backend_label="redis fsync=$redis_fsync"
                fi
                watch=("${cluster_watch[@]}" --backend "$backend_label")
                ;;
        esac
        rc=0
        line=$("${on_generator[@]}" "$bin/msgbench" --target "$bench_target" --url "$url" "${watch[@]}" \
            --duration "$duration" --label "$label" "$@") || rc=$?
        if [ "$rc" -ge 2 ] || [ -z "$line" ]; then
            log "msgbench failed ($target, $label)"
            failures=$((failures + 1))
            return 0
        fi
        if [[ $line == *'"disturbed":true'* ]] && [ "$attempt" -lt "$attempts" ]; then
            log "run disturbed (other processes or hypervisor steal over 10% of a core): repeating"
            echo "$line" >>"$results.disturbed"
            sleep 2
            continue
        fi
        break
    done
    echo "$line" >>"$results"
    if [ "$rc" -ne 0 ]; then
        log "FAILED: $target $label lost, duplicated or misrouted messages"
        failures=$((failures + 1))
    fi
}

if [ "$quick" = 1 ]; then
    start_micromsg
    rc=0
    smoke() { # label msgbench flags... (against the micromsg started last)
        local label=$1 one=0
        shift
        "${on_generator[@]}" "$bin/msgbench" --target micromsg --url "http://127.0.0.1:$micromsg_port" \
            --watch "msgserver:$msgserver_pid" --watch "msghandler:$msghandler_pid" \
            --label "$label" "$@" >>"$results" || one=$?
        [ "$one" = 0 ] || { log "smoke $label FAILED (exit $one)"; rc=$one; }
    }
    log "smoke: micromsg, S=100 P=4, ${duration}s"
    smoke smoke --subscribers 100 --publishers 4 --duration "$duration"
    log "smoke: micromsg, fan-out of a channel to 50 subscribers, 2s"
    smoke smoke-fanout --fanout 50 --duration 2
    log "smoke: micromsg, S=100 P=4 over WebSocket (fast flow), 2s"
    stop_micromsg
    start_micromsg
    smoke smoke-ws --subscribers 100 --publishers 4 --duration 2 --transport ws
    log "smoke: micromsg, S=100 P=4, 50 messages per /v1/publish_batch, 2s"
    stop_micromsg
    start_micromsg
    smoke smoke-batch --subscribers 100 --publishers 4 --duration 2 --publish-batch 50 \
        --poll-pause-ms 20
    stop_micromsg
    log "smoke: micromsg, 2 rounds of 500 sessions that come, get a message and leave"
    msgserver_env=("${churn_env[@]}")
    start_micromsg
    msgserver_env=()
    smoke smoke-churn --churn 500 --rounds 2
    stop_micromsg
    # Issue 9: every message published on one pair and polled on another; about 3 s
    # in all with the start of Redis and the pairs.
    if command -v redis-server >/dev/null; then
        log "smoke: micromsg, S=100 P=4 over 3 pairs sharing one Redis, 2s"
        start_cluster redis 3
        one=0
        "${on_generator[@]}" "$bin/msgbench" --target micromsg --url "$cluster_urls" "${cluster_watch[@]}" \
            --backend redis --label smoke-cluster --subscribers 100 --publishers 4 \
            --duration 2 >>"$results" || one=$?
        [ "$one" = 0 ] || { log "smoke smoke-cluster FAILED (exit $one)"; rc=$one; }
        stop_cluster
    else
        log "smoke: redis-server is not installed: no cluster smoke (.ci/run installs it)"
    fi
    [ "$rc" = 0 ] && log "smoke passed: nothing lost, duplicated or misrouted" ||
        log "smoke FAILED; see $results"
    exit "$rc"
fi

has_target micromsg && start_micromsg
has_target nchan && start_nchan
has_target hello && start_hello
log "micromsg :$micromsg_port  nchan :$nchan_port  hello :$hello_port  ${duration}s × $runs  results $results"

label_of() {
    case $1 in
        1) echo "1: S=100 P=4" ;;
        2) echo "2: S=1000 P=8" ;;
        3) echo "3: $idle_polls idle parked long-polls" ;;
        4) echo "4: S=100 P=4, CORS preflight before every request" ;;
        5) echo "5: backlog, S=100 P=4, subscribers pause 20 ms between polls" ;;
        6) echo "6: durable, ack delivery, S=100 P=32" ;;
        7) echo "7: fan-out of one channel message to $fanout subscribers" ;;
        8) echo "8: S=100 P=4 over WebSocket and over SSE" ;;
        9) echo "9: cluster, S=100 P=4 over msghandler+msgserver pairs" ;;
        10) echo "10: backlog, S=100 P=4 with 50 messages per publish, subscribers pause 20 ms" ;;
        11) echo "11: light load, S=100 P=1, publisher pauses 10 ms after each publish" ;;
        12) echo "12: churn, $churn_rounds rounds of $churn new sessions that get a message and leave" ;;
    esac
}
flags_of() {
    case $1 in
        1) echo "--subscribers 100 --publishers 4" ;;
        2) echo "--subscribers 1000 --publishers 8" ;;
        3) echo "--idle $idle_polls" ;;
        4) echo "--subscribers 100 --publishers 4 --preflight" ;;
        5) echo "--subscribers 100 --publishers 4 --poll-pause-ms 20" ;;
        6) echo "--subscribers 100 --publishers 32" ;;
        7) echo "--fanout $fanout" ;;
        8) echo "--subscribers 100 --publishers 4" ;;
        9) echo "--subscribers 100 --publishers 4" ;;
        10) echo "--subscribers 100 --publishers 4 --publish-batch 50 --poll-pause-ms 20" ;;
        11) echo "--subscribers 100 --publishers 1 --publish-pause-ms 10" ;;
        12) echo "--churn $churn --rounds $churn_rounds" ;;
    esac
}

# Scenario 6: micromsg with durable storage under each fsync policy, ack delivery
# (the full guarantee: every reply waits for its records as the policy says), many
# concurrent publishers so that group commit has something to group. Prints the
# log bytes written per message (compaction held off so the log holds them all).
run_durable() {
    local label=$1 policy rep bytes published batch name
    shift
    for rep in $(seq "$runs"); do
        for policy in "${fsync_policies[@]}"; do
            # One message per x0 SET, then 50 per /v1/publish_batch: the HTTP path
            # limits the first, the log's group commit the second.
            for batch in 0 50; do
                stop_micromsg
                rm -rf "$tmp/data"
                msgserver_args=(--data-dir "$tmp/data" --fsync "$policy" --delivery ack)
                MICROMSG_COMPACT_MIN_BYTES=$((1 << 40)) start_micromsg
                msgserver_args=()
                name="${label/durable/durable fsync=$policy}"
                [ "$batch" = 0 ] || name="$name, $batch messages per publish"
                log "scenario $name: micromsg, run $rep/$runs"
                # One attempt: a repeated run would append to the same log and spoil the
                # bytes-per-message figure. The report counts disturbed runs.
                attempts=1 run_one micromsg "$name" "$@" --publish-batch "$batch"
                # The log's own count: the file on disk also holds the zeros
                # preallocated ahead of the last record.
                bytes=$(python3 -c 'import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1]).read().decode().splitlines():
    if line.startswith("micromsg_core_journal_bytes "):
        print(int(float(line.split()[1])))' "http://127.0.0.1:$micromsg_port/metrics")
                published=$(tail -n 1 "$results" | python3 -c 'import json,sys; print(json.load(sys.stdin)["published"])')
                log "fsync $policy: $bytes log bytes for $published messages: $((bytes / (published > 0 ? published : 1))) bytes per message (a Put and a Removed record each)"
            done
        done
    done
    stop_micromsg
    start_micromsg
}

# Scenario 7: micromsg only (channels are an API v1 feature). One publisher sends a
# message to the channel all $fanout subscriber sessions are subscribed to and waits
# until every one of them has it before the next. Every attempt on a freshly started
# micromsg: the sessions of a previous run stay subscribed until the core's
# session_timeout, and the RSS at the end should be this run's alone.
run_fanout() {
    local label=$1 rep
    shift
    for rep in $(seq "$runs"); do
        log "scenario $label: micromsg, run $rep/$runs"
        fresh_micromsg=1 run_one micromsg "$label" "$@"
    done
}

# Scenario 8: micromsg only. Scenario 1's load with the subscribers on each
# transport in turn, interleaved: x0 long-poll, one WebSocket per session in fast
# flow (no acks: a message counts as acknowledged once written), one event stream
# per session; the publishers send with x0 POST /set throughout. Every attempt on a
# freshly started micromsg: an event stream gives its last batch back to the core
# when it closes (docs/TRANSPORTS.md), and the next run's sessions, which have the
# same names, would be given it again.
run_transports() {
    local label=$1 rep transport
    shift
    for rep in $(seq "$runs"); do
        for transport in $transports; do
            log "scenario $label: micromsg over $transport, run $rep/$runs"
            fresh_micromsg=1 run_one micromsg "$label" "$@" --transport "$transport"
        done
    done
}

# Scenario 9: micromsg only (issue 9). Scenario 1's load against each of CLUSTERS
# in turn, interleaved: one pair with the embedded backend, the reference; one pair
# and three pairs sharing one Redis. With several pairs, subscriber j polls pair
# j % n and its messages are published via pair (j + 1) % n: every message crosses
# from one pair to another through Redis. Server CPU is the msgservers' and the
# msghandlers'; Redis's is reported apart, with its share of the two together.
# Every attempt on a fresh Redis and fresh pairs.
run_cluster() {
    local label=$1 rep c
    shift
    for c in $clusters; do
        if [ "${c%%:*}" = embedded ] && [ "${c#*:}" != 1 ]; then
            log "CLUSTERS: the embedded backend takes 1 pair only, not $c"
            exit 2
        fi
    done
    stop_micromsg
    for rep in $(seq "$runs"); do
        for c in $clusters; do
            log "scenario $label: micromsg ${c%%:*}, ${c#*:} pair(s), run $rep/$runs"
            cluster="${c%%:*} ${c#*:}" run_one cluster "$label" "$@"
        done
    done
    stop_cluster
    start_micromsg
}

# Scenario 10: micromsg only (nchan has no batch publish). Publishers send 50
# messages per POST /v1/publish_batch and subscribers pause between polls, so both
# sides move many messages per request. Compared with hello at full speed (scenario
# 1's load), the bare request rate that issue 3 asks the delivered rate to beat.
run_batch() {
    local label=$1 rep
    shift
    for rep in $(seq "$runs"); do
        if has_target micromsg; then
            log "scenario $label: micromsg, run $rep/$runs"
            fresh_micromsg=1 run_one micromsg "$label" "$@"
        fi
        if has_target hello; then
            log "scenario $label: hello (scenario 1's load), run $rep/$runs"
            run_one hello "$label" --subscribers 100 --publishers 4
        fi
    done
}

# Scenario 12: micromsg only. Rounds of new sessions, each of which is sent one
# message, polls it, leaves a poll parked and closes its connection; after each
# round msgbench waits until /metrics shows the servers hold no more than before
# and reads their RSS, with the core's timeouts of churn_env. Every run on a freshly
# started micromsg.
run_churn() {
    local label=$1 rep
    shift
    msgserver_env=("${churn_env[@]}")
    for rep in $(seq "$runs"); do
        log "scenario $label: micromsg, run $rep/$runs"
        fresh_micromsg=1 run_one micromsg "$label" "$@"
    done
    msgserver_env=()
    stop_micromsg
    start_micromsg
}

started_at=$SECONDS
for scenario in $scenarios; do
    label=$(label_of "$scenario")
    [ "$layout" = split ] && label="$label; servers and generator on separate CPUs"
    read -r -a flags <<<"$(flags_of "$scenario")"
    if [ "$scenario" = 6 ]; then
        has_target micromsg && run_durable "$label" "${flags[@]}"
        continue
    fi
    if [ "$scenario" = 7 ]; then
        has_target micromsg && run_fanout "$label" "${flags[@]}"
        continue
    fi
    if [ "$scenario" = 8 ]; then
        has_target micromsg && run_transports "$label" "${flags[@]}"
        continue
    fi
    if [ "$scenario" = 9 ]; then
        has_target micromsg && run_cluster "$label" "${flags[@]}"
        continue
    fi
    if [ "$scenario" = 10 ]; then
        run_batch "$label" "${flags[@]}"
        continue
    fi
    if [ "$scenario" = 12 ]; then
        has_target micromsg && run_churn "$label" "${flags[@]}"
        continue
    fi
    # Each scenario starts from freshly started servers.
    has_target micromsg && { stop_micromsg; start_micromsg; }
    has_target nchan && { stop_nchan; start_nchan; }
    for rep in $(seq "$runs"); do
        if [ "$scenario" = 3 ]; then
            # Memory per poll is measured on freshly started servers, so that nothing
            # left from earlier runs hides in the "before" figure.
            for target in $targets; do
                [ "$target" = hello ] && continue
                log "scenario $label: $target, run $rep/$runs"
                if [ "$target" = nchan ]; then stop_nchan; start_nchan; fi
                sleep 1
                # micromsg afresh for a repeated (disturbed) attempt too: on the
                # servers of the attempt before, the polls would park in memory that
                # attempt freed, and the growth would look a fraction of what it is.
                fresh_micromsg=1 run_one "$target" "$label" "${flags[@]}"
            done
            continue
        fi
        for target in $targets; do
            # Light load is about latency, which hello does not measure.
            [ "$scenario" = 11 ] && [ "$target" = hello ] && continue
            log "scenario $label: $target, run $rep/$runs"
            run_one "$target" "$label" "${flags[@]}"
        done
    done
done
log "measured in $((SECONDS - started_at)) s"

echo
"$bin/msgbench" --report "$results" | tee "${results%.jsonl}.md"
log "raw results: $results; table: ${results%.jsonl}.md"
if [ "$failures" -gt 0 ]; then
    log "$failures run(s) failed or lost/duplicated/misrouted messages"
    exit 1
fi
