#!/usr/bin/env bash
# Starts moto's S3 server on 127.0.0.1 and prints the environment that
# points the catalog's race tests and benchmark at it (moto answers
# conditional writes atomically; s3s-fs does not under concurrency):
#   eval "$(tools/dev/moto-server.sh start)"     tools/dev/moto-server.sh stop
# moto checks no credentials: any key works.
set -euo pipefail
dir=${CAIRN_MOTO_DIR:-/tmp/cairn-moto}
port=${CAIRN_MOTO_PORT:-9015}
up() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
case "${1:-start}" in
start)
    if ! up; then
        mkdir -p "$dir"
        python3 -c 'import moto.server' 2>/dev/null || { echo "moto is not installed (tools/dev/setup.sh installs it)" >&2; exit 1; }
        nohup python3 -m moto.server -H 127.0.0.1 -p "$port" >"$dir/log" 2>&1 &
        echo $! >"$dir/pid"
        for _ in $(seq 150); do up && break; sleep 0.1; done
        up || { echo "moto_server did not start; see $dir/log" >&2; exit 1; }
    fi
    echo "export CAIRN_TEST_MOTO_ENDPOINT=http://127.0.0.1:$port"
    ;;
stop)
    [ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true
    rm -f "$dir/pid"
    ;;
esac
